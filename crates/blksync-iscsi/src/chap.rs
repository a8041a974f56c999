//! CHAP with MD5 (RFC 1994, RFC 7143 §12.1.3): the response to a challenge, and MD5 itself
//! (RFC 1321), which is all CHAP needs of it. MD5 is broken for collisions, not for this use
//! (a keyed response to a fresh challenge), and it is the only algorithm RFC 7143 requires.

/// Per-round shift amounts (RFC 1321 §3.4).
const S: [u32; 64] = [
    7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 5, 9, 14, 20, 5, 9, 14, 20, 5, 9, 14, 20, 5, 9, 14, 20,
    4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15,
    21,
];

/// `floor(abs(sin(i + 1)) * 2^32)`.
const K: [u32; 64] = [
    0xd76a_a478,
    0xe8c7_b756,
    0x2420_70db,
    0xc1bd_ceee,
    0xf57c_0faf,
    0x4787_c62a,
    0xa830_4613,
    0xfd46_9501,
    0x6980_98d8,
    0x8b44_f7af,
    0xffff_5bb1,
    0x895c_d7be,
    0x6b90_1122,
    0xfd98_7193,
    0xa679_438e,
    0x49b4_0821,
    0xf61e_2562,
    0xc040_b340,
    0x265e_5a51,
    0xe9b6_c7aa,
    0xd62f_105d,
    0x0244_1453,
    0xd8a1_e681,
    0xe7d3_fbc8,
    0x21e1_cde6,
    0xc337_07d6,
    0xf4d5_0d87,
    0x455a_14ed,
    0xa9e3_e905,
    0xfcef_a3f8,
    0x676f_02d9,
    0x8d2a_4c8a,
    0xfffa_3942,
    0x8771_f681,
    0x6d9d_6122,
    0xfde5_380c,
    0xa4be_ea44,
    0x4bde_cfa9,
    0xf6bb_4b60,
    0xbebf_bc70,
    0x289b_7ec6,
    0xeaa1_27fa,
    0xd4ef_3085,
    0x0488_1d05,
    0xd9d4_d039,
    0xe6db_99e5,
    0x1fa2_7cf8,
    0xc4ac_5665,
    0xf429_2244,
    0x432a_ff97,
    0xab94_23a7,
    0xfc93_a039,
    0x655b_59c3,
    0x8f0c_cc92,
    0xffef_f47d,
    0x8584_5dd1,
    0x6fa8_7e4f,
    0xfe2c_e6e0,
    0xa301_4314,
    0x4e08_11a1,
    0xf753_7e82,
    0xbd3a_f235,
    0x2ad7_d2bb,
    0xeb86_d391,
];

/// The MD5 digest of `data`.
#[must_use]
#[allow(clippy::many_single_char_names)] // a, b, c, d, f, g, m: the names of RFC 1321.
pub fn md5(data: &[u8]) -> [u8; 16] {
    let mut state: [u32; 4] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476];
    let mut message = data.to_vec();
    let bits = (data.len() as u64).wrapping_mul(8);
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend_from_slice(&bits.to_le_bytes());
    for block in message.chunks_exact(64) {
        let m: Vec<u32> = block.chunks_exact(4).map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])).collect();
        let [mut a, mut b, mut c, mut d] = state;
        for i in 0..64 {
            let (f, g) = match i / 16 {
                0 => ((b & c) | (!b & d), i),
                1 => ((d & b) | (!d & c), (5 * i + 1) % 16),
                2 => (b ^ c ^ d, (3 * i + 5) % 16),
                _ => (c ^ (b | !d), (7 * i) % 16),
            };
            let rotated = a.wrapping_add(f).wrapping_add(K[i]).wrapping_add(m[g]).rotate_left(S[i]);
            a = d;
            d = c;
            c = b;
            b = b.wrapping_add(rotated);
        }
        for (s, v) in state.iter_mut().zip([a, b, c, d]) {
            *s = s.wrapping_add(v);
        }
    }
    let mut out = [0; 16];
    for (i, s) in state.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&s.to_le_bytes());
    }
    out
}

/// The CHAP response: `MD5(identifier ‖ secret ‖ challenge)` (RFC 1994 §4.1).
#[must_use]
pub fn response(identifier: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut input = Vec::with_capacity(1 + secret.len() + challenge.len());
    input.push(identifier);
    input.extend_from_slice(secret);
    input.extend_from_slice(challenge);
    md5(&input)
}

/// `0x` and lower-case hex, as CHAP values are written.
#[must_use]
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::from("0x"), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A binary value of a text key (RFC 7143 §6.1): `0x`/`0X` and hex digits, or `0b`/`0B` and
/// base64. `None` when it is neither, or longer than `max` bytes.
#[must_use]
pub fn decode_binary(value: &str, max: usize) -> Option<Vec<u8>> {
    let (prefix, rest) = value.split_at_checked(2)?;
    match prefix {
        "0x" | "0X" => {
            if rest.is_empty() || rest.len() > 2 * max + 1 {
                return None;
            }
            // An odd number of digits has an implied leading zero.
            let padded = if rest.len() % 2 == 1 { format!("0{rest}") } else { rest.to_string() };
            (0..padded.len()).step_by(2).map(|i| u8::from_str_radix(padded.get(i..i + 2)?, 16).ok()).collect()
        }
        "0b" | "0B" => {
            let out = base64(rest)?;
            (!out.is_empty() && out.len() <= max).then_some(out)
        }
        _ => None,
    }
}

fn base64(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().take_while(|&c| c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(d: [u8; 16]) -> String {
        hex(&d)
    }

    #[test]
    fn md5_test_suite_of_rfc_1321() {
        assert_eq!(h(md5(b"")), "0xd41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(h(md5(b"a")), "0x0cc175b9c0f1b6a831c399e269772661");
        assert_eq!(h(md5(b"abc")), "0x900150983cd24fb0d6963f7d28e17f72");
        assert_eq!(h(md5(b"message digest")), "0xf96b697d7cb7938d525a2f31aaf161d0");
        assert_eq!(
            h(md5(b"12345678901234567890123456789012345678901234567890123456789012345678901234567890")),
            "0x57edf4a22be3c955ac49da2e2107b67a"
        );
    }

    #[test]
    fn chap_response_is_md5_of_identifier_secret_challenge() {
        let mut input = vec![7u8];
        input.extend_from_slice(b"secret");
        input.extend_from_slice(&[1, 2, 3]);
        assert_eq!(response(7, b"secret", &[1, 2, 3]), md5(&input));
    }

    #[test]
    fn binary_values_in_hex_and_base64() {
        assert_eq!(decode_binary("0x0102ff", 16), Some(vec![1, 2, 255]));
        assert_eq!(decode_binary("0X102", 16), Some(vec![1, 2]));
        assert_eq!(decode_binary("0bAQL/", 16), Some(vec![1, 2, 255]));
        assert_eq!(decode_binary("0x", 16), None);
        assert_eq!(decode_binary("0xzz", 16), None);
        assert_eq!(decode_binary("12", 16), None);
        assert_eq!(decode_binary("0x010203", 2), None);
        assert_eq!(decode_binary("é", 2), None);
    }
}
