//! `tests/cluster/down` leaves nothing of a real node behind: a cluster of this test's own (its own
//! directory and ports) runs a pod with a CSI volume on its real node, so that there are shims,
//! container and volume mounts, pod cgroups and a pod network namespace; after `down`, none of
//! them, no process, no iptables rule and no changed kernel setting remains on the host.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Ports of this test's cluster: clear of the suite's (16600), the demo's (16800) and the bench's (17200).
const PORT_BASE: &str = "17400";
const SYSCTLS: [&str; 6] = [
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
];

fn sysctls() -> Vec<String> {
    SYSCTLS
        .iter()
        .map(|s| {
            std::fs::read_to_string(format!("/proc/sys/{}", s.replace('.', "/")))
                .unwrap_or_default()
        })
        .collect()
}

fn output(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn script(dir: &Path, name: &str, args: &[&str]) -> std::process::ExitStatus {
    Command::new(
        stowage_tests::workspace_root()
            .join("tests/cluster")
            .join(name),
    )
    .args(args)
    .env("STOWAGE_CLUSTER_DIR", dir)
    .env("STOWAGE_CLUSTER_PORT_BASE", PORT_BASE)
    .status()
    .expect("run a cluster script")
}

/// Every host-side trace of a real node whose files live in `dir`.
fn traces(dir: &Path, netns: &str, cgroup: &str) -> Vec<String> {
    let d = dir.display().to_string();
    // A deep checkout's sockets live in a directory of their own (tests/cluster/real-node): the
    // shims and relays name it, not the cluster's directory.
    let sockets = format!("/tmp/stowage-rn-{PORT_BASE}");
    let mut found = Vec::new();
    for (pid, cmd) in stowage_tests::procs::cmdlines_with_pids() {
        if cmd.contains(&d) || cmd.contains(&sockets) {
            found.push(format!("process {pid}: {cmd}"));
        }
    }
    for line in std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
    {
        if line.contains(&d) {
            found.push(format!("mount: {line}"));
        }
    }
    if Path::new(&sockets).exists() {
        found.push(format!("socket directory {sockets}"));
    }
    if output(Command::new("ip").args(["netns", "list"])).contains(netns) {
        found.push(format!("network namespace {netns}"));
    }
    for entry in std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("cni-") {
            found.push(format!("pod network namespace /run/netns/{name}"));
        }
    }
    let name = Path::new(cgroup)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let path = hierarchy.path().join(cgroup.trim_start_matches('/'));
        if !name.is_empty() && path.exists() {
            found.push(format!("cgroup {}", path.display()));
        }
    }
    found
}

/// Runs `down` if the test fails before its own `down`, so a failed run leaves nothing either.
struct DownOnDrop(std::path::PathBuf);

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        if self.0.exists() {
            let _ = script(&self.0, "down", &[]);
        }
    }
}

/// Long (~30 s): it starts a control plane and a real node of its own, to tear them down.
#[test]
fn down_leaves_nothing_of_the_real_node_behind() {
    let dir = tempfile::Builder::new()
        .prefix("teardown-cluster-")
        .tempdir_in(stowage_tests::target_dir())
        .expect("cluster dir");
    let dir = dir.path().to_path_buf();
    let sysctls_before = sysctls();
    let iptables_before = output(Command::new("iptables-save").env("LC_ALL", "C"))
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with(':') && !l.starts_with('['))
        .map(String::from)
        .collect::<Vec<_>>();
    let netns_before = output(Command::new("ip").args(["netns", "list"]));
    // `ip netns add` mounts /run/netns the first time; down undoes it when it was the node's doing.
    let run_netns_mounted = || {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split(' ').nth(4) == Some("/run/netns"))
    };
    let run_netns_before = run_netns_mounted();

    let _down = DownOnDrop(dir.clone());
    assert!(
        script(&dir, "up", &["--nodes", "1", "--real-node"]).success(),
        "up"
    );
    let env = std::fs::read_to_string(dir.join("env")).expect("env");
    let get = |k: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("export {k}='"))?.strip_suffix('\''))
            .map(String::from)
            .unwrap_or_else(|| panic!("{k} in env"))
    };
    let (netns, cgroup, kubeconfig) = (
        get("STOWAGE_REAL_NODE_NETNS"),
        get("STOWAGE_REAL_NODE_CGROUP"),
        get("KUBECONFIG"),
    );
    let kubectl = Path::new(&get("STOWAGE_CLUSTER_BIN")).join("kubectl");
    let pod = r#"
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: data, namespace: default}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: stowage-local
  resources: {requests: {storage: 1Gi}}
---
apiVersion: v1
kind: Pod
metadata: {name: app, namespace: default}
spec:
  nodeSelector: {stowage.dev/real-node: "true"}
  tolerations: [{key: stowage.dev/real-node, operator: Exists}]
  containers:
  - name: app
    image: stowage.local/testbox:0.1.0
    command: [sh, -c, "echo hi > /data/x; exec sleep 100000"]
    volumeMounts: [{name: data, mountPath: /data}, {name: tmp, mountPath: /tmp}]
  volumes:
  - {name: data, persistentVolumeClaim: {claimName: data}}
  - {name: tmp, emptyDir: {}}
"#;
    let mut apply = Command::new(&kubectl)
        .args(["apply", "-f", "-"])
        .env("KUBECONFIG", &kubeconfig)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl");
    std::io::Write::write_all(&mut apply.stdin.take().expect("stdin"), pod.as_bytes())
        .expect("write");
    assert!(apply.wait().expect("kubectl").success());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ready = output(
            Command::new(&kubectl)
                .args([
                    "get",
                    "pod",
                    "app",
                    "-o",
                    "jsonpath={.status.containerStatuses[0].ready}",
                ])
                .env("KUBECONFIG", &kubeconfig),
        );
        if ready == "true" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pod did not start on the real node"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let during = traces(&dir, &netns, &cgroup);
    assert!(
        during.iter().any(|t| t.contains("containerd-shim")),
        "a shim ran: {during:#?}"
    );
    assert!(
        during.iter().any(|t| t.starts_with("cgroup")),
        "{during:#?}"
    );
    assert!(
        during.iter().any(|t| t.starts_with("network namespace")),
        "{during:#?}"
    );

    assert!(script(&dir, "down", &[]).success(), "down");
    let after = traces(&dir, &netns, &cgroup);
    assert!(after.is_empty(), "left behind: {after:#?}");
    assert!(!dir.exists(), "the state directory is removed");
    assert_eq!(
        sysctls(),
        sysctls_before,
        "the kubelet's sysctls are put back"
    );
    let iptables_after = output(Command::new("iptables-save").env("LC_ALL", "C"))
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with(':') && !l.starts_with('['))
        .map(String::from)
        .collect::<Vec<_>>();
    assert_eq!(
        iptables_after, iptables_before,
        "no iptables rule on the host"
    );
    assert_eq!(
        output(Command::new("ip").args(["netns", "list"])),
        netns_before
    );
    assert_eq!(
        run_netns_mounted(),
        run_netns_before,
        "/run/netns as it was"
    );
}
