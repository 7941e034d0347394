//! `kubectl stowage`, run by the real kubectl (which finds the plugin on PATH) against the local
//! control plane, with the real coordinator, agents and restic: status, snapshots, backup now and
//! restore (including a failing one, whose exit code and message carry the reason).

use std::process::Output;

use stowage_tests::env::TestEnv;

fn ok(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

#[tokio::test]
async fn kubectl_stowage_backs_up_lists_restores_and_reports_failures() {
    let env = TestEnv::new("plugin").await;
    env.init_repo();
    let _c = env.coordinator().await;
    let _: stowage_api::Schedule = env
        .create(
            serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Schedule",
            "metadata": {"name": "nightly"},
            "spec": {"backend": env.local_backend(), "backup": {"schedule": "0 3 1 1 *"}}}),
        )
        .await;
    let data = env.mounted("data", "node-3", "orders.csv").await;
    std::fs::write(data.join("orders.csv"), b"1,apples\n2,pears\n").expect("write");

    // backup now --wait: follows the run and exits 0 once it Succeeded.
    let out = env.kubectl_stowage(&[
        "backup",
        "now",
        "--schedule",
        "nightly",
        "--wait",
        "--timeout",
        "120s",
    ]);
    ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("succeeded") && stdout.contains("data"),
        "{stdout}"
    );

    // status -o json: the Schedule, the volume's newest success, an agent on every node.
    let status = ok(&env.kubectl_stowage(&["status", "-o", "json"]));
    assert_eq!(status["schedules"][0]["name"], "nightly", "{status:#}");
    let vol = &status["volumes"][0];
    assert_eq!(vol["name"], "data", "{status:#}");
    assert_eq!(vol["node"], "node-3");
    let snapshot = vol["snapshot"].as_str().expect("snapshot").to_string();
    let agent_nodes: std::collections::BTreeSet<String> = status["agents"]
        .as_array()
        .expect("agents")
        .iter()
        .filter(|a| a["ready"] == true)
        .filter_map(|a| a["node"].as_str().map(String::from))
        .collect();
    assert!(
        env.cluster
            .node_names()
            .iter()
            .all(|n| agent_nodes.contains(n)),
        "{status:#}"
    );
    // The table names the same things.
    let out = env.kubectl_stowage(&["status"]);
    ok(&out);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("SCHEDULES") && text.contains("nightly") && text.contains(&snapshot[..8]),
        "{text}"
    );

    // snapshots --pvc: read from the repository with restic, the same snapshot.
    let snaps = ok(&env.kubectl_stowage(&["snapshots", "--pvc", "data", "-o", "json"]));
    let ids: Vec<&str> = snaps
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|s| s["id"].as_str())
        .collect();
    assert_eq!(ids, [snapshot.as_str()], "{snaps:#}");

    // restore: the deleted file is back, the pod untouched.
    std::fs::remove_file(data.join("orders.csv")).expect("delete");
    let out = env.kubectl_stowage(&["restore", "--pvc", "data", "--timeout", "120s"]);
    ok(&out);
    assert_eq!(
        std::fs::read(data.join("orders.csv")).expect("restored"),
        b"1,apples\n2,pears\n"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("100.0%"), "progress shown: {stderr}");

    // restore --dry-run: a table of what a Replace would do, and nothing done.
    std::fs::write(data.join("extra.csv"), b"made after the backup\n").expect("write");
    let out = env.kubectl_stowage(&[
        "restore",
        "--pvc",
        "data",
        "--mode",
        "Replace",
        "--dry-run",
        "--timeout",
        "120s",
    ]);
    ok(&out);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        table.contains("nothing was written") && table.contains("WOULD"),
        "{table}"
    );
    let delete_line = table
        .lines()
        .find(|l| l.trim_start().starts_with("delete"))
        .unwrap_or_default();
    assert!(delete_line.contains("/extra.csv"), "{table}");
    assert!(data.join("extra.csv").exists(), "a dry run deletes nothing");
    // -o json: the preview in the Restore's status.
    let json = ok(&env.kubectl_stowage(&[
        "restore",
        "--pvc",
        "data",
        "--mode",
        "Replace",
        "--dry-run",
        "-o",
        "json",
        "--timeout",
        "120s",
    ]));
    assert_eq!(
        json["status"]["restore"]["preview"]["deleted"]["paths"],
        serde_json::json!(["/extra.csv"]),
        "{json:#}"
    );
    assert!(data.join("extra.csv").exists());

    // A snapshot that does not exist: exit 1, and the reason.
    let out = env.kubectl_stowage(&[
        "restore",
        "--pvc",
        "data",
        "--snapshot",
        "deadbeef",
        "--timeout",
        "60s",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Failed") && stderr.contains("SnapshotNotFound"),
        "{stderr}"
    );

    // Mistakes are sentences, not dumps.
    let out = env.kubectl_stowage(&["backup", "now", "--schedule", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: reading Schedule") && stderr.contains("\"nope\" not found"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("ErrorResponse"),
        "a sentence, not a Debug dump: {stderr}"
    );
}

/// `kubectl stowage init`: a namespace's own repository in a bucket shared by namespaces (its own
/// prefix), a random password in a labelled Secret, created once; a second init refuses to replace
/// the password or to initialise over the repository, and leaves nothing behind; a Backup with the
/// backend init printed works.
#[tokio::test]
async fn kubectl_stowage_init_gives_a_namespace_its_own_repository() {
    use k8s_openapi::api::core::v1::Secret;
    let env = TestEnv::bare("plugin-init").await;
    let moto = stowage_tests::moto::Moto::start();
    moto.create_bucket("tenants");
    stowage_tests::coordinator::secret(
        &env.client,
        &env.ns,
        "s3-credentials",
        &[("id", "AKIATESTKEY"), ("secret", "test-secret-key-value")],
    )
    .await;
    let args = [
        "init",
        "--s3-endpoint",
        moto.endpoint.as_str(),
        "--s3-bucket",
        "tenants",
        "-o",
        "json",
    ];
    let created = ok(&env.kubectl_stowage(&args));
    let location = format!("s3:{}/tenants/{}", moto.endpoint, env.ns);
    assert_eq!(created["repository"], location.as_str(), "{created:#}");
    assert_eq!(created["backend"]["s3"]["prefix"], env.ns.as_str());
    let secrets: kube::Api<Secret> = kube::Api::namespaced(env.client.clone(), &env.ns);
    let s = secrets
        .get("backup-repo")
        .await
        .expect("the password Secret");
    assert_eq!(
        s.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("stowage.dev/credentials"))
            .map(String::as_str),
        Some("true")
    );
    let password =
        String::from_utf8(s.data.as_ref().expect("data")["password"].0.clone()).expect("utf-8");
    assert_eq!(password.len(), 43);
    // The repository exists and opens with that password.
    let aws = [
        ("AWS_ACCESS_KEY_ID", "AKIATESTKEY"),
        ("AWS_SECRET_ACCESS_KEY", "test-secret-key-value"),
    ];
    let out = stowage_tests::restic::run(&location, &password, &aws, &["snapshots", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Again: the password is never replaced.
    let again = env.kubectl_stowage(&args[..5]);
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("exists already"), "{stderr}");
    // With the Secret gone, the repository is still there: no init over it, and no new Secret left.
    secrets
        .delete("backup-repo", &Default::default())
        .await
        .expect("delete");
    for _ in 0..100 {
        if secrets.get_opt("backup-repo").await.expect("get").is_none() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let over = env.kubectl_stowage(&args[..5]);
    assert!(!over.status.success());
    let stderr = String::from_utf8_lossy(&over.stderr);
    assert!(stderr.contains("there is a repository at"), "{stderr}");
    assert!(
        secrets.get_opt("backup-repo").await.expect("get").is_none(),
        "the Secret of a failed init is removed again"
    );
    // The old password still opens the repository: nothing was written to it.
    let out = stowage_tests::restic::run(&location, &password, &aws, &["snapshots", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
