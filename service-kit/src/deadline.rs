//! Per-call deadlines: a call gets the shorter of the caller's `grpc-timeout` and the
//! server's `--rpc-timeout-ms`; one still unanswered then is answered DEADLINE_EXCEEDED and
//! its work is dropped.
//!
//! tonic's own server timeout answers an expired call with CANCELLED ("Timeout expired"),
//! which a client cannot tell from a call it cancelled itself, and which the access log
//! could not record (the call was dropped outside it). This layer sits inside the access
//! layer, so the log and the metrics count DEADLINE_EXCEEDED too. tonic still applies the
//! caller's `grpc-timeout` outside every layer, but this layer's timer is set first for
//! the same deadline, so it is the one that answers.
//!
//! For a server stream the deadline covers the call until its response starts (streams
//! are bounded by their own limits), as gRPC servers usually do.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::body::Body;

/// Adds [`Deadline`] in front of a server's routes.
#[derive(Debug, Clone, Copy)]
pub struct DeadlineLayer {
    limit: Duration,
}

impl DeadlineLayer {
    /// A deadline of at most `limit` for every call.
    pub fn new(limit: Duration) -> Self {
        Self { limit }
    }
}

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline {
            inner,
            limit: self.limit,
        }
    }
}

/// See [`DeadlineLayer`].
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    limit: Duration,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S> tower::Service<http::Request<Body>> for Deadline<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let budget = grpc_timeout(req.headers()).map_or(self.limit, |t| t.min(self.limit));
        // The instant is fixed now, before tonic's outer timer for the same deadline.
        let until = tokio::time::Instant::now() + budget;
        let call = self.inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout_at(until, call).await {
                Ok(answer) => answer,
                Err(_) => Ok(tonic::Status::deadline_exceeded(format!(
                    "deadline of {} ms exceeded",
                    budget.as_millis()
                ))
                .into_http()),
            }
        })
    }
}

/// The `grpc-timeout` header: at most 8 digits and a unit (H, M, S, m, u, n); `None` when
/// absent or malformed (the server's limit applies).
pub fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::grpc_timeout;
    use std::time::Duration;

    fn parse(v: &str) -> Option<Duration> {
        let mut h = http::HeaderMap::new();
        h.insert("grpc-timeout", v.parse().unwrap());
        grpc_timeout(&h)
    }

    #[test]
    fn grpc_timeout_units_and_malformed_values() {
        assert_eq!(parse("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse("1S"), Some(Duration::from_secs(1)));
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse("5n"), Some(Duration::from_nanos(5)));
        for bad in ["", "S", "123456789S", "1s", "-1S", "1.5S", "1 S"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&http::HeaderMap::new()), None);
    }
}
