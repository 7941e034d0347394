//! A restore's staging directory inside the target volume, and the swap that makes `Replace` safe.
//!
//! `<volume>/.stowage-restore-<run>-<unique>/` holds:
//! - `data/`: what restic restored (the only directory its sandbox can write);
//! - `journal`: for `Replace`, written before anything in the target moves: the target directory
//!   and every entry that will be moved aside;
//! - `aside/<n>`: the original entries, moved out of the way (renames, same filesystem);
//! - `committed`: created once every original entry is aside; from then on the swap finishes;
//! - `owner`: the node and agent instance restoring, whose mtime is a heartbeat (touched every
//!   few seconds while the restore lives). A shared (RWX) volume is mounted on several nodes, and a
//!   DaemonSet update with surge runs two agents on one node for a while: no agent recovers a
//!   staging directory of another instance while that instance's heartbeat is fresh.
//!
//! Until `committed` exists, a failure (or a killed agent, at its next start) moves the originals
//! back: the target ends up as it was. After it, the staged data is moved in. Backups exclude the
//! prefix, so a staging directory is never captured.
//!
//! Length: over 500 lines with its unit tests (crashes at every step of a swap); the code is about 500.
//!
//! Length: ~500 lines of code (the swap, its heartbeat and its roll-back, which must be read together) and its tests.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, renameat};
use nix::sys::stat::{Mode, SFlag, fstatat, mkdirat};

use crate::safe_fs::{self, SafeFsError};

mod journal;
mod recovery;

use journal::{Entry, hex, parse_journal, unhex};
pub use recovery::{Recovered, recover};

/// Every staging directory's name starts with this (at the volume root).
pub const PREFIX: &str = ".stowage-restore-";
const DATA: &str = "data";
const ASIDE: &str = "aside";
const JOURNAL: &str = "journal";
const COMMITTED: &str = "committed";
const OWNER: &str = "owner";
/// How often a live restore touches its `owner` file.
const HEARTBEAT_EVERY: std::time::Duration = std::time::Duration::from_secs(3);
/// A staging directory whose heartbeat is older than this is a dead agent's: any agent that
/// mounts the volume may recover it. Several missed beats, so a busy node is not taken for dead.
pub const HEARTBEAT_STALE: std::time::Duration = std::time::Duration::from_secs(20);
const JOURNAL_MAGIC: &str = "stowage-replace 1";
/// The largest journal written, and read back whole. A Replace that would need a larger one (several
/// hundred thousand entries in one directory) is refused before anything moves; a larger file at
/// recovery is not ours, and is left in place.
const JOURNAL_MAX: usize = 64 << 20;
/// Merge passes after the commit: each one displaces what stands in the snapshot's way, so a second
/// is needed only when the target changes under the first.
const COMMITTED_MERGE_ATTEMPTS: usize = 3;

type Result<T> = std::result::Result<T, SafeFsError>;

use crate::safe_fs::{dir_flags, io};

/// Entries one recovery pass removes from one leftover staging directory at most; the rest waits
/// for the next pass (a restore into the volume, or the agent's next start).
const RECOVERY_BUDGET: u64 = 1_000_000;
/// Volumes with a recovery lock at once; beyond it, idle locks are dropped.
const RECOVERY_LOCKS_MAX: usize = 4096;

/// The staging directories this process is using, so that a recovery pass on a volume never
/// touches a restore still in progress; and one lock per volume for recovery passes, so that two
/// of them (the start-up pass and a restore's, or two restores' into one volume) never undo the
/// same leftover at once, while a slow pass over one volume (a tenant's planted tree) holds up no
/// other volume.
#[derive(Default, Clone)]
pub struct Active {
    /// This agent's node: its own staging directories are always its to recover.
    node: String,
    names: Arc<Mutex<HashSet<String>>>,
    recovering: Arc<Mutex<HashMap<VolumeKey, Arc<Mutex<()>>>>>,
}

/// A volume root's device and inode.
type VolumeKey = (u64, u64);

impl Active {
    pub fn for_node(node: &str) -> Self {
        Self {
            node: node.to_string(),
            ..Default::default()
        }
    }

    fn insert(&self, name: &str) {
        if let Ok(mut s) = self.names.lock() {
            s.insert(name.to_string());
        }
    }
    fn remove(&self, name: &str) {
        if let Ok(mut s) = self.names.lock() {
            s.remove(name);
        }
    }
    /// The recovery lock of the volume whose root is `root` (by device and inode).
    fn volume_lock(&self, root: &OwnedFd) -> Result<Arc<Mutex<()>>> {
        let st = safe_fs::stat_fd(root, ".")?;
        let key = (st.st_dev, st.st_ino);
        let mut locks = self
            .recovering
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if locks.len() >= RECOVERY_LOCKS_MAX {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        Ok(Arc::clone(locks.entry(key).or_default()))
    }

    fn contains(&self, name: &[u8]) -> bool {
        self.names
            .lock()
            .is_ok_and(|s| s.iter().any(|n| n.as_bytes() == name))
    }
}

/// What a `Replace` displaces: every entry of the target (but staging directories, when the target
/// is the volume root), or only the included paths.
pub enum Displace {
    All,
    Paths(Vec<Vec<String>>),
}

/// One restore's staging directory; removed with its contents on drop unless the original data
/// could not be put back (then it must survive for the next start's recovery).
pub struct Staging {
    root: OwnedFd,
    name: String,
    dir: OwnedFd,
    active: Active,
    keep: AtomicBool,
    /// Dropped with the staging: the heartbeat thread then ends.
    _heartbeat: Option<std::sync::mpsc::Sender<()>>,
}

impl Staging {
    pub fn create(root: &OwnedFd, run_id: &str, active: &Active) -> Result<Self> {
        let tag: String = run_id
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(40)
            .collect();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let name = format!("{PREFIX}{tag}-{:x}", nanos ^ u128::from(std::process::id()));
        let root = nix::unistd::dup(root).map_err(io("."))?;
        // Registered before it exists: a concurrent recovery pass must never take it for a leftover.
        active.insert(&name);
        let made = mkdirat(&root, name.as_str(), Mode::from_bits_truncate(0o700))
            .and_then(|()| openat(&root, name.as_str(), dir_flags(), Mode::empty()));
        let dir = match made {
            Ok(d) => d,
            Err(e) => {
                active.remove(&name);
                return Err(SafeFsError::Io {
                    path: name,
                    source: e,
                });
            }
        };
        let mut staging = Self {
            root,
            name,
            dir,
            active: active.clone(),
            keep: AtomicBool::new(false),
            _heartbeat: None,
        };
        let owner = format!(
            "node {}\ninstance {}-{nanos:x}\n",
            hex(active.node.as_bytes()),
            std::process::id()
        );
        write_file(&staging.dir, OWNER, owner.as_bytes())?;
        staging._heartbeat = heartbeat(&staging.dir, &staging.name);
        mkdirat(&staging.dir, DATA, Mode::from_bits_truncate(0o700)).map_err(io(DATA))?;
        Ok(staging)
    }

    /// restic's target: `data/`.
    pub fn data(&self) -> Result<OwnedFd> {
        openat(&self.dir, DATA, dir_flags(), Mode::empty()).map_err(io(DATA))
    }

    /// `Merge`: moves the staged data into `target`.
    pub fn merge(&self, target: &OwnedFd) -> Result<()> {
        safe_fs::merge_into(&self.data()?, target, ".", None)
    }

    /// `Replace`: moves what `displace` names out of `target` (journalled, so that it can be moved
    /// back), commits, then moves the staged data in. `target_parts` is the target's path below
    /// the volume root, recorded for recovery. Any failure before the commit puts the originals
    /// back before returning.
    pub fn replace(
        &self,
        target_parts: &[String],
        target: &OwnedFd,
        displace: &Displace,
    ) -> Result<()> {
        let entries = displaced(target_parts, target, displace)?;
        self.write_journal(target_parts, &entries)?;
        let prepared = self
            .move_aside(target, &entries)
            .and_then(|()| self.commit());
        if let Err(e) = prepared {
            if let Err(back) = rollback(&self.dir, target, &entries) {
                // Never delete originals we could not put back: the next start tries again.
                self.keep.store(true, Ordering::Release);
                tracing::error!(staging = %self.name, error = %back, "could not move the original data back; it stays in the staging directory until the agent's next start");
            }
            return Err(e);
        }
        // Committed: from here the swap ends finished, or stays recoverable. Never deleted on error.
        finish_committed(&self.dir, target).inspect_err(|e| {
            self.keep.store(true, Ordering::Release);
            tracing::error!(staging = %self.name, error = %e, "a committed swap could not be finished; its staging directory is kept and the agent finishes it at its next recovery pass");
        })
    }

    fn write_journal(&self, target_parts: &[String], entries: &[Entry]) -> Result<()> {
        let mut text = format!(
            "{JOURNAL_MAGIC}\ntarget {}\n",
            hex(target_parts.join("/").as_bytes())
        );
        for e in entries {
            text.push_str(&format!("entry {}\n", e.encode()));
            if text.len() > JOURNAL_MAX {
                return Err(SafeFsError::InvalidPath {
                    path: format!("{} entries", entries.len()),
                    reason: "too many entries to replace at once; restore with include paths, or in Merge mode",
                });
            }
        }
        write_file(&self.dir, JOURNAL, text.as_bytes())?;
        mkdirat(&self.dir, ASIDE, Mode::from_bits_truncate(0o700)).map_err(io(ASIDE))
    }

    fn move_aside(&self, target: &OwnedFd, entries: &[Entry]) -> Result<()> {
        let aside = openat(&self.dir, ASIDE, dir_flags(), Mode::empty()).map_err(io(ASIDE))?;
        for (i, e) in entries.iter().enumerate() {
            let parent = match safe_fs::open_beneath(target, &e.parent, false) {
                Ok(p) => p,
                Err(SafeFsError::Io {
                    source: Errno::ENOENT,
                    ..
                }) => continue,
                Err(err) => return Err(err),
            };
            match renameat(
                &parent,
                OsStr::from_bytes(&e.name),
                &aside,
                i.to_string().as_str(),
            ) {
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(err) => {
                    return Err(SafeFsError::Io {
                        path: e.shown(),
                        source: err,
                    });
                }
            }
        }
        nix::unistd::fsync(aside.as_fd()).map_err(io(ASIDE))
    }

    fn commit(&self) -> Result<()> {
        write_file(&self.dir, COMMITTED, b"")?;
        nix::unistd::fsync(self.dir.as_fd()).map_err(io(&self.name))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.keep.load(Ordering::Acquire)
            && let Err(e) = safe_fs::remove_tree_at(&self.root, OsStr::new(&self.name))
        {
            tracing::warn!(error = %e, staging = %self.name, "could not remove restore staging directory");
        }
        self.active.remove(&self.name);
    }
}

/// Touches `owner` every [`HEARTBEAT_EVERY`] until the returned sender is dropped. A thread, not a
/// task: a staging directory lives in blocking code as much as in async code.
fn heartbeat(dir: &OwnedFd, shown: &str) -> Option<std::sync::mpsc::Sender<()>> {
    let dir = nix::unistd::dup(dir).ok()?;
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let name = shown.to_string();
    let started = std::thread::Builder::new()
        .name("staging-heartbeat".into())
        .spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                rx.recv_timeout(HEARTBEAT_EVERY)
            {
                let flags = OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
                let touched = openat(&dir, OWNER, flags, Mode::empty()).and_then(|fd| {
                    nix::sys::stat::futimens(
                        &fd,
                        &nix::sys::time::TimeSpec::UTIME_NOW,
                        &nix::sys::time::TimeSpec::UTIME_NOW,
                    )
                });
                if let Err(e) = touched {
                    tracing::warn!(staging = %name, error = %e, "could not touch the staging directory's heartbeat");
                }
            }
        });
    match started {
        Ok(_) => Some(tx),
        Err(e) => {
            tracing::warn!(staging = %shown, error = %e, "could not start the staging directory's heartbeat");
            None
        }
    }
}

/// Whether a staging directory's part can be the agent's own: owned by the agent's user, and
/// writable by no one else (the agent makes them 0700 and 0600).
fn made_by_us(st: &nix::sys::stat::FileStat) -> bool {
    st.st_uid == nix::unistd::geteuid().as_raw() && st.st_mode & 0o022 == 0
}

/// The live owner of a staging directory this process is not using: its `owner` file was touched
/// within [`HEARTBEAT_STALE`], by another agent on this node (a DaemonSet update with surge) or on
/// another node (a shared volume). Returns the owner's node. An unreadable or absent owner, or a
/// stale heartbeat, is no one's: a dead agent's leftover.
fn live_owner(dir: &OwnedFd) -> Option<String> {
    let text = read_small(dir, OWNER).ok()??;
    let owner = text
        .lines()
        .find_map(|l| l.strip_prefix("node "))
        .and_then(unhex)
        .map(|b| String::from_utf8_lossy(&b).into_owned())?;
    let st = fstatat(dir, OWNER, AtFlags::AT_SYMLINK_NOFOLLOW).ok()?;
    let touched = std::time::UNIX_EPOCH
        + std::time::Duration::new(
            u64::try_from(st.st_mtime).unwrap_or(0),
            u32::try_from(st.st_mtime_nsec).unwrap_or(0),
        );
    let age = std::time::SystemTime::now()
        .duration_since(touched)
        .unwrap_or_default();
    (age < HEARTBEAT_STALE).then_some(owner)
}

/// The filesystem's own directory at a volume root (ext4's mkfs makes it, fsck needs it): never
/// displaced by a Replace at the root, never counted against IntoEmpty.
pub const LOST_FOUND: &[u8] = b"lost+found";

fn displaced(target_parts: &[String], target: &OwnedFd, displace: &Displace) -> Result<Vec<Entry>> {
    let at_root = target_parts.is_empty();
    Ok(match displace {
        Displace::All => safe_fs::entries(target, ".")?
            .into_iter()
            .filter(|n| !(at_root && (n.starts_with(PREFIX.as_bytes()) || n == LOST_FOUND)))
            .map(|name| Entry {
                parent: Vec::new(),
                name,
            })
            .collect(),
        Displace::Paths(paths) => paths
            .iter()
            .filter_map(|p| {
                let (name, parent) = p.split_last()?;
                Some(Entry {
                    parent: parent.to_vec(),
                    name: name.as_bytes().to_vec(),
                })
            })
            .collect(),
    })
}

/// Creates `name` in `dir` (never through a link) with `content`, synced.
fn write_file(dir: &OwnedFd, name: &str, content: &[u8]) -> Result<()> {
    let fd = openat(
        dir,
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(io(name))?;
    let mut f = std::fs::File::from(fd);
    f.write_all(content)
        .and_then(|()| f.sync_all())
        .map_err(|e| SafeFsError::Io {
            path: name.into(),
            source: Errno::from_raw(e.raw_os_error().unwrap_or(Errno::EIO as i32)),
        })
}

/// Moves the staged data of a committed swap into `target`, the snapshot winning every conflict
/// (what stands in its way goes to `aside/`, removed with the staging directory).
fn finish_committed(staging: &OwnedFd, target: &OwnedFd) -> Result<()> {
    let data = openat(staging, DATA, dir_flags(), Mode::empty()).map_err(io(DATA))?;
    let aside = match mkdirat(staging, ASIDE, Mode::from_bits_truncate(0o700)) {
        Ok(()) | Err(Errno::EEXIST) => {
            openat(staging, ASIDE, dir_flags(), Mode::empty()).map_err(io(ASIDE))?
        }
        Err(e) => return Err(io(ASIDE)(e)),
    };
    let displacer = safe_fs::Displacer::new(aside);
    let mut attempt = 0;
    loop {
        attempt += 1;
        match safe_fs::merge_into(&data, target, ".", Some(&displacer)) {
            Ok(()) => return Ok(()),
            Err(e) if attempt >= COMMITTED_MERGE_ATTEMPTS => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, attempt, "the target changed during a committed swap; merging again");
            }
        }
    }
}

/// Moves every entry aside back to its place in `target`, replacing whatever took its name. In
/// reverse order of moving aside: with entries `[a/b, a]`, `a` goes back first and then `a/b` into
/// it. (Forwards, putting `a` back would replace the directory `a/b` had just been put into.)
fn rollback(staging: &OwnedFd, target: &OwnedFd, entries: &[Entry]) -> Result<()> {
    let aside = match openat(staging, ASIDE, dir_flags(), Mode::empty()) {
        Ok(a) => a,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => {
            return Err(SafeFsError::Io {
                path: ASIDE.into(),
                source: e,
            });
        }
    };
    for (i, e) in entries.iter().enumerate().rev() {
        let moved = i.to_string();
        match fstatat(&aside, moved.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(_) => {}
            Err(Errno::ENOENT) => continue,
            Err(err) => {
                return Err(SafeFsError::Io {
                    path: e.shown(),
                    source: err,
                });
            }
        }
        let parent = safe_fs::open_beneath(target, &e.parent, true)?;
        let name = OsStr::from_bytes(&e.name);
        safe_fs::remove_tree_at(&parent, name)?;
        renameat(&aside, moved.as_str(), &parent, name).map_err(io(e.shown()))?;
    }
    Ok(())
}

/// Reads a small regular file (at most `JOURNAL_MAX`, whole or not at all), never through a link;
/// `None` when absent. Opened
/// non-blocking and checked to be a regular file: a FIFO a tenant plants under the name must not
/// hang the agent.
fn read_small(dir: &OwnedFd, name: &str) -> Result<Option<String>> {
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    let fd = match openat(dir, name, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(None),
        Err(e) => {
            return Err(SafeFsError::Io {
                path: name.into(),
                source: e,
            });
        }
    };
    let st = nix::sys::stat::fstat(&fd).map_err(io(name))?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(SafeFsError::InvalidPath {
            path: name.into(),
            reason: "not a regular file; left in place",
        });
    }
    let mut text = String::new();
    use std::io::Read;
    std::fs::File::from(fd)
        .take(JOURNAL_MAX as u64 + 1)
        .read_to_string(&mut text)
        .map_err(|_| SafeFsError::InvalidPath {
            path: name.into(),
            reason: "not a readable text file",
        })?;
    // Never act on part of a journal: the originals listed after a cut would be deleted.
    if text.len() > JOURNAL_MAX {
        return Err(SafeFsError::InvalidPath {
            path: name.into(),
            reason: "larger than any journal the agent writes; left in place",
        });
    }
    Ok(Some(text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::path::Path;

    fn tree(root: &Path) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for e in walk(root) {
            let rel = e.strip_prefix(root).unwrap().display().to_string();
            let content = if e.is_dir() {
                "<dir>".to_string()
            } else {
                fs::read_to_string(&e).unwrap_or_default()
            };
            out.push((rel, content));
        }
        out.sort();
        out
    }

    fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
        let mut v = Vec::new();
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                v.extend(walk(&p));
            }
            v.push(p);
        }
        v
    }

    /// A volume with originals, and a staging directory whose data is the "snapshot".
    /// The agent dies: its heartbeat stops, and (for the test) is made as old as a dead one's.
    fn die(mut staging: Staging) {
        drop(staging._heartbeat.take());
        let old =
            std::time::SystemTime::now() - HEARTBEAT_STALE - std::time::Duration::from_secs(1);
        let since = old.duration_since(std::time::UNIX_EPOCH).unwrap();
        let t = nix::sys::time::TimeSpec::new(since.as_secs() as i64, 0);
        nix::sys::stat::utimensat(
            &staging.dir,
            OWNER,
            &t,
            &t,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
        std::mem::forget(staging);
    }

    fn setup() -> (tempfile::TempDir, OwnedFd, Staging, Active) {
        let t = tempfile::tempdir().unwrap();
        let vol = t.path();
        fs::write(vol.join("keep-me-not"), "old").unwrap();
        fs::write(vol.join("a"), "old a").unwrap();
        fs::create_dir_all(vol.join("dir/sub")).unwrap();
        fs::write(vol.join("dir/sub/x"), "old x").unwrap();
        let root = safe_fs::open_root(vol).unwrap();
        let active = Active::default();
        let staging = Staging::create(&root, "ns/run", &active).unwrap();
        let data = vol.join(&staging.name).join(DATA);
        fs::write(data.join("a"), "new a").unwrap();
        fs::create_dir_all(data.join("dir/sub")).unwrap();
        fs::write(data.join("dir/sub/y"), "new y").unwrap();
        (t, root, staging, active)
    }

    #[test]
    fn replace_makes_the_target_equal_to_the_snapshot_and_leaves_no_staging() {
        let (t, root, staging, _active) = setup();
        staging.replace(&[], &root, &Displace::All).unwrap();
        drop(staging);
        assert_eq!(
            tree(t.path()),
            vec![
                ("a".into(), "new a".into()),
                ("dir".into(), "<dir>".into()),
                ("dir/sub".into(), "<dir>".into()),
                ("dir/sub/y".into(), "new y".into()),
            ]
        );
    }

    #[test]
    fn replace_of_included_paths_touches_nothing_else() {
        let (t, root, staging, _active) = setup();
        let paths = Displace::Paths(vec![vec!["dir".into(), "sub".into()]]);
        // Only dir/sub was restored.
        fs::remove_file(t.path().join(&staging.name).join("data/a")).unwrap();
        staging.replace(&[], &root, &paths).unwrap();
        drop(staging);
        let got = tree(t.path());
        assert!(got.contains(&("a".into(), "old a".into())), "{got:?}");
        assert!(
            got.contains(&("keep-me-not".into(), "old".into())),
            "{got:?}"
        );
        assert!(
            got.contains(&("dir/sub/y".into(), "new y".into())),
            "{got:?}"
        );
        assert!(!got.iter().any(|(p, _)| p == "dir/sub/x"), "{got:?}");
    }

    /// A kill between moving the originals aside and the commit: the next start puts them back.
    #[test]
    fn an_uncommitted_swap_is_rolled_back_by_recovery() {
        let (t, root, staging, _active) = setup();
        let before = {
            let mut b = tree(t.path());
            b.retain(|(p, _)| !p.starts_with(PREFIX));
            b
        };
        let entries = displaced(&[], &root, &Displace::All).unwrap();
        staging.write_journal(&[], &entries).unwrap();
        staging.move_aside(&root, &entries).unwrap();
        // The pod wrote something meanwhile, under an original name.
        fs::write(t.path().join("a"), "written during the swap").unwrap();
        let name = staging.name.clone();
        let owner_dir = safe_fs::open_root(&t.path().join(&name)).unwrap();
        // Another agent (another node's, or a second one on this node) sees a live owner.
        let seen = recover(&root, &Active::default());
        assert_eq!(
            seen[0].1.as_ref().unwrap(),
            &Recovered::InUseElsewhere(String::new()),
            "a live restore is left alone"
        );
        drop(owner_dir);
        die(staging); // the agent dies here
        let done = recover(&root, &Active::default());
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].1.as_ref().unwrap(), &Recovered::RolledBack);
        assert_eq!(tree(t.path()), before);
    }

    #[test]
    fn a_committed_swap_is_finished_by_recovery() {
        let (t, root, staging, _active) = setup();
        let entries = displaced(&[], &root, &Displace::All).unwrap();
        staging.write_journal(&[], &entries).unwrap();
        staging.move_aside(&root, &entries).unwrap();
        staging.commit().unwrap();
        die(staging);
        let done = recover(&root, &Active::default());
        assert_eq!(done[0].1.as_ref().unwrap(), &Recovered::Finished);
        let got = tree(t.path());
        assert!(got.contains(&("a".into(), "new a".into())), "{got:?}");
        assert!(
            !got.iter()
                .any(|(p, _)| p.starts_with(PREFIX) || p == "keep-me-not"),
            "{got:?}"
        );
    }

    #[test]
    fn recovery_leaves_active_staging_alone_and_removes_plain_leftovers() {
        let (t, root, staging, active) = setup();
        fs::create_dir_all(t.path().join(format!("{PREFIX}old/data/x"))).unwrap();
        std::os::unix::fs::symlink("/etc", t.path().join(format!("{PREFIX}link"))).unwrap();
        let mut done = recover(&root, &active);
        done.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(done.len(), 2, "{done:?}");
        assert!(
            done.iter()
                .all(|(_, r)| r.as_ref().ok() == Some(&Recovered::Removed))
        );
        assert!(
            t.path().join(&staging.name).is_dir(),
            "the running restore's staging stays"
        );
        assert!(Path::new("/etc/passwd").exists());
    }

    #[test]
    fn a_fifo_planted_as_the_journal_does_not_hang_recovery() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join(format!("{PREFIX}fifo"));
        fs::create_dir_all(&dir).unwrap();
        nix::unistd::mkfifo(&dir.join(JOURNAL), Mode::from_bits_truncate(0o600)).unwrap();
        let root = safe_fs::open_root(t.path()).unwrap();
        let done = recover(&root, &Active::default());
        assert!(done[0].1.is_err(), "{done:?}");
        assert!(dir.exists(), "left in place");
    }

    #[test]
    fn a_hostile_journal_cannot_reach_outside_the_volume() {
        let t = tempfile::tempdir().unwrap();
        let vol = t.path().join("vol");
        fs::create_dir_all(vol.join(format!("{PREFIX}evil/aside"))).unwrap();
        fs::write(t.path().join("outside"), "precious").unwrap();
        let bad = format!(
            "{JOURNAL_MAGIC}\ntarget {}\nentry {}\n",
            hex(b".."),
            hex(b"x")
        );
        fs::write(vol.join(format!("{PREFIX}evil/journal")), bad).unwrap();
        let root = safe_fs::open_root(&vol).unwrap();
        let done = recover(&root, &Active::default());
        assert!(done[0].1.is_err(), "{done:?}");
        assert_eq!(
            fs::read_to_string(t.path().join("outside")).unwrap(),
            "precious"
        );
        assert!(vol.join(format!("{PREFIX}evil")).exists(), "left in place");
        assert_eq!(Entry::decode(&hex(b"../x")), None);
        assert_eq!(Entry::decode(&hex(b"/etc")), None);
    }

    /// Includes `[a/b, a]` moved aside in that order: `a/b` went first (aside/0), then the rest of
    /// `a` (aside/1). Rolled back in reverse, `a` is back before `a/b` goes into it; forwards, putting
    /// `a` back replaced the `a` that `a/b` had just been put into, and the original `a/b` was lost.
    #[test]
    fn rollback_puts_nested_entries_back_in_reverse_order() {
        let t = tempfile::tempdir().unwrap();
        let (target, staging) = (t.path().join("target"), t.path().join("staging"));
        std::fs::create_dir_all(staging.join("aside/0")).unwrap();
        std::fs::write(staging.join("aside/0/orig"), b"original a/b").unwrap();
        std::fs::create_dir_all(staging.join("aside/1")).unwrap();
        std::fs::write(staging.join("aside/1/g"), b"original a/g").unwrap();
        std::fs::create_dir_all(&target).unwrap();
        let entries = [
            Entry {
                parent: vec!["a".into()],
                name: b"b".to_vec(),
            },
            Entry {
                parent: Vec::new(),
                name: b"a".to_vec(),
            },
        ];
        let (s, d) = (
            safe_fs::open_root(&staging).unwrap(),
            safe_fs::open_root(&target).unwrap(),
        );
        rollback(&s, &d, &entries).unwrap();
        assert_eq!(
            std::fs::read(target.join("a/b/orig")).unwrap(),
            b"original a/b"
        );
        assert_eq!(std::fs::read(target.join("a/g")).unwrap(), b"original a/g");
    }

    /// A journal larger than any the agent writes is refused whole, never acted on in part.
    #[test]
    fn an_oversized_journal_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(t.path().join(JOURNAL)).unwrap();
        f.set_len(JOURNAL_MAX as u64 + 1).unwrap();
        let dir = safe_fs::open_root(t.path()).unwrap();
        let e = read_small(&dir, JOURNAL).unwrap_err();
        assert!(e.to_string().contains("larger than any journal"), "{e}");
    }
}
