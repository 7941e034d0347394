//! What the coordinator knows of the cluster, from watches: PVCs, Pods, Secrets and PreBackupPods,
//! each fed by one watch per watched namespace (or one for the whole cluster) and read together.
//! The planner and the reconcilers read these caches; nothing LISTs per run or per reconcile.
//!
//! - Pods and PVCs, a cluster's most numerous objects, are kept as compact [`Records`]
//!   ([`crate::records`]), never whole.
//! - Secrets (only those labelled as credentials) and PreBackupPods are kept in kube's reflector
//!   stores ([`Cache`]), slimmed: Secrets as key names only (a value is replaced by a marker of
//!   whether it is empty; a run reads the values it needs when it starts), PreBackupPods without
//!   their pod template.

use std::collections::HashMap;
use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Duration;

use crate::records::{PodInfo, PvcInfo};
use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use stowage_api::PreBackupPod;
use stowage_api::contract;

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

    /// The stores themselves.
    pub fn stores(&self) -> Vec<Store<K>> {
        self.0.clone()
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

/// Records by name, of one namespace.
type ByName<T> = HashMap<String, Arc<T>>;
/// Records by namespace: what one watch has seen.
type ByNamespace<T> = HashMap<String, ByName<T>>;

/// Compact records ([`crate::records`]) of one kind, made from the objects of one watch per watched
/// namespace (or one of the whole cluster), read as one. Pods and PVCs are cached this way rather
/// than in kube's `Store`, which would hold each object whole.
pub struct Records<T>(Vec<Arc<RwLock<ByNamespace<T>>>>);

impl<T> Clone for Records<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

/// A map's readers never see a half-applied event (the writer holds the lock for one event), so
/// a panic elsewhere while the lock was held leaves nothing to distrust: a poisoned lock is used.
fn read<T>(map: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    map.read().unwrap_or_else(|p| p.into_inner())
}

impl<T> Records<T> {
    /// Every record.
    pub fn state(&self) -> Vec<Arc<T>> {
        self.0
            .iter()
            .flat_map(|m| {
                read(m)
                    .values()
                    .flat_map(|by_name| by_name.values().cloned())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The records of one namespace.
    pub fn in_namespace(&self, namespace: &str) -> Vec<Arc<T>> {
        self.0
            .iter()
            .flat_map(|m| {
                read(m)
                    .get(namespace)
                    .map(|by_name| by_name.values().cloned().collect::<Vec<_>>())
                    .unwrap_or_default()
            })
            .collect()
    }

    /// The record of `namespace/name`.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<T>> {
        self.0
            .iter()
            .find_map(|m| read(m).get(namespace)?.get(name).cloned())
    }
}

/// Applies one watch's events to its map of records, as kube's reflector does to a store: a
/// re-list is gathered apart and replaces the map whole when complete, so readers never see a
/// half-listed namespace.
pub struct RecordWriter<K, T> {
    map: Arc<RwLock<ByNamespace<T>>>,
    relist: Option<ByNamespace<T>>,
    make: PhantomData<fn(&K) -> T>,
}

/// An empty cache of records and its writer.
pub fn records<K, T>() -> (Records<T>, RecordWriter<K, T>) {
    let map = Arc::new(RwLock::new(HashMap::new()));
    (
        Records(vec![Arc::clone(&map)]),
        RecordWriter {
            map,
            relist: None,
            make: PhantomData,
        },
    )
}

impl<K, T> RecordWriter<K, T>
where
    K: Resource,
    T: for<'a> From<&'a K>,
{
    pub fn apply(&mut self, event: &Result<watcher::Event<K>, watcher::Error>) {
        let key = |o: &K| {
            (
                o.meta().namespace.clone().unwrap_or_default(),
                o.meta().name.clone().unwrap_or_default(),
            )
        };
        match event {
            Ok(watcher::Event::Init) => self.relist = Some(HashMap::new()),
            Ok(watcher::Event::InitApply(o)) => {
                let (ns, name) = key(o);
                self.relist
                    .get_or_insert_with(HashMap::new)
                    .entry(ns)
                    .or_default()
                    .insert(name, Arc::new(T::from(o)));
            }
            Ok(watcher::Event::InitDone) => {
                let listed = self.relist.take().unwrap_or_default();
                *self.map.write().unwrap_or_else(|p| p.into_inner()) = listed;
            }
            Ok(watcher::Event::Apply(o)) => {
                let (ns, name) = key(o);
                let record = Arc::new(T::from(o));
                self.map
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(ns)
                    .or_default()
                    .insert(name, record);
            }
            Ok(watcher::Event::Delete(o)) => {
                let (ns, name) = key(o);
                let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
                if let Some(by_name) = map.get_mut(&ns) {
                    by_name.remove(&name);
                    if by_name.is_empty() {
                        map.remove(&ns);
                    }
                }
            }
            Err(_) => {}
        }
    }
}

#[derive(Clone)]
pub struct Stores {
    pub pvcs: Records<PvcInfo>,
    pub pods: Records<PodInfo>,
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
    let (pvcs, mut pvc_writer) = records::<PersistentVolumeClaim, PvcInfo>();
    let (pods, mut pod_writer) = records::<Pod, PodInfo>();
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
    .for_each(move |r| {
        pvc_writer.apply(&r);
        observe("persistentvolumeclaims", &pvcs_ready, r)
    });
    let pod_watch = watcher(api::<Pod>(client, namespace), watch_config())
        .default_backoff()
        .for_each(move |r| {
            pod_writer.apply(&r);
            observe("pods", &pods_ready, r)
        });
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
            pvcs,
            pods,
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
            pvcs: Records(parts.iter().flat_map(|p| p.pvcs.0.clone()).collect()),
            pods: Records(parts.iter().flat_map(|p| p.pods.0.clone()).collect()),
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

    fn pvc(ns: &str, name: &str, pv: &str) -> PersistentVolumeClaim {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns},
            "spec": {"volumeName": pv}
        }))
        .unwrap()
    }

    fn volume(records: &Records<PvcInfo>, ns: &str, name: &str) -> Option<String> {
        records.get(ns, name).and_then(|p| p.volume_name.clone())
    }

    #[test]
    fn records_follow_a_watch_and_a_relist_replaces_them_whole() {
        use watcher::Event::*;
        let (records, mut writer) = records::<PersistentVolumeClaim, PvcInfo>();
        for e in [
            Init,
            InitApply(pvc("a", "x", "pv-1")),
            InitApply(pvc("b", "y", "pv-2")),
        ] {
            writer.apply(&Ok(e));
        }
        // Not visible until the list is complete.
        assert!(records.state().is_empty());
        writer.apply(&Ok(InitDone));
        assert_eq!(records.state().len(), 2);
        assert_eq!(volume(&records, "a", "x").as_deref(), Some("pv-1"));
        writer.apply(&Ok(Apply(pvc("a", "x", "pv-3"))));
        writer.apply(&Ok(Apply(pvc("a", "z", "pv-4"))));
        assert_eq!(volume(&records, "a", "x").as_deref(), Some("pv-3"));
        assert_eq!(records.in_namespace("a").len(), 2);
        writer.apply(&Ok(Delete(pvc("b", "y", "pv-2"))));
        assert_eq!(records.get("b", "y").map(|_| ()), None);
        assert!(records.in_namespace("b").is_empty());
        // A re-list (after a watch expired) drops what it no longer lists, once it is complete.
        writer.apply(&Ok(Init));
        writer.apply(&Ok(InitApply(pvc("a", "z", "pv-4"))));
        assert_eq!(records.state().len(), 2);
        writer.apply(&Ok(InitDone));
        assert_eq!(records.state().len(), 1);
        assert_eq!(volume(&records, "a", "x"), None);
        assert_eq!(volume(&records, "a", "z").as_deref(), Some("pv-4"));
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
