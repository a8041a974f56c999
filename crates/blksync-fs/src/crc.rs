//! The checksums of ext4 metadata and of its journal, as the kernel and e2fsprogs compute them:
//! crc16 (the reflected ANSI CRC-16, for `gdt_csum`), crc32c (Castagnoli, for `metadata_csum`
//! and the journal's checksums v2 and v3) and `crc32_be` (the IEEE CRC-32 most significant bit
//! first, for the journal's checksum v1). All raw: the caller passes the initial value and no
//! final inversion is applied.

const fn table(poly: u32) -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ poly } else { crc >> 1 };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

/// The table of a CRC that shifts left (most significant bit first), for polynomial `poly`.
const fn table_be(poly: u32) -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u32) << 24;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000_0000 != 0 { (crc << 1) ^ poly } else { crc << 1 };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

static CRC16: [u32; 256] = table(0xA001);
static CRC32C: [u32; 256] = table(0x82F6_3B78);
static CRC32_BE: [u32; 256] = table_be(0x04C1_1DB7);

/// crc16 of `data` continuing from `crc`, as e2fsprogs' `ext2fs_crc16`.
pub(crate) fn crc16(crc: u16, data: &[u8]) -> u16 {
    let mut crc = u32::from(crc);
    for &b in data {
        crc = (crc >> 8) ^ CRC16[((crc ^ u32::from(b)) & 0xFF) as usize];
    }
    crc as u16
}

/// crc32c of `data` continuing from `crc`, as e2fsprogs' `ext2fs_crc32c_le`.
pub(crate) fn crc32c(crc: u32, data: &[u8]) -> u32 {
    let mut crc = crc;
    for &b in data {
        crc = (crc >> 8) ^ CRC32C[((crc ^ u32::from(b)) & 0xFF) as usize];
    }
    crc
}

/// `crc32_be` of `data` continuing from `crc`, as the kernel's `crc32_be` (jbd2's checksum v1).
pub(crate) fn crc32_be(crc: u32, data: &[u8]) -> u32 {
    let mut crc = crc;
    for &b in data {
        crc = (crc << 8) ^ CRC32_BE[((crc >> 24) ^ u32::from(b)) as usize];
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The catalogued check value is for the inverted form: ~crc32c(~0, "123456789").
        assert_eq!(!crc32c(!0, b"123456789"), 0xE306_9283);
    }

    #[test]
    fn crc32_be_matches_the_standard_check_value() {
        // CRC-32/BZIP2 (initial ~0, most significant bit first, final inversion): 0xFC891918;
        // CRC-32/MPEG-2 (the same without the inversion): 0x0376E6E7.
        assert_eq!(!crc32_be(!0, b"123456789"), 0xFC89_1918);
        assert_eq!(crc32_be(!0, b"123456789"), 0x0376_E6E7);
    }

    #[test]
    fn crc16_matches_the_standard_check_value() {
        // CRC-16/ARC (initial 0): 0xBB3D; CRC-16/MODBUS (initial 0xFFFF): 0x4B37.
        assert_eq!(crc16(0, b"123456789"), 0xBB3D);
        assert_eq!(crc16(0xFFFF, b"123456789"), 0x4B37);
    }
}
