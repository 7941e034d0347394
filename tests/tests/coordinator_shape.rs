//! The coordinator's shape (issue: runs that carry their own spec, state from watches, one writer,
//! bounded everything), against the local control plane with real agents and real restic.
//!
//! Length: one suite, one file; each test is a scenario against the shared cluster.

use std::ops::Deref;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use stowage_api::{Backup, ItemStatus, RunPhase, RunStatus, Schedule};
use stowage_coordinator::leader::{self, Elector};
use stowage_coordinator::run::status::StatusWriter;
use stowage_tests::coordinator::{
    Coordinator, condition, create, local_backend, partly_done, secret, wait_json,
};
use stowage_tests::env::{PASSWORD, TestEnv};
use stowage_tests::restic;

/// The shared test environment.
struct Env(TestEnv);

impl Deref for Env {
    type Target = TestEnv;
    fn deref(&self) -> &TestEnv {
        &self.0
    }
}

async fn setup(prefix: &str) -> Env {
    Env(TestEnv::new(prefix).await)
}

impl Env {
    /// Creates Backup `name` into the local repository `repo`.
    async fn create_backup(&self, name: &str, repo: &std::path::Path) -> Backup {
        self.create_run(name, serde_json::json!({"backend": local_backend(repo)}))
            .await
    }

    /// Waits (at most `secs`) for run `name` to finish; returns its JSON.
    async fn finished(&self, name: &str, secs: u64) -> serde_json::Value {
        self.wait_run::<Backup>(name, Duration::from_secs(secs))
            .await
    }
}

fn snapshots_of(repo: &std::path::Path, pvc: &str) -> Vec<serde_json::Value> {
    restic::snapshots(&repo.display().to_string(), PASSWORD)
        .into_iter()
        .filter(|s| {
            s["tags"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t == &format!("stowage.dev/pvc={pvc}")))
        })
        .collect()
}

/// The first run the Schedule fires (by label), waiting at most 100 s (a per-minute cron).
async fn fired_run(env: &Env, label: &str) -> Backup {
    let backups: Api<Backup> = Api::namespaced(env.client.clone(), &env.ns);
    let lp = ListParams::default().labels(&format!("stowage.dev/schedule={label}"));
    let deadline = Instant::now() + Duration::from_secs(100);
    loop {
        if let Some(r) = backups.list(&lp).await.expect("list").items.first() {
            return r.clone();
        }
        assert!(Instant::now() < deadline, "no fired run within 100 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A fired run carries its Schedule's backend and selector; editing the Schedule while the run is
/// interrupted (coordinator killed) changes nothing about what the resumed run does. The Schedule's
/// name is long: the run's name and labels stay within Kubernetes' limits.
///
/// Long (~70 s): it waits for a per-minute cron to fire, then for throttled (1 MiB/s) backups that are interrupted and resumed.
#[tokio::test]
async fn a_fired_run_keeps_what_it_was_fired_with_when_the_schedule_changes() {
    let env = setup("fired").await;
    // Distinct data (no deduplication between them), 4 MiB each at 1 MiB/s: seconds per volume.
    for (seed, pvc) in ["one", "two"].into_iter().enumerate() {
        let dir = env.cluster.volume(
            &env.ns,
            &format!("{pvc}-0"),
            pvc,
            "node-1",
            &["--label", "tier=gold"],
        );
        stowage_tests::fstree::write_random(&dir.join("big"), 4 << 20, 100 + seed as u64);
    }
    let original = env.repo_named("original");
    let elsewhere = env.repo_named("elsewhere");
    let name = format!(
        "{}-nightly",
        "postgres-primary-database-offsite-s3-replica".repeat(4)
    );
    let mut backend = local_backend(&original);
    backend["limitUploadKiB"] = serde_json::json!(1024);
    let _: Schedule = create(
        &env.client,
        &env.ns,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Schedule",
            "metadata": {"name": name},
            "spec": {"backend": backend,
                     "backup": {"schedule": "* * * * *",
                                "selector": {"matchLabels": {"tier": "gold"}},
                                "concurrency": {"cluster": 1}}}}),
    )
    .await;
    let mut first = Coordinator::start(env.cluster, env.coordinator_options("first")).await;
    let label = stowage_common::names::label_value(&name);
    let run = fired_run(&env, &label).await;
    let run_name = run.metadata.name.clone().expect("name");
    assert!(run_name.len() <= 253, "{run_name}");
    assert!(run_name.contains("-backup-"), "{run_name}");
    let labels = run.metadata.labels.clone().unwrap_or_default();
    assert!(labels.values().all(|v| v.len() <= 63), "{labels:?}");
    assert_eq!(
        run.metadata.annotations.unwrap_or_default()["stowage.dev/schedule-full"],
        name
    );
    // What the run was fired with is in its own spec.
    let spec = &run.spec;
    assert_eq!(
        spec.backend
            .as_ref()
            .and_then(|b| b.local.as_ref())
            .map(|l| l.path.clone()),
        Some(original.display().to_string())
    );
    assert_eq!(
        spec.selector
            .as_ref()
            .and_then(|s| s.match_labels.clone())
            .unwrap_or_default()["tier"],
        "gold"
    );
    assert_eq!(spec.backend.as_ref().and_then(|b| b.initialize), Some(true));
    assert!(
        run.status.as_ref().is_none_or(|s| s.resolved.is_none()),
        "a fired run resolves nothing"
    );

    // One volume done, the run still going: kill the coordinator, then change the Schedule.
    wait_json::<Backup>(
        &env.client,
        &env.ns,
        &run_name,
        Duration::from_secs(90),
        "one volume done",
        partly_done,
    )
    .await;
    first.kill();
    let edit = serde_json::json!({"spec": {
        "paused": true,
        "backend": {"local": {"path": elsewhere.display().to_string()}},
        "backup": {"selector": {"matchLabels": {"tier": "none"}}}}});
    Api::<Schedule>::namespaced(env.client.clone(), &env.ns)
        .patch(&name, &PatchParams::default(), &Patch::Merge(&edit))
        .await
        .expect("edit the Schedule");
    let _second = Coordinator::start(env.cluster, env.coordinator_options("second")).await;
    let done = env.finished(&run_name, 90).await;
    assert_eq!(done["status"]["phase"], "Succeeded", "{done:#}");
    for pvc in ["one", "two"] {
        assert_eq!(
            snapshots_of(&original, pvc).len(),
            1,
            "{pvc} backed up once, into the repository the run was fired with"
        );
    }
    assert!(
        !elsewhere.exists(),
        "the edited backend was used by a run fired before the edit"
    );
}

/// A finished run is never executed again: a coordinator that starts right after it finished does
/// not write to it at all.
#[tokio::test]
async fn a_restart_right_after_a_run_finished_does_not_touch_it() {
    let env = setup("finished").await;
    let dir = env.cluster.volume(&env.ns, "data-0", "data", "node-1", &[]);
    std::fs::write(dir.join("f"), b"data").expect("write");
    let repo = env.repo_named("r");
    let mut first = Coordinator::start(env.cluster, env.coordinator_options("first")).await;
    env.create_backup("done", &repo).await;
    let done = env.finished("done", 60).await;
    assert_eq!(done["status"]["phase"], "Succeeded", "{done:#}");
    first.kill();
    let api: Api<Backup> = Api::namespaced(env.client.clone(), &env.ns);
    let before = api.get("done").await.expect("get");
    let second = Coordinator::start(env.cluster, env.coordinator_options("second")).await;
    second.wait_leading(Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = api.get("done").await.expect("get");
    assert_eq!(
        before.metadata.resource_version, after.metadata.resource_version,
        "the finished run was written to by the restarted coordinator"
    );
    assert_eq!(snapshots_of(&repo, "data").len(), 1);
}

/// The long run name of the issue (its label values used to exceed 63 characters and fail every
/// mount holder), through the mount-holder path.
#[tokio::test]
async fn a_long_run_name_backs_up_through_a_mount_holder() {
    let env = setup("longname").await;
    let dir = env
        .cluster
        .volume(&env.ns, "unused", "idle", "node-2", &["--no-pod"]);
    std::fs::write(dir.join("f"), b"data").expect("write");
    let repo = env.repo_named("r");
    let _c = Coordinator::start(env.cluster, env.coordinator_options("c")).await;
    let name = "postgres-primary-database-nightly-offsite-s3-replica-x-backup-202611251200";
    env.create_backup(name, &repo).await;
    let done = env.finished(name, 90).await;
    assert_eq!(done["status"]["phase"], "Succeeded", "{done:#}");
    assert_eq!(snapshots_of(&repo, "idle").len(), 1);
}

/// A run over 1,000 volumes that all fail records its final status, and a status with 1,000 long
/// errors written by the run's status writer fits in the object.
#[tokio::test]
async fn a_run_with_a_thousand_failing_volumes_records_its_final_status() {
    let env = setup("thousand").await;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(env.client.clone(), &env.ns);
    let creates = (0..1000).map(|i| {
        let pvcs = pvcs.clone();
        async move {
            let pvc: PersistentVolumeClaim = serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("unbound-{i}")},
                "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "none",
                         "resources": {"requests": {"storage": "1Gi"}}}}))
            .expect("pvc");
            pvcs.create(&PostParams::default(), &pvc)
                .await
                .expect("create pvc");
        }
    });
    futures::stream::iter(creates)
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let repo = env.repo_named("r");
    let _c = Coordinator::start(env.cluster, env.coordinator_options("c")).await;
    env.create_backup("all-unbound", &repo).await;
    let done = env.finished("all-unbound", 120).await;
    assert_eq!(done["status"]["phase"], "Failed");
    let items = done["status"]["items"].as_array().expect("items");
    assert_eq!(items.len(), 1000);
    assert!(items.iter().all(|i| i["phase"] == "Failed"));
    let cond = condition(&done, "Succeeded").expect("condition");
    let message = cond["message"].as_str().expect("message");
    assert!(message.len() <= 4096, "{}", message.len());
    assert!(message.contains("not bound"), "{message}");

    // The writer itself, with errors far beyond any limit.
    let api: Api<Backup> = Api::namespaced(env.client.clone(), &env.ns);
    let target: Backup = create(
        &env.client,
        &env.ns,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Backup",
            "metadata": {"name": "long-errors"},
            "spec": {"backend": local_backend(&repo)}}),
    )
    .await;
    let (handle, writer) = StatusWriter::spawn(env.client.clone(), &target, RunStatus::default());
    for i in 0..1000 {
        handle.item(ItemStatus {
            namespace: env.ns.clone(),
            pvc: format!("unbound-{i}"),
            phase: RunPhase::Failed,
            error: Some(format!("error {i}: {}", "x".repeat(20_000))),
            ..Default::default()
        });
    }
    handle.run(|s| s.phase = Some(RunPhase::Failed));
    drop(handle);
    let written = tokio::time::timeout(Duration::from_secs(60), writer)
        .await
        .expect("writer finished")
        .expect("writer task");
    assert_eq!(written.items.len(), 1000);
    let stored = api.get("long-errors").await.expect("get");
    let st = stored.status.expect("status");
    assert_eq!(st.phase, Some(RunPhase::Failed));
    assert_eq!(st.items.len(), 1000);
    assert!(st.items.iter().all(|i| {
        i.error
            .as_deref()
            .is_some_and(|e| e.len() <= 512 && e.starts_with("error "))
    }),);
}

/// A Secret that appears makes its Schedule Ready within seconds (it is watched), not after a poll.
#[tokio::test]
async fn a_schedule_becomes_ready_within_seconds_of_its_secret_appearing() {
    let env = setup("latesecret").await;
    let repo = env.repo_named("r");
    let mut backend = local_backend(&repo);
    backend["repoPasswordSecretRef"] = serde_json::json!({"name": "late", "key": "password"});
    let _c = Coordinator::start(env.cluster, env.coordinator_options("c")).await;
    let _: Schedule = create(
        &env.client,
        &env.ns,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Schedule",
            "metadata": {"name": "waits"},
            "spec": {"backend": backend, "backup": {"schedule": "@daily"}}}),
    )
    .await;
    let not_ready = wait_json::<Schedule>(
        &env.client,
        &env.ns,
        "waits",
        Duration::from_secs(30),
        "Ready=False",
        |v| condition(v, "Ready").is_some_and(|c| c["status"] == "False"),
    )
    .await;
    let c = condition(&not_ready, "Ready").expect("Ready");
    assert_eq!(c["reason"], "SecretNotFound", "{c}");
    assert!(
        c["message"]
            .as_str()
            .is_some_and(|m| m.contains("spec.backend.repoPasswordSecretRef")),
        "{c}"
    );
    let created = Instant::now();
    secret(&env.client, &env.ns, "late", &[("password", PASSWORD)]).await;
    wait_json::<Schedule>(
        &env.client,
        &env.ns,
        "waits",
        Duration::from_secs(10),
        "Ready=True within 10 s of the Secret",
        |v| condition(v, "Ready").is_some_and(|c| c["status"] == "True"),
    )
    .await;
    println!(
        "Ready {} ms after the Secret was created",
        created.elapsed().as_millis()
    );
}

/// A standby whose clock runs ahead of the holder's (here: a holder writing renew times an hour in
/// the past) does not take a Lease that keeps being renewed; it takes it once renewals stop.
#[tokio::test]
async fn a_standby_with_a_skewed_clock_does_not_steal_the_lease() {
    let env = setup("skew").await;
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.ns);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let renewer = {
        let (leases, stop) = (leases.clone(), std::sync::Arc::clone(&stop));
        tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let behind = k8s_openapi::jiff::Timestamp::now()
                    - k8s_openapi::jiff::SignedDuration::from_secs(3600)
                    + k8s_openapi::jiff::SignedDuration::from_millis(i64::from(n));
                let lease = serde_json::json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": "skewed"},
                    "spec": {"holderIdentity": "holder-behind", "leaseDurationSeconds": 3,
                             "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(behind)}});
                leases
                    .patch(
                        "skewed",
                        &PatchParams::apply("fake-holder").force(),
                        &Patch::Apply(&lease),
                    )
                    .await
                    .expect("renew");
                n += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    let kc = env.cluster.kube_config().await;
    let duration = Duration::from_secs(3);
    let client = leader::client_for(&kc, duration).expect("client");
    let standby = Elector::new(client, &env.ns, "skewed", "standby", duration)
        .await
        .expect("elector");
    let stole = tokio::time::timeout(Duration::from_secs(9), standby.acquire()).await;
    assert!(
        stole.is_err(),
        "the standby took a Lease that was renewed every 500 ms"
    );
    let holder = leases
        .get("skewed")
        .await
        .expect("lease")
        .spec
        .and_then(|s| s.holder_identity);
    assert_eq!(holder.as_deref(), Some("holder-behind"));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = renewer.await;
    let stopped = Instant::now();
    tokio::time::timeout(Duration::from_secs(15), standby.acquire())
        .await
        .expect("the standby takes the Lease once renewals stop");
    assert!(
        stopped.elapsed() >= duration,
        "taken before a lease duration passed"
    );
    let holder = leases
        .get("skewed")
        .await
        .expect("lease")
        .spec
        .and_then(|s| s.holder_identity);
    assert_eq!(holder.as_deref(), Some("standby"));
}

/// A leader whose API calls hang (a proxy that stops forwarding) steps down before a standby can
/// take the Lease.
#[tokio::test]
async fn a_leader_whose_api_calls_hang_steps_down_before_its_lease_can_be_taken() {
    let env = setup("hang").await;
    let kc = env.cluster.kube_config().await;
    let proxy = stowage_tests::proxy::Blackhole::start(&kc.cluster_url).await;
    let mut through = kc.clone();
    through.cluster_url = proxy.url().parse().expect("url");
    let duration = Duration::from_secs(3);
    let leader_elector = Elector::new(
        leader::client_for(&through, duration).expect("client"),
        &env.ns,
        "hang",
        "leader",
        duration,
    )
    .await
    .expect("leader");
    tokio::time::timeout(Duration::from_secs(10), leader_elector.acquire())
        .await
        .expect("the first replica leads");
    let standby = Elector::new(
        leader::client_for(&kc, duration).expect("client"),
        &env.ns,
        "hang",
        "standby",
        duration,
    )
    .await
    .expect("standby");
    let leader_task = tokio::spawn(async move {
        let _ = leader_elector.keep().await;
        Instant::now()
    });
    let standby_task = tokio::spawn(async move {
        standby.acquire().await;
        Instant::now()
    });
    // Healthy for a while: renewals keep the standby out.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(!leader_task.is_finished(), "a healthy leader stepped down");
    assert!(!standby_task.is_finished(), "the standby took a live Lease");
    let frozen = Instant::now();
    proxy.freeze();
    let stepped_down = tokio::time::timeout(Duration::from_secs(10), leader_task)
        .await
        .expect("the leader steps down")
        .expect("task");
    let taken = tokio::time::timeout(Duration::from_secs(15), standby_task)
        .await
        .expect("the standby takes over")
        .expect("task");
    println!(
        "leader stepped down {} ms after the freeze; standby took over {} ms after it",
        (stepped_down - frozen).as_millis(),
        (taken - frozen).as_millis()
    );
    assert!(
        stepped_down < taken,
        "the standby took the Lease before the hung leader stepped down"
    );
}

/// Resume is exact: a coordinator that died after restic finished a partial backup (exit 3) left
/// the run Running; the next one finds the run's snapshot, sees it marked incomplete, and records
/// the item as partial. No second snapshot is made, and the run is never Succeeded.
#[tokio::test]
async fn a_resumed_run_counts_a_partial_snapshot_as_partial() {
    use std::os::unix::fs::PermissionsExt;
    use stowage_proto::v1::Outcome;
    use stowage_tests::agent::{backup, bwrap_without_dac, local_repo, volume_backup};
    let env = setup("partial").await;
    let dir = env.cluster.volume(&env.ns, "db-0", "db", "node-1", &[]);
    std::fs::write(dir.join("readable"), b"fine").expect("write");
    std::fs::write(dir.join("locked.db"), b"secret").expect("write");
    std::fs::set_permissions(
        dir.join("locked.db"),
        std::fs::Permissions::from_mode(0o000),
    )
    .expect("chmod");
    let tmp = tempfile::tempdir().expect("tmp");
    let agents = stowage_tests::coordinator::PrivateAgents::start(
        env.cluster,
        &env.client,
        &env.ns,
        &[("node-1", "127.0.0.11")],
        Some(bwrap_without_dac(tmp.path())),
    )
    .await;
    let repo = env.repo_named("r");
    env.create_backup("crashed", &repo).await;
    // What a leader that died mid-run leaves behind: the run Running, its volume Running.
    let api: Api<Backup> = Api::namespaced(env.client.clone(), &env.ns);
    let left = serde_json::json!({"status": {"phase": "Running", "startTime": "2026-11-25T00:00:00Z",
        "items": [{"namespace": env.ns, "pvc": "db", "node": "node-1", "phase": "Running"}]}});
    api.patch_status("crashed", &PatchParams::default(), &Patch::Merge(&left))
        .await
        .expect("status");
    // ... and the snapshot restic finished for it, with an unreadable file.
    let uid = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(env.client.clone(), &env.ns)
        .get("db-0")
        .await
        .expect("pod")
        .metadata
        .uid
        .expect("uid");
    let mut client = agents.agents[0].client(&agents.pki).await;
    let mut req = volume_backup(
        local_repo(&repo, PASSWORD, true),
        &uid,
        &format!("pv-{}-db", env.ns),
        &env.ns,
        "db",
    );
    req.run_id = format!("{}/crashed", env.ns);
    let made = backup(&mut client, req).await.result.expect("result");
    assert_eq!(made.outcome(), Outcome::Partial, "{made:?}");

    let _c = Coordinator::start(env.cluster, agents.coordinator_options(&env.ns)).await;
    let done = env.finished("crashed", 60).await;
    assert_eq!(done["status"]["phase"], "PartiallyFailed", "{done:#}");
    let item = &done["status"]["items"][0];
    assert_eq!(item["phase"], "PartiallyFailed", "{item}");
    assert!(
        made.snapshot_id
            .starts_with(item["snapshotId"].as_str().expect("snapshotId")),
        "{item} vs {}",
        made.snapshot_id
    );
    assert_eq!(
        snapshots_of(&repo, "db").len(),
        1,
        "backed up again on resume"
    );
}

/// A fire time whose generated run name is already taken by an object the Schedule did not fire is
/// not lost: the run is created under a second name unique to the Schedule.
///
/// Long (~45 s): it waits for a per-minute cron to fire; cron has no period under a minute.
#[tokio::test]
async fn a_taken_run_name_gets_a_second_name_and_the_run_still_happens() {
    let env = setup("taken").await;
    let dir = env.cluster.volume(&env.ns, "data-0", "data", "node-1", &[]);
    std::fs::write(dir.join("f"), b"data").expect("write");
    let repo = env.repo_named("r");
    // Squat the names of the next two fire times (a per-minute cron) with hand-made runs that
    // have no backend (they fail at once, and are not the Schedule's).
    let now = chrono::Utc::now();
    for minutes in 1..=2 {
        let at = now + chrono::Duration::minutes(minutes);
        let name = format!("squatted-backup-{}", at.format("%Y%m%d%H%M"));
        let _: Backup = create(
            &env.client,
            &env.ns,
            serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Backup",
                "metadata": {"name": name}, "spec": {}}),
        )
        .await;
    }
    let _: Schedule = create(
        &env.client,
        &env.ns,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Schedule",
            "metadata": {"name": "squatted"},
            "spec": {"backend": local_backend(&repo), "backup": {"schedule": "* * * * *"}}}),
    )
    .await;
    let _c = Coordinator::start(env.cluster, env.coordinator_options("c")).await;
    let run = fired_run(&env, "squatted").await;
    let name = run.metadata.name.clone().expect("name");
    assert!(
        name.starts_with("squatted-backup-") && name.matches('-').count() == 3,
        "expected the second name <schedule>-backup-<time>-<hash>, got {name}"
    );
    let done = env.finished(&name, 60).await;
    assert_eq!(done["status"]["phase"], "Succeeded", "{done:#}");
    assert_eq!(snapshots_of(&repo, "data").len(), 1);
}
