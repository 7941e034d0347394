//! Running a command in a pod on this node through the Kubernetes exec API (the coordinator asks;
//! the agent only ever execs into pods scheduled on its own node). The command runs under `sh -c`,
//! wrapped so that its PID is known: a command that outlives its timeout, or whose stream we stop,
//! is killed with its whole process tree by a second exec, so nothing is left running in the pod.
//!
//! A pipeline fails when any part of it fails (`pipefail`): `pg_dump | gzip` must not report
//! gzip's success over pg_dump's failure. The container's `sh` gets `-o pipefail` where it has it
//! (busybox, bash as sh); where it has not (dash, as in Debian-based images), `bash -o pipefail`
//! runs the command if the container has bash; only a container with neither runs it without.
//!
//! Length: over 500 lines with its unit tests; the code is under 400.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Status;
use kube::api::{AttachParams, AttachedProcess};
use kube::{Api, Client};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use crate::error::AgentError;
use stowage_common::kube_errors::sentence;

/// Bytes of a command's stderr kept for messages (the end, where the error usually is).
pub const STDERR_KEPT: usize = 4096;
/// The pipe from the exec stream's stdout to our reader: a few WebSocket frames.
const STDOUT_PIPE: usize = 1 << 20;
/// API calls around an exec (reading the pod, opening the stream, the kill) are bounded by this.
const API_TIMEOUT: Duration = Duration::from_secs(30);
/// The wrapper's first stderr line: `stowage-exec-pid=<pid>`.
const PID_PREFIX: &str = "stowage-exec-pid=";

/// Where and what to run.
#[derive(Debug, Clone)]
pub struct ExecTarget {
    pub namespace: String,
    pub pod: String,
    /// Empty: the pod's first container.
    pub container: String,
    /// A shell command line, as a user wrote it in an annotation.
    pub command: String,
}

/// How much of a command line a log line or an error shows: an annotation may hold 256 KiB.
pub const COMMAND_SHOWN: usize = 256;

impl ExecTarget {
    /// The command (its first [`COMMAND_SHOWN`] bytes) and where it runs, for logs and errors.
    pub fn describe(&self) -> String {
        let shown = if self.command.len() > COMMAND_SHOWN {
            let mut end = COMMAND_SHOWN;
            while !self.command.is_char_boundary(end) {
                end -= 1;
            }
            format!("{}… ({} bytes)", &self.command[..end], self.command.len())
        } else {
            self.command.clone()
        };
        format!(
            "`{shown}` in {}/{} (container {})",
            self.namespace, self.pod, self.container
        )
    }
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Exit status 0.
    Success,
    /// A non-zero exit status.
    Code(i32),
    /// The API server reported a failure without an exit status (the container went away, ...).
    Failed(String),
    /// The stream ended without any status: the connection broke.
    Broken,
}

impl Exit {
    /// The exit status to show: 0, the command's, or -1 when there is none.
    pub fn code(&self) -> i32 {
        match self {
            Exit::Success => 0,
            Exit::Code(c) => *c,
            Exit::Failed(_) | Exit::Broken => -1,
        }
    }

    /// From the status object of the exec stream. The kubelet reports a non-zero exit as reason
    /// `NonZeroExitCode` with an `ExitCode` cause; kwok only as the message "exit status N".
    pub fn from_status(status: Option<Status>) -> Exit {
        let Some(s) = status else {
            return Exit::Broken;
        };
        if s.status.as_deref() == Some("Success") {
            return Exit::Success;
        }
        let from_cause = s
            .details
            .as_ref()
            .and_then(|d| d.causes.as_ref())
            .and_then(|causes| {
                causes
                    .iter()
                    .find(|c| c.reason.as_deref() == Some("ExitCode"))
                    .and_then(|c| c.message.as_deref())
                    .and_then(|m| m.trim().parse::<i32>().ok())
            });
        let message = s.message.unwrap_or_default();
        let from_message = message
            .rsplit_once("exit status ")
            .and_then(|(_, n)| n.trim().parse::<i32>().ok())
            .or_else(|| {
                message
                    .rsplit_once("exit code ")
                    .and_then(|(_, n)| n.trim().parse::<i32>().ok())
            });
        match from_cause.or(from_message) {
            Some(0) => Exit::Success,
            Some(c) => Exit::Code(c),
            None => Exit::Failed(message),
        }
    }
}

/// The command line that runs `command`, with `pipefail` where the container's shells allow it, and
/// first tells us its PID on stderr (every branch `exec`s, so the PID stays the command's).
fn wrapped(command: &str) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!(
            "echo {PID_PREFIX}$$ >&2; \
             if (set -o pipefail) 2>/dev/null; then exec sh -o pipefail -c \"$1\"; fi; \
             if command -v bash >/dev/null 2>&1; then exec bash -o pipefail -c \"$1\"; fi; \
             exec sh -c \"$1\""
        ),
        "stowage".into(),
        command.into(),
    ]
}

/// A shell script that stops `pid`, kills its descendants (depth first, from
/// /proc/<pid>/task/*/children), then kills it.
fn kill_tree_script(pid: u32) -> String {
    format!(
        "k() {{ kill -STOP $1 2>/dev/null; for c in $(cat /proc/$1/task/*/children 2>/dev/null); do k $c; done; kill -KILL $1 2>/dev/null; }}; k {pid}"
    )
}

/// What stderr said so far: the wrapper's PID (as soon as it arrives) and the end of the rest.
#[derive(Debug, Default)]
struct Stderr {
    pid: Option<u32>,
    kept: Vec<u8>,
}

type SharedStderr = std::sync::Arc<std::sync::Mutex<Stderr>>;

/// A started command: its stdout to read (and its stdin to write, when asked for), its stderr
/// collected in the background.
pub struct Started {
    pub process: AttachedProcess,
    pub stdout: Box<dyn AsyncRead + Send + Unpin>,
    /// Dropping it ends the command's stdin (EOF).
    pub stdin: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    stderr: tokio::task::JoinHandle<()>,
    seen: SharedStderr,
    pods: Api<Pod>,
    target: ExecTarget,
}

/// The pod if it is on `node`; `NotFound` otherwise (a pod elsewhere is another agent's).
pub async fn pod_on_node(
    client: &Client,
    target: &ExecTarget,
    node: &str,
) -> Result<Pod, AgentError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &target.namespace);
    let pod = tokio::time::timeout(API_TIMEOUT, pods.get_opt(&target.pod))
        .await
        .map_err(|_| {
            AgentError::Kubernetes(format!(
                "reading pod {}/{} timed out",
                target.namespace, target.pod
            ))
        })?
        .map_err(|e| {
            AgentError::Kubernetes(format!(
                "reading pod {}/{}: {}",
                target.namespace,
                target.pod,
                sentence(&e)
            ))
        })?;
    let on_node = pod
        .as_ref()
        .and_then(|p| p.spec.as_ref())
        .and_then(|s| s.node_name.as_deref())
        == Some(node);
    match pod {
        Some(p) if on_node => Ok(p),
        _ => Err(AgentError::PodNotFound {
            namespace: target.namespace.clone(),
            pod: target.pod.clone(),
            node: node.to_string(),
        }),
    }
}

/// Resolves the container (the first when none is named) and checks it exists.
pub fn container_of(pod: &Pod, wanted: &str) -> Result<String, AgentError> {
    let names: Vec<String> = pod
        .spec
        .as_ref()
        .map(|s| s.containers.iter().map(|c| c.name.clone()).collect())
        .unwrap_or_default();
    if wanted.is_empty() {
        return names
            .into_iter()
            .next()
            .ok_or_else(|| AgentError::InvalidArgument("the pod has no containers".into()));
    }
    if names.iter().any(|n| n == wanted) {
        Ok(wanted.to_string())
    } else {
        Err(AgentError::InvalidArgument(format!(
            "container {wanted:?} is not in the pod (it has {})",
            names.join(", ")
        )))
    }
}

/// Starts the command, with a stdin to write when `stdin` is set; stderr is drained in the
/// background (an undrained stderr would stall the stream), keeping its last [`STDERR_KEPT`] bytes.
pub async fn start(
    client: &Client,
    target: &ExecTarget,
    stdin: bool,
) -> Result<Started, AgentError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &target.namespace);
    // kube's pipe between the WebSocket and us is 1 KiB unless told otherwise: every frame would
    // then cross it in 1 KiB pieces (measured: a third slower on a 1 GiB stream).
    let params = AttachParams::default()
        .container(target.container.clone())
        .stdin(stdin)
        .stdout(true)
        .stderr(true)
        .max_stdout_buf_size(STDOUT_PIPE)
        .max_stderr_buf_size(STDERR_KEPT);
    let mut process = tokio::time::timeout(
        API_TIMEOUT,
        pods.exec(&target.pod, wrapped(&target.command), &params),
    )
    .await
    .map_err(|_| AgentError::Kubernetes(format!("starting {} timed out", target.describe())))?
    .map_err(|e| {
        AgentError::Kubernetes(format!("starting {}: {}", target.describe(), sentence(&e)))
    })?;
    let stdout = process
        .stdout()
        .ok_or_else(|| AgentError::Kubernetes("the exec stream has no stdout".into()))?;
    let stderr = process
        .stderr()
        .ok_or_else(|| AgentError::Kubernetes("the exec stream has no stderr".into()))?;
    let input = if stdin {
        let w = process
            .stdin()
            .ok_or_else(|| AgentError::Kubernetes("the exec stream has no stdin".into()))?;
        Some(Box::new(w) as Box<dyn AsyncWrite + Send + Unpin>)
    } else {
        None
    };
    let seen = SharedStderr::default();
    Ok(Started {
        process,
        stdout: Box::new(stdout),
        stdin: input,
        stderr: tokio::spawn(collect_stderr(stderr, std::sync::Arc::clone(&seen))),
        seen,
        pods,
        target: target.clone(),
    })
}

/// Reads stderr to its end into `seen`: the wrapper's PID line as soon as it is complete, and the
/// last [`STDERR_KEPT`] bytes of the rest.
async fn collect_stderr(mut r: impl AsyncRead + Unpin, seen: SharedStderr) {
    let mut buf = [0u8; 4096];
    let mut first_line = true;
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let Ok(mut s) = seen.lock() else { break };
        s.kept.extend_from_slice(&buf[..n]);
        if first_line && let Some(end) = s.kept.iter().position(|b| *b == b'\n') {
            let line = String::from_utf8_lossy(&s.kept[..end]).to_string();
            if let Some(p) = line.trim().strip_prefix(PID_PREFIX) {
                s.pid = p.parse().ok();
                s.kept.drain(..=end);
            }
            first_line = false;
        }
        if s.kept.len() > STDERR_KEPT {
            let extra = s.kept.len() - STDERR_KEPT;
            s.kept.drain(..extra);
        }
    }
}

impl Stderr {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.kept).trim().to_string()
    }
}

/// What a finished (or stopped) command left: its exit and the end of its stderr.
pub struct Finished {
    pub exit: Exit,
    pub stderr: String,
}

impl Started {
    /// Waits for the exit status (after stdout ended), at most `within`.
    pub async fn wait(mut self, within: Duration) -> Result<Finished, (Self, Duration)> {
        let Some(status) = self.process.take_status() else {
            return Ok(self.collect(Exit::Broken).await);
        };
        match tokio::time::timeout(within, status).await {
            Ok(s) => Ok(self.collect(Exit::from_status(s)).await),
            Err(_) => Err((self, within)),
        }
    }

    async fn collect(self, exit: Exit) -> Finished {
        // The stream ended: stderr ends with it (bounded, should the API server linger).
        let _ = tokio::time::timeout(Duration::from_secs(5), self.stderr).await;
        let stderr = self.seen.lock().map(|s| s.text()).unwrap_or_default();
        Finished { exit, stderr }
    }

    /// The wrapper's PID, waiting briefly for its line when the command was stopped very early.
    async fn pid(seen: SharedStderr) -> Option<u32> {
        for _ in 0..20 {
            if let Some(pid) = seen.lock().ok().and_then(|s| s.pid) {
                return Some(pid);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// Kills the command and everything it started, then closes the stream. Best effort, bounded:
    /// what could not be killed is logged. Returns the end of its stderr.
    pub async fn kill(self) -> String {
        let pid = Self::pid(std::sync::Arc::clone(&self.seen)).await;
        let stderr = self.seen.lock().map(|s| s.text()).unwrap_or_default();
        match pid {
            Some(pid) => {
                let params = AttachParams::default()
                    .container(self.target.container.clone())
                    .stdin(false)
                    .stdout(false)
                    .stderr(true);
                let cmd = ["sh".to_string(), "-c".into(), kill_tree_script(pid)];
                let killed = async {
                    let p = self
                        .pods
                        .exec(&self.target.pod, cmd, &params)
                        .await
                        .map_err(|e| sentence(&e))?;
                    p.join().await.map_err(|e| e.to_string())
                };
                match tokio::time::timeout(API_TIMEOUT, killed).await {
                    Ok(Ok(())) => {
                        tracing::info!(command = %self.target.describe(), pid, "killed the command and its children")
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(command = %self.target.describe(), pid, error = %e, "could not kill the command")
                    }
                    Err(_) => {
                        tracing::warn!(command = %self.target.describe(), pid, "killing the command timed out")
                    }
                }
            }
            None => {
                tracing::warn!(command = %self.target.describe(), "the command's PID is unknown; it may still run")
            }
        }
        self.process.abort();
        self.stderr.abort();
        stderr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_command_is_shown_cut_with_its_length() {
        let t = ExecTarget {
            namespace: "shop".into(),
            pod: "db-0".into(),
            container: "pg".into(),
            command: format!("é{}", "x".repeat(200 * 1024)),
        };
        let d = t.describe();
        assert!(d.len() < COMMAND_SHOWN + 100, "{} bytes", d.len());
        assert!(
            d.contains("… (204802 bytes)` in shop/db-0 (container pg)"),
            "{d}"
        );
    }
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{StatusCause, StatusDetails};

    fn failure(message: &str, cause: Option<&str>) -> Option<Status> {
        Some(Status {
            status: Some("Failure".into()),
            message: Some(message.into()),
            reason: cause.map(|_| "NonZeroExitCode".into()),
            details: cause.map(|c| StatusDetails {
                causes: Some(vec![StatusCause {
                    reason: Some("ExitCode".into()),
                    message: Some(c.into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    #[test]
    fn exit_codes_from_the_kubelet_and_from_kwok() {
        let ok = Some(Status {
            status: Some("Success".into()),
            ..Default::default()
        });
        assert_eq!(Exit::from_status(ok), Exit::Success);
        // The kubelet: an ExitCode cause.
        let kubelet = failure(
            "command terminated with non-zero exit code: error executing command [sh -c x], exit code 3",
            Some("3"),
        );
        assert_eq!(Exit::from_status(kubelet), Exit::Code(3));
        // kwok: only the message.
        assert_eq!(
            Exit::from_status(failure("exit status 7", None)),
            Exit::Code(7)
        );
        assert_eq!(
            Exit::from_status(failure("container not found", None)),
            Exit::Failed("container not found".into())
        );
        assert_eq!(Exit::from_status(None), Exit::Broken);
        assert_eq!(Exit::Broken.code(), -1);
    }

    #[test]
    fn the_wrapper_reports_its_pid_and_keeps_the_command_whole() {
        let argv = wrapped("pg_dump -U app 'my db' | gzip");
        assert_eq!(argv[0], "sh");
        assert_eq!(argv[4], "pg_dump -U app 'my db' | gzip");
        let out = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with(PID_PREFIX), "{err}");
    }

    /// Here `sh` is dash (no pipefail) and bash exists: the failure inside the pipeline is the
    /// command's, and a plain command keeps its status.
    #[test]
    fn a_failure_anywhere_in_a_pipeline_fails_the_command() {
        let status = |cmd: &str| {
            let argv = wrapped(cmd);
            std::process::Command::new(&argv[0])
                .args(&argv[1..])
                .output()
                .unwrap()
                .status
                .code()
        };
        assert_eq!(status("exit 3 | cat"), Some(3));
        assert_eq!(
            status("cat /nonexistent-stowage | gzip > /dev/null"),
            Some(1)
        );
        assert_eq!(status("echo ok | cat >/dev/null"), Some(0));
        assert_eq!(status("exit 4"), Some(4));
    }

    #[tokio::test]
    async fn stderr_keeps_the_pid_line_apart_and_only_the_end() {
        let mut text = format!("{PID_PREFIX}4242\n").into_bytes();
        text.extend(std::iter::repeat_n(b'x', 3 * STDERR_KEPT));
        text.extend_from_slice(b"the real error");
        let seen = SharedStderr::default();
        collect_stderr(&text[..], std::sync::Arc::clone(&seen)).await;
        let s = seen.lock().unwrap();
        assert_eq!(s.pid, Some(4242));
        assert_eq!(s.kept.len(), STDERR_KEPT);
        assert!(s.kept.ends_with(b"the real error"));
    }

    #[test]
    fn the_kill_script_kills_a_process_tree() {
        let mut parent = std::process::Command::new("sh")
            .args(["-c", "sleep 600 & sleep 600 & wait"])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let children = std::fs::read_to_string(format!(
            "/proc/{}/task/{}/children",
            parent.id(),
            parent.id()
        ))
        .unwrap();
        let kids: Vec<u32> = children
            .split_whitespace()
            .map(|c| c.parse().unwrap())
            .collect();
        assert_eq!(kids.len(), 2, "{children}");
        let status = std::process::Command::new("sh")
            .args(["-c", &kill_tree_script(parent.id())])
            .status()
            .unwrap();
        assert!(status.success());
        parent.wait().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        for k in kids {
            let alive = std::fs::read_to_string(format!("/proc/{k}/stat"))
                .is_ok_and(|s| !s.contains(") Z "));
            assert!(!alive, "child {k} survived");
        }
    }
}
