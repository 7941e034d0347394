//! The coordinator at scale, on the local control plane: 200 kwok nodes, 20,000 Pods and 20,000
//! PVCs in 100 namespaces (pods shaped like real ones: images, environment, probes, resources), and
//! 5,000 Secrets of 10 KiB (100 of them labelled as repository credentials). A coordinator watching
//! every namespace starts over that, and then backs up 1,000 mounted PVCs of one namespace through
//! the cluster's three real agents and real restic.
//!
//! Reported: the coordinator's RSS once its caches are full, its peak over the whole bench, the time
//! from the Backup's creation until every item is planned, until none is still pending, and until
//! the run has finished with all 1,000 items in its stored status.
//! Runs against the cluster in $STOWAGE_CLUSTER_DIR (scripts/bench starts one). Sizes can be made
//! smaller with STOWAGE_SCALE_{NODES,PODS,SECRETS,RUN_PVCS}.

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    Namespace, Node, PersistentVolume, PersistentVolumeClaim, Pod, Secret,
};
use kube::api::{Api, ListParams, PostParams};
use stowage_api::Backup;
use stowage_tests::cluster::Cluster;
use stowage_tests::coordinator::{Coordinator, CoordinatorOptions, create, local_backend, secret};

fn size(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Creates every object of `objs` with at most 32 requests in flight; 409s are fine (a re-run).
async fn create_all<K>(api: impl Fn(&K) -> Api<K>, objs: Vec<K>, what: &str)
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let started = Instant::now();
    let n = objs.len();
    futures::stream::iter(objs)
        .map(|o| {
            let api = api(&o);
            async move {
                match api.create(&PostParams::default(), &o).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 409 => {}
                    Err(e) => panic!("creating {what}: {e}"),
                }
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    eprintln!(
        "created {n} {what} in {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

/// A pod as real workloads have them: one container with its image, environment, probes and
/// resources, a ConfigMap and a PVC mounted.
fn workload_pod(ns: &str, name: &str, node: &str, pvc: &str) -> Pod {
    let env: Vec<serde_json::Value> = (0..20)
        .map(|i| serde_json::json!({"name": format!("SETTING_{i}"), "value": format!("value-of-setting-{i}-for-{name}")}))
        .collect();
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": ns,
            "labels": {"app": "web", "tier": "backend", "pod-template-hash": "5d8f7c9b4"},
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "9102"}},
        "spec": {"nodeName": node,
            "containers": [{"name": "app", "image": "registry.example.com/team/app:1.42.7",
                "command": ["/app/server"], "args": ["--port=8080", "--log-format=json"],
                "env": env,
                "ports": [{"containerPort": 8080, "name": "http"}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
                "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 5},
                "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 10},
                "volumeMounts": [{"name": "config", "mountPath": "/etc/app"}, {"name": "data", "mountPath": "/data"}]}],
            "volumes": [{"name": "config", "configMap": {"name": "app-config"}},
                        {"name": "data", "persistentVolumeClaim": {"claimName": pvc}}]}
    }))
    .expect("pod")
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[tokio::main]
async fn main() {
    let nodes = size("STOWAGE_SCALE_NODES", 200);
    let pods = size("STOWAGE_SCALE_PODS", 20_000);
    let secrets = size("STOWAGE_SCALE_SECRETS", 5_000);
    let run_pvcs = size("STOWAGE_SCALE_RUN_PVCS", 1_000);
    let bulk_namespaces = 100usize;
    let cluster = Cluster::shared();
    let client = cluster.client().await;

    // Nodes beyond the cluster's three, managed by kwok (Ready, no kubelet of ours).
    let extra: Vec<Node> = (4..=nodes)
        .map(|k| {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("scale-node-{k}"),
                    "labels": {"type": "kwok", "kubernetes.io/hostname": format!("scale-node-{k}")},
                    "annotations": {"node.alpha.kubernetes.io/ttl": "0", "kwok.x-k8s.io/node": "fake"}},
                "spec": {"taints": [{"key": "stowage.dev/scale-bench", "effect": "NoSchedule"}]}
            }))
            .expect("node")
        })
        .collect();
    let all_nodes = Api::<Node>::all(client.clone());
    create_all(|_| all_nodes.clone(), extra, "nodes").await;

    let bulk: Vec<String> = (0..bulk_namespaces)
        .map(|i| format!("scale-bulk-{i:03}"))
        .collect();
    let namespaces = Api::<Namespace>::all(client.clone());
    let ns_objs: Vec<Namespace> = bulk
        .iter()
        .chain(std::iter::once(&"scale-run".to_string()))
        .map(|n| serde_json::from_value(serde_json::json!({"metadata": {"name": n}})).expect("ns"))
        .collect();
    create_all(|_| namespaces.clone(), ns_objs, "namespaces").await;

    // The bulk: unbound PVCs and pods on the extra nodes (which run nothing; they stay Pending).
    let per_ns = pods / bulk_namespaces;
    let mut pvc_objs = Vec::new();
    let mut pod_objs = Vec::new();
    for (i, ns) in bulk.iter().enumerate() {
        for j in 0..per_ns {
            let pvc = format!("data-{j}");
            pvc_objs.push(
                serde_json::from_value::<PersistentVolumeClaim>(serde_json::json!({
                    "metadata": {"name": pvc, "namespace": ns, "labels": {"app": "web"}},
                    "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "standard",
                             "resources": {"requests": {"storage": "10Gi"}}}
                }))
                .expect("pvc"),
            );
            let node = format!("scale-node-{}", 4 + (i * per_ns + j) % (nodes.max(4) - 3));
            pod_objs.push(workload_pod(ns, &format!("web-{j}"), &node, &pvc));
        }
    }
    let c = client.clone();
    create_all(
        |p: &PersistentVolumeClaim| {
            Api::namespaced(
                c.clone(),
                p.metadata.namespace.as_deref().unwrap_or_default(),
            )
        },
        pvc_objs,
        "PVCs",
    )
    .await;
    let c = client.clone();
    create_all(
        |p: &Pod| {
            Api::namespaced(
                c.clone(),
                p.metadata.namespace.as_deref().unwrap_or_default(),
            )
        },
        pod_objs,
        "pods",
    )
    .await;
    let payload = "x".repeat(10 * 1024);
    let secret_objs: Vec<Secret> = (0..secrets)
        .map(|i| {
            let ns = &bulk[i % bulk.len()];
            let labelled = i < bulk.len().min(100);
            let mut labels = serde_json::json!({"owner": "helm"});
            if labelled {
                labels["stowage.dev/credentials"] = "true".into();
            }
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("release-{i}"), "namespace": ns, "labels": labels},
                "stringData": {"release": payload, "password": "bench"}
            }))
            .expect("secret")
        })
        .collect();
    let c = client.clone();
    create_all(
        |s: &Secret| {
            Api::namespaced(
                c.clone(),
                s.metadata.namespace.as_deref().unwrap_or_default(),
            )
        },
        secret_objs,
        "Secrets",
    )
    .await;

    // The run's namespace: mounted volumes on the three nodes with agents.
    let ns = "scale-run";
    // A re-run on the same cluster: the Secret and the runs of the last one go first.
    let _ = Api::<Secret>::namespaced(client.clone(), ns)
        .delete("backup-repo", &Default::default())
        .await;
    for name in ["probe", "thousand"] {
        let _ = Api::<Backup>::namespaced(client.clone(), ns)
            .delete(name, &Default::default())
            .await;
    }
    secret(&client, ns, "backup-repo", &[("password", "bench")]).await;
    let agent_nodes = ["node-1", "node-2", "node-3"];
    let mut pvs = Vec::new();
    let (mut claims, mut holders) = (Vec::new(), Vec::new());
    for i in 0..run_pvcs {
        let pv = format!("pv-{ns}-vol-{i}");
        let backing = cluster.dir.join("pvs").join(&pv);
        std::fs::create_dir_all(&backing).expect("backing");
        std::fs::write(backing.join("small"), format!("volume {i}")).expect("write");
        pvs.push(
            serde_json::from_value::<PersistentVolume>(serde_json::json!({
                "metadata": {"name": pv},
                "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                    "claimRef": {"namespace": ns, "name": format!("vol-{i}")},
                    "csi": {"driver": "local.stowage.dev", "volumeHandle": pv}}
            }))
            .expect("pv"),
        );
        claims.push(
            serde_json::from_value::<PersistentVolumeClaim>(serde_json::json!({
                "metadata": {"name": format!("vol-{i}"), "namespace": ns},
                "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "", "volumeName": pv,
                         "resources": {"requests": {"storage": "1Gi"}}}
            }))
            .expect("pvc"),
        );
        holders.push(
            serde_json::from_value::<Pod>(serde_json::json!({
                "metadata": {"name": format!("app-{i}"), "namespace": ns},
                "spec": {"nodeName": agent_nodes[i % 3],
                    "containers": [{"name": "app", "image": "registry.invalid/app:1"}],
                    "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": format!("vol-{i}")}}]}
            }))
            .expect("pod"),
        );
    }
    let all_pvs = Api::<PersistentVolume>::all(client.clone());
    create_all(|_| all_pvs.clone(), pvs, "PVs").await;
    let run_pvcs_api = Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns);
    create_all(|_| run_pvcs_api.clone(), claims, "run PVCs").await;
    let run_pods = Api::<Pod>::namespaced(client.clone(), ns);
    create_all(|_| run_pods.clone(), holders, "run pods").await;
    let started = Instant::now();
    loop {
        let running = run_pods
            .list(&ListParams::default())
            .await
            .map(|l| {
                l.items
                    .iter()
                    .filter(|p| {
                        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                    })
                    .count()
            })
            .unwrap_or(0);
        if running == run_pvcs {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "{running} of {run_pvcs} run pods are Running after 15 minutes"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    eprintln!(
        "run pods Running in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    // The coordinator, watching every namespace.
    let mut opts = CoordinatorOptions::new(ns);
    opts.all_namespaces = true;
    // The chart's: with 20,000 pods kwok keeps the API server busy, and a 3 s Lease is lost.
    opts.lease_duration = "15s".into();
    let started = Instant::now();
    let coordinator = Coordinator::start(cluster, opts).await;
    coordinator.wait_leading(Duration::from_secs(60)).await;
    let pid = coordinator.pid();
    let mut peak = 0u64;
    // Its caches are full once it has reconciled a Backup (reconciles wait for them).
    let _: Backup = create(
        &client,
        ns,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Backup",
            "metadata": {"name": "probe"}, "spec": {"backend": local_backend(&cluster.dir.join("repos").join("scale-probe")),
            "selector": {"matchLabels": {"none": "none"}}}}),
    )
    .await;
    let backups = Api::<Backup>::namespaced(client.clone(), ns);
    loop {
        peak = peak.max(rss_kib(pid).0);
        let probe = backups.get("probe").await.ok();
        if probe
            .and_then(|b| b.status)
            .and_then(|s| s.phase)
            .is_some_and(|p| p != stowage_api::RunPhase::Running)
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the caches never filled"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let synced = started.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (rss_synced, _) = rss_kib(pid);
    eprintln!(
        "caches filled in {:.1}s; coordinator RSS {} MiB",
        synced.as_secs_f64(),
        rss_synced / 1024
    );

    let repo = cluster.dir.join("repos").join("scale-run");
    let created = Instant::now();
    let _: Backup = create(
        &client,
        ns,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Backup",
            "metadata": {"name": "thousand"}, "spec": {"backend": local_backend(&repo)}}),
    )
    .await;
    let (mut planned, mut dispatched) = (None, None);
    let finished = loop {
        peak = peak.max(rss_kib(pid).0);
        if let Ok(b) = backups.get("thousand").await
            && let Some(st) = b.status
        {
            if planned.is_none() && st.items.len() == run_pvcs {
                planned = Some(created.elapsed());
            }
            if planned.is_some()
                && dispatched.is_none()
                && st
                    .items
                    .iter()
                    .all(|i| i.phase != stowage_api::RunPhase::Pending)
            {
                dispatched = Some(created.elapsed());
            }
            if let Some(p) = st.phase
                && !matches!(
                    p,
                    stowage_api::RunPhase::Pending | stowage_api::RunPhase::Running
                )
            {
                break (
                    p,
                    st.items.len(),
                    st.items
                        .iter()
                        .filter(|i| i.phase == stowage_api::RunPhase::Succeeded)
                        .count(),
                );
            }
        }
        assert!(
            created.elapsed() < Duration::from_secs(3600),
            "the run did not finish in an hour"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let total = created.elapsed();
    let (_, hwm) = rss_kib(pid);
    let secs =
        |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.1}", d.as_secs_f64()));
    println!("\n## The coordinator at scale\n");
    println!(
        "{nodes} nodes, {pods} Pods and {pods} PVCs in {bulk_namespaces} namespaces, {secrets} Secrets of 10 KiB ({} labelled); a Backup of {run_pvcs} PVCs on 3 agents\n",
        bulk.len().min(100).min(secrets)
    );
    println!("| figure | value |\n|---|---|");
    println!(
        "| caches filled (start to first reconcile done) | {:.1} s |",
        synced.as_secs_f64()
    );
    println!("| RSS with full caches | {} MiB |", rss_synced / 1024);
    println!(
        "| peak RSS (VmHWM), whole bench | {} MiB |",
        hwm.max(peak) / 1024
    );
    println!(
        "| Backup created to all {run_pvcs} items planned | {} s |",
        secs(planned)
    );
    println!(
        "| Backup created to no item Pending | {} s |",
        secs(dispatched)
    );
    println!(
        "| Backup created to finished ({:?}, {} items stored, {} succeeded) | {:.1} s |",
        finished.0,
        finished.1,
        finished.2,
        total.as_secs_f64()
    );
    println!(
        "FIGURE coordinator scale: rss_synced_mib={} peak_mib={} planned_s={} dispatched_s={} finished_s={:.1} items={} succeeded={}",
        rss_synced / 1024,
        hwm.max(peak) / 1024,
        secs(planned),
        secs(dispatched),
        total.as_secs_f64(),
        finished.1,
        finished.2
    );
    drop(coordinator);
}
