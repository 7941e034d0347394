//! Standard `metav1.Condition`s on our objects, and Events that say the same thing to `kubectl
//! describe`. A condition's message names the offending field so the user knows what to fix.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};

/// Condition types.
pub const READY: &str = "Ready";
pub const SUCCEEDED: &str = "Succeeded";
pub const VOLUMES_SELECTED: &str = "VolumesSelected";
pub const REPOSITORY_HEALTHY: &str = "RepositoryHealthy";
/// The newest Verify run of a Schedule brought every snapshot back.
pub const VERIFIED: &str = "Verified";
/// True when Schedules of other namespaces write to the same repository location.
pub const SHARED_REPOSITORY: &str = "SharedRepository";

pub use stowage_common::finding::Finding;

/// Sets condition `type_` in `conditions`; returns whether anything a user would notice changed
/// (status, reason or message), which is also when an Event is worth sending.
pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) -> bool {
    let status = if ok { "True" } else { "False" };
    // The API server caps a condition message at 32 KiB.
    let message: String = message.chars().take(4000).collect();
    if let Some(c) = conditions.iter_mut().find(|c| c.type_ == type_) {
        let changed = c.status != status || c.reason != reason || c.message != message;
        if c.status != status {
            c.last_transition_time = Time(Timestamp::now());
        }
        c.status = status.into();
        c.reason = reason.into();
        c.message = message;
        c.observed_generation = generation;
        return changed;
    }
    conditions.push(Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time: Time(Timestamp::now()),
        observed_generation: generation,
    });
    true
}

/// Sends Events about objects; failures to record are logged, never fatal (the condition stays).
#[derive(Clone)]
pub struct Notifier {
    recorder: Recorder,
}

impl Notifier {
    pub fn new(recorder: Recorder) -> Self {
        Self { recorder }
    }

    pub async fn warn<K>(&self, obj: &K, action: &str, finding: &Finding)
    where
        K: Resource<DynamicType = ()>,
    {
        self.send(obj, EventType::Warning, action, finding).await;
    }

    pub async fn normal<K>(&self, obj: &K, action: &str, finding: &Finding)
    where
        K: Resource<DynamicType = ()>,
    {
        self.send(obj, EventType::Normal, action, finding).await;
    }

    async fn send<K>(&self, obj: &K, type_: EventType, action: &str, finding: &Finding)
    where
        K: Resource<DynamicType = ()>,
    {
        let note: String = finding.message.chars().take(1000).collect();
        let event = Event {
            type_,
            reason: finding.reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            tracing::warn!(object = %obj.name_any(), reason = finding.reason, error = %e, "recording event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_reports_changes_and_keeps_transition_times() {
        let mut cs = Vec::new();
        assert!(set(
            &mut cs,
            READY,
            false,
            "InvalidSchedule",
            "spec.backup.schedule: x",
            Some(1)
        ));
        let t0 = cs[0].last_transition_time.clone();
        assert!(!set(
            &mut cs,
            READY,
            false,
            "InvalidSchedule",
            "spec.backup.schedule: x",
            Some(2)
        ));
        assert_eq!(
            cs[0].last_transition_time, t0,
            "same status keeps the transition time"
        );
        assert_eq!(cs[0].observed_generation, Some(2));
        assert!(set(&mut cs, READY, true, "Scheduled", "ok", Some(2)));
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0].status, "True");
    }
}
