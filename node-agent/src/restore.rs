//! Restoring a snapshot into a volume on this node, in place, while its pod keeps running.
//!
//! restic writes into a fresh staging directory inside the target volume (same filesystem, so the
//! final move is a rename, not a copy), bound into its sandbox through `/proc/<agent>/fd/<n>`: the
//! path names the directory we created, whatever is renamed or planted at its name meanwhile, and
//! inside the sandbox nothing else is writable ([`crate::sandbox`]). The staged tree is then merged
//! into the target with descriptor-relative renames that never follow symlinks ([`safe_fs`]), or,
//! for `Replace`, swapped in through a journal that a killed agent rolls back ([`staging`]).
//!
//! Length: one restore from request to reply (checks, staging, restic, merge or swap, result); the pieces it calls live in their own modules.

use std::time::Instant;

use nix::errno::Errno;
use restic_wrap::json::Snapshot;
use restic_wrap::options::{RestoreOptions, SnapshotsOptions};
use stowage_proto::v1::{
    Phase, Progress, RestoreEvent, RestoreMode, RestoreRequest, RestoreResult, restore_event::Event,
};
use tokio_util::sync::CancellationToken;

use crate::context::{AgentContext, ProgressSink};
use crate::error::AgentError;
use crate::identity::Identity;
use crate::inventory::VolumeEntry;
use crate::memory::Operation;
use crate::safe_fs::{self, MergeStats, SafeFsError};
use crate::staging::{self, Displace, Staging};
use crate::{follow, repository, sandbox};

pub fn progress_event(p: Progress) -> RestoreEvent {
    RestoreEvent {
        event: Some(Event::Progress(p)),
    }
}

/// A validated request whose target volume is on this node.
pub struct RestorePlan {
    req: RestoreRequest,
    source: Identity,
    repo: restic_wrap::Repository,
    includes: Vec<String>,
    /// The include paths as components, for `Replace`.
    include_parts: Vec<Vec<String>>,
    target_parts: Vec<String>,
    mode: RestoreMode,
    volume: VolumeEntry,
}

/// Checks the request and finds the target volume; errors here are answered before any work starts.
pub fn plan(ctx: &AgentContext, req: RestoreRequest) -> Result<RestorePlan, AgentError> {
    let source = Identity::from_proto(req.source.as_ref(), false)?;
    let repo = repository::from_proto(req.repository.as_ref(), &ctx.local_roots)?;
    let mut include_parts = Vec::new();
    for inc in &req.include {
        let parts = safe_fs::relative_components(inc)?;
        if parts.is_empty() {
            return Err(AgentError::InvalidArgument(format!(
                "include path {inc:?} names nothing"
            )));
        }
        include_parts.push(parts);
    }
    let include_parts = outermost(include_parts);
    // Literal paths, as users mean them and as `Replace` displaces them: restic's glob characters
    // are escaped, so `/data*` restores `data*`, not everything starting with `data`.
    let includes = include_parts
        .iter()
        .map(|p| format!("/{}", escape_glob(&p.join("/"))))
        .collect();
    let target_parts = safe_fs::relative_components(&req.target_path)?;
    let mode = RestoreMode::try_from(req.mode).unwrap_or(RestoreMode::Unspecified);
    let tref = req
        .target
        .clone()
        .ok_or_else(|| AgentError::InvalidArgument("target is required".into()))?;
    let volume = ctx.volume(&tref)?;
    Ok(RestorePlan {
        req,
        source,
        repo,
        includes,
        include_parts,
        target_parts,
        mode,
        volume,
    })
}

pub async fn execute(
    ctx: &AgentContext,
    plan: RestorePlan,
    progress: ProgressSink,
    cancel: CancellationToken,
) -> Result<RestoreResult, AgentError> {
    let RestorePlan {
        req,
        source,
        repo,
        includes,
        include_parts,
        target_parts,
        mode,
        volume,
    } = plan;
    let repo_spec = req.repository.as_ref();
    // The share of the namespace restored into (the Restore's own), else the source's.
    let charged = if req.target_namespace.is_empty() {
        source.namespace.clone()
    } else {
        req.target_namespace.clone()
    };
    // restic holds the snapshot's tree while it restores: its entries count in the memory
    // estimate when this agent knows them (the coordinator resolved the snapshot through it, the
    // usual case); otherwise only the index does.
    let whose = Whose::volume(&source);
    let tree_mib = ctx
        .known_snapshots
        .get(&repo.location(), &req.snapshot, &whose.tags)
        .and_then(|s| s.summary)
        .map_or(0, |s| {
            crate::memory::restore_tree_mib(s.entries(), req.dry_run)
        });
    let _slot = ctx
        .slot_with(
            Operation::Restore,
            tree_mib,
            &charged,
            &repo,
            &progress,
            &cancel,
        )
        .await?;
    let started = Instant::now();
    let restic = ctx.restic(repo, repo_spec, Some(progress.clone()));

    let snapshot = tokio::select! {
        s = resolve_snapshot(ctx, &restic, &whose, &req.snapshot) => s?,
        _ = cancel.cancelled() => return Err(AgentError::Cancelled),
    };

    // Open the target without following links; IntoEmpty refuses before anything is written.
    let root = safe_fs::open_root(&volume.data_dir)?;
    check_mounted(&volume, &root)?;
    // A dry run writes nothing: not even the clean-up of an earlier agent's leftovers.
    if !req.dry_run {
        // Blocking work (a planted leftover can be a large tree), under this volume's lock only.
        let (active, shown) = (ctx.staging.clone(), volume.data_dir.display().to_string());
        let root = nix::unistd::dup(&root).map_err(|e| AgentError::Io {
            context: format!("opening {shown}"),
            source: e.into(),
        })?;
        let left_to_owner =
            tokio::task::spawn_blocking(move || recover_leftovers(&active, &root, &shown))
                .await
                .map_err(|e| AgentError::Io {
                    context: "recovering leftover staging directories".into(),
                    source: std::io::Error::other(e),
                })?;
        // A staging directory with a fresh heartbeat is another agent's restore into this volume,
        // or the leftover of an agent that stopped seconds ago, whose originals may be aside. A
        // restore now would take the target as it is for the original, and that leftover's rollback
        // would later undo part of it: refuse, until it is finished or stale.
        if left_to_owner {
            return Err(AgentError::VolumeBusy {
                dir: volume.data_dir.display().to_string(),
                stale_after: crate::staging::HEARTBEAT_STALE.as_secs(),
            });
        }
    }
    // Every restore stages the whole snapshot inside the volume first: it must fit beside what is
    // there, with a margin, or a restore could fill the disk under a running database. (With
    // include paths only part of it is staged; restic's summary does not say how much.)
    if includes.is_empty()
        && let Some(needed) = snapshot.summary.as_ref().map(|s| s.total_bytes_processed)
    {
        let free = free_bytes(&root).map_err(|source| AgentError::Io {
            context: format!("reading the free space of {}", volume.data_dir.display()),
            source,
        })?;
        let with_margin = needed.saturating_add(needed / 20).saturating_add(1 << 20);
        if free < with_margin {
            return Err(AgentError::NoSpace {
                snapshot: snapshot.short_id.clone(),
                needed: human(needed),
                free: human(free),
            });
        }
    }
    if mode == RestoreMode::IntoEmpty {
        // A fresh ext4 volume's root holds `lost+found`, which mkfs made and fsck needs: a volume
        // with nothing else is empty.
        let at_root = target_parts.is_empty();
        match safe_fs::open_beneath(&root, &target_parts, false) {
            Ok(existing)
                if safe_fs::entries(&existing, ".")?
                    .iter()
                    .any(|n| !(at_root && n.as_slice() == staging::LOST_FOUND)) =>
            {
                return Err(AgentError::TargetNotEmpty {
                    dir: volume
                        .data_dir
                        .join(target_parts.join("/"))
                        .display()
                        .to_string(),
                });
            }
            Ok(_)
            | Err(SafeFsError::Io {
                source: Errno::ENOENT,
                ..
            }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if req.dry_run {
        let preview = crate::preview::run(
            ctx,
            &restic,
            &root,
            &target_parts,
            crate::preview::Request {
                snapshot: &snapshot.id,
                includes: &includes,
                include_parts: &include_parts,
                replace: mode == RestoreMode::Replace,
            },
            &progress,
            &cancel,
        )
        .await?;
        tracing::info!(
            run = %req.run_id, snapshot = %snapshot.id,
            added = preview.added.as_ref().map_or(0, |s| s.entries),
            changed = preview.changed.as_ref().map_or(0, |s| s.entries),
            deleted = preview.deleted.as_ref().map_or(0, |s| s.entries),
            "restore previewed (dry run: nothing written)"
        );
        return Ok(RestoreResult {
            snapshot_id: snapshot.id,
            duration_seconds: started.elapsed().as_secs_f64(),
            target_dir: volume
                .data_dir
                .join(target_parts.join("/"))
                .display()
                .to_string(),
            preview: Some(preview),
            ..Default::default()
        });
    }
    let target = safe_fs::open_beneath(&root, &target_parts, true)?;
    let target_dir = volume.data_dir.join(target_parts.join("/"));

    let staging = Staging::create(&root, &req.run_id, &ctx.staging)?;
    let staged_data = staging.data()?;
    progress.phase(
        Phase::Running,
        format!("restoring snapshot {}", snapshot.short_id),
    );
    tracing::info!(
        run = %req.run_id, snapshot = %snapshot.id, target = %target_dir.display(),
        includes = ?includes, "restore started"
    );
    let opts = RestoreOptions {
        snapshot: snapshot.id.clone(),
        target: sandbox::RESTORE_TARGET.into(),
        includes,
        sparse: true,
        ..Default::default()
    };
    // Nothing writable in the sandbox but staging.
    let sandboxed = restic
        .clone()
        .with_global(sandbox::read_only_globals(&restic))
        .with_sandbox(sandbox::for_restore(ctx, &staged_data, restic.repository()));
    let restored = sandboxed
        .with_lock_retry(|| run_restore(ctx, &sandboxed, &opts, &progress, &cancel))
        .await;
    match restored {
        Ok(_) => {}
        Err(restic_wrap::Error::Cancelled { .. }) => return Err(AgentError::Cancelled),
        Err(e) => return Err(e.into()),
    }

    // An include that matches nothing in the snapshot must not become "0 files restored" (nor, in
    // Replace, a deletion of that path).
    for parts in &include_parts {
        if !safe_fs::exists_beneath(&staged_data, parts) {
            return Err(AgentError::IncludeNotInSnapshot {
                path: parts.join("/"),
                snapshot: snapshot.short_id.clone(),
            });
        }
    }
    // The pod may have gone away while restic ran: check again just before anything moves.
    check_mounted(&volume, &root)?;
    progress.phase(Phase::Finalizing, "moving restored files into place");
    let mut stats = MergeStats::default();
    safe_fs::count_tree(&staged_data, &mut stats)?;
    let swap = tokio::task::spawn_blocking(move || {
        let r = match mode {
            RestoreMode::Replace => {
                let displace = if include_parts.is_empty() {
                    Displace::All
                } else {
                    Displace::Paths(include_parts)
                };
                staging.replace(&target_parts, &target, &displace)
            }
            _ => staging.merge(&target),
        };
        drop(staging);
        r
    });
    swap.await.map_err(|e| AgentError::Io {
        context: "moving restored files into place".into(),
        source: std::io::Error::other(e),
    })??;

    let duration = started.elapsed().as_secs_f64();
    ctx.metrics.restore_duration.observe(duration);
    tracing::info!(
        run = %req.run_id, snapshot = %snapshot.id, files = stats.files, bytes = stats.bytes,
        duration_secs = duration, "restore finished"
    );
    Ok(RestoreResult {
        snapshot_id: snapshot.id,
        files_restored: stats.files,
        dirs_restored: stats.dirs,
        bytes_restored: stats.bytes,
        duration_seconds: duration,
        target_dir: target_dir.display().to_string(),
        ..Default::default()
    })
}

/// The include paths without duplicates and without paths inside another include: `[a/b, a]` is
/// `[a]` (the whole of `a` is restored, and displaced once).
fn outermost(mut paths: Vec<Vec<String>>) -> Vec<Vec<String>> {
    paths.sort();
    paths.dedup();
    let all = paths.clone();
    paths.retain(|p| !all.iter().any(|q| q.len() < p.len() && p.starts_with(q)));
    paths
}

/// A literal path as a restic filter pattern (`*`, `?`, `[` and `\` are special there).
pub(crate) fn escape_glob(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if matches!(c, '*' | '?' | '[' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `statvfs` of the directory: bytes an unprivileged writer may still use. The agent runs as root,
/// whose reserve (ext4's 5%) is meant for the system, not for a restore into a tenant's volume.
fn free_bytes(dir: &std::os::fd::OwnedFd) -> std::io::Result<u64> {
    let st = nix::sys::statvfs::fstatvfs(dir).map_err(std::io::Error::from)?;
    Ok(st.blocks_available().saturating_mul(st.fragment_size()))
}

pub(crate) fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A CSI volume's directory must still be what the kubelet mounted; otherwise it is a directory on
/// the node's own disk, and a restore would fill that and report success.
fn check_mounted(volume: &VolumeEntry, root: &std::os::fd::OwnedFd) -> Result<(), AgentError> {
    if volume.plugin == crate::inventory::scan::CSI_PLUGIN
        && !crate::mountpoint::is_mount_root(root).map_err(|source| AgentError::Io {
            context: format!("checking that {} is mounted", volume.data_dir.display()),
            source,
        })?
    {
        return Err(AgentError::RestoreTargetNotMounted {
            dir: volume.data_dir.display().to_string(),
        });
    }
    Ok(())
}

/// One `restic restore` in the sandbox, its JSON progress turned into Progress events and metrics.
async fn run_restore(
    ctx: &AgentContext,
    restic: &restic_wrap::Restic,
    opts: &RestoreOptions,
    progress: &ProgressSink,
    cancel: &CancellationToken,
) -> restic_wrap::Result<restic_wrap::stream::RestoreOutput> {
    let mut run = restic.restore(opts)?;
    tracing::debug!(pid = ?run.pid(), "restic restore spawned");
    let mut bytes_seen = 0u64;
    follow::follow(&mut run, cancel, "restore", |s| {
        ctx.metrics
            .restore_bytes
            .inc_by(s.bytes_restored.saturating_sub(bytes_seen));
        bytes_seen = bytes_seen.max(s.bytes_restored);
        progress.send(follow::restore_progress(&s));
    })
    .await?;
    let out = follow::finish(run.finish(), cancel, "restore").await?;
    ctx.metrics
        .restore_bytes
        .inc_by(out.summary.bytes_restored.saturating_sub(bytes_seen));
    Ok(out)
}

/// Whose snapshots a restore may read: the tags that select them, the restic host they carry, and
/// a name for messages.
pub struct Whose {
    pub tags: Vec<String>,
    pub host: String,
    pub shown: String,
}

impl Whose {
    pub fn volume(identity: &Identity) -> Self {
        Self {
            tags: identity.selector_tags(),
            host: identity.host(),
            shown: format!("{}/{}", identity.namespace, identity.pvc),
        }
    }

    pub fn command(identity: &crate::identity::CommandIdentity) -> Self {
        Self {
            tags: identity.selector_tags(),
            host: identity.host(),
            shown: format!(
                "the backup command of {}/{}/{} (container {})",
                identity.namespace, identity.owner_kind, identity.owner_name, identity.container
            ),
        }
    }
}

/// Finds the snapshot among the identity's own: "latest" (or empty) is the newest of that identity
/// only; an id must belong to it.
pub async fn resolve_snapshot(
    ctx: &AgentContext,
    restic: &restic_wrap::Restic,
    whose: &Whose,
    wanted: &str,
) -> Result<Snapshot, AgentError> {
    let location = restic.repository().location();
    // The coordinator sends the full id it chose from a listing through this agent.
    if let Some(s) = ctx.known_snapshots.get(&location, wanted, &whose.tags) {
        tracing::debug!(snapshot = %s.id, "snapshot ownership known from an earlier listing");
        return Ok(s);
    }
    let own = restic
        .snapshots(&SnapshotsOptions {
            tags: whose.tags.clone(),
            ..Default::default()
        })
        .await?;
    ctx.known_snapshots.remember(&location, &own);
    let not_found = || AgentError::SnapshotNotFound {
        snapshot: wanted.to_string(),
        whose: whose.shown.clone(),
    };
    if wanted.is_empty() || wanted == "latest" {
        // A partial snapshot lacks files (its backup could not read them): `latest` is the newest
        // complete one. A partial snapshot is restored only when named by id.
        let complete = own.into_iter().filter(|s| {
            !s.tags
                .iter()
                .any(|t| t == stowage_api::contract::TAG_PARTIAL)
        });
        return restic_wrap::json::Snapshot::newest(complete).ok_or_else(not_found);
    }
    if wanted.len() < 8 || !wanted.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(AgentError::InvalidArgument(format!(
            "snapshot {wanted:?} must be \"latest\" or a snapshot id (at least 8 hex digits)"
        )));
    }
    if let Some(s) = own.into_iter().find(|s| s.id.starts_with(wanted)) {
        return Ok(s);
    }
    // Say whether it exists elsewhere, so a wrong PVC is not mistaken for a missing snapshot.
    let any = restic
        .snapshots(&SnapshotsOptions {
            ids: vec![wanted.to_string()],
            ..Default::default()
        })
        .await
        .unwrap_or_default();
    match any.into_iter().next() {
        Some(other) => Err(AgentError::SnapshotOfOtherVolume {
            snapshot: other.short_id.clone(),
            expected: whose.host.clone(),
            found: other.hostname,
        }),
        None => Err(not_found()),
    }
}

/// Finishes or undoes what a killed agent left in this volume (restores running here are skipped).
/// One recovery pass over a volume's root (logged). Returns whether a staging directory was left
/// to a live owner, so that a start-up pass can look again once that heartbeat may have stopped.
pub fn recover_leftovers(
    active: &staging::Active,
    root: &std::os::fd::OwnedFd,
    shown: &str,
) -> bool {
    let mut left_to_owner = false;
    for (name, r) in staging::recover(root, active) {
        match r {
            Ok(staging::Recovered::InUseElsewhere(node)) => {
                left_to_owner = true;
                tracing::info!(volume = %shown, staging = %name, owner = %node, "a restore staging directory whose agent is alive (its heartbeat is fresh): left alone")
            }
            Ok(done) => {
                tracing::info!(volume = %shown, staging = %name, outcome = ?done, "cleaned up a restore staging directory left by an earlier agent")
            }
            Err(e) => {
                tracing::warn!(volume = %shown, staging = %name, error = %e, "could not clean up a restore staging directory")
            }
        }
    }
    left_to_owner
}
