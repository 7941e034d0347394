//! Schedule expressions: 5-field cron, `@hourly`/`@daily`/`@weekly`/`@monthly`, and `-random`
//! variants whose fire time is derived from the schedule's namespace/name/action — stable across
//! coordinator restarts, different between schedules, so a fleet does not fire at the same instant.
//! Times are UTC.

use std::str::FromStr;

use chrono::{DateTime, Utc};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid schedule {expr:?}: {reason}")]
pub struct CronError {
    pub expr: String,
    pub reason: String,
}

/// A parsed schedule.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    /// As the user wrote it.
    pub expr: String,
    /// The effective 5-field expression (after macros and -random are resolved).
    pub effective: String,
    schedule: cron::Schedule,
}

/// FNV-1a: a hash that is the same in every process and release (std's is randomized per process).
fn stable_hash(s: &str) -> u64 {
    stowage_common::hash::fnv1a(s.as_bytes())
}

/// cron's day-of-week numbers are 1-7 from Sunday; standard cron's are 0-6 (and 7) from Sunday.
/// Names mean the same in both, so numeric days are rewritten as names.
fn dow_names(field: &str) -> String {
    const NAMES: [&str; 8] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN"];
    let (base, step) = match field.split_once('/') {
        Some((b, s)) => (b, Some(s)),
        None => (field, None),
    };
    let mapped: String = base
        .split(',')
        .map(|part| {
            part.split('-')
                .map(|t| {
                    t.parse::<usize>()
                        .ok()
                        .and_then(|n| NAMES.get(n).copied())
                        .map_or_else(|| t.to_string(), String::from)
                })
                .collect::<Vec<_>>()
                .join("-")
        })
        .collect::<Vec<_>>()
        .join(",");
    match step {
        Some(s) => format!("{mapped}/{s}"),
        None => mapped,
    }
}

impl CronSchedule {
    /// Parses `expr` for the schedule `namespace/name`'s `action` (backup, check, prune).
    pub fn parse(expr: &str, namespace: &str, name: &str, action: &str) -> Result<Self, CronError> {
        let err = |reason: &str| CronError {
            expr: expr.to_string(),
            reason: reason.to_string(),
        };
        let trimmed = expr.trim();
        let effective = if let Some(rest) = trimmed.strip_prefix('@') {
            let (period, random) = match rest.strip_suffix("-random") {
                Some(p) => (p, true),
                None => (rest, false),
            };
            let seed = if random {
                stable_hash(&format!("{namespace}/{name}/{action}"))
            } else {
                0
            };
            let minute = seed % 60;
            let hour = (seed / 60) % 24;
            let weekday = (seed / 1440) % 7;
            let day = (seed / 10_080) % 28 + 1;
            match period {
                "hourly" => format!("{minute} * * * *"),
                "daily" => format!("{minute} {hour} * * *"),
                "weekly" => format!("{minute} {hour} * * {weekday}"),
                "monthly" => format!("{minute} {hour} {} * *", if random { day } else { 1 }),
                _ => {
                    return Err(err(
                        "unknown macro; use @hourly, @daily, @weekly, @monthly or their -random variants",
                    ));
                }
            }
        } else {
            trimmed.to_string()
        };
        let fields: Vec<&str> = effective.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(err(
                "expected 5 fields: minute hour day-of-month month day-of-week",
            ));
        }
        let six = format!(
            "0 {} {} {} {} {}",
            fields[0],
            fields[1],
            fields[2],
            fields[3],
            dow_names(fields[4])
        );
        let schedule = cron::Schedule::from_str(&six).map_err(|e| err(&e.to_string()))?;
        if schedule.upcoming(Utc).next().is_none() {
            return Err(err("never fires"));
        }
        Ok(Self {
            expr: expr.to_string(),
            effective,
            schedule,
        })
    }

    /// The first fire time strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.schedule.after(&t).next()
    }

    /// Fire times in `(from, to]`, oldest first (for missed-run accounting after a restart).
    pub fn fires_between(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> impl Iterator<Item = DateTime<Utc>> + '_ {
        self.schedule.after(&from).take_while(move |t| *t <= to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Datelike, Duration, TimeZone, Timelike, Weekday};

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).single().unwrap()
    }

    #[test]
    fn five_field_cron_with_standard_day_of_week() {
        let s = CronSchedule::parse("0 4 * * 0", "ns", "n", "prune").unwrap();
        let next = s.next_after(at(2026, 11, 21, 12, 0)).unwrap(); // a Saturday
        assert_eq!(next.weekday(), Weekday::Sun);
        assert_eq!((next.hour(), next.minute()), (4, 0));
        let weekdays = CronSchedule::parse("30 2 * * 1-5", "ns", "n", "backup").unwrap();
        let fires: Vec<_> = weekdays
            .fires_between(at(2026, 11, 21, 0, 0), at(2026, 11, 28, 0, 0))
            .collect();
        assert_eq!(fires.len(), 5);
        assert!(
            fires
                .iter()
                .all(|f| !matches!(f.weekday(), Weekday::Sat | Weekday::Sun))
        );
        let every_minute = CronSchedule::parse("* * * * *", "ns", "n", "backup").unwrap();
        assert_eq!(
            every_minute.next_after(at(2026, 1, 1, 0, 0)),
            Some(at(2026, 1, 1, 0, 1))
        );
    }

    #[test]
    fn macros() {
        let t = at(2026, 11, 21, 12, 30);
        let daily = CronSchedule::parse("@daily", "a", "b", "backup").unwrap();
        assert_eq!(daily.next_after(t), Some(at(2026, 11, 22, 0, 0)));
        let monthly = CronSchedule::parse("@monthly", "a", "b", "backup").unwrap();
        assert_eq!(monthly.next_after(t), Some(at(2026, 12, 1, 0, 0)));
    }

    #[test]
    fn random_variants_are_stable_distinct_and_within_their_period() {
        let t = at(2026, 11, 21, 12, 30);
        for (period, max_gap) in [
            ("hourly", Duration::hours(1)),
            ("daily", Duration::days(1)),
            ("weekly", Duration::weeks(1)),
            ("monthly", Duration::days(31)),
        ] {
            let expr = format!("@{period}-random");
            let a1 = CronSchedule::parse(&expr, "shop", "nightly", "backup").unwrap();
            let a2 = CronSchedule::parse(&expr, "shop", "nightly", "backup").unwrap();
            assert_eq!(
                a1.effective, a2.effective,
                "stable across parses (and restarts)"
            );
            let next = a1.next_after(t).unwrap();
            assert!(
                next > t && next - t <= max_gap,
                "{expr}: {next} not within {max_gap}"
            );
            let distinct: std::collections::HashSet<String> = (0..20)
                .map(|i| {
                    CronSchedule::parse(&expr, "shop", &format!("s{i}"), "backup")
                        .unwrap()
                        .effective
                })
                .collect();
            assert!(
                distinct.len() > 5,
                "{expr}: schedules should spread out, got {distinct:?}"
            );
        }
        let m = CronSchedule::parse("@monthly-random", "x", "y", "check").unwrap();
        let day: u32 = m
            .effective
            .split_whitespace()
            .nth(2)
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=28).contains(&day), "every month has that day");
        // The action is part of the seed: backup and check of one schedule do not coincide.
        assert_ne!(
            CronSchedule::parse("@daily-random", "a", "b", "backup")
                .unwrap()
                .effective,
            CronSchedule::parse("@daily-random", "a", "b", "check")
                .unwrap()
                .effective
        );
    }

    #[test]
    fn invalid_expressions_say_what_is_wrong() {
        for bad in [
            "61 * * * *",
            "* * *",
            "@fortnightly",
            "",
            "* * * * * *",
            "a b c d e",
        ] {
            let e = CronSchedule::parse(bad, "ns", "n", "backup").unwrap_err();
            assert_eq!(e.expr, bad);
            assert!(!e.reason.is_empty());
        }
    }
}
