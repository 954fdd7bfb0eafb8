//! Limits and checks every API of the pair shares. Each check returns the reason as a
//! `String`, to be attached to the request field by the caller.

use std::collections::BTreeMap;

/// Most labels or metadata entries on one resource.
pub const MAX_MAP_ENTRIES: usize = 64;
/// Longest free-text field (descriptions, messages, reasons).
pub const MAX_TEXT: usize = 1024;
/// Longest request id or change reference.
pub const MAX_KEY: usize = 128;
/// Default page size of every List.
pub const DEFAULT_PAGE_SIZE: usize = 50;
/// Largest page size of every List.
pub const MAX_PAGE_SIZE: usize = 1000;

/// Checks a free-text field against a length limit.
pub fn validate_text(text: &str, max: usize) -> Result<(), String> {
    if text.len() > max {
        return Err(format!("must be at most {max} bytes, got {}", text.len()));
    }
    if text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err("must not contain control characters".into());
    }
    Ok(())
}

/// Checks an optional idempotency key or reference (empty allowed).
pub fn validate_key(key: &str) -> Result<(), String> {
    if key.len() > MAX_KEY {
        return Err(format!("must be at most {MAX_KEY} characters"));
    }
    if key.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("must not contain whitespace or control characters".into());
    }
    Ok(())
}

/// Checks labels or metadata: entry count, key shape, value length.
pub fn validate_map(map: &BTreeMap<String, String>, max_value: usize) -> Result<(), String> {
    if map.len() > MAX_MAP_ENTRIES {
        return Err(format!("must have at most {MAX_MAP_ENTRIES} entries"));
    }
    for (k, v) in map {
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'/'));
        if !key_ok {
            return Err(format!(
                "key {k:?} must be 1-63 characters of letters, digits and '.-_/'"
            ));
        }
        if v.len() > max_value {
            return Err(format!("value of {k:?} must be at most {max_value} bytes"));
        }
    }
    Ok(())
}

/// Validates a page size: 0 means the default, negatives are refused, large ones capped.
pub fn page_size(size: i32) -> Result<usize, String> {
    match size {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n < 0 => Err(format!("must not be negative, got {n}")),
        n => Ok(usize::try_from(n)
            .unwrap_or(MAX_PAGE_SIZE)
            .min(MAX_PAGE_SIZE)),
    }
}

/// Encodes a keyset position as an opaque page token.
pub fn encode_page_token(key: &str) -> String {
    hex::encode(key.as_bytes())
}

/// Decodes a page token made by [`encode_page_token`]; empty means the first page.
pub fn decode_page_token(token: &str) -> Result<Option<String>, String> {
    if token.is_empty() {
        return Ok(None);
    }
    hex::decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .map(Some)
        .ok_or_else(|| "is not a page token returned by this service".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip() {
        let token = encode_page_token("prod");
        assert_eq!(decode_page_token(&token), Ok(Some("prod".into())));
        assert!(decode_page_token("zz").is_err());
        assert_eq!(decode_page_token(""), Ok(None));
    }

    #[test]
    fn page_sizes() {
        assert_eq!(page_size(0), Ok(DEFAULT_PAGE_SIZE));
        assert_eq!(page_size(5000), Ok(MAX_PAGE_SIZE));
        assert!(page_size(-1).is_err());
    }
}
