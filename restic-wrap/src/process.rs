//! An owned restic child process. It runs in its own process group; dropping the handle before it
//! exited terminates the whole group (SIGTERM, so restic can remove its lock; SIGKILL after a grace
//! period) and reaps it.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::task::JoinHandle;

use crate::command::CommandSpec;
use crate::error::{Error, ItemError, Result};
use crate::json::BackupMessage;

/// How long restic gets to clean up (remove its lock) after SIGTERM before SIGKILL.
pub const TERMINATE_GRACE: Duration = Duration::from_millis(1500);
/// Bytes of stderr kept for error messages.
const STDERR_TAIL_BYTES: usize = 16 * 1024;
/// JSON item errors kept per run; a tree with a million unreadable files must not eat memory.
const MAX_ITEM_ERRORS: usize = 100;

/// What restic wrote to stderr, bounded.
#[derive(Debug, Default, Clone)]
pub struct StderrCapture {
    pub tail: String,
    pub item_errors: Vec<ItemError>,
    pub item_errors_dropped: u64,
}

pub struct ResticProcess {
    child: Option<Child>,
    pgid: Option<Pid>,
    stdout: Option<Lines<BufReader<ChildStdout>>>,
    stdin: Option<ChildStdin>,
    stderr: Arc<Mutex<StderrCapture>>,
    stderr_task: Option<JoinHandle<()>>,
    pub(crate) subcommand: String,
}

impl std::fmt::Debug for ResticProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResticProcess")
            .field("subcommand", &self.subcommand)
            .field("pid", &self.pid())
            .finish()
    }
}

impl ResticProcess {
    /// Starts `spec`. `stdin_piped` keeps stdin open for `backup --stdin`.
    pub fn spawn(spec: &CommandSpec, stdin_piped: bool) -> Result<Self> {
        let mut cmd = tokio::process::Command::new(&spec.program);
        cmd.args(&spec.args)
            .env_clear()
            .envs(inherited_env())
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(if stdin_piped {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(cwd) = &spec.cwd {
            cmd.current_dir(cwd);
        }
        let mut child = cmd.spawn().map_err(|source| Error::Spawn {
            binary: spec.program.clone(),
            source,
        })?;
        let pgid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw);
        let stdout = child.stdout.take().map(|s| BufReader::new(s).lines());
        let stdin = child.stdin.take();
        let stderr = Arc::new(Mutex::new(StderrCapture::default()));
        let stderr_task = child
            .stderr
            .take()
            .map(|s| tokio::spawn(capture_stderr(s, Arc::clone(&stderr))));
        tracing::debug!(subcommand = %spec.subcommand, pid = ?pgid, "restic started");
        Ok(Self {
            child: Some(child),
            pgid,
            stdout,
            stdin,
            stderr,
            stderr_task,
            subcommand: spec.subcommand.clone(),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.pgid.and_then(|p| u32::try_from(p.as_raw()).ok())
    }

    /// Takes the stdin pipe (only when spawned with `stdin_piped`).
    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.stdin.take()
    }

    /// The next line of stdout, or `None` at end of output.
    pub async fn next_line(&mut self) -> Result<Option<String>> {
        match &mut self.stdout {
            Some(lines) => lines.next_line().await.map_err(|source| Error::Io {
                context: "reading stdout",
                source,
            }),
            None => Ok(None),
        }
    }

    /// Waits for exit and the end of stderr. Returns the exit code (-signal if killed) and stderr.
    pub async fn wait(mut self) -> Result<(i32, StderrCapture)> {
        let status = match self.child.as_mut() {
            Some(child) => child.wait().await.map_err(|source| Error::Io {
                context: "waiting for restic",
                source,
            })?,
            None => {
                return Err(Error::Io {
                    context: "waiting for restic",
                    source: std::io::Error::other("process already reaped"),
                });
            }
        };
        self.child = None; // reaped: nothing left for Drop to kill
        if let Some(task) = self.stderr_task.take() {
            let _ = task.await;
        }
        let capture = self.stderr.lock().map(|c| c.clone()).unwrap_or_default();
        let code = status.code().unwrap_or_else(|| {
            use std::os::unix::process::ExitStatusExt;
            -status.signal().unwrap_or(0)
        });
        Ok((code, capture))
    }

    /// Stops the process group now (SIGTERM, then SIGKILL after the grace period) and reaps it.
    pub async fn terminate(mut self) {
        if let Some(child) = self.child.take() {
            terminate_group(child, self.pgid, TERMINATE_GRACE).await;
        }
    }
}

impl Drop for ResticProcess {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // Still running (or exited but unreaped): stop the whole group and reap it.
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        tracing::info!(subcommand = %self.subcommand, pid = ?self.pgid, "stopping restic: its handle was dropped");
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                let pgid = self.pgid;
                handle.spawn(terminate_group(child, pgid, TERMINATE_GRACE));
            }
            Err(_) => {
                if let Some(pgid) = self.pgid {
                    let _ = killpg(pgid, Signal::SIGKILL);
                }
                let _ = child.start_kill();
            }
        }
    }
}

async fn terminate_group(mut child: Child, pgid: Option<Pid>, grace: Duration) {
    if let Some(pgid) = pgid {
        let _ = killpg(pgid, Signal::SIGTERM);
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        if let Some(pgid) = pgid {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
        let _ = child.kill().await;
    }
    // The group may hold helpers (rclone, ssh) that outlived restic itself.
    if let Some(pgid) = pgid {
        let _ = killpg(pgid, Signal::SIGKILL);
    }
}

async fn capture_stderr<R: AsyncRead + Unpin>(stream: R, sink: Arc<Mutex<StderrCapture>>) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(mut cap) = sink.lock() else { return };
        // restic 0.14 writes backup item errors as JSON on stderr.
        if line.starts_with('{')
            && let Ok(BackupMessage::Error(e)) = serde_json::from_str::<BackupMessage>(&line)
        {
            if cap.item_errors.len() < MAX_ITEM_ERRORS {
                let message = e.message();
                cap.item_errors.push(ItemError {
                    item: e.item,
                    during: e.during,
                    message,
                });
            } else {
                cap.item_errors_dropped += 1;
            }
            continue;
        }
        cap.tail.push_str(&line);
        cap.tail.push('\n');
        if cap.tail.len() > 2 * STDERR_TAIL_BYTES {
            cap.tail = crate::error::tail(&cap.tail, STDERR_TAIL_BYTES);
            cap.tail.push('\n');
        }
    }
}

/// The parent environment restic may see: only what it needs to work, never our own secrets.
fn inherited_env() -> Vec<(String, String)> {
    const KEEP: &[&str] = &[
        "PATH",
        "HOME",
        "TMPDIR",
        "TZ",
        "LANG",
        "LC_ALL",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
    ];
    std::env::vars()
        .filter(|(k, _)| KEEP.contains(&k.as_str()))
        .collect()
}
