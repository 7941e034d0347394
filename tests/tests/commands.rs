//! Application-aware backups on the local control plane, with the cluster's agents and real restic:
//! backup commands exec'd through kube-apiserver (kwok runs them as local processes) and streamed
//! into restic, excluded paths, pre/post hooks, and one command per owner of several replicas.
//!
//! Length: one suite, one file; each test is a scenario against the shared cluster.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{Patch, PatchParams};
use stowage_api::Backup;
use stowage_tests::cluster::Cluster;
use stowage_tests::coordinator::{
    Coordinator, CoordinatorOptions, create, finished, local_backend, run_to_end, wait_json,
};
use stowage_tests::env::{PASSWORD, TestEnv};

/// The shared test environment, taken apart, with its local repository initialised.
async fn setup(prefix: &str) -> (&'static Cluster, kube::Client, String, PathBuf) {
    let env = TestEnv::new(prefix).await;
    let repo = env.init_repo();
    let TestEnv {
        cluster,
        client,
        ns,
    } = env;
    (cluster, client, ns, repo)
}

/// Merges `annotations` into object `name` of kind `K`.
async fn annotate_obj<K>(client: &kube::Client, ns: &str, name: &str, annotations: &[(&str, &str)])
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let map: serde_json::Map<String, serde_json::Value> = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
        .collect();
    Api::<K>::namespaced(client.clone(), ns)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"metadata": {"annotations": map}})),
        )
        .await
        .expect("annotate");
}

async fn annotate(client: &kube::Client, ns: &str, pod: &str, annotations: &[(&str, &str)]) {
    annotate_obj::<Pod>(client, ns, pod, annotations).await;
}

async fn annotate_pvc(client: &kube::Client, ns: &str, pvc: &str, annotations: &[(&str, &str)]) {
    annotate_obj::<k8s_openapi::api::core::v1::PersistentVolumeClaim>(client, ns, pvc, annotations)
        .await;
}

/// Creates Backup `name` with its own backend and waits until it finishes.
async fn backup(client: &kube::Client, ns: &str, repo: &Path, name: &str) -> serde_json::Value {
    run_to_end::<Backup>(
        client,
        ns,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Backup",
            "metadata": {"name": name}, "spec": {"backend": local_backend(repo)}}),
        Duration::from_secs(120),
    )
    .await
}

fn item(b: &serde_json::Value, pred: impl Fn(&serde_json::Value) -> bool) -> &serde_json::Value {
    b["status"]["items"]
        .as_array()
        .and_then(|items| items.iter().find(|i| pred(i)))
        .unwrap_or_else(|| panic!("no such item in {b:#}"))
}

fn command_snapshots(repo: &Path) -> Vec<serde_json::Value> {
    stowage_tests::restic::snapshots(&repo.display().to_string(), PASSWORD)
        .into_iter()
        .filter(|s| {
            s["tags"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t == "stowage.dev/source=command"))
        })
        .collect()
}

/// A deterministic 50 MB stream, produced the same way in the pod (kwok runs it locally) and here.
const STREAM: &str =
    "python3 -c 'import random,sys; sys.stdout.buffer.write(random.Random(7).randbytes(50000000))'";

/// A command's stdout becomes a snapshot byte for byte; a failing command (exit 3 inside a pipeline) fails its item
/// with its exit status and stderr and leaves no snapshot; excluded paths are left out of the
/// volume's snapshot and everything else is in it.
#[tokio::test]
async fn a_command_stream_is_backed_up_byte_for_byte_and_a_failed_command_leaves_no_snapshot() {
    let (cluster, client, ns, repo) = setup("cmd").await;
    let dir = cluster.volume(&ns, "db-0", "data-db-0", "node-1", &[]);
    std::fs::write(dir.join("keep.txt"), b"keep").expect("write");
    std::fs::create_dir_all(dir.join("cache")).expect("mkdir");
    std::fs::write(dir.join("cache/big.bin"), vec![7u8; 4096]).expect("write");
    std::fs::write(dir.join("scratch.tmp"), b"tmp").expect("write");
    std::fs::create_dir_all(dir.join("sub")).expect("mkdir");
    std::fs::write(dir.join("sub/also.tmp"), b"tmp").expect("write");
    std::fs::write(dir.join("sub/kept.dat"), b"dat").expect("write");
    annotate_pvc(
        &client,
        &ns,
        "data-db-0",
        &[("stowage.dev/exclude", "cache/, *.tmp")],
    )
    .await;
    annotate(
        &client,
        &ns,
        "db-0",
        &[
            ("stowage.dev/backup-command", STREAM),
            ("stowage.dev/file-extension", ".bin"),
        ],
    )
    .await;
    cluster.volume(&ns, "broken-0", "data-broken-0", "node-2", &[]);
    annotate(
        &client,
        &ns,
        "broken-0",
        &[(
            "stowage.dev/backup-command",
            // The shape of `pg_dump | gzip`: the failure is inside the pipeline (pipefail).
            "(echo half a dump; echo 'pg_dump: connection refused' >&2; exit 3) | cat",
        )],
    )
    .await;
    let _c = Coordinator::start(cluster, CoordinatorOptions::new(&ns)).await;
    let b = backup(&client, &ns, &repo, "with-commands").await;
    assert_eq!(b["status"]["phase"], "PartiallyFailed", "{b:#}");

    let good = item(&b, |i| i["command"]["owner"] == "Pod/db-0");
    assert_eq!(good["phase"], "Succeeded", "{good:#}");
    assert_eq!(good["command"]["exitCode"], 0, "{good:#}");
    assert_eq!(good["command"]["streamBytes"], 50_000_000, "{good:#}");
    assert_eq!(good["node"], "node-1");
    let bad = item(&b, |i| i["command"]["owner"] == "Pod/broken-0");
    assert_eq!(bad["phase"], "Failed", "{bad:#}");
    assert_eq!(bad["command"]["exitCode"], 3, "{bad:#}");
    let error = bad["error"].as_str().unwrap_or_default();
    assert!(error.contains("exited with status 3"), "{error}");
    assert!(error.contains("pg_dump: connection refused"), "{error}");
    assert!(error.contains("no snapshot was made"), "{error}");

    // Exactly one command snapshot: the good one, tagged with its owner.
    let snaps = command_snapshots(&repo);
    assert_eq!(snaps.len(), 1, "{snaps:#?}");
    let tags = snaps[0]["tags"].as_array().cloned().unwrap_or_default();
    assert!(
        tags.iter().any(|t| t == "stowage.dev/owner=Pod/db-0"),
        "{tags:?}"
    );
    assert!(
        tags.iter().any(|t| t == "stowage.dev/container=app"),
        "{tags:?}"
    );
    let id = snaps[0]["id"].as_str().expect("id");
    let file = format!("/{ns}-db-0-app.bin");
    let dumped = stowage_tests::restic::run(
        &repo.display().to_string(),
        PASSWORD,
        &[],
        &["dump", id, &file],
    );
    assert!(
        dumped.status.success(),
        "{}",
        String::from_utf8_lossy(&dumped.stderr)
    );
    let expected = std::process::Command::new("sh")
        .args(["-c", STREAM])
        .output()
        .expect("the same stream here");
    assert_eq!(dumped.stdout.len(), 50_000_000);
    assert!(
        dumped.stdout == expected.stdout,
        "the snapshot differs from the stream"
    );

    // The agent of node-1 counted the stream and the command.
    let metrics_url = &cluster.env["STOWAGE_AGENT_1_METRICS"];
    let addr: std::net::SocketAddr = metrics_url
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .parse()
        .expect("agent metrics address");
    let (_, text) = stowage_tests::http_get(addr, "/metrics")
        .await
        .expect("agent metrics");
    let value = |s: &str| stowage_tests::agent::metric_value(&text, s).unwrap_or(0.0);
    assert!(
        value("stowage_agent_stream_bytes_total") >= 50_000_000.0,
        "{text}"
    );
    assert!(
        value("stowage_agent_hook_runs_total{kind=\"backup-command\",result=\"succeeded\"}") >= 1.0,
        "{text}"
    );

    // The volume's snapshot: everything but the excluded paths.
    let vol = item(&b, |i| i["pvc"] == "data-db-0");
    assert_eq!(vol["phase"], "Succeeded", "{vol:#}");
    let sid = vol["snapshotId"].as_str().expect("snapshot id");
    let listing = stowage_tests::restic::ok(&repo.display().to_string(), PASSWORD, &["ls", sid]);
    for present in ["/keep.txt", "/sub/kept.dat"] {
        assert!(
            listing.lines().any(|l| l == present),
            "{present} missing:\n{listing}"
        );
    }
    for absent in ["/cache", "/scratch.tmp", "/sub/also.tmp"] {
        assert!(
            !listing.lines().any(|l| l.starts_with(absent)),
            "{absent} was not excluded:\n{listing}"
        );
    }
}

/// Whether any process's command line contains `marker`.
fn process_with(marker: &str) -> bool {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .any(|c| String::from_utf8_lossy(&c).contains(marker))
}

/// A command that outlives its timeout is killed, with what it started: nothing is left running,
/// the item fails, and there is no snapshot.
#[tokio::test]
async fn a_command_over_its_timeout_is_killed_with_its_children() {
    let (cluster, client, ns, repo) = setup("cmdtimeout").await;
    cluster.volume(&ns, "slow-0", "data-slow-0", "node-3", &[]);
    // A pipeline: the shell, and a child that would outlive a naive kill of the shell alone.
    let marker = format!("61{}", std::process::id() % 10_000);
    let command = format!("sleep {marker} | cat");
    annotate(
        &client,
        &ns,
        "slow-0",
        &[
            ("stowage.dev/backup-command", &command),
            ("stowage.dev/backup-timeout", "3s"),
        ],
    )
    .await;
    let _c = Coordinator::start(cluster, CoordinatorOptions::new(&ns)).await;
    let b = backup(&client, &ns, &repo, "slow").await;
    let cmd = item(&b, |i| i["command"]["owner"] == "Pod/slow-0");
    assert_eq!(cmd["phase"], "Failed", "{cmd:#}");
    let error = cmd["error"].as_str().unwrap_or_default();
    assert!(error.contains("did not finish within 3s"), "{error}");
    stowage_tests::wait_until(
        "the command's processes to be gone",
        Duration::from_secs(10),
        || !process_with(&format!("sleep {marker}")),
    )
    .await;
    assert!(command_snapshots(&repo).is_empty());
}

/// A failing pre-hook with on-error Fail keeps the pod's volume out of the backup and says why;
/// with Continue the volume is backed up. The post-hook runs in both cases.
#[tokio::test]
async fn pre_hook_failures_fail_or_continue_and_the_post_hook_always_runs() {
    let (cluster, client, ns, repo) = setup("hooks").await;
    let strict = cluster.volume(&ns, "strict-0", "data-strict-0", "node-1", &[]);
    std::fs::write(strict.join("f"), b"strict").expect("write");
    let lenient = cluster.volume(&ns, "lenient-0", "data-lenient-0", "node-2", &[]);
    std::fs::write(lenient.join("f"), b"lenient").expect("write");
    // kwok runs each pod's commands in a directory of its own: the post-hook leaves a mark there.
    for (pod, on_error) in [("strict-0", "Fail"), ("lenient-0", "Continue")] {
        annotate(
            &client,
            &ns,
            pod,
            &[
                (
                    "stowage.dev/pre-backup-command",
                    "echo frozen? no >&2; exit 4",
                ),
                ("stowage.dev/post-backup-command", "touch post-ran"),
                ("stowage.dev/hook-on-error", on_error),
                ("stowage.dev/hook-timeout", "20s"),
            ],
        )
        .await;
    }
    let _c = Coordinator::start(cluster, CoordinatorOptions::new(&ns)).await;
    let b = backup(&client, &ns, &repo, "hooked").await;
    assert_eq!(b["status"]["phase"], "PartiallyFailed", "{b:#}");
    let s = item(&b, |i| i["pvc"] == "data-strict-0");
    assert_eq!(s["phase"], "Failed", "{s:#}");
    assert!(s["snapshotId"].is_null(), "{s:#}");
    let error = s["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("pre-backup hook `echo frozen? no >&2; exit 4` exited with status 4"),
        "{error}"
    );
    assert!(error.contains("were not backed up"), "{error}");
    let l = item(&b, |i| i["pvc"] == "data-lenient-0");
    assert_eq!(l["phase"], "Succeeded", "{l:#}");
    for i in [s, l] {
        assert_eq!(i["hooks"]["pre"]["exitCode"], 4, "{i:#}");
        assert_eq!(i["hooks"]["post"]["exitCode"], 0, "{i:#}");
        assert!(i["hooks"]["pre"]["durationSeconds"].is_number(), "{i:#}");
    }
    for pod in ["strict-0", "lenient-0"] {
        let mark = cluster
            .dir
            .join("exec")
            .join(&ns)
            .join(pod)
            .join("post-ran");
        assert!(
            mark.exists(),
            "the post-hook of {pod} did not run ({})",
            mark.display()
        );
    }
}

/// A Deployment of three replicas with the command on its template: one command run, in one
/// replica, and one snapshot, whose identity is the Deployment.
#[tokio::test]
async fn three_replicas_of_a_deployment_dump_once() {
    let (cluster, client, ns, repo) = setup("replicas").await;
    let marker = format!("replica-ran-{}", std::process::id());
    let deployment: k8s_openapi::api::apps::v1::Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"},
                    "annotations": {"stowage.dev/backup-command": format!("touch {marker}-$(hostname)-$$; echo dump")}},
                "spec": {"containers": [{"name": "web", "image": "registry.invalid/web:1"}]}
            }
        }
    }))
    .expect("deployment");
    Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(client.clone(), &ns)
        .create(&Default::default(), &deployment)
        .await
        .expect("create deployment");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    stowage_tests::cluster::wait_for("three ready replicas", Duration::from_secs(90), || {
        let pods = pods.clone();
        async move {
            pods.list(&Default::default())
                .await
                .map(|l| {
                    l.items
                        .iter()
                        .filter(|p| {
                            p.status
                                .as_ref()
                                .and_then(|s| s.conditions.as_ref())
                                .is_some_and(|c| {
                                    c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                                })
                        })
                        .count()
                        == 3
                })
                .unwrap_or(false)
        }
    })
    .await;
    let _c = Coordinator::start(cluster, CoordinatorOptions::new(&ns)).await;
    let b = backup(&client, &ns, &repo, "once").await;
    assert_eq!(b["status"]["phase"], "Succeeded", "{b:#}");
    let items = b["status"]["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 1, "{b:#}");
    assert_eq!(items[0]["command"]["owner"], "Deployment/web", "{b:#}");
    let snaps = command_snapshots(&repo);
    assert_eq!(snaps.len(), 1, "{snaps:#?}");
    // The command ran once: one mark across the replicas' exec directories.
    let marks = std::fs::read_dir(cluster.dir.join("exec").join(&ns))
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .filter(|f| f.file_name().to_string_lossy().starts_with(&marker))
        .count();
    let cwd_marks = std::fs::read_dir(cluster.dir.join("exec"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|f| f.file_name().to_string_lossy().starts_with(&marker))
        .count();
    assert_eq!(
        marks + cwd_marks,
        1,
        "the command ran {} times",
        marks + cwd_marks
    );
}

fn prebackup_pod(name: &str, command: &str) -> serde_json::Value {
    serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "PreBackupPod",
        "metadata": {"name": name},
        "spec": {"backupCommand": command, "fileExtension": ".sql",
            "pod": {"metadata": {"labels": {"app": "dump"}},
                    "spec": {"containers": [{"name": "dump", "image": "registry.invalid/mysql:8",
                                             "command": ["sleep", "infinity"]}]}}}})
}

/// Pods made from PreBackupPods in `ns` that still exist (deleting ones included).
async fn prebackup_pods(client: &kube::Client, ns: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), ns)
        .list(&kube::api::ListParams::default().labels("stowage.dev/prebackup-pod"))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A PreBackupPod: its pod is started on a node with an agent, the command's output becomes a
/// snapshot, and the pod is deleted. A namespace with nothing but it is a valid run.
#[tokio::test]
async fn a_prebackup_pod_is_started_streamed_and_deleted() {
    let (cluster, client, ns, repo) = setup("prebackup").await;
    let _: stowage_api::PreBackupPod = create(
        &client,
        &ns,
        prebackup_pod("mysqldump", "printf 'CREATE TABLE t (id int);\\n'"),
    )
    .await;
    let _c = Coordinator::start(cluster, CoordinatorOptions::new(&ns)).await;
    let b = backup(&client, &ns, &repo, "with-helper").await;
    assert_eq!(b["status"]["phase"], "Succeeded", "{b:#}");
    let i = item(&b, |i| i["command"]["owner"] == "PreBackupPod/mysqldump");
    assert_eq!(i["command"]["streamBytes"], 25, "{i:#}");
    let pod = i["pod"].as_str().expect("the pod's name").to_string();
    assert!(pod.starts_with("mysqldump-pre-"), "{pod}");
    let snaps = command_snapshots(&repo);
    assert_eq!(snaps.len(), 1, "{snaps:#?}");
    let id = snaps[0]["id"].as_str().expect("id");
    let file = format!("/{ns}-mysqldump-dump.sql");
    let dumped =
        stowage_tests::restic::ok(&repo.display().to_string(), PASSWORD, &["dump", id, &file]);
    assert_eq!(dumped, "CREATE TABLE t (id int);\n");
    stowage_tests::cluster::wait_for(
        "the PreBackupPod's pod to be deleted",
        Duration::from_secs(30),
        || {
            let client = client.clone();
            let ns = ns.clone();
            async move { prebackup_pods(&client, &ns).await.is_empty() }
        },
    )
    .await;
}

/// A coordinator killed while a PreBackupPod's pod exists: the next one resumes the run, and the
/// pod is gone when the run ends.
#[tokio::test]
async fn a_prebackup_pod_is_cleaned_up_after_a_coordinator_restart() {
    let (cluster, client, ns, repo) = setup("prerestart").await;
    let _: stowage_api::PreBackupPod = create(
        &client,
        &ns,
        prebackup_pod("slowdump", "sleep 4; echo done"),
    )
    .await;
    let mut first = Coordinator::start(cluster, CoordinatorOptions::new(&ns)).await;
    let _: Backup = create(
        &client,
        &ns,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Backup",
            "metadata": {"name": "interrupted"}, "spec": {"backend": local_backend(&repo)}}),
    )
    .await;
    stowage_tests::cluster::wait_for(
        "the PreBackupPod's pod to run",
        Duration::from_secs(60),
        || {
            let client = client.clone();
            let ns = ns.clone();
            async move { prebackup_pods(&client, &ns).await.iter().any(is_ready) }
        },
    )
    .await;
    first.kill();
    assert_eq!(
        prebackup_pods(&client, &ns).await.len(),
        1,
        "the pod outlived its coordinator"
    );
    let mut opts = CoordinatorOptions::new(&ns);
    opts.identity = format!("{}-second", opts.identity);
    let _second = Coordinator::start(cluster, opts).await;
    let b = wait_json::<Backup>(
        &client,
        &ns,
        "interrupted",
        Duration::from_secs(120),
        "finished",
        finished,
    )
    .await;
    assert_eq!(b["status"]["phase"], "Succeeded", "{b:#}");
    stowage_tests::cluster::wait_for("no PreBackupPod pods left", Duration::from_secs(30), || {
        let client = client.clone();
        let ns = ns.clone();
        async move { prebackup_pods(&client, &ns).await.is_empty() }
    })
    .await;
}

/// A pod whose backup-command annotation is 200 KiB (Linux refuses one argument above 128 KiB, so
/// the command cannot even start): the run ends, the item fails with a bounded sentence, the
/// status shows 256 bytes of the command, and no log line of the coordinator or the agent carries
/// more than a few hundred bytes of it.
#[tokio::test]
async fn a_200_kib_backup_command_is_bounded_in_status_and_logs() {
    let (cluster, client, ns, repo) = setup("hugecmd").await;
    cluster.volume(&ns, "huge-0", "data-huge-0", "node-1", &[]);
    let command = format!(": {}; echo dump", "x".repeat(200 * 1024));
    annotate(
        &client,
        &ns,
        "huge-0",
        &[("stowage.dev/backup-command", &command)],
    )
    .await;
    let c = Coordinator::start(cluster, CoordinatorOptions::new(&ns)).await;
    let b = backup(&client, &ns, &repo, "huge").await;
    let i = item(&b, |i| i["command"].is_object());
    let shown = i["command"]["command"].as_str().expect("the command shown");
    assert!(shown.len() <= 260, "{} bytes shown", shown.len());
    assert_eq!(i["phase"], "Failed", "{i:#}");
    let error = i["error"].as_str().expect("error");
    assert!(error.len() <= 520, "{} bytes of error", error.len());
    let status = serde_json::to_vec(&b["status"]).expect("json").len();
    assert!(status < 8 * 1024, "the status is {status} bytes");
    let longest_run = |text: &str| {
        text.split(|c| c != 'x')
            .map(str::len)
            .max()
            .unwrap_or_default()
    };
    let agent_log = std::fs::read_to_string(cluster.dir.join("logs/agent-node-1.log"))
        .expect("the agent's log");
    for (who, log) in [("coordinator", c.log_text()), ("agent", agent_log)] {
        let run = longest_run(&log);
        assert!(
            run <= 300,
            "the {who}'s log holds {run} bytes of the command"
        );
    }
}

/// A run resumed after a coordinator restart, whose PreBackupPod command had already made its
/// snapshot (tagged with the run) before the restart: the command is not run again (no pod, no
/// second dump into the database's neighbour), and the item records the earlier snapshot.
#[tokio::test]
async fn a_resumed_run_does_not_run_a_command_whose_snapshot_it_already_made() {
    let (cluster, client, ns, repo) = setup("cmdresume").await;
    let marker = cluster
        .dir
        .join(format!("cmdresume-{}", std::process::id()));
    let _: stowage_api::PreBackupPod = create(
        &client,
        &ns,
        prebackup_pod("dump", &format!("touch {}; echo dump", marker.display())),
    )
    .await;
    // What the earlier leader's attempt left: the command's snapshot, tagged with the run.
    let repo_s = repo.display().to_string();
    let tags = [
        format!("stowage.dev/namespace={ns}"),
        "stowage.dev/owner=PreBackupPod/dump".into(),
        "stowage.dev/container=dump".into(),
        "stowage.dev/source=command".into(),
        "stowage.dev/pod=dump-pre-0".into(),
        format!("stowage.dev/run={ns}/resumed"),
    ];
    let mut args = vec![
        "backup",
        "--stdin-filename",
        "dump.sql",
        "--host",
        "earlier",
    ];
    for t in &tags {
        args.extend(["--tag", t.as_str()]);
    }
    args.extend(["--stdin-from-command", "--", "echo", "earlier dump"]);
    stowage_tests::restic::ok(&repo_s, PASSWORD, &args);
    let earlier = command_snapshots(&repo);
    assert_eq!(earlier.len(), 1);
    let earlier_id = earlier[0]["short_id"].as_str().expect("id").to_string();
    let _: Backup = create(
        &client,
        &ns,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Backup",
            "metadata": {"name": "resumed"}, "spec": {"backend": local_backend(&repo)}}),
    )
    .await;
    Api::<Backup>::namespaced(client.clone(), &ns)
        .patch_status(
            "resumed",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {
                "phase": "Running", "startTime": "2026-12-06T00:00:00Z"}})),
        )
        .await
        .expect("the earlier leader's status");
    let _c = Coordinator::start(cluster, CoordinatorOptions::new(&ns)).await;
    let b = stowage_tests::coordinator::wait_json::<Backup>(
        &client,
        &ns,
        "resumed",
        Duration::from_secs(120),
        "a finished phase",
        stowage_tests::coordinator::finished,
    )
    .await;
    assert_eq!(b["status"]["phase"], "Succeeded", "{b:#}");
    let i = item(&b, |i| i["command"]["owner"] == "PreBackupPod/dump");
    assert_eq!(i["snapshotId"], earlier_id.as_str(), "{i:#}");
    assert_eq!(command_snapshots(&repo).len(), 1, "no second dump");
    assert!(!marker.exists(), "the command ran again");
    assert!(
        prebackup_pods(&client, &ns).await.is_empty(),
        "no pod was started"
    );
}

/// Fifty PreBackupPods whose pods can never become ready (a node selector no node has) in one
/// run of namespace a: at most two of them are starting at once
/// (--max-starting-prebackup-pods-per-namespace 2, below the cluster's 5), the others wait for a
/// slot at most the timeout, and the run ends with every item failed and saying why, its pods
/// deleted. Meanwhile namespace b's PreBackupPod, watched by the same coordinator, starts at once
/// and its backup succeeds while a's run still waits: a namespace cannot hold every start slot.
#[tokio::test]
async fn fifty_never_ready_prebackup_pods_hold_their_namespace_share_and_the_run_ends() {
    let (cluster, client, ns, repo) = setup("prestuck").await;
    let (_, _, other, other_repo) = setup("prefair").await;
    for i in 0..50 {
        let mut pbp = prebackup_pod(&format!("stuck-{i:02}"), "echo never");
        pbp["spec"]["pod"]["spec"]["nodeSelector"] =
            serde_json::json!({"stowage.dev/no-such-node": "true"});
        let _: stowage_api::PreBackupPod = create(&client, &ns, pbp).await;
    }
    let _: stowage_api::PreBackupPod =
        create(&client, &other, prebackup_pod("dump", "echo dump")).await;
    let mut opts = CoordinatorOptions::new(&ns);
    opts.extra_args = [
        "--namespace",
        &other,
        "--max-starting-prebackup-pods",
        "5",
        "--max-starting-prebackup-pods-per-namespace",
        "2",
        "--prebackup-pod-timeout",
        "15s",
    ]
    .map(String::from)
    .to_vec();
    let _c = Coordinator::start(cluster, opts).await;
    let (watch_client, watch_ns) = (client.clone(), ns.clone());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_watch = std::sync::Arc::clone(&stop);
    let observer = tokio::spawn(async move {
        let mut max = 0usize;
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while !stop_watch.load(std::sync::atomic::Ordering::SeqCst)
            && std::time::Instant::now() < deadline
        {
            let starting = prebackup_pods(&watch_client, &watch_ns)
                .await
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .count();
            max = max.max(starting);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        max
    });
    let started = std::time::Instant::now();
    let stuck = {
        let (client, ns, repo) = (client.clone(), ns.clone(), repo.clone());
        tokio::spawn(async move {
            let b = backup(&client, &ns, &repo, "stuck").await;
            (b, std::time::Instant::now())
        })
    };
    stowage_tests::cluster::wait_for("a's pods to be starting", Duration::from_secs(30), || {
        let client = client.clone();
        let ns = ns.clone();
        async move { prebackup_pods(&client, &ns).await.len() >= 2 }
    })
    .await;
    let fair = backup(&client, &other, &other_repo, "fair").await;
    let fair_done = std::time::Instant::now();
    assert_eq!(fair["status"]["phase"], "Succeeded", "{fair:#}");
    let (b, stuck_done) = stuck.await.expect("join");
    let took = stuck_done - started;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let max = observer.await.expect("observer");
    assert!(
        fair_done < stuck_done,
        "b's backup ended while a's run still waited"
    );
    assert_eq!(b["status"]["phase"], "Failed", "{b:#}");
    let items = b["status"]["items"].as_array().expect("items");
    assert_eq!(items.len(), 50, "{b:#}");
    let (mut not_ready, mut no_slot) = (0, 0);
    for i in items {
        assert_eq!(i["phase"], "Failed", "{i:#}");
        let e = i["error"].as_str().expect("an error");
        if e.contains("was not ready within 15s") {
            not_ready += 1;
        } else if e.contains("no start slot within 15s")
            && e.contains("--max-starting-prebackup-pods-per-namespace")
        {
            no_slot += 1;
        } else {
            panic!("unexpected error: {e}");
        }
    }
    assert!(
        not_ready >= 2 && no_slot >= 1,
        "{not_ready} not ready, {no_slot} without a slot"
    );
    assert!(
        max <= 2,
        "{max} PreBackupPod pods of the namespace existed at once"
    );
    assert!(took < Duration::from_secs(90), "the run took {took:?}");
    stowage_tests::cluster::wait_for("no PreBackupPod pods left", Duration::from_secs(30), || {
        let client = client.clone();
        let ns = ns.clone();
        async move {
            prebackup_pods(&client, &ns)
                .await
                .iter()
                .all(|p| p.metadata.deletion_timestamp.is_some())
        }
    })
    .await;
}

/// Twenty PreBackupPods in one run with --max-starting-prebackup-pods 4: never more than four of
/// their pods are starting (created, not yet ready) at once, and every command runs.
#[tokio::test]
async fn twenty_prebackup_pods_start_at_most_four_at_a_time() {
    let (cluster, client, ns, repo) = setup("prelimit").await;
    for i in 0..20 {
        let _: stowage_api::PreBackupPod = create(
            &client,
            &ns,
            prebackup_pod(&format!("dump-{i:02}"), "echo dump"),
        )
        .await;
    }
    let mut opts = CoordinatorOptions::new(&ns);
    opts.extra_args = [
        "--max-starting-prebackup-pods",
        "4",
        "--max-starting-prebackup-pods-per-namespace",
        "4",
    ]
    .map(String::from)
    .to_vec();
    let _c = Coordinator::start(cluster, opts).await;
    let (watch_client, watch_ns) = (client.clone(), ns.clone());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_watch = std::sync::Arc::clone(&stop);
    let observer = tokio::spawn(async move {
        let (mut max, mut seen) = (0usize, 0usize);
        let deadline = std::time::Instant::now() + Duration::from_secs(240);
        while !stop_watch.load(std::sync::atomic::Ordering::SeqCst)
            && std::time::Instant::now() < deadline
        {
            let pods = prebackup_pods(&watch_client, &watch_ns).await;
            let starting = pods
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none() && !is_ready(p))
                .count();
            max = max.max(starting);
            seen = seen.max(pods.len());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (max, seen)
    });
    let b = backup(&client, &ns, &repo, "many").await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (max, seen) = observer.await.expect("observer");
    assert_eq!(b["status"]["phase"], "Succeeded", "{b:#}");
    assert_eq!(
        b["status"]["items"].as_array().map(Vec::len),
        Some(20),
        "{b:#}"
    );
    assert!(max <= 4, "{max} pods were starting at once");
    assert!(max >= 1 && seen >= 1, "the observer saw no pod starting");
    assert_eq!(command_snapshots(&repo).len(), 20);
    assert!(
        prebackup_pods(&client, &ns)
            .await
            .iter()
            .all(|p| p.metadata.deletion_timestamp.is_some())
    );
}
