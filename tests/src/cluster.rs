//! The local control plane from Rust tests: start it (or reuse a running one) once per test process,
//! a fresh namespace per test, fixtures, and wait helpers with timeouts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, PostParams};

/// The running cluster's `env` file, parsed.
pub struct Cluster {
    pub dir: PathBuf,
    pub env: HashMap<String, String>,
}

impl Cluster {
    /// Starts the cluster with `tests/cluster/up` unless one is running (at most 10 minutes, which
    /// covers the first build of the control-plane binaries).
    pub fn shared() -> &'static Cluster {
        static CLUSTER: OnceLock<Cluster> = OnceLock::new();
        CLUSTER.get_or_init(|| {
            let root = crate::workspace_root();
            let out = Command::new(root.join("tests/cluster/up"))
                .args(["--nodes", "3", "--stowage", "--real-node"])
                .status()
                .expect("run tests/cluster/up");
            assert!(out.success(), "tests/cluster/up failed");
            let dir = std::env::var("STOWAGE_CLUSTER_DIR")
                .map_or_else(|_| root.join("target/cluster"), PathBuf::from);
            let env = parse_env(&std::fs::read_to_string(dir.join("env")).expect("cluster env"));
            Cluster { dir, env }
        })
    }

    /// The cluster already running in `$STOWAGE_CLUSTER_DIR`, as it is (the demo's, with Stowage
    /// installed by Helm): nothing is started.
    pub fn running() -> &'static Cluster {
        static CLUSTER: OnceLock<Cluster> = OnceLock::new();
        CLUSTER.get_or_init(|| {
            let dir = std::env::var("STOWAGE_CLUSTER_DIR").map_or_else(
                |_| crate::workspace_root().join("target/cluster"),
                PathBuf::from,
            );
            let env = parse_env(
                &std::fs::read_to_string(dir.join("env"))
                    .expect("a running cluster (tests/cluster/up)"),
            );
            Cluster { dir, env }
        })
    }

    pub fn kubeconfig(&self) -> PathBuf {
        PathBuf::from(&self.env["KUBECONFIG"])
    }

    pub fn kubectl(&self) -> PathBuf {
        Path::new(&self.env["STOWAGE_CLUSTER_BIN"]).join("kubectl")
    }

    /// Waits (at most `timeout`) until every pod of DaemonSet `name` is updated and ready. A Helm
    /// `--wait` is not enough: it asks a DaemonSet for only desired - maxUnavailable ready pods,
    /// which is none on a one-node cluster with the chart's `maxUnavailable: 1`.
    pub fn wait_daemonset_ready(&self, namespace: &str, name: &str, timeout: &str) {
        let out = Command::new(self.kubectl())
            .args(["-n", namespace, "rollout", "status"])
            .arg(format!("daemonset/{name}"))
            .arg(format!("--timeout={timeout}"))
            .env("KUBECONFIG", self.kubeconfig())
            .output()
            .expect("kubectl rollout status");
        assert!(
            out.status.success(),
            "DaemonSet {namespace}/{name} never became ready: {}{} (logs in {}/logs)",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.dir.display()
        );
    }

    pub fn node_names(&self) -> Vec<String> {
        self.env["STOWAGE_CLUSTER_NODES"]
            .split_whitespace()
            .map(String::from)
            .collect()
    }

    /// The kubelet directory of node `name` (what that node's agent reads).
    pub fn kubelet_dir(&self, name: &str) -> PathBuf {
        self.dir.join("nodes").join(name).join("kubelet")
    }

    pub async fn client(&self) -> kube::Client {
        client_from(&self.kubeconfig()).await.expect("kube client")
    }

    /// The admin client's configuration (to build clients with other timeouts or addresses).
    pub async fn kube_config(&self) -> kube::Config {
        config_from(&self.kubeconfig()).await.expect("kube config")
    }

    /// `tests/cluster/volume`: PV + bound PVC (+ a pod on `node` mounting it). Returns the backing dir.
    pub fn volume(&self, ns: &str, pod: &str, pvc: &str, node: &str, extra: &[&str]) -> PathBuf {
        let out = Command::new(crate::workspace_root().join("tests/cluster/volume"))
            .args([ns, pod, pvc, node])
            .args(extra)
            .env("STOWAGE_CLUSTER_DIR", &self.dir)
            .output()
            .expect("run tests/cluster/volume");
        assert!(
            out.status.success(),
            "volume fixture: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    }
}

impl Cluster {
    /// Waits until pod `pod` is Running and the volume of `pvc` shows `file` through the pod's
    /// kubelet directory on `node` (what a kubelet guarantees before starting containers).
    pub async fn wait_mounted(
        &self,
        client: &kube::Client,
        ns: &str,
        pod: &str,
        pvc: &str,
        node: &str,
        file: &str,
    ) {
        let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), ns);
        wait_for("pod Running", Duration::from_secs(30), || {
            pod_running(&pods, pod)
        })
        .await;
        let uid = pods.get(pod).await.expect("pod").metadata.uid.expect("uid");
        let marker = self
            .kubelet_dir(node)
            .join("pods")
            .join(uid)
            .join("volumes/kubernetes.io~csi")
            .join(format!("pv-{ns}-{pvc}"))
            .join("mount")
            .join(file);
        wait_for("the volume mount", Duration::from_secs(30), || async {
            marker.exists()
        })
        .await;
    }
}

impl Cluster {
    /// A kubeconfig for user `user` (a client certificate signed by the cluster CA), with whatever
    /// RBAC the test binds to that user and nothing else.
    pub fn user_kubeconfig(&self, user: &str) -> PathBuf {
        let pki = self.dir.join("pki");
        let dir = self.dir.join("users").join(user);
        std::fs::create_dir_all(&dir).expect("user dir");
        let (key, csr, crt) = (
            dir.join("key.pem"),
            dir.join("req.csr"),
            dir.join("cert.pem"),
        );
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let p = |p: &Path| p.to_str().expect("utf8").to_string();
        openssl(&["genrsa", "-out", &p(&key), "2048"]);
        openssl(&[
            "req",
            "-new",
            "-key",
            &p(&key),
            "-subj",
            &format!("/CN={user}"),
            "-out",
            &p(&csr),
        ]);
        // Extensions make it an X.509 v3 certificate (rustls accepts nothing older).
        let ext = dir.join("ext.cnf");
        std::fs::write(
            &ext,
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
        )
        .expect("ext");
        openssl(&[
            "x509",
            "-req",
            "-extfile",
            &p(&ext),
            "-in",
            &p(&csr),
            "-CA",
            &p(&pki.join("ca.crt")),
            "-CAkey",
            &p(&pki.join("ca.key")),
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            &p(&crt),
        ]);
        let server = std::fs::read_to_string(self.kubeconfig())
            .expect("admin kubeconfig")
            .lines()
            .find_map(|l| l.trim().strip_prefix("server: ").map(String::from))
            .expect("server");
        let kc = dir.join("kubeconfig");
        std::fs::write(
            &kc,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    certificate-authority: {}\nusers:\n- name: u\n  user:\n    client-certificate: {}\n    client-key: {}\ncontexts:\n- name: x\n  context: {{cluster: c, user: u}}\ncurrent-context: x\n",
                p(&pki.join("ca.crt")),
                p(&crt),
                p(&key)
            ),
        )
        .expect("write kubeconfig");
        kc
    }
}

fn parse_env(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
        .collect()
}

pub async fn config_from(kubeconfig: &Path) -> Result<kube::Config, kube::Error> {
    let kc =
        kube::config::Kubeconfig::read_from(kubeconfig).map_err(kube::Error::InferKubeconfig)?;
    kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .map_err(kube::Error::InferKubeconfig)
}

pub async fn client_from(kubeconfig: &Path) -> Result<kube::Client, kube::Error> {
    kube::Client::try_from(config_from(kubeconfig).await?)
}

/// A new namespace `<prefix>-<random>` whose default service account exists (pods can be created).
pub async fn fresh_namespace(client: &kube::Client, prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .subsec_nanos();
    let name = format!("{prefix}-{:x}{:x}", std::process::id() % 0xffff, nanos);
    let ns: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).expect("ns");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
    wait_for(
        "default service account",
        Duration::from_secs(30),
        || async { sas.get_opt("default").await.ok().flatten().is_some() },
    )
    .await;
    name
}

/// Server-side applies every CustomResourceDefinition in the YAML files of `dir` and waits (30 s at
/// most) until each is Established. Returns the CRD names.
pub async fn apply_crds(client: &kube::Client, dir: &Path) -> Vec<String> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Patch, PatchParams};
    use serde::Deserialize;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("CRD dir")
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    for file in files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "yaml" || e == "yml"))
    {
        let text = std::fs::read_to_string(file).expect("read CRD file");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_json::Value::deserialize(doc).expect("YAML");
            if value.get("kind").and_then(|k| k.as_str()) != Some("CustomResourceDefinition") {
                continue;
            }
            let crd: CustomResourceDefinition = serde_json::from_value(value).expect("CRD");
            let name = crd.metadata.name.clone().expect("CRD name");
            crds.patch(
                &name,
                &PatchParams::apply("stowage-tests").force(),
                &Patch::Apply(&crd),
            )
            .await
            .expect("apply CRD");
            names.push(name);
        }
    }
    for name in &names {
        wait_for(
            &format!("CRD {name} Established"),
            Duration::from_secs(30),
            || async {
                crds.get(name)
                    .await
                    .ok()
                    .and_then(|c| c.status)
                    .and_then(|s| s.conditions)
                    .is_some_and(|cs| {
                        cs.iter()
                            .any(|c| c.type_ == "Established" && c.status == "True")
                    })
            },
        )
        .await;
    }
    names
}

/// Whether pod `name` exists and is Running.
pub async fn pod_running(pods: &Api<k8s_openapi::api::core::v1::Pod>, name: &str) -> bool {
    let pod = pods.get_opt(name).await.ok().flatten();
    pod.and_then(|p| p.status).and_then(|s| s.phase).as_deref() == Some("Running")
}

/// Whether PVC `name` exists and is Bound.
pub async fn pvc_bound(
    pvcs: &Api<k8s_openapi::api::core::v1::PersistentVolumeClaim>,
    name: &str,
) -> bool {
    let pvc = pvcs.get_opt(name).await.ok().flatten();
    pvc.and_then(|c| c.status).and_then(|s| s.phase).as_deref() == Some("Bound")
}

/// Polls an async condition every 100 ms until it holds or `timeout` passes.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
