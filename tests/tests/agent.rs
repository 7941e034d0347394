//! The node agent over gRPC with mTLS, real restic, real directories laid out like the kubelet's.
//!
//! Length: one suite, one file; each test drives real agent processes and restic.

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use stowage_proto::v1::{
    self, Outcome as POutcome, Phase, RestoreMode, RestoreRequest, VolumeIdentity, VolumeRef,
};
use stowage_tests::agent::{
    Agent, Setup, backup, bwrap_without_dac, csi_volume, local_repo, restore, s3_repo,
    volume_backup,
};
use stowage_tests::{fstree, procs, restic, wait_until};
use tonic::Code;

const PW: &str = "correct horse battery staple";
const MB: usize = 1024 * 1024;

fn restore_req(
    repo: v1::Repository,
    pvc: &str,
    target_uid: &str,
    target_pv: &str,
    target_path: &str,
) -> RestoreRequest {
    RestoreRequest {
        run_id: "test/restore".into(),
        repository: Some(repo),
        source: Some(VolumeIdentity {
            namespace: "shop".into(),
            pvc: pvc.into(),
            pod_name: String::new(),
        }),
        snapshot: "latest".into(),
        target: Some(VolumeRef {
            pod_uid: target_uid.into(),
            volume_name: target_pv.into(),
        }),
        target_path: target_path.into(),
        ..Default::default()
    }
}

/// Backs up a full tree over mTLS, restores it into another pod's volume, and compares everything.
async fn round_trip(s: &Setup, agent: &Agent, repo: v1::Repository) {
    let src = csi_volume(&s.kubelet(), "pod-a", "pv-data");
    fstree::populate(&src, 50 * MB);
    let dst = csi_volume(&s.kubelet(), "pod-b", "pv-other");
    std::fs::write(dst.join("already-here"), b"keep me").expect("write");

    let mut client = agent.client(&s.pki).await;
    let out = backup(
        &mut client,
        volume_backup(repo.clone(), "pod-a", "pv-data", "shop", "data"),
    )
    .await;
    let result = out.result.expect("backup succeeds");
    assert_eq!(result.outcome(), POutcome::Succeeded);
    // restic 0.14 reports the short id in its summary.
    assert!(result.snapshot_id.len() >= 8, "{result:?}");
    // restic counts regular files (6 here); symlinks are tree entries, not files.
    assert_eq!(result.files_new, 6, "{result:?}");
    assert_eq!(result.dirs_new, 5, "{result:?}");
    assert!(result.data_added_bytes >= 50 * MB as u64 / 2, "{result:?}");
    assert!(out.progress.iter().any(|p| p.phase() == Phase::Running));

    let r = restore(
        &mut client,
        restore_req(repo.clone(), "data", "pod-b", "pv-other", "restored"),
    )
    .await;
    let r = r.result.expect("restore succeeds");
    assert!(
        r.snapshot_id.starts_with(&result.snapshot_id),
        "restored the snapshot just made"
    );
    // Every non-directory entry: 6 files and 2 symlinks.
    assert_eq!(r.files_restored, 8);
    assert_eq!(r.dirs_restored, 5);
    assert!(r.bytes_restored >= 50 * MB as u64);
    fstree::assert_same(
        &fstree::snapshot(&src),
        &fstree::snapshot(&dst.join("restored")),
    );
    assert_eq!(
        std::fs::read(dst.join("already-here")).expect("read"),
        b"keep me"
    );
    // The Snapshots RPC lists the identity's snapshot with its identity decoded from the tags.
    let snaps = client
        .snapshots(v1::SnapshotsRequest {
            repository: Some(repo.clone()),
            identity: Some(VolumeIdentity {
                namespace: "shop".into(),
                pvc: "data".into(),
                pod_name: String::new(),
            }),
            command: None,
        })
        .await
        .expect("snapshots")
        .into_inner()
        .snapshots;
    assert_eq!(snaps.len(), 1);
    assert!(snaps[0].id.starts_with(&result.snapshot_id));
    assert_eq!(
        (
            snaps[0].namespace.as_str(),
            snaps[0].pvc.as_str(),
            snaps[0].pod_name.as_str()
        ),
        ("shop", "data", "data-pod")
    );
    // Include paths restore only those paths, under the target path.
    let only = RestoreRequest {
        include: vec!["dir/nested".into()],
        ..restore_req(repo.clone(), "data", "pod-b", "pv-other", "only-nested")
    };
    let r2 = restore(&mut client, only)
        .await
        .result
        .expect("include restore");
    assert_eq!(r2.files_restored, 1, "{r2:?}");
    let got: Vec<_> = fstree::snapshot(&dst.join("only-nested"))
        .into_keys()
        .collect();
    assert_eq!(
        got,
        [
            "dir",
            "dir/nested",
            "dir/nested/deeper",
            "dir/nested/deeper/file.txt"
        ]
        .map(PathBuf::from)
    );
    std::fs::remove_dir_all(dst.join("only-nested")).expect("rm");
    // No staging directory is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&dst)
        .expect("ls")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers.len(), 2, "{leftovers:?}");
}

#[tokio::test]
async fn round_trip_over_mtls_preserves_content_and_metadata() {
    let s = Setup::new();
    let agent = s.agent().await;
    round_trip(&s, &agent, local_repo(&s.repo(), PW, true)).await;
    // The snapshot carries the volume identity, and no secret reached restic's argv or our logs.
    let snaps = restic::snapshots(&s.repo().display().to_string(), PW);
    assert_eq!(snaps.len(), 1);
    let tags: Vec<String> = serde_json::from_value(snaps[0]["tags"].clone()).expect("tags");
    for t in [
        "stowage.dev/namespace=shop",
        "stowage.dev/pvc=data",
        "stowage.dev/pod=data-pod",
        "stowage.dev/source=volume",
    ] {
        assert!(tags.contains(&t.to_string()), "{tags:?}");
    }
    assert_eq!(snaps[0]["hostname"], "shop/data");
    assert!(
        !agent.log_text().contains(PW),
        "password leaked into the agent log"
    );
}

#[tokio::test]
async fn round_trip_against_s3() {
    let moto = stowage_tests::moto::Moto::start();
    let s = Setup::new();
    let agent = s.agent().await;
    round_trip(&s, &agent, s3_repo(&moto.endpoint, "stowage-test", PW)).await;
    let log = agent.log_text();
    assert!(
        !log.contains("test-secret-key-value") && !log.contains(PW),
        "secret leaked into the log"
    );
    // The data really is in the bucket.
    let out = restic::run(
        &format!("s3:{}/stowage-test/shop", moto.endpoint),
        PW,
        &[
            ("AWS_ACCESS_KEY_ID", "AKIATESTKEY"),
            ("AWS_SECRET_ACCESS_KEY", "test-secret-key-value"),
        ],
        &["snapshots", "--json"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let snaps: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(snaps.len(), 1);
}

#[tokio::test]
async fn backup_after_pod_recreation_is_incremental() {
    let s = Setup::new();
    let agent = s.agent().await;
    let vol = csi_volume(&s.kubelet(), "uid-1", "pv-1");
    for i in 0..200 {
        std::fs::write(vol.join(format!("f{i}")), format!("file {i}").repeat(100)).expect("write");
    }
    fstree::write_random(&vol.join("big"), 8 * MB, 7);
    let repo = local_repo(&s.repo(), PW, true);
    let mut client = agent.client(&s.pki).await;
    let first = backup(
        &mut client,
        volume_backup(repo.clone(), "uid-1", "pv-1", "shop", "db"),
    )
    .await
    .result
    .expect("first");

    // The pod is recreated: same data, new pod UID directory.
    std::fs::rename(
        s.kubelet().join("pods/uid-1"),
        s.kubelet().join("pods/uid-2"),
    )
    .expect("mv");
    let gone = backup(
        &mut client,
        volume_backup(repo.clone(), "uid-1", "pv-1", "shop", "db"),
    )
    .await;
    assert_eq!(
        gone.result.expect_err("old pod is gone").code(),
        Code::NotFound
    );

    let second = backup(
        &mut client,
        volume_backup(repo, "uid-2", "pv-1", "shop", "db"),
    )
    .await
    .result
    .expect("second");
    assert!(
        second.parent_snapshot_id.starts_with(&first.snapshot_id),
        "the parent is the first snapshot"
    );
    assert_eq!(second.files_new, 0, "{second:?}");
    assert_eq!(second.files_changed, 0, "{second:?}");
    assert_eq!(second.files_unmodified, 201, "{second:?}");
    assert_eq!(
        second.data_added_bytes, 0,
        "no data re-read or re-added: {second:?}"
    );
}

fn which(bin: &Path) -> PathBuf {
    if bin.is_absolute() {
        return bin.to_path_buf();
    }
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {}", bin.display()))
        .output()
        .expect("sh");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

#[tokio::test]
async fn unreadable_file_is_a_partial_backup_not_a_success() {
    let s = Setup::new();
    let wrapper = bwrap_without_dac(s.tmp.path());
    let agent = s.agent_with(|o| o.bwrap = Some(wrapper)).await;
    let vol = csi_volume(&s.kubelet(), "uid-p", "pv-p");
    std::fs::write(vol.join("readable"), b"fine").expect("write");
    std::fs::create_dir(vol.join("sub")).expect("mkdir");
    std::fs::write(vol.join("sub/locked.db"), b"secret").expect("write");
    std::fs::set_permissions(
        vol.join("sub/locked.db"),
        std::fs::Permissions::from_mode(0o000),
    )
    .expect("chmod");
    // The repository must stay usable without DAC override: owned by root, mode 0700 is fine.
    let mut client = agent.client(&s.pki).await;
    let out = backup(
        &mut client,
        volume_backup(
            local_repo(&s.repo(), PW, true),
            "uid-p",
            "pv-p",
            "shop",
            "p",
        ),
    )
    .await;
    let r = out.result.expect("a partial backup still returns a result");
    assert_eq!(r.outcome(), POutcome::Partial, "{r:?}");
    assert!(!r.snapshot_id.is_empty());
    assert!(
        r.errors.iter().any(|e| e.item.ends_with("sub/locked.db")),
        "{:?}",
        r.errors
    );
    assert_eq!(
        agent
            .metric("stowage_agent_backups_total{result=\"partial\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(
        agent
            .metric("stowage_agent_backups_total{result=\"succeeded\"}")
            .await,
        Some(0.0)
    );
    let metrics = agent.metrics_text().await;
    assert!(
        !metrics.contains("pvc=\"p\""),
        "a partial backup is not a last success:\n{metrics}"
    );
    // The repository itself says the snapshot is incomplete: a coordinator resuming the run after a
    // restart counts it as partial, never as a good backup. The result names the marked snapshot.
    let snaps = restic::snapshots(&s.repo().display().to_string(), PW);
    assert_eq!(snaps.len(), 1, "{snaps:#?}");
    assert_eq!(snaps[0]["id"], r.snapshot_id, "{snaps:#?}");
    assert!(
        snaps[0]["tags"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t == "stowage.dev/partial=true")),
        "{snaps:#?}"
    );
}

#[tokio::test]
async fn wrong_password_and_missing_repository_are_clear_errors() {
    let s = Setup::new();
    let agent = s.agent().await;
    let vol = csi_volume(&s.kubelet(), "uid-w", "pv-w");
    std::fs::write(vol.join("x"), b"x").expect("write");
    let mut client = agent.client(&s.pki).await;

    let missing = backup(
        &mut client,
        volume_backup(
            local_repo(&s.repo(), PW, false),
            "uid-w",
            "pv-w",
            "shop",
            "w",
        ),
    )
    .await;
    let st = missing.result.expect_err("no auto-init");
    assert_eq!(st.code(), Code::FailedPrecondition);
    assert!(
        st.message().contains("no restic repository"),
        "{}",
        st.message()
    );
    assert!(!s.repo().exists(), "nothing created without auto_init");

    restic::init(&s.repo(), "another password");
    let wrong = backup(
        &mut client,
        volume_backup(
            local_repo(&s.repo(), PW, true),
            "uid-w",
            "pv-w",
            "shop",
            "w",
        ),
    )
    .await;
    let st = wrong.result.expect_err("wrong password");
    assert_eq!(st.code(), Code::FailedPrecondition);
    assert!(st.message().contains("wrong password"), "{}", st.message());

    let ok = backup(
        &mut client,
        volume_backup(
            local_repo(&s.repo(), "another password", false),
            "uid-w",
            "pv-w",
            "shop",
            "w",
        ),
    )
    .await;
    assert_eq!(
        ok.result.expect("right password").outcome(),
        POutcome::Succeeded
    );
    assert_eq!(
        agent
            .metric("stowage_agent_backups_total{result=\"failed\"}")
            .await,
        Some(2.0)
    );
}

/// Starts `restic check --read-data` (exclusive lock), optionally under another hostname, and
/// returns it once its lock file exists.
fn exclusive_lock_holder(repo: &Path, hostname: Option<&str>) -> std::process::Child {
    let restic = which(&restic::binary());
    let mut cmd = match hostname {
        Some(h) => {
            let mut c = std::process::Command::new("unshare");
            c.args([
                "--uts",
                "sh",
                "-c",
                &format!(
                    "hostname {h} && exec {} -r \"$0\" check --read-data",
                    restic.display()
                ),
            ]);
            c.arg(repo);
            c
        }
        None => {
            let mut c = std::process::Command::new(&restic);
            c.arg("-r").arg(repo).args(["check", "--read-data"]);
            c
        }
    };
    let child = cmd
        .env("RESTIC_PASSWORD", PW)
        .env("RESTIC_CACHE_DIR", repo.with_extension("check-cache"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start restic check");
    // restic's local backend makes a file read-only once it is completely written; a half-written
    // lock would be ignored by other restic processes.
    let complete = || {
        restic::lock_files(repo).iter().any(|f| {
            std::fs::metadata(f).is_ok_and(|m| m.len() > 0 && m.permissions().mode() & 0o200 == 0)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !complete() {
        assert!(Instant::now() < deadline, "restic check took no lock");
        std::thread::sleep(Duration::from_millis(2));
    }
    child
}

fn signal(child: &std::process::Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).expect("signal");
}

/// Long (~40 s): it waits out a live lock (the lock wait), then a lock's ageing past the stale threshold, on 64 MB of data.
#[tokio::test]
async fn locked_repository_waits_then_succeeds_and_stale_locks_are_removed_and_counted() {
    use nix::sys::signal::Signal;
    let s = Setup::new();
    let agent = s
        .agent_with(|o| {
            o.extra_args = vec![
                "--stale-lock-age".into(),
                "3s".into(),
                "--lock-wait".into(),
                "10s".into(),
            ]
        })
        .await;
    let vol = csi_volume(&s.kubelet(), "uid-l", "pv-l");
    fstree::write_random(&vol.join("data"), 64 * MB, 3);
    restic::init(&s.repo(), PW);
    let mut client = agent.client(&s.pki).await;
    let repo = local_repo(&s.repo(), PW, false);
    backup(
        &mut client,
        volume_backup(repo.clone(), "uid-l", "pv-l", "shop", "l"),
    )
    .await
    .result
    .expect("seed");

    // 1. A live holder: the backup waits (and says so), and succeeds once the lock is released.
    let mut holder = exclusive_lock_holder(&s.repo(), None);
    signal(&holder, Signal::SIGSTOP);
    let mut c2 = client.clone();
    let req = volume_backup(repo.clone(), "uid-l", "pv-l", "shop", "l");
    let pending = tokio::spawn(async move { backup(&mut c2, req).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!pending.is_finished(), "the backup must wait for the lock");
    signal(&holder, Signal::SIGCONT);
    let _ = holder.wait();
    let out = pending.await.expect("join");
    out.result.expect("succeeds after the lock is released");
    assert!(
        out.progress
            .iter()
            .any(|p| p.phase() == Phase::WaitingForLock),
        "waiting was reported: {:?}\n{}",
        out.progress,
        agent.log_text()
    );
    assert_eq!(
        agent
            .metric("stowage_agent_restic_lock_removals_total")
            .await,
        Some(0.0)
    );

    // 2. A lock from a holder on another host that died a minute ago (an agent pod that was
    // killed): restic cannot tell it is dead, so it is waited for and never removed, even past the
    // agent's --stale-lock-age (3 s here). Only restic's own threshold (30 minutes without a
    // refresh) lets `restic unlock` remove a lock; nothing here uses `unlock --remove-all`.
    let young = restic::forge_lock(
        &s.repo(),
        PW,
        "old-agent-pod",
        1234,
        Duration::from_secs(60),
        true,
    );
    let out = backup(
        &mut client,
        volume_backup(repo.clone(), "uid-l", "pv-l", "shop", "l"),
    )
    .await;
    let status = out
        .result
        .expect_err("a lock that is not stale makes the backup give up");
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(
        status.message().contains("old-agent-pod"),
        "{}",
        status.message()
    );
    assert_eq!(
        restic::lock_files(&s.repo()).len(),
        1,
        "the young lock was removed"
    );
    assert_eq!(
        agent
            .metric("stowage_agent_restic_lock_removals_total")
            .await,
        Some(0.0)
    );
    std::fs::remove_file(s.repo().join("locks").join(&young)).expect("rm young lock");

    // 3. The same, 45 minutes old: plain `restic unlock` removes it, the removal is counted once,
    // and the backup succeeds.
    restic::forge_lock(
        &s.repo(),
        PW,
        "old-agent-pod",
        1234,
        Duration::from_secs(45 * 60),
        true,
    );
    let out = backup(
        &mut client,
        volume_backup(repo, "uid-l", "pv-l", "shop", "l"),
    )
    .await;
    out.result.expect("succeeds after removing the stale lock");
    assert_eq!(
        agent
            .metric("stowage_agent_restic_lock_removals_total")
            .await,
        Some(1.0),
        "{}",
        agent.log_text()
    );
    assert!(restic::lock_files(&s.repo()).is_empty());
    assert!(
        agent
            .log_text()
            .contains("removing a stale repository lock with restic unlock")
    );
}

#[tokio::test]
async fn cancelled_backup_stops_restic_and_the_next_one_needs_no_unlock() {
    let s = Setup::new();
    let agent = s.agent().await;
    let vol = csi_volume(&s.kubelet(), "uid-c", "pv-c");
    fstree::write_random(&vol.join("huge"), 768 * MB, 9);
    let repo = local_repo(&s.repo(), PW, true);
    let mut client = agent.client(&s.pki).await;

    let mut stream = client
        .backup(volume_backup(repo.clone(), "uid-c", "pv-c", "shop", "c"))
        .await
        .expect("call")
        .into_inner();
    // Wait until restic is reading the volume.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("progress")
            .expect("stream");
        if let Some(v1::BackupEvent {
            event: Some(v1::backup_event::Event::Progress(p)),
        }) = msg
            && p.phase() == Phase::Running
            && !procs::restic_pids_under(&vol).is_empty()
        {
            break;
        }
        assert!(Instant::now() < deadline, "restic never started");
    }
    let pids = procs::restic_pids_under(&vol);
    assert_eq!(pids.len(), 1);
    let cancelled_at = Instant::now();
    drop(stream); // the client goes away
    wait_until(
        "restic to exit after cancel",
        Duration::from_secs(2),
        || !procs::alive(pids[0]),
    )
    .await;
    eprintln!("restic gone {:?} after cancel", cancelled_at.elapsed());
    wait_until("cancelled counted", Duration::from_secs(5), || true).await;

    // Shrink the volume so the next backup is quick, and run it with no manual unlock.
    std::fs::remove_file(vol.join("huge")).expect("rm");
    std::fs::write(vol.join("small"), b"small").expect("write");
    let out = backup(
        &mut client,
        volume_backup(repo, "uid-c", "pv-c", "shop", "c"),
    )
    .await;
    assert_eq!(
        out.result.expect("next backup").outcome(),
        POutcome::Succeeded
    );
    assert_eq!(
        agent
            .metric("stowage_agent_backups_total{result=\"cancelled\"}")
            .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn clients_without_the_right_certificate_are_refused() {
    let s = Setup::new();
    let vol = csi_volume(&s.kubelet(), "uid-t", "pv-t");
    std::fs::write(vol.join("x"), b"x").expect("write");
    let agent = s.agent().await;
    for (what, identity) in [
        ("no certificate", None),
        ("certificate from another CA", Some(&s.pki.rogue_client)),
        (
            "certificate from the CA with another identity",
            Some(&s.pki.other_client),
        ),
    ] {
        let refused = match agent.connect(&s.pki, identity).await {
            Err(_) => true,
            Ok(mut c) => c.list_volumes(v1::ListVolumesRequest {}).await.is_err(),
        };
        assert!(refused, "{what} must be refused");
    }
    // The CA-signed certificate with the wrong identity gets through TLS and is refused by name.
    let mut other = agent
        .connect(&s.pki, Some(&s.pki.other_client))
        .await
        .expect("TLS accepts a CA-signed certificate");
    let denied = other
        .list_volumes(v1::ListVolumesRequest {})
        .await
        .expect_err("refused");
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(denied.message().contains("other.example"), "{denied:?}");
    let mut ok = agent.client(&s.pki).await;
    let vols = ok
        .list_volumes(v1::ListVolumesRequest {})
        .await
        .expect("trusted client")
        .into_inner();
    assert_eq!(vols.node_name, "node-1");
    assert_eq!(vols.volumes.len(), 1);
    assert!(
        vols.volumes[0]
            .path
            .ends_with("kubernetes.io~csi/pv-t/mount")
    );
}

/// cert-manager renews the agent's certificate (here with a whole new CA, so that nothing of the
/// old files could still pass) while it runs: new connections are served with the new files, and
/// clients of the old CA are refused, without a restart.
#[tokio::test]
async fn renewed_tls_files_are_served_without_a_restart() {
    let mut s = Setup::new();
    let agent = s.agent().await;
    let pid = agent.pid();
    let mut old = agent.client(&s.pki).await;
    old.list_volumes(v1::ListVolumesRequest {})
        .await
        .expect("the first PKI works");
    let old_pki = s.pki.rotate();
    let deadline = Instant::now() + Duration::from_secs(20);
    let renewed = loop {
        if let Ok(mut c) = agent.connect(&s.pki, Some(&s.pki.client)).await
            && c.list_volumes(v1::ListVolumesRequest {}).await.is_ok()
        {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        renewed,
        "the new PKI is accepted within 20 s: {}",
        agent.log_text()
    );
    let refused = match agent.connect(&old_pki, Some(&old_pki.client)).await {
        Err(_) => true,
        Ok(mut c) => c.list_volumes(v1::ListVolumesRequest {}).await.is_err(),
    };
    assert!(
        refused,
        "a client of the replaced CA is refused on a new connection"
    );
    assert_eq!(agent.pid(), pid, "the same process");
    assert!(
        agent.log_text().contains("TLS files changed"),
        "{}",
        agent.log_text()
    );
}

/// The most restic processes seen at once under `pods`, sampled every 10 ms until they have come
/// and gone (2 minutes at most).
async fn most_restics_at_once(pods: PathBuf) -> usize {
    let (mut max, mut samples) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let n = procs::restic_pids_under(&pods).len();
        max = max.max(n);
        samples += 1;
        if samples > 20 && n == 0 && max > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    max
}

/// With a memory budget that fits one restic (each reserves at least its fixed ~100 MiB), three
/// backups run one after another although --max-concurrent allows four; the others are told why
/// they queue, and every one succeeds.
#[tokio::test]
async fn a_memory_budget_that_fits_one_restic_runs_backups_one_at_a_time() {
    let s = Setup::new();
    let agent = s
        .agent_with(|o| {
            o.max_concurrent = 4;
            o.extra_args = vec!["--memory-budget".into(), "150".into()];
        })
        .await;
    restic::init(&s.repo(), PW);
    for i in 0..3 {
        let vol = csi_volume(&s.kubelet(), &format!("uid-m{i}"), &format!("pv-m{i}"));
        fstree::write_random(&vol.join("data"), 32 * MB, i + 200);
    }
    assert_eq!(
        agent.metric("stowage_agent_memory_budget_bytes").await,
        Some((150u64 << 20) as f64)
    );
    let client = agent.client(&s.pki).await;
    let pods = s.kubelet().join("pods");
    let sampler = tokio::spawn(most_restics_at_once(pods));
    let mut calls = Vec::new();
    for i in 0..3 {
        let mut c = client.clone();
        let req = volume_backup(
            local_repo(&s.repo(), PW, false),
            &format!("uid-m{i}"),
            &format!("pv-m{i}"),
            "shop",
            &format!("pvc-m{i}"),
        );
        calls.push(tokio::spawn(async move { backup(&mut c, req).await }));
    }
    let mut why = Vec::new();
    for c in calls {
        let out = c.await.expect("join");
        why.extend(
            out.progress
                .iter()
                .filter(|p| p.phase() == Phase::Queued)
                .map(|p| p.message.clone()),
        );
        assert_eq!(
            out.result.expect("every backup succeeds").outcome(),
            POutcome::Succeeded
        );
    }
    assert_eq!(sampler.await.expect("sampler"), 1, "one restic at a time");
    assert!(
        why.iter()
            .any(|m| m.starts_with("waiting for memory on this node")
                && m.contains("of the 150 MiB budget")),
        "{why:?}"
    );
    assert_eq!(
        agent.metric("stowage_agent_memory_reserved_bytes").await,
        Some(0.0)
    );
}

/// restic's caches on the node are bounded: an agent sweeping every second with
/// `--cache-max-age 6s` removes the cache of a repository it no longer uses, keeps the one it just
/// used, and `stowage_agent_cache_bytes` says what is left.
///
/// Long (~27 s): the old repository's cache has to age past the 6 s limit between two backups.
#[tokio::test]
async fn caches_of_repositories_no_longer_used_are_removed() {
    let s = Setup::new();
    let agent = s
        .agent_with(|o| {
            // Long enough that the new repository's cache outlives the checks below on a loaded
            // machine; short enough for a test.
            o.extra_args = ["--cache-max-age", "6s", "--cache-sweep-interval", "1s"]
                .map(String::from)
                .to_vec();
        })
        .await;
    let (old_repo, new_repo) = (s.path("old-repo"), s.path("new-repo"));
    restic::init(&old_repo, PW);
    restic::init(&new_repo, PW);
    let vol = csi_volume(&s.kubelet(), "uid-c", "pv-c");
    fstree::write_random(&vol.join("data"), 2 * MB, 5);
    let mut client = agent.client(&s.pki).await;
    let req = |repo: &Path| {
        volume_backup(
            local_repo(repo, PW, false),
            "uid-c",
            "pv-c",
            "shop",
            "pvc-c",
        )
    };
    let caches = s.pki.dir.join(format!("cache-{}", agent.grpc.port()));
    let repo_caches = || -> Vec<PathBuf> {
        std::fs::read_dir(&caches)
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| {
                        !p.file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let first = backup(&mut client, req(&old_repo)).await;
    assert_eq!(first.result.expect("backup").outcome(), POutcome::Succeeded);
    let old_cache = repo_caches();
    assert_eq!(old_cache.len(), 1, "{old_cache:?}");
    // The old repository goes unused for longer than the age; the new one is used at the end.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let second = backup(&mut client, req(&new_repo)).await;
    assert_eq!(
        second.result.expect("backup").outcome(),
        POutcome::Succeeded
    );
    stowage_tests::cluster::wait_for("the old cache removed", Duration::from_secs(10), || async {
        !old_cache[0].exists()
    })
    .await;
    let left = repo_caches();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_ne!(left[0], old_cache[0]);
    // The sweep measures what it keeps every second; the one that removed the old cache may have
    // run before restic wrote into the new one (a loaded machine), so wait for a later sweep.
    stowage_tests::cluster::wait_for(
        "the new repository's cache measured",
        Duration::from_secs(10),
        || async {
            agent
                .metric("stowage_agent_cache_bytes")
                .await
                .is_some_and(|b| b > 0.0)
        },
    )
    .await;
    assert!(agent.log_text().contains("removed a restic cache"));
}

/// Namespace a asks for two slow backups on a node with two slots and a share of one per
/// namespace: its second waits in a's own queue, told why, and namespace b's backup, asked for
/// last, takes the free slot and ends while a's first still runs. Without shares a's two backups
/// would hold both slots and b would wait for one of them.
#[tokio::test]
async fn one_namespace_cannot_hold_every_slot_of_a_node() {
    let s = Setup::new();
    let agent = s
        .agent_with(|o| {
            o.max_concurrent = 2;
            o.extra_args = vec!["--max-concurrent-per-namespace".into(), "1".into()];
        })
        .await;
    restic::init(&s.repo(), PW);
    for (uid, size) in [
        ("uid-a1", 6 * MB),
        ("uid-a2", 6 * MB),
        ("uid-b1", 64 * 1024),
    ] {
        let vol = csi_volume(&s.kubelet(), uid, &format!("pv-{uid}"));
        fstree::write_random(&vol.join("data"), size, size as u64);
    }
    let client = agent.client(&s.pki).await;
    // 1 MiB/s: a's backups take seconds each.
    let mut slow = local_repo(&s.repo(), PW, false);
    slow.limit_upload_kib = 1024;
    let call = |uid: &str, ns: &str, repo: v1::Repository| {
        let mut c = client.clone();
        let req = volume_backup(repo, uid, &format!("pv-{uid}"), ns, &format!("pvc-{uid}"));
        tokio::spawn(async move {
            let out = backup(&mut c, req).await;
            (out, Instant::now())
        })
    };
    let a1 = call("uid-a1", "a", slow.clone());
    stowage_tests::cluster::wait_for("a's first backup runs", Duration::from_secs(30), || async {
        agent.metric("stowage_agent_running_operations").await == Some(1.0)
    })
    .await;
    let a2 = call("uid-a2", "a", slow);
    stowage_tests::cluster::wait_for(
        "a's second backup queues",
        Duration::from_secs(30),
        || async { agent.metric("stowage_agent_queued_operations").await == Some(1.0) },
    )
    .await;
    let b1 = call("uid-b1", "b", local_repo(&s.repo(), PW, false));
    let (b_out, b_done) = b1.await.expect("join");
    assert_eq!(
        b_out.result.expect("b succeeds").outcome(),
        POutcome::Succeeded
    );
    assert!(
        !b_out.progress.iter().any(|p| p.phase() == Phase::Queued),
        "b never queued: {:?}",
        b_out.progress
    );
    let (a1_out, a1_done) = a1.await.expect("join");
    let (a2_out, a2_done) = a2.await.expect("join");
    for out in [&a1_out, &a2_out] {
        assert_eq!(
            out.result.as_ref().expect("a succeeds").outcome(),
            POutcome::Succeeded
        );
    }
    assert!(b_done < a1_done, "b ended while a's first still ran");
    assert!(a1_done < a2_done, "a's second waited for a's first");
    let why: Vec<&str> = a2_out
        .progress
        .iter()
        .filter(|p| p.phase() == Phase::Queued)
        .map(|p| p.message.as_str())
        .collect();
    assert!(
        why.iter()
            .any(|m| m.contains("namespace a's share")
                && m.contains("--max-concurrent-per-namespace")),
        "{why:?}"
    );
}

#[tokio::test]
async fn six_backups_with_max_concurrent_two_never_run_more_than_two_restics() {
    let s = Setup::new();
    let agent = s
        .agent_with(|o| {
            o.max_concurrent = 2;
            o.extra_args = vec!["--max-concurrent-per-namespace".into(), "2".into()];
        })
        .await;
    restic::init(&s.repo(), PW);
    for i in 0..6 {
        let vol = csi_volume(&s.kubelet(), &format!("uid-{i}"), &format!("pv-{i}"));
        fstree::write_random(&vol.join("data"), 48 * MB, i + 100);
    }
    let client = agent.client(&s.pki).await;
    let pods = s.kubelet().join("pods");
    let sampler = tokio::spawn(most_restics_at_once(pods));
    let mut calls = Vec::new();
    for i in 0..6 {
        let mut c = client.clone();
        let req = volume_backup(
            local_repo(&s.repo(), PW, false),
            &format!("uid-{i}"),
            &format!("pv-{i}"),
            "shop",
            &format!("pvc-{i}"),
        );
        calls.push(tokio::spawn(async move { backup(&mut c, req).await }));
    }
    let mut queued_seen = false;
    for c in calls {
        let out = c.await.expect("join");
        queued_seen |= out.progress.iter().any(|p| p.phase() == Phase::Queued);
        assert_eq!(
            out.result.expect("every backup succeeds").outcome(),
            POutcome::Succeeded
        );
    }
    let max = sampler.await.expect("sampler");
    assert!(max <= 2, "saw {max} restic processes at once");
    assert!(max >= 1);
    assert!(
        queued_seen,
        "requests beyond the limit were told they are queued"
    );
    assert_eq!(
        agent
            .metric("stowage_agent_backups_total{result=\"succeeded\"}")
            .await,
        Some(6.0)
    );
    assert_eq!(
        agent.metric("stowage_agent_queued_operations").await,
        Some(0.0)
    );
    assert_eq!(
        agent.metric("stowage_agent_running_operations").await,
        Some(0.0)
    );
    assert_eq!(
        restic::snapshots(&s.repo().display().to_string(), PW).len(),
        6
    );
}

#[tokio::test]
async fn restore_refuses_paths_that_leave_the_volume() {
    let s = Setup::new();
    let agent = s.agent().await;
    let vol = csi_volume(&s.kubelet(), "uid-s", "pv-s");
    std::fs::create_dir_all(vol.join("etc")).expect("mkdir");
    std::fs::write(vol.join("etc/passwd"), b"from the snapshot").expect("write");
    let repo = local_repo(&s.repo(), PW, true);
    let mut client = agent.client(&s.pki).await;
    backup(
        &mut client,
        volume_backup(repo.clone(), "uid-s", "pv-s", "shop", "s"),
    )
    .await
    .result
    .expect("backup");

    let outside = s.tmp.path().join("outside");
    std::fs::create_dir_all(&outside).expect("mkdir");
    // The application plants symlinks pointing out of its volume.
    std::fs::remove_dir_all(vol.join("etc")).expect("rm");
    symlink(&outside, vol.join("etc")).expect("symlink");
    symlink(&outside, vol.join("escape")).expect("symlink");

    let cases: Vec<(&str, RestoreRequest)> = vec![
        (
            "dot-dot target",
            restore_req(repo.clone(), "s", "uid-s", "pv-s", "../../.."),
        ),
        (
            "absolute target",
            restore_req(repo.clone(), "s", "uid-s", "pv-s", "/tmp"),
        ),
        (
            "symlinked target",
            restore_req(repo.clone(), "s", "uid-s", "pv-s", "escape/sub"),
        ),
        (
            "dot-dot include",
            RestoreRequest {
                include: vec!["../x".into()],
                ..restore_req(repo.clone(), "s", "uid-s", "pv-s", "")
            },
        ),
        (
            "absolute include",
            RestoreRequest {
                include: vec!["/etc/passwd".into()],
                ..restore_req(repo.clone(), "s", "uid-s", "pv-s", "")
            },
        ),
    ];
    for (what, req) in cases {
        let st = restore(&mut client, req).await.result.expect_err(what);
        assert_eq!(st.code(), Code::InvalidArgument, "{what}: {}", st.message());
    }
    let st = restore(
        &mut client,
        restore_req(repo.clone(), "s", "no-such-pod", "pv-s", ""),
    )
    .await
    .result
    .expect_err("unknown volume");
    assert_eq!(st.code(), Code::NotFound);

    // A restore into the volume root replaces the planted `etc` symlink instead of following it.
    let r = restore(
        &mut client,
        restore_req(repo.clone(), "s", "uid-s", "pv-s", ""),
    )
    .await
    .result
    .expect("restore");
    assert_eq!(r.files_restored, 1);
    assert!(
        std::fs::symlink_metadata(vol.join("etc"))
            .expect("etc")
            .is_dir()
    );
    assert_eq!(
        std::fs::read(vol.join("etc/passwd")).expect("read"),
        b"from the snapshot"
    );
    assert!(
        std::fs::read_dir(&outside).expect("ls").next().is_none(),
        "nothing written outside the volume"
    );

    // IntoEmpty refuses a non-empty target and writes nothing.
    let req = RestoreRequest {
        mode: RestoreMode::IntoEmpty.into(),
        ..restore_req(repo.clone(), "s", "uid-s", "pv-s", "")
    };
    let st = restore(&mut client, req)
        .await
        .result
        .expect_err("not empty");
    assert_eq!(st.code(), Code::FailedPrecondition);
    let req = RestoreRequest {
        mode: RestoreMode::IntoEmpty.into(),
        ..restore_req(repo.clone(), "s", "uid-s", "pv-s", "fresh")
    };
    restore(&mut client, req)
        .await
        .result
        .expect("into a new empty directory");
    assert_eq!(
        std::fs::read(vol.join("fresh/etc/passwd")).expect("read"),
        b"from the snapshot"
    );

    // A snapshot of another PVC is not restored under this PVC's name.
    let other = snapshot_id_of(&s.repo(), "s");
    let req = RestoreRequest {
        snapshot: other[..8].to_string(),
        source: Some(VolumeIdentity {
            namespace: "shop".into(),
            pvc: "someone-else".into(),
            pod_name: String::new(),
        }),
        ..restore_req(repo, "s", "uid-s", "pv-s", "x")
    };
    let st = restore(&mut client, req)
        .await
        .result
        .expect_err("other identity");
    assert_eq!(st.code(), Code::PermissionDenied, "{}", st.message());
}

fn snapshot_id_of(repo: &Path, pvc: &str) -> String {
    restic::snapshots(&repo.display().to_string(), PW)
        .into_iter()
        .find(|s| {
            s["tags"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t == &format!("stowage.dev/pvc={pvc}")))
        })
        .and_then(|s| s["id"].as_str().map(String::from))
        .expect("snapshot of pvc")
}

#[tokio::test]
async fn metrics_are_valid_and_move_with_operations() {
    let s = Setup::new();
    let vol = csi_volume(&s.kubelet(), "uid-m", "pv-m");
    std::fs::write(vol.join("x"), vec![7u8; 100_000]).expect("write");
    let agent = s.agent().await;
    let before = agent.metrics_text().await;
    assert_eq!(
        stowage_tests::agent::metric_value(&before, "stowage_agent_volumes"),
        Some(1.0)
    );
    for series in [
        "stowage_agent_backups_total{result=\"succeeded\"}",
        "stowage_agent_backups_total{result=\"failed\"}",
        "stowage_agent_restores_total{result=\"succeeded\"}",
        "stowage_agent_restic_lock_removals_total",
        "stowage_agent_backup_bytes_added_total",
        "stowage_agent_running_operations",
        "stowage_agent_queued_operations",
        "stowage_agent_backup_duration_seconds_count",
    ] {
        assert_eq!(
            stowage_tests::agent::metric_value(&before, series),
            Some(0.0),
            "{series} starts at 0"
        );
    }
    let repo = local_repo(&s.repo(), PW, true);
    let mut client = agent.client(&s.pki).await;
    backup(
        &mut client,
        volume_backup(repo.clone(), "uid-m", "pv-m", "shop", "m"),
    )
    .await
    .result
    .expect("backup");
    restore(
        &mut client,
        restore_req(repo, "m", "uid-m", "pv-m", "again"),
    )
    .await
    .result
    .expect("restore");
    let after = agent.metrics_text().await;
    let v = |s: &str| stowage_tests::agent::metric_value(&after, s).unwrap_or(-1.0);
    assert_eq!(v("stowage_agent_backups_total{result=\"succeeded\"}"), 1.0);
    assert_eq!(v("stowage_agent_restores_total{result=\"succeeded\"}"), 1.0);
    assert_eq!(v("stowage_agent_backup_duration_seconds_count"), 1.0);
    assert!(v("stowage_agent_backup_bytes_added_total") > 0.0);
    assert!(v("stowage_agent_restore_bytes_total") >= 100_000.0);
    let ts = v("stowage_agent_last_success_timestamp_seconds{namespace=\"shop\",pvc=\"m\"}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("now")
        .as_secs_f64();
    assert!((now - ts).abs() < 120.0, "last success {ts} vs now {now}");

    // promtool validates the exposition format.
    stowage_tests::promtool_check(&after);
}

#[tokio::test]
async fn sigterm_cancels_running_backups_releases_the_lock_and_exits() {
    let s = Setup::new();
    let mut agent = s.agent().await;
    let vol = csi_volume(&s.kubelet(), "uid-g", "pv-g");
    fstree::write_random(&vol.join("huge"), 768 * MB, 11);
    let mut client = agent.client(&s.pki).await;
    let req = volume_backup(
        local_repo(&s.repo(), PW, true),
        "uid-g",
        "pv-g",
        "shop",
        "g",
    );
    let call = tokio::spawn(async move { backup(&mut client, req).await });
    wait_until("restic to start", Duration::from_secs(30), || {
        !procs::restic_pids_under(&vol).is_empty()
    })
    .await;
    let pid = procs::restic_pids_under(&vol)[0];
    agent.sigterm();
    let status = agent
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("agent exits after SIGTERM");
    assert!(status.success(), "clean exit: {status}");
    assert!(!procs::alive(pid), "restic was stopped");
    let out = call.await.expect("join");
    let st = out.result.expect_err("the backup did not complete");
    assert!(
        matches!(
            st.code(),
            Code::Cancelled | Code::Unavailable | Code::Unknown
        ),
        "{st:?}"
    );
    // restic got SIGTERM and removed its own lock: nothing for the next run to clean up.
    assert!(
        restic::lock_files(&s.repo()).is_empty(),
        "lock left: {:?}",
        restic::lock_files(&s.repo())
    );
}

/// Starts a backup of `vol` limited to `kib_per_s`, waits until its restic has run for `running_for`,
/// and returns the pending call and restic's PID.
async fn throttled_backup_running(
    agent: &Agent,
    s: &Setup,
    repo: v1::Repository,
    (uid, pv): (&str, &str),
    vol: &Path,
    running_for: Duration,
) -> (
    tokio::task::JoinHandle<stowage_tests::agent::Outcome<v1::BackupResult>>,
    u32,
) {
    let mut client = agent.client(&s.pki).await;
    let mut req = volume_backup(repo, uid, pv, "shop", "stall");
    if let Some(r) = req.repository.as_mut() {
        r.limit_upload_kib = 2048;
    }
    let call = tokio::spawn(async move { backup(&mut client, req).await });
    let deadline = Instant::now() + Duration::from_secs(30);
    let pid = loop {
        if let Some(pid) = procs::restic_pids_under(vol).first() {
            break *pid;
        }
        assert!(Instant::now() < deadline, "restic never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(running_for).await;
    assert!(!call.is_finished(), "the throttled backup ended too early");
    (call, pid)
}

#[tokio::test]
async fn a_frozen_restic_is_stopped_after_the_stall_timeout_and_the_next_backup_works() {
    let s = Setup::new();
    let agent = s
        .agent_with(|o| o.extra_args = vec!["--stall-timeout".into(), "6s".into()])
        .await;
    restic::init(&s.repo(), PW);
    let vol = csi_volume(&s.kubelet(), "uid-stall", "pv-stall");
    fstree::write_random(&vol.join("big"), 64 * MB, 5);
    let repo = local_repo(&s.repo(), PW, false);
    // Slow but progressing (2 MiB/s) for 4 s: longer than the stall timeout, and not stopped.
    let (call, pid) = throttled_backup_running(
        &agent,
        &s,
        repo.clone(),
        ("uid-stall", "pv-stall"),
        &vol,
        Duration::from_secs(4),
    )
    .await;
    signal_pid(pid, nix::sys::signal::Signal::SIGSTOP);
    let frozen_at = Instant::now();
    let out = call.await.expect("join");
    let err = out.result.expect_err("a frozen restic fails the backup");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("made no progress for 6s"), "{err:?}");
    assert!(frozen_at.elapsed() < Duration::from_secs(15));
    assert!(
        gone_within(pid, Duration::from_secs(5)).await,
        "the frozen restic was not killed"
    );
    let again = backup(
        &mut agent.client(&s.pki).await,
        volume_backup(repo, "uid-stall", "pv-stall", "shop", "stall"),
    )
    .await;
    assert_eq!(
        again.result.expect("the next backup").outcome(),
        POutcome::Succeeded
    );
}

/// Long (~30 s): the endpoint must go silent mid-upload and the stall timeout run out, then the next backup succeed.
#[tokio::test]
async fn an_s3_endpoint_that_stops_answering_fails_the_backup_within_the_stall_timeout() {
    let moto = stowage_tests::moto::Moto::start();
    let s = Setup::new();
    let agent = s
        .agent_with(|o| o.extra_args = vec!["--stall-timeout".into(), "6s".into()])
        .await;
    let repo = s3_repo(&moto.endpoint, "stowage-stall", PW);
    // Created beforehand: the stall bound also covers a silent `restic init` (its key derivation
    // alone can take seconds on a loaded 2-core machine).
    let init = restic::run(
        &format!("s3:{}/stowage-stall/shop", moto.endpoint),
        PW,
        &[
            ("AWS_ACCESS_KEY_ID", "AKIATESTKEY"),
            ("AWS_SECRET_ACCESS_KEY", "test-secret-key-value"),
        ],
        &["init"],
    );
    assert!(init.status.success(), "{init:?}");
    let vol = csi_volume(&s.kubelet(), "uid-s3", "pv-s3");
    fstree::write_random(&vol.join("big"), 48 * MB, 6);
    let (call, pid) = throttled_backup_running(
        &agent,
        &s,
        repo.clone(),
        ("uid-s3", "pv-s3"),
        &vol,
        Duration::from_secs(2),
    )
    .await;
    moto.signal(nix::sys::signal::Signal::SIGSTOP);
    let frozen_at = Instant::now();
    let out = call.await.expect("join");
    let err = out
        .result
        .expect_err("a backup into a silent endpoint fails");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("made no progress for 6s"), "{err:?}");
    assert!(frozen_at.elapsed() < Duration::from_secs(15));
    assert!(
        gone_within(pid, Duration::from_secs(5)).await,
        "restic was not stopped"
    );
    // Listing snapshots against the silent endpoint is bounded the same way.
    let listed = tokio::time::timeout(
        Duration::from_secs(20),
        agent.client(&s.pki).await.snapshots(v1::SnapshotsRequest {
            repository: Some(repo.clone()),
            identity: None,
            command: None,
        }),
    )
    .await
    .expect("bounded");
    let e = listed.expect_err("no answer from S3");
    assert!(e.message().contains("made no progress for 6s"), "{e:?}");
    moto.signal(nix::sys::signal::Signal::SIGCONT);
    let again = backup(
        &mut agent.client(&s.pki).await,
        volume_backup(repo, "uid-s3", "pv-s3", "shop", "stall"),
    )
    .await;
    assert_eq!(
        again.result.expect("the next backup").outcome(),
        POutcome::Succeeded
    );
}

/// Whether `pid` is gone within `limit` (a killed sandbox's namespace is torn down asynchronously).
async fn gone_within(pid: u32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while procs::alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

fn signal_pid(pid: u32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).expect("signal");
}

#[tokio::test]
async fn an_empty_volume_is_skipped_not_failed_and_restore_reports_progress() {
    let s = Setup::new();
    let agent = s.agent().await;
    let mut client = agent.client(&s.pki).await;
    let repo = local_repo(&s.repo(), PW, true);
    csi_volume(&s.kubelet(), "uid-empty", "pv-empty");
    let out = backup(
        &mut client,
        volume_backup(repo.clone(), "uid-empty", "pv-empty", "shop", "fresh"),
    )
    .await;
    let r = out.result.expect("an empty volume is not an error");
    assert_eq!(r.outcome(), POutcome::Skipped);
    assert_eq!(r.skipped_reason, "EmptyVolume");
    assert!(r.snapshot_id.is_empty());
    assert_eq!(
        agent
            .metric("stowage_agent_backups_total{result=\"skipped\"}")
            .await,
        Some(1.0)
    );
    // A CSI directory that is not a mount point (the volume being torn down) is refused.
    let gone = s
        .kubelet()
        .join("pods/uid-gone/volumes/kubernetes.io~csi/pv-gone/mount");
    std::fs::create_dir_all(&gone).expect("mkdir");
    std::fs::write(gone.join("leftover"), b"x").expect("write");
    let refused = backup(
        &mut client,
        volume_backup(repo.clone(), "uid-gone", "pv-gone", "shop", "gone"),
    )
    .await
    .result
    .expect_err("not mounted");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("no longer a mount point"),
        "{refused:?}"
    );

    // Restore progress comes from restic's JSON: percent, files and bytes while it runs.
    let src = csi_volume(&s.kubelet(), "uid-full", "pv-full");
    for i in 0..8 {
        fstree::write_random(&src.join(format!("f{i}")), 24 * MB, 40 + i);
    }
    backup(
        &mut client,
        volume_backup(repo.clone(), "uid-full", "pv-full", "shop", "full"),
    )
    .await
    .result
    .expect("backup");
    let dst = csi_volume(&s.kubelet(), "uid-dst", "pv-dst");
    let mut req = restore_req(repo, "full", "uid-dst", "pv-dst", "");
    if let Some(r) = req.repository.as_mut() {
        r.limit_download_kib = 32 * 1024;
    }
    let out = restore(&mut client, req).await;
    let result = out.result.expect("restore");
    assert_eq!(result.bytes_restored, 8 * 24 * MB as u64);
    assert_eq!(
        std::fs::read(dst.join("f7")).expect("restored"),
        std::fs::read(src.join("f7")).expect("source")
    );
    let running: Vec<_> = out
        .progress
        .iter()
        .filter(|p| p.phase() == Phase::Running && p.total_bytes > 0)
        .collect();
    assert!(
        !running.is_empty(),
        "no restore progress: {:?}",
        out.progress
    );
    let last = running.last().expect("progress");
    assert_eq!(last.total_bytes, 8 * 24 * MB as u64);
    assert!(last.percent_done > 0.0 && last.bytes_done > 0, "{last:?}");
    assert!(
        agent
            .metric("stowage_agent_restore_bytes_total")
            .await
            .unwrap_or(0.0)
            >= (8 * 24 * MB) as f64
    );
}

/// A restore command's target namespace is never inferred from the source identity: a request
/// without it is refused before anything is read or exec'd.
#[tokio::test]
async fn a_restore_command_without_its_target_namespace_is_refused() {
    let s = Setup::new();
    let agent = s.agent().await;
    let mut client = agent.client(&s.pki).await;
    let req = v1::RestoreCommandRequest {
        run_id: "b/from-a".into(),
        repository: Some(local_repo(&s.repo(), PW, true)),
        source: Some(v1::CommandIdentity {
            namespace: "a".into(),
            owner_kind: "Pod".into(),
            owner_name: "db-0".into(),
            container: "db".into(),
        }),
        snapshot: "latest".into(),
        pod: "db-0".into(),
        command: "cat > restored.bin".into(),
        ..Default::default()
    };
    let e = client.restore_command(req).await.expect_err("refused");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("target_namespace"), "{}", e.message());
}

/// A fresh ext4 volume's root holds only `lost+found`: IntoEmpty takes it as empty, and Replace at
/// the root leaves it in place (mkfs made it; fsck needs it) while removing what the snapshot lacks.
#[tokio::test]
async fn lost_and_found_is_neither_content_nor_displaced() {
    let s = Setup::new();
    let agent = s.agent().await;
    let src = csi_volume(&s.kubelet(), "uid-src", "pv-src");
    std::fs::write(src.join("data.txt"), b"from the snapshot").expect("write");
    let repo = local_repo(&s.repo(), PW, true);
    let mut client = agent.client(&s.pki).await;
    backup(
        &mut client,
        volume_backup(repo.clone(), "uid-src", "pv-src", "shop", "src"),
    )
    .await
    .result
    .expect("backup");

    let fresh = csi_volume(&s.kubelet(), "uid-fresh", "pv-fresh");
    std::fs::create_dir(fresh.join("lost+found")).expect("lost+found");
    std::fs::set_permissions(
        fresh.join("lost+found"),
        std::fs::Permissions::from_mode(0o700),
    )
    .expect("chmod");
    std::fs::write(fresh.join("lost+found/#12"), b"recovered by fsck").expect("orphan");
    let req = RestoreRequest {
        mode: RestoreMode::IntoEmpty.into(),
        ..restore_req(repo.clone(), "src", "uid-fresh", "pv-fresh", "")
    };
    restore(&mut client, req)
        .await
        .result
        .expect("a volume holding only lost+found is empty");
    assert_eq!(
        std::fs::read(fresh.join("data.txt")).expect("restored"),
        b"from the snapshot"
    );

    std::fs::write(fresh.join("extra.txt"), b"not in the snapshot").expect("extra");
    let req = RestoreRequest {
        mode: RestoreMode::Replace.into(),
        ..restore_req(repo.clone(), "src", "uid-fresh", "pv-fresh", "")
    };
    restore(&mut client, req).await.result.expect("replace");
    assert!(
        !fresh.join("extra.txt").exists(),
        "Replace removes the rest"
    );
    assert_eq!(
        std::fs::read(fresh.join("lost+found/#12")).expect("lost+found kept"),
        b"recovered by fsck"
    );
    assert_eq!(
        std::fs::metadata(fresh.join("lost+found"))
            .expect("lost+found")
            .permissions()
            .mode()
            & 0o7777,
        0o700
    );
}

/// Names of staging directories left at a volume root.
fn staging_dirs(vol: &Path) -> Vec<String> {
    std::fs::read_dir(vol)
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".stowage-restore-"))
        .collect()
}

/// A pod races a Replace on purpose: the moment `config.yaml` is moved aside it makes a non-empty
/// directory of that name (as a watcher reacting to IN_MOVED_FROM would, or an application that
/// recreates its layout). The swap has committed by then: the snapshot wins, the restore succeeds
/// and the volume equals the snapshot, with no staging directory left. (Before, the merge failed
/// after the commit and the staging directory, holding the originals, was deleted.)
#[tokio::test]
async fn a_replace_after_its_commit_finishes_when_a_pod_races_it() {
    let s = Setup::new();
    let agent = s.agent().await;
    let vol = csi_volume(&s.kubelet(), "uid-race", "pv-race");
    std::fs::write(vol.join("config.yaml"), b"from the snapshot").expect("write");
    for i in 0..200 {
        std::fs::write(vol.join(format!("f{i:03}")), format!("{i}")).expect("write");
    }
    let repo = local_repo(&s.repo(), PW, true);
    let mut client = agent.client(&s.pki).await;
    backup(
        &mut client,
        volume_backup(repo.clone(), "uid-race", "pv-race", "shop", "race"),
    )
    .await
    .result
    .expect("backup");
    let mut raced = 0;
    for attempt in 0..8 {
        std::fs::write(vol.join("config.yaml"), format!("edited {attempt}")).expect("edit");
        std::fs::write(vol.join("not-in-snapshot"), b"x").expect("extra");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let racer = {
            let (vol, stop) = (vol.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if !vol.join("config.yaml").exists()
                        && std::fs::create_dir(vol.join("config.yaml")).is_ok()
                    {
                        std::fs::write(vol.join("config.yaml/x"), b"planted").expect("plant");
                        return true;
                    }
                }
                false
            })
        };
        let req = RestoreRequest {
            mode: RestoreMode::Replace.into(),
            ..restore_req(repo.clone(), "race", "uid-race", "pv-race", "")
        };
        let r = restore(&mut client, req).await.result;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let won = racer.join().expect("racer");
        let r = r.expect("the restore succeeds, raced or not");
        assert_eq!(r.files_restored, 201);
        assert_eq!(
            std::fs::read(vol.join("config.yaml")).expect("config.yaml is a file"),
            b"from the snapshot"
        );
        assert!(!vol.join("not-in-snapshot").exists());
        assert_eq!(std::fs::read(vol.join("f199")).expect("f199"), b"199");
        assert!(staging_dirs(&vol).is_empty(), "{:?}", staging_dirs(&vol));
        if won {
            raced += 1;
            if raced >= 2 {
                break;
            }
        }
    }
    assert!(
        raced > 0,
        "the racer never got between the commit and the merge"
    );
}

/// Include paths are literal, as users write them: `data*` restores and replaces the entry named
/// `data*`, not everything starting with `data`. Nested includes are one include. An include the
/// snapshot does not have fails the restore and deletes nothing.
#[tokio::test]
async fn include_paths_are_literal_nested_ones_merge_and_missing_ones_fail() {
    let s = Setup::new();
    let agent = s.agent().await;
    let vol = csi_volume(&s.kubelet(), "uid-inc", "pv-inc");
    std::fs::write(vol.join("data*"), b"star v1").expect("write");
    std::fs::create_dir_all(vol.join("database")).expect("mkdir");
    std::fs::write(vol.join("database/x"), b"db v1").expect("write");
    std::fs::create_dir_all(vol.join("a/b")).expect("mkdir");
    std::fs::write(vol.join("a/b/f"), b"f v1").expect("write");
    std::fs::write(vol.join("a/g"), b"g v1").expect("write");
    let repo = local_repo(&s.repo(), PW, true);
    let mut client = agent.client(&s.pki).await;
    backup(
        &mut client,
        volume_backup(repo.clone(), "uid-inc", "pv-inc", "shop", "inc"),
    )
    .await
    .result
    .expect("backup");
    std::fs::write(vol.join("data*"), b"star v2").expect("write");
    std::fs::write(vol.join("database/x"), b"db v2").expect("write");
    std::fs::write(vol.join("a/b/f"), b"f v2").expect("write");
    std::fs::write(vol.join("a/new"), b"new").expect("write");

    let replace = |include: &[&str]| RestoreRequest {
        mode: RestoreMode::Replace.into(),
        include: include.iter().map(|s| s.to_string()).collect(),
        ..restore_req(repo.clone(), "inc", "uid-inc", "pv-inc", "")
    };
    restore(&mut client, replace(&["data*"]))
        .await
        .result
        .expect("literal include");
    assert_eq!(std::fs::read(vol.join("data*")).expect("data*"), b"star v1");
    assert_eq!(
        std::fs::read(vol.join("database/x")).expect("x"),
        b"db v2",
        "`data*` is not a pattern"
    );

    restore(&mut client, replace(&["a/b", "a"]))
        .await
        .result
        .expect("nested includes");
    assert_eq!(std::fs::read(vol.join("a/b/f")).expect("f"), b"f v1");
    assert_eq!(std::fs::read(vol.join("a/g")).expect("g"), b"g v1");
    assert!(!vol.join("a/new").exists(), "a is replaced as a whole");

    std::fs::write(vol.join("nope"), b"live data").expect("write");
    let st = restore(&mut client, replace(&["nope"]))
        .await
        .result
        .expect_err("not in the snapshot");
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    assert!(st.message().contains("not in snapshot"), "{}", st.message());
    assert_eq!(std::fs::read(vol.join("nope")).expect("kept"), b"live data");
    assert!(staging_dirs(&vol).is_empty());
}

/// A snapshot larger than the target volume's free space is refused before anything is staged,
/// naming both figures; a CSI volume directory that is no longer a mount point (the pod went away)
/// is refused too, and nothing is written to the node's disk.
#[tokio::test]
async fn restores_refuse_a_volume_too_small_and_a_volume_no_longer_mounted() {
    let s = Setup::new();
    // The kubelet's directory of a CSI volume whose mount is gone, with what was under it (a plain
    // directory on the node's disk; an empty one the agent does not even list).
    let gone = s
        .kubelet()
        .join("pods/uid-gone/volumes/kubernetes.io~csi/pv-gone/mount");
    std::fs::create_dir_all(&gone).expect("mkdir");
    std::fs::write(gone.join("leftover"), b"node disk").expect("write");
    let agent = s.agent().await;
    let src = csi_volume(&s.kubelet(), "uid-big", "pv-big");
    stowage_tests::fstree::write_random(&src.join("big.bin"), 8 * MB, 3);
    let repo = local_repo(&s.repo(), PW, true);
    let mut client = agent.client(&s.pki).await;
    backup(
        &mut client,
        volume_backup(repo.clone(), "uid-big", "pv-big", "shop", "big"),
    )
    .await
    .result
    .expect("backup");

    // A 4 MiB volume (tmpfs, as a size-limited CSI volume would be) with a file in it.
    let small = s
        .kubelet()
        .join("pods/uid-small/volumes/kubernetes.io~csi/pv-small/mount");
    std::fs::create_dir_all(&small).expect("mkdir");
    let mounted = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=4m",
            "stowage-test",
            &small.display().to_string(),
        ])
        .status()
        .expect("mount");
    assert!(mounted.success());
    std::fs::write(small.join("db"), b"live").expect("write");
    let st = restore(
        &mut client,
        restore_req(repo.clone(), "big", "uid-small", "pv-small", ""),
    )
    .await
    .result
    .expect_err("does not fit");
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    let m = st.message();
    assert!(
        m.contains("needs 8.0 MiB") && m.contains("4.0 MiB free") && m.contains("target.pvc"),
        "{m}"
    );
    assert_eq!(std::fs::read(small.join("db")).expect("db"), b"live");
    assert!(staging_dirs(&small).is_empty());

    let st = restore(
        &mut client,
        restore_req(repo.clone(), "big", "uid-gone", "pv-gone", ""),
    )
    .await
    .result
    .expect_err("not mounted");
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    assert!(
        st.message().contains("not a mount point"),
        "{}",
        st.message()
    );
    assert_eq!(
        std::fs::read_dir(&gone).expect("ls").count(),
        1,
        "nothing written"
    );
}

/// Runs a Python snippet with `dir` as its argument (planting trees quickly: one syscall per entry).
fn plant(dir: &Path, script: &str) {
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(dir)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A pod plants, at its volume's root, a staging-named directory 200,000 levels deep and another of
/// 2,000,000 entries (the size the issue names; in a tmpfs volume, planting them takes ~15 s). The
/// agent's recovery walks both: it neither overflows its stack nor stops serving. It leaves the deep
/// tree, and half of the large one, for later and says so, while another volume is backed up and
/// restored meanwhile.
///
/// Long (~45 s): the trees must have the sizes the issue names, and planting them is most of the time.
#[tokio::test]
async fn planted_trees_neither_crash_the_agent_nor_hold_up_other_volumes() {
    let s = Setup::new();
    // A tmpfs, as a CSI volume may be: millions of entries are planted in seconds, not minutes.
    let hostile = s
        .kubelet()
        .join("pods/uid-hostile/volumes/kubernetes.io~csi/pv-hostile/mount");
    std::fs::create_dir_all(&hostile).expect("mkdir");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1g", "stowage-test"])
        .arg(&hostile)
        .status()
        .expect("mount");
    assert!(mounted.success());
    plant(
        &hostile.join(".stowage-restore-deep"),
        "import os,sys\nos.mkdir(sys.argv[1]); d=os.open(sys.argv[1],os.O_RDONLY)\nfor i in range(200000):\n    os.mkdir('d',dir_fd=d); n=os.open('d',os.O_RDONLY,dir_fd=d); os.close(d); d=n\n",
    );
    plant(
        &hostile.join(".stowage-restore-many"),
        "import os,sys\nos.mkdir(sys.argv[1]); d=os.open(sys.argv[1],os.O_RDONLY)\nfor i in range(2000000): os.mknod('f%d'%i, 0o100600, dir_fd=d)\n",
    );
    let good = csi_volume(&s.kubelet(), "uid-good", "pv-good");
    std::fs::write(good.join("a.txt"), b"served").expect("write");
    let mut agent = s.agent().await;
    let repo = local_repo(&s.repo(), PW, true);
    let mut client = agent.client(&s.pki).await;
    backup(
        &mut client,
        volume_backup(repo.clone(), "uid-good", "pv-good", "shop", "good"),
    )
    .await
    .result
    .expect("backup of another volume");
    std::fs::write(good.join("a.txt"), b"changed").expect("write");
    let req = RestoreRequest {
        mode: RestoreMode::Replace.into(),
        ..restore_req(repo.clone(), "good", "uid-good", "pv-good", "")
    };
    restore(&mut client, req)
        .await
        .result
        .expect("restore into another volume");
    assert_eq!(std::fs::read(good.join("a.txt")).expect("a"), b"served");

    wait_until(
        "the recovery pass to report both planted trees",
        Duration::from_secs(180),
        || {
            let log = agent.log_text();
            log.contains("more than 256 directories deep")
                && log.contains("stopped after 1000000 entries")
        },
    )
    .await;
    assert!(
        agent.wait_exit(Duration::from_millis(10)).await.is_none(),
        "the agent is up"
    );
    assert!(
        hostile.join(".stowage-restore-deep").exists(),
        "what could not be finished is left"
    );
    let left = std::fs::read_dir(hostile.join(".stowage-restore-many"))
        .expect("ls")
        .count();
    assert_eq!(left, 1_000_000, "one pass removes its budget, no more");
    // The test's own cleanup (Setup's drop unmounts it): std's remove_dir_all would recurse
    // 200,000 levels; unmounting the tmpfs frees everything at once.
    drop(agent);
    let umount = std::process::Command::new("umount")
        .arg(&hostile)
        .status()
        .expect("umount");
    assert!(umount.success());
}

/// A staging directory whose owner's heartbeat is fresh (another agent's restore into a shared
/// volume, or an agent that stopped seconds ago with its originals aside) makes a restore into the
/// volume wait its turn: it is refused, and nothing is touched. Once the heartbeat is stale, the
/// next restore first puts that leftover right, then restores.
#[tokio::test]
async fn a_restore_waits_while_another_agents_staging_is_alive() {
    let s = Setup::new();
    let agent = s.agent().await;
    let vol = csi_volume(&s.kubelet(), "uid-busy", "pv-busy");
    std::fs::write(vol.join("a.txt"), b"snapshot").expect("write");
    let repo = local_repo(&s.repo(), PW, true);
    let mut client = agent.client(&s.pki).await;
    backup(
        &mut client,
        volume_backup(repo.clone(), "uid-busy", "pv-busy", "shop", "busy"),
    )
    .await
    .result
    .expect("backup");
    // Another agent's live staging directory, as it writes one: root-owned, 0700, an owner file.
    let other = vol.join(".stowage-restore-shop-other-1");
    std::fs::create_dir(&other).expect("mkdir");
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let hex: String = b"node-2".iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(other.join("owner"), format!("node {hex}\ninstance 1-1\n")).expect("owner");
    std::fs::set_permissions(other.join("owner"), std::fs::Permissions::from_mode(0o600))
        .expect("chmod");
    std::fs::create_dir(other.join("data")).expect("data");
    std::fs::write(vol.join("a.txt"), b"changed").expect("write");
    let req = || RestoreRequest {
        mode: RestoreMode::Replace.into(),
        ..restore_req(repo.clone(), "busy", "uid-busy", "pv-busy", "")
    };
    let st = restore(&mut client, req()).await.result.expect_err("busy");
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    assert!(
        st.message().contains("heartbeat is fresh"),
        "{}",
        st.message()
    );
    assert_eq!(std::fs::read(vol.join("a.txt")).expect("a"), b"changed");
    assert!(other.exists());
    // Its agent is gone: the heartbeat ages past the bound.
    let old = std::time::SystemTime::now() - Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(other.join("owner"))
        .expect("owner")
        .set_modified(old)
        .expect("mtime");
    restore(&mut client, req()).await.result.expect("restored");
    assert_eq!(std::fs::read(vol.join("a.txt")).expect("a"), b"snapshot");
    assert!(!other.exists(), "the stale leftover was put right first");
}
