//! Whether a volume directory is still what the kubelet mounted. A CSI volume being torn down is an
//! empty directory where the mount was: backing that up would record an empty (or partial) tree as
//! if the data were gone.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::fcntl::{OFlag, openat};
use nix::sys::stat::Mode;

/// Whether the directory open at `dir` is the root of a mount: its mount id differs from its
/// parent's. Both come from `/proc/self/fdinfo`, so the answer is about the directory we hold open,
/// not about whatever has its name now.
pub fn is_mount_root(dir: &OwnedFd) -> std::io::Result<bool> {
    let parent = openat(
        dir,
        "..",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    Ok(mount_id(dir)? != mount_id(&parent)?)
}

fn mount_id(fd: &OwnedFd) -> std::io::Result<u64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    info.lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other("no mnt_id in fdinfo"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_directory_is_not_a_mount_root_and_proc_is() {
        let t = tempfile::tempdir().unwrap();
        let fd = crate::safe_fs::open_root(t.path()).unwrap();
        assert!(!is_mount_root(&fd).unwrap());
        let proc = crate::safe_fs::open_root(std::path::Path::new("/proc")).unwrap();
        assert!(is_mount_root(&proc).unwrap());
    }
}
