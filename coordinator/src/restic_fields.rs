//! The spec fields that end up on restic's command line, checked when the object is read: otherwise
//! an accepted Schedule would fail every Prune or Check with restic's flag error, long after the
//! mistake was made. Each problem names its field.

use crate::conditions::Finding;
use stowage_api::Retention;

pub const INVALID_RETENTION: &str = "InvalidRetention";
pub const INVALID_CHECK: &str = "InvalidCheck";
pub const INVALID_SAMPLE: &str = "InvalidSampleBytes";

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

/// A byte quantity as Kubernetes writes them (`1Gi`, `500Mi`, `2G`, `1048576`): the value, or a
/// finding naming `at`. At least 1 MiB: a smaller sample proves little and most files exceed it.
pub fn sample_bytes(v: &str, at: &str) -> Result<u64, Finding> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (digits, suffix) = v.split_at(split);
    let factor: u64 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        _ => 0,
    };
    let bytes = digits
        .parse::<u64>()
        .ok()
        .filter(|_| factor > 0)
        .and_then(|n| n.checked_mul(factor));
    match bytes {
        Some(b) if b >= 1 << 20 => Ok(b),
        Some(_) => Err(Finding::new(
            INVALID_SAMPLE,
            format!("{at}: {v:?} is less than 1Mi; a drill's sample must be at least 1Mi"),
        )),
        None => Err(Finding::new(
            INVALID_SAMPLE,
            format!(
                "{at}: {v:?} is not a byte quantity such as 1Gi, 500Mi or 2G (an integer and one of Ki, Mi, Gi, Ti, k, M, G, T)"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sample_bytes_are_kubernetes_quantities_of_at_least_a_mebibyte() {
        assert_eq!(sample_bytes("1Gi", "f").unwrap(), 1 << 30);
        assert_eq!(sample_bytes("500Mi", "f").unwrap(), 500 << 20);
        assert_eq!(sample_bytes("2G", "f").unwrap(), 2_000_000_000);
        assert_eq!(sample_bytes("1048576", "f").unwrap(), 1 << 20);
        let small = sample_bytes("10Ki", "spec.sampleBytes").unwrap_err();
        assert_eq!(small.reason, INVALID_SAMPLE);
        assert!(
            small
                .message
                .starts_with("spec.sampleBytes: \"10Ki\" is less than 1Mi")
        );
        for bad in ["lots", "1.5Gi", "-1Gi", "1GB", "", "99999999999999999999Ti"] {
            let f = sample_bytes(bad, "spec.verify.sampleBytes").unwrap_err();
            assert!(
                f.message.contains("is not a byte quantity"),
                "{bad}: {}",
                f.message
            );
        }
    }

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
