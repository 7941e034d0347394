//! The sandboxes the agent runs restic in (see `restic_wrap::sandbox` for the mechanism).
//!
//! - A backup sees its volume read-only at [`VOLUME`], its repository's own cache directory, a
//!   temporary directory of its own, and a local repository's directory. It keeps only
//!   CAP_DAC_READ_SEARCH, to read every file of the volume whatever its owner and mode.
//! - A restore sees only the staging directory it writes into, read-write at [`RESTORE_TARGET`], and
//!   a local repository's directory read-only. It runs without restic's cache and, for a local
//!   repository, without a lock, so nothing a planted symlink could redirect a write to is
//!   writable: a symlink inside staging resolves inside the sandbox, where every other path is
//!   read-only or absent. It keeps the capabilities that restoring ownership and modes needs.
//!
//! Volumes are bound through `/proc/<agent>/fd/<n>` of a directory the agent opened without following
//! links, so renaming or swapping the directory's name cannot change what is bound.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use restic_wrap::{Repository, Sandbox};

use crate::context::AgentContext;
use crate::error::AgentError;

/// Where a backup's volume appears inside its sandbox (and so in the snapshot's `paths`).
pub const VOLUME: &str = "/data";
/// Where a restore's staging directory appears inside its sandbox.
pub const RESTORE_TARGET: &str = "/restore";

/// Reading every file of a volume, whatever its owner and mode.
pub const BACKUP_CAPABILITIES: &[&str] = &["CAP_DAC_READ_SEARCH"];
/// Writing files as their owners had them: ownership (CHOWN), modes and times of files we do not own
/// (FOWNER), set-id bits kept through chown (FSETID), and directories whose mode we already set
/// (DAC_OVERRIDE, DAC_READ_SEARCH). No CAP_MKNOD: device nodes from a snapshot are not created.
pub const RESTORE_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
];

/// The path that names the directory open at `fd`, whatever has its name now.
pub fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        fd.as_raw_fd()
    ))
}

fn create_dir(dir: &Path) -> Result<(), AgentError> {
    std::fs::create_dir_all(dir).map_err(|source| AgentError::Io {
        context: format!("creating {}", dir.display()),
        source,
    })
}

/// The sandbox of a backup of the volume open at `volume`.
pub fn for_backup(
    ctx: &AgentContext,
    volume: &OwnedFd,
    repo: &Repository,
    tmp: &OperationTmp,
) -> Result<Sandbox, AgentError> {
    Ok(writer(ctx, repo, tmp)?
        .read_only(fd_path(volume), VOLUME)
        .capabilities(BACKUP_CAPABILITIES)
        .chdir(VOLUME))
}

/// What every backup's restic writes: its cache, the repository (if local) and a temporary
/// directory; nothing else, and no capabilities until the caller grants some.
fn writer(
    ctx: &AgentContext,
    repo: &Repository,
    tmp: &OperationTmp,
) -> Result<Sandbox, AgentError> {
    let cache = ctx.cache_for(repo);
    create_dir(&cache)?;
    let mut sb = ctx
        .sandbox()
        .read_write(&cache, &cache)
        .capabilities(&[])
        .tmp(tmp.path());
    if let Some(local) = AgentContext::local_repository(repo) {
        sb = sb.read_write(&local, &local);
    }
    Ok(sb)
}

/// The sandbox of a backup from restic's stdin (a command's output): no volume, no capabilities;
/// only the cache, the repository (if local) and a temporary directory.
pub fn for_stream(
    ctx: &AgentContext,
    repo: &Repository,
    tmp: &OperationTmp,
) -> Result<Sandbox, AgentError> {
    Ok(writer(ctx, repo, tmp)?.chdir("/"))
}

/// restic's global options in a sandbox where its cache is not writable (restores, dry runs,
/// dumps): no cache, and no lock in a local repository, which is bound read-only there.
pub fn read_only_globals(restic: &restic_wrap::Restic) -> restic_wrap::options::GlobalOptions {
    restic_wrap::options::GlobalOptions {
        cache_dir: None,
        no_cache: true,
        no_lock: AgentContext::local_repository(restic.repository()).is_some(),
        ..restic.global().clone()
    }
}

/// The sandbox of a restore into the staging directory open at `staging`.
pub fn for_restore(ctx: &AgentContext, staging: &OwnedFd, repo: &Repository) -> Sandbox {
    let mut sb = ctx
        .sandbox()
        .read_write(fd_path(staging), RESTORE_TARGET)
        .capabilities(RESTORE_CAPABILITIES);
    if let Some(local) = AgentContext::local_repository(repo) {
        sb = sb.read_only(&local, &local);
    }
    sb
}

/// The sandbox of a restore's dry run: the target read-only at [`RESTORE_TARGET`] (absent when
/// the target directory does not exist yet), the repository (read-only when local), and the read
/// capability of a backup, since restic compares the target's files with the snapshot's.
pub fn for_preview(ctx: &AgentContext, target: Option<&OwnedFd>, repo: &Repository) -> Sandbox {
    let mut sb = ctx.sandbox().capabilities(BACKUP_CAPABILITIES);
    if let Some(target) = target {
        sb = sb.read_only(fd_path(target), RESTORE_TARGET);
    }
    if let Some(local) = AgentContext::local_repository(repo) {
        sb = sb.read_only(&local, &local);
    }
    sb
}

/// The sandbox of a `restic dump` to stdout: the repository (read-only when local), nothing else
/// and no capabilities.
pub fn for_dump(ctx: &AgentContext, repo: &Repository) -> Sandbox {
    let mut sb = ctx.sandbox();
    if let Some(local) = AgentContext::local_repository(repo) {
        sb = sb.read_only(&local, &local);
    }
    sb
}

/// A temporary directory for one operation's restic (its pack files), removed afterwards. It lives
/// on the agent's cache volume rather than in memory.
pub struct OperationTmp(tempfile::TempDir);

impl OperationTmp {
    pub fn create(cache_dir: &Path) -> Result<Self, AgentError> {
        let parent = cache_dir.join(".tmp");
        create_dir(&parent)?;
        tempfile::Builder::new()
            .prefix("op-")
            .tempdir_in(&parent)
            .map(OperationTmp)
            .map_err(|source| AgentError::Io {
                context: format!("creating a temporary directory in {}", parent.display()),
                source,
            })
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}
