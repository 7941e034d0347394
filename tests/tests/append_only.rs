//! Backups that a compromised node cannot destroy (issue #22, the REST path): the agents hold
//! credentials of an `--append-only` rest-server, a real one built from Go modules. Root on a node
//! has exactly those: with them, plain restic and plain HTTP try to forget, prune, delete snapshots
//! and overwrite packs and keys, and every attempt fails; a Check through the full-access server and
//! a restore through the agent find everything intact.
//!
//! Length: one scenario, one file.

use std::path::Path;

use stowage_proto::v1::{
    self, PruneRequest, RestoreRequest, RetentionPolicy, VolumeIdentity, VolumeRef,
};
use stowage_tests::agent::{Setup, backup, csi_volume, prune, rest_repo, restore, volume_backup};
use stowage_tests::rest_server::RestServer;
use stowage_tests::{fstree, restic};

const PW: &str = "correct horse battery staple";

/// Names of the files below `repo/<kind>`.
fn files(repo: &Path, kind: &str) -> Vec<String> {
    let mut out: Vec<String> = walk(&repo.join(kind))
        .into_iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Long (~30 s): a backup, then ten attacks, each a restic or HTTP round trip, then a Check and a
/// restore.
#[tokio::test]
async fn a_compromised_node_with_the_agents_credentials_cannot_destroy_backups() {
    let s = Setup::new();
    let data = s.path("rest-data");
    // One repository directory, two servers: the agents' (append-only) and maintenance's.
    let append_only = RestServer::start(&data, true, "agents", "agents-secret").await;
    let full = RestServer::start(&data, false, "maintenance", "maintenance-secret").await;
    let repo_url = format!("{}shop/", append_only.url);
    let agent = s.agent().await;
    let vol = csi_volume(&s.kubelet(), "pod-a", "pv-a");
    fstree::populate(&vol, 4 << 20);
    let agents_repo = rest_repo(&repo_url, "agents", "agents-secret", PW);
    let mut client = agent.client(&s.pki).await;
    // The agent creates the repository and backs up through the append-only server.
    let mut first = agents_repo.clone();
    first.auto_init = true;
    let b = backup(
        &mut client,
        volume_backup(first, "pod-a", "pv-a", "shop", "data"),
    )
    .await
    .result
    .expect("a backup through append-only credentials works");
    // A second snapshot, so that retention has one to forget.
    std::fs::write(vol.join("zero"), b"changed").expect("write");
    backup(
        &mut client,
        volume_backup(agents_repo.clone(), "pod-a", "pv-a", "shop", "data"),
    )
    .await
    .result
    .expect("second backup");
    let before = fstree::snapshot(&vol);
    let repo_dir = data.join("shop");
    let snapshots_before = files(&repo_dir, "snapshots");
    let packs_before = files(&repo_dir, "data");
    let keys_before = files(&repo_dir, "keys");
    assert_eq!(snapshots_before.len(), 2);

    // The attacker: plain restic and curl with exactly what the agent holds.
    let r = append_only.repository("shop");
    let env = append_only.env();
    let attempt = |args: &[&str]| restic::run(&r, PW, &env, args);
    for (what, args) in [
        (
            "forget --prune",
            vec!["forget", "--keep-last", "1", "--prune"],
        ),
        ("forget a snapshot", vec!["forget", b.snapshot_id.as_str()]),
        ("prune", vec!["prune"]),
    ] {
        let out = attempt(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() || files(&repo_dir, "snapshots") == snapshots_before,
            "{what}: {stderr}"
        );
        assert_eq!(
            files(&repo_dir, "snapshots"),
            snapshots_before,
            "{what}: {stderr}"
        );
    }
    let snapshot_file = &snapshots_before[0];
    let pack = &packs_before[0];
    let key = &keys_before[0];
    for (what, method, path, body) in [
        (
            "delete the snapshot",
            "DELETE",
            format!("shop/snapshots/{snapshot_file}"),
            None,
        ),
        ("delete a pack", "DELETE", format!("shop/data/{pack}"), None),
        ("delete the key", "DELETE", format!("shop/keys/{key}"), None),
        (
            "delete the config",
            "DELETE",
            "shop/config".to_string(),
            None,
        ),
        (
            "overwrite a pack",
            "POST",
            format!("shop/data/{pack}"),
            Some(&b"garbage"[..]),
        ),
        (
            "overwrite the key",
            "POST",
            format!("shop/keys/{key}"),
            Some(&b"{}"[..]),
        ),
        (
            "overwrite the snapshot",
            "POST",
            format!("shop/snapshots/{snapshot_file}"),
            Some(&b"{}"[..]),
        ),
    ] {
        let code = append_only.request(method, &path, body);
        assert!(
            code == 403 || code == 400,
            "{what}: the append-only server answered {code}"
        );
    }
    assert_eq!(files(&repo_dir, "snapshots"), snapshots_before);
    assert_eq!(files(&repo_dir, "data"), packs_before);
    assert_eq!(files(&repo_dir, "keys"), keys_before);

    // The agent's own Prune with these credentials fails, saying what it needs.
    let err = prune(
        &mut client,
        PruneRequest {
            run_id: "shop/prune".into(),
            repository: Some(agents_repo.clone()),
            retention: Some(RetentionPolicy {
                keep_last: 1,
                ..Default::default()
            }),
            namespace: "shop".into(),
            dry_run: false,
        },
    )
    .await;
    let e = err
        .result
        .expect_err("a prune cannot delete through append-only credentials");
    assert!(
        e.message().contains("append-only") && e.message().contains("maintenance"),
        "{}",
        e.message()
    );

    // Everything is intact: a full Check through maintenance's server, and a restore.
    let check = restic::run(
        &full.repository("shop"),
        PW,
        &full.env(),
        &["check", "--read-data"],
    );
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let target = csi_volume(&s.kubelet(), "pod-b", "pv-b");
    let r = restore(
        &mut client,
        RestoreRequest {
            run_id: "shop/restore".into(),
            repository: Some(agents_repo),
            source: Some(VolumeIdentity {
                namespace: "shop".into(),
                pvc: "data".into(),
                pod_name: String::new(),
            }),
            snapshot: "latest".into(),
            target: Some(VolumeRef {
                pod_uid: "pod-b".into(),
                volume_name: "pv-b".into(),
            }),
            mode: v1::RestoreMode::IntoEmpty.into(),
            ..Default::default()
        },
    )
    .await;
    r.result
        .expect("restore through append-only credentials works");
    fstree::assert_same(&before, &fstree::snapshot(&target));
}

/// Long (~40 s): two backups through append-only credentials and a Prune through the maintenance
/// container, each through the coordinator, a node agent of the test's own and real restic.
///
/// A Schedule whose backend holds append-only credentials for the agents and `maintenance`
/// credentials for Prune: backups go through the node agent, the Prune forgets and prunes through
/// the maintenance container only, and the node agent never saw the maintenance server: its log
/// names every repository it maintained or backed up, and the maintenance server's is not among them.
#[tokio::test]
async fn prunes_run_with_maintenance_credentials_on_the_maintenance_container_only() {
    use stowage_api::{Backup, Prune, Schedule};
    use stowage_tests::coordinator::{Coordinator, PrivateAgents, fired_metadata, secret};
    use stowage_tests::env::TestEnv;
    let env = TestEnv::new("maint").await;
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("rest-data");
    let append_only = RestServer::start(&data, true, "agents", "agents-secret").await;
    let full = RestServer::start(&data, false, "maint", "maint-secret").await;
    secret(
        &env.client,
        &env.ns,
        "rest-agents",
        &[("username", "agents"), ("password", "agents-secret")],
    )
    .await;
    secret(
        &env.client,
        &env.ns,
        "rest-maint",
        &[("username", "maint"), ("password", "maint-secret")],
    )
    .await;
    let vol = env.mounted("data", "node-1", "a.txt").await;
    std::fs::write(vol.join("a.txt"), b"first").expect("write");
    let agents = PrivateAgents::start(
        env.cluster,
        &env.client,
        &env.ns,
        &[("node-1", "127.0.0.11")],
        None,
    )
    .await;
    // The maintenance container, as the chart runs it beside the coordinator.
    // An empty directory as the kubelet directory, as in the chart (no pods/ below it).
    let empty = tmp.path().join("no-volumes");
    std::fs::create_dir_all(&empty).expect("mkdir");
    let mut opts = stowage_tests::agent::AgentOptions::new(&empty);
    opts.node = "maintenance".into();
    opts.ip = "127.0.0.13".into();
    opts.extra_args = vec!["--maintenance-only".into()];
    let maintenance = stowage_tests::agent::Agent::start(opts, &agents.pki).await;
    let mut copts = agents.coordinator_options(&env.ns);
    copts.extra_args = vec!["--maintenance-agent".into(), maintenance.grpc.to_string()];
    let _c = Coordinator::start(env.cluster, copts).await;
    let _: Schedule = env
        .create(
            serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Schedule",
            "metadata": {"name": "nightly"},
            "spec": {
                "backend": {
                    "repoPasswordSecretRef": {"name": "backup-repo", "key": "password"},
                    "rest": {"url": format!("{}shop/", append_only.url),
                             "usernameSecretRef": {"name": "rest-agents", "key": "username"},
                             "passwordSecretRef": {"name": "rest-agents", "key": "password"}},
                    "initialize": true,
                    "maintenance": {"rest": {"url": format!("{}shop/", full.url),
                        "usernameSecretRef": {"name": "rest-maint", "key": "username"},
                        "passwordSecretRef": {"name": "rest-maint", "key": "password"}}}},
                "backup": {"schedule": "@weekly"},
                "prune": {"schedule": "@weekly", "retention": {"keepLast": 1}}}}),
        )
        .await;
    for (name, content) in [("first", "first"), ("second", "second")] {
        std::fs::write(vol.join("a.txt"), content).expect("write");
        let b = env
            .run::<Backup>(
                name,
                serde_json::json!({"scheduleRef": {"name": "nightly"}}),
                std::time::Duration::from_secs(120),
            )
            .await;
        assert_eq!(b["status"]["phase"], "Succeeded", "{b:#}");
    }
    let repo_dir = data.join("shop");
    assert_eq!(files(&repo_dir, "snapshots").len(), 2);

    let metadata = fired_metadata(&env.client, &env.ns, "nightly", "prune", "prune-1").await;
    let _: Prune = env
        .create(
            serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Prune",
            "metadata": metadata, "spec": {"scheduleRef": {"name": "nightly"}}}),
        )
        .await;
    let p = env
        .wait_run::<Prune>("prune-1", std::time::Duration::from_secs(120))
        .await;
    assert_eq!(p["status"]["phase"], "Succeeded", "{p:#}");
    let item = &p["status"]["items"][0];
    assert_eq!(item["removed"], 1, "{p:#}");
    assert_eq!(item["node"], "(maintenance container)", "{p:#}");
    assert_eq!(
        files(&repo_dir, "snapshots").len(),
        1,
        "the Prune forgot one snapshot"
    );

    // Who saw which server: the node agent only the append-only one, the maintenance container
    // only the full one.
    let full_port = full
        .url
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_string();
    let node_log = agents.agents[0].log_text();
    assert!(
        !node_log.contains(&format!("127.0.0.1:{full_port}")),
        "the node agent never received the maintenance server's address"
    );
    let maintenance_log = maintenance.log_text();
    assert!(
        maintenance_log.contains(&format!("rest:http://127.0.0.1:{full_port}/shop/")),
        "the maintenance container pruned through the full-access server: {maintenance_log}"
    );
    assert_eq!(
        agents.agents[0]
            .metric("stowage_agent_maintenance_total{kind=\"prune\",result=\"succeeded\"}")
            .await,
        Some(0.0)
    );
    assert_eq!(
        maintenance
            .metric("stowage_agent_maintenance_total{kind=\"prune\",result=\"succeeded\"}")
            .await,
        Some(1.0)
    );
    // The maintenance container serves no volume.
    let mut client = maintenance.client(&agents.pki).await;
    let refused = client
        .list_volumes(v1::ListVolumesRequest {})
        .await
        .expect_err("no volumes here");
    assert!(
        refused.message().contains("maintains repositories only"),
        "{}",
        refused.message()
    );
}

/// Without a maintenance container, a backend's maintenance credentials are never sent anywhere
/// else: the Schedule is not Ready, naming the field, and a Prune fails saying why.
#[tokio::test]
async fn maintenance_credentials_without_a_maintenance_container_go_nowhere() {
    use stowage_api::{Prune, Schedule};
    use stowage_tests::coordinator::{condition, secret, wait_json};
    use stowage_tests::env::TestEnv;
    let env = TestEnv::new("maint-none").await;
    secret(
        &env.client,
        &env.ns,
        "rest-maint",
        &[("username", "maint"), ("password", "maint-secret")],
    )
    .await;
    let _c = env.coordinator().await;
    let backend = serde_json::json!({
        "repoPasswordSecretRef": {"name": "backup-repo", "key": "password"},
        "rest": {"url": "http://127.0.0.1:9/shop/"},
        "maintenance": {"rest": {"url": "http://127.0.0.1:9/full/shop/",
            "usernameSecretRef": {"name": "rest-maint", "key": "username"},
            "passwordSecretRef": {"name": "rest-maint", "key": "password"}}}});
    let _: Schedule = env
        .create(serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Schedule",
            "metadata": {"name": "nightly"},
            "spec": {"backend": backend, "prune": {"schedule": "@weekly", "retention": {"keepLast": 1}}}}))
        .await;
    let s = wait_json::<Schedule>(
        &env.client,
        &env.ns,
        "nightly",
        std::time::Duration::from_secs(30),
        "Ready=False",
        |s| condition(s, "Ready").is_some_and(|c| c["status"] == "False"),
    )
    .await;
    let m = condition(&s, "Ready").expect("Ready")["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        m.contains("spec.backend.maintenance") && m.contains("no maintenance container"),
        "{m}"
    );
    let p = env
        .run::<Prune>(
            "prune",
            serde_json::json!({"backend": backend, "retention": {"keepLast": 1}}),
            std::time::Duration::from_secs(60),
        )
        .await;
    assert_eq!(p["status"]["phase"], "Failed", "{p:#}");
    let c = condition(&p, "Succeeded").expect("condition");
    assert_eq!(c["reason"], "NoMaintenanceContainer", "{c}");
    assert!(
        c["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("spec.backend.maintenance: ")),
        "{c}"
    );
}
