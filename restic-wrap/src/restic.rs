//! The high-level API: one [`Restic`] per repository, methods per subcommand.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use crate::command::CommandSpec;
use crate::error::{Error, Result};
use crate::json::{BackupMessage, BackupStatus, BackupSummary, ForgetGroup, Snapshot, Stats};
use crate::lock::{LockInfo, LockObserver, LockPolicy, NoopObserver};
use crate::options::{
    BackupOptions, CatConfigOptions, CheckOptions, ForgetOptions, GlobalOptions, InitOptions,
    ListLocksOptions, PruneOptions, RestoreOptions, SnapshotsOptions, StatsOptions, Subcommand,
    UnlockOptions,
};
use crate::process::ResticProcess;
use crate::repository::Repository;

/// The oldest restic we support (Debian bookworm's).
pub const MIN_VERSION: (u32, u32, u32) = (0, 14, 0);

/// A restic binary bound to one repository.
#[derive(Clone)]
pub struct Restic {
    binary: PathBuf,
    repository: Repository,
    global: GlobalOptions,
    lock_policy: LockPolicy,
    observer: Arc<dyn LockObserver>,
    /// Default deadline for commands that are not streamed (snapshots, check, forget ...).
    timeout: Duration,
}

impl std::fmt::Debug for Restic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Restic")
            .field("binary", &self.binary)
            .field("repository", &self.repository)
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

/// A running `restic backup`. Dropping it stops restic.
#[derive(Debug)]
pub struct BackupRun {
    process: ResticProcess,
    summary: Option<BackupSummary>,
    location: String,
}

impl BackupRun {
    /// The next progress line; `None` once restic's output ended (then call [`BackupRun::finish`]).
    pub async fn next_status(&mut self) -> Result<Option<BackupStatus>> {
        loop {
            let Some(line) = self.process.next_line().await? else {
                return Ok(None);
            };
            if !line.starts_with('{') {
                continue;
            }
            match serde_json::from_str::<BackupMessage>(&line) {
                Ok(BackupMessage::Status(s)) => return Ok(Some(s)),
                Ok(BackupMessage::Summary(s)) => self.summary = Some(s),
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "ignoring unparsable restic line"),
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

    /// Drains remaining output and waits for restic. Exit 3 becomes [`Error::PartialBackup`].
    pub async fn finish(mut self) -> Result<BackupOutput> {
        while self.next_status().await?.is_some() {}
        let subcommand = self.process.subcommand.clone();
        let (code, stderr) = self.process.wait().await?;
        let items = stderr.item_errors;
        match (code, self.summary) {
            (0, Some(summary)) => Ok(BackupOutput { summary }),
            (3, Some(summary)) => Err(Error::PartialBackup {
                summary: Box::new(summary),
                errors: items,
            }),
            (0, None) => Err(Error::CommandFailed {
                subcommand,
                status: 0,
                stderr_tail: "restic exited without a summary".into(),
            }),
            (code, _) => Err(Error::from_exit(
                &subcommand,
                code,
                &stderr.tail,
                &self.location,
            )),
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

    /// Stops restic now and waits until its process group is gone.
    pub async fn cancel(self) {
        self.process.terminate().await;
    }
}

/// `restic version` of `binary`, checked against [`MIN_VERSION`]: the agent's start-up check.
pub async fn version_of(binary: &Path) -> Result<String> {
    let out = tokio::process::Command::new(binary)
        .arg("version")
        .env_clear()
        .output()
        .await
        .map_err(|source| Error::Spawn {
            binary: binary.to_path_buf(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
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
    if !out.status.success() || found < MIN_VERSION {
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
            timeout: Duration::from_secs(6 * 3600),
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

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
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
        CommandSpec {
            program: self.binary.clone(),
            args,
            env,
            cwd: cwd.map(Path::to_path_buf),
            subcommand,
        }
    }

    /// Runs `sub` to completion within the timeout; returns stdout.
    async fn run<S: Subcommand>(&self, sub: &S) -> Result<String> {
        let spec = self.spec(sub, None);
        let mut process = ResticProcess::spawn(&spec, false)?;
        let collect = async {
            let mut out = String::new();
            while let Some(line) = process.next_line().await? {
                out.push_str(&line);
                out.push('\n');
            }
            Ok::<_, Error>(out)
        };
        let out = match tokio::time::timeout(self.timeout, collect).await {
            Ok(out) => out?,
            Err(_) => {
                process.terminate().await;
                return Err(Error::Timeout {
                    subcommand: spec.subcommand,
                    after: self.timeout,
                });
            }
        };
        let (code, stderr) = process.wait().await?;
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
        // Some subcommands (forget --prune) print plain text after the JSON line.
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

    /// Runs `attempt` under the lock policy: while restic reports the repository as locked, wait with
    /// backoff; remove a lock once it is older than `stale_after`; give up after `max_wait`.
    pub async fn with_lock_retry<T, F, Fut>(&self, mut attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let started = Instant::now();
        let mut retries = 0u32;
        let mut last_removed: Option<String> = None;
        loop {
            let lock = match attempt().await {
                Err(Error::Locked { lock }) => lock,
                other => return other,
            };
            if self.lock_policy.is_stale(&lock) {
                // Plain unlock removes what restic itself deems stale; a lock from another hostname
                // survives it (restic 0.14), so escalate when the same lock is still in the way.
                let remove_all = last_removed.as_deref() == Some(lock.storage_id.as_str());
                self.remove_stale_lock(&lock, remove_all).await?;
                last_removed = Some(lock.storage_id.clone());
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

    async fn remove_stale_lock(&self, lock: &LockInfo, remove_all: bool) -> Result<()> {
        tracing::warn!(
            lock = %lock,
            stale_after_secs = self.lock_policy.stale_after.as_secs(),
            remove_all,
            "removing stale repository lock"
        );
        self.run(&UnlockOptions { remove_all }).await?;
        self.observer.removed(lock, remove_all);
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
        Ok(BackupRun {
            process,
            summary: None,
            location: self.repository.location(),
        })
    }

    /// `restic restore`; restic 0.14 prints no JSON for restores, so this reports only completion.
    /// Dropping the future stops restic.
    pub async fn restore(&self, opts: &RestoreOptions) -> Result<()> {
        self.with_lock_retry(|| self.run(opts)).await.map(drop)
    }

    pub async fn forget(&self, opts: &ForgetOptions) -> Result<Vec<ForgetGroup>> {
        let groups: Option<Vec<ForgetGroup>> = self.with_lock_retry(|| self.run_json(opts)).await?;
        Ok(groups.unwrap_or_default())
    }

    /// `restic prune`; returns restic's report (plain text in 0.14).
    pub async fn prune(&self, opts: &PruneOptions) -> Result<String> {
        self.with_lock_retry(|| self.run(opts)).await
    }

    /// `restic check`; returns restic's report (plain text in 0.14). A damaged repository is an error.
    pub async fn check(&self, opts: &CheckOptions) -> Result<String> {
        self.with_lock_retry(|| self.run(opts)).await
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

    pub async fn stats(&self, opts: &StatsOptions) -> Result<Stats> {
        self.with_lock_retry(|| self.run_json(opts)).await
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
