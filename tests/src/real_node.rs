//! The test cluster's real node as tests and benchmarks use it: Stowage installed there with its
//! chart (the chart's default images, built by scripts/build-images and imported into the node's
//! containerd), a namespace for applications that enforces Pod Security `restricted`, and helpers
//! for PVCs of the CSI driver, pods of the testbox image, exec through the real kubelet, and runs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use stowage_api::{Backup, Restore};

use crate::cluster::{Cluster, fresh_namespace};
use crate::coordinator::{run_to_end, secret};

pub const PASSWORD: &str = "real node repository password";
pub const RUN_TIMEOUT: Duration = Duration::from_secs(300);
pub const TESTBOX: &str = "stowage.local/testbox:0.1.0";
/// Where the chart's agent may keep local repositories on the real node; the node's `/var` is the
/// host directory `real-node/var`, so tests read the repositories there with plain restic.
pub const REPO_ROOT: &str = "/var/lib/stowage-repos";

/// Stowage's release on the real node, and the namespace its coordinator watches. Dropping it
/// uninstalls the release.
pub struct RealNode {
    pub cluster: &'static Cluster,
    pub client: kube::Client,
    pub node: String,
    /// The applications' namespace (Pod Security `restricted`), watched by the coordinator.
    pub app: String,
    /// The release's namespace (`privileged`, as docs/security.md says the agent's must be).
    pub sys: String,
    pub release: String,
}

impl RealNode {
    /// Installs Stowage on `cluster`'s real node: the chart's defaults (its images, its
    /// securityContexts) but for where its pods run (the real node: nodeSelector and toleration),
    /// one coordinator watching a fresh application namespace, and local repositories allowed
    /// under [`REPO_ROOT`]. Panics with helm's output when the install fails.
    pub async fn install(cluster: &'static Cluster, prefix: &str) -> RealNode {
        let node = cluster
            .env
            .get("STOWAGE_REAL_NODE")
            .cloned()
            .expect("the shared cluster has a real node (tests/cluster/up --real-node)");
        let client = cluster.client().await;
        let app = fresh_namespace(&client, &format!("{prefix}-app")).await;
        let sys = fresh_namespace(&client, &format!("{prefix}-sys")).await;
        // The docs' rule: the agent's namespace is privileged; tenants' may enforce `restricted`.
        label_namespace(&client, &sys, "privileged").await;
        label_namespace(&client, &app, "restricted").await;
        secret(&client, &app, "repo", &[("password", PASSWORD)]).await;
        let values = tempfile::NamedTempFile::new().expect("values");
        std::fs::write(
            values.path(),
            format!(
                "logJson: false\n\
                 agent:\n  nodeSelector: {{stowage.dev/real-node: \"true\"}}\n  localRepositoryRoots: [{REPO_ROOT}]\n\
                 coordinator:\n  replicas: 1\n  watchNamespace: {app}\n  maintenance: {{enabled: true}}\n  nodeSelector: {{stowage.dev/real-node: \"true\"}}\n  \
                 tolerations: [{{key: stowage.dev/real-node, operator: Exists}}]\n  \
                 mountHolderTolerations: [{{key: stowage.dev/real-node, operator: Exists}}]\n"
            ),
        )
        .expect("write values");
        let rn = RealNode {
            cluster,
            client,
            node,
            app,
            release: sys.clone(),
            sys,
        };
        let out = Command::new(crate::helm())
            .args(["install", &rn.release])
            .arg(crate::workspace_root().join("deploy/daemonset"))
            .args(["--namespace", &rn.sys, "-f"])
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
        cluster.wait_daemonset_ready(&rn.sys, &format!("{}-stowage-agent", rn.release), "4m");
        rn
    }

    pub fn kubectl(&self, args: &[&str]) -> std::process::Output {
        Command::new(self.cluster.kubectl())
            .args(args)
            .env("KUBECONFIG", self.cluster.kubeconfig())
            .output()
            .expect("kubectl")
    }

    /// `sh -c script` in `pod`'s container, through the API server and the real kubelet.
    pub fn exec(&self, pod: &str, script: &str) -> String {
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
    pub fn repo_on_host(&self, name: &str) -> PathBuf {
        Path::new(&self.cluster.env["STOWAGE_REAL_NODE_DIR"])
            .join("var/lib/stowage-repos")
            .join(&self.app)
            .join(name)
    }

    pub fn backend(&self, repo: &str) -> serde_json::Value {
        serde_json::json!({
            "repoPasswordSecretRef": {"name": "repo", "key": "password"},
            "local": {"path": format!("{REPO_ROOT}/{}/{repo}", self.app)},
            "initialize": true,
        })
    }

    pub async fn backup(&self, name: &str, repo: &str, test: &str) -> serde_json::Value {
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

    /// A Restore of `pvc`'s latest snapshot in repository `repo`, in place with `mode`, to its end.
    pub async fn restore(
        &self,
        name: &str,
        pvc: &str,
        repo: &str,
        mode: &str,
    ) -> serde_json::Value {
        run_to_end::<Restore>(
            &self.client,
            &self.app,
            serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Restore",
                "metadata": {"name": name}, "spec": {
                    "backend": self.backend(repo),
                    "source": {"pvc": pvc, "snapshot": "latest"},
                    "target": {"mode": mode}}}),
            RUN_TIMEOUT,
        )
        .await
    }

    /// A PVC of the CSI driver's StorageClass, labelled for its step's selector.
    pub async fn pvc(&self, name: &str, test: &str) {
        let pvc = serde_json::json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "labels": {"test": test}},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "stowage-local",
                     "resources": {"requests": {"storage": "1Gi"}}}});
        Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), &self.app)
            .create(
                &PostParams::default(),
                &serde_json::from_value(pvc).expect("pvc"),
            )
            .await
            .expect("create pvc");
    }

    /// A pod of the testbox image on the real node, as Pod Security `restricted` requires, with
    /// `pvc` at /data, running `script`.
    pub async fn pod(
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
        pods.create(
            &PostParams::default(),
            &serde_json::from_value(pod).expect("pod"),
        )
        .await
        .expect("create pod");
        wait_running(&pods, name).await
    }

    pub async fn delete_pod(&self, name: &str) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.app);
        let _ = pods.delete(name, &DeleteParams::default()).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while pods.get_opt(name).await.expect("get pod").is_some() {
            assert!(Instant::now() < deadline, "pod {name} was not deleted");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

pub async fn wait_running(pods: &Api<Pod>, name: &str) -> Pod {
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

pub fn container(pod: &Pod) -> (String, i32) {
    let c = &pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .expect("container statuses")[0];
    (
        c.container_id.clone().expect("container id"),
        c.restart_count,
    )
}

impl Drop for RealNode {
    /// Uninstalls the release, passed or not, so that its containers stop.
    fn drop(&mut self) {
        let _ = Command::new(crate::helm())
            .args([
                "uninstall",
                &self.release,
                "--namespace",
                &self.sys,
                "--wait",
            ])
            .args(["--timeout", "1m"])
            .env("KUBECONFIG", self.cluster.kubeconfig())
            .output();
    }
}

pub async fn label_namespace(client: &kube::Client, ns: &str, level: &str) {
    let patch = serde_json::json!({"metadata": {"labels": {
        "pod-security.kubernetes.io/enforce": level,
        "pod-security.kubernetes.io/enforce-version": "latest"}}});
    Api::<Namespace>::all(client.clone())
        .patch(ns, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("label namespace");
}
