//! The spec fields that end up on restic's command line, checked when the object is read: otherwise
//! an accepted Schedule would fail every Prune or Check with restic's flag error, long after the
//! mistake was made. Each problem names its field.

use crate::conditions::Finding;
use stowage_api::Retention;

pub const INVALID_RETENTION: &str = "InvalidRetention";
pub const INVALID_CHECK: &str = "InvalidCheck";

/// Problems of a retention block at `at` (e.g. `spec.prune.retention`).
pub fn retention(r: &Retention, at: &str) -> Vec<Finding> {
    let mut problems = Vec::new();
    let counts = [
        ("keepLast", r.keep_last),
        ("keepHourly", r.keep_hourly),
        ("keepDaily", r.keep_daily),
        ("keepWeekly", r.keep_weekly),
        ("keepMonthly", r.keep_monthly),
        ("keepYearly", r.keep_yearly),
    ];
    for (field, value) in counts {
        if value == Some(0) {
            problems.push(Finding::new(
                INVALID_RETENTION,
                format!("{at}.{field}: must be at least 1 (leave the rule out to not use it)"),
            ));
        }
    }
    if let Some(d) = &r.keep_within_duration
        && !is_restic_duration(d)
    {
        problems.push(Finding::new(
            INVALID_RETENTION,
            format!(
                "{at}.keepWithinDuration: {d:?} is not a duration; use numbers with y, m, d or h, e.g. \"30d\" or \"1y6m\""
            ),
        ));
    }
    for (i, tag) in r.keep_tags.iter().enumerate() {
        if tag.is_empty() || tag.contains(',') {
            problems.push(Finding::new(
                INVALID_RETENTION,
                format!("{at}.keepTags[{i}]: {tag:?} must be one non-empty tag without commas"),
            ));
        }
    }
    problems
}

/// restic's duration for `--keep-within`: one or more `<number><y|m|d|h>`, not all zero.
fn is_restic_duration(s: &str) -> bool {
    let mut rest = s;
    let mut total = 0u64;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let Some(unit) = rest[digits..].chars().next() else {
            return false;
        };
        if digits == 0 || !matches!(unit, 'y' | 'm' | 'd' | 'h') {
            return false;
        }
        total = total.saturating_add(rest[..digits].parse().unwrap_or(u64::MAX));
        rest = &rest[digits + 1..];
    }
    total > 0
}

/// A problem with `--read-data-subset` at `at`: `N%` (0 < N <= 100) or `n/t` (1 <= n <= t).
pub fn read_data_subset(s: &str, at: &str) -> Option<Finding> {
    let ok = match (s.strip_suffix('%'), s.split_once('/')) {
        (Some(p), _) => p
            .parse::<f64>()
            .is_ok_and(|p| p > 0.0 && p <= 100.0 && p.is_finite()),
        (None, Some((n, t))) => match (n.parse::<u32>(), t.parse::<u32>()) {
            (Ok(n), Ok(t)) => n >= 1 && n <= t,
            _ => false,
        },
        _ => false,
    };
    (!ok).then(|| {
        Finding::new(
            INVALID_CHECK,
            format!(
                "{at}: {s:?} is not a subset; use a percentage (\"5%\") or a part of a whole (\"1/10\")"
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_values_restic_would_refuse_are_named() {
        let r = Retention {
            keep_last: Some(0),
            keep_daily: Some(7),
            keep_within_duration: Some("banana".into()),
            keep_tags: vec!["ok".into(), "a,b".into()],
            ..Default::default()
        };
        let p = retention(&r, "spec.prune.retention");
        let msgs: Vec<&str> = p.iter().map(|f| f.message.as_str()).collect();
        assert_eq!(msgs.len(), 3, "{msgs:?}");
        assert!(msgs[0].starts_with("spec.prune.retention.keepLast: must be at least 1"));
        assert!(msgs[1].starts_with("spec.prune.retention.keepWithinDuration: \"banana\""));
        assert!(msgs[2].starts_with("spec.prune.retention.keepTags[1]"));
        assert!(p.iter().all(|f| f.reason == INVALID_RETENTION));
        let good = Retention {
            keep_last: Some(3),
            keep_within_duration: Some("1y6m".into()),
            ..Default::default()
        };
        assert!(retention(&good, "x").is_empty());
    }

    #[test]
    fn durations_follow_restic() {
        for ok in ["30d", "1y6m", "2h", "1y2m3d4h"] {
            assert!(is_restic_duration(ok), "{ok}");
        }
        for bad in ["", "banana", "30", "d", "5w", "1.5d", "0d", "-1d", "30d "] {
            assert!(!is_restic_duration(bad), "{bad}");
        }
    }

    #[test]
    fn subsets_are_a_percentage_or_a_part() {
        for ok in ["5%", "2.5%", "100%", "1/10", "10/10"] {
            assert!(
                read_data_subset(ok, "spec.readDataSubset").is_none(),
                "{ok}"
            );
        }
        for bad in [
            "5",
            "0%",
            "101%",
            "ten percent",
            "0/10",
            "11/10",
            "1/",
            "a/b",
            "%",
        ] {
            let f = read_data_subset(bad, "spec.readDataSubset").expect(bad);
            assert!(
                f.message.starts_with("spec.readDataSubset: "),
                "{}",
                f.message
            );
        }
    }
}
