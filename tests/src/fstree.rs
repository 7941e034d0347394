//! Building test trees with every kind of entry restic must preserve, and comparing trees by content
//! and metadata.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

/// Writes `len` bytes of deterministic, incompressible data (xorshift) to `path`.
pub fn write_random(path: &Path, len: usize, seed: u64) {
    let mut f = std::io::BufWriter::new(fs::File::create(path).expect("create"));
    // Spread the seed first: nearby seeds (41, 42) must give unrelated streams, not the same one.
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut buf = vec![0u8; 1 << 16];
    let mut left = len;
    while left > 0 {
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        let n = left.min(buf.len());
        f.write_all(&buf[..n]).expect("write");
        left -= n;
    }
    f.flush().expect("flush");
}

/// The round-trip tree of the foundation issue: nested and empty dirs, symlinks (one dangling),
/// a 0-byte file, a name with spaces and non-ASCII, a large file, 0600 and 0755 files.
pub fn populate(root: &Path, big_len: usize) {
    fs::create_dir_all(root.join("dir/nested/deeper")).expect("mkdir");
    fs::create_dir_all(root.join("dir/empty-inner")).expect("mkdir");
    fs::create_dir_all(root.join("empty-dir")).expect("mkdir");
    fs::write(root.join("dir/nested/deeper/file.txt"), b"deep content\n").expect("write");
    fs::write(root.join("zero"), b"").expect("write");
    fs::write(
        root.join("with space ünïcødé ✓.txt"),
        "non-ascii names survive\n",
    )
    .expect("write");
    fs::write(root.join("secret"), b"only for the owner\n").expect("write");
    fs::set_permissions(root.join("secret"), fs::Permissions::from_mode(0o600)).expect("chmod");
    fs::write(root.join("run.sh"), b"#!/bin/sh\necho hi\n").expect("write");
    fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o755)).expect("chmod");
    symlink("dir/nested/deeper/file.txt", root.join("link-to-file")).expect("symlink");
    symlink("/nonexistent/target", root.join("dangling")).expect("symlink");
    write_random(&root.join("big.bin"), big_len, 42);
    // A fixed mtime in the past, so a restore that forgot mtimes cannot pass by luck.
    let t = fs::FileTimes::new()
        .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_600_000_000));
    fs::File::options()
        .write(true)
        .open(root.join("dir/nested/deeper/file.txt"))
        .expect("open")
        .set_times(t)
        .expect("times");
}

#[derive(Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: (i64, i64),
    pub link: Option<PathBuf>,
    /// FNV-1a of the content (regular files).
    pub digest: u64,
}

fn digest(path: &Path) -> u64 {
    use std::io::Read;
    let mut f = fs::File::open(path).expect("open");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            return h;
        }
        for b in &buf[..n] {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Every entry below `root` (root itself excluded), by relative path.
pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, Entry> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out, &[]);
    out
}

/// Like [`snapshot`], skipping top-level names in `skip`.
pub fn snapshot_except(root: &Path, skip: &[&str]) -> BTreeMap<PathBuf, Entry> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out, skip);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Entry>, skip: &[&str]) {
    for e in fs::read_dir(dir).expect("read_dir").flatten() {
        let path = e.path();
        let rel = path.strip_prefix(root).expect("prefix").to_path_buf();
        if dir == root && skip.iter().any(|s| rel == Path::new(s)) {
            continue;
        }
        let m = fs::symlink_metadata(&path).expect("lstat");
        let ft = m.file_type();
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_file() {
            "file"
        } else {
            "other"
        };
        out.insert(
            rel,
            Entry {
                kind,
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                size: if ft.is_file() { m.len() } else { 0 },
                mtime: (m.mtime(), m.mtime_nsec()),
                link: ft
                    .is_symlink()
                    .then(|| fs::read_link(&path).expect("readlink")),
                digest: if ft.is_file() { digest(&path) } else { 0 },
            },
        );
        if ft.is_dir() {
            walk(root, &path, out, skip);
        }
    }
}

/// Asserts two trees are equal, naming the first difference.
pub fn assert_same(expected: &BTreeMap<PathBuf, Entry>, actual: &BTreeMap<PathBuf, Entry>) {
    for (p, e) in expected {
        match actual.get(p) {
            None => panic!("missing after restore: {}", p.display()),
            Some(a) => assert_eq!(e, a, "differs: {}", p.display()),
        }
    }
    for p in actual.keys() {
        assert!(
            expected.contains_key(p),
            "unexpected after restore: {}",
            p.display()
        );
    }
}
