//! Login and text keys (RFC 7143 §6.1, docs/ISCSI.md "Limits against a hostile target"):
//! `key=value` pairs, each ended by a NUL byte, bounded in number and length.

/// The longest key name (RFC 7143 §6.1: 63 bytes).
pub const MAX_KEY: usize = 63;
/// The longest value accepted (RFC 7143 §6.1 allows 8192 for a few keys, 255 for most).
pub const MAX_VALUE: usize = 8192;
/// At most this many pairs in one answer.
pub const MAX_PAIRS: usize = 1024;

/// Keys and values, in order.
pub type Pairs = Vec<(String, String)>;

/// Parses a complete text (after any continuation PDUs were joined).
pub fn parse(data: &[u8]) -> Result<Pairs, String> {
    let mut out = Vec::new();
    if data.is_empty() {
        return Ok(out);
    }
    // Some targets pad with extra NULs; the RFC's terminator is one per pair.
    let body = match data.iter().rposition(|&b| b != 0) {
        Some(last) => &data[..=last],
        None => return Ok(out),
    };
    if body.len() == data.len() {
        return Err("a text key without its terminating NUL".into());
    }
    for pair in body.split(|&b| b == 0) {
        if pair.is_empty() {
            continue;
        }
        if out.len() == MAX_PAIRS {
            return Err(format!("more than {MAX_PAIRS} text keys"));
        }
        let text = std::str::from_utf8(pair).map_err(|_| "a text key that is not UTF-8".to_string())?;
        let (key, value) = text.split_once('=').ok_or_else(|| format!("a text key without '=': {text:.64}"))?;
        if key.is_empty()
            || key.len() > MAX_KEY
            || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b".-+@_".contains(&b))
        {
            return Err(format!("a bad text key name {key:.64}"));
        }
        if value.len() > MAX_VALUE {
            return Err(format!("a value of {} bytes for {key}", value.len()));
        }
        out.push((key.to_string(), value.to_string()));
    }
    Ok(out)
}

/// Encodes pairs, each `key=value\0`.
pub fn encode<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// The last value of `key` (a key repeated in later PDUs of a stage replaces the earlier one).
#[must_use]
pub fn get<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// A numerical value (RFC 7143 §5.1: decimal, or hex with `0x`), at most 2^32 − 1.
#[must_use]
pub fn number(value: &str) -> Option<u32> {
    match value.strip_prefix("0x").or_else(|| value.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => value.parse().ok(),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pairs_parse_and_extra_nuls_are_tolerated() {
        let p = parse(b"TargetName=iqn.x:y\0TargetAddress=127.0.0.1:3260,1\0\0\0").unwrap();
        assert_eq!(get(&p, "TargetAddress"), Some("127.0.0.1:3260,1"));
        assert_eq!(parse(b"").unwrap(), vec![]);
        assert!(parse(b"A=1").is_err(), "no NUL");
        assert!(parse(b"A\0").is_err(), "no =");
        assert!(parse(b"=1\0").is_err());
        assert!(parse(&[b'A', b'=', 0xff, 0]).is_err());
        let long = format!("{}=1\0", "K".repeat(64));
        assert!(parse(long.as_bytes()).is_err());
    }

    #[test]
    fn numbers_in_decimal_and_hex() {
        assert_eq!(number("8192"), Some(8192));
        assert_eq!(number("0x2000"), Some(8192));
        assert_eq!(number("4294967296"), None);
        assert_eq!(number("-1"), None);
        assert_eq!(number(""), None);
    }

    proptest! {
        #[test]
        fn encoded_pairs_parse_back(pairs in proptest::collection::vec(("[A-Za-z][A-Za-z0-9._]{0,20}", "[ -~]{0,40}"), 0..20)) {
            let pairs: Pairs = pairs.into_iter().filter(|(_, v): &(String, String)| !v.contains('\0')).collect();
            let wire = encode(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            prop_assert_eq!(parse(&wire).unwrap(), pairs);
        }

        #[test]
        fn random_text_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse(&data);
        }
    }
}
