//! When a Schedule's action is due. Pure, so the restart rules are unit-tested with a fake clock:
//! a fire time missed by less than the deadline runs once; older ones are counted as missed.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::cron::CronSchedule;

/// Counting stops here: a per-minute schedule left alone for months must not stall a reconcile.
const MAX_COUNTED: u64 = 100_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    /// The fire time to run now, if any.
    pub fire: Option<DateTime<Utc>>,
    /// Fire times since the last handled one that will never run.
    pub missed: u64,
    /// The newest fire time handled by this decision (store it; the next decision starts there).
    pub handled_up_to: Option<DateTime<Utc>>,
}

pub fn due(
    cron: &CronSchedule,
    last_handled: DateTime<Utc>,
    now: DateTime<Utc>,
    deadline: Duration,
) -> Due {
    let mut count = 0u64;
    let mut latest = None;
    for t in cron.fires_between(last_handled, now) {
        count += 1;
        latest = Some(t);
        if count >= MAX_COUNTED {
            // Jump to the newest fire time without counting the rest one by one.
            let mut newest = t;
            let mut probe = cron.next_after(now - chrono::Duration::days(400));
            while let Some(p) = probe.filter(|p| *p <= now) {
                newest = p;
                probe = cron.next_after(p);
            }
            latest = Some(newest);
            break;
        }
    }
    let Some(latest) = latest else {
        return Due {
            fire: None,
            missed: 0,
            handled_up_to: None,
        };
    };
    let late = (now - latest).to_std().unwrap_or_default();
    if late <= deadline {
        Due {
            fire: Some(latest),
            missed: count - 1,
            handled_up_to: Some(latest),
        }
    } else {
        Due {
            fire: None,
            missed: count,
            handled_up_to: Some(latest),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 21, h, m, s)
            .single()
            .unwrap()
    }

    fn every_minute() -> CronSchedule {
        CronSchedule::parse("* * * * *", "ns", "s", "backup").unwrap()
    }

    #[test]
    fn on_time_fires_once() {
        let d = due(
            &every_minute(),
            t(10, 0, 0),
            t(10, 1, 0),
            Duration::from_secs(600),
        );
        assert_eq!(d.fire, Some(t(10, 1, 0)));
        assert_eq!(d.missed, 0);
        assert_eq!(d.handled_up_to, Some(t(10, 1, 0)));
    }

    #[test]
    fn nothing_due_before_the_next_fire_time() {
        let d = due(
            &every_minute(),
            t(10, 1, 0),
            t(10, 1, 59),
            Duration::from_secs(600),
        );
        assert_eq!(
            d,
            Due {
                fire: None,
                missed: 0,
                handled_up_to: None
            }
        );
    }

    #[test]
    fn after_an_outage_the_newest_fire_time_within_the_deadline_runs_once() {
        // Down from 10:00 to 10:05:30: 10:01..10:05 were missed; 10:05 is 30 s late and runs.
        let d = due(
            &every_minute(),
            t(10, 0, 0),
            t(10, 5, 30),
            Duration::from_secs(120),
        );
        assert_eq!(d.fire, Some(t(10, 5, 0)));
        assert_eq!(d.missed, 4);
    }

    #[test]
    fn fire_times_older_than_the_deadline_are_only_counted() {
        let hourly = CronSchedule::parse("0 * * * *", "ns", "s", "backup").unwrap();
        let d = due(&hourly, t(1, 0, 0), t(4, 30, 0), Duration::from_secs(600));
        assert_eq!(d.fire, None);
        assert_eq!(d.missed, 3, "02:00, 03:00, 04:00");
        assert_eq!(d.handled_up_to, Some(t(4, 0, 0)));
    }

    #[test]
    fn a_very_long_outage_is_bounded_and_still_finds_the_newest_time() {
        let now = t(10, 0, 30);
        let d = due(
            &every_minute(),
            now - chrono::Duration::days(200),
            now,
            Duration::from_secs(60),
        );
        assert_eq!(d.fire, Some(t(10, 0, 0)));
        assert!(d.missed >= MAX_COUNTED - 1);
    }
}
