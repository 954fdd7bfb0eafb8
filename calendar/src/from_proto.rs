//! deploy.v1 freeze windows in the calendar's terms (release-svc reads them from
//! deploy-svc, the console draws them).

use proto::deploy::v1 as dpb;

use crate::{FreezeWindow, Millis, Schedule, WeekTime};

/// A deploy.v1 freeze window in the calendar's terms (`None` for an unusable one).
pub fn window(w: &dpb::FreezeWindow) -> Option<FreezeWindow> {
    let schedule = match w.schedule.as_ref()? {
        dpb::freeze_window::Schedule::Absolute(a) => Schedule::Absolute {
            start_ms: millis(a.start_time.as_ref()?),
            end_ms: millis(a.end_time.as_ref()?),
        },
        dpb::freeze_window::Schedule::Weekly(wk) => Schedule::Weekly {
            time_zone: wk.time_zone.clone(),
            start: WeekTime {
                day: u32::try_from(wk.start_day - 1).ok()?,
                minute: crate::parse_minute(&wk.start_time).ok()?,
            },
            end: WeekTime {
                day: u32::try_from(wk.end_day - 1).ok()?,
                minute: crate::parse_minute(&wk.end_time).ok()?,
            },
        },
    };
    Some(FreezeWindow {
        name: w.name.clone(),
        schedule,
    })
}

/// A timestamp in milliseconds since the epoch.
fn millis(t: &prost_types::Timestamp) -> Millis {
    t.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(t.nanos) / 1_000_000)
}
