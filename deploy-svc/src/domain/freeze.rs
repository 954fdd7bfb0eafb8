//! The change calendar as Deployment Management applies it: which freeze windows refuse a
//! new deployment, how a refusal is described, and the JSON form the audit trail shows.
//! The windows themselves and when they are active are the `calendar` crate's, shared with
//! release-svc.

use calendar::{FreezeWindow, Schedule, WeekTime};
use serde_json::{json, Value};

use super::clock::{rfc3339, Millis};
use super::error::PreconditionViolation;
use super::model::Environment;
use super::names::environment_name;

/// A freeze window of the environment is active.
pub const FREEZE_WINDOW: &str = "FREEZE_WINDOW";
/// Most freeze windows on one environment.
pub const MAX_WINDOWS: usize = 64;

const DAYS: [&str; 7] = [
    "MONDAY",
    "TUESDAY",
    "WEDNESDAY",
    "THURSDAY",
    "FRIDAY",
    "SATURDAY",
    "SUNDAY",
];

/// The name of a calendar day (0 = Monday .. 6 = Sunday).
pub fn day_name(day: u32) -> &'static str {
    usize::try_from(day)
        .ok()
        .and_then(|d| DAYS.get(d))
        .copied()
        .unwrap_or("?")
}

fn week_time(t: WeekTime) -> String {
    format!("{} {}", day_name(t.day), calendar::format_minute(t.minute))
}

/// When a window applies, in words: `until 2026-01-05T00:00:00Z` or
/// `every week FRIDAY 18:00 to MONDAY 08:00 Europe/Berlin`.
pub fn describe_schedule(window: &FreezeWindow) -> String {
    match &window.schedule {
        Schedule::Absolute { start_ms, end_ms } => {
            format!("from {} until {}", rfc3339(*start_ms), rfc3339(*end_ms))
        }
        Schedule::Weekly {
            time_zone,
            start,
            end,
        } => format!(
            "every week {} to {} {time_zone}",
            week_time(*start),
            week_time(*end)
        ),
    }
}

/// One FREEZE_WINDOW violation per window of `environment` active at `now`.
pub fn violations(environment: &Environment, now: Millis) -> Vec<PreconditionViolation> {
    calendar::active(&environment.freeze_windows, now)
        .into_iter()
        .map(|w| {
            PreconditionViolation::new(
                FREEZE_WINDOW,
                environment_name(&environment.id),
                format!(
                    "freeze window {:?} of {} is active ({}): set deployment.emergency with a reason and an approver other than the requester to deploy anyway",
                    w.name,
                    environment_name(&environment.id),
                    describe_schedule(w)
                ),
            )
        })
        .collect()
}

/// The names of the windows of `environment` active at `now`.
pub fn active_names(environment: &Environment, now: Millis) -> Vec<String> {
    calendar::active(&environment.freeze_windows, now)
        .into_iter()
        .map(|w| w.name.clone())
        .collect()
}

/// The freeze state of an environment at an instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreezeStatus {
    /// The windows active at the instant, by name, with the end of their current
    /// occurrence.
    pub active: Vec<(String, Millis)>,
    /// When no window is active any more (overlapping and back-to-back windows chained);
    /// `None` when nothing is frozen.
    pub until: Option<Millis>,
    /// The window occurrence that starts first after the instant: name, start and end.
    pub next: Option<(String, Millis, Millis)>,
}

/// The freeze state of `environment` at `now`.
pub fn status(environment: &Environment, now: Millis) -> FreezeStatus {
    let windows = &environment.freeze_windows;
    FreezeStatus {
        active: calendar::active(windows, now)
            .into_iter()
            .filter_map(|w| w.next_change(now).map(|end| (w.name.clone(), end)))
            .collect(),
        until: calendar::frozen_until(windows, now),
        next: calendar::next_occurrence(windows, now).map(|(w, s, e)| (w.name.clone(), s, e)),
    }
}

/// The windows as the audit trail shows them (the API's field names and forms).
pub fn windows_json(windows: &[FreezeWindow]) -> Value {
    windows
        .iter()
        .map(|w| match &w.schedule {
            Schedule::Absolute { start_ms, end_ms } => json!({
                "name": w.name,
                "absolute": {"start_time": rfc3339(*start_ms), "end_time": rfc3339(*end_ms)},
            }),
            Schedule::Weekly {
                time_zone,
                start,
                end,
            } => json!({
                "name": w.name,
                "weekly": {
                    "time_zone": time_zone,
                    "start_day": day_name(start.day),
                    "start_time": calendar::format_minute(start.minute),
                    "end_day": day_name(end.day),
                    "end_time": calendar::format_minute(end.minute),
                },
            }),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(windows: Vec<FreezeWindow>) -> Environment {
        Environment {
            id: "prod".into(),
            description: String::new(),
            protected: false,
            upstream: None,
            promotion_path: vec![],
            freeze_windows: windows,
            revision: 1,
            create_ms: 0,
            update_ms: 0,
        }
    }

    fn absolute(name: &str, start_ms: Millis, end_ms: Millis) -> FreezeWindow {
        FreezeWindow {
            name: name.into(),
            schedule: Schedule::Absolute { start_ms, end_ms },
        }
    }

    #[test]
    fn every_active_window_is_a_violation_naming_it_and_its_end() {
        let e = env(vec![
            absolute("year-end", 0, 1_767_571_200_000),
            absolute("later", 2_000_000_000_000, 2_000_000_000_001),
            absolute("launch", 0, 10_000),
        ]);
        let v = violations(&e, 5_000);
        assert_eq!(v.len(), 2);
        assert!(v.iter().all(|v| v.kind == FREEZE_WINDOW));
        assert_eq!(v[0].subject, "environments/prod");
        assert!(
            v[0].description.contains("\"year-end\"")
                && v[0].description.contains("until 2026-01-05T00:00:00Z"),
            "{}",
            v[0].description
        );
        assert_eq!(active_names(&e, 5_000), ["year-end", "launch"]);
        assert!(violations(&e, 1_767_571_200_000).is_empty());
    }

    #[test]
    fn status_names_the_active_windows_their_ends_and_the_next_one() {
        let e = env(vec![
            absolute("launch", 1_000, 5_000),
            absolute("later", 9_000, 12_000),
            absolute("overlap", 4_000, 6_000),
        ]);
        let s = status(&e, 4_500);
        assert_eq!(
            s.active,
            [("launch".to_owned(), 5_000), ("overlap".to_owned(), 6_000)]
        );
        assert_eq!(s.until, Some(6_000));
        assert_eq!(s.next, Some(("later".to_owned(), 9_000, 12_000)));
        let s = status(&e, 7_000);
        assert!(s.active.is_empty() && s.until.is_none());
        assert_eq!(s.next, Some(("later".to_owned(), 9_000, 12_000)));
        assert_eq!(
            status(&e, 12_000),
            FreezeStatus {
                active: vec![],
                until: None,
                next: None
            }
        );
    }

    #[test]
    fn weekly_windows_are_described_in_local_terms() {
        let w = FreezeWindow {
            name: "weekend".into(),
            schedule: Schedule::Weekly {
                time_zone: "Europe/Berlin".into(),
                start: WeekTime {
                    day: 4,
                    minute: 18 * 60,
                },
                end: WeekTime {
                    day: 0,
                    minute: 8 * 60,
                },
            },
        };
        assert_eq!(
            describe_schedule(&w),
            "every week FRIDAY 18:00 to MONDAY 08:00 Europe/Berlin"
        );
        assert_eq!(
            windows_json(&[w])[0]["weekly"]["start_day"],
            Value::from("FRIDAY")
        );
    }
}
