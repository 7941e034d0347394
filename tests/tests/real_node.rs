//! Stowage on the test cluster's real node (`tests/cluster/up --real-node`): a real kubelet,
//! containerd and runc, the project's CSI driver for local volumes, and Stowage's own images
//! (`scripts/build-images`), installed with the chart's defaults but for where its pods run (and the
//! coordinator's maintenance container, on).
//!
//! One test, its steps in order: they share one release (installing one takes most of a minute),
//! and each step's Backup selects only its own PVCs, so a step never sees another's volumes.
//! What it proves, each through the real kubelet:
//! - the agent runs as a real container with the chart's exact securityContext, and the same pod
//!   under containerd's RuntimeDefault seccomp profile cannot start its sandbox; the coordinator's
//!   maintenance container runs and is ready beside it;
//! - a PVC from the CSI driver, mounted by a real pod at `kubernetes.io~csi/<pv>/mount`, is backed
//!   up and restored (Replace) in place while its container keeps running: same container ID;
//! - a backup command streams through the real kubelet's exec (CRI);
//! - an unmounted PVC is read through a mount holder (the project's pause image) that Pod
//!   Security admits in a namespace enforcing `restricted`;
//! - a container swapping its volume's directory for a symlink into the node's kubelet directory
//!   during backups gets nothing from outside its volume into a snapshot;
//! - the agent's pod is refused by Pod Security `baseline`, which is why docs/security.md says its
//!   namespace must be `privileged`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams};
use stowage_tests::cluster::fresh_namespace;
use stowage_tests::real_node::{PASSWORD, RealNode, container, label_namespace};

/// Every regular file below `dir`, read whole.
fn files_below(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let ft = e.file_type().expect("file type");
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                out.push((e.path(), std::fs::read(e.path()).expect("read")));
            }
        }
    }
    out
}

/// Long (~60 s): one install of the chart on the real kubelet serves every scenario below; an install each would take longer.
#[tokio::test]
async fn stowage_runs_for_real_on_a_kubelet_with_containerd() {
    let started = Instant::now();
    let rn = RealNode::install(stowage_tests::cluster::Cluster::shared(), "rn").await;
    eprintln!("helm install on the real node: {:?}", started.elapsed());
    let (client, sys, node) = (rn.client.clone(), rn.sys.clone(), rn.node.clone());

    let sys_pods: Api<Pod> = Api::namespaced(client.clone(), &sys);
    let agents = sys_pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=stowage-agent"))
        .await
        .expect("agents")
        .items;
    assert_eq!(agents.len(), 1, "one agent, on the real node");
    let agent = &agents[0];
    assert_eq!(
        agent.spec.as_ref().and_then(|s| s.node_name.as_deref()),
        Some(node.as_str())
    );
    let status = &agent
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .expect("agent status")[0];
    assert!(status.ready, "{status:?}");
    assert!(
        status
            .container_id
            .as_deref()
            .is_some_and(|id| id.starts_with("containerd://")),
        "a real container: {status:?}"
    );
    assert_eq!(status.image, "ghcr.io/stowage-dev/stowage-agent:0.1.0");
    // The chart's securityContext, exactly as rendered, is what runc ran.
    let sc = agent.spec.as_ref().expect("spec").containers[0]
        .security_context
        .clone()
        .expect("securityContext");
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(
        sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
        Some("Unconfined")
    );
    let agent_pid = stowage_tests::procs::cmdlines_with_pids()
        .into_iter()
        .find(|(_, c)| {
            c.contains(&format!(
                "--client-identity={}-stowage-coordinator.{sys}.svc",
                rn.release
            ))
        })
        .map(|(p, _)| p)
        .expect("the agent's process, seen from the host");
    let proc_status =
        std::fs::read_to_string(format!("/proc/{agent_pid}/status")).expect("agent status");
    let cap_eff = proc_status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).expect("hex"))
        .expect("CapEff");
    // SYS_ADMIN(21) DAC_READ_SEARCH(2) DAC_OVERRIDE(1) CHOWN(0) FOWNER(3) FSETID(4) SETPCAP(8).
    let want: u64 = [21u32, 2, 1, 0, 3, 4, 8].iter().map(|b| 1u64 << b).sum();
    assert_eq!(cap_eff, want, "the agent's effective capabilities");
    let rss_kib = proc_status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS");
    eprintln!("FIGURE agent container idle RSS: {} KiB", rss_kib);

    // The coordinator's maintenance container (coordinator.maintenance.enabled): a real container
    // beside the coordinator, ready (its sandbox works under the chart's securityContext on runc).
    let coordinators = sys_pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=stowage-coordinator"))
        .await
        .expect("coordinators")
        .items;
    let c = coordinators.first().expect("a coordinator pod");
    let statuses = c
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.clone())
        .unwrap_or_default();
    let m = statuses
        .iter()
        .find(|s| s.name == "maintenance")
        .expect("the maintenance container");
    assert!(m.ready, "{m:?}");
    assert!(
        m.container_id
            .as_deref()
            .is_some_and(|id| id.starts_with("containerd://")),
        "{m:?}"
    );
    assert!(
        stowage_tests::procs::cmdlines_with_pids()
            .iter()
            .any(
                |(_, c)| c.contains("--maintenance-only") && c.contains("--grpc-listen=127.0.0.1:")
            ),
        "the maintenance agent's process, seen from the host"
    );

    runtime_default_seccomp_cannot_start_the_sandbox(&rn).await;
    agents_namespace_needs_privileged(&rn).await;
    backup_and_replace_in_place(&rn).await;
    backup_command_through_cri_exec(&rn).await;
    mount_holder_in_a_restricted_namespace(&rn).await;
    symlink_swaps_inside_a_container_leak_nothing(&rn).await;
}

/// The chart's agent pod as-is but for containerd's RuntimeDefault seccomp profile: bubblewrap's
/// pivot_root is refused, the agent's start-up probe says so, and it does not serve.
async fn runtime_default_seccomp_cannot_start_the_sandbox(rn: &RealNode) {
    let ds = Api::<DaemonSet>::namespaced(rn.client.clone(), &rn.sys)
        .get(&format!("{}-stowage-agent", rn.release))
        .await
        .expect("daemonset");
    let mut spec = ds.spec.and_then(|s| s.template.spec).expect("pod template");
    spec.node_name = Some(rn.node.clone());
    spec.containers[0]
        .security_context
        .as_mut()
        .expect("securityContext")
        .seccomp_profile = Some(k8s_openapi::api::core::v1::SeccompProfile {
        type_: "RuntimeDefault".into(),
        ..Default::default()
    });
    // Another port, so it cannot collide with the real agent's even in the pod network.
    let pod = Pod {
        metadata: kube::api::ObjectMeta {
            name: Some("agent-runtime-default".into()),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    };
    let pods: Api<Pod> = Api::namespaced(rn.client.clone(), &rn.sys);
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create");
    let deadline = Instant::now() + Duration::from_secs(90);
    let log = loop {
        let p = pods.get("agent-runtime-default").await.expect("get");
        let terminated = p
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|cs| cs.first())
            .and_then(|c| {
                c.last_state
                    .as_ref()
                    .and_then(|s| s.terminated.clone())
                    .or_else(|| c.state.as_ref().and_then(|s| s.terminated.clone()))
            });
        if let Some(t) = terminated {
            assert_ne!(t.exit_code, 0, "the agent exits non-zero");
            let params = LogParams {
                previous: p
                    .status
                    .as_ref()
                    .and_then(|s| s.container_statuses.as_ref())
                    .and_then(|cs| cs.first())
                    .is_some_and(|c| {
                        c.state
                            .as_ref()
                            .and_then(|s| s.terminated.as_ref())
                            .is_none()
                    }),
                ..Default::default()
            };
            break pods
                .logs("agent-runtime-default", &params)
                .await
                .expect("logs through the kubelet");
        }
        assert!(
            Instant::now() < deadline,
            "the RuntimeDefault agent did not exit: {:?}",
            p.status
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(log.contains("pivot_root"), "{log}");
    assert!(log.contains("seccomp"), "the error names the cause: {log}");
    pods.delete("agent-runtime-default", &DeleteParams::default())
        .await
        .expect("delete");
}

/// Pod Security `baseline` refuses the agent's pod (hostPath, SYS_ADMIN): its namespace must be
/// `privileged`, as docs/security.md says. A server-side dry run asks the real admission.
async fn agents_namespace_needs_privileged(rn: &RealNode) {
    let ns = fresh_namespace(&rn.client, "rn-baseline").await;
    label_namespace(&rn.client, &ns, "baseline").await;
    let ds = Api::<DaemonSet>::namespaced(rn.client.clone(), &rn.sys)
        .get(&format!("{}-stowage-agent", rn.release))
        .await
        .expect("daemonset");
    let mut spec = ds.spec.and_then(|s| s.template.spec).expect("pod template");
    // The ServiceAccount lives in the release's namespace; admission would stop at its absence first.
    spec.service_account_name = None;
    spec.service_account = None;
    let pod = Pod {
        metadata: kube::api::ObjectMeta {
            name: Some("agent".into()),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    };
    let err = Api::<Pod>::namespaced(rn.client.clone(), &ns)
        .create(
            &PostParams {
                dry_run: true,
                ..Default::default()
            },
            &pod,
        )
        .await
        .expect_err("baseline refuses the agent");
    let msg = err.to_string();
    assert!(msg.contains("violates PodSecurity \"baseline"), "{msg}");
    assert!(msg.contains("hostPath"), "{msg}");
}

async fn backup_and_replace_in_place(rn: &RealNode) {
    rn.pvc("web-data", "inplace").await;
    let pod = rn
        .pod(
            "web",
            "web-data",
            "exec sleep 100000",
            serde_json::json!({}),
        )
        .await;
    rn.exec(
        "web",
        "mkdir -p /data/conf && echo 'answer = 42' > /data/conf/settings.ini \
         && head -c 300000 /dev/urandom > /data/table.dat && echo keep > /data/keep.txt",
    );
    // The kubelet mounted it as on a cloud cluster: the CSI directory and its vol_data.json.
    let uid = pod.metadata.uid.clone().expect("uid");
    let pv = Api::<k8s_openapi::api::core::v1::PersistentVolumeClaim>::namespaced(
        rn.client.clone(),
        &rn.app,
    )
    .get("web-data")
    .await
    .expect("pvc")
    .spec
    .and_then(|s| s.volume_name)
    .expect("bound");
    let csi_dir = Path::new(&rn.cluster.env["STOWAGE_REAL_NODE_DIR"])
        .join("var/lib/kubelet/pods")
        .join(&uid)
        .join("volumes/kubernetes.io~csi")
        .join(&pv);
    let vol_data = std::fs::read_to_string(csi_dir.join("vol_data.json")).expect("vol_data.json");
    assert!(vol_data.contains("local.csi.stowage.dev"), "{vol_data}");
    let before_sum = rn.exec("web", "cd /data && find . -type f | sort | xargs md5sum");

    let b = rn.backup("web-1", "web", "inplace").await;
    assert_eq!(b["status"]["phase"], "Succeeded", "{b:#}");
    assert_eq!(b["status"]["items"][0]["node"], rn.node.as_str(), "{b:#}");
    let (cid, restarts) = container(&pod);

    // Damage: a deleted file, a changed one, a new one; then Replace from the snapshot.
    rn.exec(
        "web",
        "rm /data/conf/settings.ini && echo changed > /data/keep.txt && echo junk > /data/new.txt",
    );
    let r = rn.restore("web-undo", "web-data", "web", "Replace").await;
    assert_eq!(r["status"]["phase"], "Succeeded", "{r:#}");
    assert_eq!(r["status"]["restore"]["node"], rn.node.as_str());
    let after_sum = rn.exec("web", "cd /data && find . -type f | sort | xargs md5sum");
    assert_eq!(after_sum, before_sum, "the volume equals the snapshot");
    let pods: Api<Pod> = Api::namespaced(rn.client.clone(), &rn.app);
    let now = pods.get("web").await.expect("pod");
    assert_eq!(
        container(&now),
        (cid, restarts),
        "the same container kept running"
    );
    assert_eq!(now.metadata.uid.as_deref(), Some(uid.as_str()));
}

async fn backup_command_through_cri_exec(rn: &RealNode) {
    rn.pvc("db-data", "command").await;
    rn.pod(
        "db",
        "db-data",
        "echo 'row 1' > /data/table && exec sleep 100000",
        serde_json::json!({"stowage.dev/backup-command":
            "set -o pipefail; echo '-- dump of shop'; cat /data/table | sed 's/^/INSERT /'"}),
    )
    .await;
    let b = rn.backup("db-1", "db", "command").await;
    assert_eq!(b["status"]["phase"], "Succeeded", "{b:#}");
    let repo = rn.repo_on_host("db").display().to_string();
    let snap = stowage_tests::restic::snapshots(&repo, PASSWORD)
        .into_iter()
        .find(|s| {
            s["tags"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t == "stowage.dev/source=command"))
        })
        .expect("a command snapshot");
    let id = snap["id"].as_str().expect("id");
    let ls = stowage_tests::restic::ok(&repo, PASSWORD, &["ls", "--json", id]);
    let file = ls
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|n| n["type"] == "file")
        .and_then(|n| n["path"].as_str().map(String::from))
        .expect("the dump's file");
    let dump = stowage_tests::restic::ok(&repo, PASSWORD, &["dump", id, &file]);
    assert_eq!(dump, "-- dump of shop\nINSERT row 1\n");
    rn.delete_pod("db").await;
}

async fn mount_holder_in_a_restricted_namespace(rn: &RealNode) {
    // web-data's pod goes away (its PV stays, bound, on the real node): the next backup needs a
    // mount holder in this `restricted` namespace.
    rn.delete_pod("web").await;
    let b = rn.backup("web-2", "web", "inplace").await;
    assert_eq!(b["status"]["phase"], "Succeeded", "{b:#}");
    assert_eq!(b["status"]["items"][0]["node"], rn.node.as_str(), "{b:#}");
    let repo = rn.repo_on_host("web").display().to_string();
    let volume_snapshots = stowage_tests::restic::snapshots(&repo, PASSWORD)
        .into_iter()
        .filter(|s| {
            s["tags"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t == "stowage.dev/pvc=web-data"))
        })
        .count();
    assert_eq!(volume_snapshots, 2, "the held volume was read");
    // The holder was the project's pause image and is gone again.
    let events = Command::new(rn.cluster.kubectl())
        .args(["-n", &rn.app, "get", "events", "-o", "json"])
        .env("KUBECONFIG", rn.cluster.kubeconfig())
        .output()
        .expect("events");
    let events = String::from_utf8_lossy(&events.stdout);
    assert!(
        events.contains("ghcr.io/stowage-dev/stowage-pause:0.1.0"),
        "the kubelet ran the holder from the pause image"
    );
    let left = Api::<Pod>::namespaced(rn.client.clone(), &rn.app)
        .list(&ListParams::default())
        .await
        .expect("pods")
        .items;
    assert!(left.is_empty(), "no holder left: {left:?}");
}

async fn symlink_swaps_inside_a_container_leak_nothing(rn: &RealNode) {
    rn.pvc("victim", "attack").await;
    // The canaries sit in the pod's emptyDir, which the agent can see on the node at
    // <kubelet-dir>/pods/<uid>/volumes/kubernetes.io~empty-dir/scratch: the symlink points there,
    // by the absolute node path a tenant learns from its own pod UID.
    let script = r#"
set -e
mkdir -p /scratch/outside /data/d
i=0
while [ $i -lt 200 ]; do
  echo "CANARY-outside-the-volume $i" > /scratch/outside/f$i
  echo "inside $i" > /data/d/f$i
  i=$((i+1))
done
T=/var/lib/kubelet/pods/$POD_UID/volumes/kubernetes.io~empty-dir/scratch/outside
touch /scratch/ready
n=0
while :; do
  mv /data/d /data/d.real && ln -s "$T" /data/d && rm /data/d && mv /data/d.real /data/d
  n=$((n+1)); [ $((n % 100)) -eq 0 ] && echo $n > /scratch/rounds
done
"#;
    rn.pod("attacker", "victim", script, serde_json::json!({}))
        .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while rn
        .exec("attacker", "test -f /scratch/ready && echo yes || true")
        .trim()
        != "yes"
    {
        assert!(Instant::now() < deadline, "the attacker did not start");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for i in 0..3 {
        let b = rn.backup(&format!("attack-{i}"), "attack", "attack").await;
        let phase = b["status"]["phase"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        // Files vanishing mid-read make a partial snapshot; any end is fine, a leak is not.
        assert!(
            ["Succeeded", "PartiallyFailed", "Failed"].contains(&phase.as_str()),
            "a finished run: {b:#}"
        );
    }
    let rounds = rn.exec("attacker", "cat /scratch/rounds 2>/dev/null || echo 0");
    eprintln!("attacker swaps during the backups: {}", rounds.trim());
    rn.delete_pod("attacker").await;

    let repo = rn.repo_on_host("attack").display().to_string();
    let snaps = stowage_tests::restic::snapshots(&repo, PASSWORD);
    assert!(!snaps.is_empty(), "at least one snapshot was written");
    for s in &snaps {
        let id = s["id"].as_str().expect("id");
        let dir = tempfile::tempdir().expect("tmp");
        let target = dir.path().display().to_string();
        let out =
            stowage_tests::restic::run(&repo, PASSWORD, &[], &["restore", id, "--target", &target]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for (path, data) in files_below(dir.path()) {
            assert!(
                !String::from_utf8_lossy(&data).contains("CANARY"),
                "snapshot {id} holds {} from outside the volume",
                path.display()
            );
        }
    }
}
