//! Support for Stowage's integration and end-to-end tests: real binaries, real restic, real servers,
//! all on loopback, every process bounded in time and stopped when its guard drops.

pub mod agent;
pub mod bench;
pub mod cluster;
pub mod coordinator;
pub mod csi_local;
pub mod env;
pub mod fstree;
pub mod kubectl_stowage;
pub mod kubelet_emu;
pub mod moto;
pub mod pod_runner;
pub mod procs;
pub mod proxy;
pub mod real_node;
pub mod rest_server;
pub mod restic;
pub mod tls;

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A free TCP port on the given loopback address (bind to 0, read, release).
pub fn free_port(ip: &str) -> u16 {
    let l = TcpListener::bind((ip, 0)).expect("bind loopback");
    l.local_addr().expect("local addr").port()
}

/// The profile directory this program runs from: target/debug for tests (which live in
/// target/debug/deps), target/release for the release-built bench.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    if dir.ends_with("deps") {
        dir.parent().expect("profile dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

fn running_as_test() -> bool {
    std::env::current_exe().is_ok_and(|e| e.parent().is_some_and(|d| d.ends_with("deps")))
}

/// The path of workspace binary `name`. Tests build the binaries once per process first; programs
/// such as the bench use the binaries built beside them.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        // scripts/test builds them before any test starts (`STOWAGE_BINARIES_BUILT`), so that
        // tests run in processes of their own (nextest) do not each ask cargo.
        if !running_as_test() || std::env::var_os("STOWAGE_BINARIES_BUILT").is_some() {
            return;
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "--quiet", "--bins"])
            .env_clear()
            .envs(user_env())
            .current_dir(workspace_root())
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build --bins failed");
    });
    let p = target_dir().join(name);
    assert!(p.exists(), "{} not built", p.display());
    p
}

/// The environment a user's shell would give a build: the variables `cargo test` and nextest set
/// for test processes (`CARGO_*`, `NEXTEST_*`) left out, since they change build-script
/// fingerprints and would make the next build from a shell rebuild half the dependencies.
pub fn user_env() -> impl Iterator<Item = (String, String)> {
    const KEEP: [&str; 12] = [
        "PATH",
        "HOME",
        "CARGO_HOME",
        "RUSTUP_HOME",
        "RUSTUP_TOOLCHAIN",
        "TMPDIR",
        "CARGO_TARGET_DIR",
        "CARGO_INCREMENTAL",
        "STOWAGE_CACHE",
        "GOCACHE",
        "GOMODCACHE",
        "GOFLAGS",
    ];
    std::env::vars().filter(|(k, _)| KEEP.contains(&k.as_str()))
}

/// The pinned Helm (scripts/install-helm builds it once); panics when it cannot be had.
pub fn helm() -> String {
    let out = std::process::Command::new(workspace_root().join("scripts/install-helm"))
        .output()
        .expect("scripts/install-helm");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub async fn wait_until<F: FnMut() -> bool>(what: &str, timeout: Duration, mut cond: F) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// A minimal HTTP/1.0 GET (metrics and health endpoints): (status code, body); `None` when the
/// server does not answer within a few seconds.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: stowage\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// Fails unless `promtool check metrics` accepts `text` (Prometheus's own exposition linter).
pub fn promtool_check(text: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (apt-get install prometheus)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits for `child` to exit, `timeout` at most; past it the child is stopped ([`terminate`]) and
/// `None` returned.
pub fn wait_within(
    child: &mut std::process::Child,
    timeout: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            terminate(child);
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (30 s at most) until `addr` answers `/healthz` with 200; fails with the process's log if
/// `child` exits first or time runs out.
pub async fn wait_healthy(
    child: &mut std::process::Child,
    addr: std::net::SocketAddr,
    what: &str,
    log: &std::path::Path,
) {
    let log_text = || std::fs::read_to_string(log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("{what} exited early ({status}); log:\n{}", log_text());
        }
        if http_get(addr, "/healthz")
            .await
            .is_some_and(|(code, _)| code == 200)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not healthy within 30s; log:\n{}",
            log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stops a child process: SIGTERM, up to 10 s to exit, then SIGKILL; always reaped.
pub fn terminate(child: &mut std::process::Child) {
    if let Ok(None) = child.try_wait() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Unmounts every mount point at or below `dir` (lazily, deepest first): what the test volume helpers
/// mounted, so that the directory can be removed.
pub fn unmount_below(dir: &std::path::Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<std::path::PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| std::path::PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&p)
            .status();
    }
}
