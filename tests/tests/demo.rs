//! The README's first command, `scripts/demo`, run as a user runs it: a control plane of its own
//! (its own directory and ports), the chart installed, backups through `kubectl stowage`, an
//! in-place restore, metrics and an alert. It must exit 0 and leave nothing running. Without this
//! test a change to the harness can break the demo while every other test passes (it happened:
//! the chart's DaemonSet name).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Ports of its own: the suite's cluster is at 16600, a user's demo at 16800.
const PORT_BASE: &str = "18600";
/// Everything is built before the suite starts, so the demo only runs: about 45 s here.
const TIMEOUT: Duration = Duration::from_secs(480);

/// Stops the demo's cluster whatever happens to the test (the demo's own trap does too, unless it
/// is killed).
struct DownOnDrop(PathBuf);

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        let _ = Command::new(stowage_tests::workspace_root().join("tests/cluster/down"))
            .env("STOWAGE_CLUSTER_DIR", &self.0)
            .env("STOWAGE_CLUSTER_PORT_BASE", PORT_BASE)
            .status();
    }
}

fn demo_log(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text.len().saturating_sub(6000);
    let mut cut = start;
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    text[cut..].to_string()
}

/// Long (~45 s): a control plane of its own, the chart installed, two backups and a restore.
#[test]
fn the_demo_succeeds_and_leaves_nothing_running() {
    let root = stowage_tests::workspace_root();
    let dir = tempfile::Builder::new()
        .prefix("demo-test-")
        .tempdir_in(root.join("target"))
        .expect("tmp");
    let cluster = dir.path().join("cluster");
    let _down = DownOnDrop(cluster.clone());
    let log_path = dir.path().join("demo.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let mut child = Command::new(root.join("scripts/demo"))
        // As a user's shell runs it: none of the test runner's CARGO_* variables.
        .env_clear()
        .envs(stowage_tests::user_env())
        .env("STOWAGE_DEMO_CLUSTER_DIR", &cluster)
        .env("STOWAGE_DEMO_PORT_BASE", PORT_BASE)
        .env("TMPDIR", dir.path())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .current_dir(&root)
        .spawn()
        .expect("run scripts/demo");
    let Some(status) = stowage_tests::wait_within(&mut child, TIMEOUT) else {
        panic!(
            "scripts/demo did not finish within {TIMEOUT:?}:\n{}",
            demo_log(&log_path)
        );
    };
    let text = demo_log(&log_path);
    assert!(status.success(), "scripts/demo failed ({status}):\n{text}");
    assert!(text.contains("demo succeeded"), "{text}");
    // The demo tore its cluster down: no process of it is left.
    let pids = cluster.join("pids");
    let alive: Vec<String> = std::fs::read_dir(&pids)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter(|pid| Path::new(&format!("/proc/{}", pid.trim())).exists())
        .collect();
    assert!(alive.is_empty(), "processes left running: {alive:?}");
}
