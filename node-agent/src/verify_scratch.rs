//! A drill's scratch space: a directory under the agent's cache (`<cache>/.verify/drill-*`, mode
//! 0700: a restored tree may hold set-uid files and device nodes), registered while its drill runs,
//! removed when it ends; leftovers of a killed agent are swept by the next drill. Space is reserved
//! against the cache filesystem's free space, less what `--verify-keep-free-percent` keeps for the
//! node and less what the other drills on this node reserved.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::AgentError;

/// The scratch directories' parent, under the cache directory (a dot name: the cache sweep
/// leaves it alone).
const SCRATCH_PARENT: &str = ".verify";

/// Bytes reserved by the scratch directories of the drills running on this node.
static RESERVED: Mutex<u64> = Mutex::new(0);

/// A share of the scratch filesystem, given back on drop.
pub(crate) struct Reservation(u64);

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Ok(mut r) = RESERVED.lock() {
            *r = r.saturating_sub(self.0);
        }
    }
}

/// Reserves `needed` bytes of the filesystem of `dir`, keeping `keep_percent` of it free for
/// everything else the node writes there.
pub(crate) fn reserve(
    dir: &Path,
    keep_percent: u8,
    needed: u64,
    snapshot: &str,
) -> Result<Reservation, AgentError> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(|e| AgentError::Io {
        context: format!("reading the free space of {}", dir.display()),
        source: e.into(),
    })?;
    let size = st.blocks().saturating_mul(st.fragment_size());
    let free = st.blocks_available().saturating_mul(st.fragment_size());
    let keep = size / 100 * u64::from(keep_percent);
    let with_margin = needed.saturating_add(needed / 20).saturating_add(1 << 20);
    let mut reserved = RESERVED.lock().map_err(|_| AgentError::Io {
        context: "reserving scratch space".into(),
        source: std::io::Error::other("a drill panicked while holding the reservation"),
    })?;
    let usable = free.saturating_sub(keep).saturating_sub(*reserved);
    if with_margin > usable {
        return Err(AgentError::InvalidArgument(format!(
            "the drill of snapshot {snapshot} needs {} of scratch space and the agent's cache filesystem ({}) has {} usable ({} free, {} kept free for the node by --verify-keep-free-percent, {} taken by other drills); nothing was written. Set a sample bound (verify.sampleBytes) below that, or give the agent's cache more room",
            human(with_margin),
            dir.display(),
            human(usable),
            human(free),
            human(keep),
            human(*reserved)
        )));
    }
    *reserved += with_margin;
    Ok(Reservation(with_margin))
}

/// A drill's scratch directory (mode 0700, owned by the agent), removed on drop.
pub(crate) struct Scratch {
    pub(crate) dir: PathBuf,
}

impl Scratch {
    fn create(cache_dir: &Path) -> Result<Self, AgentError> {
        let parent = cache_dir.join(SCRATCH_PARENT);
        let io = |context: String| move |source| AgentError::Io { context, source };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&parent)
            .map_err(io(format!("creating {}", parent.display())))?;
        // Only root may enter: a restored tree may hold set-uid files and device nodes.
        std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o700))
            .map_err(io(format!("restricting {}", parent.display())))?;
        let dir = tempfile::Builder::new()
            .prefix("drill-")
            .tempdir_in(&parent)
            .map_err(io(format!(
                "creating a scratch directory in {}",
                parent.display()
            )))?
            .keep();
        let data = dir.join("data");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&data)
            .map_err(io(format!("creating {}", data.display())))?;
        Ok(Self { dir })
    }

    pub(crate) fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub(crate) fn include_file(&self) -> PathBuf {
        self.dir.join("include")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // The agent's own directory (no tenant writes here); remove_dir_all never follows links.
        if let Err(e) = std::fs::remove_dir_all(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %self.dir.display(), error = %e, "could not remove a drill's scratch directory; the next drill on this node removes it");
        }
    }
}

/// Removes scratch directories no running drill owns (an agent killed mid-drill leaves one).
fn sweep_scratch(cache_dir: &Path, running: &[PathBuf]) {
    let parent = cache_dir.join(SCRATCH_PARENT);
    for entry in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
        let path = entry.path();
        if !running.contains(&path) {
            match std::fs::remove_dir_all(&path) {
                Ok(()) => {
                    tracing::info!(dir = %path.display(), "removed a scratch directory left by an earlier drill")
                }
                Err(e) => {
                    tracing::warn!(dir = %path.display(), error = %e, "could not remove an old scratch directory")
                }
            }
        }
    }
}

/// The scratch directories of the drills running in this process.
static RUNNING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// A scratch directory registered as running (the sweep leaves it alone) for its lifetime.
pub(crate) struct Running(PathBuf);

impl Running {
    /// Creates a scratch directory and registers it in one step under the registry's lock (so no
    /// other drill's sweep can take it for a leftover), then sweeps the leftovers.
    pub(crate) fn start(cache_dir: &Path) -> Result<(Scratch, Running), AgentError> {
        let mut running = RUNNING.lock().map_err(|_| AgentError::Io {
            context: "registering a scratch directory".into(),
            source: std::io::Error::other("a drill panicked while holding the registry"),
        })?;
        let scratch = Scratch::create(cache_dir)?;
        running.push(scratch.dir.clone());
        sweep_scratch(cache_dir, &running);
        let dir = scratch.dir.clone();
        Ok((scratch, Running(dir)))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(mut running) = RUNNING.lock() {
            running.retain(|p| *p != self.0);
        }
    }
}

fn human(bytes: u64) -> String {
    crate::restore::human(bytes)
}
