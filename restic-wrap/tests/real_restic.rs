#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failures must stop the test

//! restic-wrap against the real restic binary: every subcommand it wraps, on a temporary repository.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use restic_wrap::options::{
    BackupOptions, CheckOptions, ForgetOptions, PruneOptions, RestoreOptions, Retention,
    SnapshotsOptions, StatsMode, StatsOptions, UnlockOptions,
};
use restic_wrap::{
    Backend, BackupEvent, Error, LockInfo, LockObserver, LockPolicy, Repository, Restic,
};

fn restic_for(repo: &Path, password: &str) -> Restic {
    Restic::new(
        std::env::var("STOWAGE_TEST_RESTIC").unwrap_or_else(|_| "restic".into()),
        Repository {
            backend: Backend::Local {
                path: repo.display().to_string(),
            },
            password: password.into(),
        },
    )
    .with_limits(restic_wrap::Limits {
        stall: Duration::from_secs(120),
        max: Duration::from_secs(300),
    })
}

async fn backup(r: &Restic, dir: &Path, pvc: &str, time: Option<&str>) -> String {
    let opts = BackupOptions {
        paths: vec![".".into()],
        host: Some(format!("ns/{pvc}")),
        tags: vec![
            "stowage.dev/namespace=ns".into(),
            format!("stowage.dev/pvc={pvc}"),
        ],
        time: time.map(String::from),
        ..Default::default()
    };
    // Progress as an async stream: status lines, then exactly one Finished.
    use futures::StreamExt;
    let events: Vec<_> = r
        .backup(&opts, dir)
        .expect("spawn")
        .events()
        .collect()
        .await;
    let (last, statuses) = events.split_last().expect("events");
    assert!(statuses.iter().all(|e| matches!(e, BackupEvent::Status(_))));
    // restic 0.19 prints no status line for a backup that ends before its first progress tick.
    let _ = statuses;
    match last {
        BackupEvent::Finished(Ok(out)) => out.summary.snapshot_id.clone(),
        other => panic!("backup failed: {other:?}"),
    }
}

#[tokio::test]
async fn every_wrapped_subcommand_works_against_real_restic() {
    let t = tempfile::tempdir().unwrap();
    let repo = t.path().join("repo");
    let data = t.path().join("data");
    std::fs::create_dir_all(data.join("sub")).unwrap();
    std::fs::write(data.join("sub/file"), b"hello restic").unwrap();
    let r = restic_for(&repo, "pw");

    assert!(r.version().await.unwrap().starts_with("0."));
    assert!(!r.exists().await.unwrap());
    assert!(matches!(
        r.ensure_repository(false).await,
        Err(Error::RepositoryNotFound { .. })
    ));
    r.ensure_repository(true).await.unwrap();
    assert!(r.exists().await.unwrap());
    assert!(matches!(
        restic_for(&repo, "wrong").exists().await,
        Err(Error::WrongPassword { .. })
    ));

    // Three snapshots of one PVC on three days, one of another: retention is scoped by tags.
    for day in [
        "2026-11-01 10:00:00",
        "2026-11-02 10:00:00",
        "2026-11-03 10:00:00",
    ] {
        backup(&r, &data, "a", Some(day)).await;
    }
    let b = backup(&r, &data, "b", Some("2026-11-01 09:00:00")).await;
    let only_a = SnapshotsOptions {
        tags: vec!["stowage.dev/pvc=a".into()],
        ..Default::default()
    };
    assert_eq!(r.snapshots(&only_a).await.unwrap().len(), 3);
    assert_eq!(
        r.snapshots(&SnapshotsOptions::default())
            .await
            .unwrap()
            .len(),
        4
    );

    let forget = ForgetOptions {
        retention: Retention {
            keep_last: Some(1),
            ..Default::default()
        },
        tags: vec![
            "stowage.dev/namespace=ns".into(),
            "stowage.dev/pvc=a".into(),
        ],
        group_by: Some("host".into()),
        ..Default::default()
    };
    let groups = r
        .forget(&ForgetOptions {
            dry_run: true,
            ..forget.clone()
        })
        .await
        .unwrap();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].remove.as_ref().map(Vec::len), Some(2));
    assert_eq!(
        r.snapshots(&only_a).await.unwrap().len(),
        3,
        "dry run removes nothing"
    );
    r.forget(&forget).await.unwrap();
    assert_eq!(r.snapshots(&only_a).await.unwrap().len(), 1);
    let all = r.snapshots(&SnapshotsOptions::default()).await.unwrap();
    assert!(
        all.iter().any(|s| s.id.starts_with(&b)),
        "the other PVC's snapshot is untouched"
    );

    let report = r.prune(&PruneOptions::default()).await.unwrap();
    assert!(!report.is_empty());
    r.check(&CheckOptions {
        read_data_subset: Some("100%".into()),
    })
    .await
    .unwrap();
    let stats = r
        .stats(&StatsOptions {
            mode: StatsMode::RawData,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(stats.total_size > 0);
    let restore_size = r.stats(&StatsOptions::default()).await.unwrap();
    assert!(restore_size.total_size >= 12);

    let target = t.path().join("restored");
    let mut run = r
        .restore(&RestoreOptions {
            snapshot: b.clone(),
            target: target.clone(),
            ..Default::default()
        })
        .unwrap();
    while run.next_status().await.unwrap().is_some() {}
    let restored = run.finish().await.unwrap();
    // restic 0.19's restore JSON: the summary counts what was written.
    // restic counts the directory too.
    assert_eq!(restored.summary.files_restored, 2, "{restored:?}");
    assert_eq!(restored.summary.bytes_restored, 12, "{restored:?}");
    assert_eq!(
        std::fs::read(target.join("sub/file")).unwrap(),
        b"hello restic"
    );

    assert!(r.list_locks().await.unwrap().is_empty());
    r.unlock(&UnlockOptions).await.unwrap();
}

#[tokio::test]
async fn partial_backup_is_an_error_that_carries_the_snapshot() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("ok"), b"fine").unwrap();
    std::fs::write(data.join("unreadable"), b"secret").unwrap();
    std::fs::set_permissions(
        data.join("unreadable"),
        std::fs::Permissions::from_mode(0o000),
    )
    .unwrap();
    // Root reads a mode-0000 file; the real restic run without DAC override cannot.
    let wrapper = t.path().join("restic-no-dac");
    std::fs::write(
        &wrapper,
        "#!/bin/sh\nexec setpriv --inh-caps=-dac_override,-dac_read_search \
         --bounding-set=-dac_override,-dac_read_search restic \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let repo = t.path().join("repo");
    let r = Restic::new(
        &wrapper,
        Repository {
            backend: Backend::Local {
                path: repo.display().to_string(),
            },
            password: "pw".into(),
        },
    );
    r.init().await.unwrap();
    let opts = BackupOptions {
        paths: vec![".".into()],
        ..Default::default()
    };
    let mut run = r.backup(&opts, &data).unwrap();
    while run.next_status().await.unwrap().is_some() {}
    match run.finish().await {
        Err(Error::PartialBackup { summary, errors }) => {
            assert!(!summary.snapshot_id.is_empty());
            assert!(
                errors.iter().any(|e| e.item.contains("unreadable")),
                "{errors:?}"
            );
        }
        other => panic!("expected a partial backup, got {other:?}"),
    }
}

#[tokio::test]
async fn dropping_a_running_backup_kills_restic() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // Sparse: reading 2 GiB of zeros keeps restic busy for a while without writing 2 GiB.
    std::fs::File::create(data.join("big"))
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    let r = restic_for(&t.path().join("repo"), "pw");
    r.init().await.unwrap();
    let mut run = r
        .backup(
            &BackupOptions {
                paths: vec![".".into()],
                ..Default::default()
            },
            &data,
        )
        .unwrap();
    let pid = run.pid().unwrap();
    let _ = tokio::time::timeout(Duration::from_millis(500), run.next_status()).await;
    drop(run);
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "restic {pid} still running after drop"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn lock_retry_waits_for_a_live_lock_and_reports_it() {
    #[derive(Default)]
    struct Seen(AtomicU32);
    impl LockObserver for Seen {
        fn waiting(&self, _: &LockInfo) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let t = tempfile::tempdir().unwrap();
    let repo = t.path().join("repo");
    let seen = Arc::new(Seen::default());
    let r = restic_for(&repo, "pw").with_lock_policy(
        LockPolicy {
            max_wait: Duration::from_secs(30),
            initial_backoff: Duration::from_millis(100),
            ..Default::default()
        },
        seen.clone(),
    );
    r.init().await.unwrap();
    // Hold an exclusive lock with a stopped `restic check`, release it after a second.
    let mut holder = std::process::Command::new("restic")
        .arg("-r")
        .arg(&repo)
        .arg("check")
        .env("RESTIC_PASSWORD", "pw")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(holder.id() as i32);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let complete = std::fs::read_dir(repo.join("locks")).map(|d| {
            d.flatten().any(|e| {
                use std::os::unix::fs::PermissionsExt;
                e.metadata()
                    .is_ok_and(|m| m.len() > 0 && m.permissions().mode() & 0o200 == 0)
            })
        });
        if complete.unwrap_or(false) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no lock taken");
        std::thread::sleep(Duration::from_millis(2));
    }
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    // The lock can be read without taking one: whose it is, and that it is exclusive.
    let ids = r.list_locks().await.unwrap();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let lock = r.read_lock(&ids[0]).await.unwrap();
    assert!(lock.exclusive, "{lock:?}");
    assert_eq!(lock.pid, pid.as_raw() as u32);
    assert!(
        !lock.hostname.is_empty() && !lock.time.is_empty(),
        "{lock:?}"
    );
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
        holder.wait().unwrap();
    });
    let snaps = r.snapshots(&SnapshotsOptions::default()).await.unwrap();
    assert!(snaps.is_empty());
    assert!(seen.0.load(Ordering::SeqCst) >= 1, "the wait was reported");
    release.await.unwrap();
}

#[tokio::test]
async fn a_stopped_restic_is_stalled_and_killed_within_the_limit() {
    let t = tempfile::tempdir().unwrap();
    let repo = t.path().join("repo");
    restic_for(&repo, "pw")
        .ensure_repository(true)
        .await
        .unwrap();
    let r = restic_for(&repo, "pw").with_limits(restic_wrap::Limits {
        stall: Duration::from_secs(2),
        max: Duration::from_secs(60),
    });
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..200 {
        std::fs::write(src.join(format!("f{i}")), vec![i as u8; 64 * 1024]).unwrap();
    }
    let opts = BackupOptions {
        paths: vec![".".into()],
        host: Some("ns/pvc".into()),
        ..Default::default()
    };
    let mut run = r.backup(&opts, &src).unwrap();
    let pid = run.pid().unwrap() as i32;
    // Frozen: it prints nothing any more, as if its disk or its repository hung.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    let started = std::time::Instant::now();
    let err = loop {
        match run.next_status().await {
            Ok(Some(_)) => continue,
            Ok(None) => break run.finish().await.unwrap_err(),
            Err(e) => break e,
        }
    };
    assert!(matches!(err, restic_wrap::Error::Stalled { .. }), "{err:?}");
    assert!(err.to_string().contains("made no progress for 2s"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // The process is gone (killed, not left stopped).
    assert!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err(),
        "restic {pid} still exists"
    );
}

#[tokio::test]
async fn outcomes_come_from_exit_codes() {
    let t = tempfile::tempdir().unwrap();
    let repo = t.path().join("repo");
    let missing = restic_for(&repo, "pw");
    assert!(matches!(
        missing.snapshots(&SnapshotsOptions::default()).await,
        Err(restic_wrap::Error::RepositoryNotFound { .. })
    ));
    assert!(!missing.exists().await.unwrap());
    missing.ensure_repository(true).await.unwrap();
    let wrong = restic_for(&repo, "not the password");
    assert!(matches!(
        wrong.snapshots(&SnapshotsOptions::default()).await,
        Err(restic_wrap::Error::WrongPassword { .. })
    ));
    // Never created by a read, and never "not found" when the password is wrong.
    assert!(matches!(
        wrong.ensure_repository(true).await,
        Err(restic_wrap::Error::WrongPassword { .. })
    ));
}

/// Keys: a key added for a new password (given on stdin) opens the repository; the old one's key
/// is removed through the new password; the old password then opens nothing; restic refuses to
/// remove the key in use.
#[tokio::test]
async fn keys_are_added_listed_and_removed_through_stdin() {
    let t = tempfile::tempdir().unwrap();
    let repo = t.path().join("repo");
    let old = restic_for(&repo, "old password");
    old.ensure_repository(true).await.unwrap();
    let keys = old.keys().await.unwrap();
    assert_eq!(keys.len(), 1);
    assert!(keys[0].current);
    let old_id = keys[0].id.clone();
    assert!(
        chrono::NaiveDateTime::parse_from_str(&keys[0].created, "%Y-%m-%d %H:%M:%S").is_ok(),
        "{:?}",
        keys[0].created
    );
    old.key_add("new password").await.unwrap();
    let new = restic_for(&repo, "new password");
    let keys = new.keys().await.unwrap();
    assert_eq!(keys.len(), 2);
    let new_id = keys.iter().find(|k| k.current).unwrap().id.clone();
    assert_ne!(new_id, old_id);
    assert!(matches!(
        new.key_remove(&new_id).await,
        Err(Error::CommandFailed { .. })
    ));
    new.key_remove(&old_id).await.unwrap();
    assert_eq!(new.keys().await.unwrap().len(), 1);
    assert!(matches!(old.keys().await, Err(Error::WrongPassword { .. })));
}
