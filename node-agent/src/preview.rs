//! A restore's dry run: what it would add, change and delete in its target. restic compares the
//! snapshot with the target, which is bound read-only into its sandbox, and reports entry by
//! entry (`restore --dry-run -vv`); this module turns those lines into a bounded preview. Nothing
//! is written, and memory stays bounded whatever the volume holds: counts, and the first paths of
//! each kind.

use std::os::fd::OwnedFd;

use nix::errno::Errno;
use restic_wrap::json::RestoreItem;
use restic_wrap::options::RestoreOptions;
use restic_wrap::stream::PreviewLine;
use stowage_proto::v1::{Phase, PreviewSet, RestorePreview};
use tokio_util::sync::CancellationToken;

use crate::context::{AgentContext, ProgressSink};
use crate::error::AgentError;
use crate::safe_fs::{self, SafeFsError};
use crate::{follow, sandbox, staging};

/// What a dry run compares: a snapshot (its full id), the include paths as restic filters, and
/// whether it previews a Replace (which deletes what the snapshot lacks).
pub struct Request<'a> {
    pub snapshot: &'a str,
    pub includes: &'a [String],
    /// The same include paths as components: a restore refuses an include the snapshot lacks,
    /// and so does its preview.
    pub include_parts: &'a [Vec<String>],
    pub replace: bool,
}

/// Runs restic's dry run against the target `target_parts` below the volume's `root`, in a
/// sandbox where the target is read-only; returns the preview. Nothing in the volume is written
/// or created (a missing target directory previews as all added).
pub async fn run(
    ctx: &AgentContext,
    restic: &restic_wrap::Restic,
    root: &OwnedFd,
    target_parts: &[String],
    req: Request<'_>,
    progress: &ProgressSink,
    cancel: &CancellationToken,
) -> Result<RestorePreview, AgentError> {
    let target = match safe_fs::open_beneath(root, target_parts, false) {
        Ok(fd) => Some(fd),
        Err(SafeFsError::Io {
            source: Errno::ENOENT,
            ..
        }) => None,
        Err(e) => return Err(e.into()),
    };
    // Nothing in the sandbox is writable.
    let sandboxed = restic
        .clone()
        .with_global(sandbox::read_only_globals(restic))
        .with_sandbox(sandbox::for_preview(
            ctx,
            target.as_ref(),
            restic.repository(),
        ));
    let opts = RestoreOptions {
        snapshot: req.snapshot.to_string(),
        target: sandbox::RESTORE_TARGET.into(),
        includes: req.includes.to_vec(),
        dry_run: true,
        delete: req.replace,
        ..Default::default()
    };
    progress.phase(Phase::Running, "comparing the snapshot with the target");
    let at_root = target_parts.is_empty();
    let tally = sandboxed
        .with_lock_retry(|| async {
            let mut tally = Tally::new(target.as_ref(), sandbox::RESTORE_TARGET, at_root)
                .with_includes(req.include_parts);
            let mut run = sandboxed.restore_preview(&opts)?;
            follow::follow(&mut run, cancel, "restore", |line| match line {
                PreviewLine::Item(item) => tally.record(&item),
                PreviewLine::Progress(s) => progress.send(follow::restore_progress(&s)),
            })
            .await?;
            follow::finish(run.finish(), cancel, "restore").await?;
            Ok(tally)
        })
        .await
        .map_err(|e| match e {
            restic_wrap::Error::Cancelled { .. } => AgentError::Cancelled,
            e => e.into(),
        })?;
    if let Some(missing) = tally.missing_include() {
        return Err(AgentError::IncludeNotInSnapshot {
            path: missing,
            snapshot: req.snapshot.chars().take(8).collect(),
        });
    }
    Ok(tally.finish())
}

/// The paths a preview lists per kind; the counts cover the rest.
pub const MAX_PATHS: usize = 100;
/// A listed path longer than this is cut (a tenant chooses its names).
const MAX_PATH_BYTES: usize = 512;

/// The preview being gathered from restic's lines.
pub struct Tally<'a> {
    /// The target directory, when it exists (else everything is added).
    target: Option<&'a OwnedFd>,
    /// The path restic sees the target at, inside its sandbox: `deleted` items are under it.
    sandbox_target: &'a str,
    /// Whether the target is the volume's root, where a Replace keeps `lost+found` and staging
    /// directories.
    at_root: bool,
    preview: RestorePreview,
    /// Each include path (`/a/b`) and whether restic reported anything at or below it.
    includes: Vec<(String, bool)>,
}

impl<'a> Tally<'a> {
    pub fn new(target: Option<&'a OwnedFd>, sandbox_target: &'a str, at_root: bool) -> Self {
        Self {
            target,
            sandbox_target,
            at_root,
            preview: RestorePreview {
                added: Some(PreviewSet::default()),
                changed: Some(PreviewSet::default()),
                deleted: Some(PreviewSet::default()),
                unchanged: 0,
            },
            includes: Vec::new(),
        }
    }

    /// Watches for the include paths (as components) in what restic reports.
    pub fn with_includes(mut self, include_parts: &[Vec<String>]) -> Self {
        self.includes = include_parts
            .iter()
            .map(|p| (format!("/{}", p.join("/")), false))
            .collect();
        self
    }

    /// The first include path nothing was reported at or below, if any.
    pub fn missing_include(&self) -> Option<String> {
        self.includes
            .iter()
            .find(|(_, seen)| !seen)
            .map(|(p, _)| p.trim_start_matches('/').to_string())
    }

    /// One `verbose_status` line of restic's dry run.
    pub fn record(&mut self, item: &RestoreItem) {
        if item.action != "deleted" {
            for (path, seen) in self.includes.iter_mut().filter(|(_, seen)| !seen) {
                let p = item.item.as_str();
                *seen = p == path
                    || p.strip_prefix(path.as_str())
                        .is_some_and(|r| r.starts_with('/'));
            }
        }
        match item.action.as_str() {
            // restic "restores" what the target lacks, and also rewrites every existing directory
            // and symlink (their metadata): only a missing entry is an addition.
            "restored" if self.exists(&item.item) => self.preview.unchanged += 1,
            "restored" => add(&mut self.preview.added, &item.item, item.size),
            "updated" => add(&mut self.preview.changed, &item.item, item.size),
            "unchanged" => self.preview.unchanged += 1,
            "deleted" => {
                let Some(rel) = item.item.strip_prefix(self.sandbox_target) else {
                    tracing::warn!(item = %bounded(&item.item), "restic would delete a path outside the target; not counted");
                    return;
                };
                if self.at_root && kept_by_replace(rel) {
                    return;
                }
                let rel = if rel.is_empty() { "/" } else { rel };
                add(&mut self.preview.deleted, rel, item.size);
            }
            other => tracing::debug!(action = %other, "unknown restore action"),
        }
    }

    pub fn finish(self) -> RestorePreview {
        self.preview
    }

    /// Whether the target has an entry at `path` (a path inside the snapshot, `/a/b`), looked up
    /// without following any link.
    fn exists(&self, path: &str) -> bool {
        let Some(target) = self.target else {
            return false;
        };
        safe_fs::relative_components(path.trim_start_matches('/'))
            .is_ok_and(|parts| safe_fs::exists_beneath(target, &parts))
    }
}

/// What a Replace at a volume's root leaves in place: `lost+found` and restore staging
/// directories (see [`staging`]).
fn kept_by_replace(rel: &str) -> bool {
    let first = rel
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or_default();
    first.as_bytes() == staging::LOST_FOUND || first.starts_with(staging::PREFIX)
}

fn add(set: &mut Option<PreviewSet>, path: &str, size: u64) {
    let set = set.get_or_insert_with(PreviewSet::default);
    set.entries += 1;
    set.bytes = set.bytes.saturating_add(size);
    if set.paths.len() < MAX_PATHS {
        set.paths.push(bounded(path));
    }
}

/// `path` cut to [`MAX_PATH_BYTES`] at a character boundary, marked when cut.
fn bounded(path: &str) -> String {
    if path.len() <= MAX_PATH_BYTES {
        return path.to_string();
    }
    let mut end = MAX_PATH_BYTES;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &path[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(action: &str, path: &str, size: u64) -> RestoreItem {
        RestoreItem {
            action: action.into(),
            item: path.into(),
            size,
        }
    }

    #[test]
    fn restic_lines_become_added_changed_deleted_and_unchanged() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        std::fs::write(dir.path().join("b"), b"old").expect("write");
        std::os::unix::fs::symlink("b", dir.path().join("link")).expect("symlink");
        let target = safe_fs::open_root(dir.path()).expect("open");
        let mut t = Tally::new(Some(&target), "/restore", true);
        for i in [
            item("restored", "/a", 2),
            item("updated", "/b", 5),
            item("unchanged", "/sub/c", 2),
            item("restored", "/sub", 0),
            item("restored", "/link", 0),
            item("deleted", "/restore/new", 0),
            item("deleted", "/restore/lost+found", 0),
            item("deleted", "/restore/.stowage-restore-x-1/data", 0),
            item("deleted", "/elsewhere", 0),
        ] {
            t.record(&i);
        }
        let p = t.finish();
        let set = |s: &Option<PreviewSet>| {
            let s = s.clone().unwrap_or_default();
            (s.entries, s.bytes, s.paths)
        };
        assert_eq!(set(&p.added), (1, 2, vec!["/a".to_string()]));
        assert_eq!(set(&p.changed), (1, 5, vec!["/b".to_string()]));
        assert_eq!(set(&p.deleted), (1, 0, vec!["/new".to_string()]));
        // /sub/c, and the existing directory and symlink restic rewrites.
        assert_eq!(p.unchanged, 3);
    }

    #[test]
    fn a_missing_target_makes_everything_added_and_lists_stay_bounded() {
        let mut t = Tally::new(None, "/restore", false);
        for n in 0..(MAX_PATHS as u64 + 50) {
            t.record(&item("restored", &format!("/f{n}"), 10));
        }
        t.record(&item("restored", &format!("/{}", "é".repeat(400)), 1));
        let added = t.finish().added.unwrap_or_default();
        assert_eq!(added.entries, MAX_PATHS as u64 + 51);
        assert_eq!(added.bytes, (MAX_PATHS as u64 + 50) * 10 + 1);
        assert_eq!(added.paths.len(), MAX_PATHS);
        assert!(bounded(&"é".repeat(400)).len() <= MAX_PATH_BYTES + '…'.len_utf8());
    }

    #[test]
    fn an_include_the_snapshot_lacks_is_named() {
        let parts = vec![
            vec!["db".to_string()],
            vec!["logs".to_string(), "x".to_string()],
        ];
        let mut t = Tally::new(None, "/restore", false).with_includes(&parts);
        t.record(&item("restored", "/db/base/1", 3));
        t.record(&item("restored", "/logsx", 3));
        assert_eq!(t.missing_include().as_deref(), Some("logs/x"));
        t.record(&item("unchanged", "/logs/x", 3));
        assert_eq!(t.missing_include(), None);
    }

    #[test]
    fn below_the_root_nothing_is_kept_by_name() {
        let mut t = Tally::new(None, "/restore", false);
        t.record(&item("deleted", "/restore/lost+found", 0));
        assert_eq!(t.finish().deleted.unwrap_or_default().entries, 1);
    }
}
