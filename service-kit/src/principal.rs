//! Who is calling when authentication is off: the caller names itself in the
//! `x-principal` request metadata. With authentication on it is never read (see
//! [`crate::auth`]).

use tonic::metadata::MetadataMap;

use crate::error::Error;

/// The request metadata key naming the caller.
pub const PRINCIPAL_METADATA: &str = "x-principal";
/// The principal of a call without `x-principal`.
pub const ANONYMOUS: &str = "anonymous";
/// Longest principal accepted.
pub const MAX_PRINCIPAL: usize = 128;

/// The principal of a call: the `x-principal` metadata, or [`ANONYMOUS`] when it is
/// missing or empty. A value that is not 1-128 visible ASCII characters (no whitespace)
/// is INVALID_ARGUMENT naming `x-principal`, so a misconfigured client never writes an
/// unreadable name into an audit trail.
pub fn principal(metadata: &MetadataMap) -> Result<String, Error> {
    parse(metadata.get(PRINCIPAL_METADATA).map(|v| v.as_bytes()))
}

/// [`principal`] from raw HTTP headers.
pub fn from_headers(headers: &http::HeaderMap) -> Result<String, Error> {
    parse(headers.get(PRINCIPAL_METADATA).map(|v| v.as_bytes()))
}

fn parse(value: Option<&[u8]>) -> Result<String, Error> {
    let Some(value) = value else {
        return Ok(ANONYMOUS.to_owned());
    };
    let text = std::str::from_utf8(value)
        .map_err(|_| Error::invalid(PRINCIPAL_METADATA, "must be visible ASCII"))?;
    if text.is_empty() {
        return Ok(ANONYMOUS.to_owned());
    }
    if text.len() > MAX_PRINCIPAL || !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::invalid(
            PRINCIPAL_METADATA,
            format!("must be at most {MAX_PRINCIPAL} visible ASCII characters without spaces"),
        ));
    }
    Ok(text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(value: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Ok(v) = value.parse() {
            m.insert(PRINCIPAL_METADATA, v);
        }
        m
    }

    #[test]
    fn missing_or_empty_is_anonymous() {
        assert_eq!(
            principal(&MetadataMap::new()).ok().as_deref(),
            Some(ANONYMOUS)
        );
        assert_eq!(principal(&with("")).ok().as_deref(), Some(ANONYMOUS));
    }

    #[test]
    fn a_named_principal_is_returned_and_bad_ones_are_refused() {
        assert_eq!(principal(&with("alice")).ok().as_deref(), Some("alice"));
        assert!(principal(&with("al ice")).is_err());
        assert!(principal(&with(&"a".repeat(129))).is_err());
    }
}
