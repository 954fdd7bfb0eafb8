//! Who is calling when authentication is off: the caller names itself in the
//! `x-principal` request metadata. With authentication on it is never read (see
//! [`crate::auth`]). Also the `x-request-id` metadata, read by one policy in both services.

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

/// Who makes a call, as the audit trails of both services record it (the authenticated
/// identity behind it, with its groups, is [`crate::auth::Caller`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    /// The principal (`anonymous` without one; `system` for the service's own actions).
    pub principal: String,
    /// The request id (the request's own field, else the `x-request-id` metadata, else
    /// empty: see [`request_id`]).
    pub request_id: String,
    /// The W3C `traceparent` of the call's server span while traces are exported (deploy-svc's
    /// placement events carry it).
    pub trace_parent: Option<String>,
}

impl Caller {
    /// The service itself (automatic actions).
    pub fn system() -> Self {
        Self {
            principal: "system".into(),
            ..Self::default()
        }
    }

    /// The same caller with the request's own request id, when it has one.
    pub fn with_request_id(mut self, request_id: Option<&str>) -> Self {
        if let Some(id) = request_id.filter(|id| !id.is_empty()) {
            id.clone_into(&mut self.request_id);
        }
        self
    }
}

/// The request metadata key of a request id, for calls whose request has no `request_id`
/// field of its own (and for those that leave it empty).
pub const REQUEST_ID_METADATA: &str = "x-request-id";

/// Whether `v` is a plain token: 1-128 visible ASCII characters, without quotes or
/// backslashes (`ci/run/7`, a UUID, base64 and `Root=1-5759e988` are; anything with a
/// space, a control character or non-ASCII text is not). The only request ids the
/// services take from `x-request-id`: the access log makes one up for any other value, and
/// a change refuses it.
pub fn plain_token(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && v.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
}

/// The request id of a call: `own` (the request's own `request_id` field) when not empty,
/// else the `x-request-id` metadata, else empty. A metadata value that is not a
/// [`plain_token`] is INVALID_ARGUMENT naming `x-request-id`, whether or not the request
/// has an id of its own: never cut or rewritten, so the access log, the response header
/// and (without an id of the request's own) the audit record carry the id as sent.
pub fn request_id(own: &str, metadata: &MetadataMap) -> Result<String, Error> {
    let sent = match metadata.get(REQUEST_ID_METADATA).map(|v| v.to_str()) {
        None | Some(Ok("")) => String::new(),
        Some(Ok(text)) if plain_token(text) => text.to_owned(),
        Some(_) => {
            return Err(Error::invalid(
                REQUEST_ID_METADATA,
                "must be 1-128 visible ASCII characters without quotes or backslashes",
            ))
        }
    };
    Ok(if own.is_empty() { sent } else { own.to_owned() })
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

    #[test]
    fn the_request_id_is_the_requests_own_else_the_metadata_else_empty() {
        let mut m = MetadataMap::new();
        assert_eq!(request_id("", &m).ok().as_deref(), Some(""));
        m.insert(
            REQUEST_ID_METADATA,
            "req-7".parse().unwrap_or_else(|_| unreachable!()),
        );
        assert_eq!(request_id("", &m).ok().as_deref(), Some("req-7"));
        assert_eq!(request_id("own-1", &m).ok().as_deref(), Some("own-1"));
        for good in ["ci/run/7", "Root=1-5759e988", "dGVzdA=="] {
            m.insert(
                REQUEST_ID_METADATA,
                good.parse().unwrap_or_else(|_| unreachable!()),
            );
            assert_eq!(request_id("", &m).ok().as_deref(), Some(good));
        }
    }

    #[test]
    fn a_bad_request_id_is_refused_naming_the_metadata_not_cut() {
        for bad in [
            "a".repeat(129),
            "two words".to_owned(),
            "quo\"te".to_owned(),
        ] {
            let mut m = MetadataMap::new();
            m.insert(
                REQUEST_ID_METADATA,
                bad.parse().unwrap_or_else(|_| unreachable!()),
            );
            let err = request_id("", &m).unwrap_err();
            assert!(
                err.to_string().contains(REQUEST_ID_METADATA),
                "{bad}: {err}"
            );
        }
    }
}
