//! A restic process in flight whose output is streamed: `backup` and `restore` (JSON progress lines,
//! parsed as they come, under a watchdog that stops restic past its deadline or when it stalls)
//! and `dump` (stdout handed to the caller). [`crate::restic::Restic`] starts them.

use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::json::{
    BackupMessage, BackupStatus, BackupSummary, RestoreItem, RestoreMessage, RestoreStatus,
    RestoreSummary,
};
use crate::process::{ResticProcess, StderrCapture};

/// A running `restic dump`.
pub struct DumpRun {
    process: ResticProcess,
    location: String,
}

impl DumpRun {
    pub(crate) fn new(process: ResticProcess, location: String) -> Self {
        Self { process, location }
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// The dumped bytes (taken once).
    pub fn stdout(&mut self) -> Option<impl tokio::io::AsyncRead + Unpin + Send + use<>> {
        self.process.take_stdout()
    }

    /// Stops restic now.
    pub async fn stop(mut self) {
        self.process.stop().await;
    }

    /// Waits for restic's exit (after its stdout ended); a non-zero exit is an error.
    pub async fn finish(self) -> Result<()> {
        let (code, stderr) = self.process.wait().await?;
        if code == 0 {
            Ok(())
        } else {
            Err(Error::from_exit("dump", code, &stderr.tail, &self.location))
        }
    }
}

/// A running `restic ls --json`: its nodes, as they come.
pub struct LsRun {
    process: ResticProcess,
    location: String,
}

impl LsRun {
    pub(crate) fn new(process: ResticProcess, location: String) -> Self {
        Self { process, location }
    }

    /// The next entry (the snapshot's own line is skipped), or `None` at the end of the listing.
    pub async fn next_node(&mut self) -> Result<Option<crate::json::LsNode>> {
        while let Some(line) = self.process.next_line().await? {
            if line.trim().is_empty() {
                continue;
            }
            let node: crate::json::LsNode =
                serde_json::from_str(&line).map_err(|source| Error::Json {
                    subcommand: "ls".into(),
                    source,
                })?;
            if node.struct_type == "node" {
                return Ok(Some(node));
            }
        }
        Ok(None)
    }

    /// Waits for restic's exit after the listing ended; a non-zero exit is an error.
    pub async fn finish(self) -> Result<()> {
        let (code, stderr) = self.process.wait().await?;
        if code == 0 {
            Ok(())
        } else {
            Err(Error::from_exit("ls", code, &stderr.tail, &self.location))
        }
    }
}

/// How long restic may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// A backup or restore that reports no progress for this long is stopped; commands that print
    /// nothing until they are done (snapshots, init, unlock ...) may take this long in total.
    pub stall: Duration,
    /// No command runs longer than this, progress or not.
    pub max: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            stall: Duration::from_secs(10 * 60),
            max: Duration::from_secs(12 * 3600),
        }
    }
}

/// A message from a running backup, as yielded by [`BackupRun::events`].
#[derive(Debug)]
pub enum BackupEvent {
    Status(BackupStatus),
    /// The last item: how the backup ended.
    Finished(Result<BackupOutput>),
}

/// A successful backup's figures and the items restic reported.
#[derive(Debug, Clone, PartialEq)]
pub struct BackupOutput {
    pub summary: BackupSummary,
}

/// A successful restore's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct RestoreOutput {
    pub summary: RestoreSummary,
}

/// What a streamed subcommand prints on stdout, one JSON object a line.
pub trait StreamKind {
    type Status;
    type Summary;
    /// Classifies one stdout line.
    fn parse(line: &str) -> Line<Self::Status, Self::Summary>;
    /// The figures whose change counts as progress (not the clock, which always moves); `None`
    /// for a line that is progress in itself (an entry reported done).
    fn progress(status: &Self::Status) -> Option<[u64; 5]>;
}

/// One stdout line of a streamed run.
pub enum Line<S, M> {
    Status(S),
    Summary(M),
    /// Anything else restic reported (an error, a verbose line): it is alive and doing something.
    Activity,
    Ignored,
}

/// `restic backup --json`.
#[derive(Debug)]
pub struct Backup;
impl StreamKind for Backup {
    type Status = BackupStatus;
    type Summary = BackupSummary;
    fn parse(line: &str) -> Line<BackupStatus, BackupSummary> {
        match serde_json::from_str::<BackupMessage>(line) {
            Ok(BackupMessage::Status(s)) => Line::Status(s),
            Ok(BackupMessage::Summary(s)) => Line::Summary(s),
            Ok(_) => Line::Activity,
            Err(e) => {
                tracing::debug!(error = %e, "ignoring unparsable restic line");
                Line::Ignored
            }
        }
    }
    fn progress(s: &BackupStatus) -> Option<[u64; 5]> {
        Some([
            s.files_done,
            s.bytes_done,
            s.total_files,
            s.total_bytes,
            s.error_count,
        ])
    }
}

/// `restic restore --json`.
#[derive(Debug)]
pub struct Restore;
impl StreamKind for Restore {
    type Status = RestoreStatus;
    type Summary = RestoreSummary;
    fn parse(line: &str) -> Line<RestoreStatus, RestoreSummary> {
        match serde_json::from_str::<RestoreMessage>(line) {
            Ok(RestoreMessage::Status(s)) => Line::Status(s),
            Ok(RestoreMessage::Summary(s)) => Line::Summary(s),
            Ok(_) => Line::Activity,
            Err(e) => {
                tracing::debug!(error = %e, "ignoring unparsable restic line");
                Line::Ignored
            }
        }
    }
    fn progress(s: &RestoreStatus) -> Option<[u64; 5]> {
        Some(restore_figures(s))
    }
}

fn restore_figures(s: &RestoreStatus) -> [u64; 5] {
    [
        s.files_restored + s.files_skipped,
        s.bytes_restored + s.bytes_skipped,
        s.total_files,
        s.total_bytes,
        s.files_deleted,
    ]
}

/// `restic restore --dry-run -vv --json`: progress, and one line per entry saying what a restore
/// would do with it.
#[derive(Debug)]
pub struct RestorePreview;

/// A line of a dry-run restore.
#[derive(Debug, Clone, PartialEq)]
pub enum PreviewLine {
    Progress(RestoreStatus),
    Item(RestoreItem),
}

impl StreamKind for RestorePreview {
    type Status = PreviewLine;
    type Summary = RestoreSummary;
    fn parse(line: &str) -> Line<PreviewLine, RestoreSummary> {
        match serde_json::from_str::<RestoreMessage>(line) {
            Ok(RestoreMessage::Status(s)) => Line::Status(PreviewLine::Progress(s)),
            Ok(RestoreMessage::VerboseStatus(i)) => Line::Status(PreviewLine::Item(i)),
            Ok(RestoreMessage::Summary(s)) => Line::Summary(s),
            Ok(_) => Line::Activity,
            Err(e) => {
                tracing::debug!(error = %e, "ignoring unparsable restic line");
                Line::Ignored
            }
        }
    }
    fn progress(line: &PreviewLine) -> Option<[u64; 5]> {
        match line {
            PreviewLine::Progress(s) => Some(restore_figures(s)),
            PreviewLine::Item(_) => None,
        }
    }
}

/// Stops a run that made no progress for `limits.stall`, or ran longer than `limits.max`.
#[derive(Debug)]
struct Watchdog {
    limits: Limits,
    started: Instant,
    last_progress: Instant,
    last_figures: Option<[u64; 5]>,
}

impl Watchdog {
    fn new(limits: Limits) -> Self {
        let now = Instant::now();
        Self {
            limits,
            started: now,
            last_progress: now,
            last_figures: None,
        }
    }

    fn progressed(&mut self) {
        self.last_progress = Instant::now();
    }

    fn figures(&mut self, figures: [u64; 5]) {
        if self.last_figures != Some(figures) {
            self.last_figures = Some(figures);
            self.progressed();
        }
    }

    /// The instant the run is stopped at, and the error it then fails with.
    fn deadline(&self, subcommand: &str) -> (Instant, Error) {
        let stall_at = self.last_progress + self.limits.stall;
        let max_at = self.started + self.limits.max;
        if stall_at < max_at {
            (
                stall_at,
                Error::Stalled {
                    subcommand: subcommand.to_string(),
                    after: self.limits.stall,
                },
            )
        } else {
            (
                max_at,
                Error::Timeout {
                    subcommand: subcommand.to_string(),
                    after: self.limits.max,
                },
            )
        }
    }
}

/// A running streamed restic (backup or restore). Dropping it stops restic.
#[derive(Debug)]
pub struct StreamRun<K: StreamKind> {
    process: ResticProcess,
    summary: Option<K::Summary>,
    location: String,
    watchdog: Watchdog,
}

/// A running `restic backup`.
pub type BackupRun = StreamRun<Backup>;
/// A running `restic restore`.
pub type RestoreRun = StreamRun<Restore>;
/// A running `restic restore --dry-run`.
pub type PreviewRun = StreamRun<RestorePreview>;

impl<K: StreamKind> StreamRun<K> {
    pub(crate) fn new(process: ResticProcess, location: String, limits: Limits) -> Self {
        Self {
            process,
            summary: None,
            location,
            watchdog: Watchdog::new(limits),
        }
    }

    /// The next progress line; `None` once restic's output ended (then call `finish`). Fails with
    /// [`Error::Stalled`] or [`Error::Timeout`] (restic stopped) when the limits run out.
    pub async fn next_status(&mut self) -> Result<Option<K::Status>> {
        loop {
            let (deadline, expired) = self.watchdog.deadline(&self.process.subcommand);
            let line = match tokio::time::timeout_at(deadline.into(), self.process.next_line())
                .await
            {
                Ok(line) => line?,
                Err(_) => {
                    tracing::warn!(subcommand = %self.process.subcommand, error = %expired, "stopping restic");
                    self.process.stop().await;
                    return Err(expired);
                }
            };
            let Some(line) = line else { return Ok(None) };
            if !line.starts_with('{') {
                continue;
            }
            match K::parse(&line) {
                Line::Status(s) => {
                    match K::progress(&s) {
                        Some(figures) => self.watchdog.figures(figures),
                        None => self.watchdog.progressed(),
                    }
                    return Ok(Some(s));
                }
                Line::Summary(s) => {
                    self.watchdog.progressed();
                    self.summary = Some(s);
                }
                Line::Activity => self.watchdog.progressed(),
                Line::Ignored => {}
            }
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Takes the stdin pipe of a `--stdin` backup; close it to end the stream.
    pub fn take_stdin(&mut self) -> Option<tokio::process::ChildStdin> {
        self.process.take_stdin()
    }

    /// Drains the remaining output and waits for restic (within the limits).
    async fn wait(mut self) -> Result<(i32, Option<K::Summary>, StderrCapture, String)> {
        while self.next_status().await?.is_some() {}
        let subcommand = self.process.subcommand.clone();
        let (deadline, expired) = self.watchdog.deadline(&subcommand);
        match tokio::time::timeout_at(deadline.into(), self.process.wait_mut()).await {
            Ok(r) => {
                let (code, stderr) = r?;
                Ok((code, self.summary, stderr, subcommand))
            }
            Err(_) => {
                self.process.stop().await;
                Err(expired)
            }
        }
    }

    /// Stops restic now and waits until its process group is gone.
    pub async fn stop(&mut self) {
        self.process.stop().await;
    }
}

impl BackupRun {
    /// Waits for the end. Exit 3 becomes [`Error::PartialBackup`].
    pub async fn finish(self) -> Result<BackupOutput> {
        let location = self.location.clone();
        let (code, summary, stderr, subcommand) = self.wait().await?;
        match (code, summary) {
            (0, Some(summary)) => Ok(BackupOutput { summary }),
            (crate::error::exit::PARTIAL, Some(summary)) => Err(Error::PartialBackup {
                summary: Box::new(summary),
                errors: stderr.item_errors,
            }),
            (0, None) => Err(Error::CommandFailed {
                subcommand,
                status: 0,
                stderr_tail: "restic exited without a summary".into(),
            }),
            (code, _) => Err(Error::from_exit(&subcommand, code, &stderr.tail, &location)),
        }
    }

    /// The run as an async stream: restic's status lines, then one [`BackupEvent::Finished`].
    /// Dropping the stream stops restic.
    pub fn events(self) -> impl futures::Stream<Item = BackupEvent> {
        futures::stream::unfold(Some(self), |state| async move {
            let mut run = state?;
            match run.next_status().await {
                Ok(Some(status)) => Some((BackupEvent::Status(status), Some(run))),
                Ok(None) => Some((BackupEvent::Finished(run.finish().await), None)),
                Err(e) => Some((BackupEvent::Finished(Err(e)), None)),
            }
        })
    }
}

impl RestoreRun {
    /// Waits for the end. Anything but exit 0 with a summary is an error: a restore that could not
    /// write some files is not a restore.
    pub async fn finish(self) -> Result<RestoreOutput> {
        finish_restore(self).await
    }
}

impl PreviewRun {
    /// Waits for the end, as [`RestoreRun::finish`]: a preview that could not read some entries
    /// is no preview.
    pub async fn finish(self) -> Result<RestoreOutput> {
        finish_restore(self).await
    }
}

async fn finish_restore<K: StreamKind<Summary = RestoreSummary>>(
    run: StreamRun<K>,
) -> Result<RestoreOutput> {
    let location = run.location.clone();
    let (code, summary, stderr, subcommand) = run.wait().await?;
    match (code, summary) {
        (0, Some(summary)) => Ok(RestoreOutput { summary }),
        (0, None) => Err(Error::CommandFailed {
            subcommand,
            status: 0,
            stderr_tail: "restic exited without a summary".into(),
        }),
        (code, _) => {
            let mut text = stderr.tail;
            for e in stderr.item_errors.iter().take(5) {
                text.push_str(&format!("\n{}: {}", e.item, e.message));
            }
            Err(Error::from_exit(&subcommand, code, &text, &location))
        }
    }
}
