//! Recovery of the staging directories a killed agent left behind (at its next start, and before a
//! restore into the same volume): roll back what had not committed, finish what had, remove plain
//! leftovers, and leave alone another live agent's.

use super::*;

/// What a recovery pass did with one leftover staging directory.
#[derive(Debug, PartialEq, Eq)]
pub enum Recovered {
    /// No swap had started: only staged data, removed.
    Removed,
    /// A swap had not committed: the originals were put back.
    RolledBack,
    /// A swap had committed: the staged data was moved in.
    Finished,
    /// A live restore of another agent (another node's on a shared volume, or another instance on
    /// this node): left alone. Holds the owner's node.
    InUseElsewhere(String),
}

/// Deals with the staging directories that a killed agent left at the root of a volume (not those
/// this process is using). The journal is read as untrusted input: a tenant can write it, so every
/// path in it is resolved below the volume root, never through a link.
pub fn recover(
    root: &OwnedFd,
    active: &Active,
) -> Vec<(String, std::result::Result<Recovered, SafeFsError>)> {
    let lock = match active.volume_lock(root) {
        Ok(l) => l,
        Err(e) => return vec![(".".into(), Err(e))],
    };
    // Poisoned only by a panic elsewhere; the guard protects no data of its own.
    let _one_at_a_time = lock
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let names = match safe_fs::entries(root, ".") {
        Ok(n) => n,
        Err(e) => return vec![(".".into(), Err(e))],
    };
    names
        .into_iter()
        .filter(|n| n.starts_with(PREFIX.as_bytes()) && !active.contains(n))
        .map(|n| {
            let shown = String::from_utf8_lossy(&n).into_owned();
            let r = recover_one(root, OsStr::from_bytes(&n));
            (shown, r)
        })
        .collect()
}

fn recover_one(root: &OwnedFd, name: &OsStr) -> Result<Recovered> {
    let shown = name.to_string_lossy().into_owned();
    let dir = match openat(root, name, dir_flags(), Mode::empty()) {
        Ok(d) if let Some(owner) = live_owner(&d) => {
            return Ok(Recovered::InUseElsewhere(owner));
        }
        Ok(d) => {
            // Only what this agent could have made is acted on: a pod that plants a journal, data
            // or aside of its own must not get the agent, as root, to move or chown what it names.
            // (`data/` is left out: restic may give it the snapshot root's mode.)
            for part in [
                None,
                Some(JOURNAL),
                Some(COMMITTED),
                Some(OWNER),
                Some(ASIDE),
            ] {
                let st = match part {
                    None => safe_fs::stat_fd(&d, &shown).map(Some)?,
                    Some(p) => match fstatat(&d, p, AtFlags::AT_SYMLINK_NOFOLLOW) {
                        Ok(st) => Some(st),
                        Err(Errno::ENOENT) => None,
                        Err(e) => return Err(io(format!("{shown}/{p}"))(e)),
                    },
                };
                if let Some(st) = st
                    && !made_by_us(&st)
                {
                    return Err(SafeFsError::InvalidPath {
                        path: format!("{shown}/{}", part.unwrap_or("")),
                        reason: "not made by the agent (another owner, or writable by group or others); left in place, untouched",
                    });
                }
            }
            d
        }
        // Not a directory (a planted file or link): not ours, but named like ours; remove it.
        Err(Errno::ENOTDIR | Errno::ELOOP) => {
            safe_fs::remove_tree_at(root, name)?;
            return Ok(Recovered::Removed);
        }
        Err(e) => {
            return Err(SafeFsError::Io {
                path: shown,
                source: e,
            });
        }
    };
    let journal = read_small(&dir, JOURNAL)?;
    let outcome = match journal {
        None => Recovered::Removed,
        Some(text) => {
            let (target_parts, entries) =
                parse_journal(&text).ok_or_else(|| SafeFsError::InvalidPath {
                    path: format!("{shown}/{JOURNAL}"),
                    reason: "unreadable restore journal; left in place",
                })?;
            let committed = match fstatat(&dir, COMMITTED, AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(_) => true,
                Err(Errno::ENOENT) => false,
                Err(e) => {
                    return Err(SafeFsError::Io {
                        path: shown,
                        source: e,
                    });
                }
            };
            let target = safe_fs::open_beneath(root, &target_parts, true)?;
            if committed {
                finish_committed(&dir, &target)?;
                Recovered::Finished
            } else {
                rollback(&dir, &target, &entries)?;
                // Whatever is still aside, the journal does not account for: it may be someone's
                // only copy, so the directory stays.
                let left = match openat(&dir, ASIDE, dir_flags(), Mode::empty()) {
                    Ok(aside) => safe_fs::entries(&aside, ASIDE)?.len(),
                    Err(Errno::ENOENT) => 0,
                    Err(e) => return Err(io(ASIDE)(e)),
                };
                if left > 0 {
                    return Err(SafeFsError::InvalidPath {
                        path: format!("{shown}/{ASIDE}"),
                        reason: "holds entries the journal does not list after the originals were put back; left in place",
                    });
                }
                Recovered::RolledBack
            }
        }
    };
    drop(dir);
    // A planted tree of millions of entries takes more than one pass, so no pass holds the
    // volume's restores for long.
    safe_fs::remove_tree_within(root, name, RECOVERY_BUDGET).map_err(|e| match e {
        SafeFsError::OverBudget { budget, .. } => SafeFsError::OverBudget {
            path: shown.clone(),
            budget,
        },
        e => e,
    })?;
    Ok(outcome)
}
