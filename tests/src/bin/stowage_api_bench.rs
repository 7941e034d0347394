//! API requests per backed-up volume, counted by the API server itself (`apiserver_request_total`):
//! a Schedule fires one Backup run over N PVCs on 3 nodes (N = 10, then 50), with real agents and a
//! real coordinator. The counters are read just before the Schedule is created and again once the run
//! has finished and the coordinator has settled; the bench's own requests are subtracted.
//!
//! Only the resources the coordinator works with are counted (runs, Schedules, PVCs, Pods, Secrets,
//! Events): node heartbeats and Leases belong to kwok and leader election, whatever the run size.
//! Runs against the cluster in $STOWAGE_CLUSTER_DIR (scripts/bench starts one).

use std::collections::BTreeMap;
use std::time::Duration;

use kube::api::{Api, ListParams};
use stowage_api::{Backup, Schedule};
use stowage_tests::cluster::{Cluster, fresh_namespace};
use stowage_tests::coordinator::{Coordinator, PrivateAgents, create, local_backend, secret};

const RESOURCES: [&str; 8] = [
    "backups",
    "checks",
    "prunes",
    "schedules",
    "persistentvolumeclaims",
    "pods",
    "secrets",
    "events",
];

type Counts = BTreeMap<(String, String), f64>;

/// `apiserver_request_total` summed by (verb, resource[/subresource]) for [`RESOURCES`].
async fn counts(client: &kube::Client) -> Counts {
    let req = http::Request::get("/metrics")
        .body(Vec::new())
        .expect("request");
    let text = client.request_text(req).await.expect("apiserver /metrics");
    let mut out = Counts::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |k: &str| {
            labels
                .split("\",")
                .find_map(|kv| kv.strip_prefix(&format!("{k}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
                .unwrap_or_default()
        };
        let resource = label("resource");
        if !RESOURCES.contains(&resource.as_str()) {
            continue;
        }
        let sub = label("subresource");
        let what = if sub.is_empty() {
            resource
        } else {
            format!("{resource}/{sub}")
        };
        *out.entry((label("verb"), what)).or_default() += value.parse::<f64>().unwrap_or(0.0);
    }
    out
}

async fn measure(cluster: &Cluster, client: &kube::Client, pvcs: usize) -> (Counts, f64) {
    let ns = fresh_namespace(client, "apibench").await;
    secret(client, &ns, "backup-repo", &[("password", "bench")]).await;
    let nodes = ["node-1", "node-2", "node-3"];
    for i in 0..pvcs {
        let node = nodes[i % nodes.len()];
        let dir = cluster.volume(&ns, &format!("app-{i}"), &format!("data-{i}"), node, &[]);
        std::fs::write(dir.join("small"), format!("volume {i}")).expect("write");
    }
    for i in 0..pvcs {
        let node = nodes[i % nodes.len()];
        cluster
            .wait_mounted(
                client,
                &ns,
                &format!("app-{i}"),
                &format!("data-{i}"),
                node,
                "small",
            )
            .await;
    }
    let agents = PrivateAgents::start(
        cluster,
        client,
        &ns,
        &[
            ("node-1", "127.0.0.11"),
            ("node-2", "127.0.0.12"),
            ("node-3", "127.0.0.13"),
        ],
        None,
    )
    .await;
    let coordinator = Coordinator::start(cluster, agents.coordinator_options(&ns)).await;
    coordinator.wait_leading(Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    let repo = cluster.dir.join("repos").join(&ns);
    let before = counts(client).await;
    let _: Schedule = create(
        client,
        &ns,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Schedule",
            "metadata": {"name": "nightly"},
            "spec": {"backend": local_backend(&repo), "backup": {"schedule": "* * * * *"}}}),
    )
    .await;
    let mut own: Counts = [(("POST".to_string(), "schedules".to_string()), 1.0)].into();
    // Poll the runs with one LIST a second, counted as the bench's own.
    let backups: Api<Backup> = Api::namespaced(client.clone(), &ns);
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    let phase = loop {
        *own.entry(("LIST".to_string(), "backups".to_string()))
            .or_default() += 1.0;
        let list = backups.list(&ListParams::default()).await.expect("list");
        let done = list.items.iter().find_map(|b| {
            b.status.as_ref().and_then(|s| s.phase).filter(|p| {
                !matches!(
                    p,
                    stowage_api::RunPhase::Pending | stowage_api::RunPhase::Running
                )
            })
        });
        if let Some(p) = done {
            break p;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the Schedule's first Backup did not finish within 240 s"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert_eq!(
        phase,
        stowage_api::RunPhase::Succeeded,
        "the run must succeed to count"
    );
    // Let the final status writes and the Schedule's last reconcile land.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = counts(client).await;
    drop(coordinator);
    drop(agents);
    let mut diff = Counts::new();
    for (k, v) in &after {
        let d = v - before.get(k).copied().unwrap_or(0.0) - own.get(k).copied().unwrap_or(0.0);
        if d > 0.0 {
            diff.insert(k.clone(), d);
        }
    }
    let total: f64 = diff.values().sum();
    (diff, total)
}

#[tokio::main]
async fn main() {
    let cluster = Cluster::shared();
    let client = cluster.client().await;
    let mut columns = Vec::new();
    for n in [10usize, 50] {
        let (diff, total) = measure(cluster, &client, n).await;
        columns.push((n, diff, total));
    }
    let mut keys: Vec<(String, String)> = columns
        .iter()
        .flat_map(|(_, d, _)| d.keys().cloned())
        .collect();
    keys.sort();
    keys.dedup();
    println!(
        "API requests during one Backup run fired by a Schedule (3 nodes), by verb and resource:"
    );
    println!(
        "| verb | resource | {} |",
        columns
            .iter()
            .map(|(n, _, _)| format!("{n} PVCs"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|---|---|{}", "---:|".repeat(columns.len()));
    for (verb, res) in &keys {
        let cells: Vec<String> = columns
            .iter()
            .map(|(_, d, _)| {
                format!(
                    "{}",
                    d.get(&(verb.clone(), res.clone())).copied().unwrap_or(0.0)
                )
            })
            .collect();
        println!("| {verb} | {res} | {} |", cells.join(" | "));
    }
    let list_get = |d: &Counts| -> f64 {
        d.iter()
            .filter(|((v, _), _)| v == "LIST" || v == "GET")
            .map(|(_, c)| c)
            .sum()
    };
    for (n, d, total) in &columns {
        println!(
            "{n} PVCs: {total} requests in all, {:.2} per volume; LIST+GET: {}",
            total / *n as f64,
            list_get(d)
        );
    }
}
