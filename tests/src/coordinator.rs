//! Starting a real `stowage-coordinator` process against the local control plane, and the helpers
//! its tests share: repository Secrets, waiting for runs, reading Events.
//!
//! Length: the coordinator harness and its run and wait helpers, which every cluster suite uses.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, PostParams};
use serde::de::DeserializeOwned;

use crate::cluster::Cluster;

/// Which agents the coordinator discovers.
pub enum Agents {
    /// The cluster's agent DaemonSet (tests/cluster/stowage-up), with the cluster's PKI.
    Shared,
    /// A test's own agent pods and processes: pods `selector` in `namespace`, gRPC on `port`,
    /// certificates from a test Pki in `pki_dir`.
    Private {
        namespace: String,
        selector: String,
        port: u16,
        pki_dir: PathBuf,
    },
}

pub struct CoordinatorOptions {
    /// The one namespace this coordinator watches; its Lease lives there too.
    pub namespace: String,
    pub identity: String,
    pub agents: Agents,
    /// Default: the cluster admin's.
    pub kubeconfig: Option<PathBuf>,
    pub extra_args: Vec<String>,
    /// Watch every namespace (the Lease stays in `namespace`): for a cluster of its own only.
    pub all_namespaces: bool,
    /// `--lease-duration`: short in tests (a standby takes over quickly); a loaded control plane
    /// (the scale bench) needs the chart's.
    pub lease_duration: String,
}

impl CoordinatorOptions {
    pub fn new(namespace: &str) -> Self {
        Self {
            namespace: namespace.into(),
            identity: format!("coordinator-{namespace}"),
            agents: Agents::Shared,
            kubeconfig: None,
            extra_args: Vec::new(),
            all_namespaces: false,
            lease_duration: "3s".into(),
        }
    }
}

pub struct Coordinator {
    child: Child,
    pub metrics: SocketAddr,
    pub log: PathBuf,
    pub identity: String,
}

impl Coordinator {
    /// Starts the coordinator and waits until /healthz answers (30 s at most).
    pub async fn start(cluster: &Cluster, opts: CoordinatorOptions) -> Coordinator {
        let metrics: SocketAddr = format!("127.0.0.1:{}", crate::free_port("127.0.0.1"))
            .parse()
            .expect("addr");
        let logs = cluster.dir.join("logs");
        std::fs::create_dir_all(&logs).expect("log dir");
        let log = logs.join(format!("{}-{}.log", opts.identity, metrics.port()));
        let out = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(crate::binary("stowage-coordinator"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env(
                "KUBECONFIG",
                opts.kubeconfig
                    .clone()
                    .unwrap_or_else(|| cluster.kubeconfig()),
            )
            .env(
                "RUST_LOG",
                "info,stowage_coordinator=debug,kube_runtime=warn",
            )
            .args(
                (!opts.all_namespaces)
                    .then(|| ["--namespace".to_string(), opts.namespace.clone()])
                    .into_iter()
                    .flatten(),
            )
            .arg("--lease-namespace")
            .arg(&opts.namespace)
            .arg("--identity")
            .arg(&opts.identity)
            .arg("--metrics-listen")
            .arg(metrics.to_string())
            .arg("--lease-duration")
            .arg(&opts.lease_duration);
        match &opts.agents {
            Agents::Shared => {
                let e = &cluster.env;
                cmd.arg("--agent-namespace")
                    .arg(&e["STOWAGE_AGENT_NAMESPACE"])
                    .arg("--agent-selector")
                    .arg(&e["STOWAGE_AGENT_SELECTOR"])
                    .arg("--agent-port")
                    .arg(&e["STOWAGE_AGENT_PORT"])
                    .arg("--tls-ca")
                    .arg(&e["STOWAGE_TLS_CA"])
                    .arg("--tls-cert")
                    .arg(&e["STOWAGE_COORDINATOR_CERT"])
                    .arg("--tls-key")
                    .arg(&e["STOWAGE_COORDINATOR_KEY"]);
            }
            Agents::Private {
                namespace,
                selector,
                port,
                pki_dir,
            } => {
                cmd.arg("--agent-namespace")
                    .arg(namespace)
                    .arg("--agent-selector")
                    .arg(selector)
                    .arg("--agent-port")
                    .arg(port.to_string())
                    .arg("--tls-ca")
                    .arg(pki_dir.join("ca.pem"))
                    .arg("--tls-cert")
                    .arg(pki_dir.join("client.pem"))
                    .arg("--tls-key")
                    .arg(pki_dir.join("client-key.pem"));
            }
        }
        let child = cmd
            .args(&opts.extra_args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .expect("spawn stowage-coordinator");
        let mut c = Coordinator {
            child,
            metrics,
            log,
            identity: opts.identity,
        };
        crate::wait_healthy(&mut c.child, c.metrics, "coordinator", &c.log).await;
        c
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = crate::http_get(self.metrics, "/metrics").await?;
        crate::agent::metric_value(&body, series)
    }

    pub async fn metrics_text(&self) -> String {
        crate::http_get(self.metrics, "/metrics")
            .await
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// Waits until this replica leads (its leader gauge is 1), at most `timeout`.
    pub async fn wait_leading(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.metric("stowage_coordinator_leader").await != Some(1.0) {
            assert!(
                Instant::now() < deadline,
                "{} did not become leader within {timeout:?}; log:\n{}",
                self.identity,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills the process at once (SIGKILL), as a node failure or OOM kill would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        crate::terminate(&mut self.child);
    }
}

/// Secret `name` with `key: value` in `ns`, labelled as repository credentials.
pub async fn secret(client: &kube::Client, ns: &str, name: &str, data: &[(&str, &str)]) {
    secret_with_labels(
        client,
        ns,
        name,
        data,
        &[("stowage.dev/credentials", "true")],
    )
    .await
}

/// Secret `name` with `key: value` and `labels` in `ns`.
pub async fn secret_with_labels(
    client: &kube::Client,
    ns: &str,
    name: &str,
    data: &[(&str, &str)],
    labels: &[(&str, &str)],
) {
    let labels: std::collections::BTreeMap<_, _> = labels.iter().copied().collect();
    let s: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": labels},
        "stringData": data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<std::collections::BTreeMap<_, _>>(),
    }))
    .expect("secret");
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &s)
        .await
        .expect("create secret");
}

/// A local-backend block (repository `repo`, password from Secret `backup-repo`/`password`), which
/// creates the repository when it is missing (`initialize: true`).
pub fn local_backend(repo: &Path) -> serde_json::Value {
    serde_json::json!({
        "repoPasswordSecretRef": {"name": "backup-repo", "key": "password"},
        "local": {"path": repo.display().to_string()},
        "initialize": true,
    })
}

/// A namespaced API object the helpers below can create and read as JSON.
pub trait Object:
    kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
    + Clone
    + DeserializeOwned
    + serde::Serialize
    + std::fmt::Debug
{
}

impl<K> Object for K where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug
{
}

/// The `metadata` of a run named `name` that belongs to Schedule `schedule` (its labels and
/// controller owner), as a fired run's would be.
pub async fn fired_metadata(
    client: &kube::Client,
    ns: &str,
    schedule: &str,
    action: &str,
    name: &str,
) -> serde_json::Value {
    let uid = Api::<stowage_api::Schedule>::namespaced(client.clone(), ns)
        .get(schedule)
        .await
        .expect("schedule")
        .metadata
        .uid
        .expect("uid");
    serde_json::json!({"name": name,
        "labels": {"stowage.dev/schedule": schedule, "stowage.dev/action": action},
        "ownerReferences": [{"apiVersion": "stowage.dev/v1alpha1", "kind": "Schedule",
            "name": schedule, "uid": uid, "controller": true}]})
}

/// Creates any namespaced object from JSON.
pub async fn create<K: Object>(client: &kube::Client, ns: &str, obj: serde_json::Value) -> K {
    let o: K = serde_json::from_value(obj).expect("object json");
    Api::<K>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &o)
        .await
        .expect("create object")
}

/// Creates a run from JSON and waits (at most `timeout`) until it has finished; returns its JSON.
pub async fn run_to_end<K: Object>(
    client: &kube::Client,
    ns: &str,
    obj: serde_json::Value,
    timeout: Duration,
) -> serde_json::Value {
    let name = obj["metadata"]["name"]
        .as_str()
        .expect("metadata.name")
        .to_string();
    let _: K = create(client, ns, obj).await;
    wait_json::<K>(client, ns, &name, timeout, "finished", finished).await
}

/// Polls `name` until `done` holds for its JSON form, at most `timeout`; returns the JSON.
pub async fn wait_json<K: Object>(
    client: &kube::Client,
    ns: &str,
    name: &str,
    timeout: Duration,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let api = Api::<K>::namespaced(client.clone(), ns);
    let deadline = Instant::now() + timeout;
    let mut last = serde_json::Value::Null;
    loop {
        if let Ok(Some(o)) = api.get_opt(name).await {
            last = serde_json::to_value(&o).expect("json");
            if done(&last) {
                return last;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{ns}/{name}: {what} not reached within {timeout:?}; last seen:\n{}",
            serde_json::to_string_pretty(&last).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether a run's JSON shows a finished phase.
pub fn finished(v: &serde_json::Value) -> bool {
    matches!(
        v["status"]["phase"].as_str(),
        Some("Succeeded" | "PartiallyFailed" | "Failed")
    )
}

/// Whether a run's JSON shows at least one volume done while the run still goes: the moment to
/// interrupt a coordinator mid-run.
pub fn partly_done(v: &serde_json::Value) -> bool {
    v["status"]["items"]
        .as_array()
        .is_some_and(|items| items.iter().any(|i| i["phase"] == "Succeeded"))
        && !finished(v)
}

/// The condition `type_` of an object's JSON.
pub fn condition<'a>(v: &'a serde_json::Value, type_: &str) -> Option<&'a serde_json::Value> {
    v["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// Events about object `name` in `ns` (events.k8s.io/v1).
pub async fn events_for(client: &kube::Client, ns: &str, name: &str) -> Vec<Event> {
    Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .collect()
}

/// Waits until an Event about `name` with `reason` whose note contains `needle` exists.
pub async fn wait_event(
    client: &kube::Client,
    ns: &str,
    name: &str,
    reason: &str,
    needle: &str,
    timeout: Duration,
) -> Event {
    let deadline = Instant::now() + timeout;
    loop {
        let evs = events_for(client, ns, name).await;
        if let Some(e) = evs.iter().find(|e| {
            e.reason.as_deref() == Some(reason)
                && e.note.as_deref().is_some_and(|n| n.contains(needle))
        }) {
            return e.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no Event {reason:?} mentioning {needle:?} about {ns}/{name} within {timeout:?}; have: {:?}",
            evs.iter()
                .map(|e| (e.reason.clone(), e.note.clone()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A test's own agents: a DaemonSet in namespace `ns` (the controller manager puts a pod on every
/// node; kwok gives hostNetwork pods their node's address) and agent processes for `nodes`
/// ((name, address) pairs), all on one port, with a PKI of their own.
pub struct PrivateAgents {
    pub agents: Vec<crate::agent::Agent>,
    options: Vec<crate::agent::AgentOptions>,
    pub pki: crate::tls::Pki,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl PrivateAgents {
    pub async fn start(
        cluster: &Cluster,
        client: &kube::Client,
        ns: &str,
        nodes: &[(&str, &str)],
        bwrap: Option<PathBuf>,
    ) -> PrivateAgents {
        Self::start_with_args(cluster, client, ns, nodes, bwrap, &[]).await
    }

    /// [`PrivateAgents::start`] with extra agent flags.
    pub async fn start_with_args(
        cluster: &Cluster,
        client: &kube::Client,
        ns: &str,
        nodes: &[(&str, &str)],
        bwrap: Option<PathBuf>,
        agent_args: &[&str],
    ) -> PrivateAgents {
        let ds: k8s_openapi::api::apps::v1::DaemonSet = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "test-agents"},
            "spec": {
                "selector": {"matchLabels": {"app": "test-agents"}},
                "template": {"metadata": {"labels": {"app": "test-agents"}},
                    "spec": {"hostNetwork": true, "tolerations": [{"operator": "Exists"}],
                             "nodeSelector": {"type": "kwok"},
                             "containers": [{"name": "agent", "image": "stowage/agent:test"}]}}}
        }))
        .expect("daemonset");
        Api::<k8s_openapi::api::apps::v1::DaemonSet>::namespaced(client.clone(), ns)
            .create(&PostParams::default(), &ds)
            .await
            .expect("create daemonset");
        let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), ns);
        let lp = ListParams::default().labels("app=test-agents");
        let want = cluster.node_names().len();
        crate::cluster::wait_for(
            "agent pods on every node",
            Duration::from_secs(60),
            || async {
                pods.list(&lp).await.is_ok_and(|l| {
                    l.items.len() == want
                        && l.items.iter().all(|p| {
                            let st = p.status.as_ref();
                            st.and_then(|s| s.pod_ip.as_deref()).is_some()
                                && st.and_then(|s| s.phase.as_deref()) == Some("Running")
                        })
                })
            },
        )
        .await;
        let dir = tempfile::tempdir().expect("tmp");
        let pki = crate::tls::Pki::create(dir.path());
        let port = crate::free_port("127.0.0.11");
        let (mut agents, mut options) = (Vec::new(), Vec::new());
        for (node, ip) in nodes {
            let mut opts = crate::agent::AgentOptions::new(&cluster.kubelet_dir(node));
            opts.node = node.to_string();
            opts.ip = ip.to_string();
            opts.grpc_port = Some(port);
            opts.bwrap = bwrap.clone();
            opts.extra_args = agent_args.iter().map(|a| a.to_string()).collect();
            opts.local_roots = vec![cluster.dir.join("repos"), std::env::temp_dir()];
            // The cluster's agents' API identity (tests/cluster/stowage-up), so commands run.
            opts.kubeconfig = Some(cluster.dir.join("agent.kubeconfig"));
            options.push(opts.clone());
            agents.push(crate::agent::Agent::start(opts, &pki).await);
        }
        PrivateAgents {
            agents,
            options,
            pki,
            port,
            _dir: dir,
        }
    }

    /// Stops agent `i` (SIGKILL) and starts it again with the same options and the current PKI
    /// files, on the same address.
    pub async fn restart(&mut self, i: usize) {
        self.agents[i].kill();
        self.agents[i] = crate::agent::Agent::start(self.options[i].clone(), &self.pki).await;
    }

    /// Options for a coordinator in `ns` that discovers these agents.
    pub fn coordinator_options(&self, ns: &str) -> CoordinatorOptions {
        CoordinatorOptions {
            agents: Agents::Private {
                namespace: ns.into(),
                selector: "app=test-agents".into(),
                port: self.port,
                pki_dir: self.pki.dir.clone(),
            },
            ..CoordinatorOptions::new(ns)
        }
    }
}
