//! What open learns of a LUN (docs/ISCSI.md, "Commands used", "Zeroing", "Holes"): which LUN
//! an address without one means, its INQUIRY and capacity, its provisioning and limits, and so
//! how zeros and holes work on it.

use blksync_core::{Error, ErrorKind, Result};

use crate::endpoint::{Iscsi, STATUS_LEN};
use crate::scsi::{self, BlockLimits, Capacity, Inquiry, Provisioning};
use crate::session::Data;

/// How `zero` works on this LUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroMethod {
    /// WRITE SAME(16) with UNMAP and a zero block (LBPRZ and LBPWS).
    WriteSameUnmap,
    /// UNMAP, then zeros written where GET LBA STATUS still says mapped (LBPRZ and LBPU).
    Unmap,
    /// Zeros written where the LUN is not already zero.
    Write,
}

/// What open learnt of the LUN.
#[derive(Debug, Clone)]
pub struct LunInfo {
    /// The LUN number.
    pub lun: u16,
    /// Standard INQUIRY data.
    pub inquiry: Inquiry,
    /// READ CAPACITY(16).
    pub capacity: Capacity,
    /// Block Limits VPD page (zeros when the target has none).
    pub limits: BlockLimits,
    /// Logical Block Provisioning VPD page (all false when the target has none).
    pub provisioning: Provisioning,
    /// GET LBA STATUS answered at LBA 0 (and LBPRZ holds), so holes can be reported.
    pub lba_status: bool,
    /// MODE SENSE says the LUN is write-protected (false when it could not say).
    pub write_protected: bool,
    /// How `zero` works.
    pub zero: ZeroMethod,
}

impl Iscsi {
    /// The first LUN that REPORT LUNS lists and INQUIRY calls a connected disk.
    pub(crate) fn first_disk_lun(&self) -> Result<u16> {
        let data = self.command_on(
            scsi::lun_field(0),
            "listing the LUNs of",
            None,
            &scsi::report_luns(8 + 8 * 4096),
            &Data::In(8 + 8 * 4096),
        )?;
        let luns = scsi::report_luns_parse(&data.data);
        for &lun in &luns {
            let r =
                self.command_on(scsi::lun_field(lun), "asking about", None, &scsi::inquiry(None, 96), &Data::In(96));
            if let Ok(inq) = r.map(|r| Inquiry::parse(&r.data))
                && inq.is_some_and(|i| i.qualifier == 0 && i.device_type == 0)
            {
                return Ok(lun);
            }
        }
        Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "{}: the target has no disk LUN (LUNs {luns:?}); name one as …/{}/LUN",
                self.address(),
                self.address().iqn()
            ),
        ))
    }

    /// What the LUN is: clears the UNIT ATTENTION of a new session, then INQUIRY, READ
    /// CAPACITY(16), MODE SENSE, the VPD pages and a GET LBA STATUS probe.
    pub(crate) fn probe(&self, lun: u16) -> Result<LunInfo> {
        let what = self.address();
        self.command("opening", None, &scsi::test_unit_ready(), Data::None).map_err(|e| {
            if e.message().contains("logical unit not supported") {
                Error::new(ErrorKind::NotFound, format!("{what}: the target has no LUN {lun}"))
            } else {
                e
            }
        })?;
        let r = self.command("asking about", None, &scsi::inquiry(None, 96), Data::In(96))?;
        let inquiry = Inquiry::parse(&r.data).ok_or_else(|| self.protocol("INQUIRY data shorter than 36 bytes"))?;
        if inquiry.qualifier != 0 {
            return Err(Error::new(ErrorKind::NotFound, format!("{what}: the target has no LUN {lun}")));
        }
        if inquiry.device_type != 0 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{what}: LUN {lun} is no disk (peripheral device type {:#04x}; tgtd's LUN 0 is its controller)",
                    inquiry.device_type
                ),
            ));
        }
        let r = self.command("reading the capacity of", None, &scsi::read_capacity16(), Data::In(32))?;
        let capacity =
            Capacity::parse(&r.data).ok_or_else(|| self.protocol("READ CAPACITY(16) data that make no sense"))?;
        // A target without MODE SENSE says nothing: the first write's DATA PROTECT will.
        let write_protected = self
            .command("asking about", None, &scsi::mode_sense6(), Data::In(255))
            .is_ok_and(|r| scsi::write_protected(&r.data) == Some(true));
        let mut limits = BlockLimits::default();
        let mut provisioning = Provisioning::default();
        if let Ok(r) = self.command("asking about", None, &scsi::inquiry(Some(0), 255), Data::In(255)) {
            let pages = scsi::supported_pages(&r.data);
            if pages.contains(&0xB0)
                && let Ok(r) = self.command("asking about", None, &scsi::inquiry(Some(0xB0), 64), Data::In(64))
            {
                limits = BlockLimits::parse(&r.data).unwrap_or_default();
            }
            if pages.contains(&0xB2)
                && capacity.lbpme
                && let Ok(r) = self.command("asking about", None, &scsi::inquiry(Some(0xB2), 64), Data::In(64))
            {
                provisioning = Provisioning::parse(&r.data).unwrap_or_default();
            }
        }
        let lba_status = capacity.lbpme
            && capacity.lbprz
            && self
                .command("asking about", None, &scsi::get_lba_status(0, STATUS_LEN), Data::In(STATUS_LEN))
                .is_ok_and(|r| scsi::lba_status_parse(&r.data, 0).is_ok());
        let zero = match (capacity.lbprz && capacity.lbpme, provisioning.lbpws, provisioning.lbpu) {
            (true, true, _) => ZeroMethod::WriteSameUnmap,
            (true, false, true) if lba_status => ZeroMethod::Unmap,
            _ => ZeroMethod::Write,
        };
        Ok(LunInfo { lun, inquiry, capacity, limits, provisioning, lba_status, write_protected, zero })
    }
}
