//! The coordinator against the local control plane: real API server, scheduler and controller
//! manager, real agents (the cluster's DaemonSet, or a test's own) and real restic. Each test has
//! its own namespace and its own coordinator process watching only that namespace.
//!
//! Length: one suite, one file; each test is a scenario against the shared cluster (issue #24 will share their setup).

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};
use stowage_api::{Backup, Check, Prune, Schedule};
use stowage_tests::cluster::{Cluster, wait_for};
use stowage_tests::coordinator::{
    Coordinator, CoordinatorOptions, PrivateAgents, condition, create, finished, fired_metadata,
    local_backend, partly_done, wait_event, wait_json,
};
use stowage_tests::env::{PASSWORD, TestEnv};
use stowage_tests::restic;

const RUN_TIMEOUT: Duration = Duration::from_secs(90);

/// The shared test environment, with the path of the test's local repository (created by the
/// first Backup: `initialize: true`).
struct Env {
    base: TestEnv,
    repo: PathBuf,
}

impl Deref for Env {
    type Target = TestEnv;
    fn deref(&self) -> &TestEnv {
        &self.base
    }
}

async fn setup(prefix: &str) -> Env {
    let base = TestEnv::new(prefix).await;
    let repo = base.repo();
    Env { base, repo }
}

impl Env {
    /// A PVC with files on `node` (mounted by pod `<pvc>-0` unless `--no-pod` is passed).
    fn volume_with_data(&self, pvc: &str, node: &str, extra: &[&str]) -> PathBuf {
        let dir = self.volume(&format!("{pvc}-0"), pvc, node, extra);
        self.write_data(&dir, pvc);
        dir
    }

    /// A pod-mounted PVC with files on `node`, returned once it is mounted.
    async fn mounted_volume(&self, pvc: &str, node: &str) -> PathBuf {
        let dir = self.mounted(pvc, node, "data/owner.txt").await;
        self.write_data(&dir, pvc);
        dir
    }

    /// What every volume of this suite holds: its owner and 64 KiB of data of its own.
    fn write_data(&self, dir: &Path, pvc: &str) {
        std::fs::create_dir_all(dir.join("data")).expect("mkdir");
        std::fs::write(dir.join("data/owner.txt"), format!("{}/{pvc}\n", self.ns)).expect("write");
        stowage_tests::fstree::write_random(&dir.join("data/blob"), 64 * 1024, pvc.len() as u64);
    }

    /// Options for a coordinator of this test (shared agents) with its own identity.
    fn env_coordinator(&self, identity: &str) -> (&'static Cluster, CoordinatorOptions) {
        (self.cluster, self.coordinator_options(identity))
    }

    fn repo_str(&self) -> String {
        self.repo.display().to_string()
    }

    /// Creates Backup `name` (this test's repository, plus `extra` spec fields) and waits for it.
    async fn backup(&self, name: &str, extra: serde_json::Value) -> serde_json::Value {
        self.create_backup(name, local_backend(&self.repo), extra)
            .await;
        self.wait_run::<Backup>(name, RUN_TIMEOUT).await
    }

    /// Creates Backup `name` whose uploads are limited to 1 MiB/s, so a few MiB take seconds: time
    /// for a test to act while it runs. Does not wait.
    async fn start_throttled_backup(&self, name: &str, extra: serde_json::Value) {
        let mut backend = local_backend(&self.repo);
        backend["limitUploadKiB"] = serde_json::json!(1024);
        self.create_backup(name, backend, extra).await;
    }

    async fn create_backup(
        &self,
        name: &str,
        backend: serde_json::Value,
        extra: serde_json::Value,
    ) {
        let mut spec = serde_json::json!({ "backend": backend });
        if backend.is_null() {
            spec = serde_json::json!({});
        }
        if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        let _: Backup = self.create_run(name, spec).await;
    }

    /// A Backup that belongs to Schedule `schedule` (labels and owner), as a fired run would.
    async fn owned_backup(&self, schedule: &str, name: &str) -> serde_json::Value {
        let metadata = fired_metadata(&self.client, &self.ns, schedule, "backup", name).await;
        let _: Backup = create(
            &self.client,
            &self.ns,
            serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Backup",
                "metadata": metadata, "spec": {"scheduleRef": {"name": schedule}}}),
        )
        .await;
        let run = self.wait_run::<Backup>(name, RUN_TIMEOUT).await;
        // Distinct creation timestamps (second resolution) keep the age order unambiguous.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        run
    }
}

async fn start_coordinator((cluster, opts): (&'static Cluster, CoordinatorOptions)) -> Coordinator {
    Coordinator::start(cluster, opts).await
}

fn item<'a>(run: &'a serde_json::Value, pvc: &str) -> &'a serde_json::Value {
    run["status"]["items"]
        .as_array()
        .and_then(|items| items.iter().find(|i| i["pvc"] == pvc))
        .unwrap_or_else(|| panic!("no item for {pvc} in {run:#}"))
}

fn tags(s: &serde_json::Value) -> Vec<String> {
    s["tags"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Snapshots of one PVC (by its identity tags).
fn snapshots_of(all: &[serde_json::Value], ns: &str, pvc: &str) -> Vec<serde_json::Value> {
    all.iter()
        .filter(|s| {
            let t = tags(s);
            t.contains(&format!("stowage.dev/namespace={ns}"))
                && t.contains(&format!("stowage.dev/pvc={pvc}"))
        })
        .cloned()
        .collect()
}

/// Restores `snapshot` with plain `restic restore` and checks the fixture's files came back.
fn assert_restores(env: &Env, snapshot: &str, pvc: &str, original: &Path) {
    let target = tempfile::tempdir().expect("tmp");
    restic::ok(
        &env.repo_str(),
        PASSWORD,
        &[
            "restore",
            snapshot,
            "--target",
            target.path().to_str().expect("utf8"),
        ],
    );
    assert_eq!(
        std::fs::read_to_string(target.path().join("data/owner.txt")).expect("owner.txt"),
        format!("{}/{pvc}\n", env.ns)
    );
    assert_eq!(
        std::fs::read(target.path().join("data/blob")).expect("blob"),
        std::fs::read(original.join("data/blob")).expect("original blob")
    );
}

/// Long (~75 s): it waits for a `* * * * *` Schedule to fire more than once; cron has no period under a minute.
#[tokio::test]
async fn a_schedule_firing_every_minute_backs_up_pods_on_two_nodes() {
    let env = setup("sched").await;
    let web = env.mounted_volume("web", "node-1").await;
    let db = env.mounted_volume("db", "node-2").await;
    let coordinator = Coordinator::start(env.cluster, CoordinatorOptions::new(&env.ns)).await;
    let _: Schedule = create(
        &env.client,
        &env.ns,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Schedule",
            "metadata": {"name": "every-minute"},
            "spec": {"backend": local_backend(&env.repo), "keepRuns": 2,
                     "backup": {"schedule": "* * * * *"}}}),
    )
    .await;
    let sched = wait_json::<Schedule>(
        &env.client,
        &env.ns,
        "every-minute",
        Duration::from_secs(20),
        "status.nextRuns.backup",
        |v| v["status"]["nextRuns"]["backup"].is_string(),
    )
    .await;
    let next = chrono::DateTime::parse_from_rfc3339(
        sched["status"]["nextRuns"]["backup"]
            .as_str()
            .expect("next"),
    )
    .expect("rfc3339");
    let until = next.signed_duration_since(chrono::Utc::now());
    assert!(
        until.num_seconds() <= 60,
        "next run {next} is within the minute"
    );
    assert_eq!(condition(&sched, "Ready").expect("Ready")["status"], "True");

    // The first fire time creates a Backup owned by the Schedule; it succeeds.
    let backups: Api<Backup> = Api::namespaced(env.client.clone(), &env.ns);
    let lp = ListParams::default().labels("stowage.dev/schedule=every-minute");
    let deadline = std::time::Instant::now() + Duration::from_secs(100);
    let run = loop {
        let runs = backups.list(&lp).await.expect("list");
        if let Some(r) = runs.items.first() {
            break r.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no scheduled run within 100 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let name = run.metadata.name.clone().expect("name");
    let owner = &run.metadata.owner_references.as_ref().expect("owner")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("Schedule", "every-minute")
    );
    let run = env.wait_run::<Backup>(&name, RUN_TIMEOUT).await;
    assert_eq!(run["status"]["phase"], "Succeeded", "{run:#}");
    assert_eq!(run["status"]["items"].as_array().expect("items").len(), 2);
    assert_eq!(item(&run, "web")["node"], "node-1");
    assert_eq!(item(&run, "db")["node"], "node-2");
    for pvc in ["web", "db"] {
        let i = item(&run, pvc);
        assert_eq!(i["phase"], "Succeeded");
        assert!(i["filesNew"].as_u64().expect("filesNew") >= 2, "{i}");
        assert!(i["bytesAdded"].as_u64().expect("bytesAdded") > 0);
    }

    // One snapshot per PVC with the identity tags; each restores to the fixture's data.
    let all = env.snapshots(&env.repo);
    for (pvc, dir) in [("web", &web), ("db", &db)] {
        let snaps = snapshots_of(&all, &env.ns, pvc);
        assert_eq!(snaps.len(), 1, "{pvc}: {all:#?}");
        let s = &snaps[0];
        assert_eq!(s["hostname"], format!("{}/{pvc}", env.ns));
        let t = tags(s);
        assert!(t.contains(&format!("stowage.dev/pod={pvc}-0")), "{t:?}");
        assert!(
            t.contains(&format!("stowage.dev/run={}/{name}", env.ns)),
            "{t:?}"
        );
        let id = s["short_id"].as_str().expect("id");
        assert!(
            item(&run, pvc)["snapshotId"]
                .as_str()
                .is_some_and(|i| i.starts_with(id) || id.starts_with(i))
        );
        assert_restores(&env, id, pvc, dir);
    }

    // The Schedule records the success; metrics show the next fire time and the result.
    let sched = wait_json::<Schedule>(
        &env.client,
        &env.ns,
        "every-minute",
        Duration::from_secs(20),
        "status.lastSuccessTime",
        |v| v["status"]["lastSuccessTime"].is_string(),
    )
    .await;
    assert!(sched["status"]["lastScheduled"]["backup"].is_string());
    let next_metric = format!(
        "stowage_schedule_next_run_timestamp_seconds{{action=\"backup\",namespace=\"{}\",schedule=\"every-minute\"}}",
        env.ns
    );
    assert!(coordinator.metric(&next_metric).await.unwrap_or(0.0) > 1.7e9);
    // What the staleness alert multiplies: one minute between fire times.
    let period_metric = format!(
        "stowage_schedule_period_seconds{{action=\"backup\",namespace=\"{}\",schedule=\"every-minute\"}}",
        env.ns
    );
    assert_eq!(coordinator.metric(&period_metric).await, Some(60.0));
    assert!(
        coordinator
            .metric("stowage_coordinator_runs_total{kind=\"backup\",result=\"succeeded\"}")
            .await
            .unwrap_or(0.0)
            >= 1.0
    );
    let last_success = format!(
        "stowage_schedule_last_success_timestamp_seconds{{namespace=\"{}\",schedule=\"every-minute\"}}",
        env.ns
    );
    assert!(coordinator.metric(&last_success).await.unwrap_or(0.0) > 1.7e9);
    let text = coordinator.metrics_text().await;
    for name in [
        "stowage_coordinator_run_duration_seconds_bucket{kind=\"backup\"",
        "stowage_coordinator_missed_runs_total 0",
        "stowage_coordinator_agents{state=\"ready\"} 3",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    stowage_tests::promtool_check(&text);

    // A typo in the location of a Schedule that has backed up before fails with a condition naming
    // the field, and creates nothing there (initialize is unset: only a first run may create).
    let typo = env.repo.with_extension("typo");
    let schedules: Api<Schedule> = Api::namespaced(env.client.clone(), &env.ns);
    let mut wrong = local_backend(&typo);
    wrong["initialize"] = serde_json::Value::Null;
    schedules
        .patch(
            "every-minute",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"spec": {"backend": wrong}})),
        )
        .await
        .expect("patch the Schedule's backend");
    env.create_backup(
        "typo",
        serde_json::Value::Null,
        serde_json::json!({"scheduleRef": {"name": "every-minute"}}),
    )
    .await;
    let failed = env.wait_run::<Backup>("typo", RUN_TIMEOUT).await;
    assert_eq!(failed["status"]["phase"], "Failed", "{failed:#}");
    let cond = condition(&failed, "Succeeded").expect("condition");
    assert_eq!(cond["reason"], "RepositoryNotFound", "{cond}");
    let msg = cond["message"].as_str().expect("message");
    assert!(
        msg.starts_with(
            "Schedule every-minute: spec.backend.local.path: there is no repository at"
        ),
        "{msg}"
    );
    assert!(
        !typo.exists(),
        "a repository was created at the mistyped path"
    );
    // A hand-made run resolves its scheduleRef once and records what it used.
    let resolved = &failed["status"]["resolved"];
    assert_eq!(resolved["schedule"], "every-minute", "{failed:#}");
    assert_eq!(
        resolved["backend"]["initialize"], false,
        "decided from the Schedule's history when the run started: {resolved}"
    );
    schedules
        .patch(
            "every-minute",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                serde_json::json!({"spec": {"backend": local_backend(&env.repo)}}),
            ),
        )
        .await
        .expect("restore the Schedule's backend");

    // keepRuns: 2. Two more runs of the Schedule (owned by it, as fired runs are) finish; the oldest
    // is deleted.
    for extra in ["every-minute-backup-extra-1", "every-minute-backup-extra-2"] {
        let r = env.owned_backup("every-minute", extra).await;
        assert_eq!(r["status"]["phase"], "Succeeded", "{r:#}");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let names: Vec<String> = backups
            .list(&lp)
            .await
            .expect("list")
            .items
            .iter()
            .filter(|b| {
                stowage_tests::coordinator::finished(&serde_json::to_value(b).expect("json"))
            })
            .filter_map(|b| b.metadata.name.clone())
            .collect();
        if !names.contains(&name) && names.len() <= 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "old runs not deleted (keepRuns 2): {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test]
async fn a_volume_on_node_3_is_read_by_node_3s_agent_only() {
    let env = setup("rwo").await;
    let _dir = env.mounted_volume("orders", "node-3").await;
    // A PVC annotated stowage.dev/backup: "false" on node-1 is left out (so node-1 is not called).
    let _skip = env.mounted_volume("scratch", "node-1").await;
    Api::<k8s_openapi::api::core::v1::PersistentVolumeClaim>::namespaced(
        env.client.clone(),
        &env.ns,
    )
    .patch(
        "scratch",
        &PatchParams::default(),
        &Patch::Merge(
            serde_json::json!({"metadata": {"annotations": {"stowage.dev/backup": "false"}}}),
        ),
    )
    .await
    .expect("annotate");
    let _c = Coordinator::start(env.cluster, CoordinatorOptions::new(&env.ns)).await;
    let run = env.backup("only-node-3", serde_json::json!({})).await;
    assert_eq!(run["status"]["phase"], "Succeeded", "{run:#}");
    assert_eq!(item(&run, "orders")["node"], "node-3");
    assert_eq!(
        run["status"]["items"].as_array().map(Vec::len),
        Some(1),
        "{run:#}"
    );
    let run_id = format!("run={}/only-node-3", env.ns);
    for k in 1..=3 {
        let log = std::fs::read_to_string(&env.cluster.env[&format!("STOWAGE_AGENT_{k}_LOG")])
            .expect("agent log");
        let called = log
            .lines()
            .any(|l| l.contains(&run_id) && l.contains("backup"));
        assert_eq!(
            called,
            k == 3,
            "node-{k}'s agent log mentions {run_id}: {called}"
        );
    }
}

#[tokio::test]
async fn an_unmounted_pvc_is_backed_up_through_a_mount_holder_pod() {
    let env = setup("holder").await;
    let dir = env.volume_with_data("archive", "node-1", &["--no-pod"]);
    let _c = Coordinator::start(env.cluster, CoordinatorOptions::new(&env.ns)).await;
    let run = env.backup("unmounted", serde_json::json!({})).await;
    assert_eq!(run["status"]["phase"], "Succeeded", "{run:#}");
    let i = item(&run, "archive");
    let holder = i["pod"].as_str().expect("pod");
    assert!(holder.starts_with("archive-hold-"), "{holder}");
    assert!(i["node"].as_str().is_some_and(|n| n.starts_with("node-")));
    let snaps = snapshots_of(&env.snapshots(&env.repo), &env.ns, "archive");
    assert_eq!(snaps.len(), 1);
    assert_restores(
        &env,
        snaps[0]["short_id"].as_str().expect("id"),
        "archive",
        &dir,
    );
    // The holder pod is gone afterwards.
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    let gone = pods
        .get_opt(holder)
        .await
        .expect("get")
        .is_none_or(|p| p.metadata.deletion_timestamp.is_some());
    assert!(gone, "mount holder {holder} still exists");
}

/// Waits for Schedule `name` to be Ready=False with `reason`, its message holding every needle, and
/// for the Event that says so.
async fn assert_not_ready(env: &Env, name: &str, reason: &str, needles: &[&str]) {
    let v = wait_json::<Schedule>(
        &env.client,
        &env.ns,
        name,
        Duration::from_secs(30),
        "a Ready=False condition",
        |v| condition(v, "Ready").is_some_and(|c| c["status"] == "False"),
    )
    .await;
    let c = condition(&v, "Ready").expect("Ready");
    assert_eq!(c["reason"], reason, "{name}: {c}");
    for needle in needles {
        assert!(
            c["message"].as_str().is_some_and(|m| m.contains(needle)),
            "{name}: {needle:?} not in {c}"
        );
    }
    wait_event(
        &env.client,
        &env.ns,
        name,
        reason,
        needles[0],
        Duration::from_secs(20),
    )
    .await;
}

#[tokio::test]
async fn bad_input_gets_a_condition_and_an_event_naming_the_field() {
    let env = setup("bad").await;
    let _dir = env.mounted_volume("good", "node-1").await;
    let _c = Coordinator::start(env.cluster, CoordinatorOptions::new(&env.ns)).await;
    let schedule = |name: &str, backend: serde_json::Value, cron: &str| {
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Schedule",
            "metadata": {"name": name},
            "spec": {"backend": backend, "backup": {"schedule": cron}}})
    };
    let good = local_backend(&env.repo);
    let mut two = good.clone();
    two["rest"] = serde_json::json!({"url": "http://127.0.0.1:1/x"});
    let mut unknown =
        serde_json::json!({"repoPasswordSecretRef": {"name": "backup-repo", "key": "password"}});
    unknown["gcs"] = serde_json::json!({"bucket": "b"});
    let mut missing = good.clone();
    missing["repoPasswordSecretRef"] =
        serde_json::json!({"name": "no-such-secret", "key": "password"});
    let mut bad_key = good.clone();
    bad_key["repoPasswordSecretRef"] = serde_json::json!({"name": "backup-repo", "key": "pw"});
    let cases = [
        (
            "bad-cron",
            good.clone(),
            "61 * * * *",
            "InvalidSchedule",
            "spec.backup.schedule",
        ),
        (
            "two-backends",
            two,
            "@daily",
            "InvalidBackend",
            "spec.backend: set exactly one of local, s3, rest (local and rest are set)",
        ),
        (
            "unknown-backend",
            unknown,
            "@daily",
            "InvalidBackend",
            "spec.backend.gcs: unknown backend type",
        ),
        (
            "missing-secret",
            missing,
            "@daily",
            "SecretNotFound",
            "spec.backend.repoPasswordSecretRef: Secret",
        ),
        (
            "missing-key",
            bad_key,
            "@daily",
            "SecretKeyNotFound",
            "has no key \"pw\"",
        ),
    ];
    // The unknown backend type must reach the controller, not be dropped by the API server.
    let api: Api<Schedule> = Api::namespaced(env.client.clone(), &env.ns);
    for (name, backend, cron, _, _) in &cases {
        let obj: Schedule =
            serde_json::from_value(schedule(name, backend.clone(), cron)).expect("schedule");
        api.create(&Default::default(), &obj)
            .await
            .expect("create schedule");
    }
    for (name, _, _, reason, needle) in &cases {
        assert_not_ready(&env, name, reason, &[needle]).await;
    }
    // Fields that reach restic's command line are checked up front, each named.
    let restic_fields = [
        (
            "bad-retention",
            serde_json::json!({"prune": {"schedule": "@weekly",
                "retention": {"keepLast": 0, "keepWithinDuration": "banana"}}}),
            "InvalidRetention",
            [
                "spec.prune.retention.keepLast: must be at least 1",
                "spec.prune.retention.keepWithinDuration: \"banana\" is not a duration",
            ],
        ),
        (
            "bad-subset",
            serde_json::json!({"check": {"schedule": "@weekly", "readDataSubset": "ten percent"}}),
            "InvalidCheck",
            [
                "spec.check.readDataSubset: \"ten percent\" is not a subset",
                "use a percentage (\"5%\")",
            ],
        ),
    ];
    for (name, actions, reason, needles) in &restic_fields {
        let mut spec = actions.clone();
        spec["backend"] = good.clone();
        let obj: Schedule = serde_json::from_value(serde_json::json!({
            "apiVersion": "stowage.dev/v1alpha1", "kind": "Schedule",
            "metadata": {"name": name}, "spec": spec}))
        .expect("schedule");
        api.create(&Default::default(), &obj)
            .await
            .expect("create schedule");
        assert_not_ready(&env, name, reason, needles).await;
    }
    // A hand-made Prune with a zero rule fails before restic runs, naming its own field.
    let _: Prune = create(
        &env.client,
        &env.ns,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Prune",
            "metadata": {"name": "zero-daily"},
            "spec": {"backend": good.clone(), "retention": {"keepDaily": 0}}}),
    )
    .await;
    let pruned = env.wait_run::<Prune>("zero-daily", RUN_TIMEOUT).await;
    assert_eq!(pruned["status"]["phase"], "Failed", "{pruned:#}");
    let c = condition(&pruned, "Succeeded").expect("condition");
    assert_eq!(c["reason"], "InvalidRetention", "{c}");
    assert!(
        c["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("spec.retention.keepDaily: must be at least 1")),
        "{c}"
    );

    // A selector matching nothing: the Backup fails naming spec.selector; a Schedule warns.
    let run = env
        .backup(
            "nothing",
            serde_json::json!({"selector": {"matchLabels": {"tier": "nope"}}}),
        )
        .await;
    assert_eq!(run["status"]["phase"], "Failed");
    let c = condition(&run, "Succeeded").expect("Succeeded");
    assert_eq!(c["reason"], "NothingSelected");
    assert!(
        c["message"]
            .as_str()
            .is_some_and(|m| m.contains("spec.selector matches no PersistentVolumeClaim")),
        "{c}"
    );
    wait_event(
        &env.client,
        &env.ns,
        "nothing",
        "NothingSelected",
        "spec.selector",
        Duration::from_secs(20),
    )
    .await;
    let _: Schedule = create(
        &env.client,
        &env.ns,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Schedule",
            "metadata": {"name": "selects-nothing"},
            "spec": {"backend": local_backend(&env.repo),
                     "backup": {"schedule": "@daily", "selector": {"matchLabels": {"tier": "nope"}}}}}),
    )
    .await;
    let v = wait_json::<Schedule>(
        &env.client,
        &env.ns,
        "selects-nothing",
        Duration::from_secs(30),
        "VolumesSelected=False",
        |v| condition(v, "VolumesSelected").is_some_and(|c| c["status"] == "False"),
    )
    .await;
    assert!(
        condition(&v, "VolumesSelected").expect("cond")["message"]
            .as_str()
            .is_some_and(|m| m.contains("spec.backup.selector"))
    );
    // An invalid selector operator names the expression's field.
    let run = env
        .backup("bad-op", serde_json::json!({"selector": {"matchExpressions": [{"key": "tier", "operator": "Near", "values": ["x"]}]}}))
        .await;
    let c = condition(&run, "Succeeded").expect("Succeeded");
    assert_eq!(c["reason"], "InvalidSelector");
    assert!(
        c["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("spec.selector.matchExpressions[0].operator")),
        "{c}"
    );
    // Meanwhile the controller keeps serving everything else.
    let ok = env.backup("still-serving", serde_json::json!({})).await;
    assert_eq!(ok["status"]["phase"], "Succeeded", "{ok:#}");
}

#[tokio::test]
async fn random_schedules_are_stable_across_restarts_and_spread() {
    let env = setup("random").await;
    let make = |name: &str| {
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Schedule",
            "metadata": {"name": name},
            "spec": {"backend": local_backend(&env.repo),
                     "backup": {"schedule": "@hourly-random"},
                     "check": {"schedule": "@daily-random"}}})
    };
    let mut c = Coordinator::start(env.cluster, CoordinatorOptions::new(&env.ns)).await;
    for name in ["alpha", "bravo"] {
        let _: Schedule = create(&env.client, &env.ns, make(name)).await;
    }
    let next = |v: &serde_json::Value, action: &str| {
        chrono::DateTime::parse_from_rfc3339(
            v["status"]["nextRuns"][action].as_str().expect("next"),
        )
        .expect("rfc3339")
    };
    let mut first = Vec::new();
    for name in ["alpha", "bravo"] {
        let v = wait_json::<Schedule>(
            &env.client,
            &env.ns,
            name,
            Duration::from_secs(20),
            "nextRuns",
            |v| {
                v["status"]["nextRuns"]["backup"].is_string()
                    && v["status"]["nextRuns"]["check"].is_string()
            },
        )
        .await;
        let now = chrono::Utc::now();
        let (b, k) = (next(&v, "backup"), next(&v, "check"));
        assert!(
            b > now && b.signed_duration_since(now).num_minutes() < 60,
            "hourly within the hour: {b}"
        );
        assert!(
            k > now && k.signed_duration_since(now).num_hours() < 24,
            "daily within the day: {k}"
        );
        first.push((b, k));
    }
    // Each action's time is its own hash: two Schedules share both only by a ~1/86,400 chance
    // (the hourly minute alone collides once in 60 runs).
    assert_ne!(
        first[0], first[1],
        "different schedules fire at different times"
    );
    // A new coordinator computes the same times.
    c.kill();
    let c2 = Coordinator::start(
        env.cluster,
        CoordinatorOptions {
            identity: "second".into(),
            ..CoordinatorOptions::new(&env.ns)
        },
    )
    .await;
    c2.wait_leading(Duration::from_secs(20)).await;
    for (i, name) in ["alpha", "bravo"].iter().enumerate() {
        // Force a fresh reconcile by the new process, then compare.
        let api: Api<Schedule> = Api::namespaced(env.client.clone(), &env.ns);
        api.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {"nextRuns": null}})),
        )
        .await
        .expect("clear status");
        api.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"annotations": {"touch": "1"}}})),
        )
        .await
        .expect("touch");
        let v = wait_json::<Schedule>(
            &env.client,
            &env.ns,
            name,
            Duration::from_secs(20),
            "nextRuns again",
            |v| v["status"]["nextRuns"]["backup"].is_string(),
        )
        .await;
        assert_eq!(
            (next(&v, "backup"), next(&v, "check")),
            first[i],
            "{name} is stable across restarts"
        );
    }
    // paused stops firing: no next run is published.
    let api: Api<Schedule> = Api::namespaced(env.client.clone(), &env.ns);
    api.patch(
        "alpha",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"paused": true}})),
    )
    .await
    .expect("pause");
    let v = wait_json::<Schedule>(
        &env.client,
        &env.ns,
        "alpha",
        Duration::from_secs(20),
        "paused",
        |v| {
            v["status"]["nextRuns"].is_null()
                && condition(v, "Ready").is_some_and(|c| c["reason"] == "Paused")
        },
    )
    .await;
    assert!(v["status"]["nextRuns"].is_null());
    // A paused Schedule publishes no next run; a deleted one loses its series.
    let series = |name: &str| format!("schedule=\"{name}\"");
    let text = c2.metrics_text().await;
    assert!(!text.contains(&series("alpha")), "{text}");
    assert!(text.contains(&series("bravo")), "{text}");
    api.delete("bravo", &Default::default())
        .await
        .expect("delete");
    wait_for(
        "bravo's series removed",
        Duration::from_secs(40),
        || async { !c2.metrics_text().await.contains(&series("bravo")) },
    )
    .await;
}

#[tokio::test]
async fn prune_keeps_each_pvcs_own_newest_snapshots_and_check_passes() {
    let env = setup("prune").await;
    let a = env.mounted_volume("alpha", "node-1").await;
    let _b = env.mounted_volume("bravo", "node-2").await;
    let _c = Coordinator::start(env.cluster, CoordinatorOptions::new(&env.ns)).await;
    for round in 0..3 {
        std::fs::write(a.join("data/round"), format!("{round}")).expect("write");
        let run = env
            .backup(&format!("b{round}"), serde_json::json!({}))
            .await;
        assert_eq!(run["status"]["phase"], "Succeeded", "{run:#}");
    }
    let before = env.snapshots(&env.repo);
    let newest = |all: &[serde_json::Value], pvc: &str, n: usize| {
        let mut s = snapshots_of(all, &env.ns, pvc);
        s.sort_by(|x, y| x["time"].as_str().cmp(&y["time"].as_str()));
        s.iter()
            .rev()
            .take(n)
            .map(|x| x["id"].as_str().expect("id").to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(snapshots_of(&before, &env.ns, "alpha").len(), 3);
    let keep_alpha = newest(&before, "alpha", 2);
    let keep_bravo = newest(&before, "bravo", 2);
    let _: Prune = create(
        &env.client,
        &env.ns,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Prune",
            "metadata": {"name": "keep-2"},
            "spec": {"backend": local_backend(&env.repo), "retention": {"keepLast": 2}}}),
    )
    .await;
    let run = env.wait_run::<Prune>("keep-2", RUN_TIMEOUT).await;
    assert_eq!(run["status"]["phase"], "Succeeded", "{run:#}");
    for pvc in ["alpha", "bravo"] {
        let i = item(&run, pvc);
        assert_eq!(
            (i["kept"].as_u64(), i["removed"].as_u64()),
            (Some(2), Some(1)),
            "{i}"
        );
    }
    let after = env.snapshots(&env.repo);
    let mut kept_alpha = newest(&after, "alpha", 10);
    let mut kept_bravo = newest(&after, "bravo", 10);
    kept_alpha.sort();
    kept_bravo.sort();
    let (mut ka, mut kb) = (keep_alpha, keep_bravo);
    ka.sort();
    kb.sort();
    assert_eq!(kept_alpha, ka, "alpha keeps its own newest two");
    assert_eq!(kept_bravo, kb, "bravo keeps its own newest two");

    let _: Check = create(
        &env.client,
        &env.ns,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Check",
            "metadata": {"name": "healthy"},
            "spec": {"backend": local_backend(&env.repo)}}),
    )
    .await;
    let run = env.wait_run::<Check>("healthy", RUN_TIMEOUT).await;
    assert_eq!(run["status"]["phase"], "Succeeded", "{run:#}");
    let c = condition(&run, "Succeeded").expect("condition");
    assert!(
        c["message"]
            .as_str()
            .is_some_and(|m| m.contains("no errors were found")),
        "{c}"
    );
}

#[tokio::test]
async fn an_agent_dying_mid_backup_fails_only_its_volume() {
    let env = setup("agentdies").await;
    let _fast = env.mounted_volume("fast", "node-1").await;
    let slow = env.mounted_volume("slow", "node-2").await;
    stowage_tests::fstree::write_random(&slow.join("data/big"), 8 << 20, 7);
    let mut private = PrivateAgents::start(
        env.cluster,
        &env.client,
        &env.ns,
        &[("node-1", "127.0.0.11"), ("node-2", "127.0.0.12")],
        None,
    )
    .await;
    let _c = Coordinator::start(env.cluster, private.coordinator_options(&env.ns)).await;
    env.start_throttled_backup("agent-dies", serde_json::json!({}))
        .await;
    // Wait until node-2's volume is being backed up, then kill that node's agent.
    wait_json::<Backup>(
        &env.client,
        &env.ns,
        "agent-dies",
        Duration::from_secs(60),
        "slow running, with progress in the status",
        |v| {
            v["status"]["items"].as_array().is_some_and(|items| {
                items.iter().any(|i| {
                    i["pvc"] == "slow"
                        && i["phase"] == "Running"
                        && i["percentDone"].as_f64().is_some_and(|p| p > 0.0)
                })
            }) && v["status"]["summary"]
                .as_str()
                .is_some_and(|s| s.contains("running"))
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    private.agents[1].kill();
    let run = env.wait_run::<Backup>("agent-dies", RUN_TIMEOUT).await;
    assert_eq!(run["status"]["phase"], "PartiallyFailed", "{run:#}");
    assert_eq!(item(&run, "fast")["phase"], "Succeeded");
    let failed = item(&run, "slow");
    assert_eq!(failed["phase"], "Failed");
    let error = failed["error"].as_str().expect("error");
    assert!(error.contains("node-2"), "{error}");
    let c = condition(&run, "Succeeded").expect("condition");
    assert_eq!(c["reason"], "SomeVolumesFailed");
    assert!(
        c["message"]
            .as_str()
            .is_some_and(|m| m.contains("slow on node-2")),
        "{c}"
    );
    assert!(
        snapshots_of(&env.snapshots(&env.repo), &env.ns, "slow").is_empty(),
        "no snapshot of the failed volume"
    );
}

/// Both sides' TLS files are renewed under a running pair (a whole new CA, so the old files cannot
/// pass anywhere). The agent is then restarted, which closes the coordinator's open connection:
/// only a coordinator that re-read its files can reach it again, and its next backup succeeds.
#[tokio::test]
async fn a_running_coordinator_and_agent_take_renewed_certificates() {
    let env = setup("certrenew").await;
    let _data = env.mounted_volume("data", "node-1").await;
    let mut private = PrivateAgents::start(
        env.cluster,
        &env.client,
        &env.ns,
        &[("node-1", "127.0.0.11")],
        None,
    )
    .await;
    let coordinator = Coordinator::start(env.cluster, private.coordinator_options(&env.ns)).await;
    let run = env.backup("before", serde_json::json!({})).await;
    assert_eq!(run["status"]["phase"], "Succeeded", "{run:#}");

    private.pki.rotate();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !coordinator.log_text().contains("TLS files changed") {
        assert!(
            std::time::Instant::now() < deadline,
            "the coordinator never saw the new files: {}",
            coordinator.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    private.restart(0).await;
    let run = env.backup("after", serde_json::json!({})).await;
    assert_eq!(run["status"]["phase"], "Succeeded", "{run:#}");
    assert_eq!(item(&run, "data")["phase"], "Succeeded");
}

#[tokio::test]
async fn a_hung_agent_fails_its_volume_after_the_agent_timeout() {
    let env = setup("agenthangs").await;
    let slow = env.mounted_volume("stuck", "node-1").await;
    stowage_tests::fstree::write_random(&slow.join("data/big"), 8 << 20, 9);
    let private = PrivateAgents::start(
        env.cluster,
        &env.client,
        &env.ns,
        &[("node-1", "127.0.0.11")],
        None,
    )
    .await;
    let mut opts = private.coordinator_options(&env.ns);
    opts.extra_args = vec!["--agent-timeout".into(), "3s".into()];
    let _c = Coordinator::start(env.cluster, opts).await;
    env.start_throttled_backup("agent-hangs", serde_json::json!({}))
        .await;
    wait_json::<Backup>(
        &env.client,
        &env.ns,
        "agent-hangs",
        Duration::from_secs(60),
        "running",
        |v| {
            v["status"]["items"]
                .as_array()
                .is_some_and(|items| items.iter().any(|i| i["phase"] == "Running"))
        },
    )
    .await;
    // A frozen agent keeps its TCP connection open but answers nothing, as on a dead node.
    let pid = nix::unistd::Pid::from_raw(private.agents[0].pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    let stopped = std::time::Instant::now();
    let run = env.wait_run::<Backup>("agent-hangs", RUN_TIMEOUT).await;
    let waited = stopped.elapsed();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");
    assert_eq!(run["status"]["phase"], "Failed", "{run:#}");
    let error = item(&run, "stuck")["error"]
        .as_str()
        .expect("error")
        .to_string();
    assert!(error.contains("node-1"), "{error}");
    assert!(
        waited < Duration::from_secs(30),
        "failed after {waited:?}, not after the 3 s timeout"
    );
}

/// Long (~30 s): three volumes at 1 MiB/s give the kill time to land mid-run; then the resumed run finishes them.
#[tokio::test]
async fn a_coordinator_killed_mid_run_resumes_without_duplicate_snapshots() {
    let env = setup("restart").await;
    // Distinct data per volume (no deduplication between them): seconds each at 1 MiB/s.
    for (seed, pvc) in ["one", "two", "three"].into_iter().enumerate() {
        let dir = env.mounted_volume(pvc, "node-1").await;
        stowage_tests::fstree::write_random(&dir.join("data/big"), 3 << 20, 200 + seed as u64);
    }
    let mut first = start_coordinator(env.env_coordinator("first")).await;
    env.start_throttled_backup(
        "interrupted",
        serde_json::json!({"concurrency": {"cluster": 1}}),
    )
    .await;
    // One volume done, the run still going: kill the coordinator.
    wait_json::<Backup>(
        &env.client,
        &env.ns,
        "interrupted",
        Duration::from_secs(90),
        "one volume done",
        partly_done,
    )
    .await;
    first.kill();
    let second = start_coordinator(env.env_coordinator("second")).await;
    let run = env.wait_run::<Backup>("interrupted", RUN_TIMEOUT).await;
    assert_eq!(run["status"]["phase"], "Succeeded", "{run:#}");
    let all = env.snapshots(&env.repo);
    for pvc in ["one", "two", "three"] {
        assert_eq!(item(&run, pvc)["phase"], "Succeeded");
        assert_eq!(
            snapshots_of(&all, &env.ns, pvc).len(),
            1,
            "{pvc} backed up exactly once: {all:#?}"
        );
    }
    assert!(
        second.log_text().contains("resuming a run"),
        "{}",
        second.log_text()
    );
}

#[tokio::test]
async fn only_the_leader_dispatches_and_a_standby_takes_over() {
    let env = setup("leader").await;
    let _dir = env.mounted_volume("data", "node-1").await;
    let mut a = start_coordinator(env.env_coordinator("replica-a")).await;
    a.wait_leading(Duration::from_secs(20)).await;
    let b = start_coordinator(env.env_coordinator("replica-b")).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(b.metric("stowage_coordinator_leader").await, Some(0.0));
    let lease =
        Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(env.client.clone(), &env.ns)
            .get("stowage-coordinator")
            .await
            .expect("lease");
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity).as_deref(),
        Some("replica-a")
    );

    let run = env.backup("first", serde_json::json!({})).await;
    assert_eq!(run["status"]["phase"], "Succeeded", "{run:#}");
    let dispatched = "stowage_coordinator_volume_dispatches_total";
    assert_eq!(a.metric(dispatched).await, Some(1.0));
    assert_eq!(
        b.metric(dispatched).await,
        Some(0.0),
        "the standby never dispatches"
    );

    a.kill();
    b.wait_leading(Duration::from_secs(20)).await;
    let run = env.backup("second", serde_json::json!({})).await;
    assert_eq!(run["status"]["phase"], "Succeeded", "{run:#}");
    assert_eq!(b.metric(dispatched).await, Some(1.0));
    assert_eq!(
        snapshots_of(&env.snapshots(&env.repo), &env.ns, "data").len(),
        2
    );
}

#[tokio::test]
async fn fire_times_missed_while_down_are_counted_and_the_latest_runs_once() {
    let env = setup("missed").await;
    let _dir = env.mounted_volume("data", "node-1").await;
    // The Schedule exists and last fired ten minutes ago; no coordinator was running since.
    let _: Schedule = create(
        &env.client,
        &env.ns,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Schedule",
            "metadata": {"name": "every-minute"},
            "spec": {"backend": local_backend(&env.repo), "backup": {"schedule": "* * * * *"}}}),
    )
    .await;
    let now = chrono::Utc::now();
    let ten_ago =
        (now - chrono::Duration::minutes(10)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    Api::<Schedule>::namespaced(env.client.clone(), &env.ns)
        .patch_status(
            "every-minute",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {"lastScheduled": {"backup": ten_ago}}})),
        )
        .await
        .expect("patch status");
    let (cluster, mut opts) = env.env_coordinator("after-outage");
    opts.extra_args = vec!["--missed-run-deadline".into(), "90s".into()];
    let c = Coordinator::start(cluster, opts).await;
    let backups: Api<Backup> = Api::namespaced(env.client.clone(), &env.ns);
    let lp = ListParams::default().labels("stowage.dev/schedule=every-minute");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let runs = loop {
        let runs = backups.list(&lp).await.expect("list").items;
        if !runs.is_empty() {
            break runs;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the latest missed fire time did not run"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    // Only the newest fire time (within the deadline) ran; the older ones were counted.
    let this_minute = now.format("%Y%m%d%H%M").to_string();
    let name = runs[0].metadata.name.clone().expect("name");
    let stamp = name.rsplit('-').next().expect("stamp");
    assert!(
        stamp >= this_minute.as_str(),
        "{name} is the newest fire time, not an old one"
    );
    assert_eq!(runs.len(), 1, "one run, not a burst");
    let missed = c
        .metric("stowage_coordinator_missed_runs_total")
        .await
        .expect("metric");
    assert!((9.0..=10.0).contains(&missed), "missed {missed}");
    wait_event(
        &env.client,
        &env.ns,
        "every-minute",
        "MissedRuns",
        "missed by more than 90s",
        Duration::from_secs(20),
    )
    .await;
    let run = env.wait_run::<Backup>(&name, RUN_TIMEOUT).await;
    assert_eq!(run["status"]["phase"], "Succeeded", "{run:#}");
}

/// The chart's `rbac.scope: namespaced`: the coordinator's rules bound by RoleBindings in two
/// namespaces (and in the agents' namespace), to a user with nothing else. A coordinator watching
/// both (`--namespace a --namespace b`) backs up each, and a Backup in a third namespace, where it
/// has no rights, is never touched.
#[tokio::test]
async fn a_coordinator_bound_in_two_namespaces_watches_and_serves_both() {
    let a = setup("rbac-a").await;
    let b = setup("rbac-b").await;
    let c = setup("rbac-c").await;
    let _da = a.mounted_volume("data", "node-1").await;
    let _db = b.mounted_volume("data", "node-2").await;
    let _dc = c.mounted_volume("data", "node-3").await;
    let rbac = stowage_tests::workspace_root().join("deploy/daemonset/rbac/coordinator.yaml");
    let out = std::process::Command::new(a.cluster.kubectl())
        .env("KUBECONFIG", a.cluster.kubeconfig())
        .args(["apply", "--server-side", "-f"])
        .arg(&rbac)
        .output()
        .expect("kubectl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let user = format!("stowage-coordinator-{}", a.ns);
    for ns in [a.ns.as_str(), b.ns.as_str(), "stowage-system"] {
        let rb: k8s_openapi::api::rbac::v1::RoleBinding = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("coordinator-{}", a.ns)},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "stowage-coordinator"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]
        }))
        .expect("rolebinding");
        Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(a.client.clone(), ns)
            .create(&Default::default(), &rb)
            .await
            .expect("create rolebinding");
    }
    let (cluster, mut opts) = a.env_coordinator("two-namespaces");
    opts.kubeconfig = Some(a.cluster.user_kubeconfig(&user));
    opts.extra_args = vec!["--namespace".into(), b.ns.clone()];
    let coordinator = Coordinator::start(cluster, opts).await;
    coordinator.wait_leading(Duration::from_secs(20)).await;
    c.create_backup("ignored", local_backend(&c.repo), serde_json::json!({}))
        .await;
    for env in [&a, &b] {
        let run = env.backup("both", serde_json::json!({})).await;
        assert_eq!(run["status"]["phase"], "Succeeded", "{}: {run:#}", env.ns);
        assert_eq!(item(&run, "data")["phase"], "Succeeded");
    }
    let ignored = Api::<Backup>::namespaced(c.client.clone(), &c.ns)
        .get("ignored")
        .await
        .expect("the third namespace's Backup");
    assert!(
        ignored.status.is_none(),
        "a namespace that is not watched is never touched: {:?}",
        ignored.status
    );
    assert!(
        coordinator
            .log_text()
            .contains(&format!("{},{}", a.ns, b.ns)),
        "the log names both namespaces"
    );
}

#[tokio::test]
async fn a_coordinator_with_only_the_documented_rbac_does_everything() {
    let env = setup("rbac").await;
    let _dir = env.mounted_volume("data", "node-2").await;
    let _idle = env.volume_with_data("idle", "node-1", &["--no-pod"]);
    // The chart's ClusterRole, bound in the watched namespace (which also holds the Lease) and in
    // the agents' namespace, to a user that has nothing else.
    let rbac = stowage_tests::workspace_root().join("deploy/daemonset/rbac/coordinator.yaml");
    let out = std::process::Command::new(env.cluster.kubectl())
        .env("KUBECONFIG", env.cluster.kubeconfig())
        .args(["apply", "--server-side", "-f"])
        .arg(&rbac)
        .output()
        .expect("kubectl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let user = format!("stowage-coordinator-{}", env.ns);
    for ns in [env.ns.as_str(), "stowage-system"] {
        let rb: k8s_openapi::api::rbac::v1::RoleBinding = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("coordinator-{}", env.ns)},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "stowage-coordinator"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]
        }))
        .expect("rolebinding");
        Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(env.client.clone(), ns)
            .create(&Default::default(), &rb)
            .await
            .expect("create rolebinding");
    }
    let (cluster, mut opts) = env.env_coordinator("least-privilege");
    opts.kubeconfig = Some(env.cluster.user_kubeconfig(&user));
    let c = Coordinator::start(cluster, opts).await;
    c.wait_leading(Duration::from_secs(20)).await;

    let _: Schedule = create(
        &env.client,
        &env.ns,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Schedule",
            "metadata": {"name": "nightly"},
            "spec": {"backend": local_backend(&env.repo), "keepRuns": 1,
                     "backup": {"schedule": "@hourly-random"},
                     "check": {"schedule": "@daily-random"},
                     "prune": {"schedule": "@weekly", "retention": {"keepLast": 1}}}}),
    )
    .await;
    let v = wait_json::<Schedule>(
        &env.client,
        &env.ns,
        "nightly",
        Duration::from_secs(20),
        "Ready",
        |v| {
            condition(v, "Ready").is_some_and(|c| c["status"] == "True")
                && v["status"]["nextRuns"]["prune"].is_string()
        },
    )
    .await;
    assert_eq!(
        condition(&v, "VolumesSelected").expect("VolumesSelected")["status"],
        "True"
    );
    for name in ["nightly-backup-1", "nightly-backup-2"] {
        let run = env.owned_backup("nightly", name).await;
        assert_eq!(run["status"]["phase"], "Succeeded", "{run:#}");
        assert!(
            item(&run, "idle")["pod"]
                .as_str()
                .is_some_and(|p| p.contains("-hold-"))
        );
    }
    wait_event(
        &env.client,
        &env.ns,
        "nightly-backup-2",
        "BackedUp",
        "have a new snapshot",
        Duration::from_secs(20),
    )
    .await;
    // keepRuns: 1 deletes the older run.
    let backups: Api<Backup> = Api::namespaced(env.client.clone(), &env.ns);
    wait_for("the older run deleted", Duration::from_secs(30), || async {
        backups
            .get_opt("nightly-backup-1")
            .await
            .ok()
            .flatten()
            .is_none()
    })
    .await;
    for (kind, name) in [("Prune", "prune-1"), ("Check", "check-1")] {
        let obj = serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": kind,
            "metadata": {"name": name}, "spec": {"scheduleRef": {"name": "nightly"}}});
        let run = if kind == "Prune" {
            let _: Prune = create(&env.client, &env.ns, obj).await;
            env.wait_run::<Prune>(name, RUN_TIMEOUT).await
        } else {
            let _: Check = create(&env.client, &env.ns, obj).await;
            env.wait_run::<Check>(name, RUN_TIMEOUT).await
        };
        assert_eq!(run["status"]["phase"], "Succeeded", "{run:#}");
    }
    let log = c.log_text();
    assert!(!log.to_lowercase().contains("forbidden"), "{log}");
}

#[tokio::test]
async fn a_frozen_restic_fails_its_volume_after_the_stall_timeout_and_the_next_run_works() {
    let env = setup("stall").await;
    let stuck = env.mounted_volume("stuck", "node-1").await;
    stowage_tests::fstree::write_random(&stuck.join("data/big"), 8 << 20, 11);
    let private = PrivateAgents::start_with_args(
        env.cluster,
        &env.client,
        &env.ns,
        &[("node-1", "127.0.0.11")],
        None,
        &["--stall-timeout", "6s"],
    )
    .await;
    // Created beforehand: a silent `restic init` is bounded by the stall timeout too, and its key
    // derivation alone can take seconds on a loaded 2-core machine.
    restic::init(&env.repo, PASSWORD);
    let _c = Coordinator::start(env.cluster, private.coordinator_options(&env.ns)).await;
    env.start_throttled_backup("frozen", serde_json::json!({}))
        .await;
    let backups: Api<Backup> = Api::namespaced(env.client.clone(), &env.ns);
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let pid = loop {
        if let Some(pid) = stowage_tests::procs::restic_pids_under(&stuck).first() {
            break *pid;
        }
        let run = backups.get("frozen").await.expect("get");
        assert!(
            !finished(&serde_json::to_value(&run).expect("json")),
            "the run ended before restic started: {:#?}",
            run.status
        );
        assert!(std::time::Instant::now() < deadline, "restic never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // restic hangs (as on a dead disk or a silent endpoint); the agent itself is fine.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .expect("SIGSTOP");
    let run = env.wait_run::<Backup>("frozen", RUN_TIMEOUT).await;
    assert_eq!(run["status"]["phase"], "Failed", "{run:#}");
    let error = item(&run, "stuck")["error"].as_str().expect("error");
    assert!(error.contains("made no progress for 6s"), "{error}");
    // The run completed, so nothing waits on it: the next one runs and succeeds.
    let next = env.backup("after-frozen", serde_json::json!({})).await;
    assert_eq!(next["status"]["phase"], "Succeeded", "{next:#}");
}

#[tokio::test]
async fn an_empty_volume_is_skipped_and_a_local_path_outside_the_roots_is_refused() {
    let env = setup("empty").await;
    env.mounted_volume("full", "node-1").await;
    // A brand-new PVC: mounted, nothing in it.
    let empty = env
        .cluster
        .volume(&env.ns, "fresh-0", "fresh", "node-2", &[]);
    std::fs::write(empty.join("probe"), b"x").expect("write");
    env.cluster
        .wait_mounted(&env.client, &env.ns, "fresh-0", "fresh", "node-2", "probe")
        .await;
    std::fs::remove_file(empty.join("probe")).expect("rm");
    let _c = Coordinator::start(env.cluster, CoordinatorOptions::new(&env.ns)).await;
    let run = env.backup("with-empty", serde_json::json!({})).await;
    assert_eq!(run["status"]["phase"], "Succeeded", "{run:#}");
    let skipped = item(&run, "fresh");
    assert_eq!(skipped["phase"], "Skipped", "{skipped}");
    assert_eq!(skipped["reason"], "EmptyVolume", "{skipped}");
    assert!(skipped["snapshotId"].is_null());
    assert_eq!(item(&run, "full")["phase"], "Succeeded");
    let cond = condition(&run, "Succeeded").expect("condition");
    assert!(
        cond["message"]
            .as_str()
            .is_some_and(|m| m.contains("1 empty volume(s) skipped")),
        "{cond}"
    );
    wait_event(
        &env.client,
        &env.ns,
        "with-empty",
        "VolumeSkipped",
        "/fresh on node-2 was not backed up: the volume is empty",
        Duration::from_secs(20),
    )
    .await;
    assert!(snapshots_of(&env.snapshots(&env.repo), &env.ns, "fresh").is_empty());

    // A local repository outside the agents' --local-repository-root: refused, naming the field.
    let outside = std::env::temp_dir().join(format!("stowage-not-a-root-{}", env.ns));
    env.create_backup("outside", local_backend(&outside), serde_json::json!({}))
        .await;
    let refused = env.wait_run::<Backup>("outside", RUN_TIMEOUT).await;
    assert_eq!(refused["status"]["phase"], "Failed", "{refused:#}");
    let cond = condition(&refused, "Succeeded").expect("condition");
    assert_eq!(cond["reason"], "LocalPathNotAllowed", "{cond}");
    assert!(
        cond["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("spec.backend.local.path: ")
                && m.contains("outside the directories allowed")),
        "{cond}"
    );
    assert!(
        !outside.exists(),
        "a repository was created outside the roots"
    );
}
