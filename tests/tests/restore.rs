//! Restore runs on the local control plane, with real agents and real restic: in place while the
//! pod runs, through a mount holder, Replace (and a Replace whose agent dies), snapshot selection,
//! refusals, and a backup command's dump streamed into a restore command.
//!
//! Length: one suite, one file; each test is a scenario against the shared cluster.

use std::ops::Deref;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{Patch, PatchParams};
use stowage_api::{Backup, Restore};
use stowage_tests::cluster::wait_for;
use stowage_tests::coordinator::{
    Coordinator, CoordinatorOptions, PrivateAgents, condition, finished, local_backend, wait_event,
    wait_json,
};
use stowage_tests::env::{PASSWORD, TestEnv};
use stowage_tests::fstree;

const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// The shared test environment, with the test's local repository initialised.
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
    let repo = base.init_repo();
    Env { base, repo }
}

impl Env {
    async fn backup(&self, name: &str, backend: serde_json::Value) -> serde_json::Value {
        let b = self
            .run::<Backup>(name, serde_json::json!({"backend": backend}), RUN_TIMEOUT)
            .await;
        assert_eq!(b["status"]["phase"], "Succeeded", "{b:#}");
        b
    }

    async fn create_restore(&self, name: &str, spec: serde_json::Value) {
        let mut spec = spec;
        if spec.get("backend").is_none() {
            spec["backend"] = local_backend(&self.repo);
        }
        let _: Restore = self.create_run(name, spec).await;
    }

    async fn restore(&self, name: &str, spec: serde_json::Value) -> serde_json::Value {
        self.create_restore(name, spec).await;
        self.wait_run::<Restore>(name, RUN_TIMEOUT).await
    }

    async fn pod_uid(&self, pod: &str) -> String {
        Api::<Pod>::namespaced(self.client.clone(), &self.ns)
            .get(pod)
            .await
            .expect("pod")
            .metadata
            .uid
            .expect("uid")
    }
}

fn succeeded(r: &serde_json::Value) {
    assert_eq!(r["status"]["phase"], "Succeeded", "{r:#}");
}

/// The condition's reason and message of a failed Restore.
fn failed_with(r: &serde_json::Value, reason: &str, needle: &str) {
    assert_eq!(r["status"]["phase"], "Failed", "{r:#}");
    let c = condition(r, "Succeeded").expect("condition");
    assert_eq!(c["reason"], reason, "{c}");
    let m = c["message"].as_str().unwrap_or_default();
    assert!(m.contains(needle), "{needle:?} not in {m:?}");
}

/// Merge in place into a running pod's volume brings back deleted and changed files and keeps new
/// ones; the pod is the same pod afterwards. A staging directory left in the volume is never backed
/// up. Then the snapshot, restored IntoEmpty into an unmounted PVC through a read-write mount
/// holder, equals the original tree byte for byte: modes, owners, mtimes, symlinks, hard links,
/// sparse files and empty directories.
#[tokio::test]
async fn merge_in_place_while_the_pod_runs_and_an_exact_copy_through_a_mount_holder() {
    let env = setup("restore-merge").await;
    let dir = env.mounted("data", "node-1", ".mounted").await;
    let tree = dir.join("tree");
    fstree::populate(&tree, 3 << 20);
    std::fs::hard_link(tree.join("run.sh"), tree.join("run-hardlink.sh")).expect("hard link");
    {
        let f = std::fs::File::create(tree.join("sparse.img")).expect("sparse");
        f.set_len(64 << 20).expect("set_len");
    }
    std::fs::write(dir.join("gone.txt"), b"deleted later").expect("write");
    std::fs::write(dir.join("changed.txt"), b"original").expect("write");
    // Named like a restore's staging: a backup never captures it.
    std::fs::create_dir_all(dir.join(".stowage-restore-leftover/data")).expect("mkdir");
    std::fs::write(dir.join(".stowage-restore-leftover/data/x"), b"x").expect("write");
    let original = fstree::snapshot(&tree);
    let _c = Coordinator::start(env.cluster, CoordinatorOptions::new(&env.ns)).await;
    let b = env.backup("before", local_backend(&env.repo)).await;
    let snap_id = b["status"]["items"][0]["snapshotId"]
        .as_str()
        .expect("snapshot")
        .to_string();
    let listed =
        stowage_tests::restic::ok(&env.repo.display().to_string(), PASSWORD, &["ls", &snap_id]);
    assert!(listed.contains("changed.txt"), "{listed}");
    assert!(!listed.contains(".stowage-restore-"), "{listed}");

    let uid = env.pod_uid("data-0").await;
    std::fs::remove_file(dir.join("gone.txt")).expect("rm");
    std::fs::write(dir.join("changed.txt"), b"changed by the app").expect("write");
    std::fs::write(dir.join("new.txt"), b"written after the backup").expect("write");
    let r = env
        .restore("undo", serde_json::json!({"source": {"pvc": "data"}}))
        .await;
    succeeded(&r);
    let st = &r["status"]["restore"];
    assert!(
        snap_id.starts_with(st["snapshotId"].as_str().expect("snapshotId")),
        "{st}"
    );
    assert_eq!(st["node"], "node-1");
    assert_eq!(st["pod"], "data-0");
    assert!(
        st["filesRestored"].as_u64().is_some_and(|n| n >= 12),
        "{st}"
    );
    assert!(
        st["bytesRestored"].as_u64().is_some_and(|n| n >= 3 << 20),
        "{st}"
    );
    assert!(st["durationSeconds"].as_f64().is_some(), "{st}");
    assert_eq!(
        std::fs::read(dir.join("gone.txt")).expect("back"),
        b"deleted later"
    );
    assert_eq!(
        std::fs::read(dir.join("changed.txt")).expect("reverted"),
        b"original"
    );
    assert_eq!(
        std::fs::read(dir.join("new.txt")).expect("kept"),
        b"written after the backup"
    );
    assert_eq!(env.pod_uid("data-0").await, uid, "the pod kept running");
    assert!(
        !dir.join(".stowage-restore-leftover").exists(),
        "the leftover staging directory was cleaned up"
    );
    fstree::assert_same(&original, &fstree::snapshot(&tree));
    wait_event(
        &env.client,
        &env.ns,
        "undo",
        "Restored",
        "restored snapshot",
        Duration::from_secs(30),
    )
    .await;

    // The same snapshot into an unmounted PVC: a read-write holder, an exact copy, holder gone.
    let copy = env
        .cluster
        .volume(&env.ns, "unused", "copy", "node-2", &["--no-pod"]);
    let r = env
        .restore(
            "copy",
            serde_json::json!({"source": {"pvc": "data", "snapshot": snap_id},
                "target": {"pvc": "copy", "mode": "IntoEmpty"}}),
        )
        .await;
    succeeded(&r);
    let holder = r["status"]["restore"]["pod"].as_str().expect("pod");
    assert!(holder.starts_with("copy-hold-"), "{holder}");
    fstree::assert_same(&original, &fstree::snapshot(&copy.join("tree")));
    let a = std::fs::metadata(copy.join("tree/run.sh")).expect("stat");
    let h = std::fs::metadata(copy.join("tree/run-hardlink.sh")).expect("stat");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(a.ino(), h.ino(), "hard links stay linked");
    let sparse = std::fs::metadata(copy.join("tree/sparse.img")).expect("stat");
    assert_eq!(sparse.len(), 64 << 20);
    assert!(
        sparse.blocks() * 512 < 8 << 20,
        "sparse stays sparse: {} blocks",
        sparse.blocks()
    );
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    wait_for("the holder pod gone", Duration::from_secs(30), || async {
        pods.get_opt(holder)
            .await
            .expect("get")
            .is_none_or(|p| p.metadata.deletion_timestamp.is_some())
    })
    .await;
}

/// Snapshot selection and refusals: `latest` among two PVCs of one repository picks the right
/// PVC's; `before:` the newest at or before the time; `include` restores only those paths, under
/// `target.path`. IntoEmpty on a non-empty target, another namespace's snapshots, `..` and a
/// symlink that leaves the volume are refused, and nothing is written.
#[tokio::test]
async fn selection_include_path_and_refusals() {
    let env = setup("restore-select").await;
    let a = env.mounted("alpha", "node-2", ".mounted").await;
    let b = env.mounted("beta", "node-2", ".mounted").await;
    std::fs::create_dir_all(a.join("db/base")).expect("mkdir");
    std::fs::write(a.join("db/base/table"), b"v1").expect("write");
    std::fs::write(a.join("top.txt"), b"alpha v1").expect("write");
    std::fs::write(b.join("top.txt"), b"beta only").expect("write");
    let _c = Coordinator::start(env.cluster, CoordinatorOptions::new(&env.ns)).await;
    env.backup("first", local_backend(&env.repo)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let between = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    std::fs::write(a.join("db/base/table"), b"v2").expect("write");
    std::fs::write(a.join("top.txt"), b"alpha v2").expect("write");
    // The newest snapshot in the repository is beta's.
    env.backup("second", local_backend(&env.repo)).await;
    std::fs::write(b.join("top.txt"), b"beta newer").expect("write");
    env.backup("third", local_backend(&env.repo)).await;

    let r = env
        .restore(
            "latest",
            serde_json::json!({"source": {"pvc": "alpha"}, "target": {"path": "/out/latest"}}),
        )
        .await;
    succeeded(&r);
    assert_eq!(
        std::fs::read(a.join("out/latest/top.txt")).expect("latest"),
        b"alpha v2",
        "alpha's newest, never beta's"
    );
    let r = env
        .restore(
            "before",
            serde_json::json!({"source": {"pvc": "alpha", "before": between},
                "target": {"path": "out/before"}}),
        )
        .await;
    succeeded(&r);
    assert_eq!(
        std::fs::read(a.join("out/before/top.txt")).expect("before"),
        b"alpha v1"
    );
    let r = env
        .restore(
            "partial",
            serde_json::json!({"source": {"pvc": "alpha", "include": ["/db/base"]},
                "target": {"path": "partial"}}),
        )
        .await;
    succeeded(&r);
    assert_eq!(
        std::fs::read(a.join("partial/db/base/table")).expect("included"),
        b"v2"
    );
    assert!(
        !a.join("partial/top.txt").exists(),
        "only the included path"
    );

    // Refusals. Nothing may change in either volume.
    let outside = tempfile::tempdir().expect("tmp");
    std::os::unix::fs::symlink(outside.path(), a.join("escape")).expect("symlink");
    let before = fstree::snapshot(&a);
    let r = env
        .restore(
            "into-empty",
            serde_json::json!({"source": {"pvc": "alpha"}, "target": {"mode": "IntoEmpty"}}),
        )
        .await;
    failed_with(&r, "RestoreFailed", "not empty");
    let r = env
        .restore(
            "other-ns",
            serde_json::json!({"source": {"pvc": "alpha", "namespace": "kube-system"}}),
        )
        .await;
    failed_with(&r, "CrossNamespaceRefused", "spec.source.namespace");
    wait_event(
        &env.client,
        &env.ns,
        "other-ns",
        "CrossNamespaceRefused",
        "kube-system",
        Duration::from_secs(30),
    )
    .await;
    let r = env
        .restore(
            "traversal",
            serde_json::json!({"source": {"pvc": "alpha"}, "target": {"path": "../../etc"}}),
        )
        .await;
    failed_with(&r, "InvalidRestore", "spec.target.path");
    let r = env
        .restore(
            "symlink",
            serde_json::json!({"source": {"pvc": "alpha"}, "target": {"path": "escape/in"}}),
        )
        .await;
    failed_with(&r, "RestoreFailed", "symlink");
    let r = env
        .restore(
            "missing",
            serde_json::json!({"source": {"pvc": "alpha", "snapshot": "deadbeef"}}),
        )
        .await;
    failed_with(&r, "SnapshotNotFound", "deadbeef");
    fstree::assert_same(&before, &fstree::snapshot(&a));
    assert!(
        std::fs::read_dir(outside.path())
            .expect("outside")
            .next()
            .is_none(),
        "nothing written outside the volume"
    );
}

/// Starts a private agent for `node` on `ip` (the port the coordinator dials).
async fn restart_agent(env: &Env, agents: &mut PrivateAgents, i: usize, node: &str, ip: &str) {
    let mut opts = stowage_tests::agent::AgentOptions::new(&env.cluster.kubelet_dir(node));
    opts.node = node.to_string();
    opts.ip = ip.to_string();
    opts.grpc_port = Some(agents.port);
    opts.local_roots = vec![env.cluster.dir.join("repos"), std::env::temp_dir()];
    agents.agents[i] = stowage_tests::agent::Agent::start(opts, &agents.pki).await;
}

/// Replace removes what the snapshot does not have. A Replace whose agent is killed while restic
/// writes leaves the original data (files made after the snapshot included), and the agent's next
/// start removes the staging directory it left.
///
/// Long (~40 s): the second Replace must be caught while restic writes, so it restores enough data to be killed mid-way, then waits for the agent's restart.
#[tokio::test]
async fn replace_and_a_replace_whose_agent_dies() {
    let env = setup("restore-replace").await;
    let dir = env.mounted("vol", "node-3", ".mounted").await;
    std::fs::create_dir_all(dir.join("keep")).expect("mkdir");
    std::fs::write(dir.join("keep/a.txt"), b"snapshot a").expect("write");
    // 48 MiB in many files, so that restic's restore progress (per file, once a pack is in)
    // moves while the throttled restore runs.
    std::fs::create_dir_all(dir.join("many")).expect("mkdir");
    for i in 0..192u64 {
        fstree::write_random(&dir.join(format!("many/f{i}")), 256 << 10, i);
    }
    let mut agents = PrivateAgents::start(
        env.cluster,
        &env.client,
        &env.ns,
        &[("node-3", "127.0.0.13")],
        None,
    )
    .await;
    let _c = Coordinator::start(env.cluster, agents.coordinator_options(&env.ns)).await;
    env.backup("base", local_backend(&env.repo)).await;
    std::fs::write(dir.join("keep/a.txt"), b"changed").expect("write");
    std::fs::write(dir.join("after.txt"), b"made after the snapshot").expect("write");
    let before = fstree::snapshot(&dir);

    // Throttled to 4 MiB/s: the 48 MiB restore takes seconds; kill the agent while it writes.
    let mut slow = local_backend(&env.repo);
    slow["limitDownloadKiB"] = serde_json::json!(4096);
    env.create_restore(
        "killed",
        serde_json::json!({"backend": slow, "source": {"pvc": "vol"},
            "target": {"mode": "Replace"}}),
    )
    .await;
    wait_json::<Restore>(
        &env.client,
        &env.ns,
        "killed",
        Duration::from_secs(60),
        "restic writing into staging",
        |v| {
            v["status"]["restore"]["percentDone"]
                .as_f64()
                .is_some_and(|p| p > 0.0 && p < 90.0)
        },
    )
    .await;
    let staged = || {
        std::fs::read_dir(&dir)
            .expect("read_dir")
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".stowage-restore-")
            })
            .count()
    };
    assert_eq!(staged(), 1, "restic writes into one staging directory");
    agents.agents[0].kill();
    let r = wait_json::<Restore>(
        &env.client,
        &env.ns,
        "killed",
        RUN_TIMEOUT,
        "a finished phase",
        finished,
    )
    .await;
    assert_eq!(r["status"]["phase"], "Failed", "{r:#}");
    let mut now = fstree::snapshot(&dir);
    now.retain(|p, _| !p.to_string_lossy().starts_with(".stowage-restore-"));
    fstree::assert_same(&before, &now);
    restart_agent(&env, &mut agents, 0, "node-3", "127.0.0.13").await;
    wait_for(
        "the staging directory removed",
        // The killed agent's heartbeat must first go stale (20 s) before the new one takes over.
        Duration::from_secs(60),
        || async { staged() == 0 },
    )
    .await;
    fstree::assert_same(&before, &fstree::snapshot(&dir));

    let r = env
        .restore(
            "replace",
            serde_json::json!({"source": {"pvc": "vol"}, "target": {"mode": "Replace"}}),
        )
        .await;
    succeeded(&r);
    assert!(
        !dir.join("after.txt").exists(),
        "Replace removes what the snapshot lacks"
    );
    assert_eq!(
        std::fs::read(dir.join("keep/a.txt")).expect("a"),
        b"snapshot a"
    );
    assert_eq!(
        std::fs::metadata(dir.join("many/f191"))
            .expect("many")
            .len(),
        256 << 10
    );
    assert_eq!(staged(), 0);
}

/// A deterministic 5 MB stream, produced the same way in the pod (kwok runs it locally) and here.
const STREAM: &str =
    "python3 -c 'import random,sys; sys.stdout.buffer.write(random.Random(11).randbytes(5000000))'";

async fn annotate(client: &kube::Client, ns: &str, pod: &str, annotations: serde_json::Value) {
    Api::<Pod>::namespaced(client.clone(), ns)
        .patch(
            pod,
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"metadata": {"annotations": annotations}})),
        )
        .await
        .expect("annotate");
}

/// A backup command's snapshot streamed into the pod's restore command: the command receives
/// exactly the dump's bytes. A restore command that fails is a failed Restore with its exit status.
#[tokio::test]
async fn a_command_snapshot_is_streamed_into_the_restore_command() {
    let env = setup("restore-cmd").await;
    env.mounted("db", "node-1", ".mounted").await;
    annotate(
        &env.client,
        &env.ns,
        "db-0",
        serde_json::json!({
            "stowage.dev/backup-command": STREAM,
            "stowage.dev/restore-command": "cat > restored.bin",
        }),
    )
    .await;
    let _c = Coordinator::start(env.cluster, CoordinatorOptions::new(&env.ns)).await;
    env.backup("dump", local_backend(&env.repo)).await;
    let r = env
        .restore(
            "load",
            serde_json::json!({"source": {"command": {"owner": "Pod/db-0"}}}),
        )
        .await;
    succeeded(&r);
    let st = &r["status"]["restore"];
    assert_eq!(st["command"]["exitCode"], 0, "{st}");
    assert_eq!(st["command"]["streamBytes"], 5_000_000, "{st}");
    assert_eq!(st["pod"], "db-0");
    let written = env
        .cluster
        .dir
        .join("exec")
        .join(&env.ns)
        .join("db-0")
        .join("restored.bin");
    let expected = std::process::Command::new("sh")
        .args(["-c", STREAM])
        .output()
        .expect("the same stream here");
    let got = std::fs::read(&written).expect("restored.bin");
    assert_eq!(got.len(), 5_000_000);
    assert!(got == expected.stdout, "the command received other bytes");

    annotate(
        &env.client,
        &env.ns,
        "db-0",
        // A failure inside a pipeline (`gunzip | psql`) is the command's failure (pipefail).
        serde_json::json!({"stowage.dev/restore-command": "(cat > /dev/null; echo 'psql: relation exists' >&2; exit 4) | cat"}),
    )
    .await;
    // The annotation reaches the coordinator's cache through its watch.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r = env
        .restore(
            "load-fails",
            serde_json::json!({"source": {"command": {"owner": "Pod/db-0"}}}),
        )
        .await;
    failed_with(&r, "RestoreFailed", "exited with status 4");
    assert_eq!(r["status"]["restore"]["command"]["exitCode"], 4, "{r:#}");
    let m = condition(&r, "Succeeded").expect("c")["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(m.contains("psql: relation exists"), "{m}");
}

/// A cross-namespace command restore (allowed by the administrator) streams namespace A's dump into
/// the pod of the Restore's namespace B. The pod of the same name in A, on the same node, runs
/// nothing and receives nothing: the agent is told the target namespace, never infers it from the
/// source.
#[tokio::test]
async fn a_cross_namespace_command_restore_streams_into_the_restore_namespace_only() {
    let source = setup("restore-xns-a").await;
    let target = setup("restore-xns-b").await;
    for env in [&source, &target] {
        env.mounted("db", "node-2", ".mounted").await;
        annotate(
            &env.client,
            &env.ns,
            "db-0",
            serde_json::json!({
                "stowage.dev/backup-command": STREAM,
                "stowage.dev/restore-command": "cat > restored.bin",
            }),
        )
        .await;
    }
    {
        let _c = Coordinator::start(source.cluster, CoordinatorOptions::new(&source.ns)).await;
        source.backup("dump", local_backend(&source.repo)).await;
    }
    let mut opts = CoordinatorOptions::new(&target.ns);
    opts.extra_args = vec!["--allow-cross-namespace-restore".into()];
    let _c = Coordinator::start(target.cluster, opts).await;
    let r = target
        .restore(
            "from-a",
            serde_json::json!({
                "backend": local_backend(&source.repo),
                "source": {"namespace": source.ns, "command": {"owner": "Pod/db-0"}}}),
        )
        .await;
    succeeded(&r);
    assert_eq!(
        r["status"]["restore"]["command"]["streamBytes"], 5_000_000,
        "{r:#}"
    );
    let exec_dir = |ns: &str| target.cluster.dir.join("exec").join(ns).join("db-0");
    let got = std::fs::read(exec_dir(&target.ns).join("restored.bin")).expect("B's restored.bin");
    assert_eq!(got.len(), 5_000_000);
    assert!(
        !exec_dir(&source.ns).join("restored.bin").exists(),
        "the source namespace's pod of the same name received the restore"
    );
}

/// The full id of the newest snapshot in `repo`.
fn newest_id(repo: &std::path::Path) -> String {
    let snaps = stowage_tests::restic::snapshots(&repo.display().to_string(), PASSWORD);
    snaps
        .iter()
        .max_by_key(|s| s["time"].as_str().unwrap_or_default().to_string())
        .and_then(|s| s["id"].as_str())
        .expect("a snapshot")
        .to_string()
}

/// A newer snapshot that lacks a file and is tagged partial (its backup could not read the file)
/// is passed over by `latest`: a Replace restore brings the file back from the newest complete
/// snapshot, and says so. Asked for with allowPartial, the partial one is restored and marked.
#[tokio::test]
async fn latest_passes_over_partial_snapshots_unless_allowed() {
    let env = setup("restore-partial").await;
    let dir = env.mounted("vol", "node-1", ".mounted").await;
    std::fs::write(dir.join("a.txt"), b"complete").expect("a");
    std::fs::write(dir.join("b.txt"), b"b").expect("b");
    let _c = Coordinator::start(env.cluster, CoordinatorOptions::new(&env.ns)).await;
    env.backup("full", local_backend(&env.repo)).await;
    let complete = newest_id(&env.repo);
    let partial = stowage_tests::restic::later_snapshot(
        &env.repo,
        PASSWORD,
        &complete,
        "a.txt",
        Duration::from_secs(3600),
        true,
    );
    std::fs::remove_file(dir.join("a.txt")).expect("damage");
    std::fs::write(dir.join("after.txt"), b"new").expect("after");

    let r = env
        .restore(
            "replace-latest",
            serde_json::json!({"source": {"pvc": "vol"}, "target": {"mode": "Replace"}}),
        )
        .await;
    succeeded(&r);
    assert_eq!(
        r["status"]["restore"]["snapshotId"],
        complete.as_str(),
        "{r:#}"
    );
    assert_eq!(r["status"]["restore"]["partial"], false, "{r:#}");
    assert_eq!(
        std::fs::read(dir.join("a.txt")).expect("a.txt"),
        b"complete"
    );
    assert!(!dir.join("after.txt").exists());

    let r = env
        .restore(
            "merge-partial",
            serde_json::json!({"source": {"pvc": "vol", "allowPartial": true}}),
        )
        .await;
    succeeded(&r);
    assert_eq!(
        r["status"]["restore"]["snapshotId"],
        partial.as_str(),
        "{r:#}"
    );
    assert_eq!(r["status"]["restore"]["partial"], true, "{r:#}");
}

/// Incompressible bytes, so a download limit makes a restore of them take a while.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The local backend with restic's download limit: 5 MB take ~10 s to restore, time enough to
/// kill the coordinator in the middle.
fn slow_backend(repo: &std::path::Path) -> serde_json::Value {
    let mut b = local_backend(repo);
    b["limitDownloadKiB"] = serde_json::json!(512);
    b
}

/// Waits until the Restore has recorded its snapshot and is still running: the moment to kill the
/// coordinator mid-restore.
async fn recorded_and_running(env: &Env, name: &str) -> serde_json::Value {
    wait_json::<Restore>(
        &env.client,
        &env.ns,
        name,
        RUN_TIMEOUT,
        "the snapshot recorded while running",
        |v| v["status"]["restore"]["snapshotId"].is_string() && v["status"]["phase"] == "Running",
    )
    .await
}

/// The leading coordinator is killed mid-restore, and a backup is taken before another one leads
/// (perhaps of the very damage being repaired). The resumed Restore restores exactly the snapshot
/// it had recorded, not the newer one.
#[tokio::test]
async fn a_resumed_volume_restore_restores_the_recorded_snapshot() {
    let env = setup("restore-resume").await;
    let dir = env.mounted("vol", "node-2", ".mounted").await;
    std::fs::write(dir.join("a.txt"), b"good").expect("a");
    std::fs::write(dir.join("big.bin"), noise(5 << 20)).expect("big");
    let mut first = Coordinator::start(env.cluster, CoordinatorOptions::new(&env.ns)).await;
    env.backup("good", local_backend(&env.repo)).await;
    let good = newest_id(&env.repo);
    std::fs::write(dir.join("a.txt"), b"damaged").expect("damage");

    env.create_restore(
        "repair",
        serde_json::json!({"backend": slow_backend(&env.repo),
            "source": {"pvc": "vol"}, "target": {"mode": "Replace"}}),
    )
    .await;
    let r = recorded_and_running(&env, "repair").await;
    assert_eq!(r["status"]["restore"]["snapshotId"], good.as_str());
    first.kill();
    // A backup taken meanwhile, which lost a.txt: `latest` now.
    let newer = stowage_tests::restic::later_snapshot(
        &env.repo,
        PASSWORD,
        &good,
        "a.txt",
        Duration::from_secs(3600),
        false,
    );
    assert_eq!(newest_id(&env.repo), newer);
    let _second = Coordinator::start(env.cluster, CoordinatorOptions::new(&env.ns)).await;
    let r = wait_json::<Restore>(
        &env.client,
        &env.ns,
        "repair",
        RUN_TIMEOUT,
        "a finished phase",
        finished,
    )
    .await;
    succeeded(&r);
    assert_eq!(r["status"]["restore"]["snapshotId"], good.as_str(), "{r:#}");
    assert_eq!(std::fs::read(dir.join("a.txt")).expect("a.txt"), b"good");
    assert_eq!(
        std::fs::metadata(dir.join("big.bin")).expect("big").len(),
        5 << 20
    );
}

/// A command restore interrupted by a coordinator restart is never streamed again: the command
/// may have applied part of the dump. The resumed run fails and says so.
#[tokio::test]
async fn an_interrupted_command_restore_is_not_resumed() {
    let env = setup("restore-cmd-resume").await;
    env.mounted("db", "node-3", ".mounted").await;
    annotate(
        &env.client,
        &env.ns,
        "db-0",
        serde_json::json!({
            "stowage.dev/backup-command": STREAM,
            "stowage.dev/restore-command": "cat > restored.bin",
        }),
    )
    .await;
    let mut first = Coordinator::start(env.cluster, CoordinatorOptions::new(&env.ns)).await;
    env.backup("dump", local_backend(&env.repo)).await;
    env.create_restore(
        "load",
        serde_json::json!({"backend": slow_backend(&env.repo),
            "source": {"command": {"owner": "Pod/db-0"}}}),
    )
    .await;
    recorded_and_running(&env, "load").await;
    first.kill();
    let _second = Coordinator::start(env.cluster, CoordinatorOptions::new(&env.ns)).await;
    let r = wait_json::<Restore>(
        &env.client,
        &env.ns,
        "load",
        RUN_TIMEOUT,
        "a finished phase",
        finished,
    )
    .await;
    failed_with(
        &r,
        "CommandRestoreInterrupted",
        "may have applied part of the dump",
    );
}

/// Two nodes mount one ReadWriteMany volume. While node-1's agent restores into it (Replace), the
/// agent of node-2 restarts (a DaemonSet rollout restarts them all): its start-up recovery finds
/// node-1's staging directory in the shared volume, sees its owner's fresh heartbeat, and leaves it
/// alone. The restore succeeds and the volume equals the snapshot.
#[tokio::test]
async fn a_restore_into_a_shared_volume_survives_the_other_nodes_agent_restarting() {
    let env = setup("restore-rwx").await;
    let rwx = ["--access-mode", "ReadWriteMany"];
    let dir = env
        .cluster
        .volume(&env.ns, "app-0", "shared", "node-1", &rwx);
    env.cluster
        .volume(&env.ns, "app-1", "shared", "node-2", &rwx);
    std::fs::write(dir.join(".mounted"), b"").expect("marker");
    for (pod, node) in [("app-0", "node-1"), ("app-1", "node-2")] {
        env.cluster
            .wait_mounted(&env.client, &env.ns, pod, "shared", node, ".mounted")
            .await;
    }
    std::fs::create_dir_all(dir.join("many")).expect("mkdir");
    for i in 0..192u64 {
        fstree::write_random(&dir.join(format!("many/f{i}")), 256 << 10, i);
    }
    let mut agents = PrivateAgents::start(
        env.cluster,
        &env.client,
        &env.ns,
        &[("node-1", "127.0.0.11"), ("node-2", "127.0.0.12")],
        None,
    )
    .await;
    let _c = Coordinator::start(env.cluster, agents.coordinator_options(&env.ns)).await;
    env.backup("base", local_backend(&env.repo)).await;
    let snapshot = fstree::snapshot(&dir);
    std::fs::write(dir.join("many/f0"), b"changed").expect("write");
    std::fs::write(dir.join("after.txt"), b"made after the snapshot").expect("write");

    let mut slow = local_backend(&env.repo);
    slow["limitDownloadKiB"] = serde_json::json!(4096);
    env.create_restore(
        "shared",
        serde_json::json!({"backend": slow, "source": {"pvc": "shared"},
            "target": {"mode": "Replace"}}),
    )
    .await;
    let r = wait_json::<Restore>(
        &env.client,
        &env.ns,
        "shared",
        Duration::from_secs(60),
        "restic writing into staging",
        |v| {
            v["status"]["restore"]["percentDone"]
                .as_f64()
                .is_some_and(|p| p > 0.0 && p < 80.0)
        },
    )
    .await;
    assert_eq!(r["status"]["restore"]["node"], "node-1", "{r:#}");
    agents.agents[1].kill();
    restart_agent(&env, &mut agents, 1, "node-2", "127.0.0.12").await;
    let r = wait_json::<Restore>(
        &env.client,
        &env.ns,
        "shared",
        RUN_TIMEOUT,
        "a finished phase",
        finished,
    )
    .await;
    succeeded(&r);
    assert!(
        agents.agents[1].log_text().contains("left alone"),
        "node-2's agent saw the live staging directory: {}",
        agents.agents[1].log_text()
    );
    fstree::assert_same(&snapshot, &fstree::snapshot(&dir));
}

/// A dry run of a Replace reports exactly what the restore would add (a file deleted since the
/// backup), change (a file edited since) and delete (what was created since, a directory with its
/// file), and writes nothing: the volume's tree, modes, owners, contents and mtimes are the same
/// afterwards. Then a real Replace does what the preview said.
#[tokio::test]
async fn a_dry_run_previews_a_replace_exactly_and_changes_nothing() {
    let env = setup("restore-preview").await;
    let dir = env.mounted("data", "node-2", ".mounted").await;
    std::fs::create_dir_all(dir.join("sub")).expect("mkdir");
    std::fs::write(dir.join("keep.txt"), b"the same before and after").expect("write");
    std::fs::write(dir.join("edited.txt"), b"version one").expect("write");
    std::fs::write(dir.join("gone.txt"), b"deleted after the backup").expect("write");
    std::fs::write(dir.join("sub/deep.txt"), b"unchanged, one level down").expect("write");
    let _c = env.coordinator().await;
    env.backup("base", local_backend(&env.repo)).await;

    std::fs::remove_file(dir.join("gone.txt")).expect("rm");
    std::fs::write(dir.join("edited.txt"), b"version two, longer").expect("write");
    std::fs::create_dir_all(dir.join("newdir")).expect("mkdir");
    std::fs::write(dir.join("newdir/x"), b"made after the backup").expect("write");
    std::fs::write(dir.join("new.txt"), b"made after the backup").expect("write");
    let before = fstree::snapshot(&dir);
    let root_mtime = std::fs::metadata(&dir)
        .expect("stat")
        .modified()
        .expect("mtime");

    let r = env
        .restore(
            "preview",
            serde_json::json!({"source": {"pvc": "data"}, "target": {"mode": "Replace"},
                               "dryRun": true}),
        )
        .await;
    succeeded(&r);
    let c = condition(&r, "Succeeded").expect("condition");
    assert_eq!(c["reason"], "Previewed", "{c}");
    assert!(
        c["message"]
            .as_str()
            .unwrap_or_default()
            .contains("nothing written"),
        "{c}"
    );
    let p = &r["status"]["restore"]["preview"];
    let paths = |kind: &str| -> std::collections::BTreeSet<String> {
        p[kind]["paths"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
    assert_eq!(paths("added"), set(&["/gone.txt"]), "{p:#}");
    assert_eq!(paths("changed"), set(&["/edited.txt"]), "{p:#}");
    assert_eq!(
        paths("deleted"),
        set(&["/new.txt", "/newdir", "/newdir/x"]),
        "{p:#}"
    );
    assert_eq!(p["added"]["entries"], 1, "{p:#}");
    assert_eq!(p["added"]["bytes"], 24, "{p:#}");
    assert_eq!(p["changed"]["entries"], 1, "{p:#}");
    assert_eq!(p["deleted"]["entries"], 3, "{p:#}");
    // keep.txt, sub/deep.txt, the marker, and the existing directory sub.
    assert!(p["unchanged"].as_u64().unwrap_or(0) >= 3, "{p:#}");
    assert!(r["status"]["restore"]["filesRestored"].is_null(), "{r:#}");

    // Nothing was written: not a file, a mode, an owner or an mtime, not even a staging
    // directory.
    fstree::assert_same(&before, &fstree::snapshot(&dir));
    assert_eq!(
        std::fs::metadata(&dir)
            .expect("stat")
            .modified()
            .expect("mtime"),
        root_mtime
    );

    // A Merge preview deletes nothing.
    let m = env
        .restore(
            "preview-merge",
            serde_json::json!({"source": {"pvc": "data"}, "dryRun": true}),
        )
        .await;
    succeeded(&m);
    assert_eq!(
        m["status"]["restore"]["preview"]["deleted"]["entries"], 0,
        "{m:#}"
    );
    assert_eq!(
        m["status"]["restore"]["preview"]["added"]["entries"], 1,
        "{m:#}"
    );
    fstree::assert_same(&before, &fstree::snapshot(&dir));

    // The real Replace does what the preview said.
    succeeded(
        &env.restore(
            "replace",
            serde_json::json!({"source": {"pvc": "data"}, "target": {"mode": "Replace"}}),
        )
        .await,
    );
    assert!(dir.join("gone.txt").exists());
    assert_eq!(
        std::fs::read(dir.join("edited.txt")).expect("read"),
        b"version one"
    );
    assert!(!dir.join("new.txt").exists() && !dir.join("newdir").exists());
}

/// A tenant's restore command that never ends (`sleep infinity`), with a time limit of days in its
/// annotation, holds a node slot only until the agent's --max-duration: the restore fails saying
/// so, and the node's slots are free for everyone's backups again.
#[tokio::test]
async fn a_restore_command_that_sleeps_is_stopped_at_the_agents_max_duration() {
    let env = setup("restore-sleeps").await;
    env.mounted("db", "node-1", ".mounted").await;
    annotate(
        &env.client,
        &env.ns,
        "db-0",
        serde_json::json!({
            "stowage.dev/backup-command": "echo dump",
            "stowage.dev/restore-command": "sleep 3600",
            "stowage.dev/backup-timeout": "72h",
        }),
    )
    .await;
    // The dump is taken by the cluster's agents: under a loaded machine a backup alone can take
    // longer than the 4 s cap the restore is tested against.
    {
        let _shared = env.coordinator().await;
        env.backup("dump", local_backend(&env.repo)).await;
    }
    let agents = PrivateAgents::start_with_args(
        env.cluster,
        &env.client,
        &env.ns,
        &[("node-1", "127.0.0.11")],
        None,
        &["--max-duration", "4s"],
    )
    .await;
    let _c = Coordinator::start(env.cluster, agents.coordinator_options(&env.ns)).await;
    let started = std::time::Instant::now();
    let r = env
        .restore(
            "load",
            serde_json::json!({"source": {"command": {"owner": "Pod/db-0"}}}),
        )
        .await;
    // The limit left once the dump has started streaming: at most the agent's 4 s, never 72 h.
    failed_with(&r, "RestoreFailed", "did not finish within");
    let m = condition(&r, "Succeeded").expect("c")["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    // What is left of the 4 s depends on how long the restore took to start streaming (seconds
    // on a loaded machine), so any limit up to the cap: never the annotation's 72 h.
    let limit: u64 = m
        .split("within ")
        .nth(1)
        .and_then(|rest| rest.split('s').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no limit in {m:?}"));
    assert!(limit <= 4, "{m}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "stopped at the cap, not at the annotation's 72h: {:?}",
        started.elapsed()
    );
}
