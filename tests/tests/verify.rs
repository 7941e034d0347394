//! Verify runs on the shared cluster (real restic, the cluster's agents, a coordinator of the
//! test's own): drills of a Schedule's volumes and backup command spread over the nodes, the
//! Schedule's `Verified` condition and the last-verified metrics, and a damaged pack made loud.
//!
//! Length: one suite, one file; each test is a scenario against the shared cluster.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{Patch, PatchParams};
use stowage_api::{Backup, Schedule, Verify};
use stowage_tests::coordinator::{condition, create, fired_metadata, wait_event, wait_json};
use stowage_tests::env::TestEnv;
use stowage_tests::fstree;

const DUMP: &str = "printf 'the dump of app0\\n'";

/// A Verify owned by Schedule `schedule` (as a fired one is), awaited.
async fn owned_verify(env: &TestEnv, schedule: &str, name: &str) -> serde_json::Value {
    let metadata = fired_metadata(&env.client, &env.ns, schedule, "verify", name).await;
    let _: Verify = env
        .create(
            serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Verify",
            "metadata": metadata, "spec": {"scheduleRef": {"name": schedule}}}),
        )
        .await;
    env.wait_run::<Verify>(name, Duration::from_secs(180)).await
}

fn item<'a>(v: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    v["status"]["items"]
        .as_array()
        .and_then(|items| {
            items
                .iter()
                .find(|i| i["pvc"] == name || i["command"]["owner"] == name)
        })
        .unwrap_or_else(|| panic!("no item {name} in {v:#}"))
}

/// Long (~60 s): a backup, a drill of four identities on the nodes, then a drill of a damaged
/// repository, each through the coordinator and the agents.
#[tokio::test]
async fn drills_over_three_nodes_succeed_and_move_the_metrics_then_a_damaged_pack_fails_loudly() {
    let env = TestEnv::new("verify").await;
    let repo = env.repo();
    for (i, node) in ["node-1", "node-2", "node-3"].iter().enumerate() {
        let dir = env.volume(&format!("app{i}-0"), &format!("data{i}"), node, &[]);
        fstree::write_random(&dir.join("blob"), 2 << 20, i as u64 + 11);
        std::fs::write(dir.join("small.txt"), format!("volume {i}\n")).expect("write");
    }
    Api::<Pod>::namespaced(env.client.clone(), &env.ns)
        .patch(
            "app0-0",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"metadata": {"annotations": {
                "stowage.dev/backup-command": DUMP}}})),
        )
        .await
        .expect("annotate");
    let coordinator = env.coordinator().await;
    let _: Schedule = env
        .create(
            serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Schedule",
            "metadata": {"name": "nightly"},
            "spec": {"backend": env.local_backend(),
                     "backup": {"schedule": "@weekly"},
                     "verify": {"schedule": "@weekly-random", "sampleBytes": "64Mi"}}}),
        )
        .await;
    let b = env
        .run::<Backup>(
            "first",
            serde_json::json!({"scheduleRef": {"name": "nightly"}}),
            Duration::from_secs(120),
        )
        .await;
    assert_eq!(b["status"]["phase"], "Succeeded", "{b:#}");

    let v = owned_verify(&env, "nightly", "verify-1").await;
    assert_eq!(v["status"]["phase"], "Succeeded", "{v:#}");
    let items = v["status"]["items"].as_array().expect("items");
    assert_eq!(items.len(), 4, "three volumes and one command: {v:#}");
    let nodes: BTreeSet<&str> = items.iter().filter_map(|i| i["node"].as_str()).collect();
    assert!(
        nodes.len() >= 3,
        "the drills were spread over the nodes: {nodes:?}"
    );
    for i in 0..3 {
        let it = item(&v, &format!("data{i}"));
        let ver = &it["verification"];
        assert_eq!(ver["files"], 2, "{it:#}");
        assert_eq!(ver["bytes"], (2 << 20) + 9, "{it:#}");
        assert_eq!(
            ver["complete"], true,
            "64Mi holds the whole snapshot: {it:#}"
        );
        assert!(
            it["snapshotId"].as_str().is_some_and(|s| s.len() == 64),
            "{it:#}"
        );
    }
    let cmd = item(&v, "Pod/app0-0");
    let expected = {
        use std::io::Write;
        let mut child = std::process::Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sha256sum");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(b"the dump of app0\n")
            .expect("write");
        let out = child.wait_with_output().expect("sha256sum");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .expect("hash")
            .to_string()
    };
    assert_eq!(cmd["verification"]["sha256"], expected.as_str(), "{cmd:#}");
    assert_eq!(cmd["verification"]["bytes"], 17, "{cmd:#}");

    let sched = wait_json::<Schedule>(
        &env.client,
        &env.ns,
        "nightly",
        Duration::from_secs(30),
        "Verified=True",
        |s| condition(s, "Verified").is_some_and(|c| c["status"] == "True"),
    )
    .await;
    assert!(
        sched["status"]["nextRuns"]["verify"].as_str().is_some(),
        "{sched:#}"
    );
    let ns = &env.ns;
    for i in 0..3 {
        let series = format!(
            "stowage_volume_last_verified_timestamp_seconds{{namespace=\"{ns}\",pvc=\"data{i}\"}}"
        );
        assert!(
            coordinator.metric(&series).await.is_some_and(|t| t > 1.7e9),
            "{series}"
        );
    }
    let command_series = format!(
        "stowage_command_last_verified_timestamp_seconds{{container=\"app\",namespace=\"{ns}\",owner=\"Pod/app0-0\"}}"
    );
    assert!(
        coordinator.metric(&command_series).await.is_some(),
        "{}",
        coordinator.metrics_text().await
    );
    assert_eq!(
        coordinator
            .metric("stowage_verify_runs_total{result=\"succeeded\"}")
            .await,
        Some(1.0)
    );
    let success =
        format!("stowage_schedule_verify_success{{namespace=\"{ns}\",schedule=\"nightly\"}}");
    assert_eq!(coordinator.metric(&success).await, Some(1.0));
    assert!(
        coordinator
            .metric("stowage_verify_bytes_total")
            .await
            .is_some_and(|b| b >= (3 * (2 << 20)) as f64)
    );

    // A failing disk damages a pack: the next drill fails, naming the snapshot, and the Schedule
    // says so.
    stowage_tests::restic::damage_largest_pack(&repo);
    let v = owned_verify(&env, "nightly", "verify-2").await;
    assert_ne!(v["status"]["phase"], "Succeeded", "{v:#}");
    let failed: Vec<&serde_json::Value> = v["status"]["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|i| i["phase"] == "Failed")
        .collect();
    assert!(!failed.is_empty(), "{v:#}");
    for f in &failed {
        let e = f["error"].as_str().unwrap_or_default();
        assert!(
            e.contains("did not come back") && e.contains("snapshot "),
            "the error names the snapshot: {e}"
        );
    }
    let sched = wait_json::<Schedule>(
        &env.client,
        &env.ns,
        "nightly",
        Duration::from_secs(30),
        "Verified=False",
        |s| condition(s, "Verified").is_some_and(|c| c["status"] == "False"),
    )
    .await;
    let c = condition(&sched, "Verified").expect("condition");
    assert_eq!(c["reason"], "VerifyFailed", "{c}");
    assert!(
        c["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("Verify verify-2: ")),
        "{c}"
    );
    wait_event(
        &env.client,
        &env.ns,
        "nightly",
        "VerifyFailed",
        "Verify verify-2",
        Duration::from_secs(20),
    )
    .await;
    assert!(
        coordinator
            .metric("stowage_verify_runs_total{result=\"partially_failed\"}")
            .await
            .unwrap_or(0.0)
            + coordinator
                .metric("stowage_verify_runs_total{result=\"failed\"}")
                .await
                .unwrap_or(0.0)
            >= 1.0
    );
    let success =
        format!("stowage_schedule_verify_success{{namespace=\"{ns}\",schedule=\"nightly\"}}");
    assert_eq!(coordinator.metric(&success).await, Some(0.0));
    stowage_tests::promtool_check(&coordinator.metrics_text().await);
}

#[tokio::test]
async fn a_bad_sample_bound_fails_the_run_naming_the_field() {
    let env = TestEnv::new("verify-bad").await;
    let _c = env.coordinator().await;
    let v = env
        .run::<Verify>(
            "bad",
            serde_json::json!({"backend": env.local_backend(), "sampleBytes": "lots"}),
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(v["status"]["phase"], "Failed", "{v:#}");
    let c = condition(&v, "Succeeded").expect("condition");
    assert_eq!(c["reason"], "InvalidSampleBytes", "{c}");
    assert!(
        c["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("spec.sampleBytes: \"lots\" is not a byte quantity")),
        "{c}"
    );
    wait_event(
        &env.client,
        &env.ns,
        "bad",
        "InvalidSampleBytes",
        "spec.sampleBytes",
        Duration::from_secs(20),
    )
    .await;
    // A Schedule with the same mistake is not Ready, naming its field.
    let _: Schedule = create(
        &env.client,
        &env.ns,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Schedule",
            "metadata": {"name": "weekly"},
            "spec": {"backend": env.local_backend(),
                     "verify": {"schedule": "@weekly", "sampleBytes": "10Ki"}}}),
    )
    .await;
    let s = wait_json::<Schedule>(
        &env.client,
        &env.ns,
        "weekly",
        Duration::from_secs(30),
        "Ready=False",
        |s| condition(s, "Ready").is_some_and(|c| c["status"] == "False"),
    )
    .await;
    let m = condition(&s, "Ready").expect("Ready")["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        m.contains("spec.verify.sampleBytes: \"10Ki\" is less than 1Mi"),
        "{m}"
    );
}

/// Two hand-made drills with a 1 MiB sample of an 8-file volume: each reads two files, and the second
/// starts where the first ended (the coordinator finds the first run's window), so they read
/// different files.
#[tokio::test]
async fn a_sampled_drill_moves_on_from_where_the_previous_run_ended() {
    let env = TestEnv::new("verify-sample").await;
    let dir = env.volume("app-0", "data", "node-2", &[]);
    for i in 0..8 {
        fstree::write_random(&dir.join(format!("f{i}")), 512 << 10, 70 + i);
    }
    let _c = env.coordinator().await;
    let b = env
        .run::<Backup>(
            "first",
            serde_json::json!({"backend": env.local_backend()}),
            Duration::from_secs(120),
        )
        .await;
    assert_eq!(b["status"]["phase"], "Succeeded", "{b:#}");
    // A PVC made after the backup has nothing to drill yet: skipped, not failed.
    let fresh = env.volume("fresh-0", "fresh", "node-1", &[]);
    std::fs::write(fresh.join("new.txt"), b"new").expect("write");
    let mut windows = Vec::new();
    for name in ["sample-1", "sample-2"] {
        let v = env
            .run::<Verify>(
                name,
                serde_json::json!({"backend": env.local_backend(), "sampleBytes": "1Mi"}),
                Duration::from_secs(120),
            )
            .await;
        assert_eq!(v["status"]["phase"], "Succeeded", "{v:#}");
        let fresh = item(&v, "fresh");
        assert_eq!(fresh["phase"], "Skipped", "{fresh:#}");
        assert_eq!(fresh["reason"], "NoSnapshot", "{fresh:#}");
        let ver = item(&v, "data")["verification"].clone();
        assert_eq!(ver["files"], 2, "{ver:#}");
        assert_eq!(ver["bytes"], 1 << 20, "{ver:#}");
        assert_eq!(ver["complete"], false, "{ver:#}");
        assert_eq!(ver["snapshotFiles"], 8, "{ver:#}");
        windows.push((
            ver["first"].as_str().unwrap_or_default().to_string(),
            ver["last"].as_str().unwrap_or_default().to_string(),
        ));
    }
    assert_eq!(
        windows[0],
        ("/f0".to_string(), "/f1".to_string()),
        "{windows:?}"
    );
    assert_eq!(
        windows[1],
        ("/f2".to_string(), "/f3".to_string()),
        "{windows:?}"
    );
}
