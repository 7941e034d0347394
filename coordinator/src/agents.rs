//! Finding the node agents: they are the pods of the agent DaemonSet (selected by label). A
//! reflector keeps node name → pod IP current; the coordinator dials `podIP:port` with mutual TLS.
//! No address is configured by hand. The client certificate, key and CA are re-read when their
//! files change (cert-manager renews them under a running coordinator): channels made after the
//! change dial with the new ones.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::{self, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use stowage_proto::v1::agent_client::AgentClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use stowage_common::runtime::read_pem;

use crate::config::Config;
use crate::metrics::Metrics;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentUnavailable {
    #[error("no Stowage agent on node {node} (is the agent DaemonSet scheduled there?)")]
    NoAgent { node: String },
    #[error("the Stowage agent on node {node} ({pod}) is not ready: {why}")]
    NotReady {
        node: String,
        pod: String,
        why: String,
    },
    #[error("agent address {address}: {reason}")]
    BadAddress { address: String, reason: String },
}

/// A TLS file that cannot be read (the shared runtime's error says which and why).
pub type TlsError = stowage_common::runtime::RuntimeError;

/// A ready agent: which pod serves a node, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentEndpoint {
    pub node: String,
    pub pod: String,
    /// `https://podIP:port`.
    pub uri: String,
}

/// Why a pod cannot serve yet, or `None` when it can.
fn not_ready(pod: &Pod) -> Option<String> {
    if pod.metadata.deletion_timestamp.is_some() {
        return Some("being deleted".into());
    }
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() != Some("Running") {
        return Some(format!(
            "phase {}",
            status.phase.as_deref().unwrap_or("unknown")
        ));
    }
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    if !ready {
        return Some("readiness probe not passing".into());
    }
    if status.pod_ip.as_deref().unwrap_or_default().is_empty() {
        return Some("no pod IP yet".into());
    }
    None
}

/// How often the TLS files are compared even without an inotify event.
const TLS_POLL: Duration = Duration::from_secs(60);

pub struct AgentDirectory {
    store: Store<Pod>,
    port: u16,
    /// `None` in plaintext mode; else the newest good client configuration.
    tls: Option<RwLock<ClientTlsConfig>>,
    timeout: Duration,
    channels: Mutex<HashMap<String, Channel>>,
    /// `--maintenance-agent`, as `host:port`.
    maintenance: Option<String>,
}

impl AgentDirectory {
    /// Starts watching the agent pods; the returned future drives the watch and must be polled.
    pub fn start(
        client: Client,
        config: &Config,
        metrics: Metrics,
    ) -> Result<(Arc<Self>, impl Future<Output = ()> + Send + 'static), TlsError> {
        let api: Api<Pod> = Api::namespaced(client, &config.agent_namespace);
        let (store, writer) = reflector::store();
        let watch_cfg = watcher::Config::default().labels(&config.agent_selector);
        let reader = store.clone();
        // Every event, InitDone included: the store is only complete (and the counts right) once the
        // initial list has been committed.
        let driver = reflector(writer, watcher(api, watch_cfg))
            .default_backoff()
            .for_each(move |ev| {
                if let Err(e) = ev {
                    tracing::warn!(error = %e, "watching agent pods");
                }
                let (mut ready, mut not) = (0, 0);
                for pod in reader.state() {
                    if not_ready(&pod).is_none() {
                        ready += 1;
                    } else {
                        not += 1;
                    }
                }
                metrics.agents.with_label_values(&["ready"]).set(ready);
                metrics.agents.with_label_values(&["not_ready"]).set(not);
                futures::future::ready(())
            });
        let dir = Arc::new(Self {
            store,
            port: config.agent_port,
            tls: tls_config(config)?.map(RwLock::new),
            timeout: config.agent_timeout,
            channels: Mutex::new(HashMap::new()),
            maintenance: config.maintenance_agent.clone(),
        });
        let changes = (!config.insecure_plaintext).then(|| {
            let paths: Vec<PathBuf> = [&config.tls_ca, &config.tls_cert, &config.tls_key]
                .into_iter()
                .flatten()
                .cloned()
                .collect();
            stowage_common::tls_files::watch(paths, TLS_POLL)
        });
        let server_name = config.agent_tls_server_name.clone();
        let weak = Arc::downgrade(&dir);
        let reload = async move {
            let Some(mut changes) = changes else { return };
            while changes.changed().await.is_ok() {
                let Some(dir) = weak.upgrade() else { return };
                let contents = changes.borrow_and_update().clone();
                dir.reload_tls(&contents, server_name.as_deref());
            }
        };
        let driver = async move {
            futures::future::join(driver, reload).await;
        };
        Ok((dir, driver))
    }

    /// Takes new TLS files (CA, certificate, key) if they make a usable configuration, and forgets
    /// the channels made with the old one so that the next calls dial anew. Calls in flight keep
    /// their connection (a renewed certificate's predecessor is still valid).
    fn reload_tls(&self, contents: &[Vec<u8>], server_name: Option<&str>) {
        let Some(current) = &self.tls else { return };
        let [ca, cert, key] = contents else { return };
        match client_tls(ca, cert, key, server_name) {
            Ok(tls) => {
                *current.write().unwrap_or_else(PoisonError::into_inner) = tls;
                self.channels
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clear();
                tracing::info!(
                    "TLS files changed: new agent connections use the new CA, certificate and key"
                );
            }
            Err(e) => tracing::warn!(error = %e,
                "TLS files changed but do not make a usable configuration; still using the previous one"),
        }
    }

    /// Waits for the first full list of agent pods.
    pub async fn wait_synced(&self) {
        let _ = self.store.wait_until_ready().await;
    }

    /// Nodes whose agent is ready, sorted.
    pub fn ready_nodes(&self) -> Vec<String> {
        let mut nodes: Vec<String> = self
            .store
            .state()
            .iter()
            .filter(|p| not_ready(p).is_none())
            .filter_map(|p| p.spec.as_ref()?.node_name.clone())
            .collect();
        nodes.sort();
        nodes.dedup();
        nodes
    }

    /// The ready agent serving `node`.
    pub fn endpoint(&self, node: &str) -> Result<AgentEndpoint, AgentUnavailable> {
        let pods = self.store.state();
        let mut on_node = pods
            .iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
            .peekable();
        if on_node.peek().is_none() {
            return Err(AgentUnavailable::NoAgent { node: node.into() });
        }
        let mut last_reason = None;
        for pod in on_node {
            match not_ready(pod) {
                None => {
                    let ip = pod
                        .status
                        .as_ref()
                        .and_then(|s| s.pod_ip.clone())
                        .unwrap_or_default();
                    let host = if ip.contains(':') {
                        format!("[{ip}]")
                    } else {
                        ip
                    };
                    let scheme = if self.tls.is_some() { "https" } else { "http" };
                    return Ok(AgentEndpoint {
                        node: node.into(),
                        pod: pod.name_any(),
                        uri: format!("{scheme}://{host}:{}", self.port),
                    });
                }
                Some(why) => last_reason = Some((pod.name_any(), why)),
            }
        }
        let (pod, why) = last_reason.unwrap_or_default();
        Err(AgentUnavailable::NotReady {
            node: node.into(),
            pod,
            why,
        })
    }

    /// The maintenance container (`--maintenance-agent`), if there is one: where the Prunes of
    /// backends with `maintenance` credentials run, never on a node agent.
    pub fn maintenance_endpoint(&self) -> Option<AgentEndpoint> {
        let address = self.maintenance.as_ref()?;
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        Some(AgentEndpoint {
            node: "(maintenance container)".into(),
            pod: String::new(),
            uri: format!("{scheme}://{address}"),
        })
    }

    /// A client for `ep`. Channels are shared per address and connect lazily, so a restarted agent
    /// is reached again without the coordinator doing anything.
    pub fn client(&self, ep: &AgentEndpoint) -> Result<AgentClient<Channel>, AgentUnavailable> {
        let bad = |reason: String| AgentUnavailable::BadAddress {
            address: ep.uri.clone(),
            reason,
        };
        let mut channels = self
            .channels
            .lock()
            .map_err(|_| bad("channel cache poisoned".into()))?;
        if let Some(ch) = channels.get(&ep.uri) {
            return Ok(bounded(AgentClient::new(ch.clone())));
        }
        let mut endpoint = Endpoint::from_shared(ep.uri.clone())
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            // A dead agent process resets the connection at once; a vanished node is noticed
            // when pings go unanswered.
            .http2_keep_alive_interval(self.timeout / 3)
            .keep_alive_timeout(self.timeout)
            .keep_alive_while_idle(true);
        if let Some(tls) = &self.tls {
            let tls = tls.read().unwrap_or_else(PoisonError::into_inner).clone();
            endpoint = endpoint.tls_config(tls).map_err(|e| bad(e.to_string()))?;
        }
        let ch = endpoint.connect_lazy();
        channels.insert(ep.uri.clone(), ch.clone());
        Ok(bounded(AgentClient::new(ch)))
    }
}

/// A client whose messages are bounded both ways (an agent's snapshot list may exceed tonic's
/// 4 MiB default, and nothing larger than the agent may send is ever decoded).
fn bounded(c: AgentClient<Channel>) -> AgentClient<Channel> {
    c.max_decoding_message_size(stowage_proto::MESSAGE_MAX)
        .max_encoding_message_size(stowage_proto::MESSAGE_MAX)
}

fn tls_config(config: &Config) -> Result<Option<ClientTlsConfig>, TlsError> {
    if config.insecure_plaintext {
        return Ok(None);
    }
    let ca = read_pem("the CA certificate (--tls-ca)", config.tls_ca.as_deref())?;
    let cert = read_pem(
        "the coordinator's certificate (--tls-cert)",
        config.tls_cert.as_deref(),
    )?;
    let key = read_pem(
        "the coordinator's key (--tls-key)",
        config.tls_key.as_deref(),
    )?;
    Ok(Some(build_tls(
        &ca,
        &cert,
        &key,
        config.agent_tls_server_name.as_deref(),
    )))
}

fn build_tls(ca: &[u8], cert: &[u8], key: &[u8], server_name: Option<&str>) -> ClientTlsConfig {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key));
    match server_name {
        Some(name) => tls.domain_name(name),
        None => tls,
    }
}

/// [`build_tls`], checked by building a connector with it (which parses the PEM): a half-written
/// file is refused here, not at the next call.
fn client_tls(
    ca: &[u8],
    cert: &[u8],
    key: &[u8],
    server_name: Option<&str>,
) -> Result<ClientTlsConfig, tonic::transport::Error> {
    let tls = build_tls(ca, cert, key, server_name);
    Endpoint::from_static("https://agent.invalid").tls_config(tls.clone())?;
    Ok(tls)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodCondition, PodSpec, PodStatus};

    fn pod(phase: &str, ready: bool, ip: Option<&str>) -> Pod {
        Pod {
            spec: Some(PodSpec {
                node_name: Some("node-1".into()),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                pod_ip: ip.map(String::from),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn only_running_ready_pods_with_an_ip_serve() {
        assert_eq!(not_ready(&pod("Running", true, Some("10.0.0.1"))), None);
        assert!(
            not_ready(&pod("Pending", false, None))
                .unwrap()
                .contains("Pending")
        );
        assert!(
            not_ready(&pod("Running", false, Some("10.0.0.1")))
                .unwrap()
                .contains("readiness")
        );
        assert!(
            not_ready(&pod("Running", true, None))
                .unwrap()
                .contains("IP")
        );
    }
}
