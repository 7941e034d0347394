//! Following a streamed restic run (backup or restore) until its output ends, turning each status
//! line into progress (a restore's with [`restore_progress`]), and stopping restic when the
//! operation is cancelled.

use restic_wrap::Error as ResticError;
use restic_wrap::stream::{StreamKind, StreamRun};
use stowage_proto::v1::{Phase, Progress};
use tokio_util::sync::CancellationToken;

/// Feeds every status line of `run` to `on_status` until restic's output ends (then the caller
/// calls `finish`), or stops restic and fails with `Cancelled` when `cancel` fires.
pub async fn follow<K: StreamKind>(
    run: &mut StreamRun<K>,
    cancel: &CancellationToken,
    subcommand: &str,
    mut on_status: impl FnMut(K::Status),
) -> restic_wrap::Result<()> {
    loop {
        tokio::select! {
            status = run.next_status() => match status? {
                Some(s) => on_status(s),
                None => return Ok(()),
            },
            _ = cancel.cancelled() => {
                run.stop().await;
                return Err(ResticError::Cancelled { subcommand: subcommand.into() });
            }
        }
    }
}

/// `finish` of a run whose output ended, unless `cancel` fires first.
pub async fn finish<T>(
    finish: impl Future<Output = restic_wrap::Result<T>>,
    cancel: &CancellationToken,
    subcommand: &str,
) -> restic_wrap::Result<T> {
    tokio::select! {
        out = finish => out,
        _ = cancel.cancelled() => Err(ResticError::Cancelled { subcommand: subcommand.into() }),
    }
}

/// A restore's (or a dry run's) restic status line as progress: files and bytes done count the
/// ones restic skipped as already there.
pub fn restore_progress(s: &restic_wrap::json::RestoreStatus) -> Progress {
    Progress {
        phase: Phase::Running.into(),
        percent_done: s.percent_done,
        total_files: s.total_files,
        files_done: s.files_restored + s.files_skipped,
        total_bytes: s.total_bytes,
        bytes_done: s.bytes_restored + s.bytes_skipped,
        seconds_elapsed: s.seconds_elapsed,
        ..Default::default()
    }
}
