//! The one test environment every suite against the shared cluster starts from: the cluster
//! handle, a namespace of the test's own (with the repository password Secret), its local and S3
//! repositories, Stowage runs created and awaited, volumes, coordinators and `kubectl stowage`.
//!
//! A suite keeps only what is its own (a scenario's fixtures); everything a second suite would
//! copy lives here, so a change to how tests reach the cluster is made once.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use crate::cluster::{Cluster, fresh_namespace};
use crate::coordinator::{
    Coordinator, CoordinatorOptions, Object, create, finished, local_backend, secret, wait_json,
};
use crate::moto::Moto;

/// The repository password of every test repository (Secret `backup-repo`, key `password`).
pub const PASSWORD: &str = "correct horse battery staple";

/// A test's place in the shared cluster.
pub struct TestEnv {
    pub cluster: &'static Cluster,
    pub client: kube::Client,
    /// The test's own namespace, `<prefix>-<random>`.
    pub ns: String,
}

impl TestEnv {
    /// The shared cluster (started once, reused by every test process), a fresh namespace named
    /// after `prefix`, and Secret `backup-repo` in it holding [`PASSWORD`].
    pub async fn new(prefix: &str) -> TestEnv {
        let cluster = Cluster::shared();
        let client = cluster.client().await;
        let ns = fresh_namespace(&client, prefix).await;
        secret(&client, &ns, "backup-repo", &[("password", PASSWORD)]).await;
        TestEnv {
            cluster,
            client,
            ns,
        }
    }

    /// The shared cluster and a fresh namespace named after `prefix`, with nothing in it: for
    /// tests that make their own Secrets (other passwords, unlabelled ones).
    pub async fn bare(prefix: &str) -> TestEnv {
        let cluster = Cluster::shared();
        let client = cluster.client().await;
        let ns = fresh_namespace(&client, prefix).await;
        TestEnv {
            cluster,
            client,
            ns,
        }
    }

    /// The test's local repository path (not created): `<cluster>/repos/<namespace>`, inside the
    /// agents' allowed roots.
    pub fn repo(&self) -> PathBuf {
        self.cluster.dir.join("repos").join(&self.ns)
    }

    /// A further local repository of the test's, `<cluster>/repos/<namespace>-<name>`.
    pub fn repo_named(&self, name: &str) -> PathBuf {
        self.cluster
            .dir
            .join("repos")
            .join(format!("{}-{name}", self.ns))
    }

    /// [`TestEnv::repo`], initialised with plain restic.
    pub fn init_repo(&self) -> PathBuf {
        let repo = self.repo();
        crate::restic::init(&repo, PASSWORD);
        repo
    }

    /// The backend block of [`TestEnv::repo`] (`initialize: true`).
    pub fn local_backend(&self) -> serde_json::Value {
        local_backend(&self.repo())
    }

    /// An S3 repository in a fresh bucket `bucket` of `moto`, its keys in a labelled Secret `s3`
    /// of the test's namespace; returns the backend block (prefix: the namespace).
    pub async fn s3_backend(&self, moto: &Moto, bucket: &str) -> serde_json::Value {
        moto.create_bucket(bucket);
        secret(
            &self.client,
            &self.ns,
            "s3",
            &[("id", "AKIATESTKEY"), ("secret", "test-secret-key-value")],
        )
        .await;
        serde_json::json!({
            "repoPasswordSecretRef": {"name": "backup-repo", "key": "password"},
            "s3": {"endpoint": moto.endpoint, "bucket": bucket, "prefix": self.ns,
                   "accessKeyIDSecretRef": {"name": "s3", "key": "id"},
                   "secretAccessKeySecretRef": {"name": "s3", "key": "secret"}},
            "initialize": true,
        })
    }

    /// The snapshots of local repository `repo`, read with plain restic.
    pub fn snapshots(&self, repo: &Path) -> Vec<serde_json::Value> {
        crate::restic::snapshots(&repo.display().to_string(), PASSWORD)
    }

    /// `tests/cluster/volume` in the test's namespace: a PV, PVC `pvc` bound to it and (unless
    /// `--no-pod` is in `extra`) pod `pod` on `node` mounting it. Returns the backing directory.
    pub fn volume(&self, pod: &str, pvc: &str, node: &str, extra: &[&str]) -> PathBuf {
        self.cluster.volume(&self.ns, pod, pvc, node, extra)
    }

    /// A PVC mounted by pod `<pvc>-0` on `node`, returned once the agent's view of the kubelet
    /// directory shows file `marker` (written here) in it.
    pub async fn mounted(&self, pvc: &str, node: &str, marker: &str) -> PathBuf {
        let pod = format!("{pvc}-0");
        let dir = self.volume(&pod, pvc, node, &[]);
        if let Some(parent) = Path::new(marker).parent() {
            std::fs::create_dir_all(dir.join(parent)).expect("marker directory");
        }
        if !dir.join(marker).exists() {
            std::fs::write(dir.join(marker), b"").expect("marker");
        }
        self.cluster
            .wait_mounted(&self.client, &self.ns, &pod, pvc, node, marker)
            .await;
        dir
    }

    /// Creates any namespaced object of the test's namespace from JSON.
    pub async fn create<K: Object>(&self, obj: serde_json::Value) -> K {
        create(&self.client, &self.ns, obj).await
    }

    /// Creates run `name` of kind `K` (Backup, Restore, Check, Prune) with `spec`; does not wait.
    pub async fn create_run<K: Object>(&self, name: &str, spec: serde_json::Value) -> K {
        self.create(serde_json::json!({
            "apiVersion": "stowage.dev/v1alpha1", "kind": K::kind(&()),
            "metadata": {"name": name}, "spec": spec}))
            .await
    }

    /// Waits (at most `timeout`) until run `name` has finished; returns its JSON.
    pub async fn wait_run<K: Object>(&self, name: &str, timeout: Duration) -> serde_json::Value {
        wait_json::<K>(
            &self.client,
            &self.ns,
            name,
            timeout,
            "a finished phase",
            finished,
        )
        .await
    }

    /// [`TestEnv::create_run`], then [`TestEnv::wait_run`].
    pub async fn run<K: Object>(
        &self,
        name: &str,
        spec: serde_json::Value,
        timeout: Duration,
    ) -> serde_json::Value {
        let _: K = self.create_run(name, spec).await;
        self.wait_run::<K>(name, timeout).await
    }

    /// Options for a coordinator watching only the test's namespace, with its own identity.
    pub fn coordinator_options(&self, identity: &str) -> CoordinatorOptions {
        CoordinatorOptions {
            identity: identity.into(),
            ..CoordinatorOptions::new(&self.ns)
        }
    }

    /// A coordinator of the test's own, using the cluster's agents.
    pub async fn coordinator(&self) -> Coordinator {
        Coordinator::start(self.cluster, CoordinatorOptions::new(&self.ns)).await
    }

    /// `kubectl stowage <args>` in the test's namespace; see [`crate::kubectl_stowage::run`].
    pub fn kubectl_stowage(&self, args: &[&str]) -> Output {
        crate::kubectl_stowage::run(self.cluster, &self.ns, args)
    }
}
