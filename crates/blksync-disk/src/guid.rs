//! GUIDs as GPT stores them (mixed-endian) and as tools print them.

use std::fmt;

/// A GUID in its on-disk byte order: the first three fields little-endian, the last eight
/// bytes in order (UEFI §Appendix A).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// The all-zero GUID, which marks an unused GPT entry.
    pub const ZERO: Guid = Guid([0; 16]);

    /// Parses the textual form `XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX`, either case.
    #[must_use]
    pub fn parse(text: &str) -> Option<Guid> {
        let groups: Vec<&str> = text.split('-').collect();
        let [time_low, time_mid, time_hi, clock, node] = groups[..] else { return None };
        if groups.iter().map(|g| g.len()).ne([8, 4, 4, 4, 12])
            || !text.bytes().all(|x| x == b'-' || x.is_ascii_hexdigit())
        {
            return None;
        }
        let mut out = [0u8; 16];
        out[0..4].copy_from_slice(&u32::from_str_radix(time_low, 16).ok()?.to_le_bytes());
        out[4..6].copy_from_slice(&u16::from_str_radix(time_mid, 16).ok()?.to_le_bytes());
        out[6..8].copy_from_slice(&u16::from_str_radix(time_hi, 16).ok()?.to_le_bytes());
        let tail = format!("{clock}{node}");
        for (i, byte) in out[8..].iter_mut().enumerate() {
            *byte = u8::from_str_radix(&tail[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Guid(out))
    }

    /// Whether this is the all-zero GUID.
    #[must_use]
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }
}

impl fmt::Display for Guid {
    /// Uppercase, as `sfdisk -J` and `blkid` print PARTUUIDs and type GUIDs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-",
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            u16::from_le_bytes([b[4], b[5]]),
            u16::from_le_bytes([b[6], b[7]]),
            b[8],
            b[9]
        )?;
        b[10..].iter().try_for_each(|x| write!(f, "{x:02X}"))
    }
}

#[cfg(test)]
mod tests {
    use super::Guid;

    #[test]
    fn guid_text_is_mixed_endian_and_round_trips() {
        let esp = Guid::parse("c12a7328-f81f-11d2-ba4b-00a0c93ec93b").unwrap();
        assert_eq!(esp.0[..4], [0x28, 0x73, 0x2A, 0xC1]);
        assert_eq!(esp.0[8..10], [0xBA, 0x4B]);
        assert_eq!(esp.to_string(), "C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
        assert_eq!(Guid::parse(&esp.to_string()), Some(esp));
    }

    #[test]
    fn guid_parse_refuses_malformed_text() {
        for bad in [
            "",
            "C12A7328F81F11D2BA4B00A0C93EC93B",
            "C12A7328-F81F-11D2-BA4B-00A0C93EC93",
            "G12A7328-F81F-11D2-BA4B-00A0C93EC93B",
            "+12A7328-F81F-11D2-BA4B-00A0C93EC93B",
        ] {
            assert_eq!(Guid::parse(bad), None, "{bad}");
        }
    }
}
