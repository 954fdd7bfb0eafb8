//! The change calendar both practices share: freeze windows during which an environment
//! takes no deployment and no release step unless an emergency override is given.
//!
//! A window is either absolute (two instants) or weekly, in a named IANA time zone, from a
//! local day and time to another (it may wrap past Sunday midnight). Weekly windows are
//! evaluated on the local wall clock, so "Friday 18:00 to Monday 08:00 Europe/Berlin" keeps
//! its local hours across daylight-saving changes.
//!
//! # Layout
//!
//! One file, `src/lib.rs`:
//! - [`FreezeWindow`] with its [`Schedule`] (absolute, or weekly between two [`WeekTime`]s
//!   in a time zone): whether a window covers an instant.
//! - [`active`]: the windows of a list that cover an instant ([`Millis`]).
//! - [`parse_minute`] / [`format_minute`]: `HH:MM` to and from a minute of the day.

use std::str::FromStr;

use chrono::{DateTime, Datelike, Timelike, Utc};
use chrono_tz::Tz;

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

/// A point in a local week: day (0 = Monday .. 6 = Sunday) and minute of the day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeekTime {
    /// 0 = Monday .. 6 = Sunday.
    pub day: u32,
    /// 0..1440.
    pub minute: u32,
}

impl WeekTime {
    fn minute_of_week(self) -> u32 {
        self.day * 24 * 60 + self.minute
    }
}

/// When a window applies.
#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    /// From `start_ms` (inclusive) to `end_ms` (exclusive).
    Absolute {
        /// Start.
        start_ms: Millis,
        /// End.
        end_ms: Millis,
    },
    /// Every week, on the local clock of `time_zone`, from `start` (inclusive) to `end`
    /// (exclusive); `end` before `start` wraps past Sunday midnight.
    Weekly {
        /// IANA time zone name, for example `Europe/Berlin`.
        time_zone: String,
        /// Start.
        start: WeekTime,
        /// End.
        end: WeekTime,
    },
}

/// A named freeze window.
#[derive(Debug, Clone, PartialEq)]
pub struct FreezeWindow {
    /// The name reported when the window refuses a change (for example `year-end`).
    pub name: String,
    /// When it applies.
    pub schedule: Schedule,
}

impl FreezeWindow {
    /// Every problem with the window, as `(field, description)` pairs (empty when valid).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.name.trim().is_empty() {
            out.push(("name", "must not be empty".to_owned()));
        }
        match &self.schedule {
            Schedule::Absolute { start_ms, end_ms } => {
                if end_ms <= start_ms {
                    out.push(("absolute.end", "must be after the start".to_owned()));
                }
            }
            Schedule::Weekly {
                time_zone,
                start,
                end,
            } => {
                if Tz::from_str(time_zone).is_err() {
                    out.push((
                        "weekly.time_zone",
                        format!("{time_zone:?} is not an IANA time zone"),
                    ));
                }
                for (field, t) in [("weekly.start", start), ("weekly.end", end)] {
                    if t.day > 6 || t.minute >= 24 * 60 {
                        out.push((field, "must be a day 0-6 and a minute 0-1439".to_owned()));
                    }
                }
                if start == end {
                    out.push(("weekly.end", "must differ from the start".to_owned()));
                }
            }
        }
        out
    }

    /// Whether the window covers the instant `at_ms`.
    pub fn contains(&self, at_ms: Millis) -> bool {
        match &self.schedule {
            Schedule::Absolute { start_ms, end_ms } => (*start_ms..*end_ms).contains(&at_ms),
            Schedule::Weekly {
                time_zone,
                start,
                end,
            } => {
                let Ok(tz) = Tz::from_str(time_zone) else {
                    return false;
                };
                let Some(utc) = DateTime::<Utc>::from_timestamp_millis(at_ms) else {
                    return false;
                };
                let local = utc.with_timezone(&tz);
                let now = WeekTime {
                    day: local.weekday().num_days_from_monday(),
                    minute: local.hour() * 60 + local.minute(),
                }
                .minute_of_week();
                let (s, e) = (start.minute_of_week(), end.minute_of_week());
                if s < e {
                    (s..e).contains(&now)
                } else {
                    // Wraps past Sunday midnight.
                    now >= s || now < e
                }
            }
        }
    }
}

/// The windows of `windows` that cover `at_ms`.
pub fn active(windows: &[FreezeWindow], at_ms: Millis) -> Vec<&FreezeWindow> {
    windows.iter().filter(|w| w.contains(at_ms)).collect()
}

/// Parses `HH:MM` into a minute of the day.
pub fn parse_minute(text: &str) -> Result<u32, String> {
    let (h, m) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?} is not HH:MM"))?;
    let (h, m): (u32, u32) = (
        h.parse().map_err(|_| format!("{text:?} is not HH:MM"))?,
        m.parse().map_err(|_| format!("{text:?} is not HH:MM"))?,
    );
    if h > 23 || m > 59 {
        return Err(format!("{text:?} is not a time of day"));
    }
    Ok(h * 60 + m)
}

/// Formats a minute of the day as `HH:MM`.
pub fn format_minute(minute: u32) -> String {
    format!("{:02}:{:02}", minute / 60, minute % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> Millis {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0)
            .single()
            .map(|t| t.timestamp_millis())
            .unwrap_or_default()
    }

    fn weekly(tz: &str, start: (u32, &str), end: (u32, &str)) -> FreezeWindow {
        FreezeWindow {
            name: "weekend".into(),
            schedule: Schedule::Weekly {
                time_zone: tz.into(),
                start: WeekTime {
                    day: start.0,
                    minute: parse_minute(start.1).unwrap_or(0),
                },
                end: WeekTime {
                    day: end.0,
                    minute: parse_minute(end.1).unwrap_or(0),
                },
            },
        }
    }

    #[test]
    fn absolute_windows_are_half_open() {
        let w = FreezeWindow {
            name: "year-end".into(),
            schedule: Schedule::Absolute {
                start_ms: 1_000,
                end_ms: 2_000,
            },
        };
        assert!(!w.contains(999));
        assert!(w.contains(1_000));
        assert!(w.contains(1_999));
        assert!(!w.contains(2_000));
        assert!(w.problems().is_empty());
    }

    #[test]
    fn weekly_window_wraps_past_sunday_midnight() {
        // Saturday 22:00 to Monday 06:00 UTC.
        let w = weekly("UTC", (5, "22:00"), (0, "06:00"));
        // 2026-11-28 is a Saturday.
        assert!(!w.contains(utc(2026, 11, 28, 21, 59)));
        assert!(w.contains(utc(2026, 11, 28, 22, 0)));
        assert!(w.contains(utc(2026, 11, 29, 23, 59)), "Sunday night");
        assert!(
            w.contains(utc(2026, 11, 30, 0, 0)),
            "just past Sunday midnight"
        );
        assert!(w.contains(utc(2026, 11, 30, 5, 59)));
        assert!(!w.contains(utc(2026, 11, 30, 6, 0)));
        assert!(!w.contains(utc(2026, 12, 2, 12, 0)), "Wednesday");
    }

    #[test]
    fn weekly_window_keeps_local_hours_across_a_daylight_saving_change() {
        // Europe/Berlin moves from UTC+1 to UTC+2 at 2026-03-29 01:00 UTC (Sunday).
        // Friday 18:00 to Monday 08:00 local: starts at 17:00 UTC (winter time) and ends at
        // 06:00 UTC (summer time).
        let w = weekly("Europe/Berlin", (4, "18:00"), (0, "08:00"));
        assert!(!w.contains(utc(2026, 3, 27, 16, 59)));
        assert!(w.contains(utc(2026, 3, 27, 17, 0)), "Friday 18:00 CET");
        assert!(w.contains(utc(2026, 3, 29, 1, 30)), "during the switch");
        assert!(w.contains(utc(2026, 3, 30, 5, 59)));
        assert!(!w.contains(utc(2026, 3, 30, 6, 0)), "Monday 08:00 CEST");
        // The same window a week earlier (all winter time) ends at 07:00 UTC.
        assert!(w.contains(utc(2026, 3, 23, 6, 59)));
        assert!(!w.contains(utc(2026, 3, 23, 7, 0)));
    }

    #[test]
    fn weekly_window_keeps_local_hours_across_the_autumn_change() {
        // Europe/Berlin moves from UTC+2 back to UTC+1 at 2026-10-25 01:00 UTC (Sunday):
        // local 02:00-03:00 happens twice. Friday 18:00 to Monday 08:00 local starts at
        // 16:00 UTC (summer time) and ends at 07:00 UTC (winter time).
        let w = weekly("Europe/Berlin", (4, "18:00"), (0, "08:00"));
        assert!(!w.contains(utc(2026, 10, 23, 15, 59)));
        assert!(w.contains(utc(2026, 10, 23, 16, 0)), "Friday 18:00 CEST");
        assert!(w.contains(utc(2026, 10, 25, 0, 30)), "02:30 CEST");
        assert!(
            w.contains(utc(2026, 10, 25, 1, 30)),
            "02:30 CET, the repeated hour"
        );
        assert!(w.contains(utc(2026, 10, 26, 6, 59)));
        assert!(!w.contains(utc(2026, 10, 26, 7, 0)), "Monday 08:00 CET");
        // The same window a week later (all winter time) starts an hour later in UTC.
        assert!(!w.contains(utc(2026, 10, 30, 16, 59)));
        assert!(w.contains(utc(2026, 10, 30, 17, 0)), "Friday 18:00 CET");

        // A window inside the repeated hour covers both of its occurrences, and not the
        // instants between them.
        let night = weekly("Europe/Berlin", (6, "02:15"), (6, "02:45"));
        assert!(!night.contains(utc(2026, 10, 25, 0, 14)), "02:14 CEST");
        assert!(night.contains(utc(2026, 10, 25, 0, 15)), "02:15 CEST");
        assert!(night.contains(utc(2026, 10, 25, 0, 44)), "02:44 CEST");
        assert!(!night.contains(utc(2026, 10, 25, 0, 45)), "02:45 CEST");
        assert!(!night.contains(utc(2026, 10, 25, 1, 14)), "02:14 CET");
        assert!(night.contains(utc(2026, 10, 25, 1, 15)), "02:15 CET");
        assert!(!night.contains(utc(2026, 10, 25, 1, 45)), "02:45 CET");
        // In spring the same local times do not exist (02:00-03:00 is skipped): never frozen.
        let spring: Vec<Millis> = (0..120)
            .map(|m| utc(2026, 3, 29, 0, 0) + m * 60_000)
            .filter(|&t| night.contains(t))
            .collect();
        assert!(spring.is_empty(), "{spring:?}");
    }

    #[test]
    fn bad_windows_name_every_problem() {
        let w = FreezeWindow {
            name: " ".into(),
            schedule: Schedule::Weekly {
                time_zone: "Mars/Olympus".into(),
                start: WeekTime { day: 7, minute: 0 },
                end: WeekTime { day: 0, minute: 0 },
            },
        };
        let fields: Vec<_> = w.problems().into_iter().map(|p| p.0).collect();
        assert_eq!(fields, ["name", "weekly.time_zone", "weekly.start"]);
        assert!(parse_minute("24:00").is_err());
        assert_eq!(parse_minute("08:30"), Ok(510));
        assert_eq!(format_minute(510), "08:30");
    }

    #[test]
    fn active_lists_covering_windows() {
        let a = FreezeWindow {
            name: "a".into(),
            schedule: Schedule::Absolute {
                start_ms: 0,
                end_ms: 10,
            },
        };
        let b = FreezeWindow {
            name: "b".into(),
            schedule: Schedule::Absolute {
                start_ms: 5,
                end_ms: 20,
            },
        };
        let windows = [a, b];
        let names: Vec<_> = active(&windows, 7).iter().map(|w| w.name.clone()).collect();
        assert_eq!(names, ["a", "b"]);
        assert!(active(&windows, 25).is_empty());
    }
}
