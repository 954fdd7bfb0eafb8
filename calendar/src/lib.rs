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
//! `src/lib.rs`, and [`from_proto`] (deploy.v1 windows in these terms):
//! - [`FreezeWindow`] with its [`Schedule`] (absolute, or weekly between two [`WeekTime`]s
//!   in a time zone): whether a window covers an instant.
//! - [`active`]: the windows of a list that cover an instant ([`Millis`]).
//! - [`frozen_until`], [`next_occurrence`]: when a calendar stops freezing, and the next
//!   window to come (from `FreezeWindow::next_change`: when one window starts or ends).
//! - [`parse_minute`] / [`format_minute`]: `HH:MM` to and from a minute of the day.

pub mod from_proto;

use std::str::FromStr;

use chrono::{DateTime, Datelike, Offset, TimeZone, Timelike, Utc};
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

/// A day in milliseconds.
const DAY_MS: Millis = 86_400_000;

impl FreezeWindow {
    /// The first instant after `after_ms` at which the window starts or stops covering
    /// time (exactly the instant [`contains`](Self::contains) changes its answer), or
    /// `None` when it never changes again (an absolute window that has ended). Weekly
    /// windows change on whole local minutes and at the time zone's offset changes.
    pub fn next_change(&self, after_ms: Millis) -> Option<Millis> {
        match &self.schedule {
            Schedule::Absolute { start_ms, end_ms } => {
                if after_ms < *start_ms {
                    Some(*start_ms)
                } else if after_ms < *end_ms {
                    Some(*end_ms)
                } else {
                    None
                }
            }
            Schedule::Weekly {
                time_zone,
                start,
                end,
            } => {
                let tz = Tz::from_str(time_zone).ok()?;
                let local = DateTime::<Utc>::from_timestamp_millis(after_ms)?
                    .with_timezone(&tz)
                    .date_naive();
                // Every instant the local clock reads the start or the end (twice in a
                // repeated hour), and every offset change, over a little more than two
                // weeks: the answer is the first of them at which `contains` flips.
                let mut candidates = Vec::new();
                for days in -1..=15 {
                    let Some(date) = local.checked_add_signed(chrono::Duration::days(days)) else {
                        continue;
                    };
                    for t in [start, end] {
                        if t.day != date.weekday().num_days_from_monday() {
                            continue;
                        }
                        let Some(naive) = date.and_hms_opt(t.minute / 60, t.minute % 60, 0) else {
                            continue;
                        };
                        let mapped = tz.from_local_datetime(&naive);
                        candidates.extend(
                            mapped
                                .earliest()
                                .into_iter()
                                .chain(mapped.latest())
                                .map(|d| d.timestamp_millis()),
                        );
                    }
                }
                for days in 0..=16 {
                    let from = after_ms.saturating_add(days * DAY_MS);
                    candidates.extend(offset_change(&tz, from, from.saturating_add(DAY_MS)));
                }
                candidates
                    .into_iter()
                    .filter(|&c| c > after_ms && self.contains(c) != self.contains(c - 1))
                    .min()
            }
        }
    }

    /// The occurrence of the window that starts first after `at_ms`, as `(start, end)`
    /// (for a window covering `at_ms`, the one after the current occurrence).
    pub fn next_start(&self, at_ms: Millis) -> Option<(Millis, Millis)> {
        let from = if self.contains(at_ms) {
            self.next_change(at_ms)?
        } else {
            at_ms
        };
        let start = self.next_change(from)?;
        Some((start, self.next_change(start)?))
    }
}

/// The offset of `tz` at `ms`, in seconds east of UTC.
fn offset_at(tz: &Tz, ms: Millis) -> Option<i32> {
    let utc = DateTime::<Utc>::from_timestamp_millis(ms)?.naive_utc();
    Some(tz.offset_from_utc_datetime(&utc).fix().local_minus_utc())
}

/// The instant in `(from, to]` at which `tz` changes its offset, if it does (at most one
/// change a day).
fn offset_change(tz: &Tz, from: Millis, to: Millis) -> Option<Millis> {
    let before = offset_at(tz, from)?;
    if offset_at(tz, to)? == before {
        return None;
    }
    let (mut lo, mut hi) = (from, to);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if offset_at(tz, mid)? == before {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(hi)
}

/// The first instant at or after `at_ms` at which no window of `windows` is active, or
/// `None` when none is active at `at_ms` (nothing is frozen).
pub fn frozen_until(windows: &[FreezeWindow], at_ms: Millis) -> Option<Millis> {
    let mut t = at_ms;
    // Each round ends every window active at `t`; chained windows take a round each.
    for _ in 0..=2 * windows.len() {
        let ends: Option<Vec<Millis>> = active(windows, t)
            .iter()
            .map(|w| w.next_change(t))
            .collect();
        let end = ends?.into_iter().max();
        match end {
            None => return (t != at_ms).then_some(t),
            Some(end) => t = end,
        }
    }
    Some(t)
}

/// The window occurrence of `windows` that starts first after `at_ms`: the window and its
/// `(start, end)`.
pub fn next_occurrence(
    windows: &[FreezeWindow],
    at_ms: Millis,
) -> Option<(&FreezeWindow, Millis, Millis)> {
    windows
        .iter()
        .filter_map(|w| w.next_start(at_ms).map(|(s, e)| (w, s, e)))
        .min_by_key(|&(_, s, _)| s)
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
    fn weekly_changes_are_found_across_daylight_saving_changes() {
        let w = weekly("Europe/Berlin", (4, "18:00"), (0, "08:00"));
        // Wednesday before the spring change: starts Friday 17:00 UTC, ends Monday 06:00 UTC
        // (summer time by then).
        let wed = utc(2026, 3, 25, 12, 0);
        assert_eq!(w.next_change(wed), Some(utc(2026, 3, 27, 17, 0)));
        assert_eq!(
            w.next_start(wed),
            Some((utc(2026, 3, 27, 17, 0), utc(2026, 3, 30, 6, 0)))
        );
        // Inside the window: its end, and the next occurrence a week later.
        let sat = utc(2026, 3, 28, 12, 0);
        assert_eq!(w.next_change(sat), Some(utc(2026, 3, 30, 6, 0)));
        assert_eq!(
            w.next_start(sat),
            Some((utc(2026, 4, 3, 16, 0), utc(2026, 4, 6, 6, 0)))
        );
        // Every answer agrees with `contains` a millisecond either side.
        let mut t = utc(2026, 3, 20, 0, 0);
        for _ in 0..6 {
            let c = w.next_change(t).unwrap_or(0);
            assert!(c > t && w.contains(c) != w.contains(c - 1), "{t} -> {c}");
            assert_eq!(w.contains(t), w.contains(c - 1), "no change before {c}");
            t = c;
        }
        // A window ending inside the repeated autumn hour ends at the first 02:30, starts
        // again when the clock goes back to 02:00, and ends at the second 02:30.
        let late = weekly("Europe/Berlin", (5, "22:00"), (6, "02:30"));
        let sat_night = utc(2026, 10, 24, 21, 0);
        assert!(late.contains(sat_night));
        let first_end = utc(2026, 10, 25, 0, 30);
        assert_eq!(late.next_change(sat_night), Some(first_end));
        assert_eq!(late.next_change(first_end), Some(utc(2026, 10, 25, 1, 0)));
        assert_eq!(
            late.next_change(utc(2026, 10, 25, 1, 0)),
            Some(utc(2026, 10, 25, 1, 30))
        );
    }

    #[test]
    fn absolute_changes_and_the_calendar_summaries() {
        let a = FreezeWindow {
            name: "a".into(),
            schedule: Schedule::Absolute {
                start_ms: 100,
                end_ms: 200,
            },
        };
        let b = FreezeWindow {
            name: "b".into(),
            schedule: Schedule::Absolute {
                start_ms: 150,
                end_ms: 300,
            },
        };
        let c = FreezeWindow {
            name: "c".into(),
            schedule: Schedule::Absolute {
                start_ms: 500,
                end_ms: 600,
            },
        };
        assert_eq!(a.next_change(0), Some(100));
        assert_eq!(a.next_change(100), Some(200));
        assert_eq!(a.next_change(200), None);
        let windows = [a, b, c];
        assert_eq!(frozen_until(&windows, 50), None, "nothing active");
        assert_eq!(frozen_until(&windows, 120), Some(300), "a then b");
        assert_eq!(frozen_until(&windows, 250), Some(300));
        let next = next_occurrence(&windows, 120).map(|(w, s, e)| (w.name.as_str(), s, e));
        assert_eq!(next, Some(("b", 150, 300)));
        let next = next_occurrence(&windows, 250).map(|(w, s, e)| (w.name.as_str(), s, e));
        assert_eq!(next, Some(("c", 500, 600)));
        assert!(next_occurrence(&windows, 600).is_none());
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
