//! Which snapshot a Restore writes: chosen among the source's own, and recorded in the status
//! before anything is written (a resumed run restores the recorded one, never a newer backup).

use chrono::DateTime;
use stowage_api::contract::TAG_PARTIAL;
use stowage_proto::v1::{self as pb, SnapshotsRequest};

use super::*;
use crate::conditions::Finding;
use crate::context::Ctx;
use crate::dispatch::{self, SNAPSHOTS_TIMEOUT};
use crate::run::status::StatusHandle;
use stowage_api::Restore;

/// Whether a snapshot's backup could not read every file (restic exit 3).
pub fn is_partial(s: &pb::Snapshot) -> bool {
    s.tags.iter().any(|t| t == TAG_PARTIAL)
}

/// The snapshot `wanted` names among `snaps` (one identity's): the newest, the one with that id,
/// or the newest taken at or before the time. `latest` and `before` pass over partial snapshots
/// unless `allow_partial`; an id is taken as named.
pub fn choose<'a>(
    snaps: &'a [pb::Snapshot],
    wanted: &Wanted,
    allow_partial: bool,
) -> Option<&'a pb::Snapshot> {
    let time = |s: &pb::Snapshot| DateTime::parse_from_rfc3339(&s.time).ok();
    let eligible = |s: &&pb::Snapshot| allow_partial || !is_partial(s);
    match wanted {
        Wanted::Latest => snaps
            .iter()
            .filter(eligible)
            .filter(|s| time(s).is_some())
            .max_by_key(|s| time(s)),
        Wanted::Id(id) => snaps.iter().find(|s| s.id.starts_with(id.as_str())),
        Wanted::Before(t) => snaps
            .iter()
            .filter(eligible)
            .filter(|s| time(s).is_some_and(|st| st <= *t))
            .max_by_key(|s| time(s)),
    }
}

/// Why nothing was chosen, with the partial snapshots passed over and the remedy.
fn describe(snaps: &[pb::Snapshot], wanted: &Wanted, allow_partial: bool) -> String {
    let what = match wanted {
        Wanted::Latest => "no complete snapshot".into(),
        Wanted::Id(id) => return format!("no snapshot {id}"),
        Wanted::Before(t) => format!("no complete snapshot taken at or before {}", t.to_rfc3339()),
    };
    let partial = snaps.iter().filter(|s| is_partial(s)).count();
    if allow_partial || partial == 0 {
        return what.replacen("complete ", "", 1);
    }
    format!(
        "{what} ({partial} partial snapshot(s) passed over: their backups could not read every file; set spec.source.allowPartial: true, or name one in spec.source.snapshot, to restore one)"
    )
}

/// Lists the source's snapshots through the agent of `node`, picks the wanted one and records it in
/// the status (written before anything is restored).
pub(super) async fn resolve(
    ctx: &Ctx,
    run: &Restore,
    status: &StatusHandle,
    node: &str,
    req: SnapshotsRequest,
    checked: &Checked,
    whose: &str,
) -> Result<pb::Snapshot, Finding> {
    let (wanted, allow_partial) = (&checked.wanted, checked.allow_partial);
    let snaps = dispatch::snapshots(&ctx.agents, node, req, SNAPSHOTS_TIMEOUT)
        .await
        .map_err(|e| {
            Finding::new(
                RESTORE_FAILED,
                format!("listing the snapshots of {whose}: {e}"),
            )
        })?;
    let chosen = choose(&snaps, wanted, allow_partial)
        .cloned()
        .ok_or_else(|| {
            Finding::new(
                SNAPSHOT_NOT_FOUND,
                format!(
                    "spec.source: {} of {whose} in the repository ({} snapshot(s) of it)",
                    describe(&snaps, wanted, allow_partial),
                    snaps.len()
                ),
            )
        })?;
    let (id, time, partial) = (chosen.id.clone(), chosen.time.clone(), is_partial(&chosen));
    status.run(move |s| {
        let r = s.restore.get_or_insert_with(Default::default);
        r.snapshot_id = Some(id);
        r.snapshot_time = Some(time);
        r.partial = Some(partial);
    });
    status.flush().await.map_err(|e| {
        Finding::new(
            RESTORE_FAILED,
            format!(
                "recording the snapshot in the status failed, so nothing was restored: {}",
                crate::errors::sentence(&e)
            ),
        )
    })?;
    ctx.notifier
        .normal(
            run,
            "Restore",
            &Finding::new(
                "SnapshotResolved",
                format!(
                    "restoring snapshot {} of {whose}, taken {}",
                    chosen.short_id, chosen.time
                ),
            ),
        )
        .await;
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: &str, time: &str) -> pb::Snapshot {
        pb::Snapshot {
            id: id.into(),
            short_id: id[..8].into(),
            time: time.into(),
            ..Default::default()
        }
    }

    #[test]
    fn choosing_latest_an_id_or_the_newest_before_a_time() {
        // restic writes local times with offsets: compare instants, not strings.
        let snaps = vec![
            snap("aaaaaaaa11", "2026-11-19T23:00:00+01:00"), // 22:00Z
            snap("bbbbbbbb22", "2026-11-19T22:30:00Z"),
            snap("cccccccc33", "2026-11-20T08:00:00+09:00"), // 23:00Z on the 19th
            snap("dddddddd44", "2026-11-21T00:00:00Z"),
        ];
        assert_eq!(
            choose(&snaps, &Wanted::Latest, false).unwrap().id,
            "dddddddd44"
        );
        assert_eq!(
            choose(&snaps, &Wanted::Id("bbbbbbbb".into()), false)
                .unwrap()
                .id,
            "bbbbbbbb22"
        );
        let before = |t: &str| Wanted::Before(DateTime::parse_from_rfc3339(t).unwrap());
        assert_eq!(
            choose(&snaps, &before("2026-11-20T00:00:00Z"), false)
                .unwrap()
                .id,
            "cccccccc33"
        );
        assert_eq!(
            choose(&snaps, &before("2026-11-19T22:30:00Z"), false)
                .unwrap()
                .id,
            "bbbbbbbb22",
            "at or before"
        );
        assert!(choose(&snaps, &before("2026-11-01T00:00:00Z"), false).is_none());
        assert!(choose(&snaps, &Wanted::Id("eeeeeeee".into()), false).is_none());
    }

    #[test]
    fn latest_and_before_pass_over_partial_snapshots_unless_allowed() {
        let mut partial = snap("eeeeeeee55", "2026-11-22T00:00:00Z");
        partial.tags = vec![TAG_PARTIAL.into()];
        let snaps = vec![snap("dddddddd44", "2026-11-21T00:00:00Z"), partial];
        assert_eq!(
            choose(&snaps, &Wanted::Latest, false).unwrap().id,
            "dddddddd44"
        );
        assert_eq!(
            choose(&snaps, &Wanted::Latest, true).unwrap().id,
            "eeeeeeee55"
        );
        let before = Wanted::Before(DateTime::parse_from_rfc3339("2026-11-23T00:00:00Z").unwrap());
        assert_eq!(choose(&snaps, &before, false).unwrap().id, "dddddddd44");
        // Named, a partial snapshot is taken as named.
        assert_eq!(
            choose(&snaps, &Wanted::Id("eeeeeeee".into()), false)
                .unwrap()
                .id,
            "eeeeeeee55"
        );
        let only_partial = &snaps[1..];
        assert!(choose(only_partial, &Wanted::Latest, false).is_none());
        let why = describe(only_partial, &Wanted::Latest, false);
        assert!(
            why.starts_with("no complete snapshot (1 partial snapshot(s) passed over")
                && why.contains("spec.source.allowPartial: true"),
            "{why}"
        );
        assert_eq!(describe(&[], &Wanted::Latest, false), "no snapshot");
    }
}
