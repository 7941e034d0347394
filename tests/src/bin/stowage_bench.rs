//! `stowage-bench`: the node agent's performance figures, printed as a table (run by scripts/bench,
//! release build). Each figure is measured here, against the real restic and a real agent process.
//!
//! 1. Backup overhead: wall time of a backup through the agent's gRPC ÷ the same restic backup run
//!    directly, for one 1 GiB incompressible file and for 50,000 files of 4 KiB. Two rows each:
//!    steady state (the agent knows the parent, as for every backup after its first of a volume; all
//!    data rewritten between runs so each run reads and stores everything again) and cold (a fresh
//!    repository: the agent first looks the parent up, one more restic run).
//! 2. Idle RSS of an agent with 200 volumes discovered.
//! 3. Latency from the gRPC call to the sandbox around restic being spawned, over 50 calls.
//! 5. Restore throughput: a restore through the agent (gRPC call to result: snapshot resolution,
//!    sandboxed `restic restore` into staging inside the target volume, the move into place) against
//!    plain `restic restore` of the same snapshot to the same disk, for both datasets of 1.
//! 4. The sandbox's start-up cost: `restic version` in a sandbox built like a backup's, against the
//!    same command run bare, p50 over 30 runs each.
//! 6. With `STOWAGE_BENCH_ONLY=preview` (alone): a restore's dry run over a million files, the
//!    agent's and restic's peak memory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use stowage_tests::bench::{Row, percentile, print_table};

use stowage_tests::agent::{
    Agent, AgentOptions, backup, csi_volume, local_repo, restore, volume_backup,
};
use stowage_tests::fstree::write_random;
use stowage_tests::tls::Pki;

const PW: &str = "bench-password";
const GIB: usize = 1 << 30;

fn restic_direct(repo: &Path, cache: &Path, dir: &Path) -> Duration {
    let started = Instant::now();
    let out = Command::new("restic")
        .args(["-r"])
        .arg(repo)
        .arg("--cache-dir")
        .arg(cache)
        .args([
            "backup",
            "--json",
            "--host",
            "bench/direct",
            "--tag",
            "stowage.dev/namespace=bench,stowage.dev/pvc=direct",
            "--",
            ".",
        ])
        .current_dir(dir)
        .env("RESTIC_PASSWORD", PW)
        .output()
        .expect("restic backup");
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

/// `name` on PATH, absolute.
fn which(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not on PATH"))
}

fn init(repo: &Path) {
    let out = Command::new("restic")
        .arg("-r")
        .arg(repo)
        .arg("init")
        .env("RESTIC_PASSWORD", PW)
        .output()
        .expect("init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn fill_small_files(dir: &Path, seed: u64) {
    let _ = std::fs::remove_dir_all(dir.join("many"));
    for d in 0..100 {
        let sub = dir.join("many").join(format!("d{d:03}"));
        std::fs::create_dir_all(&sub).expect("mkdir");
        for f in 0..500 {
            write_random(
                &sub.join(format!("f{f:03}")),
                4096,
                seed ^ ((d * 1000 + f) as u64 + 1),
            );
        }
    }
}

/// Restore of the identity's newest snapshot through the agent (into an empty subdirectory of a
/// volume, IntoEmpty) against plain `restic restore` of the same snapshot into a directory on the
/// same disk; the value is restic's time ÷ the agent's (the agent's share of restic's throughput).
#[allow(clippy::too_many_arguments)]
async fn restore_throughput(
    client: &mut stowage_proto::v1::agent_client::AgentClient<tonic::transport::Channel>,
    tmp: &Path,
    kubelet: &Path,
    repo: &Path,
    cache: &Path,
    i: usize,
    name: &str,
    rounds: usize,
) -> Row {
    use stowage_proto::v1::{RestoreMode, RestoreRequest, VolumeIdentity, VolumeRef};
    let target = csi_volume(kubelet, &format!("restore-{i}"), "pv");
    // The agent discovers the new volume through its kubelet-directory watch.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Chosen as the coordinator chooses for a Restore: the identity's newest snapshot, from a
    // listing through the agent (untimed, as finding the id for plain restic is).
    let source = VolumeIdentity {
        namespace: "bench".into(),
        pvc: format!("vol{i}"),
        pod_name: String::new(),
    };
    let snapshot = newest_snapshot(client, repo, &source).await;
    let (mut via_agent, mut direct) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let req = RestoreRequest {
            run_id: format!("bench/restore-{r}"),
            repository: Some(local_repo(repo, PW, false)),
            source: Some(source.clone()),
            snapshot: snapshot.clone(),
            include: Vec::new(),
            target: Some(VolumeRef {
                pod_uid: format!("restore-{i}"),
                volume_name: "pv".into(),
            }),
            target_path: format!("round-{r}"),
            mode: RestoreMode::IntoEmpty.into(),
            ..Default::default()
        };
        // Each timed restore starts with no dirty pages of the previous one left to write back.
        let _ = Command::new("sync").status();
        let started = Instant::now();
        restore(client, req).await.result.expect("agent restore");
        via_agent.push(started.elapsed().as_secs_f64());
        let _ = std::fs::remove_dir_all(target.join(format!("round-{r}")));

        let out_dir = tmp.join(format!("direct-restore-{i}-{r}"));
        let _ = Command::new("sync").status();
        let started = Instant::now();
        let out = Command::new("restic")
            .arg("-r")
            .arg(repo)
            .arg("--cache-dir")
            .arg(cache)
            .args(["restore", &snapshot, "--target"])
            .arg(&out_dir)
            .env("RESTIC_PASSWORD", PW)
            .output()
            .expect("restic restore");
        direct.push(started.elapsed().as_secs_f64());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = std::fs::remove_dir_all(&out_dir);
    }
    let _ = std::fs::remove_dir_all(&target);
    let (a, d) = (median(via_agent), median(direct));
    Row {
        what: format!(
            "restore throughput vs plain restic, {name} (agent {a:.2}s / restic {d:.2}s)"
        ),
        value: format!("{:.3}", d / a),
        target: ">= 0.95".into(),
        ok: d / a >= 0.95,
    }
}

/// Figure 6: a restore's dry run (Replace) over `STOWAGE_BENCH_PREVIEW_FILES` files (default one
/// million, in directories of 1,000), with ten added, ten changed and ten deleted since the backup:
/// the agent's peak RSS (it keeps counts and the first paths, whatever the volume holds), restic's
/// peak RSS against the agent's memory estimate for a restore of that repository, and the time.
async fn preview_memory(
    client: &mut stowage_proto::v1::agent_client::AgentClient<tonic::transport::Channel>,
    agent_pid: u32,
    tmp: &Path,
    kubelet: &Path,
) -> Vec<Row> {
    use stowage_proto::v1::{RestoreMode, RestoreRequest, VolumeIdentity, VolumeRef};
    let files: usize = std::env::var("STOWAGE_BENCH_PREVIEW_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let vol = csi_volume(kubelet, "preview", "pv");
    let started = Instant::now();
    for d in 0..files.div_ceil(1000) {
        let dir = vol.join(format!("d{d:04}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        for f in 0..1000.min(files - d * 1000) {
            std::fs::write(dir.join(format!("f{f:04}")), [b'a' + (f % 26) as u8]).expect("write");
        }
    }
    eprintln!("[bench] {files} files written in {:.0?}", started.elapsed());
    let repo = tmp.join("repo-preview");
    init(&repo);
    let started = Instant::now();
    backup(
        client,
        volume_backup(
            local_repo(&repo, PW, false),
            "preview",
            "pv",
            "bench",
            "preview",
        ),
    )
    .await
    .result
    .expect("backup of the files");
    eprintln!("[bench] backed up in {:.0?}", started.elapsed());
    for f in 0..10 {
        std::fs::remove_file(vol.join(format!("d0000/f{f:04}"))).expect("rm");
        std::fs::write(vol.join(format!("d0001/f{f:04}")), b"changed").expect("write");
        std::fs::write(vol.join(format!("new-{f}")), b"new").expect("write");
    }
    let index_bytes: u64 = std::fs::read_dir(repo.join("index"))
        .expect("index")
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    // The agent's estimate, as it makes it: the index, plus the snapshot's tree (its entries, from
    // the snapshot's summary).
    let snaps: Vec<restic_wrap::json::Snapshot> = serde_json::from_slice(
        &Command::new("restic")
            .arg("-r")
            .arg(&repo)
            .args(["snapshots", "--json"])
            .env("RESTIC_PASSWORD", PW)
            .output()
            .expect("restic snapshots")
            .stdout,
    )
    .expect("snapshots json");
    let entries = snaps
        .iter()
        .filter_map(|s| s.summary.as_ref())
        .map(|s| s.entries())
        .max()
        .unwrap_or(0);
    let estimate =
        stowage_agent::memory::estimate_mib(stowage_agent::memory::Operation::Restore, index_bytes)
            + stowage_agent::memory::restore_tree_mib(entries, true);
    // restic's resident peak, sampled from every restic process while the dry run lasts.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak_kib = 0u64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                    let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
                    if comm.trim() == "restic" {
                        peak_kib = peak_kib.max(status_kib(&p.path().join("status"), "VmHWM:"));
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            peak_kib
        })
    };
    // As the coordinator does: the snapshot chosen from a listing through this agent, then named
    // by its full id (so the agent knows its summary when it reserves memory).
    let source = VolumeIdentity {
        namespace: "bench".into(),
        pvc: "preview".into(),
        pod_name: String::new(),
    };
    let snapshot = newest_snapshot(client, &repo, &source).await;
    let started = Instant::now();
    let out = restore(
        client,
        RestoreRequest {
            run_id: "bench/preview".into(),
            repository: Some(local_repo(&repo, PW, false)),
            source: Some(source),
            snapshot,
            target: Some(VolumeRef {
                pod_uid: "preview".into(),
                volume_name: "pv".into(),
            }),
            mode: RestoreMode::Replace.into(),
            dry_run: true,
            ..Default::default()
        },
    )
    .await;
    let took = started.elapsed();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let restic_peak_mib = sampler.join().expect("sampler") / 1024;
    let preview = out.result.expect("the dry run").preview.expect("a preview");
    let count = |s: &Option<stowage_proto::v1::PreviewSet>| s.as_ref().map_or(0, |s| s.entries);
    assert_eq!(
        (
            count(&preview.added),
            count(&preview.changed),
            count(&preview.deleted)
        ),
        (10, 10, 10),
        "{preview:?}"
    );
    let agent_peak_mib =
        status_kib(Path::new(&format!("/proc/{agent_pid}/status")), "VmHWM:") / 1024;
    vec![
        Row {
            what: format!(
                "dry run of a Replace over {files} files: the agent's peak RSS, MiB ({took:.0?}, {} unchanged)",
                preview.unchanged
            ),
            value: agent_peak_mib.to_string(),
            target: "<= 64".into(),
            ok: agent_peak_mib <= 64,
        },
        Row {
            what: format!(
                "  restic's peak RSS in it, MiB, against the agent's estimate for a restore ({estimate} MiB: index {} KiB, {entries} entries)",
                index_bytes / 1024
            ),
            value: restic_peak_mib.to_string(),
            target: format!("<= {estimate}"),
            ok: restic_peak_mib <= estimate,
        },
    ]
}

/// A `kB` line of a `/proc/<pid>/status` file (0 when absent).
fn status_kib(path: &Path, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The newest snapshot of `source`, as the coordinator chooses a restore's: from a listing through
/// the agent (which then knows its summary), by full id.
async fn newest_snapshot(
    client: &mut stowage_proto::v1::agent_client::AgentClient<tonic::transport::Channel>,
    repo: &Path,
    source: &stowage_proto::v1::VolumeIdentity,
) -> String {
    client
        .snapshots(stowage_proto::v1::SnapshotsRequest {
            repository: Some(local_repo(repo, PW, false)),
            identity: Some(source.clone()),
            ..Default::default()
        })
        .await
        .expect("snapshots through the agent")
        .into_inner()
        .snapshots
        .into_iter()
        .max_by(|a, b| a.time.cmp(&b.time))
        .expect("the agent's snapshot")
        .id
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let rounds: usize = std::env::var("STOWAGE_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let base = std::env::var_os("STOWAGE_BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    let tmp = tempfile::tempdir_in(base).expect("tmp");
    let pki = Pki::create(&tmp.path().join("pki"));
    let kubelet = tmp.path().join("kubelet");
    let mut rows = Vec::new();
    // `STOWAGE_BENCH_ONLY=restore`: one priming backup per dataset, then the restore rows only.
    let only_restore = std::env::var("STOWAGE_BENCH_ONLY").is_ok_and(|v| v == "restore");

    let agent = Agent::start(AgentOptions::new(&kubelet), &pki).await;
    let mut client = agent.client(&pki).await;

    // `STOWAGE_BENCH_ONLY=preview`: the memory of a restore's dry run over a million files.
    if std::env::var("STOWAGE_BENCH_ONLY").is_ok_and(|v| v == "preview") {
        let rows = preview_memory(&mut client, agent.pid(), tmp.path(), &kubelet).await;
        drop(client);
        drop(agent);
        stowage_tests::unmount_below(tmp.path());
        print_table(&rows);
        return;
    }

    // 1. Overhead. The dataset is rewritten before every run, so each run does the same work.
    type Fill = fn(&Path, u64);
    let datasets: [(&str, Fill); 2] = [
        ("1 GiB incompressible file", |d, seed| {
            write_random(&d.join("big.bin"), GIB, seed)
        }),
        ("50,000 files of 4 KiB", fill_small_files),
    ];
    for (i, (name, fill)) in datasets.iter().enumerate() {
        let vol = csi_volume(&kubelet, &format!("bench-{i}"), "pv");
        let direct_cache = tmp.path().join(format!("direct-cache-{i}"));
        // Steady state: one repository; the agent's first backup there primes its parent.
        let repo = tmp.path().join(format!("repo-steady-{i}"));
        init(&repo);
        fill(&vol, 1);
        let req = volume_backup(
            local_repo(&repo, PW, false),
            &format!("bench-{i}"),
            "pv",
            "bench",
            &format!("vol{i}"),
        );
        backup(&mut client, req.clone())
            .await
            .result
            .expect("priming backup");
        restic_direct(&repo, &direct_cache, &vol);
        let (mut via_agent, mut direct) = (Vec::new(), Vec::new());
        for r in 0..if only_restore { 0 } else { rounds } {
            fill(&vol, 100 + r as u64 * 2);
            let started = Instant::now();
            backup(&mut client, req.clone())
                .await
                .result
                .expect("agent backup");
            via_agent.push(started.elapsed().as_secs_f64());
            fill(&vol, 101 + r as u64 * 2);
            direct.push(restic_direct(&repo, &direct_cache, &vol).as_secs_f64());
        }
        if !only_restore {
            let (a, d) = (median(via_agent), median(direct));
            rows.push(Row {
                what: format!(
                    "backup overhead, {name}, steady state (agent {a:.2}s / restic {d:.2}s)"
                ),
                value: format!("{:.3}", a / d),
                target: "<= 1.05".into(),
                ok: a / d <= 1.05,
            });
        }
        rows.push(
            restore_throughput(
                &mut client,
                tmp.path(),
                &kubelet,
                &repo,
                &direct_cache,
                i,
                name,
                rounds,
            )
            .await,
        );
        // Cold: a fresh repository per run; the agent must look the parent up first.
        let (mut via_agent, mut direct) = (Vec::new(), Vec::new());
        for r in 0..if only_restore { 0 } else { rounds.min(2) } {
            let ra = tmp.path().join(format!("repo-cold-a-{i}-{r}"));
            let rd = tmp.path().join(format!("repo-cold-d-{i}-{r}"));
            init(&ra);
            init(&rd);
            let req = volume_backup(
                local_repo(&ra, PW, false),
                &format!("bench-{i}"),
                "pv",
                "bench",
                &format!("vol{i}"),
            );
            let started = Instant::now();
            backup(&mut client, req).await.result.expect("agent backup");
            via_agent.push(started.elapsed().as_secs_f64());
            direct.push(
                restic_direct(&rd, &tmp.path().join(format!("cold-cache-{i}-{r}")), &vol)
                    .as_secs_f64(),
            );
            let _ = std::fs::remove_dir_all(&ra);
            let _ = std::fs::remove_dir_all(&rd);
        }
        if !only_restore {
            let (a, d) = (median(via_agent), median(direct));
            rows.push(Row {
                what: format!("backup overhead, {name}, cold: first backup in a repository (agent {a:.2}s / restic {d:.2}s)"),
                value: format!("{:.3}", a / d),
                target: "(reported)".into(),
                ok: true,
            });
        }
        let _ = std::fs::remove_dir_all(&vol);
        let _ = std::fs::remove_dir_all(&repo);
    }
    if let Some(keep) = std::env::var_os("STOWAGE_BENCH_AGENT_LOG") {
        // For reading where an agent's time went (its log has restic's spawn and end times).
        let _ = std::fs::copy(&agent.log, keep);
    }
    if only_restore {
        stowage_tests::unmount_below(tmp.path());
        print_table(&rows);
        return;
    }
    drop(client);
    drop(agent);

    // 3. Request -> restic spawned. A wrapper records when it starts, then execs the real restic.
    let stamps = tmp.path().join("spawn-stamps");
    let wrapper = tmp.path().join("restic-stamp");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ndate +%s%N >> {}\nexec bwrap \"$@\"\n",
            stamps.display()
        ),
    )
    .expect("wrapper");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let vol = csi_volume(&kubelet, "latency", "pv");
    std::fs::write(vol.join("small"), b"x").expect("write");
    let agent = Agent::start(
        AgentOptions {
            bwrap: Some(wrapper),
            ..AgentOptions::new(&kubelet)
        },
        &pki,
    )
    .await;
    let mut client = agent.client(&pki).await;
    let repo = tmp.path().join("repo-latency");
    init(&repo);
    let req = volume_backup(
        local_repo(&repo, PW, false),
        "latency",
        "pv",
        "bench",
        "latency",
    );
    backup(&mut client, req.clone())
        .await
        .result
        .expect("warm-up");
    let mut lat = Vec::new();
    for _ in 0..50 {
        let _ = std::fs::remove_file(&stamps);
        let sent = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("now")
            .as_nanos();
        backup(&mut client, req.clone())
            .await
            .result
            .expect("backup");
        let first: u128 = std::fs::read_to_string(&stamps)
            .expect("stamp")
            .lines()
            .next()
            .expect("line")
            .trim()
            .parse()
            .expect("ns");
        lat.push((first.saturating_sub(sent)) as f64 / 1e6);
    }
    let (p50, p99) = (percentile(lat.clone(), 0.5), percentile(lat, 0.99));
    rows.push(Row {
        what: "gRPC call -> sandboxed restic spawned, p50 over 50 calls (ms)".into(),
        value: format!("{p50:.1}"),
        target: "<= 20".into(),
        ok: p50 <= 20.0,
    });
    rows.push(Row {
        what: "gRPC call -> sandboxed restic spawned, p99 (ms)".into(),
        value: format!("{p99:.1}"),
        target: "(reported)".into(),
        ok: true,
    });
    drop(client);
    drop(agent);

    // 4. Sandbox start-up: the same command with and without bubblewrap around it.
    let restic_bin = which("restic");
    let vol = csi_volume(&kubelet, "sandbox", "pv");
    let cache = tmp.path().join("sandbox-cache");
    std::fs::create_dir_all(&cache).expect("cache");
    let spec = restic_wrap::command::CommandSpec {
        program: restic_bin.clone(),
        args: vec!["version".into()],
        env: Vec::new(),
        cwd: None,
        subcommand: "version".into(),
    };
    let sandboxed = restic_wrap::Sandbox::new(which("bwrap"), "bench.sbx")
        .read_only(&vol, "/data")
        .read_write(&cache, &cache)
        .capabilities(&["CAP_DAC_READ_SEARCH"])
        .chdir("/data")
        .tmp(&cache)
        .wrap(&spec);
    let time = |program: &Path, args: &[std::ffi::OsString]| {
        let started = Instant::now();
        let out = Command::new(program).args(args).output().expect("run");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        started.elapsed().as_secs_f64() * 1000.0
    };
    let (mut bare, mut boxed) = (Vec::new(), Vec::new());
    for _ in 0..30 {
        bare.push(time(&spec.program, &spec.args));
        boxed.push(time(&sandboxed.program, &sandboxed.args));
    }
    let (b, s) = (percentile(bare, 0.5), percentile(boxed, 0.5));
    rows.push(Row {
        what: format!(
            "sandbox start-up, p50 over 30 (restic version: bare {b:.1} ms, sandboxed {s:.1} ms)"
        ),
        value: format!("{:.1}", s - b),
        target: "(reported)".into(),
        ok: true,
    });

    // 2. Idle RSS with 200 volumes.
    let many = tmp.path().join("kubelet-200");
    for i in 0..200 {
        let v = csi_volume(&many, &format!("pod-{i:03}"), &format!("pv-{i:03}"));
        std::fs::write(v.join("data"), b"x").expect("write");
    }
    let agent = Agent::start(AgentOptions::new(&many), &pki).await;
    assert_eq!(agent.metric("stowage_agent_volumes").await, Some(200.0));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).expect("status");
    let rss_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS");
    rows.push(Row {
        what: "idle agent RSS with 200 volumes discovered (MiB)".into(),
        value: format!("{:.1}", rss_kib / 1024.0),
        target: "<= 20".into(),
        ok: rss_kib / 1024.0 <= 20.0,
    });
    drop(agent);
    stowage_tests::unmount_below(tmp.path());

    print_table(&rows);
}
