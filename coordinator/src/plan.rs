//! Planning a backup run: which volumes are in scope, and which node's agent reads each one.
//! Pure and I/O-free: the controller feeds it from its informer caches and acts on the result.
//!
//! - A PVC is in scope when the run's selector matches its labels and neither it nor a pod mounting
//!   it is annotated `stowage.dev/backup: "false"`.
//! - A PVC is read where a running pod mounts it: an RWO volume on its one node; an RWX volume mounted
//!   on several nodes once, on the least-loaded of them.
//! - A bound PVC mounted by no running pod needs a mount-holder pod; it is never silently skipped.
//! - A node without a ready agent is reported, so the run can say "no agent on node X".
//!
//! Length: over 500 lines with its unit tests; the planner itself is under 300.

use std::collections::{BTreeMap, HashMap, HashSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::{Expression, Selector, SelectorExt};

pub use stowage_api::contract::ANNOTATION_BACKUP as BACKUP_ANNOTATION;

pub use crate::records::{PodInfo, PvcInfo};

/// One backup command to run: in `pod`, for its owner.
#[derive(Debug, Clone)]
pub struct CommandAssignment<'a> {
    pub pod: &'a PodInfo,
    pub owner_kind: String,
    pub owner_name: String,
    /// Pods of the owner that carry the command (the command runs in one of them).
    pub replicas: usize,
}

/// The backup commands of `pods` (annotated with `stowage.dev/backup-command`): one per owner,
/// run in the ready replica created first (ties by name), so that replicas of one Deployment or
/// StatefulSet dump once, and from the same, longest-running pod each time. Owners with no ready
/// replica come back apart, to be reported.
pub fn plan_commands<'a>(
    pods: &'a [PodInfo],
    annotation: &str,
) -> (Vec<CommandAssignment<'a>>, Vec<CommandAssignment<'a>>) {
    let mut by_owner: BTreeMap<(String, String), Vec<&'a PodInfo>> = BTreeMap::new();
    for p in pods.iter().filter(|p| {
        p.annotations
            .get(annotation)
            .is_some_and(|c| !c.trim().is_empty())
            && !excluded(&p.annotations)
    }) {
        by_owner.entry(p.owner()).or_default().push(p);
    }
    let (mut ready, mut unready) = (Vec::new(), Vec::new());
    for ((owner_kind, owner_name), replicas) in by_owner {
        let chosen = replicas
            .iter()
            .filter(|p| p.running && p.ready && p.node.is_some())
            .min_by(|a, b| (&a.created, &a.name).cmp(&(&b.created, &b.name)));
        let assignment = |pod| CommandAssignment {
            pod,
            owner_kind: owner_kind.clone(),
            owner_name: owner_name.clone(),
            replicas: replicas.len(),
        };
        match chosen {
            Some(p) => ready.push(assignment(p)),
            None => unready.push(assignment(replicas[0])),
        }
    }
    (ready, unready)
}

/// restic `--exclude` patterns for a volume: the PVC's `stowage.dev/exclude`, then its pod's,
/// comma-separated, blanks dropped.
pub fn excludes(
    key: &str,
    pvc: &BTreeMap<String, String>,
    pod: Option<&BTreeMap<String, String>>,
) -> Vec<String> {
    [Some(pvc), pod]
        .into_iter()
        .flatten()
        .filter_map(|a| a.get(key))
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(String::from)
        .collect()
}

/// Where one volume will be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment<'a> {
    pub namespace: &'a str,
    pub pvc: &'a str,
    pub pv: &'a str,
    pub pod: &'a str,
    pub pod_uid: &'a str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// `stowage.dev/backup: "false"` on the PVC.
    ExcludedPvc,
    /// `stowage.dev/backup: "false"` on a pod that mounts it.
    ExcludedPod,
    /// Not bound to a PV: there is no data to read.
    NotBound,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan<'a> {
    /// Node name → volumes its agent backs up.
    pub by_node: BTreeMap<&'a str, Vec<Assignment<'a>>>,
    /// Bound PVCs no running pod mounts: (namespace, pvc, pv).
    pub needs_mount_holder: Vec<(&'a str, &'a str, &'a str)>,
    /// Nodes with volumes in scope but no ready agent.
    pub nodes_without_agent: Vec<&'a str>,
    pub skipped: Vec<(&'a str, &'a str, SkipReason)>,
}

impl Plan<'_> {
    pub fn volume_count(&self) -> usize {
        self.by_node.values().map(Vec::len).sum::<usize>() + self.needs_mount_holder.len()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SelectorError {
    /// e.g. `selector.matchExpressions[0].operator`.
    pub field: String,
    pub reason: String,
}

/// `selector` as kube's [`Selector`] (Kubernetes semantics; an absent selector selects everything).
/// Each requirement is converted on its own so an error names its index; an `In`/`NotIn` with no
/// values is refused as the API server would.
pub fn compile(selector: Option<&LabelSelector>) -> Result<Selector, SelectorError> {
    let Some(sel) = selector else {
        return Ok(Selector::default());
    };
    let mut out: Selector = sel
        .match_labels
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
        let field = |f: &str| format!("selector.matchExpressions[{i}].{f}");
        match e.operator.as_str() {
            "In" | "NotIn" if e.values.as_deref().unwrap_or_default().is_empty() => {
                return Err(SelectorError {
                    field: field("values"),
                    reason: format!("operator {} needs at least one value", e.operator),
                });
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => {
                return Err(SelectorError {
                    field: field("operator"),
                    reason: format!(
                        "unknown operator {other:?} (use In, NotIn, Exists, DoesNotExist)"
                    ),
                });
            }
        }
        let expr = Expression::try_from(e.clone()).map_err(|err| SelectorError {
            field: field("operator"),
            reason: err.to_string(),
        })?;
        out.extend([expr]);
    }
    Ok(out)
}

/// Whether `selector` matches `labels`.
pub fn selector_matches(
    selector: Option<&LabelSelector>,
    labels: &BTreeMap<String, String>,
) -> Result<bool, SelectorError> {
    Ok(compile(selector)?.matches(labels))
}

/// The planner's name-keyed maps hash with `rustc-hash` (the compiler's FxHash, a word at a time):
/// with 50,000 short keys per run, SipHash (DoS-resistant, slower) dominated the planning time, and
/// byte-at-a-time FNV (the project's hash for stable names, `stowage_common::hash`) tripled it (p50
/// 6.6 → 19 ms). These maps live for one plan and are never persisted, so the stability FNV gives
/// names is not needed here. Keys are object names from the API server; a collision only costs time.
type FastMap<K, V> = HashMap<K, V, rustc_hash::FxBuildHasher>;

/// The running pods mounting one claim: almost always one, so no allocation for that case.
enum Users<'a> {
    One(&'a PodInfo),
    Many(Vec<&'a PodInfo>),
}

impl<'a> Users<'a> {
    fn push(&mut self, pod: &'a PodInfo) {
        match self {
            Users::One(first) => *self = Users::Many(vec![*first, pod]),
            Users::Many(v) => v.push(pod),
        }
    }
    fn as_slice(&self) -> &[&'a PodInfo] {
        match self {
            Users::One(p) => std::slice::from_ref(p),
            Users::Many(v) => v,
        }
    }
}

fn excluded(annotations: &BTreeMap<String, String>) -> bool {
    annotations
        .get(BACKUP_ANNOTATION)
        .is_some_and(|v| v.eq_ignore_ascii_case("false"))
}

/// Plans a backup run over `pvcs` (already restricted to the run's namespace) and `pods`;
/// `agent_nodes` are the nodes with a ready agent.
pub fn plan<'a>(
    selector: Option<&LabelSelector>,
    pvcs: &'a [PvcInfo],
    pods: &'a [PodInfo],
    agent_nodes: &[&str],
) -> Result<Plan<'a>, SelectorError> {
    // (namespace, claim) -> running pods mounting it.
    let mut mounts: FastMap<(&str, &str), Users> = FastMap::default();
    mounts.reserve(pods.len());
    for pod in pods.iter().filter(|p| p.running && p.node.is_some()) {
        for claim in &pod.claims {
            match mounts.entry((pod.namespace.as_str(), claim.as_str())) {
                std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().push(pod),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(Users::One(pod));
                }
            }
        }
    }
    let mut plan = Plan::default();
    // Hashed while planning; ordered once at the end. A node's load is its list's length.
    let mut by_node: FastMap<&str, Vec<Assignment>> = FastMap::default();
    let selector = compile(selector)?;
    for pvc in pvcs {
        if !selector.matches(&pvc.labels) {
            continue;
        }
        let (ns, name) = (pvc.namespace.as_str(), pvc.name.as_str());
        if excluded(&pvc.annotations) {
            plan.skipped.push((ns, name, SkipReason::ExcludedPvc));
            continue;
        }
        let Some(pv) = pvc.volume_name.as_deref() else {
            plan.skipped.push((ns, name, SkipReason::NotBound));
            continue;
        };
        let users = mounts
            .get(&(ns, name))
            .map(Users::as_slice)
            .unwrap_or_default();
        if users.iter().any(|p| excluded(&p.annotations)) {
            plan.skipped.push((ns, name, SkipReason::ExcludedPod));
            continue;
        }
        // The least-loaded node among those that mount it (an RWO volume has one); ties by name.
        let chosen = users
            .iter()
            .filter_map(|p| p.node.as_deref().map(|n| (n, *p)))
            .min_by_key(|(n, _)| (by_node.get(n).map_or(0, Vec::len), *n));
        match chosen {
            None => plan.needs_mount_holder.push((ns, name, pv)),
            Some((node, pod)) => {
                by_node.entry(node).or_default().push(Assignment {
                    namespace: ns,
                    pvc: name,
                    pv,
                    pod: &pod.name,
                    pod_uid: &pod.uid,
                });
            }
        }
    }
    plan.by_node = by_node.into_iter().collect();
    let agents: HashSet<&str> = agent_nodes.iter().copied().collect();
    plan.nodes_without_agent = plan
        .by_node
        .keys()
        .copied()
        .filter(|n| !agents.contains(n))
        .collect();
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn pvc(name: &str, pv: Option<&str>, labels: &[(&str, &str)]) -> PvcInfo {
        PvcInfo {
            namespace: "shop".into(),
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            volume_name: pv.map(String::from),
            ..Default::default()
        }
    }

    fn pod(name: &str, node: &str, claims: &[&str]) -> PodInfo {
        PodInfo {
            namespace: "shop".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            node: Some(node.into()),
            running: true,
            claims: claims.iter().map(|c| c.to_string()).collect(),
            ..Default::default()
        }
    }

    fn replica(name: &str, owner: (&str, &str), created: &str, ready: bool) -> PodInfo {
        let mut p = pod(name, "node-1", &[]);
        p.ready = ready;
        p.created = created.into();
        p.controller = Some((owner.0.into(), owner.1.into()));
        p.annotations
            .insert("stowage.dev/backup-command".into(), "pg_dump".into());
        p
    }

    #[test]
    fn one_command_per_owner_in_the_oldest_ready_replica() {
        let mut web = vec![
            replica(
                "web-7d9f-b",
                ("ReplicaSet", "web-7d9f"),
                "2026-11-20T10:00:00Z",
                true,
            ),
            replica(
                "web-7d9f-a",
                ("ReplicaSet", "web-7d9f"),
                "2026-11-20T10:00:00Z",
                true,
            ),
            replica(
                "web-7d9f-c",
                ("ReplicaSet", "web-7d9f"),
                "2026-11-19T10:00:00Z",
                false,
            ),
        ];
        for p in &mut web {
            p.labels.insert("pod-template-hash".into(), "7d9f".into());
        }
        let mut pods = web;
        pods.push(replica(
            "pg-0",
            ("StatefulSet", "pg"),
            "2026-11-21T00:00:00Z",
            false,
        ));
        let mut plain = pod("lonely", "node-2", &[]);
        plain.ready = true;
        plain
            .annotations
            .insert("stowage.dev/backup-command".into(), "dump".into());
        pods.push(plain);
        pods.push(pod("no-command", "node-1", &[]));
        let (ready, unready) = plan_commands(&pods, "stowage.dev/backup-command");
        let got: Vec<(&str, &str, &str, usize)> = ready
            .iter()
            .map(|a| {
                (
                    a.owner_kind.as_str(),
                    a.owner_name.as_str(),
                    a.pod.name.as_str(),
                    a.replicas,
                )
            })
            .collect();
        // The Deployment (not its ReplicaSet); the oldest ready replica, ties by name.
        assert_eq!(
            got,
            [
                ("Deployment", "web", "web-7d9f-a", 3),
                ("Pod", "lonely", "lonely", 1)
            ]
        );
        assert_eq!(unready.len(), 1);
        assert_eq!(unready[0].owner_name, "pg");
    }

    #[test]
    fn excludes_come_from_the_pvc_then_the_pod() {
        let pvc: BTreeMap<String, String> = [(
            "stowage.dev/exclude".to_string(),
            "cache/, *.tmp,".to_string(),
        )]
        .into();
        let pod: BTreeMap<String, String> =
            [("stowage.dev/exclude".to_string(), "lost+found".to_string())].into();
        assert_eq!(
            excludes("stowage.dev/exclude", &pvc, Some(&pod)),
            ["cache/", "*.tmp", "lost+found"]
        );
        assert!(excludes("stowage.dev/exclude", &BTreeMap::new(), None).is_empty());
    }

    #[test]
    fn volumes_are_read_where_they_are_mounted() {
        let pvcs = vec![
            pvc("db", Some("pv-db"), &[]),
            pvc("cache", Some("pv-cache"), &[]),
            pvc("idle", Some("pv-idle"), &[]),
        ];
        let pods = vec![
            pod("db-0", "node-3", &["db"]),
            pod("cache-0", "node-1", &["cache"]),
        ];
        let p = plan(None, &pvcs, &pods, &["node-1", "node-2", "node-3"]).unwrap();
        assert_eq!(
            p.by_node.keys().copied().collect::<Vec<_>>(),
            ["node-1", "node-3"]
        );
        assert_eq!(
            p.by_node["node-3"][0],
            Assignment {
                namespace: "shop",
                pvc: "db",
                pv: "pv-db",
                pod: "db-0",
                pod_uid: "uid-db-0"
            }
        );
        assert_eq!(
            p.needs_mount_holder,
            [("shop", "idle", "pv-idle")],
            "unmounted is never skipped"
        );
        assert!(p.nodes_without_agent.is_empty());
        assert_eq!(p.volume_count(), 3);
    }

    #[test]
    fn rwx_on_several_nodes_is_backed_up_once_on_the_least_loaded() {
        let pvcs = vec![
            pvc("a", Some("pv-a"), &[]),
            pvc("shared", Some("pv-s"), &[]),
        ];
        let pods = vec![
            pod("a-0", "node-1", &["a"]),
            pod("w1", "node-1", &["shared"]),
            pod("w2", "node-2", &["shared"]),
        ];
        let p = plan(None, &pvcs, &pods, &["node-1", "node-2"]).unwrap();
        assert_eq!(p.volume_count(), 2);
        assert_eq!(
            p.by_node["node-2"][0].pvc, "shared",
            "node-1 already has a volume"
        );
    }

    #[test]
    fn exclusions_selector_and_unbound() {
        let mut excluded_pvc = pvc("tmp", Some("pv-tmp"), &[("tier", "db")]);
        excluded_pvc
            .annotations
            .insert(BACKUP_ANNOTATION.into(), "false".into());
        let pvcs = vec![
            pvc("db", Some("pv-db"), &[("tier", "db")]),
            pvc("web", Some("pv-web"), &[("tier", "web")]),
            excluded_pvc,
            pvc("pending", None, &[("tier", "db")]),
            pvc("scratch", Some("pv-scratch"), &[("tier", "db")]),
        ];
        let mut opted_out = pod("scratch-0", "node-1", &["scratch"]);
        opted_out
            .annotations
            .insert(BACKUP_ANNOTATION.into(), "False".into());
        let mut stopped = pod("old", "node-2", &["db"]);
        stopped.running = false;
        let pods = vec![pod("db-0", "node-1", &["db"]), opted_out, stopped];
        let sel = LabelSelector {
            match_labels: Some([("tier".to_string(), "db".to_string())].into()),
            ..Default::default()
        };
        let p = plan(Some(&sel), &pvcs, &pods, &["node-1"]).unwrap();
        assert_eq!(
            p.by_node["node-1"]
                .iter()
                .map(|a| a.pvc)
                .collect::<Vec<_>>(),
            ["db"]
        );
        assert_eq!(
            p.skipped,
            [
                ("shop", "tmp", SkipReason::ExcludedPvc),
                ("shop", "pending", SkipReason::NotBound),
                ("shop", "scratch", SkipReason::ExcludedPod)
            ]
        );
    }

    #[test]
    fn nodes_without_agents_are_reported() {
        let pvcs = vec![pvc("db", Some("pv"), &[])];
        let pods = vec![pod("db-0", "node-9", &["db"])];
        let p = plan(None, &pvcs, &pods, &["node-1"]).unwrap();
        assert_eq!(p.nodes_without_agent, ["node-9"]);
    }

    #[test]
    fn selector_expressions_and_errors_name_the_field() {
        let labels: BTreeMap<String, String> = [("tier".to_string(), "db".to_string())].into();
        let expr = |op: &str, values: &[&str]| LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: op.into(),
                values: Some(values.iter().map(|v| v.to_string()).collect()),
            }]),
            ..Default::default()
        };
        assert!(selector_matches(Some(&expr("In", &["db", "x"])), &labels).unwrap());
        assert!(!selector_matches(Some(&expr("NotIn", &["db"])), &labels).unwrap());
        assert!(selector_matches(Some(&expr("Exists", &[])), &labels).unwrap());
        assert!(!selector_matches(Some(&expr("DoesNotExist", &[])), &labels).unwrap());
        let e = selector_matches(Some(&expr("Near", &["db"])), &labels).unwrap_err();
        assert_eq!(e.field, "selector.matchExpressions[0].operator");
        let e = selector_matches(Some(&expr("In", &[])), &labels).unwrap_err();
        assert_eq!(e.field, "selector.matchExpressions[0].values");
    }
}
