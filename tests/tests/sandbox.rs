//! The sandbox around restic, attacked the way a hostile workload would: by swapping directories for
//! symlinks while the agent reads or writes its volume. Real agent, real restic 0.19, real bubblewrap.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use stowage_proto::v1::{self, VolumeIdentity, VolumeRef};
use stowage_tests::agent::{Setup, backup, csi_volume, local_repo, restore, volume_backup};
use stowage_tests::{fstree, restic};

const PW: &str = "sandbox test password";
const CANARY: &str = "CANARY-outside-the-volume";
const FILES: usize = 3000;

/// A directory outside every volume, full of files that must never reach a snapshot. Its names are
/// the volume's own (`f0000` ...), as an attacker who knows a tree's layout would choose.
fn canary_dir(s: &Setup) -> PathBuf {
    let dir = s.path("outside");
    std::fs::create_dir_all(&dir).expect("mkdir");
    for i in 0..FILES {
        std::fs::write(dir.join(format!("f{i:04}")), format!("{CANARY} {i}\n")).expect("w");
    }
    dir
}

/// A thread that runs `step` in a loop until stopped (at most `limit`), counting iterations.
struct Attacker {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Attacker {
    fn start(limit: Duration, mut step: impl FnMut() + Send + 'static) -> Attacker {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let (s, r) = (Arc::clone(&stop), Arc::clone(&rounds));
        let handle = std::thread::spawn(move || {
            let deadline = Instant::now() + limit;
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                step();
                r.fetch_add(1, Ordering::Relaxed);
            }
        });
        Attacker {
            stop,
            rounds,
            handle: Some(handle),
        }
    }
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().expect("attacker");
        }
        self.rounds.load(Ordering::Relaxed)
    }
}

/// The pod's loop from the report (`mv d d.real; ln -s <outside> d; rm d; mv d.real d`), tuned to hit:
/// `d` is the real directory half of the time (when restic lists it) and a symlink to `outside` the
/// other half (when restic opens `d/<name>`, resolving `d` again).
fn swap_loop(vol: &Path, outside: &Path) -> impl FnMut() + Send + 'static {
    let (d, real, link) = (vol.join("d"), vol.join("d.real"), vol.join("d.link"));
    let _ = symlink(outside, &link);
    move || {
        let _ = std::fs::rename(&d, &real);
        let _ = std::fs::rename(&link, &d);
        std::thread::sleep(Duration::from_millis(2));
        let _ = std::fs::rename(&d, &link);
        let _ = std::fs::rename(&real, &d);
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Every file content of every snapshot in `repo`, restored by plain restic, searched for the canary.
fn canaries_in_snapshots(repo: &Path, scratch: &Path) -> usize {
    let repo_s = repo.display().to_string();
    let mut found = 0;
    for (i, snap) in restic::snapshots(&repo_s, PW).iter().enumerate() {
        let id = snap["id"].as_str().expect("id");
        let target = scratch.join(format!("check-{i}"));
        // A snapshot taken mid-race may hold an entry restic cannot recreate (a symlink caught
        // half-swapped); restic restores everything else and reports it. Only other failures count.
        let out = restic::run(
            &repo_s,
            PW,
            &[],
            &["restore", id, "--target", &target.display().to_string()],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        let only_entry_errors = stderr.lines().all(|l| {
            !l.starts_with("Fatal:")
                || (l.starts_with("Fatal: There were ") && l.ends_with(" errors"))
        }) && stderr.contains("ignoring error for");
        assert!(
            out.status.success() || only_entry_errors,
            "restic restore {id}: {stderr}"
        );
        found += count_canaries(&target);
        let _ = std::fs::remove_dir_all(&target);
    }
    found
}

fn count_canaries(dir: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            n += count_canaries(&p);
        } else if meta.is_file()
            && std::fs::read(&p).is_ok_and(|b| String::from_utf8_lossy(&b).contains(CANARY))
        {
            n += 1;
        }
    }
    n
}

/// Long (~40 s): the race must be seen to hit bare restic first, then four backups through the agent are each restored and searched.
#[tokio::test]
async fn a_symlink_race_during_backups_stores_nothing_from_outside_the_volume() {
    let s = Setup::new();
    let outside = canary_dir(&s);
    let vol = csi_volume(&s.path("kubelet"), "uid-race", "pv-race");
    std::fs::create_dir_all(vol.join("d")).expect("mkdir");
    for i in 0..FILES {
        std::fs::write(vol.join(format!("d/f{i:04}")), format!("own data {i}\n")).expect("w");
    }

    // Control: bare restic under the same race does read the outside files (the attack is real).
    let control_repo = s.path("control-repo");
    restic::init(&control_repo, PW);
    let mut leaked_bare = 0;
    let mut tries = 0;
    for _ in 0..8 {
        tries += 1;
        let attack = Attacker::start(Duration::from_secs(60), swap_loop(&vol, &outside));
        let out = std::process::Command::new(restic::binary())
            .args(["-r", &control_repo.display().to_string(), "backup", "."])
            .current_dir(&vol)
            .env("RESTIC_PASSWORD", PW)
            .output()
            .expect("restic");
        attack.finish();
        assert!(
            out.status.code().is_some_and(|c| c == 0 || c == 3),
            "{out:?}"
        );
        leaked_bare = canaries_in_snapshots(&control_repo, &s.path("scratch-control"));
        if leaked_bare > 0 {
            break;
        }
    }
    assert!(
        leaked_bare > 0,
        "the race never made bare restic read outside the volume; the test proves nothing"
    );
    eprintln!(
        "bare restic stored {leaked_bare} files from outside the volume within {tries} backup(s)"
    );

    // Through the agent: restic in the sandbox, same race, several backups.
    let agent = s.agent().await;
    let mut client = agent.client(&s.pki).await;
    let repo = s.path("repo");
    restic::init(&repo, PW);
    let mut rounds = 0;
    for _ in 0..4 {
        let attack = Attacker::start(Duration::from_secs(120), swap_loop(&vol, &outside));
        let out = backup(
            &mut client,
            volume_backup(
                local_repo(&repo, PW, false),
                "uid-race",
                "pv-race",
                "shop",
                "race",
            ),
        )
        .await;
        rounds += attack.finish();
        // A backup that caught `d` mid-swap may be partial; what matters is what it stored.
        if let Err(e) = &out.result {
            assert_ne!(e.code(), tonic::Code::Internal, "{e:?}");
        }
    }
    assert!(rounds > 100, "the attacker swapped only {rounds} times");
    assert!(!restic::snapshots(&repo.display().to_string(), PW).is_empty());
    assert_eq!(
        canaries_in_snapshots(&repo, &s.path("scratch")),
        0,
        "a snapshot holds files from outside the volume (bare restic leaked {leaked_bare})"
    );
}

#[tokio::test]
async fn symlinks_planted_during_a_restore_write_nothing_outside_the_volume() {
    let s = Setup::new();
    let outside = canary_dir(&s);
    let before = fstree::snapshot(&outside);
    let src = csi_volume(&s.path("kubelet"), "uid-src", "pv-src");
    for i in 0..100 {
        std::fs::create_dir_all(src.join(format!("dir{i:03}"))).expect("mkdir");
        for j in 0..5 {
            std::fs::write(
                src.join(format!("dir{i:03}/f{j}")),
                format!("restored {i}/{j}\n"),
            )
            .expect("w");
        }
    }
    let agent = s.agent().await;
    let mut client = agent.client(&s.pki).await;
    let repo = s.path("repo");
    let out = backup(
        &mut client,
        volume_backup(
            local_repo(&repo, PW, true),
            "uid-src",
            "pv-src",
            "shop",
            "data",
        ),
    )
    .await;
    out.result.expect("backup");

    let dst = csi_volume(&s.path("kubelet"), "uid-dst", "pv-dst");
    // The workload plants symlinks to the outside directory in the target and in every staging
    // directory it sees, replacing each directory restic creates there.
    let (dst2, outside2) = (dst.clone(), outside.clone());
    let plant = move || {
        for i in 0..100 {
            let _ = symlink(&outside2, dst2.join(format!("dir{i:03}")));
        }
        for staging in std::fs::read_dir(&dst2).into_iter().flatten().flatten() {
            if !staging
                .file_name()
                .to_string_lossy()
                .starts_with(".stowage-restore-")
            {
                continue;
            }
            for e in std::fs::read_dir(staging.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let p = e.path();
                if p.symlink_metadata().is_ok_and(|m| m.is_dir()) {
                    let moved = p.with_extension("moved");
                    if std::fs::rename(&p, &moved).is_ok() {
                        let _ = symlink(&outside2, &p);
                    }
                }
            }
        }
    };
    for _ in 0..3 {
        let attack = Attacker::start(Duration::from_secs(120), plant.clone());
        let r = restore(
            &mut client,
            v1::RestoreRequest {
                run_id: "test/race".into(),
                repository: Some(local_repo(&repo, PW, false)),
                source: Some(VolumeIdentity {
                    namespace: "shop".into(),
                    pvc: "data".into(),
                    pod_name: String::new(),
                }),
                snapshot: "latest".into(),
                target: Some(VolumeRef {
                    pod_uid: "uid-dst".into(),
                    volume_name: "pv-dst".into(),
                }),
                ..Default::default()
            },
        )
        .await;
        let rounds = attack.finish();
        assert!(rounds > 10, "the attacker ran only {rounds} rounds");
        // Success or failure: either way nothing outside changed.
        let _ = r.result;
        fstree::assert_same(&before, &fstree::snapshot(&outside));
    }
    // Nothing was written through the symlinks the workload left in the target either.
    assert_eq!(std::fs::read_dir(&outside).expect("ls").count(), FILES);
}

/// A bubblewrap wrapper that, for a backup, first runs the very sandbox the agent asked for with
/// `probes` added to restic's paths (recording restic's exit code and stderr), then the backup.
fn probing_bwrap(dir: &Path, probes: &[PathBuf]) -> PathBuf {
    let wrapper = dir.join("bwrap-probe");
    let quoted: Vec<String> = probes
        .iter()
        .map(|p| format!("'{}'", p.display()))
        .collect();
    let out = dir.join("probe");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/bash\nif printf '%s\\n' \"$@\" | grep -qx backup; then\n  args=(\"$@\"); unset 'args[${{#args[@]}}-1]'\n  bwrap \"${{args[@]}}\" {} . > {o}.out 2> {o}.err; echo $? > {o}.rc\nfi\nexec bwrap \"$@\"\n",
            quoted.join(" "),
            o = out.display()
        ),
    )
    .expect("wrapper");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    wrapper
}

#[tokio::test]
async fn inside_the_backup_sandbox_nothing_but_the_volume_exists() {
    let s = Setup::new();
    let vol = csi_volume(&s.path("kubelet"), "uid-probe", "pv-probe");
    std::fs::write(vol.join("mine"), b"the volume's own file").expect("w");
    let other = csi_volume(&s.path("kubelet"), "uid-other", "pv-other");
    std::fs::write(other.join("theirs"), b"another tenant").expect("w");
    // What a hostile volume would point restic at: the kubelet directory, another pod's volume,
    // the agent's TLS key and certificates.
    let probes = [
        s.path("kubelet"),
        other.clone(),
        s.pki.dir.join("server-key.pem"),
        s.pki.dir.join("ca.pem"),
    ];
    let wrapper = probing_bwrap(s.tmp.path(), &probes);
    let agent = s.agent_with(|o| o.bwrap = Some(wrapper)).await;
    let mut client = agent.client(&s.pki).await;
    let repo = s.path("repo");
    let out = backup(
        &mut client,
        volume_backup(
            local_repo(&repo, PW, true),
            "uid-probe",
            "pv-probe",
            "shop",
            "probe",
        ),
    )
    .await;
    out.result.expect("backup");

    let rc = std::fs::read_to_string(s.path("probe.rc")).expect("the probe ran");
    let stderr = std::fs::read_to_string(s.path("probe.err")).expect("probe stderr");
    // restic read "." and nothing else (exit 3: some paths could not be read).
    assert_eq!(rc.trim(), "3", "{stderr}");
    for p in &probes {
        assert!(
            stderr.contains(&format!("{} does not exist", p.display())),
            "{} is visible in the sandbox: {stderr}",
            p.display()
        );
    }
    let repo_s = repo.display().to_string();
    let snaps = restic::snapshots(&repo_s, PW);
    assert_eq!(snaps.len(), 2, "the probe's snapshot and the backup's");
    for snap in snaps {
        let listing = restic::ok(&repo_s, PW, &["ls", snap["id"].as_str().expect("id")]);
        assert!(listing.contains("mine"), "{listing}");
        assert!(
            !listing.contains("theirs") && !listing.contains(".pem"),
            "{listing}"
        );
    }
}
