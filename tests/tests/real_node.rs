//! Stowage on the test cluster's real node (`tests/cluster/up --real-node`): a real kubelet,
//! containerd and runc, the project's CSI driver for local volumes, and Stowage's own images
//! (`scripts/build-images`), installed with the chart's defaults but for where its pods run.
//!
//! One test, its steps in order: they share one release (installing one takes most of a minute),
//! and each step's Backup selects only its own PVCs, so a step never sees another's volumes.
//! What it proves, each through the real kubelet:
//! - the agent runs as a real container with the chart's exact securityContext, and the same pod
//!   under containerd's RuntimeDefault seccomp profile cannot start its sandbox;
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
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams};
use stowage_coordinator::crd::{Backup, Restore};
use stowage_tests::cluster::{Cluster, fresh_namespace};
use stowage_tests::coordinator::{run_to_end, secret};

const PASSWORD: &str = "real node repository password";
const RUN_TIMEOUT: Duration = Duration::from_secs(180);
const TESTBOX: &str = "stowage.local/testbox:0.1.0";
/// Where the chart's agent may keep local repositories on the real node; the node's `/var` is the
/// host directory `real-node/var`, so the test reads the repositories there with plain restic.
const REPO_ROOT: &str = "/var/lib/stowage-repos";

struct RealNode<'a> {
    cluster: &'a Cluster,
    client: kube::Client,
    node: String,
    app: String,
    sys: String,
    release: String,
}

impl RealNode<'_> {
    fn kubectl(&self, args: &[&str]) -> std::process::Output {
        Command::new(self.cluster.kubectl())
            .args(args)
            .env("KUBECONFIG", self.cluster.kubeconfig())
            .output()
            .expect("kubectl")
    }

    /// `sh -c script` in `pod`'s container, through the API server and the real kubelet.
    fn exec(&self, pod: &str, script: &str) -> String {
        let out = self.kubectl(&["-n", &self.app, "exec", pod, "--", "sh", "-c", script]);
        assert!(
            out.status.success(),
            "exec {script:?} in {pod}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The host's path of the repository `name` (the node's /var is real-node/var on the host).
    /// Repositories are per test namespace: the node's directories outlive a test.
    fn repo_on_host(&self, name: &str) -> PathBuf {
        Path::new(&self.cluster.env["STOWAGE_REAL_NODE_DIR"])
            .join("var/lib/stowage-repos")
            .join(&self.app)
            .join(name)
    }

    fn backend(&self, repo: &str) -> serde_json::Value {
        serde_json::json!({
            "repoPasswordSecretRef": {"name": "repo", "key": "password"},
            "local": {"path": format!("{REPO_ROOT}/{}/{repo}", self.app)},
            "initialize": true,
        })
    }

    async fn backup(&self, name: &str, repo: &str, test: &str) -> serde_json::Value {
        run_to_end::<Backup>(
            &self.client,
            &self.app,
            serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Backup",
                "metadata": {"name": name},
                "spec": {"backend": self.backend(repo),
                         "selector": {"matchLabels": {"test": test}}}}),
            RUN_TIMEOUT,
        )
        .await
    }

    /// A PVC of the CSI driver's StorageClass, labelled for its step's selector.
    async fn pvc(&self, name: &str, test: &str) {
        let pvc = serde_json::json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "labels": {"test": test}},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "stowage-local",
                     "resources": {"requests": {"storage": "1Gi"}}}});
        Api::<k8s_openapi::api::core::v1::PersistentVolumeClaim>::namespaced(
            self.client.clone(),
            &self.app,
        )
        .create(
            &PostParams::default(),
            &serde_json::from_value(pvc).expect("pvc"),
        )
        .await
        .expect("create pvc");
    }

    /// A pod of the testbox image on the real node, as Pod Security `restricted` requires, with
    /// `pvc` at /data, running `script`.
    async fn pod(
        &self,
        name: &str,
        pvc: &str,
        script: &str,
        annotations: serde_json::Value,
    ) -> Pod {
        let pod = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "annotations": annotations},
            "spec": {
                "nodeSelector": {"stowage.dev/real-node": "true"},
                "tolerations": [{"key": "stowage.dev/real-node", "operator": "Exists"}],
                "terminationGracePeriodSeconds": 1,
                "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "runAsGroup": 1000,
                                    "fsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [{
                    "name": "app", "image": TESTBOX, "imagePullPolicy": "IfNotPresent",
                    "command": ["sh", "-c", script],
                    "env": [{"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}}],
                    "securityContext": {"allowPrivilegeEscalation": false,
                                        "capabilities": {"drop": ["ALL"]}},
                    "volumeMounts": [{"name": "data", "mountPath": "/data"},
                                     {"name": "scratch", "mountPath": "/scratch"}]}],
                "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": pvc}},
                            {"name": "scratch", "emptyDir": {}}]}});
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.app);
        pods.create(&PostParams::default(), &serde_json::from_value(pod).expect("pod"))
            .await
            .expect("create pod");
        wait_running(&pods, name).await
    }

    async fn delete_pod(&self, name: &str) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.app);
        let _ = pods.delete(name, &DeleteParams::default()).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while pods.get_opt(name).await.expect("get pod").is_some() {
            assert!(Instant::now() < deadline, "pod {name} was not deleted");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

async fn wait_running(pods: &Api<Pod>, name: &str) -> Pod {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let pod = pods.get(name).await.expect("get pod");
        let running = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .is_some_and(|cs| cs.iter().all(|c| c.ready));
        if running {
            return pod;
        }
        assert!(
            Instant::now() < deadline,
            "pod {name} not running: {:?}",
            pod.status
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn container(pod: &Pod) -> (String, i32) {
    let c = &pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .expect("container statuses")[0];
    (c.container_id.clone().expect("container id"), c.restart_count)
}

fn helm() -> String {
    let out = Command::new(stowage_tests::workspace_root().join("scripts/install-helm"))
        .output()
        .expect("scripts/install-helm");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Uninstalls the release when the test ends, passed or not.
struct Installed<'a>(&'a Cluster, String, String);

impl Drop for Installed<'_> {
    fn drop(&mut self) {
        let _ = Command::new(helm())
            .args(["uninstall", &self.1, "--namespace", &self.2, "--wait"])
            .args(["--timeout", "1m"])
            .env("KUBECONFIG", self.0.kubeconfig())
            .output();
    }
}

async fn label_namespace(client: &kube::Client, ns: &str, level: &str) {
    let patch = serde_json::json!({"metadata": {"labels": {
        "pod-security.kubernetes.io/enforce": level,
        "pod-security.kubernetes.io/enforce-version": "latest"}}});
    Api::<Namespace>::all(client.clone())
        .patch(ns, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("label namespace");
}

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

#[tokio::test]
async fn stowage_runs_for_real_on_a_kubelet_with_containerd() {
    let cluster = Cluster::shared();
    let node = cluster
        .env
        .get("STOWAGE_REAL_NODE")
        .cloned()
        .expect("the shared cluster has a real node (tests/cluster/up --real-node)");
    let client = cluster.client().await;
    let app = fresh_namespace(&client, "rn-app").await;
    let sys = fresh_namespace(&client, "rn-sys").await;
    // The docs' rule: the agent's namespace is privileged; tenants' may enforce `restricted`.
    label_namespace(&client, &sys, "privileged").await;
    label_namespace(&client, &app, "restricted").await;
    secret(&client, &app, "repo", &[("password", PASSWORD)]).await;
    let rn = RealNode {
        cluster,
        client: client.clone(),
        node: node.clone(),
        app: app.clone(),
        sys: sys.clone(),
        release: sys.clone(),
    };

    // --- the chart, with its default images, on the real node -------------------------------------
    let values = tempfile::NamedTempFile::new().expect("values");
    std::fs::write(
        values.path(),
        format!(
            "logJson: false\n\
             agent:\n  nodeSelector: {{stowage.dev/real-node: \"true\"}}\n  localRepositoryRoots: [{REPO_ROOT}]\n\
             coordinator:\n  replicas: 1\n  watchNamespace: {app}\n  nodeSelector: {{stowage.dev/real-node: \"true\"}}\n  \
             tolerations: [{{key: stowage.dev/real-node, operator: Exists}}]\n"
        ),
    )
    .expect("write values");
    let installed = Installed(cluster, rn.release.clone(), sys.clone());
    let started = Instant::now();
    let out = Command::new(helm())
        .args(["install", &rn.release])
        .arg(stowage_tests::workspace_root().join("deploy/daemonset"))
        .args(["--namespace", &sys, "-f"])
        .arg(values.path())
        .args(["--wait", "--timeout", "4m"])
        .env("KUBECONFIG", cluster.kubeconfig())
        .output()
        .expect("helm");
    assert!(
        out.status.success(),
        "helm install: {}{} (kubelet: {}/logs/rn-kubelet.log)",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        cluster.dir.display()
    );
    eprintln!("helm install on the real node: {:?}", started.elapsed());

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

    runtime_default_seccomp_cannot_start_the_sandbox(&rn).await;
    agents_namespace_needs_privileged(&rn).await;
    backup_and_replace_in_place(&rn).await;
    backup_command_through_cri_exec(&rn).await;
    mount_holder_in_a_restricted_namespace(&rn).await;
    symlink_swaps_inside_a_container_leak_nothing(&rn).await;
    drop(installed);
}

/// The chart's agent pod as-is but for containerd's RuntimeDefault seccomp profile: bubblewrap's
/// pivot_root is refused, the agent's start-up probe says so, and it does not serve.
async fn runtime_default_seccomp_cannot_start_the_sandbox(rn: &RealNode<'_>) {
    let ds = Api::<DaemonSet>::namespaced(rn.client.clone(), &rn.sys)
        .get(&format!("{}-stowage-agent", rn.release))
        .await
        .expect("daemonset");
    let mut spec = ds
        .spec
        .and_then(|s| s.template.spec)
        .expect("pod template");
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
                    .is_some_and(|c| c.state.as_ref().and_then(|s| s.terminated.as_ref()).is_none()),
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
async fn agents_namespace_needs_privileged(rn: &RealNode<'_>) {
    let ns = fresh_namespace(&rn.client, "rn-baseline").await;
    label_namespace(&rn.client, &ns, "baseline").await;
    let ds = Api::<DaemonSet>::namespaced(rn.client.clone(), &rn.sys)
        .get(&format!("{}-stowage-agent", rn.release))
        .await
        .expect("daemonset");
    let mut spec = ds
        .spec
        .and_then(|s| s.template.spec)
        .expect("pod template");
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

async fn backup_and_replace_in_place(rn: &RealNode<'_>) {
    rn.pvc("web-data", "inplace").await;
    let pod = rn
        .pod("web", "web-data", "exec sleep 100000", serde_json::json!({}))
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
    let r = run_to_end::<Restore>(
        &rn.client,
        &rn.app,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Restore",
            "metadata": {"name": "web-undo"}, "spec": {
                "backend": rn.backend("web"),
                "source": {"pvc": "web-data", "snapshot": "latest"},
                "target": {"mode": "Replace"}}}),
        RUN_TIMEOUT,
    )
    .await;
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

async fn backup_command_through_cri_exec(rn: &RealNode<'_>) {
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

async fn mount_holder_in_a_restricted_namespace(rn: &RealNode<'_>) {
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

async fn symlink_swaps_inside_a_container_leak_nothing(rn: &RealNode<'_>) {
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
    while rn.exec("attacker", "test -f /scratch/ready && echo yes || true").trim() != "yes" {
        assert!(Instant::now() < deadline, "the attacker did not start");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for i in 0..3 {
        let b = rn.backup(&format!("attack-{i}"), "attack", "attack").await;
        let phase = b["status"]["phase"].as_str().unwrap_or_default().to_string();
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
        let out = stowage_tests::restic::run(&repo, PASSWORD, &[], &["restore", id, "--target", &target]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        for (path, data) in files_below(dir.path()) {
            assert!(
                !String::from_utf8_lossy(&data).contains("CANARY"),
                "snapshot {id} holds {} from outside the volume",
                path.display()
            );
        }
    }
}
