//! The local control plane is real: pods scheduled and Running on kwok nodes, exec through
//! kube-apiserver into kwok's kubelet API, PVC binding by the controller-manager, DaemonSets on every
//! node, and kubelet-style bind mounts of PV data that follow the pod's lifecycle.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, AttachParams, DeleteParams, PostParams};
use stowage_tests::cluster::{Cluster, pod_running, pvc_bound, wait_for};
use stowage_tests::env::TestEnv;
use tokio::io::AsyncReadExt;

fn json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).expect("valid object")
}

#[tokio::test]
async fn pods_run_on_kwok_nodes_and_exec_goes_through_the_apiserver() {
    let TestEnv {
        cluster: _,
        client,
        ns,
    } = TestEnv::bare("smoke").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod: Pod = json(serde_json::json!({
        "metadata": {"name": "app"},
        "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}],
                 "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                     {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": ["node-2"]}]}]}}}}
    }));
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    wait_for("pod Running", Duration::from_secs(30), || {
        pod_running(&pods, "app")
    })
    .await;
    let p = pods.get("app").await.expect("get");
    assert_eq!(
        p.spec.and_then(|s| s.node_name).as_deref(),
        Some("node-2"),
        "placed by the scheduler"
    );

    // exec: kube-rs -> kube-apiserver -> kwok's kubelet server, which runs the command locally.
    let mut proc = pods
        .exec(
            "app",
            ["sh", "-c", "echo out-$((40+2)); exit 3"],
            &AttachParams::default().stderr(false),
        )
        .await
        .expect("exec");
    let mut stdout = String::new();
    proc.stdout()
        .expect("stdout")
        .read_to_string(&mut stdout)
        .await
        .expect("read");
    let status = proc
        .take_status()
        .expect("status")
        .await
        .expect("exec status");
    proc.join().await.expect("join");
    assert_eq!(stdout.trim(), "out-42");
    assert_eq!(status.status.as_deref(), Some("Failure"));
    assert_eq!(exit_code(&status), Some(3), "{status:?}");
}

/// kwok reports a non-zero exit as "... exit status N"; the kubelet as a NonZeroExitCode cause.
fn exit_code(status: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Status) -> Option<i32> {
    if let Some(causes) = status.details.as_ref().and_then(|d| d.causes.as_ref())
        && let Some(c) = causes
            .iter()
            .find(|c| c.reason.as_deref() == Some("ExitCode"))
    {
        return c.message.as_ref()?.parse().ok();
    }
    status
        .message
        .as_ref()?
        .rsplit("exit status ")
        .next()?
        .trim()
        .parse()
        .ok()
}

fn mounted(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some(path.to_str().unwrap_or("")))
}

#[tokio::test]
async fn pvc_binds_and_its_data_is_bind_mounted_at_the_kubelet_path_while_the_pod_lives() {
    let TestEnv {
        cluster,
        client,
        ns,
    } = TestEnv::bare("vol").await;
    let backing = cluster.volume(&ns, "db", "data", "node-3", &[]);
    std::fs::write(backing.join("hello.txt"), b"written by the fixture").expect("write");

    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    wait_for("PVC Bound", Duration::from_secs(30), || {
        pvc_bound(&pvcs, "data")
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    wait_for("pod Running", Duration::from_secs(30), || {
        pod_running(&pods, "db")
    })
    .await;
    let uid = pods
        .get("db")
        .await
        .expect("pod")
        .metadata
        .uid
        .expect("uid");
    let pv = format!("pv-{ns}-data");
    let target = cluster
        .kubelet_dir("node-3")
        .join("pods")
        .join(&uid)
        .join("volumes/kubernetes.io~csi")
        .join(&pv)
        .join("mount");
    wait_for("the volume mount", Duration::from_secs(30), || async {
        mounted(&target)
    })
    .await;
    assert_eq!(
        std::fs::read(target.join("hello.txt")).expect("read through mount"),
        b"written by the fixture"
    );
    // Only the pod's node has it.
    assert!(
        !cluster
            .kubelet_dir("node-1")
            .join("pods")
            .join(&uid)
            .exists()
    );

    pods.delete("db", &DeleteParams::default())
        .await
        .expect("delete pod");
    wait_for(
        "unmount after pod deletion",
        Duration::from_secs(30),
        || async { !mounted(&target) },
    )
    .await;
    wait_for("pod dir removed", Duration::from_secs(10), || async {
        !cluster
            .kubelet_dir("node-3")
            .join("pods")
            .join(&uid)
            .exists()
    })
    .await;
    assert_eq!(
        std::fs::read(backing.join("hello.txt")).expect("data stays"),
        b"written by the fixture"
    );
}

#[tokio::test]
async fn a_daemonset_gets_a_pod_on_every_node() {
    let TestEnv {
        cluster,
        client,
        ns,
    } = TestEnv::bare("ds").await;
    let dss: Api<DaemonSet> = Api::namespaced(client.clone(), &ns);
    let ds: DaemonSet = json(serde_json::json!({
        "metadata": {"name": "agent"},
        "spec": {"selector": {"matchLabels": {"app": "agent"}},
                 "template": {"metadata": {"labels": {"app": "agent"}},
                              "spec": {"hostNetwork": true,
                                       "containers": [{"name": "agent", "image": "registry.invalid/agent:1"}]}}}
    }));
    dss.create(&PostParams::default(), &ds)
        .await
        .expect("create daemonset");
    let nodes = cluster.node_names();
    wait_for(
        "a ready agent pod on every node",
        Duration::from_secs(60),
        || async {
            dss.get("agent")
                .await
                .ok()
                .and_then(|d| d.status)
                .is_some_and(|s| {
                    s.desired_number_scheduled as usize == nodes.len()
                        && s.number_ready as usize == nodes.len()
                })
        },
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let list = pods.list(&Default::default()).await.expect("list");
    let mut placed: Vec<(String, String)> = list
        .items
        .iter()
        .map(|p| {
            let node = p
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default();
            let ip = p
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.clone())
                .unwrap_or_default();
            (node, ip)
        })
        .collect();
    placed.sort();
    let expected: Vec<(String, String)> = nodes
        .iter()
        .map(|n| {
            (
                n.clone(),
                cluster.env[&format!("STOWAGE_NODE_{}_IP", &n[5..])].clone(),
            )
        })
        .collect();
    assert_eq!(
        placed, expected,
        "one pod per node; hostNetwork pods get the node's loopback address"
    );
}

#[tokio::test]
async fn crds_from_a_directory_are_applied_and_established() {
    let cluster = Cluster::shared();
    let client = cluster.client().await;
    // kwok's Exec/ClusterExec CRDs, as `up` installed them: applying again is idempotent.
    let dir = std::path::Path::new(&cluster.env["STOWAGE_CLUSTER_BIN"]).join("../crds");
    let mut names = stowage_tests::cluster::apply_crds(&client, &dir).await;
    names.sort();
    assert_eq!(names, ["clusterexecs.kwok.x-k8s.io", "execs.kwok.x-k8s.io"]);
}

/// Long (~30 s): it starts a second control plane of its own, to read its listeners and tear it down.
#[tokio::test]
async fn control_plane_listens_only_on_loopback_and_down_leaves_nothing() {
    // A second, private cluster on other ports, so stopping it cannot disturb the shared one.
    let dir = tempfile::tempdir().expect("tmp");
    let root = stowage_tests::workspace_root();
    let env = [
        ("STOWAGE_CLUSTER_DIR", dir.path().to_str().expect("utf8")),
        ("STOWAGE_CLUSTER_PORT_BASE", "18400"),
    ];
    // Whatever fails below, the private cluster is stopped.
    struct Down<'a>(&'a [(&'a str, &'a str)]);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new(
                stowage_tests::workspace_root().join("tests/cluster/down"),
            )
            .envs(self.0.iter().copied())
            .status();
        }
    }
    let _guard = Down(&env);
    let up = std::process::Command::new(root.join("tests/cluster/up"))
        .args(["--nodes", "1"])
        .envs(env)
        .status()
        .expect("up");
    assert!(up.success());
    let pids: Vec<u32> = std::fs::read_dir(dir.path().join("pids"))
        .expect("pids")
        .flatten()
        .map(|e| {
            std::fs::read_to_string(e.path())
                .expect("pid")
                .trim()
                .parse()
                .expect("number")
        })
        .collect();
    assert_eq!(
        pids.len(),
        6,
        "etcd, apiserver, controller-manager, scheduler, kwok, kubelet emulator: {pids:?}"
    );
    let listeners = listening_sockets();
    let ours: Vec<_> = listeners
        .iter()
        .filter(|(pid, _)| pids.contains(pid))
        .collect();
    assert!(ours.len() >= 5, "{ours:?}");
    for (pid, addr) in &ours {
        assert!(
            addr.starts_with("127."),
            "pid {pid} listens on {addr}, outside 127.0.0.0/8"
        );
    }
    // Idempotent: a second `up` reports the running cluster and succeeds.
    let again = std::process::Command::new(root.join("tests/cluster/up"))
        .args(["--nodes", "1"])
        .envs(env)
        .output()
        .expect("up");
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already running"));

    let down = std::process::Command::new(root.join("tests/cluster/down"))
        .envs(env)
        .status()
        .expect("down");
    assert!(down.success());
    for pid in pids {
        assert!(!stowage_tests::procs::alive(pid), "pid {pid} survived down");
    }
    assert!(!dir.path().join("pids").exists(), "state removed");
}

fn listening_sockets() -> Vec<(u32, String)> {
    let out = std::process::Command::new("ss")
        .args(["-ltnpH"])
        .output()
        .expect("ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .flat_map(|l| {
            let addr = l.split_whitespace().nth(3).unwrap_or("").to_string();
            l.split("pid=")
                .skip(1)
                .filter_map(|p| p.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
                .map(move |pid| (pid, addr.clone()))
                .collect::<Vec<_>>()
        })
        .collect()
}
