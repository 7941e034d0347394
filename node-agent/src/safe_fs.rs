//! Filesystem access that cannot be redirected out of a volume.
//!
//! A volume belongs to an application that may be hostile or just careless: it can plant a symlink
//! `data -> /etc` and wait for a restore to write `data/passwd`. So every path below a volume root is
//! walked component by component with `openat(O_NOFOLLOW)`, and restores never write into the target
//! directly: restic writes into a fresh staging directory, which is then merged into the target with
//! `renameat` relative to directory descriptors. A symlink in the target is replaced, never followed.
//!
//! Length: over 500 lines with its unit tests, which attack each primitive; the code is under 500.

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat, renameat};
use nix::sys::stat::{FileStat, Mode, SFlag, fchmod, fstatat, futimens, mkdirat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, unlinkat};

#[derive(Debug, thiserror::Error)]
pub enum SafeFsError {
    #[error("path {path:?} is not allowed: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error(
        "{path:?} crosses a symlink or a non-directory inside the volume; refusing to follow it"
    )]
    Escapes { path: String },
    #[error("{path:?}: {source}")]
    Io {
        path: String,
        #[source]
        source: Errno,
    },
    #[error(
        "cannot merge {path:?}: the snapshot has a file where the target has a non-empty directory"
    )]
    Conflict { path: String },
    #[error("{path:?} is more than {MAX_DEPTH} directories deep; left as it is")]
    TooDeep { path: String },
    #[error("{path:?}: stopped after {budget} entries; what is left stays for a later pass")]
    OverBudget { path: String, budget: u64 },
}

/// How deep a walk goes into a tree a tenant can shape (a pod can plant a chain of 200,000
/// directories). Walks are iterative, so the bound is about open descriptors (one or two per level,
/// under the 1024 a container's soft limit often is), not the stack. Deeper trees are refused, never
/// followed: a snapshot that deep is refused before a restore changes anything.
pub const MAX_DEPTH: usize = 256;

type Result<T> = std::result::Result<T, SafeFsError>;

/// Splits a user-supplied path inside a volume into plain components. Absolute paths, `..`, and NUL
/// are refused; `.` and empty components are dropped. "" and "/" are refused as absolute only when
/// they start with '/'.
pub fn relative_components(path: &str) -> Result<Vec<String>> {
    if path.starts_with('/') {
        return Err(SafeFsError::InvalidPath {
            path: path.into(),
            reason: "absolute paths are not allowed; give a path relative to the volume",
        });
    }
    if path.contains('\0') {
        return Err(SafeFsError::InvalidPath {
            path: path.into(),
            reason: "contains NUL",
        });
    }
    let mut out = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                return Err(SafeFsError::InvalidPath {
                    path: path.into(),
                    reason: "'..' is not allowed",
                });
            }
            c => out.push(c.to_string()),
        }
    }
    Ok(out)
}

/// Flags for opening a directory that must not be a link.
pub fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

/// Maps an errno to an error naming `path`.
pub fn io(path: impl Into<String>) -> impl FnOnce(Errno) -> SafeFsError {
    let path = path.into();
    move |source| SafeFsError::Io { path, source }
}

/// Opens `root` (which must be a real directory, not a symlink).
pub fn open_root(root: &Path) -> Result<OwnedFd> {
    nix::fcntl::open(root, dir_flags(), Mode::empty()).map_err(|e| match e {
        Errno::ELOOP | Errno::ENOTDIR => SafeFsError::Escapes {
            path: root.display().to_string(),
        },
        e => SafeFsError::Io {
            path: root.display().to_string(),
            source: e,
        },
    })
}

/// Opens the directory `components` below `root_fd`, never following a symlink; creates missing
/// directories (mode 0755) when `create` is set.
pub fn open_beneath(root_fd: &OwnedFd, components: &[String], create: bool) -> Result<OwnedFd> {
    let mut fd = nix::unistd::dup(root_fd).map_err(io("."))?;
    for (i, c) in components.iter().enumerate() {
        let shown = components[..=i].join("/");
        let next = match openat(&fd, c.as_str(), dir_flags(), Mode::empty()) {
            Ok(next) => next,
            Err(Errno::ENOENT) if create => {
                match mkdirat(&fd, c.as_str(), Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => {
                        return Err(SafeFsError::Io {
                            path: shown,
                            source: e,
                        });
                    }
                }
                openat(&fd, c.as_str(), dir_flags(), Mode::empty()).map_err(|e| match e {
                    Errno::ELOOP | Errno::ENOTDIR => SafeFsError::Escapes {
                        path: shown.clone(),
                    },
                    e => SafeFsError::Io {
                        path: shown.clone(),
                        source: e,
                    },
                })?
            }
            Err(Errno::ELOOP | Errno::ENOTDIR) => return Err(SafeFsError::Escapes { path: shown }),
            Err(e) => {
                return Err(SafeFsError::Io {
                    path: shown,
                    source: e,
                });
            }
        };
        fd = next;
    }
    Ok(fd)
}

/// Whether an entry exists at `components` below `root` (the root itself for none), looked up
/// without following any link: a symlink on the way reads as absent, one at the end is the entry.
pub fn exists_beneath(root: &OwnedFd, components: &[String]) -> bool {
    let Some((name, parent)) = components.split_last() else {
        return true;
    };
    open_beneath(root, parent, false).is_ok_and(|dir| {
        nix::sys::stat::fstatat(
            &dir,
            name.as_str(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .is_ok()
    })
}

/// Names in a directory, without "." and "..".
pub fn entries(dir: &OwnedFd, shown: &str) -> Result<Vec<Vec<u8>>> {
    let dup = nix::unistd::dup(dir).map_err(io(shown))?;
    let mut d = nix::dir::Dir::from_fd(dup).map_err(io(shown))?;
    let mut names = Vec::new();
    for e in d.iter() {
        let e = e.map_err(io(shown))?;
        let name = e.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    }
    Ok(names)
}

/// Whether the directory has no entries.
pub fn is_empty(dir: &OwnedFd) -> Result<bool> {
    Ok(entries(dir, ".")?.is_empty())
}

fn kind(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT
}

/// What a merge moved into the target.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MergeStats {
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
}

/// A directory being walked: its descriptor, its path for messages, and the names of its
/// subdirectories still to visit.
struct Level {
    fd: OwnedFd,
    path: String,
    pending: Vec<Vec<u8>>,
}

/// Counts the tree below `dir` (files, directories, bytes of regular files), without following
/// links. Iterative; at most [`MAX_DEPTH`] levels.
pub fn count_tree(dir: &OwnedFd, stats: &mut MergeStats) -> Result<()> {
    let mut stack = vec![Level {
        fd: nix::unistd::dup(dir).map_err(io("."))?,
        path: ".".into(),
        pending: Vec::new(),
    }];
    let mut fresh = true;
    loop {
        let depth = stack.len();
        let Some(top) = stack.last_mut() else { break };
        if fresh {
            for name in entries(&top.fd, &top.path)? {
                let n = OsStr::from_bytes(&name);
                let st = fstatat(&top.fd, n, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
                    .map_err(io(format!("{}/{}", top.path, n.to_string_lossy())))?;
                if kind(&st) == SFlag::S_IFDIR {
                    stats.dirs += 1;
                    top.pending.push(name);
                } else {
                    stats.files += 1;
                    if kind(&st) == SFlag::S_IFREG {
                        stats.bytes += u64::try_from(st.st_size).unwrap_or(0);
                    }
                }
            }
        }
        let Some(name) = top.pending.pop() else {
            stack.pop();
            fresh = false;
            continue;
        };
        let n = OsStr::from_bytes(&name);
        let path = format!("{}/{}", top.path, n.to_string_lossy());
        if depth >= MAX_DEPTH {
            return Err(SafeFsError::TooDeep { path });
        }
        let fd = openat(&top.fd, n, dir_flags(), Mode::empty()).map_err(io(&path))?;
        stack.push(Level {
            fd,
            path,
            pending: Vec::new(),
        });
        fresh = true;
    }
    Ok(())
}

/// Where a committed `Replace` puts what stands in the snapshot's way: a non-empty directory where
/// the snapshot has a file, or a name whose type changed while the merge ran (an application that
/// recreates its directories, or a pod that races the swap on purpose). The snapshot wins; what it
/// displaces goes to this directory (named `c<n>`), which the caller removes at the end.
pub struct Displacer {
    dir: OwnedFd,
    next: std::cell::Cell<u64>,
}

impl Displacer {
    pub fn new(dir: OwnedFd) -> Self {
        Self {
            dir,
            next: std::cell::Cell::new(0),
        }
    }

    /// Moves `name` of `parent` out of the way.
    fn take(&self, parent: &OwnedFd, name: &OsStr, path: &str) -> Result<()> {
        let n = self.next.get();
        self.next.set(n + 1);
        renameat(parent, name, &self.dir, format!("c{n}").as_str()).map_err(io(path))
    }
}

/// Renames `n` from `src` to `dst`; with a displacer, what took the name meanwhile in a way a rename
/// cannot replace (a directory where a file goes, a non-empty directory) is displaced first.
fn move_in(
    src: &OwnedFd,
    dst: &OwnedFd,
    n: &OsStr,
    path: &str,
    displacer: Option<&Displacer>,
) -> Result<()> {
    match (renameat(src, n, dst, n), displacer) {
        (Ok(()), _) => Ok(()),
        (Err(Errno::EEXIST | Errno::ENOTEMPTY | Errno::EISDIR | Errno::ENOTDIR), Some(d)) => {
            d.take(dst, n, path)?;
            renameat(src, n, dst, n).map_err(io(path))
        }
        (Err(e), _) => Err(SafeFsError::Io {
            path: path.into(),
            source: e,
        }),
    }
}

/// Moves everything from `src` into `dst`: entries missing in `dst` are renamed in whole; directories
/// present in both are merged recursively and get the snapshot's mode, owner and times; anything else
/// in `dst` with the same name (file, symlink) is replaced atomically. `src` ends up empty.
///
/// A non-empty directory where the snapshot has a file is a [`SafeFsError::Conflict`] without a
/// `displacer` (a `Merge`: nothing of the target is deleted); with one, it is displaced.
pub fn merge_into(
    src: &OwnedFd,
    dst: &OwnedFd,
    shown: &str,
    displacer: Option<&Displacer>,
) -> Result<()> {
    merge_level(src, dst, shown, displacer, 0)
}

/// One level of [`merge_into`]. Recursive, but never deeper than [`MAX_DEPTH`]: a restore counts
/// its staged tree first (refusing one that deep before anything moves), and recovery stops at the
/// bound on a tree a tenant planted.
fn merge_level(
    src: &OwnedFd,
    dst: &OwnedFd,
    shown: &str,
    displacer: Option<&Displacer>,
    depth: usize,
) -> Result<()> {
    if depth >= MAX_DEPTH {
        return Err(SafeFsError::TooDeep { path: shown.into() });
    }
    for name in entries(src, shown)? {
        let n = OsStr::from_bytes(&name);
        let path = format!("{shown}/{}", n.to_string_lossy());
        let s = fstatat(src, n, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW).map_err(io(&path))?;
        let d = match fstatat(dst, n, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(d) => Some(d),
            Err(Errno::ENOENT) => None,
            Err(e) => return Err(SafeFsError::Io { path, source: e }),
        };
        match (kind(&s) == SFlag::S_IFDIR, d.as_ref().map(kind)) {
            (true, Some(SFlag::S_IFDIR)) => {
                let sub_src = openat(src, n, dir_flags(), Mode::empty()).map_err(io(&path))?;
                let sub_dst = match (openat(dst, n, dir_flags(), Mode::empty()), displacer) {
                    (Ok(d), _) => d,
                    // No longer a directory (changed since the stat): the snapshot's goes in whole.
                    (Err(Errno::ENOTDIR | Errno::ELOOP | Errno::ENOENT), Some(d)) => {
                        if fstatat(dst, n, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW).is_ok() {
                            d.take(dst, n, &path)?;
                        }
                        move_in(src, dst, n, &path, displacer)?;
                        continue;
                    }
                    (Err(e), _) => return Err(SafeFsError::Io { path, source: e }),
                };
                merge_level(&sub_src, &sub_dst, &path, displacer, depth + 1)?;
                copy_dir_metadata(&s, &sub_dst, &path)?;
                unlinkat(src, n, UnlinkatFlags::RemoveDir).map_err(io(&path))?;
            }
            (false, Some(SFlag::S_IFDIR)) => {
                // Only an empty directory may give way to a file (unless displaced).
                match (unlinkat(dst, n, UnlinkatFlags::RemoveDir), displacer) {
                    (Ok(()) | Err(Errno::ENOENT), _) => move_in(src, dst, n, &path, displacer)?,
                    (Err(Errno::ENOTEMPTY | Errno::EEXIST), None) => {
                        return Err(SafeFsError::Conflict { path });
                    }
                    (Err(Errno::ENOTEMPTY | Errno::EEXIST | Errno::ENOTDIR), Some(d)) => {
                        d.take(dst, n, &path)?;
                        move_in(src, dst, n, &path, displacer)?;
                    }
                    (Err(e), _) => return Err(SafeFsError::Io { path, source: e }),
                }
            }
            (true, Some(_)) => {
                // A file or symlink where the snapshot has a directory: the snapshot wins.
                match unlinkat(dst, n, UnlinkatFlags::NoRemoveDir) {
                    Ok(()) | Err(Errno::ENOENT) => {}
                    // It became a directory meanwhile.
                    Err(Errno::EISDIR) if displacer.is_some() => {}
                    Err(e) => return Err(SafeFsError::Io { path, source: e }),
                }
                move_in(src, dst, n, &path, displacer)?;
            }
            (_, _) => move_in(src, dst, n, &path, displacer)?,
        }
    }
    Ok(())
}

/// Removes `name` below `dir` and everything in it, never following symlinks; absent is fine.
/// Iterative, at most [`MAX_DEPTH`] levels deep.
pub fn remove_tree_at(dir: &OwnedFd, name: &OsStr) -> Result<()> {
    remove_tree_within(dir, name, u64::MAX)
}

/// One directory being removed: a descriptor to unlink in, one read stream over its entries (kept
/// open, never restarted: rereading a directory of millions of entries from its start after each
/// batch would make the removal quadratic), its name in the level above and its path for messages.
struct Removing {
    fd: OwnedFd,
    names: nix::dir::OwningIter,
    name: Vec<u8>,
    path: String,
}

impl Removing {
    fn open(parent: &OwnedFd, name: &[u8], path: String) -> Result<Self> {
        let fd = openat(parent, OsStr::from_bytes(name), dir_flags(), Mode::empty())
            .map_err(io(&path))?;
        let names = nix::dir::Dir::from_fd(nix::unistd::dup(&fd).map_err(io(&path))?)
            .map_err(io(&path))?
            .into_iter();
        Ok(Self {
            fd,
            names,
            name: name.to_vec(),
            path,
        })
    }
}

/// [`remove_tree_at`] that stops after removing `budget` entries ([`SafeFsError::OverBudget`]),
/// leaving the rest: a recovery pass over a planted tree of millions of entries ends, and the next
/// pass goes on.
pub fn remove_tree_within(dir: &OwnedFd, name: &OsStr, budget: u64) -> Result<()> {
    let shown = name.to_string_lossy().into_owned();
    let st = match fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(io(&shown)(e)),
    };
    if kind(&st) != SFlag::S_IFDIR {
        return unlinkat(dir, name, UnlinkatFlags::NoRemoveDir).map_err(io(&shown));
    }
    let mut left = budget;
    let mut stack = vec![Removing::open(dir, name.as_bytes(), shown)?];
    loop {
        let depth = stack.len();
        let Some(top) = stack.last_mut() else { break };
        let next = top.names.next();
        if let Some(entry) = next {
            let entry = entry.map_err(io(top.path.as_str()))?;
            let n = entry.file_name().to_bytes();
            if n == b"." || n == b".." {
                continue;
            }
            let child = format!("{}/{}", top.path, String::from_utf8_lossy(n));
            if left == 0 {
                return Err(SafeFsError::OverBudget {
                    path: child,
                    budget,
                });
            }
            match unlinkat(&top.fd, OsStr::from_bytes(n), UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => left -= 1,
                Err(Errno::EISDIR) => {
                    if depth >= MAX_DEPTH {
                        return Err(SafeFsError::TooDeep { path: child });
                    }
                    let sub = Removing::open(&top.fd, n, child)?;
                    stack.push(sub);
                }
                Err(e) => {
                    return Err(SafeFsError::Io {
                        path: child,
                        source: e,
                    });
                }
            }
            continue;
        }
        // Read to its end: remove the directory itself from the level above.
        let Some(done) = stack.pop() else { break };
        let parent = stack.last().map_or(dir, |r| &r.fd);
        match unlinkat(
            parent,
            OsStr::from_bytes(&done.name),
            UnlinkatFlags::RemoveDir,
        ) {
            Ok(()) | Err(Errno::ENOENT) => left = left.saturating_sub(1),
            // Something was added while it was read: read it again (within the budget).
            Err(Errno::ENOTEMPTY | Errno::EEXIST) => {
                let reopened = Removing::open(parent, &done.name, done.path)?;
                stack.push(reopened);
            }
            Err(e) => {
                return Err(SafeFsError::Io {
                    path: done.path,
                    source: e,
                });
            }
        }
    }
    Ok(())
}

/// Gives `dst` the mode, owner and times recorded in `src` (the staged copy of the snapshot's directory).
pub fn copy_dir_metadata(src: &FileStat, dst: impl AsFd, shown: &str) -> Result<()> {
    let dst = dst.as_fd();
    fchown(
        dst,
        Some(Uid::from_raw(src.st_uid)),
        Some(Gid::from_raw(src.st_gid)),
    )
    .map_err(io(shown))?;
    fchmod(dst, Mode::from_bits_truncate(src.st_mode & 0o7777)).map_err(io(shown))?;
    let atime = TimeSpec::new(src.st_atime, src.st_atime_nsec);
    let mtime = TimeSpec::new(src.st_mtime, src.st_mtime_nsec);
    futimens(dst, &atime, &mtime).map_err(io(shown))?;
    Ok(())
}

/// `fstat` of a directory descriptor.
pub fn stat_fd(fd: &OwnedFd, shown: &str) -> Result<FileStat> {
    nix::sys::stat::fstat(fd).map_err(io(shown))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exists_beneath_follows_no_link() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("d")).unwrap();
        std::fs::write(t.path().join("d/f"), b"x").unwrap();
        std::os::unix::fs::symlink("d", t.path().join("via")).unwrap();
        let root = open_root(t.path()).unwrap();
        let parts = |p: &str| relative_components(p).unwrap();
        assert!(exists_beneath(&root, &parts("d/f")));
        assert!(
            exists_beneath(&root, &parts("via")),
            "the link itself is an entry"
        );
        assert!(
            !exists_beneath(&root, &parts("via/f")),
            "not through the link"
        );
        assert!(!exists_beneath(&root, &parts("d/missing")));
        assert!(exists_beneath(&root, &[]));
    }
    use std::fs;
    use std::os::unix::fs::symlink;

    #[test]
    fn components_refuse_escapes() {
        assert_eq!(relative_components("a/./b//c").unwrap(), ["a", "b", "c"]);
        assert!(relative_components("").unwrap().is_empty());
        for bad in ["/etc", "../x", "a/../../b", "a/\0"] {
            assert!(relative_components(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn open_beneath_refuses_symlinks_and_creates_dirs() {
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = t.path().join("vol");
        fs::create_dir(&root).unwrap();
        symlink(outside.path(), root.join("link")).unwrap();
        fs::write(root.join("file"), b"x").unwrap();
        let fd = open_root(&root).unwrap();
        assert!(matches!(
            open_beneath(&fd, &["link".into(), "sub".into()], true),
            Err(SafeFsError::Escapes { .. })
        ));
        assert!(matches!(
            open_beneath(&fd, &["file".into()], true),
            Err(SafeFsError::Escapes { .. })
        ));
        assert!(
            fs::read_dir(outside.path()).unwrap().next().is_none(),
            "nothing created outside"
        );
        open_beneath(&fd, &["a".into(), "b".into()], true).unwrap();
        assert!(root.join("a/b").is_dir());
        assert!(open_beneath(&fd, &["missing".into()], false).is_err());
        assert!(matches!(
            open_root(&root.join("link")),
            Err(SafeFsError::Escapes { .. })
        ));
    }

    /// Walks over a tree deeper than the bound stop there, iteratively; removal within a budget
    /// stops after it, and the next call goes on.
    #[test]
    fn walks_are_bounded_in_depth_and_entries() {
        let t = tempfile::tempdir().unwrap();
        let mut deep = t.path().join("deep");
        for _ in 0..MAX_DEPTH + 5 {
            deep.push("d");
        }
        fs::create_dir_all(&deep).unwrap();
        let root = open_root(t.path()).unwrap();
        let e = remove_tree_at(&root, OsStr::new("deep")).unwrap_err();
        assert!(matches!(e, SafeFsError::TooDeep { .. }), "{e}");
        let mut stats = MergeStats::default();
        let e = count_tree(&root, &mut stats).unwrap_err();
        assert!(matches!(e, SafeFsError::TooDeep { .. }), "{e}");

        fs::create_dir_all(t.path().join("many/sub")).unwrap();
        for i in 0..10 {
            fs::write(t.path().join(format!("many/f{i}")), b"").unwrap();
            fs::write(t.path().join(format!("many/sub/g{i}")), b"").unwrap();
        }
        let e = remove_tree_within(&root, OsStr::new("many"), 15).unwrap_err();
        assert!(
            matches!(e, SafeFsError::OverBudget { budget: 15, .. }),
            "{e}"
        );
        remove_tree_within(&root, OsStr::new("many"), 15).unwrap();
        assert!(!t.path().join("many").exists());
    }

    /// After a Replace's commit the snapshot wins: a non-empty directory (planted where the snapshot
    /// has a file) is displaced, not a reason to stop half-way.
    #[test]
    fn with_a_displacer_the_snapshot_wins_conflicts() {
        let t = tempfile::tempdir().unwrap();
        let (src, dst, aside) = (t.path().join("s"), t.path().join("d"), t.path().join("a"));
        fs::create_dir_all(&src).unwrap();
        fs::create_dir_all(dst.join("config.yaml")).unwrap();
        fs::write(dst.join("config.yaml/x"), b"planted").unwrap();
        fs::write(src.join("config.yaml"), b"from the snapshot").unwrap();
        fs::create_dir_all(&aside).unwrap();
        let d = Displacer::new(open_root(&aside).unwrap());
        merge_into(
            &open_root(&src).unwrap(),
            &open_root(&dst).unwrap(),
            ".",
            Some(&d),
        )
        .unwrap();
        assert_eq!(
            fs::read(dst.join("config.yaml")).unwrap(),
            b"from the snapshot"
        );
        assert_eq!(fs::read(aside.join("c0/x")).unwrap(), b"planted");
    }

    #[test]
    fn merge_replaces_planted_symlinks_instead_of_following_them() {
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        let dst = t.path().join("dst");
        fs::create_dir_all(src.join("etc")).unwrap();
        fs::write(src.join("etc/passwd"), b"restored").unwrap();
        fs::write(src.join("top"), b"new").unwrap();
        fs::create_dir_all(src.join("keep/deeper")).unwrap();
        fs::write(src.join("keep/deeper/f"), b"f").unwrap();
        fs::create_dir_all(dst.join("keep")).unwrap();
        fs::write(dst.join("keep/untouched"), b"old").unwrap();
        fs::write(dst.join("top"), b"old").unwrap();
        // The application planted a symlink where the snapshot has a directory.
        symlink(outside.path(), dst.join("etc")).unwrap();

        let s = open_root(&src).unwrap();
        let d = open_root(&dst).unwrap();
        let mut stats = MergeStats::default();
        count_tree(&s, &mut stats).unwrap();
        assert_eq!(
            stats,
            MergeStats {
                files: 3,
                dirs: 3,
                bytes: 8 + 3 + 1
            }
        );
        merge_into(&s, &d, ".", None).unwrap();

        assert!(
            fs::read_dir(outside.path()).unwrap().next().is_none(),
            "nothing written outside"
        );
        assert!(fs::symlink_metadata(dst.join("etc")).unwrap().is_dir());
        assert_eq!(fs::read(dst.join("etc/passwd")).unwrap(), b"restored");
        assert_eq!(fs::read(dst.join("top")).unwrap(), b"new");
        assert_eq!(fs::read(dst.join("keep/untouched")).unwrap(), b"old");
        assert_eq!(fs::read(dst.join("keep/deeper/f")).unwrap(), b"f");
        assert!(is_empty(&s).unwrap());
    }

    #[test]
    fn merge_refuses_to_drop_a_non_empty_directory_for_a_file() {
        let t = tempfile::tempdir().unwrap();
        let (src, dst) = (t.path().join("s"), t.path().join("d"));
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("x"), b"file").unwrap();
        fs::create_dir_all(dst.join("x")).unwrap();
        fs::write(dst.join("x/inner"), b"precious").unwrap();
        let r = merge_into(
            &open_root(&src).unwrap(),
            &open_root(&dst).unwrap(),
            ".",
            None,
        );
        assert!(matches!(r, Err(SafeFsError::Conflict { .. })));
        assert_eq!(fs::read(dst.join("x/inner")).unwrap(), b"precious");
    }
}
