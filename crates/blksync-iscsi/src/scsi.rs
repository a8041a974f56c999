//! SCSI commands of SBC-3/SBC-4 and SPC-4 that the initiator sends, and parsers for what comes
//! back (docs/ISCSI.md, "Commands used", "Sense and retries"). Every parser takes whatever bytes
//! a target sent and checks lengths before it reads a field.

use std::fmt;

/// SCSI status GOOD.
pub const GOOD: u8 = 0x00;
/// SCSI status CHECK CONDITION: sense data says why.
pub const CHECK_CONDITION: u8 = 0x02;
/// SCSI status BUSY.
pub const BUSY: u8 = 0x08;
/// SCSI status RESERVATION CONFLICT.
pub const RESERVATION_CONFLICT: u8 = 0x18;
/// SCSI status TASK SET FULL.
pub const TASK_SET_FULL: u8 = 0x28;

/// Sense key UNIT ATTENTION.
pub const UNIT_ATTENTION: u8 = 0x06;
/// Sense key ILLEGAL REQUEST.
pub const ILLEGAL_REQUEST: u8 = 0x05;
/// Sense key DATA PROTECT.
pub const DATA_PROTECT: u8 = 0x07;

/// A CDB of up to 16 bytes.
pub type Cdb = [u8; 16];

fn cdb(bytes: &[u8]) -> Cdb {
    let mut c = [0; 16];
    c[..bytes.len()].copy_from_slice(bytes);
    c
}

fn lba_cdb(op: u8, byte1: u8, lba: u64, blocks: u32) -> Cdb {
    let mut c = [0; 16];
    c[0] = op;
    c[1] = byte1;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// TEST UNIT READY.
#[must_use]
pub fn test_unit_ready() -> Cdb {
    cdb(&[0x00])
}

/// INQUIRY: the standard data (`page None`) or a VPD page, `len` bytes at most.
#[must_use]
pub fn inquiry(page: Option<u8>, len: u16) -> Cdb {
    let [hi, lo] = len.to_be_bytes();
    match page {
        None => cdb(&[0x12, 0, 0, hi, lo, 0]),
        Some(p) => cdb(&[0x12, 1, p, hi, lo, 0]),
    }
}

/// MODE SENSE(6) of all pages, 255 bytes at most: only its header's WP bit is read.
#[must_use]
pub fn mode_sense6() -> Cdb {
    cdb(&[0x1A, 0, 0x3F, 0, 0xFF, 0])
}

/// The WP (write protect) bit of MODE SENSE(6) data (byte 2, bit 7 of its header).
#[must_use]
pub fn write_protected(data: &[u8]) -> Option<bool> {
    (data.len() >= 4).then(|| data[2] & 0x80 != 0)
}

/// REPORT LUNS (select report 0: all), `len` bytes at most.
#[must_use]
pub fn report_luns(len: u32) -> Cdb {
    let mut c = cdb(&[0xA0]);
    c[6..10].copy_from_slice(&len.to_be_bytes());
    c
}

/// READ CAPACITY(16): SERVICE ACTION IN(16), service action 0x10, 32 bytes.
#[must_use]
pub fn read_capacity16() -> Cdb {
    let mut c = cdb(&[0x9E, 0x10]);
    c[13] = 32;
    c
}

/// GET LBA STATUS: SERVICE ACTION IN(16), service action 0x12.
#[must_use]
pub fn get_lba_status(lba: u64, len: u32) -> Cdb {
    let mut c = cdb(&[0x9E, 0x12]);
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&len.to_be_bytes());
    c
}

/// READ(16).
#[must_use]
pub fn read16(lba: u64, blocks: u32) -> Cdb {
    lba_cdb(0x88, 0, lba, blocks)
}

/// WRITE(16).
#[must_use]
pub fn write16(lba: u64, blocks: u32) -> Cdb {
    lba_cdb(0x8A, 0, lba, blocks)
}

/// WRITE SAME(16) with the UNMAP bit: one block of data follows.
#[must_use]
pub fn write_same16_unmap(lba: u64, blocks: u32) -> Cdb {
    lba_cdb(0x93, 0x08, lba, blocks)
}

/// SYNCHRONIZE CACHE(16) of the whole LUN.
#[must_use]
pub fn synchronize_cache16() -> Cdb {
    cdb(&[0x91])
}

/// SYNCHRONIZE CACHE(10) of the whole LUN.
#[must_use]
pub fn synchronize_cache10() -> Cdb {
    cdb(&[0x35])
}

/// UNMAP with `len` bytes of parameter list (see [`unmap_parameters`]).
#[must_use]
pub fn unmap(len: u16) -> Cdb {
    let [hi, lo] = len.to_be_bytes();
    cdb(&[0x42, 0, 0, 0, 0, 0, 0, hi, lo, 0])
}

/// UNMAP's parameter list: an 8-byte header, then 16 bytes per `(lba, blocks)`.
#[must_use]
pub fn unmap_parameters(ranges: &[(u64, u32)]) -> Vec<u8> {
    let descriptors = ranges.len() * 16;
    let mut out = Vec::with_capacity(8 + descriptors);
    out.extend_from_slice(&((descriptors + 6) as u16).to_be_bytes());
    out.extend_from_slice(&(descriptors as u16).to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    for &(lba, blocks) in ranges {
        out.extend_from_slice(&lba.to_be_bytes());
        out.extend_from_slice(&blocks.to_be_bytes());
        out.extend_from_slice(&[0; 4]);
    }
    out
}

/// The name of a CDB's command, for messages.
#[must_use]
pub fn command_name(cdb: &Cdb) -> &'static str {
    match (cdb[0], cdb[1] & 0x1f) {
        (0x00, _) => "TEST UNIT READY",
        (0x12, _) => "INQUIRY",
        (0x1A, _) => "MODE SENSE(6)",
        (0xA0, _) => "REPORT LUNS",
        (0x9E, 0x10) => "READ CAPACITY(16)",
        (0x9E, 0x12) => "GET LBA STATUS",
        (0x88, _) => "READ(16)",
        (0x8A, _) => "WRITE(16)",
        (0x93, _) => "WRITE SAME(16)",
        (0x91, _) => "SYNCHRONIZE CACHE(16)",
        (0x35, _) => "SYNCHRONIZE CACHE(10)",
        (0x42, _) => "UNMAP",
        _ => "a SCSI command",
    }
}

/// Decoded sense data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sense {
    /// Sense key (0..15).
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
}

impl Sense {
    /// Decodes fixed (0x70/0x71) or descriptor (0x72/0x73) format; `None` when there is none.
    #[must_use]
    pub fn parse(data: &[u8]) -> Option<Sense> {
        let code = data.first()? & 0x7f;
        match code {
            0x70 | 0x71 if data.len() >= 3 => Some(Sense {
                key: data[2] & 0x0f,
                asc: data.get(12).copied().unwrap_or(0),
                ascq: data.get(13).copied().unwrap_or(0),
            }),
            0x72 | 0x73 if data.len() >= 2 => Some(Sense {
                key: data[1] & 0x0f,
                asc: data.get(2).copied().unwrap_or(0),
                ascq: data.get(3).copied().unwrap_or(0),
            }),
            _ => None,
        }
    }

    /// The sense key's name.
    #[must_use]
    pub fn key_name(&self) -> &'static str {
        [
            "NO SENSE",
            "RECOVERED ERROR",
            "NOT READY",
            "MEDIUM ERROR",
            "HARDWARE ERROR",
            "ILLEGAL REQUEST",
            "UNIT ATTENTION",
            "DATA PROTECT",
            "BLANK CHECK",
            "VENDOR SPECIFIC",
            "COPY ABORTED",
            "ABORTED COMMAND",
            "RESERVED",
            "VOLUME OVERFLOW",
            "MISCOMPARE",
            "COMPLETED",
        ][usize::from(self.key & 0x0f)]
    }

    /// Words for the common ASC/ASCQ pairs.
    #[must_use]
    pub fn asc_words(&self) -> &'static str {
        match (self.asc, self.ascq) {
            (0x04, _) => "logical unit not ready",
            (0x11, 0x00) => "unrecovered read error",
            (0x20, 0x00) => "invalid command operation code",
            (0x21, 0x00) => "logical block address out of range",
            (0x24, 0x00) => "invalid field in CDB",
            (0x25, 0x00) => "logical unit not supported",
            (0x26, _) => "invalid field in parameter list",
            (0x27, 0x07) => "space allocation failed write protect (thin pool full)",
            (0x27, _) => "write protected",
            (0x29, _) => "power on, reset, or bus device reset occurred",
            (0x2A, 0x09) => "capacity data has changed",
            (0x3F, 0x0E) => "reported LUNs data has changed",
            (0x0C, _) => "write error",
            _ => "",
        }
    }
}

impl fmt::Display for Sense {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:02X}), ASC/ASCQ {:02X}/{:02X}", self.key_name(), self.key, self.asc, self.ascq)?;
        match self.asc_words() {
            "" => Ok(()),
            words => write!(f, " {words}"),
        }
    }
}

/// The standard INQUIRY data that matters here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inquiry {
    /// Peripheral qualifier (bits 5-7 of byte 0): 0 = connected.
    pub qualifier: u8,
    /// Peripheral device type: 0 = direct access block device (a disk).
    pub device_type: u8,
    /// T10 vendor, trimmed.
    pub vendor: String,
    /// Product, trimmed.
    pub product: String,
}

impl Inquiry {
    /// Parses at least the first 36 bytes.
    #[must_use]
    pub fn parse(data: &[u8]) -> Option<Inquiry> {
        if data.len() < 36 {
            return None;
        }
        let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
        Some(Inquiry {
            qualifier: data[0] >> 5,
            device_type: data[0] & 0x1f,
            vendor: text(&data[8..16]),
            product: text(&data[16..32]),
        })
    }
}

/// READ CAPACITY(16) data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Blocks on the LUN (last LBA + 1).
    pub blocks: u64,
    /// Logical block length in bytes.
    pub block_size: u32,
    /// Logical block provisioning management enabled (a thin LUN).
    pub lbpme: bool,
    /// Deallocated blocks read as zeros.
    pub lbprz: bool,
}

impl Capacity {
    /// Parses the 32 bytes (at least 16); `None` for a block length that is no power of two in
    /// 512..=1 MiB or a size that overflows 64 bits.
    #[must_use]
    pub fn parse(data: &[u8]) -> Option<Capacity> {
        if data.len() < 16 {
            return None;
        }
        let last = u64::from_be_bytes(data[0..8].try_into().ok()?);
        let block_size = u32::from_be_bytes(data[8..12].try_into().ok()?);
        if !block_size.is_power_of_two() || !(512..=1 << 20).contains(&block_size) {
            return None;
        }
        let blocks = last.checked_add(1)?;
        blocks.checked_mul(u64::from(block_size))?;
        Some(Capacity { blocks, block_size, lbpme: data[14] & 0x80 != 0, lbprz: data[14] & 0x40 != 0 })
    }

    /// Bytes on the LUN.
    #[must_use]
    pub fn bytes(&self) -> u64 {
        self.blocks * u64::from(self.block_size)
    }
}

/// What the Block Limits VPD page (0xB0) allows; zero means "not reported".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlockLimits {
    /// MAXIMUM TRANSFER LENGTH, in blocks.
    pub max_transfer: u32,
    /// MAXIMUM UNMAP LBA COUNT.
    pub max_unmap: u32,
    /// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT.
    pub max_unmap_descriptors: u32,
    /// MAXIMUM WRITE SAME LENGTH, in blocks.
    pub max_write_same: u64,
}

impl BlockLimits {
    /// Parses page 0xB0 (as much of it as came).
    #[must_use]
    pub fn parse(data: &[u8]) -> Option<BlockLimits> {
        if data.len() < 4 || data[1] != 0xB0 {
            return None;
        }
        let u32_at = |o: usize| data.get(o..o + 4).map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        let u64_at = |o: usize| data.get(o..o + 8).map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])));
        Some(BlockLimits {
            max_transfer: u32_at(8),
            max_unmap: u32_at(20),
            max_unmap_descriptors: u32_at(24),
            max_write_same: u64_at(36),
        })
    }
}

/// The Logical Block Provisioning VPD page (0xB2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Provisioning {
    /// UNMAP is supported.
    pub lbpu: bool,
    /// WRITE SAME(16) with UNMAP is supported.
    pub lbpws: bool,
    /// Deallocated blocks read as zeros (here too, besides READ CAPACITY).
    pub lbprz: bool,
}

impl Provisioning {
    /// Parses page 0xB2.
    #[must_use]
    pub fn parse(data: &[u8]) -> Option<Provisioning> {
        if data.len() < 6 || data[1] != 0xB2 {
            return None;
        }
        Some(Provisioning { lbpu: data[5] & 0x80 != 0, lbpws: data[5] & 0x40 != 0, lbprz: data[5] & 0x04 != 0 })
    }
}

/// The pages listed by the Supported VPD Pages page (0x00).
#[must_use]
pub fn supported_pages(data: &[u8]) -> Vec<u8> {
    if data.len() < 4 || data[1] != 0 {
        return Vec::new();
    }
    let n = usize::from(u16::from_be_bytes([data[2], data[3]]));
    data[4..].iter().take(n).copied().collect()
}

/// The LUNs of REPORT LUNS data, single-level ones only (others are skipped), at most 4096.
#[must_use]
pub fn report_luns_parse(data: &[u8]) -> Vec<u16> {
    if data.len() < 8 {
        return Vec::new();
    }
    let listed = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize / 8;
    data[8..]
        .chunks_exact(8)
        .take(listed.min(4096))
        .filter_map(|e| match e[0] >> 6 {
            // Peripheral (0) and flat (1) addressing, single level.
            0 | 1 if e[2..].iter().all(|&b| b == 0) => Some(u16::from_be_bytes([e[0] & 0x3f, e[1]])),
            _ => None,
        })
        .collect()
}

/// The 8-byte LUN field of a PDU for single-level `lun`: peripheral addressing below 256,
/// flat addressing above (SAM-5 §4.7.3), as tgtd and LIO expect.
#[must_use]
pub fn lun_field(lun: u16) -> [u8; 8] {
    let mut out = [0; 8];
    if lun < 256 {
        out[1] = lun as u8;
    } else {
        out[0] = 0x40 | ((lun >> 8) as u8 & 0x3f);
        out[1] = lun as u8;
    }
    out
}

/// One GET LBA STATUS descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LbaStatus {
    /// First LBA.
    pub lba: u64,
    /// Blocks.
    pub blocks: u32,
    /// Provisioning status: 0 mapped, 1 deallocated, 2 anchored.
    pub status: u8,
}

/// Parses GET LBA STATUS data: the descriptors, checked to start at or before `asked`, to follow
/// one another and to be non-empty.
pub fn lba_status_parse(data: &[u8], asked: u64) -> Result<Vec<LbaStatus>, String> {
    if data.len() < 8 {
        return Err(format!("GET LBA STATUS data of {} bytes", data.len()));
    }
    let len = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
    let listed = len.saturating_sub(4) / 16;
    let mut out: Vec<LbaStatus> = Vec::new();
    for d in data[8..].chunks_exact(16).take(listed) {
        let s = LbaStatus {
            lba: u64::from_be_bytes(d[0..8].try_into().map_err(|_| "short descriptor")?),
            blocks: u32::from_be_bytes([d[8], d[9], d[10], d[11]]),
            status: d[12] & 0x0f,
        };
        if s.blocks == 0 {
            return Err("a GET LBA STATUS descriptor of 0 blocks".into());
        }
        let expected = out.last().map(|l: &LbaStatus| l.lba + u64::from(l.blocks));
        match expected {
            None if s.lba > asked => return Err(format!("GET LBA STATUS from LBA {asked} began at LBA {}", s.lba)),
            Some(e) if e != s.lba => return Err(format!("GET LBA STATUS descriptors jump from LBA {e} to {}", s.lba)),
            _ => {}
        }
        s.lba.checked_add(u64::from(s.blocks)).ok_or("a GET LBA STATUS descriptor past LBA 2^64")?;
        out.push(s);
    }
    Ok(out)
}

/// Runs every parser on `data`, for the fuzz target and the random-input test.
pub fn exercise_parsers(data: &[u8]) {
    let _ = Sense::parse(data).map(|s| s.to_string());
    let _ = Inquiry::parse(data);
    let _ = Capacity::parse(data).map(|c| c.bytes());
    let _ = BlockLimits::parse(data);
    let _ = Provisioning::parse(data);
    let _ = supported_pages(data);
    let _ = report_luns_parse(data);
    let _ = write_protected(data);
    let _ = lba_status_parse(data, data.first().map_or(0, |&b| u64::from(b)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdbs_carry_lba_and_length_big_endian() {
        let c = read16(0x0102_0304_0506_0708, 0x0a0b_0c0d);
        assert_eq!(c, [0x88, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0x0a, 0x0b, 0x0c, 0x0d, 0, 0]);
        assert_eq!(write_same16_unmap(1, 2)[1], 0x08);
        assert_eq!(&inquiry(Some(0xB0), 64)[..6], &[0x12, 1, 0xB0, 0, 64, 0]);
        assert_eq!(command_name(&get_lba_status(0, 32)), "GET LBA STATUS");
    }

    #[test]
    fn unmap_parameter_list_lengths() {
        let p = unmap_parameters(&[(8, 16), (100, 1)]);
        assert_eq!(p.len(), 8 + 32);
        assert_eq!(&p[..4], &[0, 38, 0, 32]);
        assert_eq!(&p[8..20], &[0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 16]);
    }

    #[test]
    fn sense_in_fixed_and_descriptor_format() {
        let mut fixed = [0u8; 18];
        fixed[0] = 0x70;
        fixed[2] = 0x06;
        fixed[12] = 0x29;
        let s = Sense::parse(&fixed).unwrap();
        assert_eq!((s.key, s.asc, s.ascq), (6, 0x29, 0));
        assert!(s.to_string().contains("UNIT ATTENTION (06), ASC/ASCQ 29/00 power on"), "{s}");
        assert_eq!(Sense::parse(&[0x72, 0x05, 0x21, 0x00]).unwrap().asc, 0x21);
        assert_eq!(Sense::parse(&[0x70]), None);
        assert_eq!(Sense::parse(&[]), None);
    }

    #[test]
    fn capacity_with_lbpme_and_lbprz() {
        let mut d = [0u8; 32];
        d[7] = 0xff; // last LBA 255
        d[10] = 0x10; // 4096
        d[14] = 0xC0;
        let c = Capacity::parse(&d).unwrap();
        assert_eq!((c.blocks, c.block_size, c.lbpme, c.lbprz, c.bytes()), (256, 4096, true, true, 1 << 20));
        d[10] = 0x11;
        assert_eq!(Capacity::parse(&d), None, "not a power of two");
        let mut big = [0xffu8; 32];
        big[8..12].copy_from_slice(&512u32.to_be_bytes());
        assert_eq!(Capacity::parse(&big), None, "overflows");
    }

    #[test]
    fn report_luns_and_lun_fields() {
        let mut d = vec![0, 0, 0, 24, 0, 0, 0, 0];
        d.extend_from_slice(&lun_field(0));
        d.extend_from_slice(&lun_field(1));
        d.extend_from_slice(&lun_field(300));
        assert_eq!(report_luns_parse(&d), vec![0, 1, 300]);
        assert_eq!(lun_field(300)[..2], [0x41, 0x2c]);
    }

    #[test]
    fn lba_status_must_be_contiguous_from_the_asked_lba() {
        let desc = |lba: u64, n: u32, st: u8| {
            let mut d = lba.to_be_bytes().to_vec();
            d.extend_from_slice(&n.to_be_bytes());
            d.extend_from_slice(&[st, 0, 0, 0]);
            d
        };
        let data = |ds: &[Vec<u8>]| {
            let mut out = ((ds.len() * 16 + 4) as u32).to_be_bytes().to_vec();
            out.extend_from_slice(&[0; 4]);
            for d in ds {
                out.extend_from_slice(d);
            }
            out
        };
        let ok = lba_status_parse(&data(&[desc(0, 8, 0), desc(8, 8, 1)]), 4).unwrap();
        assert_eq!(ok[1], LbaStatus { lba: 8, blocks: 8, status: 1 });
        assert!(lba_status_parse(&data(&[desc(5, 8, 0)]), 4).is_err());
        assert!(lba_status_parse(&data(&[desc(0, 8, 0), desc(9, 8, 1)]), 0).is_err());
        assert!(lba_status_parse(&data(&[desc(0, 0, 0)]), 0).is_err());
        assert!(lba_status_parse(&data(&[desc(u64::MAX, 2, 0)]), u64::MAX).is_err());
        assert_eq!(lba_status_parse(&data(&[]), 0).unwrap(), vec![]);
    }
}
