//! The agent's errors, and the gRPC status code each one deliberately maps to.

use tonic::{Code, Status};

use crate::identity::InvalidIdentity;
use crate::repository::InvalidRepository;
use crate::safe_fs::SafeFsError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("volume {volume_name:?} of pod {pod_uid:?} is not on node {node}")]
    VolumeNotFound {
        pod_uid: String,
        volume_name: String,
        node: String,
    },
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    InvalidIdentity(#[from] InvalidIdentity),
    #[error(transparent)]
    InvalidRepository(#[from] InvalidRepository),
    #[error("no snapshot {snapshot:?} of {whose} in the repository")]
    SnapshotNotFound { snapshot: String, whose: String },
    #[error("snapshot {snapshot} belongs to another volume ({found}), not {expected}")]
    SnapshotOfOtherVolume {
        snapshot: String,
        expected: String,
        found: String,
    },
    #[error(
        "the volume directory {dir} is no longer a mount point (the volume is being unmounted?); not backing up what is left behind"
    )]
    NotMounted { dir: String },
    #[error(
        "the volume directory {dir} is not a mount point (the pod went away, or the volume is being unmounted); restoring there would write into the node's own disk, so nothing was written"
    )]
    RestoreTargetNotMounted { dir: String },
    #[error(
        "{dir} holds the restore staging directory of another agent whose heartbeat is fresh: another restore into this volume is running, or an agent stopped less than {stale_after}s ago with its swap half done; nothing was written. Try again in a minute: a stopped agent's leftover is put right first"
    )]
    VolumeBusy { dir: String, stale_after: u64 },
    #[error("restore target {dir} is not empty (mode IntoEmpty)")]
    TargetNotEmpty { dir: String },
    #[error(
        "include path /{path} is not in snapshot {snapshot}; nothing was changed (a Replace would otherwise have deleted it)"
    )]
    IncludeNotInSnapshot { path: String, snapshot: String },
    #[error(
        "snapshot {snapshot} needs {needed} to restore, and every restore stages it inside the target volume first, but the volume has {free} free; restore into a larger PVC (target.pvc), free space in this one, or restore only some paths (include)"
    )]
    NoSpace {
        snapshot: String,
        needed: String,
        free: String,
    },
    #[error(transparent)]
    Path(#[from] SafeFsError),
    #[error(transparent)]
    Restic(#[from] restic_wrap::Error),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent is shutting down")]
    ShuttingDown,
    #[error("pod {namespace}/{pod} is not on node {node}")]
    PodNotFound {
        namespace: String,
        pod: String,
        node: String,
    },
    #[error(
        "this agent has no Kubernetes API access (no in-cluster service account or KUBECONFIG), so it cannot run commands in pods"
    )]
    NoKubernetes,
    #[error("Kubernetes API: {0}")]
    Kubernetes(String),
    /// `outcome` says what it means: "no snapshot was made", "the restore is incomplete".
    #[error("command {command} {how}; {outcome}{}", if stderr.is_empty() { String::new() } else { format!(". Its stderr: {stderr}") })]
    CommandFailed {
        command: String,
        exit_code: i32,
        how: String,
        stderr: String,
        outcome: &'static str,
    },
    #[error("command {command} did not finish within {}s; it was stopped (with the processes it started) and {outcome}", after.as_secs())]
    CommandTimedOut {
        command: String,
        after: std::time::Duration,
        outcome: &'static str,
    },
    #[error("the request was cancelled")]
    Cancelled,
    /// A drill that resolved its snapshot and then failed: what failed, naming the snapshot.
    #[error("snapshot {snapshot} (taken {time}) did not come back: {message}")]
    DrillFailed {
        snapshot: String,
        time: String,
        message: String,
    },
}

/// gRPC metadata of a failed command's error: its exit status.
pub const EXIT_CODE_METADATA: &str = "stowage-exit-code";

impl From<AgentError> for Status {
    fn from(e: AgentError) -> Status {
        use restic_wrap::Error as R;
        let code = match &e {
            AgentError::VolumeNotFound { .. }
            | AgentError::SnapshotNotFound { .. }
            | AgentError::PodNotFound { .. } => Code::NotFound,
            AgentError::NoKubernetes | AgentError::CommandFailed { .. } => Code::FailedPrecondition,
            AgentError::CommandTimedOut { .. } => Code::DeadlineExceeded,
            AgentError::Kubernetes(_) => Code::Internal,
            AgentError::InvalidArgument(_)
            | AgentError::InvalidIdentity(_)
            | AgentError::InvalidRepository(_) => Code::InvalidArgument,
            AgentError::Path(SafeFsError::InvalidPath { .. } | SafeFsError::Escapes { .. }) => {
                Code::InvalidArgument
            }
            AgentError::Path(
                SafeFsError::Conflict { .. }
                | SafeFsError::TooDeep { .. }
                | SafeFsError::OverBudget { .. },
            ) => Code::FailedPrecondition,
            AgentError::Path(SafeFsError::Io { .. }) | AgentError::Io { .. } => Code::Internal,
            AgentError::SnapshotOfOtherVolume { .. } => Code::PermissionDenied,
            AgentError::TargetNotEmpty { .. }
            | AgentError::NotMounted { .. }
            | AgentError::RestoreTargetNotMounted { .. }
            | AgentError::VolumeBusy { .. }
            | AgentError::IncludeNotInSnapshot { .. }
            | AgentError::NoSpace { .. }
            | AgentError::DrillFailed { .. } => Code::FailedPrecondition,
            AgentError::ShuttingDown => Code::Unavailable,
            AgentError::Cancelled => Code::Cancelled,
            AgentError::Restic(r) => match r {
                R::RepositoryNotFound { .. }
                | R::WrongPassword { .. }
                | R::SourceMissing { .. }
                | R::EmptySource => Code::FailedPrecondition,
                // Someone else holds the repository: retry later.
                R::Locked { .. } => Code::Aborted,
                R::AppendOnly { .. } => Code::PermissionDenied,
                R::Timeout { .. } | R::Stalled { .. } => Code::DeadlineExceeded,
                R::Cancelled { .. } => Code::Cancelled,
                R::PartialBackup { .. } => Code::DataLoss,
                R::UnsupportedVersion { .. } | R::Spawn { .. } => Code::Unavailable,
                R::CommandFailed { .. } | R::Json { .. } | R::Io { .. } => Code::Internal,
            },
        };
        let mut status = Status::new(code, e.to_string());
        if let AgentError::CommandFailed { exit_code, .. } = &e
            && let Ok(v) = exit_code.to_string().parse()
        {
            status.metadata_mut().insert(EXIT_CODE_METADATA, v);
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_chosen_per_cause() {
        let nf: Status = AgentError::VolumeNotFound {
            pod_uid: "u".into(),
            volume_name: "v".into(),
            node: "n".into(),
        }
        .into();
        assert_eq!(nf.code(), Code::NotFound);
        assert!(nf.message().contains("not on node n"));
        let esc: Status = AgentError::Path(SafeFsError::Escapes { path: "a".into() }).into();
        assert_eq!(esc.code(), Code::InvalidArgument);
        let pw: Status = AgentError::Restic(restic_wrap::Error::WrongPassword {
            location: "/r".into(),
        })
        .into();
        assert_eq!(pw.code(), Code::FailedPrecondition);
        assert!(pw.message().contains("wrong password"));
    }
}
