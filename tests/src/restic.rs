//! Running the real restic directly, to set up and check what the agent did.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Damages the largest pack file of local repository `repo` as a failing disk would (64 bytes in its
/// middle flipped); returns the pack and its original bytes, to repair it afterwards.
pub fn damage_largest_pack(repo: &Path) -> (PathBuf, Vec<u8>) {
    let mut packs: Vec<(u64, PathBuf)> = std::fs::read_dir(repo.join("data"))
        .expect("data dir")
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .map(|f| (f.metadata().map(|m| m.len()).unwrap_or(0), f.path()))
        .collect();
    packs.sort();
    let pack = packs.pop().expect("a pack").1;
    let original = std::fs::read(&pack).expect("read pack");
    let mut damaged = original.clone();
    let mid = damaged.len() / 2;
    for b in &mut damaged[mid..mid + 64] {
        *b ^= 0xff;
    }
    std::fs::write(&pack, &damaged).expect("damage pack");
    (pack, original)
}

pub fn binary() -> PathBuf {
    std::env::var_os("STOWAGE_TEST_RESTIC").map_or_else(|| PathBuf::from("restic"), PathBuf::from)
}

/// `restic -r <repo> <args>` with the password (and extra env) in the environment.
pub fn run(repo: &str, password: &str, env: &[(&str, &str)], args: &[&str]) -> Output {
    Command::new(binary())
        .arg("-r")
        .arg(repo)
        .args(args)
        .env("RESTIC_PASSWORD", password)
        .envs(env.iter().copied())
        .output()
        .expect("run restic")
}

pub fn ok(repo: &str, password: &str, args: &[&str]) -> String {
    let out = run(repo, password, &[], args);
    assert!(
        out.status.success(),
        "restic {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `restic key add`: a key for `new_password`, opened with `password`.
pub fn key_add(repo: &str, password: &str, new_password: &str) {
    let file = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(file.path(), new_password).expect("write");
    let path = file.path().display().to_string();
    ok(
        repo,
        password,
        &["key", "add", "--new-password-file", &path],
    );
}

pub fn init(repo: &Path, password: &str) {
    ok(&repo.display().to_string(), password, &["init"]);
}

/// Snapshots as JSON values.
pub fn snapshots(repo: &str, password: &str) -> Vec<serde_json::Value> {
    serde_json::from_str(&ok(repo, password, &["snapshots", "--json"])).expect("snapshots json")
}

/// Lock files in a local repository.
pub fn lock_files(repo: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(repo.join("locks"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Writes a lock into local repository `repo` as a process `pid` on `host` would have, `age`
/// old (restic cannot backdate its own locks; `tests/tools/restic_lock.py` writes one in restic's
/// format). Returns the lock's id.
pub fn forge_lock(
    repo: &Path,
    password: &str,
    host: &str,
    pid: u32,
    age: std::time::Duration,
    exclusive: bool,
) -> String {
    let mut cmd = Command::new(crate::workspace_root().join("tests/tools/restic_lock.py"));
    cmd.arg(repo)
        .args(["--host", host, "--pid", &pid.to_string()])
        .args(["--age-minutes", &format!("{}", age.as_secs_f64() / 60.0)])
        .env("RESTIC_PASSWORD", password);
    if exclusive {
        cmd.arg("--exclusive");
    }
    let out = cmd.output().expect("run restic_lock.py");
    assert!(
        out.status.success(),
        "restic_lock.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A copy of snapshot `of` (same tags and host), dated `ahead` after now, without the file
/// `exclude` at the root of its one path, and tagged `stowage.dev/partial=true` when `partial`:
/// what a later backup that lost the file leaves, or one whose restic could not read it (exit 3).
/// Returns the new snapshot's full id.
pub fn later_snapshot(
    repo: &Path,
    password: &str,
    of: &str,
    exclude: &str,
    ahead: std::time::Duration,
    partial: bool,
) -> String {
    let repo = repo.display().to_string();
    let ids = |snaps: &[serde_json::Value]| -> std::collections::BTreeSet<String> {
        snaps
            .iter()
            .filter_map(|s| s["id"].as_str().map(String::from))
            .collect()
    };
    let before = snapshots(&repo, password);
    let original = before
        .iter()
        .find(|s| s["id"].as_str().is_some_and(|id| id.starts_with(of)))
        .expect("the snapshot to copy");
    let root = original["paths"][0].as_str().expect("a path");
    // restic reads --new-time in the machine's time zone; the harness runs in UTC.
    let time = (chrono::Local::now() + ahead)
        .format("%Y-%m-%d %H:%M:%S")
        .to_string();
    ok(
        &repo,
        password,
        &[
            "rewrite",
            "--exclude",
            &format!("{}/{exclude}", root.trim_end_matches('/')),
            "--new-time",
            &time,
            of,
        ],
    );
    let mut fresh: Vec<String> = ids(&snapshots(&repo, password))
        .difference(&ids(&before))
        .cloned()
        .collect();
    assert_eq!(fresh.len(), 1, "restic rewrite made one snapshot");
    let mut id = fresh.remove(0);
    if partial {
        let known = ids(&snapshots(&repo, password));
        ok(
            &repo,
            password,
            &["tag", "--add", "stowage.dev/partial=true", &id],
        );
        let mut tagged: Vec<String> = ids(&snapshots(&repo, password))
            .difference(&known)
            .cloned()
            .collect();
        assert_eq!(tagged.len(), 1, "restic tag rewrote the snapshot");
        id = tagged.remove(0);
    }
    id
}
