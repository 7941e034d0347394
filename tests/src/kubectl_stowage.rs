//! `kubectl stowage`, run the way a user runs it: by the real kubectl, which finds the plugin on
//! PATH. One runner for the plugin's tests and the demo, so both exercise the same invocation.

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::cluster::Cluster;

/// The longest a `kubectl stowage` call may take (a `--wait` follows a whole run) before it is
/// killed and reported as timed out.
pub const TIMEOUT: Duration = Duration::from_secs(300);

/// `kubectl stowage -n <ns> <args>` against `cluster` (its kubeconfig in `KUBECONFIG`), with the
/// workspace's plugin first on PATH. Killed after [`TIMEOUT`]; its exit status then says so.
pub fn run(cluster: &Cluster, ns: &str, args: &[&str]) -> Output {
    let plugin = crate::binary("kubectl-stowage");
    let plugin_dir = plugin.parent().expect("plugin directory");
    let path = format!(
        "{}:{}",
        plugin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut child = Command::new(cluster.kubectl())
        .arg("stowage")
        .args(["-n", ns])
        .args(args)
        .env("PATH", path)
        .env("KUBECONFIG", cluster.kubeconfig())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kubectl stowage");
    // Both pipes drained at once, so a chatty stderr cannot block the plugin on a full pipe.
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let Some(status) = crate::wait_within(&mut child, TIMEOUT) else {
        panic!(
            "kubectl stowage {} did not finish within {TIMEOUT:?}",
            args.join(" ")
        );
    };
    Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// Reads `pipe` to its end on a thread of its own.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    })
}
