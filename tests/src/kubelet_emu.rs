//! What the kubelet's volume manager does for PVC volumes, for kwok nodes (which have no kubelet):
//! for every pod bound to a node of the local cluster that mounts a bound PVC, bind-mount the PV's
//! backing directory `<cluster>/pvs/<pv>` at
//! `<cluster>/nodes/<node>/kubelet/pods/<pod-uid>/volumes/kubernetes.io~csi/<pv>/mount`, and tear it
//! down when the pod is gone. Recreating a pod therefore shows the same data under a new UID, and
//! `/proc/self/mountinfo` shows real mounts, exactly as on a node.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, ListParams};
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

/// The mounts the pods in the API call for.
pub async fn desired(client: &kube::Client, cluster: &Path) -> kube::Result<BTreeSet<MountSpec>> {
    let pods: Api<Pod> = Api::all(client.clone());
    let pvcs: Api<PersistentVolumeClaim> = Api::all(client.clone());
    let claims: BTreeMap<(String, String), String> = pvcs
        .list(&ListParams::default())
        .await?
        .into_iter()
        .filter_map(|c| {
            let ns = c.metadata.namespace?;
            let name = c.metadata.name?;
            let bound = c.status.as_ref()?.phase.as_deref() == Some("Bound");
            let pv = c.spec?.volume_name?;
            bound.then_some(((ns, name), pv))
        })
        .collect();
    let mut out = BTreeSet::new();
    for pod in pods.list(&ListParams::default()).await? {
        let (Some(ns), Some(uid)) = (pod.metadata.namespace.clone(), pod.metadata.uid.clone())
        else {
            continue;
        };
        let Some(spec) = pod.spec else { continue };
        let Some(node) = spec.node_name else { continue };
        if pod.metadata.deletion_timestamp.is_some() || !cluster.join("nodes").join(&node).is_dir()
        {
            continue;
        }
        for v in spec.volumes.unwrap_or_default() {
            let Some(pvc) = v.persistent_volume_claim else {
                continue;
            };
            if let Some(pv) = claims.get(&(ns.clone(), pvc.claim_name.clone())) {
                out.insert(MountSpec {
                    node: node.clone(),
                    pod_uid: uid.clone(),
                    pv: pv.clone(),
                    read_only: pvc.read_only.unwrap_or(false),
                });
            }
        }
    }
    Ok(out)
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

/// Runs until SIGTERM/SIGINT, then unmounts everything it mounted.
pub async fn run(client: kube::Client, cluster: PathBuf) -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        match desired(&client, &cluster).await {
            Ok(want) => {
                if let Err(e) = reconcile(&cluster, &want) {
                    eprintln!("reconcile: {e}");
                }
            }
            Err(e) => eprintln!("listing pods/PVCs: {e}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    reconcile(&cluster, &BTreeSet::new())?;
    Ok(())
}
