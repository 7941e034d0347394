//! A CSI driver for local volumes, so that the test cluster's real kubelet mounts PVCs exactly as on
//! a cloud cluster: at `<kubelet-dir>/pods/<uid>/volumes/kubernetes.io~csi/<pv>/mount`, with the
//! kubelet's own `vol_data.json` beside it.
//!
//! It plays two of the parts a CSI driver ships as separate containers:
//! - the **node plugin** (the CSI Identity and Node services on a unix socket): a volume is the
//!   directory `<data-dir>/<volume-id>`, bind-mounted onto the target path the kubelet names;
//! - the **external provisioner**, for StorageClasses whose provisioner is [`DRIVER`] and whose
//!   binding mode is `WaitForFirstConsumer`: a PV for each such PVC the scheduler has placed on this
//!   node, and, for a released PV of reclaim policy `Delete`, its directory and the PV removed.
//!
//! The third, the kubelet's plugin registration, is `tests/cluster/csi-registrar` (Go: it says why).
//! No controller service: the `CSIDriver` object says `attachRequired: false`, so the kubelet
//! publishes without waiting for an attach.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    ObjectReference, PersistentVolume, PersistentVolumeClaim, PersistentVolumeSpec,
    VolumeNodeAffinity,
};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use tonic::{Request, Response, Status};

pub mod csi {
    tonic::include_proto!("csi.v1");
}

/// The driver's name, in PVs, StorageClasses and the `CSIDriver` object.
pub const DRIVER: &str = "local.csi.stowage.dev";
/// The annotation the scheduler sets on a `WaitForFirstConsumer` PVC: the node it chose.
const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
/// The annotation a provisioner sets on the PVs it made.
const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";

/// What the node plugin needs to know.
#[derive(Debug, Clone)]
pub struct NodePlugin {
    pub node_id: String,
    pub data_dir: PathBuf,
}

/// The directory that holds volume `id`. Ids are names this driver (or a test's static PV) chose;
/// anything that could leave the data directory is refused.
pub fn volume_dir(data_dir: &Path, id: &str) -> Result<PathBuf, Status> {
    let ok = !id.is_empty()
        && id.len() <= 253
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && id != "."
        && id != "..";
    if !ok {
        return Err(Status::invalid_argument(format!(
            "volume id {id:?} is not a plain name"
        )));
    }
    Ok(data_dir.join(id))
}

fn is_mount_point(path: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let target = path.to_string_lossy();
    mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| m == target)
}

#[tonic::async_trait]
impl csi::identity_server::Identity for NodePlugin {
    async fn get_plugin_info(
        &self,
        _: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: DRIVER.to_string(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities: vec![],
        }))
    }

    async fn probe(
        &self,
        _: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        Ok(Response::new(csi::ProbeResponse { ready: Some(true) }))
    }
}

#[tonic::async_trait]
impl csi::node_server::Node for NodePlugin {
    async fn node_publish_volume(
        &self,
        req: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let req = req.into_inner();
        let source = volume_dir(&self.data_dir, &req.volume_id)?;
        let target = PathBuf::from(&req.target_path);
        if !target.is_absolute() {
            return Err(Status::invalid_argument("target_path is not absolute"));
        }
        if matches!(
            req.volume_capability
                .as_ref()
                .and_then(|c| c.access_type.as_ref()),
            Some(csi::volume_capability::AccessType::Block(_))
        ) {
            return Err(Status::invalid_argument(
                "block volumes are not supported; use volumeMode: Filesystem",
            ));
        }
        let readonly = req.readonly;
        tokio::task::spawn_blocking(move || publish(&source, &target, readonly))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        tracing::info!(volume = %req.volume_id, target = %req.target_path, readonly, "published");
        Ok(Response::new(csi::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let req = req.into_inner();
        let target = PathBuf::from(&req.target_path);
        tokio::task::spawn_blocking(move || unpublish(&target))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        tracing::info!(volume = %req.volume_id, target = %req.target_path, "unpublished");
        Ok(Response::new(csi::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities: vec![],
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
        }))
    }
}

/// Bind-mounts `source` onto `target` (idempotent, as CSI asks: a repeated call succeeds).
fn publish(source: &Path, target: &Path, readonly: bool) -> Result<(), Status> {
    let internal = |what: &str, e: &dyn std::fmt::Display| Status::internal(format!("{what}: {e}"));
    std::fs::create_dir_all(source).map_err(|e| internal("creating the volume directory", &e))?;
    std::fs::create_dir_all(target).map_err(|e| internal("creating the target path", &e))?;
    if is_mount_point(target) {
        return Ok(());
    }
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| internal("bind-mounting the volume", &e))?;
    if readonly {
        mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(|e| internal("remounting the volume read-only", &e))?;
    }
    Ok(())
}

/// Unmounts `target` and removes it (idempotent).
fn unpublish(target: &Path) -> Result<(), Status> {
    if is_mount_point(target) {
        umount2(target, MntFlags::empty())
            .map_err(|e| Status::internal(format!("unmounting {}: {e}", target.display())))?;
    }
    match std::fs::remove_dir(target) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Status::internal(format!(
            "removing {}: {e}",
            target.display()
        ))),
    }
}

/// One pass of the provisioner: a PV for each PVC of one of this driver's StorageClasses that the
/// scheduler placed on `node`, and the directory and PV of each released `Delete` PV removed.
/// Returns what it did, for the log.
pub async fn provision_once(
    client: &kube::Client,
    node: &str,
    data_dir: &Path,
) -> Result<Vec<String>, kube::Error> {
    let mut done = Vec::new();
    let classes: BTreeMap<String, StorageClass> = Api::<StorageClass>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|sc| sc.provisioner == DRIVER)
        .filter_map(|sc| sc.metadata.name.clone().map(|n| (n, sc)))
        .collect();
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    if !classes.is_empty() {
        let claims = Api::<PersistentVolumeClaim>::all(client.clone())
            .list(&ListParams::default())
            .await?;
        for pvc in claims.items {
            let Some(spec) = pvc.spec.as_ref() else {
                continue;
            };
            let Some(class) = spec
                .storage_class_name
                .as_deref()
                .and_then(|c| classes.get(c))
            else {
                continue;
            };
            let pending = pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending");
            let here = pvc
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(SELECTED_NODE))
                .is_some_and(|n| n == node);
            if !pending || !here || spec.volume_name.is_some() {
                continue;
            }
            let (Some(ns), Some(name), Some(uid)) = (
                pvc.metadata.namespace.clone(),
                pvc.metadata.name.clone(),
                pvc.metadata.uid.clone(),
            ) else {
                continue;
            };
            let pv_name = format!("pvc-{uid}");
            let storage = spec
                .resources
                .as_ref()
                .and_then(|r| r.requests.as_ref())
                .and_then(|r| r.get("storage").cloned());
            let pv = PersistentVolume {
                metadata: ObjectMeta {
                    name: Some(pv_name.clone()),
                    annotations: Some(BTreeMap::from([(
                        PROVISIONED_BY.to_string(),
                        DRIVER.to_string(),
                    )])),
                    ..Default::default()
                },
                spec: Some(PersistentVolumeSpec {
                    capacity: storage.map(|s| BTreeMap::from([("storage".to_string(), s)])),
                    access_modes: spec.access_modes.clone(),
                    persistent_volume_reclaim_policy: Some(
                        class
                            .reclaim_policy
                            .clone()
                            .unwrap_or_else(|| "Delete".to_string()),
                    ),
                    storage_class_name: class.metadata.name.clone(),
                    volume_mode: Some("Filesystem".to_string()),
                    claim_ref: Some(ObjectReference {
                        namespace: Some(ns.clone()),
                        name: Some(name.clone()),
                        uid: Some(uid),
                        kind: Some("PersistentVolumeClaim".to_string()),
                        api_version: Some("v1".to_string()),
                        ..Default::default()
                    }),
                    csi: Some(CSIPersistentVolumeSource {
                        driver: DRIVER.to_string(),
                        volume_handle: pv_name.clone(),
                        ..Default::default()
                    }),
                    node_affinity: Some(VolumeNodeAffinity {
                        required: Some(NodeSelector {
                            node_selector_terms: vec![NodeSelectorTerm {
                                match_expressions: Some(vec![NodeSelectorRequirement {
                                    key: "kubernetes.io/hostname".to_string(),
                                    operator: "In".to_string(),
                                    values: Some(vec![node.to_string()]),
                                }]),
                                ..Default::default()
                            }],
                        }),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let dir = volume_dir(data_dir, &pv_name).map_err(|s| {
                kube::Error::Service(Box::new(std::io::Error::other(s.message().to_string())))
            })?;
            if let Err(e) = std::fs::create_dir_all(&dir) {
                tracing::error!(dir = %dir.display(), error = %e, "cannot create a volume directory");
                continue;
            }
            match pvs.create(&PostParams::default(), &pv).await {
                Ok(_) => done.push(format!("provisioned {pv_name} for {ns}/{name}")),
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e),
            }
        }
    }
    for pv in pvs.list(&ListParams::default()).await?.items {
        let ours = pv
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(PROVISIONED_BY))
            .is_some_and(|p| p == DRIVER);
        let released = pv.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Released");
        let delete = pv
            .spec
            .as_ref()
            .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
            == Some("Delete");
        let Some(name) = pv.metadata.name.clone() else {
            continue;
        };
        let on_this_node = pv
            .spec
            .as_ref()
            .and_then(|s| s.node_affinity.as_ref())
            .and_then(|a| a.required.as_ref())
            .is_some_and(|r| {
                r.node_selector_terms.iter().any(|t| {
                    t.match_expressions.iter().flatten().any(|e| {
                        e.values
                            .as_ref()
                            .is_some_and(|v| v.iter().any(|n| n == node))
                    })
                })
            });
        if !(ours && released && delete && on_this_node) {
            continue;
        }
        if let Ok(dir) = volume_dir(data_dir, &name)
            && let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::error!(dir = %dir.display(), error = %e, "cannot remove a volume directory");
            continue;
        }
        match pvs.delete(&name, &DeleteParams::default()).await {
            Ok(_) => done.push(format!("deleted {name}")),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The provisioner's loop: a pass every `period`, forever; a failed pass is logged and retried.
pub async fn provision(client: kube::Client, node: String, data_dir: PathBuf, period: Duration) {
    loop {
        match provision_once(&client, &node, &data_dir).await {
            Ok(done) => {
                for d in done {
                    tracing::info!("{d}");
                }
            }
            Err(e) => tracing::warn!(error = %e, "provisioning pass failed"),
        }
        tokio::time::sleep(period).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_ids_stay_in_the_data_directory() {
        let d = Path::new("/data");
        assert_eq!(
            volume_dir(d, "pvc-1").unwrap(),
            PathBuf::from("/data/pvc-1")
        );
        for bad in ["", ".", "..", "a/b", "../x", "a b"] {
            assert!(volume_dir(d, bad).is_err(), "{bad:?}");
        }
    }
}
