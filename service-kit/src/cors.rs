//! Cross-origin calls from browsers (CORS): the one list of page origins a server lets call
//! its HTTP faces (release-svc's OFREP and the Connect protocol of its gRPC listeners).

use http::{header, HeaderMap, HeaderValue};

/// The page origins (`https://app.example.com`) allowed to call from another origin.
#[derive(Debug, Clone, Default)]
pub struct Origins(Vec<String>);

impl Origins {
    /// The origins given on the command line (`flag` names the option in warnings): a
    /// trailing `/` is dropped, empty entries are skipped, and `null` is refused (the origin
    /// of sandboxed frames and `data:` pages: any site can make one, so allowing it would
    /// allow everyone).
    pub fn new(origins: impl IntoIterator<Item = String>, flag: &str) -> Self {
        Self(
            origins
                .into_iter()
                .map(|o| o.trim().trim_end_matches('/').to_owned())
                .filter(|o| {
                    if o == "null" {
                        tracing::warn!("{flag} null ignored: any page can claim it");
                    }
                    !o.is_empty() && o != "null"
                })
                .collect(),
        )
    }

    /// Whether no origin is allowed (same-origin pages only).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The request's `Origin` when it is one of the allowed origins.
    pub fn allowed(&self, headers: &HeaderMap) -> Option<HeaderValue> {
        let origin = headers.get(header::ORIGIN)?;
        let text = origin.to_str().ok()?;
        self.0.iter().any(|o| o == text).then(|| origin.clone())
    }

    /// Answers a preflight (`OPTIONS` with `Origin`): for an allowed origin, the methods
    /// and request headers it may use; for any other origin, nothing (the browser then
    /// refuses the call).
    pub fn preflight(
        &self,
        request: &HeaderMap,
        methods: &'static str,
        headers: &'static str,
    ) -> HeaderMap {
        let mut answer = HeaderMap::new();
        if let Some(origin) = self.allowed(request) {
            answer.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            answer.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static(methods),
            );
            answer.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static(headers),
            );
            answer.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            );
            answer.insert(header::VARY, HeaderValue::from_static("origin"));
        }
        answer
    }

    /// Marks an answer to an actual call: `Vary: origin` whenever some origin is allowed
    /// (answers differ by origin, caches must key on it), and for an allowed `origin` the
    /// `Access-Control-Allow-Origin` and the response headers its script may read.
    pub fn mark(&self, origin: Option<HeaderValue>, answer: &mut HeaderMap, expose: &'static str) {
        if !self.is_empty() {
            answer.insert(header::VARY, HeaderValue::from_static("origin"));
        }
        if let Some(origin) = origin {
            answer.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            answer.insert(
                header::ACCESS_CONTROL_EXPOSE_HEADERS,
                HeaderValue::from_static(expose),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_origins_are_allowed_and_null_never() {
        let origins = Origins::new(
            [
                "https://app.example.com/".to_owned(),
                "null".to_owned(),
                String::new(),
            ],
            "--cors-origin",
        );
        let mut request = HeaderMap::new();
        request.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://app.example.com"),
        );
        assert!(origins.allowed(&request).is_some());
        let answer = origins.preflight(&request, "POST", "content-type");
        assert_eq!(
            answer[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://app.example.com"
        );
        request.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(origins.allowed(&request).is_none());
        assert!(origins
            .preflight(&request, "POST", "content-type")
            .is_empty());
        request.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(origins.allowed(&request).is_none());
    }
}
