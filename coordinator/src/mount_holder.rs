//! Mount-holder pods: a PVC that no running pod mounts is still backed up. A short-lived pod mounts
//! it read-only; Kubernetes schedules it (volume topology and RWO attachment included) and the agent
//! on that node reads the volume like any other. The pod is owned by the run, so it is
//! garbage-collected even if the coordinator dies before deleting it.

use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, PersistentVolumeClaimVolumeSource, Pod, PodSpec, ResourceRequirements,
    SeccompProfile, SecurityContext, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};

use stowage_api::contract::{ANNOTATION_FULL_SUFFIX, LABEL_RUN};
use stowage_common::{hash, names};

pub use stowage_api::contract::LABEL_MOUNT_HOLDER;

/// How holders are made: the administrator's choices (`--mount-holder-*`).
#[derive(Debug, Clone, Copy)]
pub struct Settings<'a> {
    pub image: &'a str,
    pub timeout: Duration,
    /// Taints a holder tolerates. None by default: a tenant's PVC must not bring a pod onto nodes
    /// the administrator keeps for others (control plane, dedicated pools).
    pub tolerations: &'a [Toleration],
}

impl<'a> Settings<'a> {
    pub fn of(config: &'a crate::config::Config) -> Self {
        Self {
            image: &config.mount_holder_image,
            timeout: config.mount_holder_timeout,
            tolerations: &config.mount_holder_tolerations.0,
        }
    }
}

/// A running holder: where the volume can now be read.
#[derive(Debug, Clone)]
pub struct Held {
    pub pod: String,
    pub uid: String,
    pub node: String,
}

/// `<pvc>-hold-<hash>`, at most 63 characters (a valid hostname label), unique per run and PVC.
pub fn pod_name(run_uid: &str, pvc: &str) -> String {
    names::with_suffix(
        pvc,
        &format!("hold-{}", hash::short(&format!("{run_uid}/{pvc}"))),
        names::DNS_LABEL_MAX,
    )
}

/// The holder of `pvc` for `run` (a Backup mounts it read-only, a Restore read-write).
pub fn pod_for<K>(run: &K, pvc: &str, settings: &Settings<'_>, read_only: bool) -> Pod
where
    K: Resource<DynamicType = ()>,
{
    let owner = OwnerReference {
        api_version: K::api_version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
        name: run.name_any(),
        uid: run.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: None,
    };
    Pod {
        metadata: ObjectMeta {
            name: Some(pod_name(&run.uid().unwrap_or_default(), pvc)),
            namespace: run.namespace(),
            labels: Some(
                [
                    (LABEL_MOUNT_HOLDER.to_string(), "true".to_string()),
                    (LABEL_RUN.to_string(), names::label_value(&run.name_any())),
                ]
                .into(),
            ),
            annotations: Some(
                [(
                    format!("{LABEL_RUN}{ANNOTATION_FULL_SUFFIX}"),
                    run.name_any(),
                )]
                .into(),
            ),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            termination_grace_period_seconds: Some(0),
            automount_service_account_token: Some(false),
            tolerations: (!settings.tolerations.is_empty()).then(|| settings.tolerations.to_vec()),
            containers: vec![Container {
                name: "hold".into(),
                image: Some(settings.image.into()),
                volume_mounts: Some(vec![VolumeMount {
                    name: "data".into(),
                    mount_path: "/data".into(),
                    read_only: Some(read_only),
                    ..Default::default()
                }]),
                resources: Some(ResourceRequirements {
                    requests: Some(
                        [
                            ("cpu".to_string(), Quantity("1m".into())),
                            ("memory".to_string(), Quantity("8Mi".into())),
                        ]
                        .into(),
                    ),
                    ..Default::default()
                }),
                // Everything Pod Security's `restricted` level asks, so a holder is admitted in
                // any namespace (docs/security.md).
                security_context: Some(SecurityContext {
                    allow_privilege_escalation: Some(false),
                    read_only_root_filesystem: Some(true),
                    run_as_non_root: Some(true),
                    run_as_user: Some(65535),
                    run_as_group: Some(65535),
                    capabilities: Some(Capabilities {
                        drop: Some(vec!["ALL".into()]),
                        ..Default::default()
                    }),
                    seccomp_profile: Some(SeccompProfile {
                        type_: "RuntimeDefault".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            volumes: Some(vec![Volume {
                name: "data".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: pvc.into(),
                    read_only: Some(read_only),
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

/// Creates the holder for `pvc` (or adopts one left by an earlier attempt of the same run) and
/// waits until it runs on a node.
pub async fn hold<K>(
    client: &Client,
    pods: &crate::state::Records<crate::records::PodInfo>,
    run: &K,
    pvc: &str,
    settings: &Settings<'_>,
    read_only: bool,
) -> Result<Held, String>
where
    K: Resource<DynamicType = ()>,
{
    let ns = run.namespace().unwrap_or_default();
    let timeout = settings.timeout;
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod = pod_for(run, pvc, settings, read_only);
    let name = pod.name_any();
    match api.create(&PostParams::default(), &pod).await {
        Ok(_) => tracing::info!(namespace = %ns, pvc, pod = %name, "created mount holder"),
        // An earlier attempt of this run made it: adopt it. Anyone else's pod of that name (a
        // tenant can create pods in the namespace) is never used as this run's holder.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let existing = api
                .get_opt(&name)
                .await
                .map_err(|e| format!("reading pod {ns}/{name}: {}", crate::errors::sentence(&e)))?;
            let run_uid = run.uid().unwrap_or_default();
            let ours = existing.as_ref().is_some_and(|p| {
                p.owner_references()
                    .iter()
                    .any(|o| o.uid == run_uid && o.controller == Some(true))
            });
            if !ours {
                return Err(format!(
                    "a pod named {ns}/{name} exists and is not this run's mount holder; it is not used (delete it, or let the run fail)"
                ));
            }
        }
        Err(e) => {
            return Err(format!(
                "creating mount holder pod {ns}/{name} for PVC {pvc}: {}",
                crate::errors::sentence(&e)
            ));
        }
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::from("Pending");
    // Watched, not polled: the pod store sees the scheduler and the kubelet move it along.
    while tokio::time::Instant::now() < deadline {
        match pods.get(&ns, &name) {
            Some(p) => {
                if let (true, Some(node)) = (p.running, p.node.clone()) {
                    return Ok(Held {
                        pod: name,
                        uid: p.uid.clone(),
                        node,
                    });
                }
                last = p.pending.clone().unwrap_or_else(|| "Pending".into());
            }
            None => last = "not seen yet".into(),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    release(client, &ns, &name).await;
    Err(format!(
        "mount holder pod {ns}/{name} for PVC {pvc} did not start within {}s ({last})",
        timeout.as_secs()
    ))
}

/// A holder's volume may take a moment to appear in its agent's inventory, which then answers
/// `NOT_FOUND`: [`InventoryWait::again`] says whether to call the agent once more (after a pause).
#[derive(Default)]
pub struct InventoryWait {
    attempts: u32,
}

impl InventoryWait {
    /// At most 20 more calls, 500 ms apart, and only for a volume a holder mounts.
    pub async fn again(
        &mut self,
        held: bool,
        error: Option<&crate::dispatch::DispatchError>,
    ) -> bool {
        let not_found = matches!(
            error,
            Some(crate::dispatch::DispatchError::Agent {
                code: tonic::Code::NotFound,
                ..
            })
        );
        if !(held && not_found && self.attempts < 20) {
            return false;
        }
        self.attempts += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
        true
    }
}

/// Deletes a holder pod (absent is fine).
pub async fn release(client: &Client, namespace: &str, pod: &str) {
    delete_pod(client, namespace, pod, "mount holder").await;
}

/// Deletes a pod Stowage made (`what` names it in logs); absent is fine, and a failure is only
/// logged: the pod's run owns it, so the garbage collector removes it with the run.
pub async fn delete_pod(client: &Client, namespace: &str, pod: &str, what: &str) {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        ..Default::default()
    };
    match api.delete(pod, &dp).await {
        Ok(_) => tracing::info!(namespace, pod, what, "deleted pod"),
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => {
            tracing::warn!(namespace, pod, what, error = %crate::errors::sentence(&e), "deleting pod (its run owns it, so GC will when the run goes)")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stowage_api::Backup;

    #[test]
    fn holder_pods_are_read_only_owned_and_validly_named() {
        let mut run = Backup::new("nightly-backup-1", Default::default());
        run.metadata.namespace = Some("shop".into());
        run.metadata.uid = Some("uid-1".into());
        let long = "x".repeat(200);
        let name = pod_name("uid-1", &long);
        assert!(name.len() <= 63, "{name}");
        assert_ne!(pod_name("uid-1", "db"), pod_name("uid-2", "db"));
        let none = Settings {
            image: "pause",
            timeout: Duration::from_secs(1),
            tolerations: &[],
        };
        let pod = pod_for(&run, "db", &none, true);
        let spec = pod.spec.unwrap();
        assert_eq!(
            spec.tolerations, None,
            "no taint is tolerated unless configured"
        );
        let storage = [Toleration {
            key: Some("dedicated".into()),
            operator: Some("Equal".into()),
            value: Some("storage".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        }];
        let with = pod_for(
            &run,
            "db",
            &Settings {
                tolerations: &storage,
                ..none
            },
            true,
        );
        assert_eq!(
            with.spec.unwrap().tolerations.as_deref(),
            Some(&storage[..])
        );
        let claim = spec.volumes.unwrap()[0]
            .persistent_volume_claim
            .clone()
            .unwrap();
        assert_eq!(claim.claim_name, "db");
        assert_eq!(claim.read_only, Some(true));
        let owner = &pod.metadata.owner_references.unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("Backup", "uid-1")
        );
        assert_eq!(
            spec.node_name, None,
            "scheduled by Kubernetes, never pinned"
        );
    }
}
