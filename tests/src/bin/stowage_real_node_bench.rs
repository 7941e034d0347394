//! A 1 GiB backup through the agent as it really runs (the chart's agent container on the test
//! cluster's real node: containerd, runc, the image from scripts/build-images) against bare restic on
//! the same data and the same disk, in rounds, each into a fresh repository.
//!
//! The data is one file of incompressible bytes in a PVC of the CSI driver, written by a pod. The
//! agent's figure is restic's own time inside the agent container (the item's `durationSeconds`);
//! the end-to-end time (Backup created to finished, with the coordinator's dispatch) is printed
//! beside it. Bare restic backs up the same directory from the host. Both repositories are
//! initialised beforehand, so neither figure includes `init`.
//! Runs against the cluster in $STOWAGE_CLUSTER_DIR (scripts/bench starts one with --real-node).

use std::time::{Duration, Instant};

use stowage_tests::bench::{Row, print_table};
use stowage_tests::real_node::{PASSWORD, RealNode};

const ROUNDS: usize = 3;
const GIB: u64 = 1 << 30;

#[tokio::main]
async fn main() {
    let rn = RealNode::install(stowage_tests::cluster::Cluster::shared(), "bench-rn").await;
    rn.pvc("big", "big").await;
    let pod = rn
        .pod("big", "big", "exec sleep 100000", serde_json::json!({}))
        .await;
    let t = Instant::now();
    rn.exec("big", &format!("head -c {GIB} /dev/urandom > /data/big"));
    eprintln!("wrote 1 GiB in {:?}", t.elapsed());
    let pv = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .and_then(|v| v[0].persistent_volume_claim.as_ref())
        .map(|c| c.claim_name.clone())
        .expect("claim");
    let volume_name = kube::Api::<k8s_openapi::api::core::v1::PersistentVolumeClaim>::namespaced(
        rn.client.clone(),
        &rn.app,
    )
    .get(&pv)
    .await
    .expect("pvc")
    .spec
    .and_then(|s| s.volume_name)
    .expect("bound");
    let data = std::path::Path::new(&rn.cluster.env["STOWAGE_REAL_NODE_VOLUMES"]).join(volume_name);
    assert_eq!(
        std::fs::metadata(data.join("big")).expect("the data").len(),
        GIB
    );

    let (mut agent, mut e2e, mut bare) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let repo = rn.repo_on_host(&format!("agent-{round}"));
        std::fs::create_dir_all(repo.parent().expect("parent")).expect("mkdir");
        stowage_tests::restic::init(&repo, PASSWORD);
        let t = Instant::now();
        let b = rn
            .backup(&format!("big-{round}"), &format!("agent-{round}"), "big")
            .await;
        e2e.push(t.elapsed().as_secs_f64());
        assert_eq!(b["status"]["phase"], "Succeeded", "{b:#}");
        agent.push(
            b["status"]["items"][0]["durationSeconds"]
                .as_f64()
                .expect("durationSeconds"),
        );

        let repo = rn.repo_on_host(&format!("bare-{round}"));
        stowage_tests::restic::init(&repo, PASSWORD);
        let t = Instant::now();
        let out = std::process::Command::new(stowage_tests::restic::binary())
            .args(["-r", &repo.display().to_string(), "backup", "--quiet", "."])
            .current_dir(&data)
            .env("RESTIC_PASSWORD", PASSWORD)
            .output()
            .expect("restic");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        bare.push(t.elapsed().as_secs_f64());
        eprintln!(
            "round {round}: agent {:.2}s (end to end {:.2}s), bare restic {:.2}s",
            agent[round], e2e[round], bare[round]
        );
        std::fs::remove_dir_all(rn.repo_on_host(&format!("agent-{round}"))).ok();
        std::fs::remove_dir_all(&repo).ok();
    }
    let median = |v: &Vec<f64>| stowage_tests::bench::percentile(v.clone(), 0.5);
    let (a, e, b) = (median(&agent), median(&e2e), median(&bare));
    let ratio = b / a;
    print_table(&[
        Row {
            what: "1 GiB backup, restic in the agent container (median)".into(),
            value: format!("{a:.2} s ({:.0} MiB/s)", 1024.0 / a),
            target: "".into(),
            ok: true,
        },
        Row {
            what: "1 GiB backup, Backup created to finished (median)".into(),
            value: format!("{e:.2} s"),
            target: "".into(),
            ok: true,
        },
        Row {
            what: "1 GiB backup, bare restic on the host (median)".into(),
            value: format!("{b:.2} s ({:.0} MiB/s)", 1024.0 / b),
            target: "".into(),
            ok: true,
        },
        Row {
            what: "throughput through the agent container / bare restic".into(),
            value: format!("{ratio:.3}"),
            target: ">= 0.95".into(),
            ok: ratio >= 0.95,
        },
    ]);
    rn.delete_pod("big").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
}
