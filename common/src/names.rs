//! Generated names and label values that Kubernetes accepts at any input length: a value over the
//! limit keeps a readable prefix and ends in a hash of the whole value, so two long values never
//! collide by truncation. Where the full value matters, callers keep it in an annotation.

use crate::hash;

/// Label values: at most 63 characters.
pub const LABEL_VALUE_MAX: usize = 63;
/// Names of objects that are DNS subdomains (most kinds, custom resources included).
pub const SUBDOMAIN_MAX: usize = 253;
/// Names that must be DNS labels: pods' hostnames, Services, namespaces.
pub const DNS_LABEL_MAX: usize = 63;

/// `value` if it fits in `max` characters; otherwise a prefix, `-`, and 8 hex digits of its hash.
/// The prefix never ends in `-` or `.`, so the result stays a valid name or label value when the
/// input was one.
pub fn bounded(value: &str, max: usize) -> String {
    if value.len() <= max {
        return value.to_string();
    }
    let keep = max.saturating_sub(9);
    let mut base: String = value.chars().take(keep).collect();
    while base.len() > keep {
        base.pop();
    }
    while base.ends_with(['-', '.', '_']) {
        base.pop();
    }
    format!("{base}-{}", hash::short(value))
}

/// A label value standing for `value`.
pub fn label_value(value: &str) -> String {
    bounded(value, LABEL_VALUE_MAX)
}

/// `<prefix>-<suffix>` within `max`: the prefix is shortened (with a hash of it) to make room for
/// the suffix, which is kept whole (it carries the meaning: an action and a time, say).
pub fn with_suffix(prefix: &str, suffix: &str, max: usize) -> String {
    let whole = format!("{prefix}-{suffix}");
    if whole.len() <= max {
        return whole;
    }
    let room = max.saturating_sub(suffix.len() + 1);
    format!("{}-{suffix}", bounded(prefix, room))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_values_are_kept_and_long_ones_fit_and_differ() {
        assert_eq!(label_value("nightly"), "nightly");
        let long = "postgres-primary-database-nightly-offsite-s3-replica-x-backup-202611251200";
        let l = label_value(long);
        assert!(l.len() <= 63, "{l}");
        assert!(l.starts_with("postgres-primary-database"));
        assert_ne!(label_value(&format!("{long}x")), l);
        assert!(!l.contains("--"));
        let n = with_suffix(&"s".repeat(300), "backup-202611251200", SUBDOMAIN_MAX);
        assert!(
            n.len() <= SUBDOMAIN_MAX && n.ends_with("-backup-202611251200"),
            "{n}"
        );
        assert_eq!(with_suffix("nightly", "backup-1", 253), "nightly-backup-1");
        let p = with_suffix(long, "mount-0123abcd", DNS_LABEL_MAX);
        assert!(p.len() <= 63 && p.ends_with("-mount-0123abcd"), "{p}");
    }
}
