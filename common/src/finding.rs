//! What a check found wrong (or right) with an object, in words a user can act on: the reason and
//! message of a condition, an Event, or the plugin's error.

/// What a controller found wrong (or right) with an object, in words a user can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// PascalCase, e.g. `InvalidSchedule`.
    pub reason: &'static str,
    pub message: String,
}

impl Finding {
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }

    /// All of `findings` as one: the first one's reason, every message. `None` when there are none.
    pub fn joined(findings: &[Finding]) -> Option<Finding> {
        let first = findings.first()?;
        Some(Finding::new(
            first.reason,
            findings
                .iter()
                .map(|f| f.message.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        ))
    }
}
