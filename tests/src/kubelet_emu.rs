//! What the kubelet's volume manager does for PVC volumes, for kwok nodes (which have no kubelet):
//! for every pod bound to a node of the local cluster that mounts a bound PVC, bind-mount the PV's
//! backing directory `<cluster>/pvs/<pv>` at
//! `<cluster>/nodes/<node>/kubelet/pods/<pod-uid>/volumes/kubernetes.io~csi/<pv>/mount`, and tear it
//! down when the pod is gone. Recreating a pod therefore shows the same data under a new UID, and
//! `/proc/self/mountinfo` shows real mounts, exactly as on a node.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, Patch, PatchParams};
use nix::mount::{MntFlags, MsFlags, mount, umount2};

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct MountSpec {
    pub node: String,
    pub pod_uid: String,
    pub pv: String,
    pub read_only: bool,
}

impl MountSpec {
    pub fn target(&self, cluster: &Path) -> PathBuf {
        cluster
            .join("nodes")
            .join(&self.node)
            .join("kubelet/pods")
            .join(&self.pod_uid)
            .join("volumes/kubernetes.io~csi")
            .join(&self.pv)
            .join("mount")
    }
}

/// The annotation the emulator puts on a pod once its volumes are mounted. kwok's pod-ready stage
/// (tests/cluster/kwok-stages.yaml) waits for it, so a pod is never Running before its volumes are
/// there, as with a real kubelet (whose containers start only after the volume manager is done).
pub const VOLUMES_MOUNTED: &str = "kubelet-emu.stowage.dev/volumes-mounted";

/// What the pods ask for: the mounts, and the pods whose every PVC volume can be mounted (their
/// claims are bound) and that should be marked once the mounts are in place.
pub struct Desired {
    pub mounts: BTreeSet<MountSpec>,
    /// (namespace, name, uid, node) of pods whose volumes are all satisfiable.
    pub ready_pods: Vec<(String, String, String, String)>,
}

/// The mounts the pods in the caches call for.
pub fn desired(pods: &[Arc<Pod>], pvcs: &[Arc<PersistentVolumeClaim>], cluster: &Path) -> Desired {
    let claims: BTreeMap<(String, String), String> = pvcs
        .iter()
        .filter_map(|c| {
            let ns = c.metadata.namespace.clone()?;
            let name = c.metadata.name.clone()?;
            let bound = c.status.as_ref()?.phase.as_deref() == Some("Bound");
            let pv = c.spec.as_ref()?.volume_name.clone()?;
            bound.then_some(((ns, name), pv))
        })
        .collect();
    let mut out = Desired {
        mounts: BTreeSet::new(),
        ready_pods: Vec::new(),
    };
    for pod in pods {
        let (Some(ns), Some(name), Some(uid)) = (
            pod.metadata.namespace.clone(),
            pod.metadata.name.clone(),
            pod.metadata.uid.clone(),
        ) else {
            continue;
        };
        let Some(spec) = pod.spec.as_ref() else {
            continue;
        };
        let Some(node) = spec.node_name.clone() else {
            continue;
        };
        if pod.metadata.deletion_timestamp.is_some() || !cluster.join("nodes").join(&node).is_dir()
        {
            continue;
        }
        let mut all = true;
        for v in spec.volumes.iter().flatten() {
            let Some(pvc) = &v.persistent_volume_claim else {
                continue;
            };
            match claims.get(&(ns.clone(), pvc.claim_name.clone())) {
                Some(pv) => {
                    out.mounts.insert(MountSpec {
                        node: node.clone(),
                        pod_uid: uid.clone(),
                        pv: pv.clone(),
                        read_only: pvc.read_only.unwrap_or(false),
                    });
                }
                // Not bound yet: the kubelet waits, and so does the pod.
                None => all = false,
            }
        }
        if all {
            out.ready_pods.push((ns, name, uid, node));
        }
    }
    out
}

fn mounted_targets(cluster: &Path) -> HashSet<PathBuf> {
    let nodes = cluster.join("nodes");
    procfs::process::Process::myself()
        .and_then(|p| p.mountinfo())
        .map(|m| {
            m.into_iter()
                .map(|m| m.mount_point)
                .filter(|p| p.starts_with(&nodes))
                .collect()
        })
        .unwrap_or_default()
}

/// Makes the node directories match `want`: mounts what is missing, unmounts and removes the rest.
pub fn reconcile(cluster: &Path, want: &BTreeSet<MountSpec>) -> std::io::Result<()> {
    let mounted = mounted_targets(cluster);
    let want_targets: HashSet<PathBuf> = want.iter().map(|m| m.target(cluster)).collect();
    for m in want {
        let target = m.target(cluster);
        if mounted.contains(&target) {
            continue;
        }
        let source = cluster.join("pvs").join(&m.pv);
        std::fs::create_dir_all(&source)?;
        std::fs::create_dir_all(&target)?;
        mount(
            Some(&source),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(std::io::Error::from)?;
        if m.read_only {
            mount(
                None::<&str>,
                &target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .map_err(std::io::Error::from)?;
        }
        eprintln!("mounted {} at {}", source.display(), target.display());
    }
    for target in mounted.difference(&want_targets) {
        if target.ends_with("mount") {
            umount2(target, MntFlags::MNT_DETACH).map_err(std::io::Error::from)?;
            eprintln!("unmounted {}", target.display());
        }
    }
    // Pod directories of pods that no longer want anything mounted go away, as the kubelet's cleanup does.
    let wanted_pods: HashSet<(String, String)> = want
        .iter()
        .map(|m| (m.node.clone(), m.pod_uid.clone()))
        .collect();
    let still_mounted = mounted_targets(cluster);
    if let Ok(nodes) = std::fs::read_dir(cluster.join("nodes")) {
        for node in nodes.flatten() {
            let node_name = node.file_name().to_string_lossy().into_owned();
            let Ok(pods) = std::fs::read_dir(node.path().join("kubelet/pods")) else {
                continue;
            };
            for pod in pods.flatten() {
                let uid = pod.file_name().to_string_lossy().into_owned();
                let busy = still_mounted.iter().any(|t| t.starts_with(pod.path()));
                if !wanted_pods.contains(&(node_name.clone(), uid)) && !busy {
                    std::fs::remove_dir_all(pod.path())?;
                }
            }
        }
    }
    Ok(())
}

fn marked(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.get(VOLUMES_MOUNTED).map(String::as_str) == Some("true"))
}

/// Makes the node directories one shared mount, so that volumes mounted into them later also appear
/// in the per-pod mount namespaces of pods the runner started (`HostToContainer` propagation).
fn share_nodes(cluster: &Path) -> std::io::Result<()> {
    let nodes = cluster.join("nodes");
    std::fs::create_dir_all(&nodes)?;
    let is_mount = procfs::process::Process::myself()
        .and_then(|p| p.mountinfo())
        .map(|m| m.into_iter().any(|m| m.mount_point == nodes))
        .unwrap_or(false);
    if !is_mount {
        mount(
            Some(&nodes),
            &nodes,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(std::io::Error::from)?;
    }
    mount(
        None::<&str>,
        &nodes,
        None::<&str>,
        MsFlags::MS_SHARED | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(std::io::Error::from)
}

/// Runs until SIGTERM/SIGINT, then stops the pods it runs and unmounts everything it mounted. Pods
/// and PVCs come from watches. With `runner`, pods from local images really run
/// ([`crate::pod_runner`]).
pub async fn run(
    client: kube::Client,
    cluster: PathBuf,
    runner: Option<crate::pod_runner::Config>,
) -> anyhow::Result<()> {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, reflector, watcher};
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let pod_api: Api<Pod> = Api::all(client.clone());
    let (pods, pod_writer) = reflector::store();
    let (pvcs, pvc_writer) = reflector::store();
    let pod_watch = watcher(pod_api.clone(), watcher::Config::default())
        .default_backoff()
        .reflect(pod_writer)
        .for_each(|_| futures::future::ready(()));
    let pvc_watch = watcher(
        Api::<PersistentVolumeClaim>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(pvc_writer)
    .for_each(|_| futures::future::ready(()));
    tokio::spawn(pod_watch);
    tokio::spawn(pvc_watch);
    let _ = pods.wait_until_ready().await;
    let _ = pvcs.wait_until_ready().await;
    share_nodes(&cluster)?;
    let mut runner = runner.map(|cfg| crate::pod_runner::Runner::new(cfg, client.clone()));
    loop {
        let all_pods = pods.state();
        let want = desired(&all_pods, &pvcs.state(), &cluster);
        match reconcile(&cluster, &want.mounts) {
            Ok(()) => {
                for (ns, name, uid, node) in &want.ready_pods {
                    let current = all_pods
                        .iter()
                        .find(|p| p.metadata.uid.as_deref() == Some(uid.as_str()));
                    if current.is_some_and(|p| marked(p)) {
                        continue;
                    }
                    // Pods of local images get both marks at once, so kwok's stage sees both.
                    let local = runner
                        .as_ref()
                        .zip(current)
                        .is_some_and(|(r, p)| r.config().runs(p));
                    let mut annotations = serde_json::Map::new();
                    annotations.insert(VOLUMES_MOUNTED.into(), "true".into());
                    if local {
                        annotations.insert(crate::pod_runner::RUNS_LOCALLY.into(), "true".into());
                    }
                    let patch = serde_json::json!({"metadata": {"annotations": annotations}});
                    match Api::<Pod>::namespaced(client.clone(), ns)
                        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                    {
                        Ok(_) => eprintln!("volumes of {ns}/{name} ({uid}) on {node} are mounted"),
                        Err(e) => eprintln!("marking {ns}/{name}: {e}"),
                    }
                }
            }
            Err(e) => eprintln!("reconcile: {e}"),
        }
        if let Some(r) = runner.as_mut() {
            r.reconcile(&all_pods).await;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    if let Some(r) = runner.as_mut() {
        crate::pod_runner::stop_all(r).await;
    }
    reconcile(&cluster, &BTreeSet::new())?;
    let _ = umount2(&cluster.join("nodes"), MntFlags::MNT_DETACH);
    Ok(())
}
