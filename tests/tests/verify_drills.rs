//! Verification drills at the agent (gRPC with mTLS, real restic, kubelet-style volumes): a whole
//! snapshot restored with `--verify` into scratch space that is gone afterwards, rotating samples
//! bounded in bytes, a damaged pack named by its snapshot, and a backup that arrives during a drill
//! taking its slot.
//!
//! Length: one suite, one file; each test drives a real agent process and restic.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use stowage_proto::v1::{self, Phase, VerifyRequest, VolumeIdentity, verify_request};
use stowage_tests::agent::{Setup, backup, csi_volume, local_repo, verify, volume_backup};
use stowage_tests::{fstree, restic};

const PW: &str = "correct horse battery staple";
const MB: usize = 1024 * 1024;

fn drill(repo: v1::Repository, pvc: &str, sample_bytes: u64, after: &str) -> VerifyRequest {
    VerifyRequest {
        run_id: "shop/verify".into(),
        repository: Some(repo),
        source: Some(verify_request::Source::Volume(VolumeIdentity {
            namespace: "shop".into(),
            pvc: pvc.into(),
            pod_name: String::new(),
        })),
        sample_bytes,
        sample_after: after.into(),
        namespace: "shop".into(),
    }
}

/// The paths of the regular files below `dir`, relative to it, with a leading `/`.
fn files_below(dir: &Path) -> BTreeSet<String> {
    fstree::snapshot(dir)
        .into_iter()
        .filter(|(_, e)| e.kind == "file")
        .map(|(p, _)| format!("/{}", p.display()))
        .collect()
}

#[tokio::test]
async fn a_drill_restores_the_newest_snapshot_with_verify_and_leaves_no_scratch() {
    let s = Setup::new();
    let agent = s.agent().await;
    let vol = csi_volume(&s.kubelet(), "pod-a", "pv-a");
    fstree::populate(&vol, 8 * MB);
    let repo = local_repo(&s.repo(), PW, true);
    let mut client = agent.client(&s.pki).await;
    let b = backup(
        &mut client,
        volume_backup(repo.clone(), "pod-a", "pv-a", "shop", "data"),
    )
    .await
    .result
    .expect("backup");

    let out = verify(&mut client, drill(repo.clone(), "data", 0, "")).await;
    let r = out.result.expect("the drill succeeds");
    assert!(r.snapshot_id.starts_with(&b.snapshot_id), "{r:?}");
    let expected = fstree::snapshot(&vol);
    let files = expected.values().filter(|e| e.kind != "dir").count() as u64;
    let bytes: u64 = expected
        .values()
        .filter(|e| e.kind == "file")
        .map(|e| e.size)
        .sum();
    assert_eq!(r.files, files, "every file and link came back: {r:?}");
    assert_eq!(r.bytes, bytes, "{r:?}");
    let sample = r.sample.clone().expect("sample");
    assert!(sample.complete, "{r:?}");
    assert!(
        !r.scratch_dir.is_empty() && !Path::new(&r.scratch_dir).exists(),
        "the scratch directory {} is removed before the answer",
        r.scratch_dir
    );
    assert!(
        out.progress.iter().any(|p| p.message.contains("--verify")),
        "the drill says what it does: {:?}",
        out.progress
    );
    assert_eq!(
        agent
            .metric("stowage_agent_verifies_total{result=\"succeeded\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(
        agent.metric("stowage_agent_verify_bytes_total").await,
        Some(bytes as f64)
    );
    // Another namespace's identity has no snapshot here: nothing is read across tenants.
    let mut other = drill(repo, "data", 0, "");
    if let Some(verify_request::Source::Volume(v)) = other.source.as_mut() {
        v.namespace = "web".into();
    }
    other.namespace = "web".into();
    let err = verify(&mut client, other)
        .await
        .result
        .expect_err("no snapshot of web/data");
    assert!(err.message().contains("web/data"), "{}", err.message());
}

#[tokio::test]
async fn a_sampled_drill_reads_at_most_its_bound_and_the_next_one_reads_other_files() {
    let s = Setup::new();
    let agent = s.agent().await;
    let vol = csi_volume(&s.kubelet(), "pod-s", "pv-s");
    // 40 files of 256 KiB (10 MiB) in four directories.
    for d in 0..4 {
        std::fs::create_dir_all(vol.join(format!("d{d}"))).expect("mkdir");
        for f in 0..10 {
            fstree::write_random(
                &vol.join(format!("d{d}/f{f:02}")),
                256 * 1024,
                (d * 10 + f) as u64,
            );
        }
    }
    let all = files_below(&vol);
    let repo = local_repo(&s.repo(), PW, true);
    let mut client = agent.client(&s.pki).await;
    backup(
        &mut client,
        volume_backup(repo.clone(), "pod-s", "pv-s", "shop", "sampled"),
    )
    .await
    .result
    .expect("backup");

    let bound = 3 * MB as u64;
    let mut covered: Vec<BTreeSet<String>> = Vec::new();
    let mut after = String::new();
    for round in 0..4 {
        let r = verify(&mut client, drill(repo.clone(), "sampled", bound, &after))
            .await
            .result
            .expect("the drill succeeds");
        let sample = r.sample.clone().expect("sample");
        assert!(r.bytes <= bound, "round {round} read {} > {bound}", r.bytes);
        assert_eq!(r.files, 12, "12 files of 256 KiB fit in 3 MiB: {r:?}");
        assert!(!sample.complete);
        assert_eq!(sample.snapshot_files, 40);
        // The window, by name: from `first` to `last` in the snapshot's order (wrapping once).
        let window: BTreeSet<String> = if sample.wrapped {
            all.iter()
                .filter(|p| **p >= sample.first || **p <= sample.last)
                .cloned()
                .collect()
        } else {
            all.iter()
                .filter(|p| **p >= sample.first && **p <= sample.last)
                .cloned()
                .collect()
        };
        assert_eq!(window.len(), 12, "round {round}: {sample:?}");
        covered.push(window);
        after = sample.last.clone();
    }
    assert!(
        covered[0].is_disjoint(&covered[1]) && covered[1].is_disjoint(&covered[2]),
        "successive drills read different files"
    );
    // 4 x 12 > 40: the fourth wrapped around to the start.
    let union: BTreeSet<&String> = covered.iter().flatten().collect();
    assert_eq!(union.len(), 40, "four drills covered every file");
    assert_eq!(
        agent.metric("stowage_agent_verify_bytes_total").await,
        Some((4 * 12 * 256 * 1024) as f64)
    );
}

#[tokio::test]
async fn a_damaged_pack_fails_the_drill_naming_the_snapshot() {
    let s = Setup::new();
    let agent = s.agent().await;
    let vol = csi_volume(&s.kubelet(), "pod-d", "pv-d");
    fstree::write_random(&vol.join("blob"), 4 * MB, 3);
    let repo = local_repo(&s.repo(), PW, true);
    let mut client = agent.client(&s.pki).await;
    let b = backup(
        &mut client,
        volume_backup(repo.clone(), "pod-d", "pv-d", "shop", "damaged"),
    )
    .await
    .result
    .expect("backup");
    // Damage the largest pack (the file's data), as a failing disk would.
    restic::damage_largest_pack(&s.repo());

    let err = verify(&mut client, drill(repo, "damaged", 0, ""))
        .await
        .result
        .expect_err("a damaged pack fails the drill");
    let m = err.message();
    assert!(
        m.contains(&format!("snapshot {}", &b.snapshot_id[..8])) && m.contains("did not come back"),
        "{m}"
    );
    assert!(
        m.contains("restic"),
        "restic's own error is in the message: {m}"
    );
    assert_eq!(
        agent
            .metric("stowage_agent_verifies_total{result=\"failed\"}")
            .await,
        Some(1.0)
    );
    let cache = s.pki.dir.read_dir().expect("pki dir");
    for c in cache
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("cache-"))
    {
        let scratch = c.path().join(".verify");
        let left = std::fs::read_dir(&scratch).map(|d| d.count()).unwrap_or(0);
        assert_eq!(
            left,
            0,
            "a failed drill leaves no scratch in {}",
            scratch.display()
        );
    }
}

/// Long (~40 s): a drill of 192 MiB has to be under way (restic writing) when the backup arrives.
#[tokio::test]
async fn a_backup_that_queues_during_a_drill_starts_without_waiting_for_it() {
    let s = Setup::new();
    let agent = s
        .agent_with(|o| {
            o.max_concurrent = 1;
        })
        .await;
    let big = csi_volume(&s.kubelet(), "pod-big", "pv-big");
    for i in 0..6 {
        fstree::write_random(&big.join(format!("f{i}")), 32 * MB, 40 + i);
    }
    let small = csi_volume(&s.kubelet(), "pod-small", "pv-small");
    fstree::write_random(&small.join("f"), MB, 9);
    let repo = local_repo(&s.repo(), PW, true);
    let mut client = agent.client(&s.pki).await;
    backup(
        &mut client,
        volume_backup(repo.clone(), "pod-big", "pv-big", "shop", "big"),
    )
    .await
    .result
    .expect("backup");

    // The drill, followed until restic restores.
    let mut drill_client = client.clone();
    let mut stream = drill_client
        .verify(drill(repo.clone(), "big", 0, ""))
        .await
        .expect("drill starts")
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ev = tokio::time::timeout_at(deadline.into(), stream.message())
            .await
            .expect("the drill reaches restic within 60 s")
            .expect("stream")
            .expect("an event");
        if let Some(v1::verify_event::Event::Progress(p)) = ev.event
            && p.phase() == Phase::Running
            && p.message.contains("--verify")
        {
            break;
        }
    }
    let drill_rest = tokio::spawn(async move {
        let mut progress = Vec::new();
        loop {
            match stream.message().await {
                Ok(Some(e)) => match e.event {
                    Some(v1::verify_event::Event::Progress(p)) => progress.push(p),
                    Some(v1::verify_event::Event::Result(r)) => {
                        return (Instant::now(), Ok(r), progress);
                    }
                    None => {}
                },
                Ok(None) => return (Instant::now(), Err("no result".to_string()), progress),
                Err(e) => return (Instant::now(), Err(e.message().to_string()), progress),
            }
        }
    });
    // A backup arrives: the agent's one slot is the drill's.
    let asked = Instant::now();
    let out = backup(
        &mut client,
        volume_backup(repo.clone(), "pod-small", "pv-small", "shop", "small"),
    )
    .await;
    let backed_up = Instant::now();
    out.result.expect("the backup succeeds");
    let waited = backed_up - asked;
    let (drill_done, drill, progress) = drill_rest.await.expect("join");
    let drill = drill.expect("the drill starts over and succeeds");
    assert!(
        backed_up < drill_done,
        "the backup finished first ({:?} after it was asked), not after the drill",
        waited
    );
    assert!(drill.yielded >= 1, "{drill:?}");
    assert!(
        progress
            .iter()
            .any(|p| p.phase() == Phase::Queued && p.message.contains("gave the slot")),
        "the drill said it gave its slot up"
    );
    assert_eq!(drill.files, 6);
    assert_eq!(drill.bytes, 6 * 32 * MB as u64);
    eprintln!(
        "backup during a drill: done {:.2} s after it was asked; drill yielded {} time(s), finished {:.2} s later",
        waited.as_secs_f64(),
        drill.yielded,
        (drill_done - backed_up).as_secs_f64()
    );
    assert_eq!(
        restic::snapshots(&s.repo().display().to_string(), PW).len(),
        2
    );
}

#[tokio::test]
async fn a_drill_that_does_not_fit_the_scratch_bound_fails_with_a_sentence_and_writes_nothing() {
    let s = Setup::new();
    // 100%: nothing of the cache filesystem may be used, so no drill fits.
    let agent = s.agent_with(|o| o.verify_keep_free_percent = 100).await;
    let vol = csi_volume(&s.kubelet(), "pod-f", "pv-f");
    fstree::write_random(&vol.join("blob"), MB, 5);
    let repo = local_repo(&s.repo(), PW, true);
    let mut client = agent.client(&s.pki).await;
    backup(
        &mut client,
        volume_backup(repo.clone(), "pod-f", "pv-f", "shop", "full"),
    )
    .await
    .result
    .expect("backup");
    let err = verify(&mut client, drill(repo, "full", 0, ""))
        .await
        .result
        .expect_err("no room");
    let m = err.message();
    assert!(
        m.contains("of scratch space")
            && m.contains("--verify-keep-free-percent")
            && m.contains("nothing was written"),
        "{m}"
    );
    for c in s.pki.dir.read_dir().expect("pki dir").flatten() {
        if c.file_name().to_string_lossy().starts_with("cache-") {
            let left = std::fs::read_dir(c.path().join(".verify"))
                .map(|d| d.count())
                .unwrap_or(0);
            assert_eq!(left, 0, "no scratch directory is left");
        }
    }
}
