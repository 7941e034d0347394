//! Snapshots this agent has seen restic list, by repository and full id.
//!
//! A snapshot never changes: its id is the hash of its content, and retagging or rewriting one writes
//! a new snapshot under a new id. So what restic once said about an id stays true for as long as that
//! id exists, and a restore of an id listed here can check whose it is against this record instead of
//! listing the repository again. That matters because every restic start pays the repository key's
//! derivation (scrypt, about 0.7 s here), and the coordinator has just listed the same snapshots
//! through this agent to choose one. A snapshot removed since then only makes the restore itself fail
//! with restic's "no matching ID".

use std::collections::HashMap;
use std::sync::Mutex;

use restic_wrap::json::Snapshot;

/// Entries kept at most; on overflow the record starts over.
const MAX: usize = 10_000;
/// A snapshot whose tags, paths and host take more than this is not kept (a restore of it lists
/// the repository again): with [`MAX`], the record holds at most about 20 MiB.
const ENTRY_MAX: usize = 2048;

/// The bytes a kept snapshot costs, roughly.
fn weight(s: &Snapshot) -> usize {
    s.id.len()
        + s.short_id.len()
        + s.hostname.len()
        + s.tags.iter().map(String::len).sum::<usize>()
        + s.paths.iter().map(String::len).sum::<usize>()
}

#[derive(Debug, Default)]
pub struct KnownSnapshots(Mutex<HashMap<(String, String), Snapshot>>);

impl KnownSnapshots {
    /// Records what restic listed from the repository at `location`.
    pub fn remember<'a>(&self, location: &str, listed: impl IntoIterator<Item = &'a Snapshot>) {
        let Ok(mut m) = self.0.lock() else { return };
        for s in listed.into_iter().filter(|s| weight(s) <= ENTRY_MAX) {
            if m.len() >= MAX {
                m.clear();
            }
            m.insert((location.to_string(), s.id.clone()), s.clone());
        }
    }

    /// The snapshot with full id `id` in the repository at `location`, if it was listed and carries
    /// every tag in `tags` (restic's own `--tag a,b` rule); an abbreviated id never matches here.
    pub fn get(&self, location: &str, id: &str, tags: &[String]) -> Option<Snapshot> {
        let m = self.0.lock().ok()?;
        let s = m.get(&(location.to_string(), id.to_string()))?;
        tags.iter().all(|t| s.tags.contains(t)).then(|| s.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: &str, tags: &[&str]) -> Snapshot {
        Snapshot {
            id: id.into(),
            short_id: id[..8].into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_snapshot_heavier_than_an_entry_may_be_is_not_kept() {
        let known = KnownSnapshots::default();
        let id = "b".repeat(64);
        let mut heavy = snap(&id, &["ns=a"]);
        heavy.paths = vec!["p".repeat(ENTRY_MAX)];
        known.remember("s3:one", [&heavy]);
        assert!(known.get("s3:one", &id, &[]).is_none());
    }

    #[test]
    fn answers_only_for_the_same_repository_full_id_and_tags() {
        let known = KnownSnapshots::default();
        let id = "a".repeat(64);
        known.remember("s3:one", [&snap(&id, &["ns=a", "pvc=x", "other"])]);
        let tags = |t: &[&str]| t.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            known
                .get("s3:one", &id, &tags(&["ns=a", "pvc=x"]))
                .map(|s| s.id),
            Some(id.clone())
        );
        // Another identity's tags, another repository, or a prefix: not known.
        assert!(
            known
                .get("s3:one", &id, &tags(&["ns=b", "pvc=x"]))
                .is_none()
        );
        assert!(known.get("s3:two", &id, &tags(&["ns=a"])).is_none());
        assert!(known.get("s3:one", &id[..8], &tags(&["ns=a"])).is_none());
    }
}
