//! Leader election on a `coordination.k8s.io/v1` Lease, so two replicas never both dispatch.
//!
//! The Lease is taken, renewed and released by `kube-lease-manager` (server-side apply, conflict
//! detection, transitions). Two rules are added around it, because that crate judges expiry by
//! comparing the holder's `renewTime` with the local clock:
//!
//! - **Expiry by observed time.** A standby tries to take the Lease only when it is free, or when it
//!   has watched it stay unchanged for a whole lease duration on its own monotonic clock (as
//!   client-go does). A standby whose clock runs ahead of the holder's never sees a live Lease as
//!   expired.
//! - **A leader steps down in time.** Every call has a timeout (the client's, a fraction of the
//!   lease duration). The leader confirms its renewals with reads; if it cannot confirm one in time
//!   it stops before any standby could have observed the Lease unchanged for a lease duration.
//!
//! The arithmetic: a renewal confirmed by a read happened after the previous read started (at `S`).
//! A standby can take the Lease no earlier than `S + duration`; the leader stops at
//! `S + duration - duration/8`. It renews every `duration/2` and reads every `duration/8`, so a
//! healthy leader confirms each renewal well before that.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use kube_lease_manager::{LeaseCreateMode, LeaseManager, LeaseParams};
use tokio::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error(
        "lost the leader Lease {namespace}/{name}: could not confirm a renewal in time, or another replica holds it"
    )]
    Lost { namespace: String, name: String },
    #[error("--lease-duration must be at least 2 seconds (it is {secs}s)")]
    Duration { secs: u64 },
    #[error("setting up the leader Lease {namespace}/{name}: {message}")]
    Setup {
        namespace: String,
        name: String,
        message: String,
    },
}

/// What a read of the Lease showed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    holder: Option<String>,
    renew_time: Option<String>,
}

pub struct Elector {
    manager: LeaseManager,
    api: Api<Lease>,
    namespace: String,
    name: String,
    identity: String,
    duration: Duration,
    /// When the attempt that took the Lease began: the acquisition was written after it.
    attempt_started: std::sync::Mutex<Option<Instant>>,
}

/// A client for leader election only: no call may outlast a quarter of the lease duration.
pub fn client_for(config: &kube::Config, duration: Duration) -> Result<Client, kube::Error> {
    let mut config = config.clone();
    let limit = (duration / 4).max(Duration::from_millis(250));
    config.connect_timeout = Some(limit);
    config.read_timeout = Some(limit);
    config.write_timeout = Some(limit);
    Client::try_from(config)
}

impl Elector {
    pub async fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Result<Self, LeaderError> {
        let secs = duration.as_secs();
        if secs < 2 {
            return Err(LeaderError::Duration { secs });
        }
        // Renew every half duration: grace = ceil(d/2), always in 1..d.
        let params = LeaseParams::new(identity, secs, secs.div_ceil(2))
            .with_field_manager("stowage-coordinator-lease");
        let manager = LeaseManager::new(
            client.clone(),
            name,
            namespace,
            params,
            LeaseCreateMode::AutoCreate,
        )
        .await
        .map_err(|e| LeaderError::Setup {
            namespace: namespace.into(),
            name: name.into(),
            message: e.to_string(),
        })?;
        Ok(Self {
            manager,
            api: Api::namespaced(client, namespace),
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            duration: Duration::from_secs(secs),
            attempt_started: std::sync::Mutex::new(None),
        })
    }

    fn poll(&self) -> Duration {
        self.duration / 8
    }

    async fn read(&self) -> Option<Seen> {
        let lease = tokio::time::timeout(self.duration / 4, self.api.get_opt(&self.name))
            .await
            .ok()?
            .ok()?;
        let spec = lease.and_then(|l| l.spec).unwrap_or_default();
        Some(Seen {
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            renew_time: spec.renew_time.map(|t| t.0.to_string()),
        })
    }

    /// Waits until the Lease is free or ours, or has stayed unchanged for a whole lease duration by
    /// this replica's monotonic clock.
    async fn wait_takeable(&self) {
        let mut last: Option<(Seen, Instant)> = None;
        loop {
            if let Some(seen) = self.read().await {
                let mine = seen.holder.as_deref() == Some(self.identity.as_str());
                if seen.holder.is_none() || mine {
                    return;
                }
                match &last {
                    Some((prev, since)) if *prev == seen => {
                        if since.elapsed() >= self.duration {
                            tracing::info!(lease = %self.name, holder = ?seen.holder, "the Lease has not been renewed for a lease duration; taking it");
                            return;
                        }
                    }
                    _ => last = Some((seen, Instant::now())),
                }
            }
            tokio::time::sleep(self.poll()).await;
        }
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&self) {
        loop {
            self.wait_takeable().await;
            if let Ok(mut t) = self.attempt_started.lock() {
                *t = Some(Instant::now());
            }
            match tokio::time::timeout(self.duration, self.manager.changed()).await {
                Ok(Ok(true)) => {
                    tracing::info!(lease = %self.name, identity = %self.identity, "became leader");
                    return;
                }
                Ok(Ok(false)) | Err(_) => {
                    tracing::debug!(lease = %self.name, "standing by: another replica leads")
                }
                Ok(Err(e)) => tracing::warn!(lease = %self.name, error = %e, "leader election"),
            }
        }
    }

    /// Keeps the Lease renewed; returns when leadership must end (lost, or not confirmed in time).
    pub async fn keep(&self) -> LeaderError {
        let renew = async {
            loop {
                match self.manager.changed().await {
                    Ok(false) => return,
                    Ok(true) => {}
                    Err(e) => {
                        tracing::warn!(lease = %self.name, error = %e, "renewing the Lease");
                        tokio::time::sleep(self.poll()).await;
                    }
                }
            }
        };
        tokio::select! {
            () = renew => {}
            () = self.watchdog() => {}
        }
        LeaderError::Lost {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    /// Returns when this replica can no longer be sure no one else leads.
    async fn watchdog(&self) {
        let margin = self.duration / 8;
        let mut previous_start = self
            .attempt_started
            .lock()
            .ok()
            .and_then(|t| *t)
            .unwrap_or_else(Instant::now);
        let mut previous: Option<Seen> = None;
        let mut safe_until = previous_start + self.duration - margin;
        loop {
            let start = Instant::now();
            match self.read().await {
                Some(seen) if seen.holder.as_deref() != Some(self.identity.as_str()) => {
                    tracing::warn!(lease = %self.name, holder = ?seen.holder, "another replica holds the Lease");
                    return;
                }
                // A renewal landed after the previous read started.
                Some(seen) if previous.as_ref() != Some(&seen) => {
                    safe_until = previous_start + self.duration - margin;
                    previous = Some(seen);
                }
                Some(_) | None => {}
            }
            if Instant::now() >= safe_until {
                tracing::warn!(lease = %self.name, "no renewal of the Lease confirmed in time; stepping down");
                return;
            }
            previous_start = start;
            let next = (start + self.poll()).min(safe_until);
            tokio::time::sleep_until(next).await;
        }
    }

    /// Gives the Lease up (on shutdown) so a standby takes over without waiting for expiry.
    pub async fn release(&self) {
        match tokio::time::timeout(self.duration, self.manager.release()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(lease = %self.name, error = %e, "releasing the Lease"),
            Err(_) => tracing::warn!(lease = %self.name, "releasing the Lease timed out"),
        }
    }
}
