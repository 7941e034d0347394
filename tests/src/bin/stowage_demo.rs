//! `stowage-demo`: the agent half of the demo, against a cluster from `tests/cluster/up --stowage`.
//! Until the coordinator exists, this program plays its part: it finds the pods' volumes through the
//! Kubernetes API and asks each node's agent, over mutual TLS, to back them up and restore one file.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::Api;
use stowage_proto::v1::{self, RestoreMode, RestoreRequest, VolumeIdentity, VolumeRef};
use stowage_tests::agent::{backup, restore};
use stowage_tests::cluster::{Cluster, pod_running, pvc_bound, wait_for};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const NS: &str = "demo-shop";
const APPS: [(&str, &str, &str); 3] = [
    ("postgres-0", "data-postgres-0", "node-1"),
    ("redis-0", "data-redis-0", "node-2"),
    ("uploads-0", "uploads", "node-3"),
];

fn step(n: usize, what: &str) {
    println!("\n[{n}] {what}");
}

async fn agent_client(
    cluster: &Cluster,
    node: &str,
) -> anyhow::Result<v1::agent_client::AgentClient<Channel>> {
    let k = node.trim_start_matches("node-");
    let addr = cluster
        .env
        .get(&format!("STOWAGE_AGENT_{k}_GRPC"))
        .context("agent address in cluster env")?;
    let read =
        |key: &str| std::fs::read_to_string(&cluster.env[key]).with_context(|| key.to_string());
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("STOWAGE_TLS_CA")?))
        .identity(Identity::from_pem(
            read("STOWAGE_COORDINATOR_CERT")?,
            read("STOWAGE_COORDINATOR_KEY")?,
        ))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(v1::agent_client::AgentClient::new(channel))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cluster = Cluster::shared();
    let client = cluster.client().await;
    let repo_dir = cluster.dir.join("repository");
    let repo = v1::Repository {
        backend: Some(v1::repository::Backend::Local(v1::LocalBackend {
            path: repo_dir.display().to_string(),
        })),
        password: "demo-password-change-me".into(),
        auto_init: true,
        ..Default::default()
    };

    step(
        1,
        "three application pods on three nodes, each with a PVC holding data",
    );
    let mut backing = BTreeMap::new();
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
    for (pod, pvc, _) in APPS {
        wait_for(
            &format!("{pod} Running with {pvc} bound"),
            Duration::from_secs(60),
            || async { pod_running(&pods, pod).await && pvc_bound(&pvcs, pvc).await },
        )
        .await;
    }

    step(
        2,
        "each node's agent backs up the volumes of its own pods (read from the kubelet directory)",
    );
    let mut summary = Vec::new();
    for (pod, pvc, node) in APPS {
        let p = pods.get(pod).await?;
        let uid = p.metadata.uid.context("pod uid")?;
        let pv = pvcs
            .get(pvc)
            .await?
            .spec
            .and_then(|s| s.volume_name)
            .context("bound PV")?;
        let mut agent = agent_client(cluster, node).await?;
        // The kubelet emulator mounts the volume a moment after the pod starts; the agent sees it
        // through mountinfo.
        let req = stowage_tests::agent::volume_backup(repo.clone(), &uid, &pv, NS, pvc);
        let started = Instant::now();
        let mut out = backup(&mut agent, req.clone()).await;
        while matches!(&out.result, Err(s) if s.code() == tonic::Code::NotFound)
            && started.elapsed() < Duration::from_secs(20)
        {
            tokio::time::sleep(Duration::from_millis(300)).await;
            out = backup(&mut agent, req.clone()).await;
        }
        let r = out
            .result
            .with_context(|| format!("backup of {pvc} on {node}"))?;
        if r.outcome() != v1::Outcome::Succeeded {
            bail!("backup of {pvc} did not succeed: {r:?}");
        }
        summary.push((pvc, node, r));
    }
    println!(
        "\n    {:<18} {:<7} {:<10} {:>6} {:>10} {:>9}",
        "PVC", "NODE", "SNAPSHOT", "FILES", "BYTES", "SECONDS"
    );
    for (pvc, node, r) in &summary {
        println!(
            "    {:<18} {:<7} {:<10} {:>6} {:>10} {:>9.2}",
            pvc,
            node,
            &r.snapshot_id[..8.min(r.snapshot_id.len())],
            r.files_new + r.files_changed + r.files_unmodified,
            r.total_bytes_processed,
            r.duration_seconds
        );
    }

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
    let pv = pvcs
        .get(pvc)
        .await?
        .spec
        .and_then(|s| s.volume_name)
        .context("PV")?;
    let mut agent = agent_client(cluster, node).await?;
    let r = restore(
        &mut agent,
        RestoreRequest {
            run_id: "demo/undo-delete".into(),
            repository: Some(repo.clone()),
            source: Some(VolumeIdentity {
                namespace: NS.into(),
                pvc: pvc.into(),
                pod_name: String::new(),
            }),
            snapshot: "latest".into(),
            include: vec!["conf/settings.ini".into()],
            target: Some(VolumeRef {
                pod_uid: uid_before.clone(),
                volume_name: pv,
            }),
            mode: RestoreMode::Merge.into(),
            ..Default::default()
        },
    )
    .await
    .result
    .context("restore")?;
    let back = std::fs::read(&victim).context("the file is back")?;
    if back != original {
        bail!("restored content differs");
    }
    let uid_after = pods.get(pod).await?.metadata.uid.context("uid")?;
    if uid_after != uid_before {
        bail!("the pod was recreated");
    }
    println!(
        "    restored from snapshot {} on {node}: conf/settings.ini is back, byte for byte; pod {pod} kept running (same UID)",
        &r.snapshot_id[..8]
    );

    step(4, "where to look");
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
    println!(
        "    control plane logs: {}",
        cluster.dir.join("logs").display()
    );
    println!("\ndemo succeeded");
    Ok(())
}
