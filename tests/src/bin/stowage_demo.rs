//! `stowage-demo`: the demo's steps, against a cluster from `tests/cluster/up --coordinator` (agents
//! from the agent DaemonSet, one coordinator). The user-facing part is Kubernetes objects: a
//! Schedule, a Backup run and a Check run; the coordinator sends each volume to the agent of the node
//! that mounts it. A Restore object brings one deleted file back in place, while its pod runs.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret};
use kube::api::Api;
use stowage_coordinator::crd::{Backup, Check, Restore, RunPhase, Schedule};
use stowage_tests::cluster::{Cluster, pod_running, pvc_bound, wait_for};

const NS: &str = "demo-shop";
const APPS: [(&str, &str, &str); 3] = [
    ("postgres-0", "data-postgres-0", "node-1"),
    ("redis-0", "data-redis-0", "node-2"),
    ("uploads-0", "uploads", "node-3"),
];
/// A PVC that no pod mounts (a scaled-down app): backed up through a mount-holder pod.
const IDLE: (&str, &str) = ("reports-0", "reports");
const PASSWORD: &str = "demo-password-change-me";

fn step(n: usize, what: &str) {
    println!("\n[{n}] {what}");
}

/// Waits (2 minutes at most) until run `name` has finished.
async fn wait_run<K>(api: &Api<K>, name: &str) -> anyhow::Result<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + serde::Serialize,
{
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let obj = api.get(name).await?;
        let phase = serde_json::to_value(&obj)?["status"]["phase"].clone();
        if matches!(
            phase.as_str(),
            Some("Succeeded" | "PartiallyFailed" | "Failed")
        ) {
            return Ok(obj);
        }
        if Instant::now() > deadline {
            bail!("{name} did not finish within 2 minutes (phase {phase})");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cluster = Cluster::shared();
    let client = cluster.client().await;
    // Below the agents' --local-repository-root (tests/cluster/stowage-up).
    let repo_dir = cluster.dir.join("repos").join("demo");

    step(
        1,
        "three application pods on three nodes, each with a PVC holding data, and one unmounted PVC",
    );
    let mut backing = BTreeMap::new();
    let idle = cluster.volume(NS, IDLE.0, IDLE.1, "node-1", &["--no-pod"]);
    std::fs::write(idle.join("q3.csv"), "quarter,revenue\nq3,42\n")?;
    println!("    {NS}/{}: no pod mounts it", IDLE.1);
    for (pod, pvc, node) in APPS {
        let dir = cluster.volume(NS, pod, pvc, node, &[]);
        for i in 0..50 {
            std::fs::write(
                dir.join(format!("record-{i:03}.dat")),
                format!("{pod} record {i}\n").repeat(200),
            )?;
        }
        std::fs::create_dir_all(dir.join("conf"))?;
        std::fs::write(
            dir.join("conf/settings.ini"),
            format!("[{pod}]\nowner = demo\n"),
        )?;
        backing.insert(pvc, dir);
        println!("    {NS}/{pod} on {node}: PVC {pvc}");
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), NS);
    for (pod, pvc, node) in APPS {
        wait_for(
            &format!("{pod} Running with {pvc} bound"),
            Duration::from_secs(60),
            || async { pod_running(&pods, pod).await && pvc_bound(&pvcs, pvc).await },
        )
        .await;
        cluster
            .wait_mounted(&client, NS, pod, pvc, node, "conf/settings.ini")
            .await;
    }

    step(
        2,
        "a Schedule and a Backup run: the coordinator sends each volume to the agent of its node",
    );
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "backup-repo"}, "stringData": {"password": PASSWORD}}))?;
    let _ = Api::<Secret>::namespaced(client.clone(), NS)
        .create(&Default::default(), &secret)
        .await;
    let backend = serde_json::json!({
        "repoPasswordSecretRef": {"name": "backup-repo", "key": "password"},
        "local": {"path": repo_dir.display().to_string()}});
    let schedule: Schedule = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "nightly"},
        "spec": {"backend": backend, "backup": {"schedule": "@daily-random"},
                 "check": {"schedule": "@weekly-random"},
                 "prune": {"schedule": "0 4 * * 0", "retention": {"keepLast": 5, "keepDaily": 14}}}}))?;
    let schedules: Api<Schedule> = Api::namespaced(client.clone(), NS);
    schedules.create(&Default::default(), &schedule).await?;
    let run: Backup = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "manual-1"}, "spec": {"scheduleRef": {"name": "nightly"}}}))?;
    let backups: Api<Backup> = Api::namespaced(client.clone(), NS);
    let started = Instant::now();
    backups.create(&Default::default(), &run).await?;
    println!("    kubectl -n {NS} create -f backup.yaml   (spec.scheduleRef: nightly)");
    let done = wait_run(&backups, "manual-1").await?;
    let status = done.status.context("status")?;
    println!(
        "\n    Backup manual-1: {:?} in {:.1}s ({})",
        status.phase.unwrap_or_default(),
        started.elapsed().as_secs_f64(),
        status.summary.unwrap_or_default()
    );
    println!(
        "    {:<18} {:<7} {:<24} {:<10} {:>5} {:>9} {:>8}",
        "PVC", "NODE", "POD", "SNAPSHOT", "NEW", "ADDED", "SECONDS"
    );
    for i in &status.items {
        println!(
            "    {:<18} {:<7} {:<24} {:<10} {:>5} {:>9} {:>8.2}",
            i.pvc,
            i.node.as_deref().unwrap_or("-"),
            i.pod.as_deref().unwrap_or("-"),
            // restic 0.17+ reports the full id; people read the short one.
            i.snapshot_id
                .as_deref()
                .map_or("-", |id| id.get(..8).unwrap_or(id)),
            i.files_new.unwrap_or(0),
            i.bytes_added.unwrap_or(0),
            i.duration_seconds.unwrap_or(0.0)
        );
        if i.phase != RunPhase::Succeeded {
            bail!("{} was not backed up: {:?}", i.pvc, i.error);
        }
    }
    if status.items.len() != APPS.len() + 1 {
        bail!(
            "expected {} volumes, got {}",
            APPS.len() + 1,
            status.items.len()
        );
    }
    let sched = schedules.get("nightly").await?;
    let next = sched.status.and_then(|s| s.next_runs).unwrap_or_default();
    println!(
        "    Schedule nightly fires next: backup {}, check {}, prune {}",
        next.backup.unwrap_or_default(),
        next.check.unwrap_or_default(),
        next.prune.unwrap_or_default()
    );

    step(
        3,
        "a user deletes a file; it is restored in place, into the running pod's volume",
    );
    let (pod, pvc, node) = APPS[0];
    let victim = backing[pvc].join("conf/settings.ini");
    let original = std::fs::read(&victim)?;
    std::fs::remove_file(&victim)?;
    println!("    deleted conf/settings.ini from {pvc}");
    let p = pods.get(pod).await?;
    let uid_before = p.metadata.uid.clone().context("uid")?;
    // A Restore object: the coordinator resolves the newest snapshot of this PVC, and the agent of
    // the node that mounts it writes the one file back while the pod runs.
    let restores: Api<Restore> = Api::namespaced(client.clone(), NS);
    let undo: Restore = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "undo-delete"},
        "spec": {"scheduleRef": {"name": "nightly"},
                 "source": {"pvc": pvc, "snapshot": "latest", "include": ["/conf/settings.ini"]},
                 "target": {"mode": "Merge"}}}))?;
    restores.create(&Default::default(), &undo).await?;
    println!(
        "    kubectl apply: Restore undo-delete (source.pvc {pvc}, include /conf/settings.ini, mode Merge)"
    );
    let done = wait_run(&restores, "undo-delete").await?;
    let status = done.status.context("status")?;
    let message = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Succeeded")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    if status.phase != Some(RunPhase::Succeeded) {
        bail!("the restore failed: {message}");
    }
    let outcome = status.restore.context("restore status")?;
    let back = std::fs::read(&victim).context("the file is back")?;
    if back != original {
        bail!("restored content differs");
    }
    let uid_after = pods.get(pod).await?.metadata.uid.context("uid")?;
    if uid_after != uid_before {
        bail!("the pod was recreated");
    }
    println!("    Restore undo-delete: {message}");
    println!(
        "    snapshot {} (taken {}) on {}: conf/settings.ini is back, byte for byte; pod {pod} kept running (same UID)",
        outcome.snapshot_id.unwrap_or_default(),
        outcome.snapshot_time.unwrap_or_default(),
        outcome.node.unwrap_or_else(|| node.to_string())
    );

    step(4, "a Check run verifies the repository on one ready agent");
    let check: Check = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "verify-1"}, "spec": {"scheduleRef": {"name": "nightly"}}}))?;
    let checks: Api<Check> = Api::namespaced(client.clone(), NS);
    checks.create(&Default::default(), &check).await?;
    let done = wait_run(&checks, "verify-1").await?;
    let status = done.status.context("status")?;
    let verdict = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Succeeded")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    println!(
        "    Check verify-1: {:?}: {verdict}",
        status.phase.unwrap_or_default()
    );
    if status.phase != Some(RunPhase::Succeeded) {
        bail!("the check failed");
    }

    step(5, "where to look");
    println!(
        "    kubectl -n {NS} get schedules,backups,checks,restores    (KUBECONFIG={})",
        cluster.kubeconfig().display()
    );
    println!(
        "    repository:  {}  (restic -r ... snapshots)",
        repo_dir.display()
    );
    for k in 1..=3 {
        if let (Some(m), Some(l)) = (
            cluster.env.get(&format!("STOWAGE_AGENT_{k}_METRICS")),
            cluster.env.get(&format!("STOWAGE_AGENT_{k}_LOG")),
        ) {
            println!("    node-{k} agent: metrics {m}  log {l}");
        }
    }
    if let Some(m) = cluster.env.get("STOWAGE_COORDINATOR_METRICS") {
        println!("    coordinator: metrics {m}");
    }
    println!(
        "    control plane logs: {}",
        cluster.dir.join("logs").display()
    );
    println!("\ndemo succeeded");
    Ok(())
}
