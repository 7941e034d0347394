//! PreBackupPods: for each Backup run, the coordinator starts each PreBackupPod of the run's
//! namespace (owned by the run, on a node whose agent is ready), waits until it is ready, lets the
//! agent of its node stream the backup command, and deletes it. At most
//! `--max-starting-prebackup-pods` start at once across the cluster, so many of them never hit the
//! scheduler and the image registry at the same instant, and at most
//! `--max-starting-prebackup-pods-per-namespace` of one namespace, so a namespace whose pods never
//! become ready cannot hold every slot. The wait for the slots is bounded like the start itself. A
//! run deletes its pods when it ends, a resumed run included, so a coordinator restart leaves none
//! behind.

use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Affinity, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Pod,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::PostParams;
use kube::{Api, Client, Resource, ResourceExt};
use stowage_api::contract::{ANNOTATION_FULL_SUFFIX, LABEL_RUN};
use stowage_common::shares::NamespaceShares;
use stowage_common::{hash, names};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, SemaphorePermit};

use crate::records::PodInfo;
use stowage_api::{Backup, PreBackupPod};

/// On the pods: the PreBackupPod they were made from.
pub const LABEL_PREBACKUP_POD: &str = "stowage.dev/prebackup-pod";

/// The start slots: each namespace's share first, then the cluster's.
pub struct StartSlots {
    cluster: Semaphore,
    cluster_max: usize,
    shares: NamespaceShares,
}

impl StartSlots {
    pub fn new(cluster_max: usize, per_namespace: usize) -> Self {
        Self {
            cluster: Semaphore::new(cluster_max.max(1)),
            cluster_max: cluster_max.max(1),
            shares: NamespaceShares::new(per_namespace.min(cluster_max).max(1)),
        }
    }

    /// Both slots for a pod of `namespace`, waiting at most `within`.
    async fn acquire(
        &self,
        namespace: &str,
        within: Duration,
    ) -> Result<(OwnedSemaphorePermit, SemaphorePermit<'_>), String> {
        let both = async {
            let share = self.shares.acquire(namespace).await?;
            let slot = self.cluster.acquire().await.ok()?;
            Some((share, slot))
        };
        match tokio::time::timeout(within, both).await {
            Ok(Some(slots)) => Ok(slots),
            Ok(None) => Err("the coordinator is shutting down".into()),
            Err(_) => Err(format!(
                "no start slot within {}s: {} PreBackupPods of a namespace start at once \
                 (--max-starting-prebackup-pods-per-namespace) and {} across the cluster \
                 (--max-starting-prebackup-pods), and the earlier ones did not become ready",
                within.as_secs(),
                self.shares.per_namespace(),
                self.cluster_max
            )),
        }
    }
}

/// A started pod, ready for the command.
#[derive(Debug, Clone)]
pub struct Started {
    pub pod: String,
    pub node: String,
    pub container: String,
}

/// `<name>-pre-<hash>`, at most 63 characters, unique per run and PreBackupPod.
pub fn pod_name(run_uid: &str, name: &str) -> String {
    names::with_suffix(
        name,
        &format!("pre-{}", hash::short(&format!("{run_uid}/{name}"))),
        names::DNS_LABEL_MAX,
    )
}

/// The pod of `pbp` for `run`: its template, owned by the run, labelled, and required onto one of
/// `nodes` (those with a ready agent).
pub fn pod_for(run: &Backup, pbp: &PreBackupPod, nodes: &[String]) -> Pod {
    let template = &pbp.spec.pod;
    let mut metadata = template.metadata.clone().unwrap_or_default();
    metadata.name = Some(pod_name(&run.uid().unwrap_or_default(), &pbp.name_any()));
    metadata.namespace = run.namespace();
    metadata.generate_name = None;
    let labels = metadata.labels.get_or_insert_with(Default::default);
    labels.insert(LABEL_RUN.into(), names::label_value(&run.name_any()));
    labels.insert(
        LABEL_PREBACKUP_POD.into(),
        names::label_value(&pbp.name_any()),
    );
    metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(
            format!("{LABEL_RUN}{ANNOTATION_FULL_SUFFIX}"),
            run.name_any(),
        );
    metadata.owner_references = Some(vec![OwnerReference {
        api_version: Backup::api_version(&()).into_owned(),
        kind: Backup::kind(&()).into_owned(),
        name: run.name_any(),
        uid: run.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: None,
    }]);
    let mut spec = template.spec.clone().unwrap_or_default();
    spec.restart_policy = Some("Never".into());
    // A node field selector takes one value per term, and terms are ORed: one term per node with
    // a ready agent, each also carrying what the user's own term (if any) requires.
    let affinity = spec.affinity.get_or_insert_with(Affinity::default);
    let node_affinity = affinity
        .node_affinity
        .get_or_insert_with(NodeAffinity::default);
    let required = node_affinity
        .required_during_scheduling_ignored_during_execution
        .get_or_insert_with(NodeSelector::default);
    let user_terms = if required.node_selector_terms.is_empty() {
        vec![NodeSelectorTerm::default()]
    } else {
        std::mem::take(&mut required.node_selector_terms)
    };
    for term in &user_terms {
        for node in nodes {
            let mut t = term.clone();
            t.match_fields
                .get_or_insert_with(Vec::new)
                .push(NodeSelectorRequirement {
                    key: "metadata.name".into(),
                    operator: "In".into(),
                    values: Some(vec![node.clone()]),
                });
            required.node_selector_terms.push(t);
        }
    }
    Pod {
        metadata,
        spec: Some(spec),
        status: None,
    }
}

/// Starts the pod of `pbp` for `run` under one of the `starting` slots (held until it is ready or
/// has failed), and waits at most `timeout` for a slot, then at most `timeout` for the pod. Unless `privileged_allowed`, a
/// template asking for rights a pod creator would need (see `prebackup_policy`) is refused first.
#[allow(clippy::too_many_arguments)]
pub async fn start(
    client: &Client,
    pods: &crate::state::Records<PodInfo>,
    starting: &StartSlots,
    run: &Backup,
    pbp: &PreBackupPod,
    nodes: &[String],
    timeout: Duration,
    privileged_allowed: bool,
) -> Result<Started, String> {
    // The cache holds PreBackupPods without their pod template: the template is read now.
    let ns = run.namespace().unwrap_or_default();
    let pbp = &Api::<PreBackupPod>::namespaced(client.clone(), &ns)
        .get(&pbp.name_any())
        .await
        .map_err(|e| {
            format!(
                "PreBackupPod {}: reading it: {}",
                pbp.name_any(),
                crate::errors::sentence(&e)
            )
        })?;
    if !privileged_allowed
        && let Some(why) = pbp
            .spec
            .pod
            .spec
            .as_ref()
            .and_then(crate::prebackup_policy::refusal)
    {
        return Err(format!("PreBackupPod {}: {why}", pbp.name_any()));
    }
    let _slots = starting
        .acquire(&ns, timeout)
        .await
        .map_err(|why| format!("PreBackupPod {}: {why}", pbp.name_any()))?;
    let pod = pod_for(run, pbp, nodes);
    let name = pod.name_any();
    let container = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .map(|c| c.name.clone())
        .ok_or_else(|| {
            format!(
                "PreBackupPod {}: spec.pod.spec.containers is empty",
                pbp.name_any()
            )
        })?;
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    match api.create(&PostParams::default(), &pod).await {
        Ok(_) => tracing::info!(namespace = %ns, pod = %name, "started a PreBackupPod"),
        // Left by an earlier attempt of the same run (a coordinator restart): adopt it.
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => {
            return Err(format!(
                "PreBackupPod {}: creating pod {ns}/{name}: {}",
                pbp.name_any(),
                crate::errors::sentence(&e)
            ));
        }
    }
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if let Some(p) = pods.get(&ns, &name)
            && p.ready
            && let Some(node) = p.node.clone()
        {
            return Ok(Started {
                pod: name,
                node,
                container,
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    release(client, &ns, &name).await;
    Err(format!(
        "PreBackupPod {}: pod {ns}/{name} was not ready within {}s",
        pbp.name_any(),
        timeout.as_secs()
    ))
}

/// Deletes a PreBackupPod's pod (absent is fine).
pub async fn release(client: &Client, namespace: &str, pod: &str) {
    crate::mount_holder::delete_pod(client, namespace, pod, "PreBackupPod").await;
}

/// Deletes every PreBackupPod pod of `run` still in the cache: what a restarted coordinator's
/// earlier attempt left behind.
pub async fn release_all(client: &Client, pods: &crate::state::Records<PodInfo>, run: &Backup) {
    let uid = run.uid();
    let leftovers: Vec<(String, String)> = pods
        .in_namespace(&run.namespace().unwrap_or_default())
        .iter()
        .filter(|p| p.labels.contains_key(LABEL_PREBACKUP_POD))
        .filter(|p| p.controller_uid.is_some() && p.controller_uid == uid)
        .map(|p| (p.namespace.clone(), p.name.clone()))
        .collect();
    for (ns, name) in leftovers {
        release(client, &ns, &name).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_are_owned_bounded_and_kept_on_ready_agents() {
        let mut run = Backup::new("nightly-backup-202611250300", Default::default());
        run.metadata.namespace = Some("shop".into());
        run.metadata.uid = Some("u-1".into());
        let pbp: PreBackupPod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "mysqldump-with-a-rather-long-name-that-goes-on-and-on-and-on", "namespace": "shop"},
            "spec": {"backupCommand": "mysqldump --all-databases", "pod": {
                "metadata": {"labels": {"app": "dump"}},
                "spec": {"containers": [{"name": "dump", "image": "mysql:8"}]}}}
        }))
        .unwrap();
        let p = pod_for(&run, &pbp, &["node-1".into(), "node-3".into()]);
        let name = p.name_any();
        assert!(name.len() <= 63, "{name}");
        assert_eq!(name, pod_name("u-1", &pbp.name_any()));
        assert_eq!(p.labels()["app"], "dump");
        assert!(p.labels()[LABEL_PREBACKUP_POD].len() <= 63);
        assert_eq!(p.owner_references()[0].uid, "u-1");
        let terms = p
            .spec
            .as_ref()
            .unwrap()
            .affinity
            .as_ref()
            .unwrap()
            .node_affinity
            .as_ref()
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .as_ref()
            .unwrap()
            .node_selector_terms
            .clone();
        // One term per node: a node field selector takes a single value.
        let values: Vec<Vec<String>> = terms
            .iter()
            .map(|t| t.match_fields.clone().unwrap()[0].values.clone().unwrap())
            .collect();
        assert_eq!(values, [["node-1"], ["node-3"]]);
        assert_eq!(
            p.spec.as_ref().unwrap().restart_policy.as_deref(),
            Some("Never")
        );
    }
}
