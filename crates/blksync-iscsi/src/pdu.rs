//! iSCSI PDUs (RFC 7143 §11, docs/ISCSI.md "PDUs"): the 48-byte Basic Header Segment, skipped
//! AHS, digests, and the padded data segment; encoding for what the initiator sends, bounded
//! decoding for what a target sends.
//!
//! A [`Pdu`] is its BHS as bytes plus its data: the fields of each opcode are read and written
//! at the offsets of RFC 7143 by small accessors, so that the code reads like the tables of the
//! RFC and one type serves every opcode (the session needs only a few fields of each).

use std::io::{self, Read};

use crate::digest::Crc32c;

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;
/// The largest AHS a BHS can announce: 255 four-byte words.
pub const MAX_AHS: usize = 255 * 4;
/// The "no task" tag (ITT, TTT).
pub const RESERVED_TAG: u32 = 0xFFFF_FFFF;

/// Opcodes (byte 0, bits 0-5).
pub mod opcode {
    /// NOP-Out (initiator).
    pub const NOP_OUT: u8 = 0x00;
    /// SCSI Command.
    pub const SCSI_COMMAND: u8 = 0x01;
    /// Task Management Function Request.
    pub const TASK_REQUEST: u8 = 0x02;
    /// Login Request.
    pub const LOGIN_REQUEST: u8 = 0x03;
    /// Text Request.
    pub const TEXT_REQUEST: u8 = 0x04;
    /// SCSI Data-Out.
    pub const DATA_OUT: u8 = 0x05;
    /// Logout Request.
    pub const LOGOUT_REQUEST: u8 = 0x06;
    /// NOP-In (target).
    pub const NOP_IN: u8 = 0x20;
    /// SCSI Response.
    pub const SCSI_RESPONSE: u8 = 0x21;
    /// Task Management Function Response.
    pub const TASK_RESPONSE: u8 = 0x22;
    /// Login Response.
    pub const LOGIN_RESPONSE: u8 = 0x23;
    /// Text Response.
    pub const TEXT_RESPONSE: u8 = 0x24;
    /// SCSI Data-In.
    pub const DATA_IN: u8 = 0x25;
    /// Logout Response.
    pub const LOGOUT_RESPONSE: u8 = 0x26;
    /// Ready To Transfer.
    pub const R2T: u8 = 0x31;
    /// Asynchronous Message.
    pub const ASYNC: u8 = 0x32;
    /// Reject.
    pub const REJECT: u8 = 0x3f;
}

/// Byte 1 flags.
pub mod flag {
    /// Final (every opcode that has it).
    pub const FINAL: u8 = 0x80;
    /// SCSI Command: data from the target (read).
    pub const READ: u8 = 0x40;
    /// SCSI Command: data to the target (write).
    pub const WRITE: u8 = 0x20;
    /// Task attribute SIMPLE.
    pub const ATTR_SIMPLE: u8 = 0x01;
    /// Login: transit to the next stage.
    pub const TRANSIT: u8 = 0x80;
    /// Login and Text: the text continues in the next PDU.
    pub const CONTINUE: u8 = 0x40;
    /// Data-In: acknowledge (needs `ErrorRecoveryLevel` ≥ 1).
    pub const ACK: u8 = 0x40;
    /// Data-In and SCSI Response: residual overflow.
    pub const OVERFLOW: u8 = 0x04;
    /// Data-In and SCSI Response: residual underflow.
    pub const UNDERFLOW: u8 = 0x02;
    /// Data-In: the status is in this PDU.
    pub const STATUS: u8 = 0x01;
}

/// Which digests a connection uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digests {
    /// CRC32C after the header.
    pub header: bool,
    /// CRC32C after a non-empty data segment.
    pub data: bool,
}

/// Why reading a PDU failed.
#[derive(Debug)]
pub enum WireError {
    /// End of file: between PDUs (`false`) or in the middle of one (`true`).
    Closed(bool),
    /// The socket failed.
    Io(io::Error),
    /// What came breaks the protocol.
    Protocol(String),
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Closed(false) => write!(f, "the target closed the connection"),
            WireError::Closed(true) => write!(f, "the target closed the connection in the middle of a PDU"),
            WireError::Io(e) => write!(f, "the connection broke: {e}"),
            WireError::Protocol(why) => write!(f, "{why}"),
        }
    }
}

fn io_error(e: io::Error, started: bool) -> WireError {
    if e.kind() == io::ErrorKind::UnexpectedEof { WireError::Closed(started) } else { WireError::Io(e) }
}

/// A PDU: its BHS and data segment (AHS are skipped when read and never sent).
#[derive(Clone, PartialEq, Eq)]
pub struct Pdu {
    /// The Basic Header Segment; the length fields (bytes 4-7) are set by [`Pdu::encode`].
    pub bhs: [u8; BHS_LEN],
    /// The data segment, unpadded.
    pub data: Vec<u8>,
}

impl std::fmt::Debug for Pdu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pdu(opcode {:#04x}, itt {:#x}, {} data bytes)", self.opcode(), self.itt(), self.data.len())
    }
}

impl Pdu {
    /// A PDU of `opcode`, every other field zero.
    #[must_use]
    pub fn new(opcode: u8) -> Pdu {
        let mut bhs = [0; BHS_LEN];
        bhs[0] = opcode & 0x3f;
        Pdu { bhs, data: Vec::new() }
    }

    /// The opcode (byte 0, bits 0-5).
    #[must_use]
    pub fn opcode(&self) -> u8 {
        self.bhs[0] & 0x3f
    }

    /// Marks the PDU immediate (byte 0, bit 6).
    pub fn set_immediate(&mut self) {
        self.bhs[0] |= 0x40;
    }

    /// Byte 1: F and the opcode's flags.
    #[must_use]
    pub fn flags(&self) -> u8 {
        self.bhs[1]
    }

    /// The 32-bit field at `offset`.
    #[must_use]
    pub fn u32_at(&self, offset: usize) -> u32 {
        u32::from_be_bytes([self.bhs[offset], self.bhs[offset + 1], self.bhs[offset + 2], self.bhs[offset + 3]])
    }

    /// Sets the 32-bit field at `offset`.
    pub fn set_u32(&mut self, offset: usize, value: u32) {
        self.bhs[offset..offset + 4].copy_from_slice(&value.to_be_bytes());
    }

    /// Initiator Task Tag (bytes 16-19).
    #[must_use]
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }

    /// Target Transfer Tag (bytes 20-23, in the PDUs that have one).
    #[must_use]
    pub fn ttt(&self) -> u32 {
        self.u32_at(20)
    }

    /// `StatSN` (bytes 24-27 of target PDUs).
    #[must_use]
    pub fn stat_sn(&self) -> u32 {
        self.u32_at(24)
    }

    /// `ExpCmdSN` and `MaxCmdSN` (bytes 28-35 of target PDUs).
    #[must_use]
    pub fn cmd_window(&self) -> (u32, u32) {
        (self.u32_at(28), self.u32_at(32))
    }

    /// `DataSegmentLength` as announced (bytes 5-7).
    #[must_use]
    pub fn announced_data_len(&self) -> usize {
        data_len(&self.bhs)
    }

    /// The whole PDU on the wire, lengths filled in, padded, with the digests asked for.
    #[must_use]
    pub fn encode(&self, digests: Digests) -> Vec<u8> {
        let mut out = header(&self.bhs, self.data.len(), digests);
        out.extend_from_slice(&self.data);
        out.extend_from_slice(&trailer(&[&self.data], digests));
        out
    }
}

/// `DataSegmentLength` of a BHS.
#[must_use]
pub fn data_len(bhs: &[u8; BHS_LEN]) -> usize {
    usize::from(bhs[5]) << 16 | usize::from(bhs[6]) << 8 | usize::from(bhs[7])
}

/// The header on the wire: `bhs` with no AHS and a data length of `data_len`, and its digest.
///
/// # Panics
/// When `data_len` does not fit the 24-bit field (a bug: callers cut data to MRDSL first).
#[must_use]
pub fn header(bhs: &[u8; BHS_LEN], data_len: usize, digests: Digests) -> Vec<u8> {
    assert!(data_len < 1 << 24, "a data segment of {data_len} bytes");
    let mut out = Vec::with_capacity(BHS_LEN + 4);
    out.extend_from_slice(bhs);
    out[4] = 0;
    out[5..8].copy_from_slice(&(data_len as u32).to_be_bytes()[1..]);
    if digests.header {
        let mut c = Crc32c::default();
        c.update(&out);
        out.extend_from_slice(&c.finish().to_le_bytes());
    }
    out
}

/// What follows a data segment made of `parts`: its padding and, when asked, its digest.
#[must_use]
pub fn trailer(parts: &[&[u8]], digests: Digests) -> Vec<u8> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let pad = (4 - len % 4) % 4;
    let mut out = vec![0; pad];
    if digests.data && len > 0 {
        let mut c = Crc32c::default();
        for p in parts {
            c.update(p);
        }
        c.update(&out);
        out.extend_from_slice(&c.finish().to_le_bytes());
    }
    out
}

/// Reads a header: BHS, AHS (skipped) and header digest. The data segment is left for
/// [`read_data`] or [`read_data_into`]; its length is [`Pdu::announced_data_len`].
pub fn read_header(input: &mut impl Read, digests: Digests) -> Result<Pdu, WireError> {
    let mut bhs = [0; BHS_LEN];
    // The first byte alone: end of file before it is a clean close, after it is not.
    input.read_exact(&mut bhs[..1]).map_err(|e| io_error(e, false))?;
    input.read_exact(&mut bhs[1..]).map_err(|e| io_error(e, true))?;
    let ahs_len = usize::from(bhs[4]) * 4;
    let mut ahs = [0; MAX_AHS];
    input.read_exact(&mut ahs[..ahs_len]).map_err(|e| io_error(e, true))?;
    if digests.header {
        let mut d = [0; 4];
        input.read_exact(&mut d).map_err(|e| io_error(e, true))?;
        let mut c = Crc32c::default();
        c.update(&bhs);
        c.update(&ahs[..ahs_len]);
        if c.finish() != u32::from_le_bytes(d) {
            return Err(WireError::Protocol("a header digest mismatch".into()));
        }
    }
    Ok(Pdu { bhs, data: Vec::new() })
}

/// Reads a data segment of `len` bytes (checked against `max` before anything is allocated),
/// its padding and digest.
pub fn read_data(input: &mut impl Read, len: usize, max: usize, digests: Digests) -> Result<Vec<u8>, WireError> {
    if len > max {
        return Err(WireError::Protocol(format!("a data segment of {len} bytes, more than the {max} allowed")));
    }
    let mut data = vec![0; len];
    read_data_into(input, &mut data, digests)?;
    Ok(data)
}

/// Reads a data segment into `buf` (exactly its length), then its padding and digest.
pub fn read_data_into(input: &mut impl Read, buf: &mut [u8], digests: Digests) -> Result<(), WireError> {
    if buf.is_empty() {
        return Ok(());
    }
    input.read_exact(buf).map_err(|e| io_error(e, true))?;
    let pad = (4 - buf.len() % 4) % 4;
    let mut tail = [0; 8];
    let n = pad + if digests.data { 4 } else { 0 };
    input.read_exact(&mut tail[..n]).map_err(|e| io_error(e, true))?;
    if digests.data {
        let mut c = Crc32c::default();
        c.update(buf);
        c.update(&tail[..pad]);
        if c.finish() != u32::from_le_bytes([tail[pad], tail[pad + 1], tail[pad + 2], tail[pad + 3]]) {
            return Err(WireError::Protocol("a data digest mismatch".into()));
        }
    }
    Ok(())
}

/// Reads a whole PDU whose data segment is at most `max` bytes.
pub fn read_pdu(input: &mut impl Read, digests: Digests, max: usize) -> Result<Pdu, WireError> {
    let mut pdu = read_header(input, digests)?;
    pdu.data = read_data(input, pdu.announced_data_len(), max, digests)?;
    Ok(pdu)
}

/// Serial number arithmetic (RFC 1982, 32 bits): `a` comes after `b`.
#[must_use]
pub fn sn_after(a: u32, b: u32) -> bool {
    a != b && a.wrapping_sub(b) < 1 << 31
}

/// Feeds `data` to every decoder: the PDU reader (with and without digests), the text parser
/// and the SCSI parsers. Any input must give a value or an error, never a panic; what decodes
/// must encode back to itself. For the fuzz target and the random-input tests.
///
/// # Panics
/// When a decoded PDU or text does not encode back to what was decoded (a bug).
pub fn exercise_decoders(data: &[u8]) {
    for digests in [Digests::default(), Digests { header: true, data: true }] {
        let mut input = data;
        while let Ok(pdu) = read_pdu(&mut input, digests, 1 << 16) {
            if pdu.bhs[4] == 0 {
                let mut again = pdu.encode(digests);
                let back = read_pdu(&mut again.as_slice(), digests, 1 << 16).expect("an encoded PDU reads back");
                assert_eq!(back.data, pdu.data);
                again.truncate(BHS_LEN);
                assert_eq!(again[..], pdu.bhs[..]);
            }
            if let Ok(keys) = crate::text::parse(&pdu.data) {
                let encoded = crate::text::encode(keys.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                assert_eq!(crate::text::parse(&encoded).as_ref(), Ok(&keys));
            }
        }
    }
    crate::scsi::exercise_parsers(data);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_pdu_is_padded_and_digested_as_the_rfc_says() {
        let mut p = Pdu::new(opcode::NOP_OUT);
        p.set_immediate();
        p.data = vec![1, 2, 3, 4, 5];
        let plain = p.encode(Digests::default());
        assert_eq!(plain.len(), 48 + 8);
        assert_eq!(&plain[5..8], &[0, 0, 5]);
        assert_eq!(plain[0], 0x40);
        let both = p.encode(Digests { header: true, data: true });
        assert_eq!(both.len(), 48 + 4 + 8 + 4);
        assert_eq!(&both[48..52], &crate::digest::crc32c(&both[..48]).to_le_bytes());
        assert_eq!(&both[60..64], &crate::digest::crc32c(&[1, 2, 3, 4, 5, 0, 0, 0]).to_le_bytes());
        let back = read_pdu(&mut both.as_slice(), Digests { header: true, data: true }, 100).unwrap();
        assert_eq!(back.data, p.data);
    }

    #[test]
    fn ahs_is_skipped_and_a_bad_digest_or_a_huge_length_refused() {
        let mut wire = Pdu::new(opcode::NOP_IN).encode(Digests::default());
        wire[4] = 2;
        wire.splice(48..48, [9; 8]);
        let p = read_pdu(&mut wire.as_slice(), Digests::default(), 10).unwrap();
        assert_eq!(p.opcode(), opcode::NOP_IN);

        let mut wire = Pdu::new(opcode::NOP_IN).encode(Digests { header: true, data: false });
        wire[50] ^= 1;
        assert!(matches!(
            read_pdu(&mut wire.as_slice(), Digests { header: true, data: false }, 10),
            Err(WireError::Protocol(_))
        ));

        let mut huge = [0u8; 48];
        huge[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
        assert!(matches!(read_pdu(&mut &huge[..], Digests::default(), 1 << 18), Err(WireError::Protocol(_))));
        assert!(matches!(read_pdu(&mut &huge[..1], Digests::default(), 10), Err(WireError::Closed(true))));
        assert!(matches!(read_pdu(&mut &huge[..0], Digests::default(), 10), Err(WireError::Closed(false))));
    }

    #[test]
    fn serial_numbers_wrap() {
        assert!(sn_after(1, 0) && sn_after(0, u32::MAX) && !sn_after(0, 1) && !sn_after(5, 5));
        assert!(!sn_after(1 << 31, 0));
    }

    proptest! {
        #[test]
        fn every_pdu_round_trips(bhs in proptest::collection::vec(any::<u8>(), 48), data in proptest::collection::vec(any::<u8>(), 0..600), hd: bool, dd: bool) {
            let mut p = Pdu::new(0);
            p.bhs.copy_from_slice(&bhs);
            p.bhs[4] = 0;
            p.bhs[5..8].copy_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
            p.data = data;
            let digests = Digests { header: hd, data: dd };
            let wire = p.encode(digests);
            prop_assert_eq!(wire.len() % 4, 0);
            let back = read_pdu(&mut wire.as_slice(), digests, 1000).unwrap();
            prop_assert_eq!(back, p);
        }

        #[test]
        fn random_bytes_never_panic_the_decoders(data in proptest::collection::vec(any::<u8>(), 0..400)) {
            exercise_decoders(&data);
        }

        #[test]
        fn framed_random_pdus_never_panic_the_decoders(
            bhs in proptest::collection::vec(any::<u8>(), 48),
            body in proptest::collection::vec(any::<u8>(), 0..300),
            len in 0usize..400,
        ) {
            let mut wire = bhs;
            wire[4] %= 4;
            wire[5..8].copy_from_slice(&(len as u32).to_be_bytes()[1..]);
            wire.extend(body);
            exercise_decoders(&wire);
        }
    }
}
