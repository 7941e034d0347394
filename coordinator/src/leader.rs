//! Leader election on a `coordination.k8s.io/v1` Lease, so two replicas never both dispatch.
//!
//! A replica dispatches only while it holds the Lease. Updates carry the Lease's resourceVersion,
//! so of two replicas racing for an expired Lease exactly one wins. A leader that cannot renew
//! before its Lease would expire stops (the process exits and is restarted), because another replica
//! may already have taken over.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lost the leader Lease {namespace}/{name}: not renewed within {secs}s")]
    Lost {
        namespace: String,
        name: String,
        secs: u64,
    },
}

pub struct LeaderElector {
    api: Api<Lease>,
    namespace: String,
    name: String,
    identity: String,
    duration: Duration,
}

/// Whether a Lease held by `holder`, renewed at `renewed` for `secs`, may be taken by `me` at `now`.
pub fn may_take(
    holder: Option<&str>,
    renewed: Option<Timestamp>,
    secs: i32,
    me: &str,
    now: Timestamp,
) -> bool {
    match holder {
        None | Some("") => true,
        Some(h) if h == me => true,
        Some(_) => renewed.is_none_or(|r| {
            r.checked_add(SignedDuration::from_secs(i64::from(secs.max(1))))
                .is_ok_and(|expiry| expiry < now)
        }),
    }
}

impl LeaderElector {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            duration,
        }
    }

    fn secs(&self) -> i32 {
        i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// One attempt to take or renew the Lease; `Ok(true)` while we hold it.
    pub async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(self.secs()),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone();
        if !may_take(
            holder.as_deref(),
            spec.renew_time.as_ref().map(|t| t.0),
            spec.lease_duration_seconds.unwrap_or(self.secs()),
            &self.identity,
            now,
        ) {
            return Ok(false);
        }
        if holder.as_deref() != Some(self.identity.as_str()) {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            spec.holder_identity = Some(self.identity.clone());
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(self.secs());
        // replace() sends our resourceVersion: a concurrent writer makes this a 409, not a tie.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&self) {
        let retry = self.duration / 3;
        loop {
            match self.try_acquire().await {
                Ok(true) => {
                    tracing::info!(lease = %self.name, identity = %self.identity, "became leader");
                    return;
                }
                Ok(false) => {
                    tracing::debug!(lease = %self.name, "standing by: another replica leads")
                }
                Err(e) => tracing::warn!(lease = %self.name, error = %e, "leader election"),
            }
            tokio::time::sleep(retry).await;
        }
    }

    /// Renews the Lease until it cannot be renewed in time; then reports the loss.
    pub async fn keep(&self, leading: watch::Sender<bool>) -> LeaderError {
        let retry = self.duration / 3;
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(retry).await;
            match self.try_acquire().await {
                Ok(true) => last_renewed = tokio::time::Instant::now(),
                Ok(false) => break,
                Err(e) => tracing::warn!(lease = %self.name, error = %e, "renewing the Lease"),
            }
            // Stop before the Lease can expire in another replica's eyes.
            if last_renewed.elapsed() + retry >= self.duration {
                break;
            }
        }
        let _ = leading.send(false);
        LeaderError::Lost {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            secs: self.duration.as_secs(),
        }
    }

    /// Gives the Lease up (on shutdown) so a standby takes over without waiting for expiry.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        if let Err(e) = self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            tracing::warn!(lease = %self.name, error = %e, "releasing the Lease");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_taken_only_when_free_ours_or_expired() {
        let now = Timestamp::now();
        let ago = |s: i64| now.checked_sub(SignedDuration::from_secs(s)).unwrap();
        assert!(may_take(None, None, 15, "a", now));
        assert!(may_take(Some("a"), Some(ago(1)), 15, "a", now));
        assert!(!may_take(Some("b"), Some(ago(5)), 15, "a", now));
        assert!(may_take(Some("b"), Some(ago(16)), 15, "a", now));
        assert!(may_take(Some("b"), None, 15, "a", now));
    }
}
