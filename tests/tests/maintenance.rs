//! Repository maintenance users can see (real restic, local control plane, the cluster's agents):
//! check outcomes on the Schedule, retention by calendar per volume identity, dry runs, Prunes that
//! wait for running backups, and stale locks removed with plain `restic unlock`.
//!
//! Length: one suite, one file; each test is a scenario against the shared cluster.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Datelike, Utc};
use kube::Api;
use stowage_api::{Backup, Check, Prune, Schedule};
use stowage_tests::cluster::Cluster;
use stowage_tests::coordinator::{
    Coordinator, CoordinatorOptions, condition, create, finished, fired_metadata, local_backend,
    wait_event, wait_json,
};
use stowage_tests::env::{PASSWORD, TestEnv};

/// The shared test environment, taken apart, with the path of its local repository (created by
/// the first Backup).
async fn setup(prefix: &str) -> (&'static Cluster, kube::Client, String, PathBuf) {
    let env = TestEnv::new(prefix).await;
    let repo = env.repo();
    let TestEnv {
        cluster,
        client,
        ns,
    } = env;
    (cluster, client, ns, repo)
}

/// Creates a Check owned by Schedule `schedule` (as a fired run is) and waits for it.
async fn owned_check(
    client: &kube::Client,
    ns: &str,
    schedule: &str,
    name: &str,
) -> serde_json::Value {
    let metadata = fired_metadata(client, ns, schedule, "check", name).await;
    let _: Check = create(
        client,
        ns,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Check",
            "metadata": metadata,
            "spec": {"scheduleRef": {"name": schedule}, "readDataSubset": "100%"}}),
    )
    .await;
    wait_json::<Check>(
        client,
        ns,
        name,
        Duration::from_secs(90),
        "finished",
        finished,
    )
    .await
}

#[tokio::test]
async fn a_failing_check_is_loud_and_a_passing_one_clears_it() {
    let (cluster, client, ns, repo) = setup("health").await;
    let dir = cluster.volume(&ns, "data-0", "data", "node-1", &[]);
    stowage_tests::fstree::write_random(&dir.join("blob"), 2 << 20, 7);
    let coordinator = Coordinator::start(cluster, CoordinatorOptions::new(&ns)).await;
    let _: Schedule = create(
        &client,
        &ns,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Schedule",
            "metadata": {"name": "nightly"},
            "spec": {"backend": local_backend(&repo),
                     "check": {"schedule": "@weekly", "readDataSubset": "100%"}}}),
    )
    .await;
    let _: Backup = create(
        &client,
        &ns,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Backup",
            "metadata": {"name": "first"}, "spec": {"backend": local_backend(&repo)}}),
    )
    .await;
    let b = wait_json::<Backup>(
        &client,
        &ns,
        "first",
        Duration::from_secs(60),
        "finished",
        finished,
    )
    .await;
    assert_eq!(b["status"]["phase"], "Succeeded", "{b:#}");

    // Damage one pack (as a failing disk would); keep the original to repair it afterwards.
    let (pack, original) = stowage_tests::restic::damage_largest_pack(&repo);

    let failed = owned_check(&client, &ns, "nightly", "check-damaged").await;
    assert_eq!(failed["status"]["phase"], "Failed", "{failed:#}");
    assert_eq!(
        condition(&failed, "Succeeded").expect("condition")["reason"],
        "CheckFailed"
    );
    let sched = wait_json::<Schedule>(
        &client,
        &ns,
        "nightly",
        Duration::from_secs(30),
        "RepositoryHealthy=False",
        |v| condition(v, "RepositoryHealthy").is_some_and(|c| c["status"] == "False"),
    )
    .await;
    let c = condition(&sched, "RepositoryHealthy").expect("condition");
    assert_eq!(c["reason"], "CheckFailed", "{c}");
    let message = c["message"].as_str().expect("message");
    assert!(message.starts_with("Check check-damaged: "), "{message}");
    assert!(message.len() <= 4000, "{}", message.len());
    wait_event(
        &client,
        &ns,
        "nightly",
        "CheckFailed",
        "Check check-damaged",
        Duration::from_secs(20),
    )
    .await;
    let series =
        format!("stowage_repository_check_success{{namespace=\"{ns}\",schedule=\"nightly\"}}");
    assert_eq!(coordinator.metric(&series).await, Some(0.0));

    // Repaired, the next Check passes and everything clears.
    std::fs::write(&pack, &original).expect("repair pack");
    let passed = owned_check(&client, &ns, "nightly", "check-repaired").await;
    assert_eq!(passed["status"]["phase"], "Succeeded", "{passed:#}");
    wait_json::<Schedule>(
        &client,
        &ns,
        "nightly",
        Duration::from_secs(30),
        "RepositoryHealthy=True",
        |v| condition(v, "RepositoryHealthy").is_some_and(|c| c["status"] == "True"),
    )
    .await;
    assert_eq!(coordinator.metric(&series).await, Some(1.0));
    // The repository's figures reach the Schedule (status and metrics).
    let sched = wait_json::<Schedule>(
        &client,
        &ns,
        "nightly",
        Duration::from_secs(30),
        "status.repository",
        |v| v["status"]["repository"]["snapshots"].as_u64() == Some(1),
    )
    .await;
    assert!(
        sched["status"]["repository"]["sizeBytes"]
            .as_u64()
            .is_some_and(|b| b > 0)
    );
    let snapshots =
        format!("stowage_repository_snapshots{{namespace=\"{ns}\",schedule=\"nightly\"}}");
    assert_eq!(coordinator.metric(&snapshots).await, Some(1.0));
    let last = format!(
        "stowage_repository_last_check_timestamp_seconds{{namespace=\"{ns}\",schedule=\"nightly\"}}"
    );
    assert!(coordinator.metric(&last).await.is_some_and(|t| t > 1.7e9));
    stowage_tests::promtool_check(&coordinator.metrics_text().await);
}

/// Snapshots of `pvc` in `ns` (by the agent's identity tags), as (short id, time).
fn identity_snapshots(repo: &Path, ns: &str, pvc: &str) -> Vec<(String, DateTime<Utc>)> {
    stowage_tests::restic::snapshots(&repo.display().to_string(), PASSWORD)
        .into_iter()
        .filter(|s| s["hostname"] == format!("{ns}/{pvc}"))
        .map(|s| {
            let t = DateTime::parse_from_rfc3339(s["time"].as_str().expect("time"))
                .expect("rfc3339")
                .to_utc();
            (s["short_id"].as_str().expect("id").to_string(), t)
        })
        .collect()
}

/// restic's keep-daily/keep-weekly, computed here independently: newest first, the newest
/// snapshot of each of the `daily` most recent days and of each of the `weekly` most recent ISO
/// weeks is kept.
fn expected_kept(
    snaps: &[(String, DateTime<Utc>)],
    daily: usize,
    weekly: usize,
) -> BTreeSet<String> {
    let mut sorted = snaps.to_vec();
    sorted.sort_by_key(|s| std::cmp::Reverse(s.1));
    let mut keep = BTreeSet::new();
    let mut bucket = |key: &dyn Fn(&DateTime<Utc>) -> (i32, u32), n: usize| {
        let mut seen = Vec::new();
        for (id, t) in &sorted {
            let k = key(t);
            if seen.contains(&k) {
                continue;
            }
            if seen.len() == n {
                break;
            }
            seen.push(k);
            keep.insert(id.clone());
        }
    };
    bucket(&|t| (t.year(), t.ordinal()), daily);
    bucket(&|t| (t.iso_week().year(), t.iso_week().week()), weekly);
    keep
}

/// Creates a Prune and waits for it.
async fn prune(
    client: &kube::Client,
    ns: &str,
    name: &str,
    repo: &Path,
    dry_run: bool,
) -> serde_json::Value {
    stowage_tests::coordinator::run_to_end::<Prune>(
        client,
        ns,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Prune",
            "metadata": {"name": name},
            "spec": {"backend": local_backend(repo), "dryRun": dry_run,
                     "retention": {"keepDaily": 3, "keepWeekly": 2}}}),
        Duration::from_secs(120),
    )
    .await
}

/// Retention by calendar, per volume identity: ten snapshots of one PVC spread over five weeks
/// (backdated with `restic backup --time`), two of another. A dry run reports the plan and deletes
/// nothing; the real Prune leaves exactly the snapshots computed here, and the other PVC's are
/// untouched. The status lists the snapshots per identity, the bytes freed and the repository's
/// figures.
///
/// Long (~40 s): twelve backdated snapshots are made with restic one by one, then a dry run and a real Prune.
#[tokio::test]
async fn retention_by_calendar_per_identity_with_a_dry_run_first() {
    let (cluster, client, ns, repo) = setup("calendar").await;
    stowage_tests::restic::init(&repo, PASSWORD);
    let src = tempfile::tempdir().expect("tmp");
    let now = Utc::now();
    let hours = [1, 3, 26, 50, 74, 8 * 24, 9 * 24, 15 * 24, 22 * 24, 30 * 24];
    // Times are written and bucketed in UTC (restic reads --time in the local zone).
    let backup_at = |pvc: &str, t: DateTime<Utc>, n: usize| {
        std::fs::write(src.path().join("f"), format!("{pvc} {n}")).expect("write");
        let out = stowage_tests::restic::run(
            &repo.display().to_string(),
            PASSWORD,
            &[("TZ", "UTC")],
            &[
                "backup",
                &src.path().display().to_string(),
                "--host",
                &format!("{ns}/{pvc}"),
                "--tag",
                &format!("stowage.dev/namespace={ns}"),
                "--tag",
                &format!("stowage.dev/pvc={pvc}"),
                "--time",
                &t.format("%Y-%m-%d %H:%M:%S").to_string(),
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    for (n, h) in hours.iter().enumerate() {
        backup_at("a", now - chrono::Duration::hours(*h), n);
    }
    for n in 0..2 {
        backup_at("b", now - chrono::Duration::hours(40 * 24 + n as i64), n);
    }
    let a_before = identity_snapshots(&repo, &ns, "a");
    assert_eq!(a_before.len(), 10);
    let want = expected_kept(&a_before, 3, 2);
    let _c = Coordinator::start(cluster, CoordinatorOptions::new(&ns)).await;

    let dry = prune(&client, &ns, "dry", &repo, true).await;
    assert_eq!(dry["status"]["phase"], "Succeeded", "{dry:#}");
    assert_eq!(
        condition(&dry, "Succeeded").expect("condition")["reason"],
        "DryRun"
    );
    assert_eq!(
        identity_snapshots(&repo, &ns, "a").len(),
        10,
        "a dry run deleted snapshots"
    );
    let items = dry["status"]["items"].as_array().expect("items");
    let a = items.iter().find(|i| i["pvc"] == "a").expect("item a");
    let planned: BTreeSet<String> = a["keptSnapshots"]
        .as_array()
        .expect("kept")
        .iter()
        .map(|v| v.as_str().expect("id").to_string())
        .collect();
    assert_eq!(planned, want, "the dry run's plan");
    assert_eq!(a["removed"], 10 - want.len(), "{a}");

    let real = prune(&client, &ns, "real", &repo, false).await;
    assert_eq!(real["status"]["phase"], "Succeeded", "{real:#}");
    let kept: BTreeSet<String> = identity_snapshots(&repo, &ns, "a")
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(kept, want, "exactly the expected snapshots of a remain");
    assert_eq!(
        identity_snapshots(&repo, &ns, "b").len(),
        2,
        "b's snapshots are its own"
    );
    assert!(real["status"]["freedBytes"].as_u64().is_some(), "{real:#}");
    assert_eq!(
        real["status"]["repository"]["snapshots"].as_u64(),
        Some(want.len() as u64 + 2),
        "{real:#}"
    );
    assert!(
        real["status"]["repository"]["sizeBytes"]
            .as_u64()
            .is_some_and(|b| b > 0)
    );
}

/// A Prune that starts while two (throttled) backups write to the repository waits for their
/// locks, says so in its status, and then succeeds; nothing fails.
///
/// Long (~30 s): the Prune must start while two throttled backups hold their locks, and wait for both.
#[tokio::test]
async fn a_prune_waits_for_running_backups_then_succeeds() {
    let (cluster, client, ns, repo) = setup("waits").await;
    // The volumes are on node-2; the Prune goes to the first ready agent (node-1), whose slots
    // are free, so what it waits for is the repository lock.
    for (seed, pvc) in ["one", "two"].into_iter().enumerate() {
        let dir = cluster.volume(&ns, &format!("{pvc}-0"), pvc, "node-2", &[]);
        stowage_tests::fstree::write_random(&dir.join("big"), 6 << 20, 300 + seed as u64);
    }
    stowage_tests::restic::init(&repo, PASSWORD);
    let _c = Coordinator::start(cluster, CoordinatorOptions::new(&ns)).await;
    let mut backend = local_backend(&repo);
    backend["limitUploadKiB"] = serde_json::json!(1024);
    let _: Backup = create(
        &client,
        &ns,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Backup",
            "metadata": {"name": "slow"}, "spec": {"backend": backend}}),
    )
    .await;
    wait_json::<Backup>(
        &client,
        &ns,
        "slow",
        Duration::from_secs(30),
        "both volumes running",
        |v| {
            v["status"]["items"]
                .as_array()
                .is_some_and(|i| i.len() == 2 && i.iter().all(|i| i["phase"] == "Running"))
        },
    )
    .await;
    // Running items are dispatched; restic takes its lock a moment later (longer on a loaded
    // machine). The Prune is created once a backup's lock is in the repository.
    stowage_tests::wait_until("a backup's lock", Duration::from_secs(30), || {
        !stowage_tests::restic::lock_files(&repo).is_empty()
    })
    .await;
    let _: Prune = create(
        &client,
        &ns,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Prune",
            "metadata": {"name": "during"},
            "spec": {"backend": local_backend(&repo), "retention": {"keepLast": 5}}}),
    )
    .await;
    let waiting = wait_json::<Prune>(
        &client,
        &ns,
        "during",
        Duration::from_secs(30),
        "waiting for the lock",
        |v| {
            v["status"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("waiting for the repository lock held by"))
                || finished(v)
        },
    )
    .await;
    assert!(
        !finished(&waiting),
        "the Prune finished while backups held the repository: {waiting:#}"
    );
    let b = wait_json::<Backup>(
        &client,
        &ns,
        "slow",
        Duration::from_secs(90),
        "finished",
        finished,
    )
    .await;
    assert_eq!(b["status"]["phase"], "Succeeded", "{b:#}");
    let p = wait_json::<Prune>(
        &client,
        &ns,
        "during",
        Duration::from_secs(90),
        "finished",
        finished,
    )
    .await;
    assert_eq!(p["status"]["phase"], "Succeeded", "{p:#}");
    assert!(p["status"]["message"].is_null(), "{p:#}");
}

/// A lock left by a holder on another host that died long ago (older than restic's 30 minutes) is
/// removed with plain `restic unlock` by the next run: an Event on the run, the counter, and the
/// run succeeds.
#[tokio::test]
async fn a_stale_lock_is_removed_by_the_next_run_with_an_event() {
    let (cluster, client, ns, repo) = setup("stale").await;
    let dir = cluster.volume(&ns, "data-0", "data", "node-2", &[]);
    std::fs::write(dir.join("f"), b"data").expect("write");
    stowage_tests::restic::init(&repo, PASSWORD);
    stowage_tests::restic::forge_lock(
        &repo,
        PASSWORD,
        "node-9.sbx-4242-1",
        4242,
        Duration::from_secs(45 * 60),
        true,
    );
    let c = Coordinator::start(cluster, CoordinatorOptions::new(&ns)).await;
    let _: Backup = create(
        &client,
        &ns,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Backup",
            "metadata": {"name": "after-crash"}, "spec": {"backend": local_backend(&repo)}}),
    )
    .await;
    let b = wait_json::<Backup>(
        &client,
        &ns,
        "after-crash",
        Duration::from_secs(60),
        "finished",
        finished,
    )
    .await;
    assert_eq!(b["status"]["phase"], "Succeeded", "{b:#}");
    wait_event(
        &client,
        &ns,
        "after-crash",
        "StaleLockRemoved",
        "removed the stale repository lock of node-9.sbx-4242-1 (pid 4242, exclusive",
        Duration::from_secs(20),
    )
    .await;
    let series =
        format!("stowage_repository_lock_removals_total{{namespace=\"{ns}\",schedule=\"\"}}");
    assert_eq!(c.metric(&series).await, Some(1.0));
    assert!(stowage_tests::restic::lock_files(&repo).is_empty());
}

/// A backup that finds the repository locked exclusively (as by a running Prune) waits, and its
/// item says whose lock it waits for; once the lock is gone it goes on and succeeds.
#[tokio::test]
async fn a_backup_waits_for_an_exclusive_lock_and_says_whose() {
    let (cluster, client, ns, repo) = setup("exclusive").await;
    let dir = cluster.volume(&ns, "data-0", "data", "node-3", &[]);
    std::fs::write(dir.join("f"), b"data").expect("write");
    stowage_tests::restic::init(&repo, PASSWORD);
    // A live holder's lock: seconds old, far from restic's 30-minute staleness.
    let lock = stowage_tests::restic::forge_lock(
        &repo,
        PASSWORD,
        "pruning-agent",
        77,
        Duration::from_secs(5),
        true,
    );
    let _c = Coordinator::start(cluster, CoordinatorOptions::new(&ns)).await;
    let _: Backup = create(
        &client,
        &ns,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Backup",
            "metadata": {"name": "during-prune"}, "spec": {"backend": local_backend(&repo)}}),
    )
    .await;
    let waiting = wait_json::<Backup>(
        &client,
        &ns,
        "during-prune",
        Duration::from_secs(60),
        "the item waiting for the lock",
        |v| {
            v["status"]["items"][0]["message"]
                .as_str()
                .is_some_and(|m| {
                    m.starts_with(
                        "waiting for the repository lock held by pruning-agent (pid 77, exclusive",
                    )
                })
        },
    )
    .await;
    assert!(!finished(&waiting), "{waiting:#}");
    std::fs::remove_file(repo.join("locks").join(&lock)).expect("the holder finishes");
    let done = wait_json::<Backup>(
        &client,
        &ns,
        "during-prune",
        Duration::from_secs(60),
        "finished",
        finished,
    )
    .await;
    assert_eq!(done["status"]["phase"], "Succeeded", "{done:#}");
    assert!(done["status"]["items"][0]["message"].is_null(), "{done:#}");
}

/// A metric series and what its value must satisfy.
type Want = (String, fn(f64) -> bool);

/// Polls the coordinator's metrics until every `(series, check)` holds, at most `timeout`.
async fn wait_metrics(c: &Coordinator, what: &str, timeout: Duration, want: &[Want]) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let mut all = true;
        for (series, ok) in want {
            all &= c.metric(series).await.is_some_and(ok);
        }
        if all {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} within {timeout:?}; metrics:\n{}",
            c.metrics_text()
                .await
                .lines()
                .filter(|l| l.starts_with("stowage_repository"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The lock gauges follow a run that waits for a lock (refreshed on the timer while it waits) and
/// show what is left when it ends; the figures reach the Schedule's status and gauges between runs,
/// with no Check or Prune.
#[tokio::test]
async fn lock_gauges_follow_a_waiting_run_and_figures_arrive_between_runs() {
    let (cluster, client, ns, repo) = setup("lockfig").await;
    let dir = cluster.volume(&ns, "data-0", "data", "node-1", &[]);
    std::fs::write(dir.join("f"), b"data").expect("write");
    stowage_tests::restic::init(&repo, PASSWORD);
    // A live prune's exclusive lock, and a live backup's shared lock from another node, two
    // minutes since its last refresh: neither is stale.
    let exclusive = stowage_tests::restic::forge_lock(
        &repo,
        PASSWORD,
        "pruner",
        77,
        Duration::from_secs(5),
        true,
    );
    stowage_tests::restic::forge_lock(
        &repo,
        PASSWORD,
        "reader",
        78,
        Duration::from_secs(120),
        false,
    );
    let mut opts = CoordinatorOptions::new(&ns);
    opts.extra_args = ["--lock-refresh-interval", "1s", "--figures-interval", "3s"]
        .map(String::from)
        .to_vec();
    let c = Coordinator::start(cluster, opts).await;
    let _: Schedule = create(
        &client,
        &ns,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Schedule",
            "metadata": {"name": "nightly"},
            "spec": {"backend": local_backend(&repo), "backup": {"schedule": "0 3 1 1 *"}}}),
    )
    .await;
    let metadata = fired_metadata(&client, &ns, "nightly", "backup", "b1").await;
    let _: Backup = create(
        &client,
        &ns,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Backup",
            "metadata": metadata,
            "spec": {"backend": local_backend(&repo), "scheduleRef": {"name": "nightly"}}}),
    )
    .await;
    let series = |kind: &str| {
        format!(
            "stowage_repository_locks{{exclusive=\"{kind}\",namespace=\"{ns}\",schedule=\"nightly\"}}"
        )
    };
    let oldest = format!(
        "stowage_repository_oldest_lock_age_seconds{{namespace=\"{ns}\",schedule=\"nightly\"}}"
    );
    // While the backup waits: the exclusive lock it waits for and the shared one, the oldest being
    // the shared one's two minutes.
    wait_metrics(
        &c,
        "the lock gauges while the backup waits",
        Duration::from_secs(60),
        &[
            (series("true"), |v| v == 1.0),
            (series("false"), |v| v == 1.0),
            (oldest.clone(), |v| (120.0..600.0).contains(&v)),
        ],
    )
    .await;
    let b = Api::<Backup>::namespaced(client.clone(), &ns)
        .get("b1")
        .await
        .expect("b1");
    assert!(
        b.status
            .as_ref()
            .is_some_and(|s| s.phase == Some(stowage_api::RunPhase::Running)),
        "{b:?}"
    );
    std::fs::remove_file(repo.join("locks").join(&exclusive)).expect("the prune finishes");
    let done = wait_json::<Backup>(
        &client,
        &ns,
        "b1",
        Duration::from_secs(60),
        "finished",
        finished,
    )
    .await;
    assert_eq!(done["status"]["phase"], "Succeeded", "{done:#}");
    // At the run's end: the exclusive lock is gone, the backup removed its own, the shared one
    // stays.
    wait_metrics(
        &c,
        "the lock gauges after the run",
        Duration::from_secs(20),
        &[
            (series("true"), |v| v == 0.0),
            (series("false"), |v| v == 1.0),
        ],
    )
    .await;
    // Figures between runs: one snapshot, in the Schedule's status and its gauges.
    let s = wait_json::<Schedule>(
        &client,
        &ns,
        "nightly",
        Duration::from_secs(60),
        "figures in the Schedule's status",
        |v| v["status"]["repository"]["snapshots"] == 1,
    )
    .await;
    assert!(
        s["status"]["repository"]["sizeBytes"].as_u64().unwrap_or(0) > 0,
        "{s:#}"
    );
    assert!(s["status"]["repository"]["time"].is_string(), "{s:#}");
    let snapshots =
        format!("stowage_repository_snapshots{{namespace=\"{ns}\",schedule=\"nightly\"}}");
    wait_metrics(
        &c,
        "the snapshots gauge",
        Duration::from_secs(20),
        &[(snapshots, |v| v == 1.0)],
    )
    .await;
    let checks: Vec<Check> = Api::<Check>::namespaced(client.clone(), &ns)
        .list(&Default::default())
        .await
        .expect("checks")
        .items;
    assert!(checks.is_empty(), "no Check ran: {checks:?}");
    // The exposition, with the lock and figure families, passes Prometheus's own linter.
    let text = c.metrics_text().await;
    assert!(
        text.contains("# TYPE stowage_repository_locks gauge"),
        "{text}"
    );
    stowage_tests::promtool_check(&text);
}

/// Retention never forgets an identity's newest complete snapshot because newer partial ones
/// exist (a busy volume makes them routinely): `keepLast: 2` over three newer partial snapshots
/// keeps the two newest and the newest complete one; the older ones go.
#[tokio::test]
async fn retention_keeps_the_newest_complete_snapshot_behind_partial_ones() {
    let (cluster, client, ns, repo) = setup("retention-partial").await;
    stowage_tests::restic::init(&repo, PASSWORD);
    let src = tempfile::tempdir().expect("tmp");
    let now = Utc::now();
    // Oldest first: two complete, then three partial.
    for (n, partial) in [false, false, true, true, true].into_iter().enumerate() {
        std::fs::write(src.path().join("f"), format!("{n}")).expect("write");
        let time = (now - chrono::Duration::hours(10 - n as i64))
            .format("%Y-%m-%d %H:%M:%S")
            .to_string();
        let mut args = vec![
            "backup".to_string(),
            src.path().display().to_string(),
            "--host".into(),
            format!("{ns}/c"),
            "--tag".into(),
            format!("stowage.dev/namespace={ns}"),
            "--tag".into(),
            "stowage.dev/pvc=c".into(),
            "--time".into(),
            time,
        ];
        if partial {
            args.extend(["--tag".into(), "stowage.dev/partial=true".into()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = stowage_tests::restic::run(
            &repo.display().to_string(),
            PASSWORD,
            &[("TZ", "UTC")],
            &args,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut by_age = identity_snapshots(&repo, &ns, "c");
    by_age.sort_by_key(|(_, t)| *t);
    let ids: Vec<String> = by_age.into_iter().map(|(id, _)| id).collect();
    let _c = Coordinator::start(cluster, CoordinatorOptions::new(&ns)).await;
    let p = stowage_tests::coordinator::run_to_end::<Prune>(
        &client,
        &ns,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Prune",
            "metadata": {"name": "keep-two"},
            "spec": {"backend": local_backend(&repo), "retention": {"keepLast": 2}}}),
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(p["status"]["phase"], "Succeeded", "{p:#}");
    let kept: BTreeSet<String> = identity_snapshots(&repo, &ns, "c")
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let want: BTreeSet<String> = [&ids[1], &ids[3], &ids[4]].into_iter().cloned().collect();
    assert_eq!(kept, want, "the two newest and the newest complete one");
}
