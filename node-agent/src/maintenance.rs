//! Repository-wide maintenance: `restic check`, and retention per volume identity followed by
//! `restic prune`. Both take restic's exclusive lock, so the lock policy (wait, stale removal) applies.

use std::time::Instant;

use restic_wrap::json::{ForgetGroup, Snapshot};
use restic_wrap::options::{CheckOptions, ForgetOptions, PruneOptions, Retention};
use stowage_api::contract::TAG_PARTIAL;
use stowage_proto::v1::{
    CheckRequest, IdentityRetention, MaintenanceEvent, MaintenanceResult, Phase, Progress,
    PruneRequest, RepositoryFigures, RetentionPolicy, maintenance_event::Event,
};
use tokio_util::sync::CancellationToken;

use crate::context::{AgentContext, ProgressSink};
use crate::error::AgentError;
use crate::identity::{TAG_NAMESPACE, TAG_PVC, is_k8s_name};
use crate::memory::Operation;
use crate::{inspect, repository};

/// restic's reports can be long; the result carries the end, where the verdict is.
const REPORT_TAIL: usize = 4096;

pub fn progress_event(p: Progress) -> MaintenanceEvent {
    MaintenanceEvent {
        event: Some(Event::Progress(p)),
    }
}

pub fn result_event(r: MaintenanceResult) -> MaintenanceEvent {
    MaintenanceEvent {
        event: Some(Event::Result(r)),
    }
}

/// A validated maintenance request.
pub enum MaintenancePlan {
    Check {
        repo: restic_wrap::Repository,
        spec: stowage_proto::v1::Repository,
        opts: CheckOptions,
    },
    Prune {
        repo: restic_wrap::Repository,
        spec: stowage_proto::v1::Repository,
        /// The namespace whose snapshots it considers (and whose share of the node it uses).
        namespace: String,
        forget: Box<ForgetOptions>,
        prune: PruneOptions,
    },
}

impl MaintenancePlan {
    pub fn kind(&self) -> &'static str {
        match self {
            MaintenancePlan::Check { .. } => "check",
            MaintenancePlan::Prune { .. } => "prune",
        }
    }
}

pub fn plan_check(
    req: CheckRequest,
    local_roots: &[std::path::PathBuf],
) -> Result<MaintenancePlan, AgentError> {
    let repo = repository::from_proto(req.repository.as_ref(), local_roots)?;
    let subset = req.read_data_subset.trim();
    if !subset.is_empty() && !valid_subset(subset) {
        return Err(AgentError::InvalidArgument(format!(
            "read_data_subset {subset:?}: use a percentage (\"5%\") or n/t (\"1/10\")"
        )));
    }
    Ok(MaintenancePlan::Check {
        repo,
        spec: req.repository.unwrap_or_default(),
        opts: CheckOptions {
            read_data_subset: (!subset.is_empty()).then(|| subset.to_string()),
        },
    })
}

fn valid_subset(s: &str) -> bool {
    let num = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    match (s.strip_suffix('%'), s.split_once('/')) {
        (Some(p), _) => num(p),
        (None, Some((n, t))) => num(n) && num(t),
        _ => false,
    }
}

pub fn plan_prune(
    req: PruneRequest,
    local_roots: &[std::path::PathBuf],
) -> Result<MaintenancePlan, AgentError> {
    let repo = repository::from_proto(req.repository.as_ref(), local_roots)?;
    if !is_k8s_name(&req.namespace) {
        return Err(AgentError::InvalidArgument(format!(
            "namespace {:?} is not a valid Kubernetes name; retention is always scoped to one namespace",
            req.namespace
        )));
    }
    let retention = retention_from_proto(req.retention.unwrap_or_default());
    if retention.is_empty() {
        // restic forget without a policy keeps everything, but an empty policy is almost certainly
        // a mistake that would otherwise look like a successful prune.
        return Err(AgentError::InvalidArgument(
            "retention: set at least one keep rule".into(),
        ));
    }
    Ok(MaintenancePlan::Prune {
        repo,
        spec: req.repository.unwrap_or_default(),
        namespace: req.namespace.clone(),
        forget: Box::new(ForgetOptions {
            retention,
            tags: vec![format!("{TAG_NAMESPACE}={}", req.namespace)],
            // The restic host is `<namespace>/<pvc>`: one group per volume identity, so each PVC
            // keeps its own newest N and retention never mixes PVCs.
            group_by: Some("host".into()),
            dry_run: req.dry_run,
            ..Default::default()
        }),
        prune: PruneOptions {
            dry_run: req.dry_run,
            ..Default::default()
        },
    })
}

/// Busy volumes routinely make partial snapshots (restic exit 3: a file vanished while read). A
/// policy such as `keepLast: 3` would count three newer partial snapshots and forget the last
/// complete one, leaving `latest` restores nothing complete to restore. So each identity's newest
/// complete snapshot is always kept.
fn keep_newest_complete(g: &mut ForgetGroup) {
    let partial = |s: &Snapshot| s.tags.iter().any(|t| t == TAG_PARTIAL);
    let newest = Snapshot::newest(
        g.keep
            .iter()
            .chain(g.remove.iter().flatten())
            .filter(|s| !partial(s))
            .cloned(),
    );
    let Some(newest) = newest else { return };
    if let Some(remove) = &mut g.remove
        && let Some(i) = remove.iter().position(|s| s.id == newest.id)
    {
        g.keep.push(remove.remove(i));
    }
}

fn retention_from_proto(p: RetentionPolicy) -> Retention {
    let n = |v: u32| (v > 0).then_some(v);
    Retention {
        keep_last: n(p.keep_last),
        keep_hourly: n(p.keep_hourly),
        keep_daily: n(p.keep_daily),
        keep_weekly: n(p.keep_weekly),
        keep_monthly: n(p.keep_monthly),
        keep_yearly: n(p.keep_yearly),
        keep_within: (!p.keep_within.is_empty()).then_some(p.keep_within),
        keep_tags: p.keep_tags,
    }
}

fn tail(s: &str) -> String {
    let start = s.len().saturating_sub(REPORT_TAIL);
    let start = (start..=s.len())
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(s.len());
    s[start..].trim().to_string()
}

/// The repository's figures after the operation; `None` (and a warning) if restic cannot say.
async fn figures(restic: &restic_wrap::Restic) -> Option<RepositoryFigures> {
    inspect::figures(restic)
        .await
        .inspect_err(
            |e| tracing::warn!(error = %e, "reading the repository's figures (restic stats)"),
        )
        .ok()
}

/// "total prune:  4 blobs / 1.181 KiB" in restic's prune report, in bytes (0 if absent).
fn freed_bytes(report: &str) -> u64 {
    report
        .lines()
        .find_map(|l| l.trim().strip_prefix("total prune:"))
        .and_then(|rest| rest.split_once('/'))
        .and_then(|(_, size)| parse_size(size.trim()))
        .unwrap_or(0)
}

/// restic's human sizes: "0 B", "1.181 KiB", "3.075 MiB", "2.000 GiB", "1.5 TiB".
fn parse_size(s: &str) -> Option<u64> {
    let (num, unit) = s.split_once(' ')?;
    let n: f64 = num.parse().ok()?;
    let scale = match unit.trim() {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "TiB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some((n * scale).round() as u64)
}

pub async fn execute(
    ctx: &AgentContext,
    plan: MaintenancePlan,
    progress: ProgressSink,
    cancel: CancellationToken,
) -> Result<MaintenanceResult, AgentError> {
    let (op, repo) = match &plan {
        MaintenancePlan::Check { repo, .. } => (Operation::Check, repo),
        MaintenancePlan::Prune { repo, .. } => (Operation::Prune, repo),
    };
    // A prune considers one namespace's snapshots; a check belongs to none (the empty share).
    let namespace = match &plan {
        MaintenancePlan::Prune { namespace, .. } => namespace.clone(),
        MaintenancePlan::Check { .. } => String::new(),
    };
    let _slot = ctx.slot(op, &namespace, repo, &progress, &cancel).await?;
    // The location only (credentials never appear in it): which repository this agent maintained.
    tracing::info!(operation = ?op, repository = %repo.location(), namespace = %namespace, "maintenance started");
    let started = Instant::now();
    let work = async {
        match plan {
            MaintenancePlan::Check { repo, spec, opts } => {
                let restic = ctx.restic(repo, Some(&spec), Some(progress.clone()));
                restic.ensure_repository(false).await?;
                progress.phase(Phase::Running, "restic check");
                let report = restic.check(&opts).await?;
                Ok::<_, AgentError>(MaintenanceResult {
                    report: tail(&report),
                    figures: figures(&restic).await,
                    ..Default::default()
                })
            }
            MaintenancePlan::Prune {
                repo,
                spec,
                forget,
                prune,
                ..
            } => {
                let restic = ctx.restic(repo, Some(&spec), Some(progress.clone()));
                restic.ensure_repository(false).await?;
                progress.phase(Phase::Running, "restic forget (per volume identity)");
                // The policy is applied as a dry run first; what it would remove is removed by id,
                // less each identity's newest complete snapshot (see `keep_newest_complete`).
                let dry_run = forget.dry_run;
                let mut groups = restic
                    .forget(&ForgetOptions {
                        dry_run: true,
                        ..*forget
                    })
                    .await?;
                for g in &mut groups {
                    keep_newest_complete(g);
                }
                if !dry_run {
                    let ids: Vec<String> = groups
                        .iter()
                        .flat_map(|g| g.remove.iter().flatten().map(|s| s.id.clone()))
                        .collect();
                    restic.forget_ids(&ids).await?;
                }
                let identities = groups
                    .iter()
                    .map(|g| {
                        let first = g.keep.first();
                        let (namespace, pvc) = match g.host.split_once('/') {
                            Some((ns, pvc)) => (ns.to_string(), pvc.to_string()),
                            None => (
                                first
                                    .and_then(|s| s.tag_value(TAG_NAMESPACE))
                                    .unwrap_or_default()
                                    .to_string(),
                                first
                                    .and_then(|s| s.tag_value(TAG_PVC))
                                    .unwrap_or_default()
                                    .to_string(),
                            ),
                        };
                        let removed = g.remove.as_deref().unwrap_or_default();
                        IdentityRetention {
                            namespace,
                            pvc,
                            kept: u32::try_from(g.keep.len()).unwrap_or(u32::MAX),
                            removed: u32::try_from(removed.len()).unwrap_or(u32::MAX),
                            kept_ids: g.keep.iter().map(|s| s.short_id.clone()).collect(),
                            removed_ids: removed.iter().map(|s| s.short_id.clone()).collect(),
                        }
                    })
                    .collect();
                progress.phase(Phase::Running, "restic prune");
                let report = restic.prune(&prune).await?;
                Ok(MaintenanceResult {
                    identities,
                    freed_bytes: if prune.dry_run {
                        0
                    } else {
                        freed_bytes(&report)
                    },
                    report: tail(&report),
                    figures: figures(&restic).await,
                    ..Default::default()
                })
            }
        }
    };
    let mut result = tokio::select! {
        r = work => r?,
        _ = cancel.cancelled() => return Err(AgentError::Cancelled),
    };
    result.duration_seconds = started.elapsed().as_secs_f64();
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_complete_snapshot_is_kept_whatever_the_policy_says() {
        let snap = |id: &str, time: &str, partial: bool| Snapshot {
            id: id.into(),
            time: time.into(),
            tags: if partial {
                vec![TAG_PARTIAL.into()]
            } else {
                Vec::new()
            },
            ..Default::default()
        };
        // keepLast: 2 over two newer partial snapshots.
        let mut g = ForgetGroup {
            keep: vec![
                snap("p2", "2026-11-22T00:00:00Z", true),
                snap("p1", "2026-11-21T00:00:00Z", true),
            ],
            remove: Some(vec![
                snap("c2", "2026-11-20T00:00:00Z", false),
                snap("c1", "2026-11-19T00:00:00Z", false),
            ]),
            ..Default::default()
        };
        keep_newest_complete(&mut g);
        let ids = |v: &[Snapshot]| v.iter().map(|s| s.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&g.keep), ["p2", "p1", "c2"]);
        assert_eq!(ids(g.remove.as_deref().unwrap()), ["c1"]);
        // Already kept: nothing changes.
        let before = g.clone();
        keep_newest_complete(&mut g);
        assert_eq!(g, before);
    }

    #[test]
    fn freed_bytes_come_from_restics_report() {
        let report = "to repack:             0 blobs / 0 B\nthis removes:          0 blobs / 0 B\nto delete:             4 blobs / 1.181 KiB\ntotal prune:           4 blobs / 1.181 KiB\nremaining:             8 blobs / 880.267 KiB\n";
        assert_eq!(freed_bytes(report), 1209);
        assert_eq!(freed_bytes("nothing to do"), 0);
        assert_eq!(parse_size("3.075 MiB"), Some(3_224_371));
        assert_eq!(parse_size("12 parsecs"), None);
    }
    use stowage_proto::v1::{LocalBackend, Repository, repository::Backend};

    fn repo() -> Option<Repository> {
        Some(Repository {
            backend: Some(Backend::Local(LocalBackend {
                path: std::env::temp_dir()
                    .join("stowage-roots/repo")
                    .display()
                    .to_string(),
            })),
            password: "pw".into(),
            ..Default::default()
        })
    }

    fn roots() -> Vec<std::path::PathBuf> {
        let root = std::env::temp_dir().join("stowage-roots");
        std::fs::create_dir_all(&root).unwrap();
        vec![root]
    }

    #[test]
    fn prune_is_scoped_to_a_namespace_and_grouped_per_identity() {
        let plan = plan_prune(
            PruneRequest {
                repository: repo(),
                namespace: "shop".into(),
                retention: Some(RetentionPolicy {
                    keep_last: 2,
                    ..Default::default()
                }),
                ..Default::default()
            },
            &roots(),
        )
        .unwrap();
        let MaintenancePlan::Prune { forget, .. } = plan else {
            panic!("not a prune plan")
        };
        assert_eq!(forget.tags, ["stowage.dev/namespace=shop"]);
        assert_eq!(forget.group_by.as_deref(), Some("host"));
        assert_eq!(forget.retention.keep_last, Some(2));
        assert_eq!(forget.retention.keep_daily, None);
    }

    #[test]
    fn bad_prune_and_check_requests_are_refused() {
        let no_rules = plan_prune(
            PruneRequest {
                repository: repo(),
                namespace: "shop".into(),
                ..Default::default()
            },
            &roots(),
        );
        assert!(matches!(no_rules, Err(AgentError::InvalidArgument(m)) if m.contains("retention")));
        let no_ns = plan_prune(
            PruneRequest {
                repository: repo(),
                retention: Some(RetentionPolicy {
                    keep_last: 1,
                    ..Default::default()
                }),
                ..Default::default()
            },
            &roots(),
        );
        assert!(matches!(no_ns, Err(AgentError::InvalidArgument(m)) if m.contains("namespace")));
        for ok in ["5%", "1/10", "2.5%"] {
            assert!(valid_subset(ok), "{ok}");
        }
        for bad in ["5", "%", "a/b", "1/", "--x"] {
            assert!(!valid_subset(bad), "{bad}");
        }
    }

    #[test]
    fn report_tail_keeps_the_end_on_a_char_boundary() {
        let s = format!("{}é{}", "x".repeat(5000), "verdict");
        let t = tail(&s);
        assert!(t.ends_with("verdict"));
        assert!(t.len() <= REPORT_TAIL);
    }
}
