//! `stowage-demo`: the demo's steps, against a cluster from `tests/cluster/up --helm` (Stowage
//! installed by its Helm chart, its pods' containers run by the kubelet emulator). What a user does
//! goes through Kubernetes objects and `kubectl stowage`: a Schedule, `backup now`, `restore`.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams};
use stowage_api::Schedule;
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
/// The database dump postgres-0's backup command streams into restic.
const DUMP: &str =
    "for i in $(seq 1 2000); do echo \"INSERT INTO orders VALUES ($i, 'order $i');\"; done";

fn step(n: usize, what: &str) {
    println!("\n[{n}] {what}");
}

/// `kubectl stowage ...` in the demo namespace (the runner the plugin's tests use), its output
/// shown indented; fails unless it exits 0.
fn kubectl_stowage(cluster: &Cluster, args: &[&str]) -> anyhow::Result<String> {
    println!("    $ kubectl stowage -n {NS} {}", args.join(" "));
    let out = stowage_tests::kubectl_stowage::run(cluster, NS, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    // The progress bar goes to stderr, a line per change when not on a terminal: show the last.
    let stderr = String::from_utf8_lossy(&out.stderr);
    if let Some(last) = stderr.lines().rfind(|l| l.starts_with('[')) {
        println!("      {last}");
    }
    for l in stderr.lines().filter(|l| !l.starts_with('[')) {
        println!("      {l}");
    }
    for l in stdout.lines() {
        println!("      {l}");
    }
    if !out.status.success() {
        bail!(
            "kubectl stowage {} exited with {:?}",
            args.join(" "),
            out.status.code()
        );
    }
    Ok(stdout)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cluster = Cluster::running();
    let client = cluster.client().await;
    let sys = cluster
        .env
        .get("STOWAGE_HELM_NAMESPACE")
        .cloned()
        .context("no Helm release: start the cluster with tests/cluster/up --helm")?;

    step(
        3,
        "Stowage as the Helm chart installed it: the pods run by the kubelet emulator",
    );
    let chart_pods = Api::<Pod>::namespaced(client.clone(), &sys)
        .list(&ListParams::default())
        .await?;
    for p in &chart_pods.items {
        let st = p.status.clone().unwrap_or_default();
        let ready = st
            .conditions
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        println!(
            "    {:<42} {:<7} {:<11} ready={ready}",
            p.metadata.name.clone().unwrap_or_default(),
            p.spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default(),
            st.pod_ip.unwrap_or_default()
        );
    }

    step(
        4,
        "three application pods on three nodes with data in their PVCs (postgres-0 with a backup command), and one unmounted PVC",
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
    let annotate = serde_json::json!({"metadata": {"annotations": {
        "stowage.dev/backup-command": format!("sh -c '{}'", DUMP.replace('\'', "'\\''")),
        "stowage.dev/file-extension": ".sql"}}});
    pods.patch(
        "postgres-0",
        &PatchParams::default(),
        &Patch::Merge(&annotate),
    )
    .await?;
    println!("    postgres-0: stowage.dev/backup-command streams a 2000-row SQL dump into restic");

    step(
        5,
        "an S3 repository, a Schedule, and `kubectl stowage backup now`: each volume goes to the agent of its node",
    );
    let moto = stowage_tests::moto::Moto::start();
    moto.create_bucket("demo");
    let secret: Secret = serde_json::from_value(serde_json::json!({
        // Only Secrets labelled as credentials serve as repository credentials (docs/security.md).
        "metadata": {"name": "backup-repo", "labels": {"stowage.dev/credentials": "true"}},
        "stringData": {"password": PASSWORD, "id": "AKIADEMO", "secret": "demo-secret-key"}}))?;
    let _ = Api::<Secret>::namespaced(client.clone(), NS)
        .create(&Default::default(), &secret)
        .await;
    let backend = serde_json::json!({
        "repoPasswordSecretRef": {"name": "backup-repo", "key": "password"},
        "s3": {"endpoint": moto.endpoint, "bucket": "demo", "prefix": "shop",
               "accessKeyIDSecretRef": {"name": "backup-repo", "key": "id"},
               "secretAccessKeySecretRef": {"name": "backup-repo", "key": "secret"}},
        "initialize": true});
    let schedule: Schedule = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "nightly"},
        "spec": {"backend": backend, "backup": {"schedule": "@daily-random"},
                 "check": {"schedule": "@weekly-random"},
                 "prune": {"schedule": "0 4 * * 0", "retention": {"keepLast": 5, "keepDaily": 14}}}}))?;
    Api::<Schedule>::namespaced(client.clone(), NS)
        .create(&Default::default(), &schedule)
        .await?;
    println!(
        "    Schedule nightly: S3 {}/demo/shop, backup @daily-random",
        moto.endpoint
    );
    let started = Instant::now();
    let out = kubectl_stowage(
        cluster,
        &[
            "backup",
            "now",
            "--schedule",
            "nightly",
            "--wait",
            "--timeout",
            "180s",
        ],
    )?;
    println!("    ({:.1}s)", started.elapsed().as_secs_f64());
    for want in [
        "data-postgres-0",
        "data-redis-0",
        "uploads",
        "reports",
        "command Pod/postgres-0",
    ] {
        if !out.contains(want) {
            bail!("the backup's summary does not name {want}");
        }
    }
    kubectl_stowage(cluster, &["status"])?;

    step(
        6,
        "a user deletes a file; `kubectl stowage restore` brings it back in place while the pod runs",
    );
    let (pod, pvc, _) = APPS[0];
    let victim = backing[pvc].join("conf/settings.ini");
    let original = std::fs::read(&victim)?;
    std::fs::remove_file(&victim)?;
    println!("    deleted conf/settings.ini from {pvc}");
    let uid_before = pods.get(pod).await?.metadata.uid.context("uid")?;
    kubectl_stowage(
        cluster,
        &[
            "restore",
            "--pvc",
            pvc,
            "--path",
            "/conf/settings.ini",
            "--timeout",
            "180s",
        ],
    )?;
    let back = std::fs::read(&victim).context("the file is back")?;
    if back != original {
        bail!("restored content differs");
    }
    let uid_after = pods.get(pod).await?.metadata.uid.context("uid")?;
    if uid_after != uid_before {
        bail!("the pod was recreated");
    }
    println!(
        "    conf/settings.ini is back, byte for byte; pod {pod} kept running (UID {uid_after})"
    );

    step(
        7,
        "metrics: each agent serves its own, and an alert rule evaluated by promtool",
    );
    let mut last_success = Vec::new();
    for p in &chart_pods.items {
        let name = p.metadata.name.clone().unwrap_or_default();
        let ip = p
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .unwrap_or_default();
        let addr: std::net::SocketAddr = format!("{ip}:9090").parse()?;
        let (_, text) = stowage_tests::http_get(addr, "/metrics")
            .await
            .context("scraping a chart pod")?;
        println!("    http://{addr}/metrics ({name})");
        for l in text.lines().filter(|l| {
            l.starts_with("stowage_agent_backups_total{result=\"succeeded\"}")
                || l.starts_with("stowage_agent_restores_total{result=\"succeeded\"}")
                || l.starts_with("stowage_agent_last_success_timestamp_seconds{")
                || l.starts_with("stowage_coordinator_leader ")
                || l.starts_with("stowage_schedule_period_seconds{action=\"backup\"")
        }) {
            println!("      {l}");
            if l.starts_with("stowage_agent_last_success_timestamp_seconds{") {
                last_success.push(l.to_string());
            }
        }
    }
    let first = last_success
        .first()
        .context("no volume reported a successful backup")?;
    let labels = first
        .split_once('{')
        .and_then(|(_, r)| r.split_once('}'))
        .map(|(l, _)| l.to_string())
        .context("labels")?;
    alert_fires(cluster, &labels)?;

    let with_real_node = cluster.env.contains_key("STOWAGE_REAL_NODE");
    if with_real_node {
        real_node(cluster).await?;
    }

    step(if with_real_node { 9 } else { 8 }, "where to look");
    println!(
        "    kubectl -n {NS} get schedules,backups,checks,restores    (KUBECONFIG={})",
        cluster.kubeconfig().display()
    );
    println!(
        "    chart pods' logs:    {}",
        cluster.dir.join("logs/pods").display()
    );
    println!(
        "    control plane logs:  {}",
        cluster.dir.join("logs").display()
    );
    println!("\ndemo succeeded");
    Ok(())
}

/// Renders the chart's alert rules and has promtool evaluate StowageVolumeBackupStale for the volume
/// with `labels` (as scraped): quiet one day after its backup, firing three days after, with the
/// Schedule's daily period.
fn alert_fires(cluster: &Cluster, labels: &str) -> anyhow::Result<()> {
    let root = stowage_tests::workspace_root();
    let helm = cluster
        .env
        .get("STOWAGE_HELM")
        .cloned()
        .context("STOWAGE_HELM not set by helm-up")?;
    let out = Command::new(helm)
        .args([
            "template",
            "stowage",
            &root.join("deploy/daemonset").display().to_string(),
        ])
        .args([
            "--set",
            "prometheusRule.enabled=true",
            "--show-only",
            "templates/prometheusrule.yaml",
        ])
        .output()?;
    if !out.status.success() {
        bail!("helm template: {}", String::from_utf8_lossy(&out.stderr));
    }
    let rendered = String::from_utf8_lossy(&out.stdout);
    let rules: String = rendered
        .lines()
        .skip_while(|l| !l.starts_with("spec:"))
        .skip(1)
        .map(|l| format!("{}\n", l.strip_prefix("  ").unwrap_or(l)))
        .collect();
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("rules.yaml"), rules)?;
    let ns = labels
        .split(',')
        .find_map(|kv| kv.strip_prefix("namespace="))
        .map(|v| v.trim_matches('"').to_string())
        .context("namespace label")?;
    let pvc = labels
        .split(',')
        .find_map(|kv| kv.strip_prefix("pvc="))
        .map(|v| v.trim_matches('"').to_string())
        .context("pvc label")?;
    let test = format!(
        r#"rule_files: [rules.yaml]
evaluation_interval: 5m
tests:
  - interval: 1m
    input_series:
      - series: 'stowage_agent_last_success_timestamp_seconds{{{labels}}}'
        values: '0x4400'
      - series: 'stowage_schedule_period_seconds{{namespace="{ns}",schedule="nightly",action="backup"}}'
        values: '86400x4400'
    alert_rule_test:
      - eval_time: 1d
        alertname: StowageVolumeBackupStale
        exp_alerts: []
      - eval_time: 3d
        alertname: StowageVolumeBackupStale
        exp_alerts:
          - exp_labels: {{severity: warning, namespace: "{ns}", pvc: "{pvc}"}}
            exp_annotations:
              summary: "{ns}/{pvc} has had no successful backup for 2 schedule periods"
              description: "The newest successful backup of PVC {pvc} in {ns} is 3d 0h 0m 0s old."
              runbook_url: https://github.com/stowage-dev/stowage/blob/main/docs/alerts.md#stowagevolumebackupstale
"#
    );
    std::fs::write(dir.path().join("demo.test.yaml"), test)?;
    let out = Command::new("promtool")
        .args(["test", "rules", "demo.test.yaml"])
        .current_dir(dir.path())
        .output()?;
    println!(
        "    promtool test rules: StowageVolumeBackupStale for {ns}/{pvc} (backed up at t=0, daily schedule)"
    );
    println!("      1 day later: quiet; 3 days later: FIRING (severity warning)");
    if !out.status.success() {
        bail!(
            "promtool did not see the alert fire: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    println!(
        "      promtool: {}",
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or("")
            .trim()
    );
    Ok(())
}

/// `scripts/demo --real-node`: Stowage's own images on a real kubelet and containerd, in a release
/// of its own there, backing up a CSI volume and restoring it in place under a running container.
async fn real_node(cluster: &'static Cluster) -> anyhow::Result<()> {
    use stowage_tests::real_node::{RealNode, container};
    step(
        8,
        "the real node: kubelet 1.34 with containerd and runc, Stowage's images from scripts/build-images",
    );
    let t = Instant::now();
    let rn = RealNode::install(cluster, "demo-real").await;
    println!(
        "    helm install on {} in {:.1}s",
        rn.node,
        t.elapsed().as_secs_f64()
    );
    for p in Api::<Pod>::namespaced(rn.client.clone(), &rn.sys)
        .list(&ListParams::default())
        .await?
        .items
    {
        let id = p
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .and_then(|c| c.container_id.clone())
            .unwrap_or_else(|| "-".into());
        println!(
            "    {:<44} {:<52} {}",
            p.metadata.name.clone().unwrap_or_default(),
            p.spec
                .as_ref()
                .map(|s| s.containers[0].image.clone().unwrap_or_default())
                .unwrap_or_default(),
            &id[..id.len().min(25)]
        );
    }
    rn.pvc("notes", "demo").await;
    let pod = rn
        .pod(
            "notes",
            "notes",
            "echo 'first note' > /data/notes.txt && exec sleep 100000",
            serde_json::json!({}),
        )
        .await;
    println!(
        "    pod notes runs on {} with a PVC of the CSI driver local.csi.stowage.dev",
        rn.node
    );
    let b = rn.backup("notes-1", "notes", "demo").await;
    anyhow::ensure!(
        b["status"]["phase"] == "Succeeded",
        "the real-node backup: {b:#}"
    );
    println!(
        "    Backup notes-1: {} ({} files)",
        b["status"]["phase"], b["status"]["items"][0]["filesNew"]
    );
    rn.exec("notes", "echo 'overwritten by mistake' > /data/notes.txt");
    let r = rn.restore("notes-undo", "notes", "notes", "Replace").await;
    anyhow::ensure!(
        r["status"]["phase"] == "Succeeded",
        "the real-node restore: {r:#}"
    );
    let now = rn.exec("notes", "cat /data/notes.txt");
    anyhow::ensure!(now == "first note\n", "restored content: {now:?}");
    let after = Api::<Pod>::namespaced(rn.client.clone(), &rn.app)
        .get("notes")
        .await?;
    anyhow::ensure!(
        container(&after) == container(&pod),
        "the container was restarted"
    );
    println!(
        "    restored in place (Replace): notes.txt says \"first note\" again, same container {}",
        &container(&after).0[..25]
    );
    rn.delete_pod("notes").await;
    Ok(())
}
