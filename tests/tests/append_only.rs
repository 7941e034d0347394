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
