//! What the coordinator keeps of each pod and PVC it watches: compact records made from the
//! objects as they arrive, so the watch caches never hold a `Pod` or a `PersistentVolumeClaim`.
//! A k8s-openapi `Pod` is several KiB of mostly empty fields even with everything unread removed
//! (each `Container` and `Volume` is a wide struct of inline `Option`s); a record is a few hundred
//! bytes, which is what keeps a coordinator watching 20,000 pods within its memory limit.
//!
//! Only `stowage.dev/` annotations are kept: they are the only ones read, and other annotations
//! (operators' JSON blobs) are often the largest part of an object.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::ResourceExt;

/// The prefix of every annotation the coordinator reads.
const ANNOTATION_PREFIX: &str = "stowage.dev/";
/// The longest reason kept for a pod that does not run yet.
const PENDING_MAX: usize = 256;

#[derive(Debug, Clone, Default)]
pub struct PvcInfo {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Its `stowage.dev/` annotations.
    pub annotations: BTreeMap<String, String>,
    /// The bound PV, when bound.
    pub volume_name: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: Option<String>,
    /// Running and not being deleted.
    pub running: bool,
    /// Its `stowage.dev/` annotations.
    pub annotations: BTreeMap<String, String>,
    /// Names of the PVCs its volumes claim.
    pub claims: Vec<String>,
    /// Running with every container ready (the Ready condition).
    pub ready: bool,
    /// Its creation time (RFC 3339), to choose among replicas.
    pub created: String,
    /// Its controller (`kind`, `name`) from its owner references.
    pub controller: Option<(String, String)>,
    /// Its controller's UID (a helper pod's run).
    pub controller_uid: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Its containers' names, in order.
    pub containers: Vec<String>,
    /// While it does not run: its phase and the first unmet condition's message, bounded.
    pub pending: Option<String>,
}

/// The label the Deployment controller puts on its ReplicaSets' pods (and into their names).
const POD_TEMPLATE_HASH: &str = "pod-template-hash";

impl PodInfo {
    /// Whose history a backup command of this pod is: the Deployment of a ReplicaSet's pod (the
    /// ReplicaSet's name less its pod-template-hash, which changes with every rollout), else the
    /// controller, else the pod itself.
    pub fn owner(&self) -> (String, String) {
        match &self.controller {
            Some((kind, name)) if kind == "ReplicaSet" => {
                match self
                    .labels
                    .get(POD_TEMPLATE_HASH)
                    .and_then(|h| name.strip_suffix(&format!("-{h}")))
                {
                    Some(deployment) => ("Deployment".into(), deployment.into()),
                    None => (kind.clone(), name.clone()),
                }
            }
            Some((kind, name)) => (kind.clone(), name.clone()),
            None => ("Pod".into(), self.name.clone()),
        }
    }
}

fn stowage_annotations(all: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    all.iter()
        .filter(|(k, _)| k.starts_with(ANNOTATION_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

impl From<&PersistentVolumeClaim> for PvcInfo {
    fn from(p: &PersistentVolumeClaim) -> Self {
        PvcInfo {
            namespace: p.namespace().unwrap_or_default(),
            name: p.name_any(),
            labels: p.labels().clone(),
            annotations: stowage_annotations(p.annotations()),
            volume_name: p
                .spec
                .as_ref()
                .and_then(|s| s.volume_name.clone())
                .filter(|v| !v.is_empty()),
        }
    }
}

impl From<&Pod> for PodInfo {
    fn from(p: &Pod) -> Self {
        let status = p.status.as_ref();
        let deleting = p.metadata.deletion_timestamp.is_some();
        let phase = match status.and_then(|s| s.phase.as_deref()) {
            _ if deleting => "Terminating",
            Some(phase) => phase,
            None => "Pending",
        };
        let running = phase == "Running";
        let conditions = status.and_then(|s| s.conditions.as_deref()).unwrap_or(&[]);
        let controller = p
            .owner_references()
            .iter()
            .find(|o| o.controller == Some(true));
        let spec = p.spec.as_ref();
        PodInfo {
            namespace: p.namespace().unwrap_or_default(),
            name: p.name_any(),
            uid: p.uid().unwrap_or_default(),
            node: spec.and_then(|s| s.node_name.clone()),
            running,
            annotations: stowage_annotations(p.annotations()),
            ready: running
                && conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True"),
            created: p
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default(),
            controller: controller.map(|o| (o.kind.clone(), o.name.clone())),
            controller_uid: controller.map(|o| o.uid.clone()),
            labels: p.labels().clone(),
            containers: spec
                .map(|s| s.containers.iter().map(|c| c.name.clone()).collect())
                .unwrap_or_default(),
            claims: spec
                .and_then(|s| s.volumes.as_ref())
                .map(|vs| {
                    vs.iter()
                        .filter_map(|v| v.persistent_volume_claim.as_ref())
                        .map(|c| c.claim_name.clone())
                        .collect()
                })
                .unwrap_or_default(),
            pending: (!running).then(|| {
                let why = conditions
                    .iter()
                    .find(|c| c.status != "True")
                    .and_then(|c| c.message.as_deref())
                    .unwrap_or_default();
                let reason = if why.is_empty() {
                    phase.to_string()
                } else {
                    format!("{phase}: {why}")
                };
                crate::errors::bounded(&reason, PENDING_MAX)
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(extra: serde_json::Value) -> Pod {
        let mut base = serde_json::json!({
            "metadata": {"name": "db-0", "namespace": "shop", "uid": "u1",
                "creationTimestamp": "2026-12-01T00:00:00Z",
                "labels": {"app": "db"},
                "annotations": {"stowage.dev/backup-command": "pg_dumpall",
                                "operator.example.com/state": "x".repeat(10_000)},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db",
                                     "uid": "s1", "controller": true}]},
            "spec": {"nodeName": "node-1",
                "containers": [{"name": "pg", "image": "postgres:17"}, {"name": "exporter", "image": "x"}],
                "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data-db-0"}},
                            {"name": "config", "configMap": {"name": "db-config"}}]},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
        });
        json_patch(&mut base, extra);
        serde_json::from_value(base).unwrap()
    }

    /// A merge patch, enough for these objects.
    fn json_patch(base: &mut serde_json::Value, patch: serde_json::Value) {
        match (base, patch) {
            (serde_json::Value::Object(b), serde_json::Value::Object(p)) => {
                for (k, v) in p {
                    json_patch(b.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (b, p) => *b = p,
        }
    }

    #[test]
    fn a_pod_record_keeps_what_planning_reads_and_only_stowage_annotations() {
        let info = PodInfo::from(&pod(serde_json::json!({})));
        assert_eq!(
            (
                info.namespace.as_str(),
                info.name.as_str(),
                info.uid.as_str()
            ),
            ("shop", "db-0", "u1")
        );
        assert_eq!(info.node.as_deref(), Some("node-1"));
        assert!(info.running && info.ready);
        assert_eq!(info.claims, vec!["data-db-0".to_string()]);
        assert_eq!(info.containers, vec!["pg".to_string(), "exporter".into()]);
        assert_eq!(
            info.controller,
            Some(("StatefulSet".to_string(), "db".to_string()))
        );
        assert_eq!(info.controller_uid.as_deref(), Some("s1"));
        assert_eq!(info.created, "2026-12-01T00:00:00Z");
        assert_eq!(
            info.annotations.keys().collect::<Vec<_>>(),
            vec!["stowage.dev/backup-command"]
        );
        assert_eq!(info.pending, None);
    }

    #[test]
    fn a_pod_not_running_says_why_within_a_bound() {
        let info = PodInfo::from(&pod(serde_json::json!({"status": {"phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False", "message": "0/3 nodes are available: ".to_string() + &"x".repeat(5000)}]}})));
        assert!(!info.running && !info.ready);
        let why = info.pending.unwrap();
        assert!(why.starts_with("Pending: 0/3 nodes are available"), "{why}");
        assert!(why.len() <= PENDING_MAX, "{}", why.len());
        let deleting = PodInfo::from(&pod(
            serde_json::json!({"metadata": {"deletionTimestamp": "2026-12-02T00:00:00Z"}}),
        ));
        assert!(!deleting.running && !deleting.ready);
        assert_eq!(deleting.pending.as_deref(), Some("Terminating"));
    }

    #[test]
    fn a_pvc_record_keeps_its_volume_labels_and_stowage_annotations() {
        let pvc: PersistentVolumeClaim = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "data", "namespace": "shop", "labels": {"tier": "db"},
                "annotations": {"stowage.dev/backup": "false", "volume.kubernetes.io/selected-node": "n1"}},
            "spec": {"volumeName": "pv-1", "accessModes": ["ReadWriteOnce"],
                     "resources": {"requests": {"storage": "1Gi"}}},
            "status": {"phase": "Bound"}
        }))
        .unwrap();
        let info = PvcInfo::from(&pvc);
        assert_eq!(info.volume_name.as_deref(), Some("pv-1"));
        assert_eq!(info.labels.get("tier").map(String::as_str), Some("db"));
        assert_eq!(
            info.annotations.keys().collect::<Vec<_>>(),
            vec!["stowage.dev/backup"]
        );
        let unbound = PvcInfo::from(&PersistentVolumeClaim {
            spec: Some(Default::default()),
            ..Default::default()
        });
        assert_eq!(unbound.volume_name, None);
    }
}
