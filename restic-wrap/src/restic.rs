//! The high-level API: one [`Restic`] per repository, methods per subcommand. What a streamed
//! subcommand (backup, restore, dump) returns while restic runs is in [`crate::stream`].
//!
//! Length: over 500 lines with its unit tests; the code is under 500.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use crate::command::CommandSpec;
use crate::error::{Error, Result};
use crate::json::{ForgetGroup, LockFile, Snapshot, Stats};
use crate::lock::{LockInfo, LockObserver, LockPolicy, NoopObserver};
use crate::options::{
    BackupOptions, CatConfigOptions, CatLockOptions, CheckOptions, DumpOptions, ForgetIdsOptions,
    ForgetOptions, GlobalOptions, InitOptions, KeyAddOptions, KeyListOptions, KeyRemoveOptions,
    ListLocksOptions, LsOptions, PruneOptions, RestoreOptions, SnapshotsOptions, StatsOptions,
    Subcommand, TagOptions, UnlockOptions,
};
use crate::process::ResticProcess;
use crate::repository::Repository;
use crate::sandbox::Sandbox;
use crate::stream::{BackupRun, DumpRun, Limits, LsRun, PreviewRun, RestoreRun, StreamRun};

/// The oldest restic we support: 0.17 brought documented exit codes, `--stdin-from-command`,
/// restore JSON progress and the REST credential variables.
pub const MIN_VERSION: (u32, u32, u32) = (0, 17, 0);

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
        self.run_fed(sub, bound, stall, None).await
    }

    /// [`Restic::run_within`] with `input` written to restic's stdin (then closed): a secret that
    /// must reach restic neither through its arguments nor through a file.
    async fn run_fed<S: Subcommand>(
        &self,
        sub: &S,
        bound: Duration,
        stall: bool,
        input: Option<&[u8]>,
    ) -> Result<String> {
        let spec = self.spec(sub, None);
        let mut process = ResticProcess::spawn(&spec, input.is_some())?;
        if let (Some(input), Some(mut stdin)) = (input, process.take_stdin()) {
            use tokio::io::AsyncWriteExt;
            stdin.write_all(input).await.map_err(|source| Error::Io {
                context: "writing to restic's stdin",
                source,
            })?;
            drop(stdin);
        }
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
        Ok(StreamRun::new(
            process,
            self.repository.location(),
            self.limits,
        ))
    }

    /// Starts `restic restore --json`. Lock retries are the caller's, as for [`Restic::backup`].
    pub fn restore(&self, opts: &RestoreOptions) -> Result<RestoreRun> {
        let spec = self.spec(opts, None);
        let process = ResticProcess::spawn(&spec, false)?;
        Ok(StreamRun::new(
            process,
            self.repository.location(),
            self.limits,
        ))
    }

    /// Starts `restic restore --dry-run -vv --json` (`opts.dry_run` is forced on): what a restore
    /// would do, entry by entry, with nothing written.
    pub fn restore_preview(&self, opts: &RestoreOptions) -> Result<PreviewRun> {
        let opts = RestoreOptions {
            dry_run: true,
            ..opts.clone()
        };
        let spec = self.spec(&opts, None);
        let process = ResticProcess::spawn(&spec, false)?;
        Ok(StreamRun::new(
            process,
            self.repository.location(),
            self.limits,
        ))
    }

    /// Starts `restic dump`: the file's bytes come on [`DumpRun::stdout`]. The caller bounds it
    /// (it runs as long as its reader takes).
    pub fn dump(&self, opts: &DumpOptions) -> Result<DumpRun> {
        let spec = self.spec(opts, None);
        let process = ResticProcess::spawn(&spec, false)?;
        Ok(DumpRun::new(process, self.repository.location()))
    }

    /// Starts `restic ls --json`: the snapshot's entries on [`LsRun::next_node`]. The caller bounds
    /// it and may stop early (dropping the run stops restic).
    pub fn ls(&self, opts: &LsOptions) -> Result<LsRun> {
        let spec = self.spec(opts, None);
        let process = ResticProcess::spawn(&spec, false)?;
        Ok(LsRun::new(process, self.repository.location()))
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

    /// `restic key list --json`: the repository's keys, the one this password opened marked current.
    pub async fn keys(&self) -> Result<Vec<crate::json::Key>> {
        self.run_json(&KeyListOptions).await
    }

    /// `restic key add`: a key for `new_password`, which reaches restic on its stdin
    /// (`--new-password-file /dev/stdin`), never in its arguments or environment.
    pub async fn key_add(&self, new_password: &str) -> Result<()> {
        let mut input = new_password.as_bytes().to_vec();
        input.push(b'\n');
        self.with_lock_retry(|| self.run_fed(&KeyAddOptions, self.limits.stall, true, Some(&input)))
            .await
            .map(drop)
    }

    /// `restic key remove <id>` (under restic's exclusive lock, so it waits for running operations;
    /// restic refuses to remove the key of the password in use).
    pub async fn key_remove(&self, id: &str) -> Result<()> {
        let opts = KeyRemoveOptions { id: id.to_string() };
        self.with_lock_retry(|| self.run(&opts)).await.map(drop)
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
