//! A Restore's spec, checked: what is restored, from whose snapshots, which one, and where.

use chrono::{DateTime, FixedOffset};

use super::*;
use crate::conditions::Finding;
use stowage_api::{Restore, RestoreMode};

/// Which snapshot, as asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum Wanted {
    Latest,
    Id(String),
    Before(DateTime<FixedOffset>),
}

/// What is restored, checked.
#[derive(Debug, Clone, PartialEq)]
pub enum What {
    Volume(VolumeRestore),
    Command(CommandRestore),
}

/// A PVC's snapshot into a volume.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeRestore {
    pub pvc: String,
    pub target_pvc: String,
    /// Relative to the volume root, normalised.
    pub include: Vec<String>,
    pub path: String,
    pub mode: RestoreMode,
}

/// A backup command's snapshot into a restore command.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandRestore {
    pub owner_kind: String,
    pub owner_name: String,
    pub container: Option<String>,
    pub target_pod: Option<String>,
}

/// A Restore's spec, checked: every field a message can name.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    /// Whose snapshots.
    pub source_namespace: String,
    pub what: What,
    pub wanted: Wanted,
    /// `latest` and `before` may choose a partial snapshot (`spec.source.allowPartial`).
    pub allow_partial: bool,
}

/// A path inside a volume, as users write it (`/pgdata/base` or `pgdata/base`), made relative.
fn volume_path(p: &str, field: &str) -> Result<String, Finding> {
    let bad = |why: &str| Finding::new(INVALID_RESTORE, format!("{field}: {p:?} {why}"));
    if p.contains('\0') {
        return Err(bad("contains NUL"));
    }
    let mut parts = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(bad("leaves the volume ('..' is not allowed)")),
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

/// Checks the spec of a Restore in `namespace`. Pure: every refusal names its field.
pub fn check(r: &Restore, namespace: &str, cross_namespace: bool) -> Result<Checked, Finding> {
    let s = &r.spec.source;
    let t = &r.spec.target;
    let source_namespace = s.namespace.clone().unwrap_or_else(|| namespace.to_string());
    if source_namespace != namespace && !cross_namespace {
        return Err(Finding::new(
            CROSS_NAMESPACE,
            format!(
                "spec.source.namespace: a Restore in namespace {namespace} may not read the snapshots of namespace {source_namespace} (the coordinator runs without --allow-cross-namespace-restore)"
            ),
        ));
    }
    let wanted = match (s.snapshot.as_deref(), s.before.as_deref()) {
        (Some(_), Some(_)) => {
            return Err(Finding::new(
                INVALID_RESTORE,
                "spec.source.before: set either snapshot or before, not both",
            ));
        }
        (None | Some("latest") | Some(""), None) => Wanted::Latest,
        (Some(id), None) => {
            if id.len() < 8 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(Finding::new(
                    INVALID_RESTORE,
                    format!(
                        "spec.source.snapshot: {id:?} is neither \"latest\" nor a snapshot id (at least 8 hex digits)"
                    ),
                ));
            }
            Wanted::Id(id.to_ascii_lowercase())
        }
        (None, Some(t)) => Wanted::Before(DateTime::parse_from_rfc3339(t).map_err(|_| {
            Finding::new(
                INVALID_RESTORE,
                format!(
                    "spec.source.before: {t:?} is not an RFC 3339 time (e.g. 2026-11-20T00:00:00Z)"
                ),
            )
        })?),
    };
    let what = match (&s.pvc, &s.command) {
        (Some(pvc), None) if !pvc.is_empty() => {
            let include = s
                .include
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let field = format!("spec.source.include[{i}]");
                    let rel = volume_path(p, &field)?;
                    if rel.is_empty() {
                        return Err(Finding::new(
                            INVALID_RESTORE,
                            format!("{field}: {p:?} names the whole volume; leave include empty for that"),
                        ));
                    }
                    Ok(rel)
                })
                .collect::<Result<Vec<_>, _>>()?;
            What::Volume(VolumeRestore {
                pvc: pvc.clone(),
                target_pvc: t.pvc.clone().unwrap_or_else(|| pvc.clone()),
                include,
                path: volume_path(t.path.as_deref().unwrap_or(""), "spec.target.path")?,
                mode: t.mode.unwrap_or_default(),
            })
        }
        (None, Some(c)) => {
            let (kind, name) = c.owner.split_once('/').filter(|(k, n)| !k.is_empty() && !n.is_empty()).ok_or_else(|| {
                Finding::new(
                    INVALID_RESTORE,
                    format!("spec.source.command.owner: {:?} is not <Kind>/<name> (e.g. StatefulSet/pg)", c.owner),
                )
            })?;
            if r.spec.dry_run == Some(true) {
                return Err(Finding::new(
                    INVALID_RESTORE,
                    "spec.dryRun: a dry run previews a volume restore (source.pvc); what a restore command would do with a dump cannot be known without running it",
                ));
            }
            if !s.include.is_empty() || t.path.is_some() || t.pvc.is_some() || t.mode.is_some() {
                return Err(Finding::new(
                    INVALID_RESTORE,
                    "spec.source.command: a command's snapshot is one stream; include, target.pvc, target.path and target.mode do not apply (target.pod does)",
                ));
            }
            What::Command(CommandRestore {
                owner_kind: kind.to_string(),
                owner_name: name.to_string(),
                container: c.container.clone().filter(|c| !c.is_empty()),
                target_pod: t.pod.clone().filter(|p| !p.is_empty()),
            })
        }
        _ => {
            return Err(Finding::new(
                INVALID_RESTORE,
                "spec.source: set exactly one of pvc and command",
            ));
        }
    };
    Ok(Checked {
        source_namespace,
        what,
        wanted,
        allow_partial: s.allow_partial == Some(true),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use stowage_api::{CommandSourceRef, RestoreSource, RestoreSpec, RestoreTarget};

    fn restore(source: RestoreSource, target: RestoreTarget) -> Restore {
        Restore::new(
            "r",
            RestoreSpec {
                source,
                target,
                ..Default::default()
            },
        )
    }

    fn pvc_source(pvc: &str) -> RestoreSource {
        RestoreSource {
            pvc: Some(pvc.into()),
            ..Default::default()
        }
    }

    fn refused(r: &Restore, cross: bool) -> Finding {
        check(r, "shop", cross).expect_err("refused")
    }

    #[test]
    fn a_valid_volume_restore_is_normalised() {
        let r = restore(
            RestoreSource {
                include: vec!["/pgdata/base".into(), "./logs//x".into()],
                before: Some("2026-11-20T00:00:00Z".into()),
                ..pvc_source("data")
            },
            RestoreTarget {
                path: Some("/restored/".into()),
                mode: Some(RestoreMode::Replace),
                ..Default::default()
            },
        );
        let c = check(&r, "shop", false).unwrap();
        assert_eq!(c.source_namespace, "shop");
        assert!(matches!(c.wanted, Wanted::Before(_)));
        assert_eq!(
            c.what,
            What::Volume(VolumeRestore {
                pvc: "data".into(),
                target_pvc: "data".into(),
                include: vec!["pgdata/base".into(), "logs/x".into()],
                path: "restored".into(),
                mode: RestoreMode::Replace,
            })
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (
                restore(RestoreSource::default(), RestoreTarget::default()),
                "spec.source:",
            ),
            (
                restore(
                    RestoreSource {
                        snapshot: Some("abc".into()),
                        ..pvc_source("d")
                    },
                    RestoreTarget::default(),
                ),
                "spec.source.snapshot",
            ),
            (
                restore(
                    RestoreSource {
                        before: Some("yesterday".into()),
                        ..pvc_source("d")
                    },
                    RestoreTarget::default(),
                ),
                "spec.source.before",
            ),
            (
                restore(
                    RestoreSource {
                        include: vec!["ok".into(), "../../etc".into()],
                        ..pvc_source("d")
                    },
                    RestoreTarget::default(),
                ),
                "spec.source.include[1]",
            ),
            (
                restore(
                    pvc_source("d"),
                    RestoreTarget {
                        path: Some("a/../../b".into()),
                        ..Default::default()
                    },
                ),
                "spec.target.path",
            ),
            (
                restore(
                    RestoreSource {
                        command: Some(CommandSourceRef {
                            owner: "pg".into(),
                            container: None,
                        }),
                        ..Default::default()
                    },
                    RestoreTarget::default(),
                ),
                "spec.source.command.owner",
            ),
        ];
        for (r, field) in cases {
            let f = refused(&r, false);
            assert!(f.message.starts_with(field), "{field}: {}", f.message);
            assert_eq!(f.reason, INVALID_RESTORE);
        }
    }

    #[test]
    fn a_dry_run_of_a_restore_command_is_refused_naming_the_field() {
        let mut r = restore(
            RestoreSource {
                command: Some(CommandSourceRef {
                    owner: "StatefulSet/pg".into(),
                    container: None,
                }),
                ..Default::default()
            },
            RestoreTarget::default(),
        );
        assert!(check(&r, "shop", false).is_ok());
        r.spec.dry_run = Some(true);
        let f = refused(&r, false);
        assert!(f.message.starts_with("spec.dryRun:"), "{}", f.message);
        assert_eq!(f.reason, INVALID_RESTORE);
        // A volume restore may be a dry run.
        let mut v = restore(pvc_source("data"), RestoreTarget::default());
        v.spec.dry_run = Some(true);
        assert!(check(&v, "shop", false).is_ok());
    }

    #[test]
    fn another_namespace_needs_the_flag() {
        let r = restore(
            RestoreSource {
                namespace: Some("bank".into()),
                ..pvc_source("d")
            },
            RestoreTarget::default(),
        );
        let f = refused(&r, false);
        assert_eq!(f.reason, CROSS_NAMESPACE);
        assert!(f.message.contains("bank"), "{}", f.message);
        assert_eq!(check(&r, "shop", true).unwrap().source_namespace, "bank");
    }
}
