//! The gRPC service: validates synchronously (so bad requests fail the call itself), then runs the
//! operation in a task that streams progress and exactly one final result or error.
//!
//! Length: one gRPC method per operation, each a few lines that hand over to its module; the table of the API.

use std::future::Future;
use std::sync::Arc;

use stowage_proto::v1::agent_server::Agent;
use stowage_proto::v1::{
    BackupEvent, BackupRequest, CheckRequest, EnsureRepositoryRequest, EnsureRepositoryResponse,
    HookRequest, HookResult, InspectRequest, InspectResponse, KeysRequest, KeysResponse,
    ListVolumesRequest, ListVolumesResponse, MaintenanceEvent, Progress, PruneRequest,
    RestoreCommandRequest, RestoreEvent, RestoreRequest, RestoreResult, Snapshot, SnapshotsRequest,
    SnapshotsResponse, VerifyEvent, VerifyRequest, Volume, VolumeRef, backup_event, restore_event,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};

use crate::context::{AgentContext, ProgressSink};
use crate::error::AgentError;
use crate::identity::CommandIdentity;
use crate::identity::{Identity, TAG_NAMESPACE, TAG_POD, TAG_PVC};
use crate::maintenance::{self, MaintenancePlan};
use crate::memory::Operation;
use crate::{backup, command, hook, inspect, keys, repository, restore, restore_command, verify};

pub struct AgentService {
    ctx: Arc<AgentContext>,
    tasks: TaskTracker,
}

impl AgentService {
    pub fn new(ctx: Arc<AgentContext>, tasks: TaskTracker) -> Self {
        Self { ctx, tasks }
    }

    /// Runs `op` in a tracked task, cancelled when the client hangs up or the agent shuts down.
    fn stream<T, R, F, Fut>(
        &self,
        wrap_progress: fn(Progress) -> T,
        wrap_result: fn(R) -> T,
        op: F,
    ) -> ReceiverStream<Result<T, Status>>
    where
        T: Send + 'static,
        R: Send + 'static,
        F: FnOnce(Arc<AgentContext>, ProgressSink, CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = Result<R, AgentError>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(64);
        let cancel = self.ctx.shutdown.child_token();
        let done = CancellationToken::new();
        // The client going away (stream dropped) cancels the work, which kills restic.
        let (watch_tx, watch_cancel, watch_done) = (tx.clone(), cancel.clone(), done.clone());
        self.tasks.spawn(async move {
            tokio::select! {
                _ = watch_tx.closed() => watch_cancel.cancel(),
                _ = watch_done.cancelled() => {}
            }
        });
        let ctx = Arc::clone(&self.ctx);
        let progress = ProgressSink::new(tx.clone(), wrap_progress);
        self.tasks.spawn(async move {
            let result = op(ctx, progress, cancel).await;
            let _ = match result {
                Ok(r) => tx.send(Ok(wrap_result(r))).await,
                Err(e) => tx.send(Err(Status::from(e))).await,
            };
            done.cancel();
        });
        ReceiverStream::new(rx)
    }
}

impl AgentService {
    /// A slot under the node's limits for a unary call, bounded by the stall timeout: a unary
    /// caller has no progress stream to see that it queues.
    async fn slot(
        &self,
        op: Operation,
        namespace: &str,
        repo: &restic_wrap::Repository,
    ) -> Result<crate::limiter::Slot, Status> {
        let need = self.ctx.memory_estimate(op, repo);
        let acquire = self.ctx.limiter.acquire(namespace, need);
        match tokio::time::timeout(self.ctx.limits.stall, acquire).await {
            Ok(Some(slot)) => Ok(slot),
            Ok(None) => Err(AgentError::ShuttingDown.into()),
            Err(_) => Err(Status::resource_exhausted(format!(
                "no free slot on node {} within {}; every slot is busy",
                self.ctx.node_name,
                restic_wrap::error::human(self.ctx.limits.stall)
            ))),
        }
    }

    /// Both kinds of restore: validated up front (a refusal counts as a failed restore), then
    /// streamed, each outcome counted in `stowage_agent_restores_total`.
    fn restore_stream<P, F, Fut>(
        &self,
        plan: Result<P, AgentError>,
        what: &'static str,
        execute: F,
    ) -> Result<Response<ReceiverStream<Result<RestoreEvent, Status>>>, Status>
    where
        P: Send + 'static,
        F: FnOnce(Arc<AgentContext>, P, ProgressSink, CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = Result<RestoreResult, AgentError>> + Send + 'static,
    {
        let plan = plan.inspect_err(|_| {
            self.ctx
                .metrics
                .restores
                .with_label_values(&["failed"])
                .inc();
        })?;
        let stream = self.stream(
            restore::progress_event,
            |r| RestoreEvent {
                event: Some(restore_event::Event::Result(r)),
            },
            move |ctx, progress, cancel| async move {
                let r = execute(Arc::clone(&ctx), plan, progress, cancel).await;
                ctx.metrics
                    .restores
                    .with_label_values(&[result_label(&r, false)])
                    .inc();
                if let Err(e) = &r {
                    tracing::warn!(error = %e, "{what} failed");
                }
                r
            },
        );
        Ok(Response::new(stream))
    }

    /// Check and Prune share one path: validated up front, then streamed like backups.
    fn maintain(
        &self,
        plan: Result<MaintenancePlan, AgentError>,
    ) -> Result<Response<ReceiverStream<Result<MaintenanceEvent, Status>>>, Status> {
        let plan = plan.inspect_err(|e| {
            tracing::warn!(error = %e, "maintenance request refused");
        })?;
        let kind = plan.kind();
        let stream = self.stream(
            maintenance::progress_event,
            maintenance::result_event,
            move |ctx, progress, cancel| async move {
                let r = maintenance::execute(&ctx, plan, progress, cancel).await;
                ctx.metrics
                    .maintenance
                    .with_label_values(&[kind, result_label(&r, false)])
                    .inc();
                match &r {
                    Ok(m) => tracing::info!(kind, seconds = m.duration_seconds, "maintenance done"),
                    Err(e) => tracing::warn!(kind, error = %e, "maintenance failed"),
                }
                r
            },
        );
        Ok(Response::new(stream))
    }
}

impl AgentService {
    /// A backup of a command's stdout: validated here, streamed like a volume backup.
    fn command_backup(
        &self,
        req: BackupRequest,
    ) -> Result<Response<ReceiverStream<Result<BackupEvent, Status>>>, Status> {
        let plan = command::plan(&self.ctx, req).inspect_err(|_| {
            self.ctx
                .metrics
                .backups
                .with_label_values(&["failed"])
                .inc();
        })?;
        let stream = self.stream(
            backup::progress_event,
            |r| BackupEvent {
                event: Some(backup_event::Event::Result(r)),
            },
            move |ctx, progress, cancel| async move {
                let started = std::time::Instant::now();
                let r = command::execute(&ctx, plan, progress, cancel).await;
                let command_result = match &r {
                    Ok(_) => "succeeded",
                    Err(AgentError::CommandTimedOut { .. }) => "timed_out",
                    Err(_) => "failed",
                };
                ctx.metrics
                    .hook_runs
                    .with_label_values(&["backup-command", command_result])
                    .inc();
                ctx.metrics
                    .hook_duration
                    .with_label_values(&["backup-command"])
                    .observe(started.elapsed().as_secs_f64());
                ctx.metrics
                    .backups
                    .with_label_values(&[result_label(&r, false)])
                    .inc();
                r
            },
        );
        Ok(Response::new(stream))
    }
}

/// Metric label for how an operation ended.
fn result_label(r: &Result<impl Sized, AgentError>, partial: bool) -> &'static str {
    result_label_of(r, if partial { "partial" } else { "succeeded" })
}

fn result_label_of(r: &Result<impl Sized, AgentError>, ok: &'static str) -> &'static str {
    match r {
        Ok(_) => ok,
        Err(AgentError::Cancelled | AgentError::ShuttingDown) => "cancelled",
        Err(_) => "failed",
    }
}

impl AgentService {
    /// Refuses a volume operation on a maintenance-only agent (`--maintenance-only`).
    fn volumes_served(&self, what: &str) -> Result<(), Status> {
        if self.ctx.maintenance_only {
            return Err(Status::failed_precondition(format!(
                "this agent maintains repositories only (--maintenance-only) and serves no {what}"
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn list_volumes(
        &self,
        _req: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        self.volumes_served("volumes")?;
        let volumes = self
            .ctx
            .inventory
            .list()
            .into_iter()
            .map(|v| Volume {
                r#ref: Some(VolumeRef {
                    pod_uid: v.pod_uid,
                    volume_name: v.volume_name,
                }),
                plugin: v.plugin,
                path: v.data_dir.display().to_string(),
                mounted: v.mounted,
            })
            .collect();
        Ok(Response::new(ListVolumesResponse {
            node_name: self.ctx.node_name.clone(),
            volumes,
        }))
    }

    type BackupStream = ReceiverStream<Result<BackupEvent, Status>>;

    async fn backup(
        &self,
        req: Request<BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        self.volumes_served("backups")?;
        let req = req.into_inner();
        if matches!(
            req.source,
            Some(stowage_proto::v1::backup_request::Source::Command(_))
        ) {
            return self.command_backup(req);
        }
        let plan = backup::plan(&self.ctx, req).inspect_err(|_| {
            self.ctx
                .metrics
                .backups
                .with_label_values(&["failed"])
                .inc();
        })?;
        let stream = self.stream(
            backup::progress_event,
            |r| BackupEvent {
                event: Some(backup_event::Event::Result(r)),
            },
            move |ctx, progress, cancel| async move {
                let r = backup::execute(&ctx, plan, progress, cancel).await;
                let ok = match r.as_ref().map(|r| r.outcome()) {
                    Ok(stowage_proto::v1::Outcome::Partial) => "partial",
                    Ok(stowage_proto::v1::Outcome::Skipped) => "skipped",
                    _ => "succeeded",
                };
                ctx.metrics
                    .backups
                    .with_label_values(&[result_label_of(&r, ok)])
                    .inc();
                if let Err(e) = &r {
                    tracing::warn!(error = %e, "backup failed");
                }
                r
            },
        );
        Ok(Response::new(stream))
    }

    type RestoreStream = ReceiverStream<Result<RestoreEvent, Status>>;

    async fn restore(
        &self,
        req: Request<RestoreRequest>,
    ) -> Result<Response<Self::RestoreStream>, Status> {
        self.volumes_served("restores")?;
        let plan = restore::plan(&self.ctx, req.into_inner());
        self.restore_stream(plan, "restore", |ctx, plan, progress, cancel| async move {
            restore::execute(&ctx, plan, progress, cancel).await
        })
    }

    type RestoreCommandStream = ReceiverStream<Result<RestoreEvent, Status>>;

    async fn restore_command(
        &self,
        req: Request<RestoreCommandRequest>,
    ) -> Result<Response<Self::RestoreCommandStream>, Status> {
        self.volumes_served("command restores")?;
        let plan = restore_command::plan(&self.ctx, req.into_inner());
        self.restore_stream(
            plan,
            "command restore",
            |ctx, plan, progress, cancel| async move {
                restore_command::execute(&ctx, plan, progress, cancel).await
            },
        )
    }

    type VerifyStream = ReceiverStream<Result<VerifyEvent, Status>>;

    async fn verify(
        &self,
        req: Request<VerifyRequest>,
    ) -> Result<Response<Self::VerifyStream>, Status> {
        self.volumes_served("drills")?;
        let plan = verify::plan(&self.ctx, req.into_inner()).inspect_err(|_| {
            self.ctx
                .metrics
                .verifies
                .with_label_values(&["failed"])
                .inc();
        })?;
        let stream = self.stream(
            verify::progress_event,
            verify::result_event,
            move |ctx, progress, cancel| async move {
                let r = verify::execute(&ctx, plan, progress, cancel).await;
                ctx.metrics
                    .verifies
                    .with_label_values(&[result_label(&r, false)])
                    .inc();
                match &r {
                    Ok(v) => ctx.metrics.verify_bytes.inc_by(v.bytes),
                    Err(e) => tracing::warn!(error = %e, "drill failed"),
                }
                r
            },
        );
        Ok(Response::new(stream))
    }

    async fn snapshots(
        &self,
        req: Request<SnapshotsRequest>,
    ) -> Result<Response<SnapshotsResponse>, Status> {
        let req = req.into_inner();
        let repo = repository::from_proto(req.repository.as_ref(), &self.ctx.local_roots)
            .map_err(AgentError::from)?;
        let tags = match (&req.identity, &req.command) {
            (Some(id), _) => Identity::from_proto(Some(id), false)
                .map_err(AgentError::from)?
                .selector_tags(),
            (None, Some(c)) => CommandIdentity::new(
                &c.namespace,
                &c.owner_kind,
                &c.owner_name,
                &c.container,
                // The pod is not part of the identity; any valid name selects the same snapshots.
                "any",
            )
            .map_err(AgentError::from)?
            .selector_tags(),
            (None, None) => Vec::new(),
        };
        // Through the node's limiter like every restic: a resumed 500-volume run asks for many.
        let namespace = match (&req.identity, &req.command) {
            (Some(id), _) => id.namespace.as_str(),
            (None, Some(c)) => c.namespace.as_str(),
            (None, None) => "",
        };
        let _slot = self.slot(Operation::Read, namespace, &repo).await?;
        let restic = self.ctx.restic(repo, req.repository.as_ref(), None);
        let opts = restic_wrap::options::SnapshotsOptions {
            tags,
            ..Default::default()
        };
        let snaps = restic.snapshots(&opts).await.map_err(AgentError::from)?;
        self.ctx
            .known_snapshots
            .remember(&restic.repository().location(), &snaps);
        let snapshots = snaps
            .into_iter()
            .map(|s| Snapshot {
                namespace: s.tag_value(TAG_NAMESPACE).unwrap_or_default().to_string(),
                pvc: s.tag_value(TAG_PVC).unwrap_or_default().to_string(),
                pod_name: s.tag_value(TAG_POD).unwrap_or_default().to_string(),
                id: s.id,
                short_id: s.short_id,
                time: s.time,
                hostname: s.hostname,
                tags: s.tags,
                parent: s.parent.unwrap_or_default(),
            })
            .collect();
        let response = SnapshotsResponse { snapshots };
        // The answer is one gRPC message, bounded both ways (stowage_proto::MESSAGE_MAX).
        let size = prost::Message::encoded_len(&response);
        if size > stowage_proto::MESSAGE_MAX {
            return Err(Status::resource_exhausted(format!(
                "the repository lists {} snapshots here ({} MiB), more than one answer may carry ({} MiB): select one identity, or forget old snapshots (a Prune)",
                response.snapshots.len(),
                size >> 20,
                stowage_proto::MESSAGE_MAX >> 20
            )));
        }
        Ok(Response::new(response))
    }

    type CheckStream = ReceiverStream<Result<MaintenanceEvent, Status>>;

    async fn check(
        &self,
        req: Request<CheckRequest>,
    ) -> Result<Response<Self::CheckStream>, Status> {
        let req = req.into_inner();
        tracing::info!(run = %req.run_id, "check requested");
        self.maintain(maintenance::plan_check(req, &self.ctx.local_roots))
    }

    type PruneStream = ReceiverStream<Result<MaintenanceEvent, Status>>;

    async fn prune(
        &self,
        req: Request<PruneRequest>,
    ) -> Result<Response<Self::PruneStream>, Status> {
        let req = req.into_inner();
        tracing::info!(run = %req.run_id, namespace = %req.namespace, dry_run = req.dry_run, "prune requested");
        self.maintain(maintenance::plan_prune(req, &self.ctx.local_roots))
    }

    async fn ensure_repository(
        &self,
        req: Request<EnsureRepositoryRequest>,
    ) -> Result<Response<EnsureRepositoryResponse>, Status> {
        let req = req.into_inner();
        let repo = repository::from_proto(req.repository.as_ref(), &self.ctx.local_roots)
            .map_err(AgentError::from)?;
        let auto_init = req.repository.as_ref().is_some_and(|r| r.auto_init);
        let _slot = self.slot(Operation::Read, "", &repo).await?;
        self.ctx
            .restic(repo, req.repository.as_ref(), None)
            .ensure_repository(auto_init)
            .await
            .map_err(AgentError::from)?;
        Ok(Response::new(EnsureRepositoryResponse {}))
    }

    async fn keys(&self, req: Request<KeysRequest>) -> Result<Response<KeysResponse>, Status> {
        // Bounded: each step is a few restic runs, each within the stall timeout (lock waits
        // included for the removal).
        let limit = self.ctx.lock_policy.max_wait + self.ctx.limits.stall * 4;
        match tokio::time::timeout(limit, keys::handle(&self.ctx, req.into_inner())).await {
            Ok(r) => Ok(Response::new(r?)),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "the key operation did not end within {}",
                restic_wrap::error::human(limit)
            ))),
        }
    }

    async fn run_hook(&self, req: Request<HookRequest>) -> Result<Response<HookResult>, Status> {
        self.volumes_served("hooks")?;
        let req = req.into_inner();
        // Bounded: the hook's own timeout plus the API calls around it.
        let limit = std::time::Duration::from_secs(u64::from(req.timeout_seconds.max(30)) + 120);
        match tokio::time::timeout(limit, hook::run(&self.ctx, req)).await {
            Ok(r) => Ok(Response::new(r?)),
            Err(_) => Err(Status::deadline_exceeded("the hook did not end in time")),
        }
    }

    async fn inspect(
        &self,
        req: Request<InspectRequest>,
    ) -> Result<Response<InspectResponse>, Status> {
        let req = req.into_inner();
        let repo = repository::from_proto(req.repository.as_ref(), &self.ctx.local_roots)
            .map_err(AgentError::from)?;
        // Locks are read without a slot: listing them is cheap and takes no lock, and they matter
        // most exactly when the node is busy waiting for them.
        let restic = self.ctx.restic(repo.clone(), req.repository.as_ref(), None);
        let (locks, unread_locks) = inspect::locks(&restic).await?;
        let figures = if req.figures {
            let _slot = self.slot(Operation::Read, "", &repo).await?;
            Some(inspect::figures(&restic.with_lock_wait(inspect::FIGURES_LOCK_WAIT)).await?)
        } else {
            None
        };
        Ok(Response::new(InspectResponse {
            locks,
            unread_locks,
            figures,
        }))
    }
}
