//! The high-level API: one [`Restic`] per repository, methods per subcommand.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use crate::command::CommandSpec;
use crate::error::{Error, Result};
use crate::json::{
    BackupMessage, BackupStatus, BackupSummary, ForgetGroup, LockFile, RestoreMessage,
    RestoreStatus, RestoreSummary, Snapshot, Stats,
};
use crate::lock::{LockInfo, LockObserver, LockPolicy, NoopObserver};
use crate::options::{
    BackupOptions, CatConfigOptions, CatLockOptions, CheckOptions, DumpOptions, ForgetIdsOptions,
    ForgetOptions, GlobalOptions, InitOptions, ListLocksOptions, PruneOptions, RestoreOptions,
    SnapshotsOptions, StatsOptions, Subcommand, TagOptions, UnlockOptions,
};
use crate::process::{ResticProcess, StderrCapture};
use crate::repository::Repository;
use crate::sandbox::Sandbox;

/// The oldest restic we support: 0.17 brought documented exit codes, `--stdin-from-command`,
/// restore JSON progress and the REST credential variables.
pub const MIN_VERSION: (u32, u32, u32) = (0, 17, 0);

/// A running `restic dump`.
pub struct DumpRun {
    process: ResticProcess,
    location: String,
}

impl DumpRun {
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

/// A restic binary bound to one repository.
#[derive(Clone)]
pub struct Restic {
    binary: PathBuf,
    repository: Repository,
    global: GlobalOptions,
    lock_policy: LockPolicy,
    observer: Arc<dyn LockObserver>,
    limits: Limits,
    sandbox: Option<Sandbox>,
}

impl std::fmt::Debug for Restic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Restic")
            .field("binary", &self.binary)
            .field("repository", &self.repository)
            .field("sandboxed", &self.sandbox.is_some())
            .finish()
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
    /// The figures whose change counts as progress (not the clock, which always moves).
    fn progress(status: &Self::Status) -> [u64; 5];
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
    fn progress(s: &BackupStatus) -> [u64; 5] {
        [
            s.files_done,
            s.bytes_done,
            s.total_files,
            s.total_bytes,
            s.error_count,
        ]
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
    fn progress(s: &RestoreStatus) -> [u64; 5] {
        [
            s.files_restored + s.files_skipped,
            s.bytes_restored + s.bytes_skipped,
            s.total_files,
            s.total_bytes,
            s.files_deleted,
        ]
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

impl<K: StreamKind> StreamRun<K> {
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
                    self.watchdog.figures(K::progress(&s));
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
        let location = self.location.clone();
        let (code, summary, stderr, subcommand) = self.wait().await?;
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
}

/// The first JSON line of `out`: some subcommands (forget --prune) print plain text after it.
fn parse_json<S: Subcommand, T: DeserializeOwned>(sub: &S, out: &str) -> Result<T> {
    let json = out
        .lines()
        .find(|l| l.starts_with('[') || l.starts_with('{'))
        .unwrap_or("null");
    serde_json::from_str(json).map_err(|source| Error::Json {
        subcommand: sub
            .args()
            .first()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        source,
    })
}

/// `restic version` of `binary`, checked against [`MIN_VERSION`]: the agent's start-up check.
pub async fn version_of(binary: &Path) -> Result<String> {
    let mut cmd = tokio::process::Command::new(binary);
    cmd.arg("version").env_clear().kill_on_drop(true);
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    let after = Duration::from_secs(30);
    let out = tokio::time::timeout(after, cmd.output())
        .await
        .map_err(|_| Error::Timeout {
            subcommand: "version".into(),
            after,
        })?
        .map_err(|source| Error::Spawn {
            binary: binary.to_path_buf(),
            source,
        })?;
    check_version(&String::from_utf8_lossy(&out.stdout), out.status.success())
}

/// The version in `restic version`'s output ("restic 0.19.1 compiled with ..."), if it is at least
/// [`MIN_VERSION`].
fn check_version(text: &str, success: bool) -> Result<String> {
    let version = text
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    let parsed: Vec<u32> = version.split('.').map(|p| p.parse().unwrap_or(0)).collect();
    let found = (
        parsed.first().copied().unwrap_or(0),
        parsed.get(1).copied().unwrap_or(0),
        parsed.get(2).copied().unwrap_or(0),
    );
    if !success || found < MIN_VERSION {
        return Err(Error::UnsupportedVersion {
            found: text.trim().to_string(),
            required: format!("{}.{}.{}", MIN_VERSION.0, MIN_VERSION.1, MIN_VERSION.2),
        });
    }
    Ok(version)
}

impl Restic {
    pub fn new(binary: impl Into<PathBuf>, repository: Repository) -> Self {
        Self {
            binary: binary.into(),
            repository,
            global: GlobalOptions::default(),
            lock_policy: LockPolicy::default(),
            observer: Arc::new(NoopObserver),
            limits: Limits::default(),
            sandbox: None,
        }
    }

    pub fn with_global(mut self, global: GlobalOptions) -> Self {
        self.global = global;
        self
    }

    pub fn with_lock_policy(mut self, policy: LockPolicy, observer: Arc<dyn LockObserver>) -> Self {
        self.lock_policy = policy;
        self.observer = observer;
        self
    }

    /// The same lock policy, but giving up on a held lock after `max_wait` (for work that can
    /// simply be done later, such as reading figures).
    pub fn with_lock_wait(mut self, max_wait: Duration) -> Self {
        self.lock_policy.max_wait = max_wait;
        self
    }

    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Every command of this `Restic` runs inside `sandbox`.
    pub fn with_sandbox(mut self, sandbox: Sandbox) -> Self {
        self.sandbox = Some(sandbox);
        self
    }

    pub fn global(&self) -> &GlobalOptions {
        &self.global
    }

    pub fn repository(&self) -> &Repository {
        &self.repository
    }

    pub fn lock_policy(&self) -> &LockPolicy {
        &self.lock_policy
    }

    /// Renders the full invocation of `sub`. Pure: the unit-testable seam.
    pub fn spec<S: Subcommand>(&self, sub: &S, cwd: Option<&Path>) -> CommandSpec {
        let sub_args = sub.args();
        let subcommand = sub_args
            .first()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut args = vec!["-r".into(), self.repository.location().into()];
        args.extend(self.global.args());
        args.extend(sub_args);
        let mut env = self.repository.env();
        // Progress lines twice a second: enough for humans, cheap for us.
        env.push(("RESTIC_PROGRESS_FPS".into(), "2".into()));
        let spec = CommandSpec {
            program: self.binary.clone(),
            args,
            env,
            cwd: cwd.map(Path::to_path_buf),
            subcommand,
        };
        match &self.sandbox {
            Some(sandbox) => sandbox.wrap(&spec),
            None => spec,
        }
    }

    /// Runs a command that prints nothing until it is done (snapshots, init, unlock ...): it may
    /// take the stall limit in total.
    async fn run<S: Subcommand>(&self, sub: &S) -> Result<String> {
        self.run_within(sub, self.limits.stall, true).await
    }

    /// Runs `sub` to completion within `bound`; returns stdout.
    async fn run_within<S: Subcommand>(
        &self,
        sub: &S,
        bound: Duration,
        stall: bool,
    ) -> Result<String> {
        let spec = self.spec(sub, None);
        let mut process = ResticProcess::spawn(&spec, false)?;
        let collect = async {
            let mut out = String::new();
            while let Some(line) = process.next_line().await? {
                out.push_str(&line);
                out.push('\n');
                if out.len() > crate::process::STDOUT_LINE_MAX {
                    return Err(Error::Io {
                        context: "reading stdout",
                        source: std::io::Error::other(format!(
                            "restic's output is longer than {} MiB",
                            crate::process::STDOUT_LINE_MAX >> 20
                        )),
                    });
                }
            }
            Ok::<_, Error>(out)
        };
        let out = match tokio::time::timeout(bound, collect).await {
            Ok(out) => out?,
            Err(_) => {
                process.terminate().await;
                let (subcommand, after) = (spec.subcommand, bound);
                return Err(if stall {
                    Error::Stalled { subcommand, after }
                } else {
                    Error::Timeout { subcommand, after }
                });
            }
        };
        let (code, stderr) = match tokio::time::timeout(bound, process.wait_mut()).await {
            Ok(r) => r?,
            Err(_) => {
                process.terminate().await;
                return Err(Error::Timeout {
                    subcommand: spec.subcommand,
                    after: bound,
                });
            }
        };
        if code == 0 {
            Ok(out)
        } else {
            Err(Error::from_exit(
                &spec.subcommand,
                code,
                &stderr.tail,
                &self.repository.location(),
            ))
        }
    }

    async fn run_json<S: Subcommand, T: DeserializeOwned>(&self, sub: &S) -> Result<T> {
        let out = self.run(sub).await?;
        parse_json(sub, &out)
    }

    /// Runs `attempt` under the lock policy: while restic reports the repository as locked, wait with
    /// backoff; remove a lock once it is older than `stale_after`; give up after `max_wait`.
    pub async fn with_lock_retry<T, F, Fut>(&self, mut attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let started = Instant::now();
        let mut retries = 0u32;
        let mut unlocked: Option<String> = None;
        loop {
            let lock = match attempt().await {
                Err(Error::Locked { lock }) => lock,
                other => return other,
            };
            // A lock past the staleness threshold gets one plain `restic unlock`. If restic keeps it
            // (it judges staleness itself), it is waited for like any other lock.
            if self.lock_policy.is_stale(&lock)
                && unlocked.as_deref() != Some(lock.storage_id.as_str())
            {
                self.remove_stale_lock(&lock).await?;
                unlocked = Some(lock.storage_id.clone());
                continue;
            }
            if started.elapsed() >= self.lock_policy.max_wait {
                return Err(Error::Locked { lock });
            }
            self.observer.waiting(&lock);
            let delay = self.lock_policy.backoff(retries);
            tracing::info!(lock = %lock, retry_in = ?delay, "repository locked; waiting");
            retries = retries.saturating_add(1);
            tokio::time::sleep(delay).await;
        }
    }

    async fn remove_stale_lock(&self, lock: &LockInfo) -> Result<()> {
        tracing::warn!(
            lock = %lock,
            stale_after_secs = self.lock_policy.stale_after.as_secs(),
            "removing a stale repository lock with restic unlock"
        );
        let before = self.list_locks().await.unwrap_or_default();
        self.run(&UnlockOptions).await?;
        let after = self.list_locks().await.unwrap_or_default();
        // Only what restic really removed counts as a removal.
        if before.iter().any(|id| id.starts_with(&lock.storage_id))
            && !after.iter().any(|id| id.starts_with(&lock.storage_id))
        {
            self.observer.removed(lock);
        }
        Ok(())
    }

    /// `restic version` of this binary, checked against [`MIN_VERSION`].
    pub async fn version(&self) -> Result<String> {
        version_of(&self.binary).await
    }

    pub async fn init(&self) -> Result<()> {
        self.run(&InitOptions).await.map(drop)
    }

    /// Whether the repository exists and the password opens it. A wrong password is an error.
    pub async fn exists(&self) -> Result<bool> {
        match self.run(&CatConfigOptions).await {
            Ok(_) => Ok(true),
            Err(Error::RepositoryNotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Makes sure the repository can be opened; creates it only when `auto_init` is set.
    pub async fn ensure_repository(&self, auto_init: bool) -> Result<()> {
        if self.exists().await? {
            return Ok(());
        }
        if !auto_init {
            return Err(Error::RepositoryNotFound {
                location: self.repository.location(),
            });
        }
        tracing::info!(repository = %self.repository.location(), "initialising repository");
        match self.init().await {
            Ok(()) => Ok(()),
            // Lost a race with another agent initialising the same repository: fine if it opens now.
            Err(e) => {
                if self.exists().await? {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    pub async fn snapshots(&self, opts: &SnapshotsOptions) -> Result<Vec<Snapshot>> {
        let snaps: Option<Vec<Snapshot>> = self.with_lock_retry(|| self.run_json(opts)).await?;
        Ok(snaps.unwrap_or_default())
    }

    /// Starts a backup in `cwd`. Lock retries are the caller's (see [`Restic::with_lock_retry`]),
    /// because a retried backup must restart its progress stream.
    pub fn backup(&self, opts: &BackupOptions, cwd: &Path) -> Result<BackupRun> {
        let spec = self.spec(opts, Some(cwd));
        let process = ResticProcess::spawn(&spec, opts.stdin_filename.is_some())?;
        Ok(StreamRun {
            process,
            summary: None,
            location: self.repository.location(),
            watchdog: Watchdog::new(self.limits),
        })
    }

    /// Starts `restic restore --json`. Lock retries are the caller's, as for [`Restic::backup`].
    pub fn restore(&self, opts: &RestoreOptions) -> Result<RestoreRun> {
        let spec = self.spec(opts, None);
        let process = ResticProcess::spawn(&spec, false)?;
        Ok(StreamRun {
            process,
            summary: None,
            location: self.repository.location(),
            watchdog: Watchdog::new(self.limits),
        })
    }

    /// Starts `restic dump`: the file's bytes come on [`DumpRun::stdout`]. The caller bounds it
    /// (it runs as long as its reader takes).
    pub fn dump(&self, opts: &DumpOptions) -> Result<DumpRun> {
        let spec = self.spec(opts, None);
        let process = ResticProcess::spawn(&spec, false)?;
        Ok(DumpRun {
            process,
            location: self.repository.location(),
        })
    }

    pub async fn forget(&self, opts: &ForgetOptions) -> Result<Vec<ForgetGroup>> {
        let groups: Option<Vec<ForgetGroup>> = self.with_lock_retry(|| self.run_json(opts)).await?;
        Ok(groups.unwrap_or_default())
    }

    /// `restic forget <id>...`, at most 256 ids per restic run (argv stays small). Nothing to do for
    /// no ids.
    pub async fn forget_ids(&self, ids: &[String]) -> Result<()> {
        for chunk in ids.chunks(256) {
            let opts = ForgetIdsOptions {
                ids: chunk.to_vec(),
            };
            self.with_lock_retry(|| self.run(&opts)).await?;
        }
        Ok(())
    }

    /// `restic prune`; returns restic's report (plain text in 0.14).
    pub async fn prune(&self, opts: &PruneOptions) -> Result<String> {
        self.with_lock_retry(|| self.run_within(opts, self.limits.max, false))
            .await
    }

    /// `restic check`; returns restic's report (plain text in 0.14). A damaged repository is an error.
    pub async fn check(&self, opts: &CheckOptions) -> Result<String> {
        self.with_lock_retry(|| self.run_within(opts, self.limits.max, false))
            .await
    }

    /// Adds tags to a snapshot; returns the id of the rewritten snapshot.
    pub async fn tag(&self, opts: &TagOptions) -> Result<String> {
        #[derive(serde::Deserialize)]
        struct Changed {
            message_type: String,
            #[serde(default)]
            new_snapshot_id: String,
        }
        let out = self.with_lock_retry(|| self.run(opts)).await?;
        out.lines()
            .filter_map(|l| serde_json::from_str::<Changed>(l).ok())
            .find(|c| c.message_type == "changed" && !c.new_snapshot_id.is_empty())
            .map(|c| c.new_snapshot_id)
            .ok_or_else(|| Error::Json {
                subcommand: "tag".into(),
                source: serde::de::Error::custom("restic reported no changed snapshot"),
            })
    }

    pub async fn unlock(&self, opts: &UnlockOptions) -> Result<()> {
        self.run(opts).await.map(drop)
    }

    /// Ids of the lock files currently in the repository.
    pub async fn list_locks(&self) -> Result<Vec<String>> {
        let out = self.run(&ListLocksOptions).await?;
        Ok(out
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }

    /// One lock file's content, read without taking a lock. A lock removed since it was listed is an
    /// error like any other.
    pub async fn read_lock(&self, id: &str) -> Result<LockFile> {
        let opts = CatLockOptions { id: id.to_string() };
        // `cat` prints the lock indented over several lines, unlike the one-line messages of
        // other commands: the whole output is the document.
        let out = self.run(&opts).await?;
        serde_json::from_str(out.trim()).map_err(|source| Error::Json {
            subcommand: "cat lock".into(),
            source,
        })
    }

    pub async fn stats(&self, opts: &StatsOptions) -> Result<Stats> {
        self.with_lock_retry(|| async {
            let out = self.run_within(opts, self.limits.max, false).await?;
            parse_json(opts, &out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repository::Backend;

    fn restic() -> Restic {
        Restic::new(
            "/usr/bin/restic",
            Repository {
                backend: Backend::Local {
                    path: "/repo".into(),
                },
                password: "hunter2".into(),
            },
        )
        .with_global(GlobalOptions {
            cache_dir: Some("/cache".into()),
            ..Default::default()
        })
    }

    #[test]
    fn spec_puts_repository_and_globals_first_and_secrets_in_env() {
        let spec = restic().spec(&CheckOptions::default(), None);
        let args: Vec<_> = spec
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(args, ["-r", "/repo", "--cache-dir", "/cache", "check"]);
        assert_eq!(spec.subcommand, "check");
        assert!(
            spec.env
                .contains(&("RESTIC_PASSWORD".into(), "hunter2".into()))
        );
        assert!(!args.iter().any(|a| a.contains("hunter2")));
        assert!(!format!("{spec:?}").contains("hunter2"));
    }

    #[test]
    fn versions_before_0_17_are_refused_with_a_clear_message() {
        let old = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/testdata/restic-samples/version.txt"
        ))
        .unwrap();
        let e = check_version(&old, true).unwrap_err();
        assert!(
            e.to_string()
                .contains("is too old; at least 0.17.0 is needed"),
            "{e}"
        );
        assert_eq!(
            check_version(
                "restic 0.19.1 compiled with go1.26.8 on linux/amd64\n",
                true
            )
            .unwrap(),
            "0.19.1"
        );
        assert!(check_version("restic 0.19.1 compiled", false).is_err());
        assert!(check_version("", true).is_err());
    }

    #[test]
    fn backup_spec_runs_in_the_volume_directory() {
        let opts = BackupOptions {
            paths: vec![".".into()],
            ..Default::default()
        };
        let spec = restic().spec(&opts, Some(Path::new("/vol")));
        assert_eq!(spec.cwd.as_deref(), Some(Path::new("/vol")));
        assert_eq!(
            spec.args
                .last()
                .map(|a| a.to_string_lossy().into_owned())
                .as_deref(),
            Some(".")
        );
    }

    #[tokio::test]
    async fn lock_retry_gives_up_after_max_wait_and_reports_waiting() {
        use std::sync::atomic::{AtomicU32, Ordering};
        #[derive(Default)]
        struct Count(AtomicU32);
        impl LockObserver for Count {
            fn waiting(&self, _: &LockInfo) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let count = Arc::new(Count::default());
        let r = restic().with_lock_policy(
            LockPolicy {
                max_wait: Duration::from_millis(50),
                stale_after: Duration::from_secs(3600),
                initial_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(10),
            },
            count.clone(),
        );
        let attempts = AtomicU32::new(0);
        let res: Result<()> = r
            .with_lock_retry(|| async {
                attempts.fetch_add(1, Ordering::SeqCst);
                Err(Error::Locked {
                    lock: Box::new(LockInfo {
                        age: Some(Duration::from_secs(1)),
                        ..Default::default()
                    }),
                })
            })
            .await;
        assert!(matches!(res, Err(Error::Locked { .. })));
        assert!(attempts.load(Ordering::SeqCst) >= 2);
        assert!(count.0.load(Ordering::SeqCst) >= 1);
    }
}
