//! Declared key rotation (real restic, the cluster's agents, a coordinator of the test's own): the
//! Schedule's Secret switched to a new password with the old one as previous; the next run adds
//! the new key, checks it and removes the old one; backups and restores keep working; every state a
//! rotation interrupted by a coordinator restart can leave is finished by the next run; the key's
//! age reaches the Schedule and the metrics.
//!
//! Length: one scenario, one file.

use std::time::Duration;

use kube::Api;
use kube::api::{Patch, PatchParams};
use stowage_api::{Backup, Check, Restore, Schedule};
use stowage_tests::coordinator::{condition, fired_metadata, secret, wait_event, wait_json};
use stowage_tests::env::{PASSWORD, TestEnv};

const NEW: &str = "a new password, rotated in";
const NEWER: &str = "and a newer one still";
const NEWEST: &str = "the newest, rotated while the coordinator dies";

fn opens(repo: &str, password: &str) -> bool {
    stowage_tests::restic::run(repo, password, &[], &["snapshots", "--json"])
        .status
        .success()
}

async fn point(env: &TestEnv, current: &str, previous: Option<&str>) {
    let mut backend = env.local_backend();
    backend["repoPasswordSecretRef"] = serde_json::json!({"name": current, "key": "password"});
    backend["initialize"] = serde_json::json!(false);
    if let Some(p) = previous {
        backend["previousPasswordSecretRef"] = serde_json::json!({"name": p, "key": "password"});
    }
    Api::<Schedule>::namespaced(env.client.clone(), &env.ns)
        .patch(
            "nightly",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"spec": {"backend": backend}})),
        )
        .await
        .expect("patch schedule");
}

async fn backup(env: &TestEnv, name: &str) -> serde_json::Value {
    env.run::<Backup>(
        name,
        serde_json::json!({"scheduleRef": {"name": "nightly"}}),
        Duration::from_secs(120),
    )
    .await
}

/// Long (~60 s): eight runs, each with its key looks and steps, a coordinator killed mid-rotation,
/// and plain restic around them.
#[tokio::test]
async fn a_declared_rotation_adds_checks_and_removes_keys_and_survives_interruptions() {
    let env = TestEnv::new("rotate").await;
    let repo = env.init_repo().display().to_string();
    let dir = env.mounted("data", "node-2", "a.txt").await;
    std::fs::write(dir.join("a.txt"), b"before the rotation").expect("write");
    let mut coordinator = env.coordinator().await;
    let _: Schedule = env
        .create(
            serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Schedule",
            "metadata": {"name": "nightly"},
            "spec": {"backend": env.local_backend(), "backup": {"schedule": "@weekly"}}}),
        )
        .await;
    let b = backup(&env, "before").await;
    assert_eq!(b["status"]["phase"], "Succeeded", "{b:#}");

    // The rotation: the Secret is switched to a new password, the old one named as previous.
    secret(&env.client, &env.ns, "repo-new", &[("password", NEW)]).await;
    point(&env, "repo-new", Some("backup-repo")).await;
    let b = backup(&env, "rotates").await;
    assert_eq!(b["status"]["phase"], "Succeeded", "{b:#}");
    let c = condition(&b, "KeyRotated").expect("KeyRotated");
    assert_eq!(c["status"], "True", "{c}");
    assert_eq!(c["reason"], "PreviousKeyRemoved", "{c}");
    for reason in ["KeyAdded", "PreviousKeyRemoved"] {
        wait_event(
            &env.client,
            &env.ns,
            "rotates",
            reason,
            "",
            Duration::from_secs(20),
        )
        .await;
    }
    assert!(
        !opens(&repo, PASSWORD),
        "the old password no longer opens the repository"
    );
    assert!(opens(&repo, NEW));
    assert_eq!(
        stowage_tests::restic::snapshots(&repo, NEW).len(),
        2,
        "both backups are there"
    );

    // A restore with the new password.
    std::fs::write(dir.join("a.txt"), b"overwritten").expect("write");
    let r = env
        .run::<Restore>(
            "back",
            serde_json::json!({"scheduleRef": {"name": "nightly"}, "source": {"pvc": "data"},
                               "target": {"mode": "Merge"}}),
            Duration::from_secs(120),
        )
        .await;
    assert_eq!(r["status"]["phase"], "Succeeded", "{r:#}");
    assert_eq!(
        std::fs::read(dir.join("a.txt")).expect("read"),
        b"before the rotation"
    );

    // Interrupted after the add (a coordinator restarted before the removal): both passwords open
    // through different keys. The next run only removes the previous key.
    stowage_tests::restic::key_add(&repo, NEW, NEWER);
    secret(&env.client, &env.ns, "repo-newer", &[("password", NEWER)]).await;
    point(&env, "repo-newer", Some("repo-new")).await;
    let b = backup(&env, "finishes").await;
    assert_eq!(b["status"]["phase"], "Succeeded", "{b:#}");
    assert_eq!(
        condition(&b, "KeyRotated").expect("KeyRotated")["reason"],
        "PreviousKeyRemoved"
    );
    assert!(!opens(&repo, NEW) && opens(&repo, NEWER));

    // Interrupted after the removal (the previous field still set): nothing left to do.
    let b = backup(&env, "nothing-to-do").await;
    assert_eq!(b["status"]["phase"], "Succeeded", "{b:#}");
    assert!(condition(&b, "KeyRotated").is_none(), "{b:#}");

    // Interrupted for real: a lock another host holds keeps the removal waiting (restic takes its
    // exclusive lock for it) after the add; the coordinator dies then. A new one resumes the run,
    // and the removal, once the lock is gone.
    let repo_path = std::path::PathBuf::from(&repo);
    stowage_tests::restic::forge_lock(&repo_path, NEWER, "other-host", 4242, Duration::ZERO, false);
    secret(&env.client, &env.ns, "repo-newest", &[("password", NEWEST)]).await;
    point(&env, "repo-newest", Some("repo-newer")).await;
    let _: Backup = env
        .create_run(
            "interrupted",
            serde_json::json!({"scheduleRef": {"name": "nightly"}}),
        )
        .await;
    wait_event(
        &env.client,
        &env.ns,
        "interrupted",
        "KeyAdded",
        "",
        Duration::from_secs(60),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(coordinator);
    assert!(
        opens(&repo, NEWER) && opens(&repo, NEWEST),
        "after the add, before the removal: both keys work"
    );
    for lock in std::fs::read_dir(repo_path.join("locks"))
        .expect("locks")
        .flatten()
    {
        std::fs::remove_file(lock.path()).expect("remove the forged lock");
    }
    coordinator = env.coordinator().await;
    let b = env
        .wait_run::<Backup>("interrupted", Duration::from_secs(120))
        .await;
    assert_eq!(b["status"]["phase"], "Succeeded", "{b:#}");
    assert_eq!(
        condition(&b, "KeyRotated").expect("KeyRotated")["reason"],
        "PreviousKeyRemoved",
        "{b:#}"
    );
    assert!(!opens(&repo, NEWER) && opens(&repo, NEWEST));

    // Neither password opens: the run fails before anything is written, naming the fields.
    secret(
        &env.client,
        &env.ns,
        "repo-wrong",
        &[("password", "not this one")],
    )
    .await;
    point(&env, "repo-wrong", Some("backup-repo")).await;
    let b = backup(&env, "wrong").await;
    assert_eq!(b["status"]["phase"], "Failed", "{b:#}");
    let c = condition(&b, "Succeeded").expect("Succeeded");
    assert_eq!(c["reason"], "NoPasswordOpens", "{c}");
    assert!(
        c["message"].as_str().is_some_and(
            |m| m.contains("neither repoPasswordSecretRef nor previousPasswordSecretRef")
        ),
        "{c}"
    );
    assert!(opens(&repo, NEWEST), "the working key is still there");

    // The key's age reaches the Schedule's figures and the metric (a Check of the Schedule).
    point(&env, "repo-newest", None).await;
    let metadata = fired_metadata(&env.client, &env.ns, "nightly", "check", "check-1").await;
    let _: Check = env
        .create(
            serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Check",
            "metadata": metadata, "spec": {"scheduleRef": {"name": "nightly"}}}),
        )
        .await;
    let c = env
        .wait_run::<Check>("check-1", Duration::from_secs(120))
        .await;
    assert_eq!(c["status"]["phase"], "Succeeded", "{c:#}");
    let s = wait_json::<Schedule>(
        &env.client,
        &env.ns,
        "nightly",
        Duration::from_secs(30),
        "status.repository.keyCreated",
        |s| s["status"]["repository"]["keyCreated"].as_str().is_some(),
    )
    .await;
    assert!(
        s["status"]["repository"]["keyCreated"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    let series = format!(
        "stowage_repository_key_age_seconds{{namespace=\"{}\",schedule=\"nightly\"}}",
        env.ns
    );
    let age = coordinator
        .metric(&series)
        .await
        .expect("the key age series");
    assert!((0.0..3600.0).contains(&age), "{age}");
}
