//! The coordinator's dispatch latency on the local control plane: from a Backup object being
//! created to restic being started on the node's agent, over 50 runs.
//!
//! A wrapper around restic stamps the wall clock when a `restic backup` starts, then execs the real
//! restic; the bench stamps the clock before creating each Backup. Same machine, same clock.
//! Runs against the cluster in $STOWAGE_CLUSTER_DIR (scripts/bench starts one).

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use stowage_api::Backup;
use stowage_tests::bench::{Row, percentile, print_table};
use stowage_tests::cluster::{Cluster, fresh_namespace};
use stowage_tests::coordinator::{
    Coordinator, PrivateAgents, create, finished, local_backend, secret, wait_json,
};

const RUNS: usize = 50;

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos()
}

#[tokio::main]
async fn main() {
    let cluster = Cluster::shared();
    let client = cluster.client().await;
    let ns = fresh_namespace(&client, "bench").await;
    secret(&client, &ns, "backup-repo", &[("password", "bench")]).await;
    let tmp = tempfile::tempdir().expect("tmp");
    let stamps = tmp.path().join("backup-starts");
    let wrapper = tmp.path().join("restic-stamp");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncase \" $* \" in *\" backup \"*) date +%s%N >> {} ;; esac\nexec bwrap \"$@\"\n",
            stamps.display()
        ),
    )
    .expect("wrapper");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");

    let dir = cluster.volume(&ns, "app-0", "app", "node-1", &[]);
    std::fs::write(dir.join("small"), b"latency").expect("write");
    cluster
        .wait_mounted(&client, &ns, "app-0", "app", "node-1", "small")
        .await;
    let agents = PrivateAgents::start(
        cluster,
        &client,
        &ns,
        &[("node-1", "127.0.0.11")],
        Some(wrapper),
    )
    .await;
    let coordinator = Coordinator::start(cluster, agents.coordinator_options(&ns)).await;
    coordinator.wait_leading(Duration::from_secs(20)).await;
    let repo = cluster.dir.join("repos").join(&ns);
    let run = |name: String| {
        let (client, ns, backend) = (client.clone(), ns.clone(), local_backend(&repo));
        async move {
            let _: Backup = create(
                &client,
                &ns,
                serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Backup",
                    "metadata": {"name": name}, "spec": {"backend": backend}}),
            )
            .await;
        }
    };
    let wait = |name: String| {
        let (client, ns) = (client.clone(), ns.clone());
        async move {
            let v = wait_json::<Backup>(
                &client,
                &ns,
                &name,
                Duration::from_secs(60),
                "finished",
                finished,
            )
            .await;
            assert_eq!(v["status"]["phase"], "Succeeded", "{v:#}");
        }
    };
    // Warm-up: creates the repository and the agent's parent-snapshot cache.
    run("warm-up".into()).await;
    wait("warm-up".into()).await;

    let mut latencies = Vec::with_capacity(RUNS);
    for i in 0..RUNS {
        let _ = std::fs::remove_file(&stamps);
        let name = format!("latency-{i}");
        let created = now_ns();
        run(name.clone()).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let started: u128 = loop {
            if let Some(first) = std::fs::read_to_string(&stamps)
                .ok()
                .and_then(|s| s.lines().next().and_then(|l| l.trim().parse().ok()))
            {
                break first;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "restic not started for {name}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        latencies.push(started.saturating_sub(created) as f64 / 1e6);
        wait(name).await;
    }
    let (p50, p99) = (
        percentile(latencies.clone(), 0.5),
        percentile(latencies, 0.99),
    );
    print_table(&[
        Row {
            what: format!(
                "Backup created -> restic started on the agent, p50 over {RUNS} runs (ms)"
            ),
            value: format!("{p50:.1}"),
            target: "<= 100".into(),
            ok: p50 <= 100.0,
        },
        Row {
            what: format!(
                "Backup created -> restic started on the agent, p99 over {RUNS} runs (ms)"
            ),
            value: format!("{p99:.1}"),
            target: "<= 500".into(),
            ok: p99 <= 500.0,
        },
    ]);
}
