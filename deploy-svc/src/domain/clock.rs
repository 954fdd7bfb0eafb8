//! Time, injectable so tests can move it (the clock both services share, from
//! `service_kit::time`).

pub use service_kit::time::{Clock, ManualClock, Millis, SystemClock};

/// `ms` as an RFC 3339 UTC timestamp (`2026-01-05T00:00:00Z`; milliseconds shown only when
/// not zero).
pub fn rfc3339(ms: Millis) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        .unwrap_or_else(|| format!("{ms} ms after the epoch"))
}
