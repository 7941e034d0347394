//! One backup command of a Backup run: the agent of the pod's node execs it and streams its stdout
//! into a snapshot. Like a volume, it waits for the run's slots and always ends in an item; a
//! command that did not exit 0 is a failed item with its exit status and stderr, and no snapshot.
//! Like a volume, a command whose snapshot this run already made (before a coordinator restart)
//! is not run again: a database dump runs once per run.

use std::sync::Arc;

use super::status::StatusHandle;
use super::volume::Limits;
use crate::conditions::Finding;
use crate::context::Ctx;
use crate::dispatch::{self, CommandJob};
use crate::prebackup_pod;
use stowage_api::{Backup, CommandItem, ItemStatus, PreBackupPod, RunPhase};

pub struct CommandTask {
    pub run: Arc<Backup>,
    pub job: CommandJob,
    /// A PreBackupPod to start first (then the job's pod, node and container are its pod's).
    pub prebackup: Option<Arc<PreBackupPod>>,
    /// The run resumed after a restart: look for a snapshot this run already made.
    pub resumed: bool,
}

impl CommandTask {
    /// The item as planned: the command's identity and what it runs.
    pub fn item(job: &CommandJob) -> ItemStatus {
        ItemStatus {
            namespace: job.namespace.clone(),
            pvc: String::new(),
            pod: Some(job.pod.clone()),
            node: Some(job.node.clone()),
            phase: RunPhase::Pending,
            command: Some(CommandItem {
                owner: format!("{}/{}", job.owner_kind, job.owner_name),
                container: job.container.clone(),
                command: crate::errors::bounded(&job.command, crate::errors::COMMAND_SHOWN_MAX),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    pub async fn run(
        mut self,
        ctx: Arc<Ctx>,
        limits: Arc<Limits>,
        status: StatusHandle,
    ) -> ItemStatus {
        if self.resumed
            && let Some(done) = self.already_done(&ctx).await
        {
            return done;
        }
        let Some(pbp) = self.prebackup.clone() else {
            return self.stream(ctx, limits, status).await;
        };
        let mut item = Self::item(&self.job);
        let started = prebackup_pod::start(
            &ctx.client,
            &ctx.stores.pods,
            &ctx.prebackup_starting,
            self.run.as_ref(),
            pbp.as_ref(),
            &ctx.agents.ready_nodes(),
            ctx.config.prebackup_pod_timeout,
            ctx.config.allow_privileged_prebackup_pods,
        )
        .await;
        match started {
            Ok(s) => {
                self.job.pod = s.pod.clone();
                self.job.node = s.node;
                self.job.container = s.container;
                let namespace = self.job.namespace.clone();
                let outcome = self.stream(Arc::clone(&ctx), limits, status).await;
                prebackup_pod::release(&ctx.client, &namespace, &s.pod).await;
                outcome
            }
            Err(e) => {
                item.phase = RunPhase::Failed;
                item.error = Some(crate::errors::bounded(&e, crate::errors::ITEM_ERROR_MAX));
                item
            }
        }
    }

    /// The item as this run already made it, if a snapshot of the command identity tagged with
    /// the run exists (looked up through any ready agent: a PreBackupPod has no node yet).
    async fn already_done(&self, ctx: &Ctx) -> Option<ItemStatus> {
        let node = if self.job.node.is_empty() {
            ctx.agents.ready_nodes().first()?.clone()
        } else {
            self.job.node.clone()
        };
        let identity = stowage_proto::v1::CommandIdentity {
            namespace: self.job.namespace.clone(),
            owner_kind: self.job.owner_kind.clone(),
            owner_name: self.job.owner_name.clone(),
            container: self.job.container.clone(),
        };
        let found = dispatch::command_snapshots_of_run(
            &ctx.agents,
            &node,
            &self.job.repository,
            identity,
            &self.job.run_id,
        )
        .await;
        let snaps = match found {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(run = %self.job.run_id, owner = %self.job.owner_name, error = %e, "could not look for an earlier snapshot; running the command");
                return None;
            }
        };
        let done = snaps.last()?;
        tracing::info!(run = %self.job.run_id, namespace = %self.job.namespace, owner = %self.job.owner_name, snapshot = %done.id, "the command's snapshot was made by this run before the restart; not running it again");
        let mut item = Self::item(&self.job);
        item.phase = RunPhase::Succeeded;
        item.snapshot_id = Some(done.short_id.clone());
        Some(item)
    }

    /// The command in its pod, streamed by the agent of its node.
    async fn stream(self, ctx: Arc<Ctx>, limits: Arc<Limits>, status: StatusHandle) -> ItemStatus {
        let mut item = Self::item(&self.job);
        let _cluster = limits.cluster.acquire().await;
        let node_limit = limits.node(&self.job.node);
        let _node = node_limit.acquire().await;
        item.phase = RunPhase::Running;
        status.item(item.clone());
        let key = (item.namespace.clone(), item.name());
        let mut lock_wait = super::LockWait::new(key);
        let r = dispatch::backup_command(&ctx.agents, &self.job, |p| {
            lock_wait.progress(&ctx, &self.run, &status, p);
        })
        .await;
        let command = item.command.get_or_insert_with(Default::default);
        match r {
            Ok(r) => {
                command.exit_code = Some(r.exit_code);
                command.stream_bytes = Some(r.stream_bytes);
                super::volume::record(&mut item, &r);
                item
            }
            Err((e, exit_code)) => {
                command.exit_code = exit_code;
                let message = e.to_string();
                tracing::warn!(run = %self.job.run_id, pod = %self.job.pod, error = %message, "backup command failed");
                let f = Finding::new(
                    "BackupCommandFailed",
                    format!("{}/{}: {message}", self.job.namespace, self.job.pod),
                );
                ctx.notifier.warn(self.run.as_ref(), "Backup", &f).await;
                item.phase = RunPhase::Failed;
                item.percent_done = None;
                item.error = Some(crate::errors::bounded(
                    &message,
                    crate::errors::ITEM_ERROR_MAX,
                ));
                item
            }
        }
    }
}
