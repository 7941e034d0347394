//! What the coordinator knows of the cluster, from watches: PVCs, Pods and Secrets, each a
//! reflector store fed by one watch per watched namespace (or one for the whole cluster), read
//! together as one [`Cache`]. The planner and the reconcilers read these stores; nothing
//! LISTs per run or per reconcile. Secrets are cached as key names only: the values are replaced
//! by a marker of whether each is empty, and a run reads the values it needs when it starts.

use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use crate::crd::PreBackupPod;
use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use stowage_common::contract;

/// How long start-up waits for the first full list of every store.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
#[error("the watch caches did not fill within {secs}s: the API server is unreachable or too slow")]
pub struct SyncTimeout {
    secs: u64,
}

impl SyncTimeout {
    pub fn after(d: Duration) -> Self {
        Self { secs: d.as_secs() }
    }
}

/// The reflector stores of one kind, one per watched namespace, read as one. With
/// `--namespace` unset there is one store, of the whole cluster.
pub struct Cache<K>(Vec<Store<K>>)
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone;

impl<K> Clone for Cache<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<K> Cache<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    pub fn new(stores: Vec<Store<K>>) -> Self {
        Self(stores)
    }

    /// Every object of every store.
    pub fn state(&self) -> Vec<Arc<K>> {
        self.0.iter().flat_map(Store::state).collect()
    }

    /// The object `key` names, from whichever store holds its namespace.
    pub fn get(&self, key: &ObjectRef<K>) -> Option<Arc<K>> {
        self.0.iter().find_map(|s| s.get(key))
    }
}

impl<K> FromIterator<Store<K>> for Cache<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    fn from_iter<I: IntoIterator<Item = Store<K>>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

#[derive(Clone)]
pub struct Stores {
    pub pvcs: Cache<PersistentVolumeClaim>,
    pub pods: Cache<Pod>,
    pub secrets: Cache<Secret>,
    pub prebackup_pods: Cache<PreBackupPod>,
    ready: Vec<Ready>,
}

/// Whether a watch has delivered its first full list. kube's `Store::wait_until_ready` keeps one
/// waker, so of several tasks waiting on one store only the last is woken; reconcilers wait here
/// instead, on a signal set by the watch's own stream.
#[derive(Clone)]
pub struct Ready(tokio::sync::watch::Receiver<bool>);

/// A readiness signal: the sender goes to the watch's driver ([`observe`]), the `Ready` to waiters.
pub fn readiness() -> (tokio::sync::watch::Sender<bool>, Ready) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    (tx, Ready(rx))
}

impl Ready {
    pub async fn wait(&self) {
        let mut rx = self.0.clone();
        let _ = rx.wait_for(|ready| *ready).await;
    }
}

/// What a watch's driver does with each item of its stream: a first full list marks it ready; a
/// failure is logged (the watcher retries with backoff), or a cache that never fills (RBAC, a
/// missing CRD) would go unexplained.
pub fn observe<K>(
    kind: &'static str,
    ready: &tokio::sync::watch::Sender<bool>,
    r: Result<watcher::Event<K>, watcher::Error>,
) -> futures::future::Ready<()> {
    match r {
        Ok(watcher::Event::InitDone) => {
            ready.send_replace(true);
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(kind, error = %e, "watch failed; retrying with backoff"),
    }
    futures::future::ready(())
}

/// Objects per page of a watch's initial list (and re-list). A page is held whole while it is
/// decoded; small pages keep that peak small next to the slimmed cache (kube's default is 500).
const WATCH_PAGE: u32 = 100;

fn watch_config() -> watcher::Config {
    watcher::Config::default().page_size(WATCH_PAGE)
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Drops what the coordinator never reads, so the caches stay small.
fn slim<K: Resource>(obj: &mut K) {
    obj.meta_mut().managed_fields = None;
    if let Some(a) = obj.meta_mut().annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// What the coordinator reads of a pod: its identity, labels, annotations and owners; the node; the
/// containers' names; the volumes' PVC claims; the phase and conditions. Everything else (images,
/// commands, environment, probes, resources, container statuses) is dropped before caching: a
/// cluster's pods are its largest objects, and the cache holds every one of the watched namespaces.
fn slim_pod(p: &mut Pod) {
    slim(p);
    if let Some(spec) = p.spec.take() {
        p.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            node_name: spec.node_name,
            containers: spec
                .containers
                .into_iter()
                .map(|c| k8s_openapi::api::core::v1::Container {
                    name: c.name,
                    ..Default::default()
                })
                .collect(),
            volumes: spec.volumes.map(|vs| {
                vs.into_iter()
                    .filter(|v| v.persistent_volume_claim.is_some())
                    .map(|v| k8s_openapi::api::core::v1::Volume {
                        name: v.name,
                        persistent_volume_claim: v.persistent_volume_claim,
                        ..Default::default()
                    })
                    .collect()
            }),
            ..Default::default()
        });
    }
    if let Some(status) = p.status.take() {
        p.status = Some(k8s_openapi::api::core::v1::PodStatus {
            phase: status.phase,
            conditions: status.conditions,
            ..Default::default()
        });
    }
}

/// What the coordinator reads of a PVC: its identity, labels, annotations and bound volume.
fn slim_pvc(p: &mut PersistentVolumeClaim) {
    slim(p);
    if let Some(spec) = p.spec.take() {
        p.spec = Some(k8s_openapi::api::core::v1::PersistentVolumeClaimSpec {
            volume_name: spec.volume_name,
            ..Default::default()
        });
    }
    p.status = None;
}

/// A PreBackupPod without its pod template, which a tenant may make as large as an object can be
/// and which is read only when the pod is made (`prebackup_pod::start` fetches the object then):
/// only the first container's name stays, since it names the command's identity.
fn slim_prebackup(p: &mut PreBackupPod) {
    slim(p);
    let first = p
        .spec
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .map(|c| c.name.clone());
    p.spec.pod = k8s_openapi::api::core::v1::PodTemplateSpec {
        metadata: None,
        spec: first.map(|name| k8s_openapi::api::core::v1::PodSpec {
            containers: vec![k8s_openapi::api::core::v1::Container {
                name,
                ..Default::default()
            }],
            ..Default::default()
        }),
    };
}

/// Secret values never enter the cache: a non-empty value becomes one byte, an empty one stays empty.
fn keys_only(s: &mut Secret) {
    slim(s);
    for v in s.data.iter_mut().flat_map(|d| d.values_mut()) {
        *v = ByteString(if v.0.is_empty() { Vec::new() } else { vec![1] });
    }
    for v in s.string_data.iter_mut().flat_map(|d| d.values_mut()) {
        *v = if v.is_empty() {
            String::new()
        } else {
            "1".into()
        };
    }
}

/// Starts one reflector per kind; the returned future drives them (spawn it).
pub fn start(
    client: &Client,
    namespace: Option<&str>,
    secret_events: reflector::store::Writer<Secret>,
) -> (Stores, impl Future<Output = ()> + Send + 'static) {
    let (pvcs, pvc_writer) = reflector::store();
    let (pods, pod_writer) = reflector::store();
    let secrets = secret_events.as_reader();
    let (pvcs_ready, pvcs_ready_rx) = readiness();
    let (pods_ready, pods_ready_rx) = readiness();
    let (secrets_ready, secrets_ready_rx) = readiness();
    let (prebackup_pods, prebackup_writer) = reflector::store();
    let (prebackup_ready, prebackup_ready_rx) = readiness();
    let prebackup_watch = watcher(api::<PreBackupPod>(client, namespace), watch_config())
        .default_backoff()
        .modify(slim_prebackup)
        .reflect(prebackup_writer)
        .for_each(move |r| observe("prebackuppods", &prebackup_ready, r));
    let pvc_watch = watcher(
        api::<PersistentVolumeClaim>(client, namespace),
        watch_config(),
    )
    .default_backoff()
    .modify(slim_pvc)
    .reflect(pvc_writer)
    .for_each(move |r| observe("persistentvolumeclaims", &pvcs_ready, r));
    let pod_watch = watcher(api::<Pod>(client, namespace), watch_config())
        .default_backoff()
        .modify(slim_pod)
        .reflect(pod_writer)
        .for_each(move |r| observe("pods", &pods_ready, r));
    // Only Secrets labelled as credentials are ever used, so only they are watched (and cached).
    let secret_watch = watcher(
        api::<Secret>(client, namespace),
        watch_config().labels(contract::LABEL_CREDENTIALS_SELECTOR),
    )
    .default_backoff()
    .modify(keys_only)
    .reflect_shared(secret_events)
    .for_each(move |r| observe("secrets", &secrets_ready, r));
    let drive = async move {
        tokio::join!(pvc_watch, pod_watch, secret_watch, prebackup_watch);
    };
    (
        Stores {
            pvcs: Cache::new(vec![pvcs]),
            pods: Cache::new(vec![pods]),
            secrets: Cache::new(vec![secrets]),
            prebackup_pods: Cache::new(vec![prebackup_pods]),
            ready: vec![
                pvcs_ready_rx,
                pods_ready_rx,
                secrets_ready_rx,
                prebackup_ready_rx,
            ],
        },
        drive,
    )
}

impl Stores {
    /// The stores of several namespaces' watches, read as one.
    pub fn merge(parts: Vec<Stores>) -> Stores {
        Stores {
            pvcs: parts.iter().flat_map(|p| p.pvcs.0.clone()).collect(),
            pods: parts.iter().flat_map(|p| p.pods.0.clone()).collect(),
            secrets: parts.iter().flat_map(|p| p.secrets.0.clone()).collect(),
            prebackup_pods: parts
                .iter()
                .flat_map(|p| p.prebackup_pods.0.clone())
                .collect(),
            ready: parts.iter().flat_map(|p| p.ready.clone()).collect(),
        }
    }

    /// Waits until every store has had its first full list (bounded by [`SYNC_TIMEOUT`]).
    pub async fn synced(&self) -> Result<(), SyncTimeout> {
        wait_all(&self.ready).await
    }
}

/// Waits until each of `ready` is set, at most [`SYNC_TIMEOUT`] in all.
pub async fn wait_all(ready: &[Ready]) -> Result<(), SyncTimeout> {
    let all = async {
        for r in ready {
            r.wait().await;
        }
    };
    tokio::time::timeout(SYNC_TIMEOUT, all)
        .await
        .map_err(|_| SyncTimeout::after(SYNC_TIMEOUT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slimmed_pod_plans_exactly_like_the_full_one_and_is_much_smaller() {
        let full: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "db-0", "namespace": "shop", "uid": "u1",
                "creationTimestamp": "2026-12-01T00:00:00Z",
                "labels": {"app": "db"}, "annotations": {"stowage.dev/backup-command": "pg_dumpall"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db",
                                     "uid": "s1", "controller": true}],
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
            "spec": {"nodeName": "node-1",
                "containers": [{"name": "pg", "image": "postgres:17",
                    "env": (0..200).map(|i| serde_json::json!({"name": format!("VAR_{i}"), "value": "x".repeat(100)})).collect::<Vec<_>>(),
                    "command": ["postgres", "-c", "shared_buffers=1GB"]}],
                "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data-db-0"}},
                            {"name": "config", "configMap": {"name": "db-config"}}],
                "tolerations": [{"operator": "Exists"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.7",
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [{"name": "pg", "ready": true, "restartCount": 0,
                    "image": "postgres:17", "imageID": "sha256:abc"}]}
        }))
        .unwrap();
        let mut slimmed = full.clone();
        slim_pod(&mut slimmed);
        let info = |p: &Pod| format!("{:?}", crate::run::backup::pod_info(p));
        assert_eq!(info(&slimmed), info(&full));
        let size = |p: &Pod| serde_json::to_vec(p).unwrap().len();
        assert!(
            size(&slimmed) * 10 < size(&full),
            "{} bytes of {}",
            size(&slimmed),
            size(&full)
        );
        assert!(slimmed.metadata.managed_fields.is_none());
    }

    #[test]
    fn secret_values_never_reach_the_cache() {
        let mut s = Secret {
            data: Some(
                [
                    ("password".to_string(), ByteString(b"hunter2".to_vec())),
                    ("empty".to_string(), ByteString(Vec::new())),
                ]
                .into(),
            ),
            ..Default::default()
        };
        keys_only(&mut s);
        let d = s.data.unwrap();
        assert_eq!(d["password"].0, vec![1]);
        assert!(d["empty"].0.is_empty());
    }
}
