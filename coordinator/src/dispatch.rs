//! Calling a node agent: one volume backup, or one repository maintenance task, with its progress
//! stream. Failures become sentences a user can act on ("agent on node-2 unreachable: ...").

use futures::StreamExt;
use stowage_proto::v1::{
    BackupRequest, BackupResult, CheckRequest, CommandIdentity, CommandSource,
    EnsureRepositoryRequest, HookRequest, HookResult, InspectRequest, InspectResponse,
    MaintenanceResult, Progress, PruneRequest, Repository, RestoreCommandRequest, RestoreEvent,
    RestoreRequest, RestoreResult, Snapshot, SnapshotsRequest, VerifyRequest, VerifyResult,
    VolumeIdentity, VolumeRef, VolumeSource, backup_event, backup_request, maintenance_event,
    restore_event, verify_event,
};
use tonic::Code;

use crate::agents::{AgentDirectory, AgentEndpoint, AgentUnavailable};

/// The agent tags every snapshot with `stowage.dev/run=<run id>`, so a resumed run can tell what
/// it already backed up.
pub use stowage_api::contract::{TAG_PARTIAL, TAG_RUN};

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error(transparent)]
    Unavailable(#[from] AgentUnavailable),
    #[error("agent on node {node} ({uri}) is unreachable: {message}")]
    Unreachable {
        node: String,
        uri: String,
        message: String,
    },
    #[error("lost the agent on node {node} ({uri}) during the operation: {message}")]
    Lost {
        node: String,
        uri: String,
        message: String,
    },
    #[error("agent on node {node}: {message}")]
    Agent {
        node: String,
        code: Code,
        message: String,
    },
    #[error("agent on node {node} ended the stream without a result (it may have restarted)")]
    NoResult { node: String },
    #[error("agent on node {node} did not answer within {seconds} s")]
    TimedOut { node: String, seconds: u64 },
}

impl DispatchError {
    /// Whether another agent could do the same work (maintenance tries the next one).
    pub fn try_elsewhere(&self) -> bool {
        matches!(
            self,
            DispatchError::Unavailable(_)
                | DispatchError::Unreachable { .. }
                | DispatchError::TimedOut { .. }
        )
    }

    fn from_status(ep: &AgentEndpoint, s: tonic::Status) -> Self {
        // A refused connection is UNAVAILABLE; a connection reset mid-stream (the agent died)
        // surfaces as UNKNOWN with a transport error.
        let transport = s.code() == Code::Unknown
            && (s.message().contains("transport") || s.message().contains("connection"));
        match s.code() {
            Code::Unavailable => DispatchError::Unreachable {
                node: ep.node.clone(),
                uri: ep.uri.clone(),
                message: s.message().to_string(),
            },
            _ if transport => DispatchError::Unreachable {
                node: ep.node.clone(),
                uri: ep.uri.clone(),
                message: s.message().to_string(),
            },
            // An agent older than this coordinator answers calls it does not know with an empty
            // Unimplemented: say so rather than nothing.
            Code::Unimplemented if s.message().is_empty() => DispatchError::Agent {
                node: ep.node.clone(),
                code: Code::Unimplemented,
                message: "the agent does not know this call (is it older than the coordinator? upgrade the agents)".into(),
            },
            code => DispatchError::Agent {
                node: ep.node.clone(),
                code,
                message: s.message().to_string(),
            },
        }
    }

    /// An error on a stream that had started: a broken connection means the agent went away.
    fn mid_stream(ep: &AgentEndpoint, s: tonic::Status) -> Self {
        match Self::from_status(ep, s) {
            DispatchError::Unreachable { node, uri, message } => {
                DispatchError::Lost { node, uri, message }
            }
            other => other,
        }
    }
}

/// One volume to back up, where it is. No `Debug`: the repository carries secrets.
#[derive(Clone)]
pub struct VolumeJob {
    /// `<namespace>/<name>` of the run.
    pub run_id: String,
    pub repository: Repository,
    pub namespace: String,
    pub pvc: String,
    pub pod: String,
    pub pod_uid: String,
    pub volume_name: String,
    pub node: String,
    /// restic `--exclude` patterns, relative to the volume root.
    pub excludes: Vec<String>,
}

/// One backup command, where it runs. No `Debug`: the repository carries secrets.
#[derive(Clone)]
pub struct CommandJob {
    pub run_id: String,
    pub repository: Repository,
    pub namespace: String,
    pub pod: String,
    pub node: String,
    /// Empty: the pod's first container.
    pub container: String,
    pub command: String,
    pub file_name: String,
    pub timeout_seconds: u32,
    pub owner_kind: String,
    pub owner_name: String,
}

/// The exit status a failed command's error carries (gRPC metadata `stowage-exit-code`).
pub fn exit_code_of(s: &tonic::Status) -> Option<i32> {
    s.metadata()
        .get("stowage-exit-code")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Streams a command's stdout into a snapshot through the agent of the pod's node.
pub async fn backup_command(
    agents: &AgentDirectory,
    job: &CommandJob,
    mut on_progress: impl FnMut(&Progress),
) -> Result<BackupResult, (DispatchError, Option<i32>)> {
    let ep = agents.endpoint(&job.node).map_err(|e| (e.into(), None))?;
    let mut client = agents.client(&ep).map_err(|e| (e.into(), None))?;
    let req = BackupRequest {
        run_id: job.run_id.clone(),
        repository: Some(job.repository.clone()),
        identity: Some(VolumeIdentity {
            namespace: job.namespace.clone(),
            pvc: String::new(),
            pod_name: job.pod.clone(),
        }),
        source: Some(backup_request::Source::Command(CommandSource {
            pod: job.pod.clone(),
            container: job.container.clone(),
            command: job.command.clone(),
            file_name: job.file_name.clone(),
            timeout_seconds: job.timeout_seconds,
            owner_kind: job.owner_kind.clone(),
            owner_name: job.owner_name.clone(),
        })),
        extra_tags: Vec::new(),
        excludes: Vec::new(),
    };
    let mut stream = client
        .backup(req)
        .await
        .map_err(|s| (DispatchError::from_status(&ep, s), None))?
        .into_inner();
    while let Some(ev) = stream.next().await {
        let ev = ev.map_err(|s| {
            let code = exit_code_of(&s);
            (DispatchError::mid_stream(&ep, s), code)
        })?;
        match ev.event {
            Some(backup_event::Event::Progress(p)) => on_progress(&p),
            Some(backup_event::Event::Result(r)) => return Ok(r),
            None => {}
        }
    }
    Err((DispatchError::NoResult { node: ep.node }, None))
}

/// Runs a hook through the agent of `node`, within `within`.
pub async fn run_hook(
    agents: &AgentDirectory,
    node: &str,
    req: HookRequest,
    within: std::time::Duration,
) -> Result<HookResult, DispatchError> {
    let ep = agents.endpoint(node)?;
    let mut client = agents.client(&ep)?;
    unary_within(&ep, within, client.run_hook(req)).await
}

/// One key step (or a look) on the agent at `ep`, within `within`.
pub async fn keys(
    agents: &AgentDirectory,
    ep: &AgentEndpoint,
    req: stowage_proto::v1::KeysRequest,
    within: std::time::Duration,
) -> Result<stowage_proto::v1::KeysResponse, DispatchError> {
    let mut client = agents.client(ep)?;
    unary_within(ep, within, client.keys(req)).await
}

/// A unary call to the agent at `ep`, bounded by `within`.
async fn unary_within<T>(
    ep: &AgentEndpoint,
    within: std::time::Duration,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, DispatchError> {
    match tokio::time::timeout(within, call).await {
        Ok(r) => Ok(r
            .map_err(|s| DispatchError::from_status(ep, s))?
            .into_inner()),
        Err(_) => Err(DispatchError::TimedOut {
            node: ep.node.clone(),
            seconds: within.as_secs(),
        }),
    }
}

pub async fn backup_volume(
    agents: &AgentDirectory,
    job: &VolumeJob,
    mut on_progress: impl FnMut(&Progress),
) -> Result<BackupResult, DispatchError> {
    let ep = agents.endpoint(&job.node)?;
    let mut client = agents.client(&ep)?;
    let req = BackupRequest {
        run_id: job.run_id.clone(),
        repository: Some(job.repository.clone()),
        identity: Some(VolumeIdentity {
            namespace: job.namespace.clone(),
            pvc: job.pvc.clone(),
            pod_name: job.pod.clone(),
        }),
        source: Some(backup_request::Source::Volume(VolumeSource {
            r#ref: Some(VolumeRef {
                pod_uid: job.pod_uid.clone(),
                volume_name: job.volume_name.clone(),
            }),
        })),
        // The agent tags the snapshot with the run id (TAG_RUN).
        extra_tags: Vec::new(),
        excludes: job.excludes.clone(),
    };
    let mut stream = client
        .backup(req)
        .await
        .map_err(|s| DispatchError::from_status(&ep, s))?
        .into_inner();
    while let Some(ev) = stream.next().await {
        match ev.map_err(|s| DispatchError::mid_stream(&ep, s))?.event {
            Some(backup_event::Event::Progress(p)) => on_progress(&p),
            Some(backup_event::Event::Result(r)) => return Ok(r),
            None => {}
        }
    }
    Err(DispatchError::NoResult { node: ep.node })
}

/// Opens (and, when `auto_init` is set, creates) the repository through the agent of `node`.
pub async fn ensure_repository(
    agents: &AgentDirectory,
    node: &str,
    repository: &Repository,
) -> Result<(), DispatchError> {
    let ep = agents.endpoint(node)?;
    let mut client = agents.client(&ep)?;
    client
        .ensure_repository(EnsureRepositoryRequest {
            repository: Some(repository.clone()),
        })
        .await
        .map_err(|s| DispatchError::from_status(&ep, s))?;
    Ok(())
}

/// The identity's snapshots made by run `run_id` (a resumed run skips those volumes).
pub async fn snapshots_of_run(
    agents: &AgentDirectory,
    node: &str,
    repository: &Repository,
    namespace: &str,
    pvc: &str,
    run_id: &str,
) -> Result<Vec<Snapshot>, DispatchError> {
    let req = SnapshotsRequest {
        repository: Some(repository.clone()),
        identity: Some(VolumeIdentity {
            namespace: namespace.into(),
            pvc: pvc.into(),
            pod_name: String::new(),
        }),
        command: None,
    };
    of_run(agents, node, req, run_id).await
}

/// The command identity's snapshots made by run `run_id` (a resumed run does not run a command
/// that already made its snapshot again).
pub async fn command_snapshots_of_run(
    agents: &AgentDirectory,
    node: &str,
    repository: &Repository,
    identity: CommandIdentity,
    run_id: &str,
) -> Result<Vec<Snapshot>, DispatchError> {
    let req = SnapshotsRequest {
        repository: Some(repository.clone()),
        identity: None,
        command: Some(identity),
    };
    of_run(agents, node, req, run_id).await
}

async fn of_run(
    agents: &AgentDirectory,
    node: &str,
    req: SnapshotsRequest,
    run_id: &str,
) -> Result<Vec<Snapshot>, DispatchError> {
    let tag = format!("{TAG_RUN}={run_id}");
    Ok(snapshots(agents, node, req, SNAPSHOTS_TIMEOUT)
        .await?
        .into_iter()
        .filter(|s| s.tags.contains(&tag))
        .collect())
}

/// Listing snapshots waits at most this long (the agent's slot included).
pub const SNAPSHOTS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// The snapshots `req` selects, listed by the agent of `node` within `within`.
pub async fn snapshots(
    agents: &AgentDirectory,
    node: &str,
    req: SnapshotsRequest,
    within: std::time::Duration,
) -> Result<Vec<Snapshot>, DispatchError> {
    let ep = agents.endpoint(node)?;
    let mut client = agents.client(&ep)?;
    Ok(unary_within(&ep, within, client.snapshots(req))
        .await?
        .snapshots)
}

/// Restores a snapshot into a volume on `node` (the agent's own deadlines bound it).
pub async fn restore_volume(
    agents: &AgentDirectory,
    node: &str,
    req: RestoreRequest,
    on_progress: impl FnMut(&Progress),
) -> Result<RestoreResult, (DispatchError, Option<i32>)> {
    let ep = agents.endpoint(node).map_err(|e| (e.into(), None))?;
    let mut client = agents.client(&ep).map_err(|e| (e.into(), None))?;
    let stream = client.restore(req).await;
    follow_restore(&ep, stream, on_progress).await
}

/// Runs one drill on `node` (the agent's own deadlines bound it), with its progress.
pub async fn verify(
    agents: &AgentDirectory,
    node: &str,
    req: VerifyRequest,
    mut on_progress: impl FnMut(&Progress),
) -> Result<VerifyResult, DispatchError> {
    let ep = agents.endpoint(node)?;
    let mut client = agents.client(&ep)?;
    let mut stream = client
        .verify(req)
        .await
        .map_err(|s| DispatchError::from_status(&ep, s))?
        .into_inner();
    while let Some(ev) = stream.next().await {
        match ev.map_err(|s| DispatchError::mid_stream(&ep, s))?.event {
            Some(verify_event::Event::Progress(p)) => on_progress(&p),
            Some(verify_event::Event::Result(r)) => return Ok(r),
            None => {}
        }
    }
    Err(DispatchError::NoResult { node: ep.node })
}

/// Streams a backup command's snapshot into a restore command in a pod on `node`.
pub async fn restore_command(
    agents: &AgentDirectory,
    node: &str,
    req: RestoreCommandRequest,
    on_progress: impl FnMut(&Progress),
) -> Result<RestoreResult, (DispatchError, Option<i32>)> {
    let ep = agents.endpoint(node).map_err(|e| (e.into(), None))?;
    let mut client = agents.client(&ep).map_err(|e| (e.into(), None))?;
    let stream = client.restore_command(req).await;
    follow_restore(&ep, stream, on_progress).await
}

/// Progress, then the result; a command's exit status comes with its error.
async fn follow_restore(
    ep: &AgentEndpoint,
    started: Result<tonic::Response<tonic::Streaming<RestoreEvent>>, tonic::Status>,
    mut on_progress: impl FnMut(&Progress),
) -> Result<RestoreResult, (DispatchError, Option<i32>)> {
    let mut stream = started
        .map_err(|s| {
            let code = exit_code_of(&s);
            (DispatchError::from_status(ep, s), code)
        })?
        .into_inner();
    while let Some(ev) = stream.next().await {
        let ev = ev.map_err(|s| {
            let code = exit_code_of(&s);
            (DispatchError::mid_stream(ep, s), code)
        })?;
        match ev.event {
            Some(restore_event::Event::Progress(p)) => on_progress(&p),
            Some(restore_event::Event::Result(r)) => return Ok(r),
            None => {}
        }
    }
    Err((
        DispatchError::NoResult {
            node: ep.node.clone(),
        },
        None,
    ))
}

/// The repository's locks, and its figures when `figures` is set, read by the agent of `node`
/// within `within`.
pub async fn inspect(
    agents: &AgentDirectory,
    node: &str,
    repository: &Repository,
    figures: bool,
    within: std::time::Duration,
) -> Result<InspectResponse, DispatchError> {
    let ep = agents.endpoint(node)?;
    let mut client = agents.client(&ep)?;
    let call = client.inspect(InspectRequest {
        repository: Some(repository.clone()),
        figures,
    });
    unary_within(&ep, within, call).await
}

pub enum Maintenance {
    Check(CheckRequest),
    Prune(PruneRequest),
}

/// Runs a maintenance task on the agent of `node`.
pub async fn maintain(
    agents: &AgentDirectory,
    node: &str,
    task: &Maintenance,
    on_progress: impl FnMut(&Progress),
) -> Result<MaintenanceResult, DispatchError> {
    let ep = agents.endpoint(node)?;
    maintain_at(agents, ep, task, on_progress).await
}

/// Runs a maintenance task on the agent at `ep` (a node's, or the maintenance container).
pub async fn maintain_at(
    agents: &AgentDirectory,
    ep: AgentEndpoint,
    task: &Maintenance,
    mut on_progress: impl FnMut(&Progress),
) -> Result<MaintenanceResult, DispatchError> {
    let mut client = agents.client(&ep)?;
    let resp = match task {
        Maintenance::Check(r) => client.check(r.clone()).await,
        Maintenance::Prune(r) => client.prune(r.clone()).await,
    };
    let mut stream = resp
        .map_err(|s| DispatchError::from_status(&ep, s))?
        .into_inner();
    while let Some(ev) = stream.next().await {
        match ev.map_err(|s| DispatchError::mid_stream(&ep, s))?.event {
            Some(maintenance_event::Event::Progress(p)) => on_progress(&p),
            Some(maintenance_event::Event::Result(r)) => return Ok(r),
            None => {}
        }
    }
    Err(DispatchError::NoResult { node: ep.node })
}
