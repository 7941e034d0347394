//! Turning the repository description of a request into a restic-wrap repository.

use std::path::{Component, Path, PathBuf};

use restic_wrap::{Backend, Repository};
pub use stowage_common::repository::InvalidRepository;
use stowage_common::repository::invalid;
use stowage_proto::v1;

/// `path` must be absolute, plain (no `..`), strictly below one of `roots`, and stay below it once
/// the symlinks of its existing part are resolved.
fn check_local_path(path: &Path, roots: &[PathBuf]) -> Result<(), InvalidRepository> {
    if roots.is_empty() {
        return Err(invalid(
            "local.path",
            "local repositories are disabled on this node (the agent has no --local-repository-root); use an S3 or REST repository, or ask the administrator to allow a directory",
        ));
    }
    if !path.is_absolute() {
        return Err(invalid("local.path", "must be absolute"));
    }
    if path
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(invalid("local.path", "must not contain '.' or '..'"));
    }
    let allowed = || {
        roots
            .iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let below = |p: &Path, root: &Path| p.starts_with(root) && p != root;
    if !roots.iter().any(|r| below(path, r)) {
        return Err(invalid(
            "local.path",
            format!(
                "{} is outside the directories allowed for local repositories ({})",
                path.display(),
                allowed()
            ),
        ));
    }
    // The deepest existing ancestor, with symlinks resolved, must still be inside a root.
    let mut existing = path;
    while !existing.exists() {
        match existing.parent() {
            Some(p) => existing = p,
            None => break,
        }
    }
    let resolved = existing.canonicalize().map_err(|e| {
        invalid(
            "local.path",
            format!("{} cannot be resolved: {e}", existing.display()),
        )
    })?;
    let inside = roots.iter().any(|r| {
        let root = r.canonicalize().unwrap_or_else(|_| r.clone());
        resolved.starts_with(&root)
    });
    if !inside {
        return Err(invalid(
            "local.path",
            format!(
                "{} leads outside the directories allowed for local repositories ({}) through a symlink",
                path.display(),
                allowed()
            ),
        ));
    }
    Ok(())
}

/// The repository of a request: the shared contract's checks, then this node's policy. A local
/// repository must lie below one of `local_roots`, the directories an administrator allowed: a
/// tenant must not choose where on the node we write.
pub fn from_proto(
    p: Option<&v1::Repository>,
    local_roots: &[PathBuf],
) -> Result<Repository, InvalidRepository> {
    let repo = stowage_common::repository::repository(p)?;
    if let Backend::Local { path } = &repo.backend {
        check_local_path(Path::new(path), local_roots)?;
    }
    Ok(repo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_each_backend() {
        use v1::repository::Backend as PBackend;
        let t = tempfile::tempdir().unwrap();
        let roots = vec![t.path().to_path_buf()];
        let inside = t.path().join("r").display().to_string();
        let mut p = v1::Repository {
            password: "pw".into(),
            ..Default::default()
        };
        assert_eq!(from_proto(Some(&p), &roots).unwrap_err().field, "backend");
        p.backend = Some(PBackend::Local(v1::LocalBackend { path: "rel".into() }));
        assert_eq!(
            from_proto(Some(&p), &roots).unwrap_err().field,
            "local.path"
        );
        p.backend = Some(PBackend::Local(v1::LocalBackend {
            path: inside.clone(),
        }));
        assert_eq!(from_proto(Some(&p), &roots).unwrap().location(), inside);
        p.backend = Some(PBackend::S3(v1::S3Backend {
            endpoint: "http://e".into(),
            bucket: "b".into(),
            ..Default::default()
        }));
        assert_eq!(
            from_proto(Some(&p), &roots).unwrap_err().field,
            "s3.access_key_id"
        );
        p.password.clear();
        p.backend = Some(PBackend::Rest(v1::RestBackend {
            url: "http://r".into(),
            ..Default::default()
        }));
        assert_eq!(from_proto(Some(&p), &roots).unwrap_err().field, "password");
        assert!(from_proto(None, &roots).is_err());
    }

    #[test]
    fn local_repositories_stay_below_the_configured_roots() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("repos");
        let outside = t.path().join("elsewhere");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        let roots = vec![root.clone()];
        let ok = |p: &Path| check_local_path(p, &roots);
        assert!(ok(&root.join("shop/nightly")).is_ok());
        let none = check_local_path(&root.join("a"), &[]).unwrap_err();
        assert!(none.reason.contains("disabled"), "{none}");
        for bad in [
            root.clone(),
            outside.join("r"),
            root.join("../elsewhere/r"),
            root.join("link/r"),
            PathBuf::from("/var/lib/kubelet/pods"),
        ] {
            let e = ok(&bad).unwrap_err();
            assert_eq!(e.field, "local.path", "{bad:?}");
            assert!(e.to_string().starts_with("repository.local.path: "), "{e}");
        }
    }
}
