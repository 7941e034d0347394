//! An owned restic child process. It runs in its own process group; dropping the handle before it
//! exited terminates the whole group (SIGTERM, so restic can remove its lock; SIGKILL after a grace
//! period) and reaps it.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::task::JoinHandle;

use crate::command::CommandSpec;
use crate::error::{Error, ItemError, Result};
use crate::json::{BackupMessage, ExitError};

/// How long restic gets to clean up (remove its lock) after SIGTERM before SIGKILL.
pub const TERMINATE_GRACE: Duration = Duration::from_millis(1500);
/// Bytes of stderr kept for error messages.
const STDERR_TAIL_BYTES: usize = 16 * 1024;
/// JSON item errors kept per run; a tree with a million unreadable files must not eat memory.
const MAX_ITEM_ERRORS: usize = 100;
/// The longest line of restic's stdout taken (`snapshots --json` is one line: 20,000 snapshots
/// are about 20 MiB); a longer one is an error, not an allocation.
pub const STDOUT_LINE_MAX: usize = 128 * 1024 * 1024;
/// The longest stderr line kept; the rest of a longer one is read and dropped.
const STDERR_LINE_MAX: usize = 64 * 1024;

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
    stdout: Option<BufReader<ChildStdout>>,
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
        let stdout = child.stdout.take().map(BufReader::new);
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

    /// Takes stdout, for commands whose output is data (`dump`), not lines.
    pub fn take_stdout(&mut self) -> Option<BufReader<ChildStdout>> {
        self.stdout.take()
    }

    /// The next line of stdout (decoded lossily), or `None` at end of output.
    pub async fn next_line(&mut self) -> Result<Option<String>> {
        match &mut self.stdout {
            Some(out) => match read_line_bounded(out, STDOUT_LINE_MAX).await {
                Ok(Some((_, true))) => Err(Error::Io {
                    context: "reading stdout",
                    source: std::io::Error::other(format!(
                        "a line of restic's output is longer than {} MiB",
                        STDOUT_LINE_MAX >> 20
                    )),
                }),
                Ok(line) => Ok(line.map(|(l, _)| l)),
                Err(source) => Err(Error::Io {
                    context: "reading stdout",
                    source,
                }),
            },
            None => Ok(None),
        }
    }

    /// Stops the process group now, keeping the handle (for callers that own it by reference).
    pub async fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            terminate_group(child, self.pgid, TERMINATE_GRACE).await;
        }
    }

    /// Waits for exit and the end of stderr. Returns the exit code (-signal if killed) and stderr.
    pub async fn wait(mut self) -> Result<(i32, StderrCapture)> {
        self.wait_mut().await
    }

    /// [`ResticProcess::wait`] by reference.
    pub async fn wait_mut(&mut self) -> Result<(i32, StderrCapture)> {
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

/// One line, without its end, decoded lossily: restic prints file names as they are on disk, and a
/// name that is not UTF-8 must not end the reading. `None` at end of stream.
/// Reads one line, keeping at most `max` bytes of it: the rest of a longer line is read and
/// dropped (so the pipe keeps draining), and the line comes back cut, with `true`. `None` at the end.
pub(crate) async fn read_line_bounded<R: AsyncBufRead + Unpin>(
    r: &mut R,
    max: usize,
) -> std::io::Result<Option<(String, bool)>> {
    let (mut buf, mut cut, mut any) = (Vec::new(), false, false);
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            break;
        }
        any = true;
        let (take, end) = match chunk.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        let room = max.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..take.min(room)]);
        cut |= take > room;
        r.consume(take);
        if end {
            break;
        }
    }
    if !any {
        return Ok(None);
    }
    while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        buf.pop();
    }
    Ok(Some((String::from_utf8_lossy(&buf).into_owned(), cut)))
}

/// [`read_line_bounded`] without the mark, for tests of whole lines.
#[cfg(test)]
async fn read_line_lossy<R: AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<Option<String>> {
    Ok(read_line_bounded(r, usize::MAX).await?.map(|(l, _)| l))
}

async fn capture_stderr<R: AsyncRead + Unpin>(stream: R, sink: Arc<Mutex<StderrCapture>>) {
    let mut reader = BufReader::new(stream);
    while let Ok(Some((line, _))) = read_line_bounded(&mut reader, STDERR_LINE_MAX).await {
        let Ok(mut cap) = sink.lock() else { return };
        if line.starts_with('{') {
            // Item errors (restic 0.14 writes backup item errors as JSON on stderr).
            if let Ok(BackupMessage::Error(e)) = serde_json::from_str::<BackupMessage>(&line) {
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
            // restic 0.17+ ends a failed `--json` run with its message as JSON: keep the text, so
            // the tail reads like restic's plain output (and the lock report can be parsed).
            if let Ok(exit) = serde_json::from_str::<ExitError>(&line)
                && exit.message_type == "exit_error"
            {
                push_tail(&mut cap, &exit.message);
                continue;
            }
        }
        push_tail(&mut cap, &line);
    }
}

fn push_tail(cap: &mut StderrCapture, text: &str) {
    cap.tail.push_str(text);
    cap.tail.push('\n');
    if cap.tail.len() > 2 * STDERR_TAIL_BYTES {
        cap.tail = crate::error::tail(&cap.tail, STDERR_TAIL_BYTES);
        cap.tail.push('\n');
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_overlong_line_is_cut_and_the_next_one_still_read() {
        let mut data = vec![b'x'; 100];
        data.extend_from_slice(b"\nnext\n");
        // A small buffer, so the long line spans several fills.
        let mut r = BufReader::with_capacity(8, data.as_slice());
        let (line, cut) = read_line_bounded(&mut r, 10).await.unwrap().unwrap();
        assert_eq!((line.len(), cut), (10, true));
        let (line, cut) = read_line_bounded(&mut r, 10).await.unwrap().unwrap();
        assert_eq!((line.as_str(), cut), ("next", false));
        assert_eq!(read_line_bounded(&mut r, 10).await.unwrap(), None);
    }

    #[tokio::test]
    async fn lines_that_are_not_utf8_do_not_stop_the_reading() {
        let data: &[u8] = b"first\nname \xff\xfe here\r\nlast";
        let mut r = BufReader::new(data);
        assert_eq!(
            read_line_lossy(&mut r).await.unwrap().as_deref(),
            Some("first")
        );
        let second = read_line_lossy(&mut r).await.unwrap().unwrap();
        assert!(
            second.starts_with("name ") && second.ends_with(" here"),
            "{second}"
        );
        assert_eq!(
            read_line_lossy(&mut r).await.unwrap().as_deref(),
            Some("last")
        );
        assert_eq!(read_line_lossy(&mut r).await.unwrap(), None);
    }

    #[tokio::test]
    async fn stderr_capture_keeps_exit_messages_and_survives_bad_bytes() {
        let data: &[u8] = b"bad \xff byte\n{\"message_type\":\"exit_error\",\"code\":11,\"message\":\"unable to create lock in backend: repository is already locked by PID 7 on h by u\\nstorage ID abcd1234\"}\n";
        let sink = Arc::new(Mutex::new(StderrCapture::default()));
        capture_stderr(data, Arc::clone(&sink)).await;
        let tail = sink.lock().unwrap().tail.clone();
        assert!(tail.starts_with("bad "), "{tail}");
        let lock = crate::LockInfo::parse(&tail).unwrap();
        assert_eq!((lock.pid, lock.storage_id.as_str()), (Some(7), "abcd1234"));
    }
}
