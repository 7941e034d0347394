//! A backup command's 1 GiB stream through the whole path (Backup object → coordinator → agent →
//! exec through kube-apiserver → kwok runs `head -c 1GiB /dev/urandom` → stdout streamed into
//! `restic backup --stdin` in the sandbox), against the same restic fed from a local pipe.
//!
//! Reports the agent's peak RSS while it streams (sampled every 20 ms, and its VmHWM), and the
//! throughput ratio (direct restic time ÷ the agent's time for the item). Runs against the cluster
//! in $STOWAGE_CLUSTER_DIR (scripts/bench starts one); rounds: $STOWAGE_BENCH_ROUNDS (default 3).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{Patch, PatchParams};
use stowage_api::Backup;
use stowage_tests::cluster::{Cluster, fresh_namespace};
use stowage_tests::coordinator::{
    Coordinator, CoordinatorOptions, create, finished, local_backend, secret, wait_json,
};

const PASSWORD: &str = "bench";
const BYTES: u64 = 1 << 30;

/// A status field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Wall time of the same stream into a bare restic from a local pipe.
fn direct(repo: &Path) -> f64 {
    let restic = stowage_tests::restic::binary();
    let started = Instant::now();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c {BYTES} /dev/urandom | '{}' -r '{}' backup --stdin --stdin-filename direct.bin --json -q",
            restic.display(),
            repo.display()
        ))
        .env("RESTIC_PASSWORD", PASSWORD)
        .output()
        .expect("direct restic");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let cluster = Cluster::shared();
    let client = cluster.client().await;
    let ns = fresh_namespace(&client, "streambench").await;
    secret(&client, &ns, "backup-repo", &[("password", PASSWORD)]).await;
    let repo = cluster.dir.join("repos").join(&ns);
    stowage_tests::restic::init(&repo, PASSWORD);
    cluster.volume(&ns, "db-0", "data-db-0", "node-1", &[]);
    let command = format!("head -c {BYTES} /dev/urandom");
    let patch = serde_json::json!({"metadata": {"annotations": {
        "stowage.dev/backup-command": command, "stowage.dev/file-extension": ".bin"}}});
    Api::<Pod>::namespaced(client.clone(), &ns)
        .patch("db-0", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("annotate");
    let agent_pid: u32 = std::fs::read_to_string(cluster.dir.join("pids/agent-node-1"))
        .expect("agent pid file")
        .trim()
        .parse()
        .expect("agent pid");
    let _c = Coordinator::start(cluster, CoordinatorOptions::new(&ns)).await;
    let rounds: usize = std::env::var("STOWAGE_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let idle_rss = status_kib(agent_pid, "VmRSS");
    let (mut agent_secs, mut direct_secs, mut peaks) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let peak = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (peak, done) = (Arc::clone(&peak), Arc::clone(&done));
            std::thread::spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    peak.fetch_max(status_kib(agent_pid, "VmRSS"), Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        let name = format!("stream-{round}");
        let _: Backup = create(
            &client,
            &ns,
            serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Backup",
                "metadata": {"name": name}, "spec": {"backend": local_backend(&repo)}}),
        )
        .await;
        let b = wait_json::<Backup>(
            &client,
            &ns,
            &name,
            Duration::from_secs(600),
            "finished",
            finished,
        )
        .await;
        done.store(true, Ordering::SeqCst);
        let _ = sampler.join();
        let item = b["status"]["items"]
            .as_array()
            .and_then(|i| i.iter().find(|i| i["command"].is_object()).cloned())
            .unwrap_or_else(|| panic!("no command item: {b:#}"));
        assert_eq!(item["phase"], "Succeeded", "{item:#}");
        assert_eq!(item["command"]["streamBytes"], BYTES, "{item:#}");
        agent_secs.push(item["durationSeconds"].as_f64().unwrap_or(0.0));
        peaks.push(peak.load(Ordering::SeqCst) as f64 / 1024.0);
        direct_secs.push(direct(&repo));
    }
    let hwm = status_kib(agent_pid, "VmHWM") as f64 / 1024.0;
    let (a, d) = (median(agent_secs), median(direct_secs));
    let peak = peaks.iter().copied().fold(0.0, f64::max);
    println!("| benchmark | value | target |");
    println!("|---|---|---|");
    println!(
        "| backup command, 1 GiB stream: agent RSS peak while streaming (idle {:.1} MiB; VmHWM over the agent's life {hwm:.1} MiB) (MiB) | {peak:.1} | < 64 |",
        idle_rss as f64 / 1024.0
    );
    println!(
        "| backup command, 1 GiB stream: throughput, `restic backup --stdin` from a local pipe ÷ through the agent (direct {d:.2} s / agent {a:.2} s) | {:.3} | reported |",
        d / a
    );
}
