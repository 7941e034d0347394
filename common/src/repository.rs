//! What a `Repository` message of the agent protocol means: which restic repository, checked field
//! by field (a message is the coordinator's or the plugin's word, never trusted blindly).

use std::path::{Component, Path};

use restic_wrap::{Backend, Repository};
use stowage_proto::v1::{self, repository::Backend as PBackend};

/// Where a repository is, as restic's `-r` names it (no secrets): the key of caches and the text of
/// messages. `None` for a message that does not describe a usable repository.
pub fn location(p: &v1::Repository) -> Option<String> {
    repository(Some(p)).ok().map(|r| r.location())
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("repository.{field}: {reason}")]
pub struct InvalidRepository {
    pub field: &'static str,
    pub reason: String,
}

pub fn invalid(field: &'static str, reason: impl Into<String>) -> InvalidRepository {
    InvalidRepository {
        field,
        reason: reason.into(),
    }
}

fn required(field: &'static str, v: &str) -> Result<String, InvalidRepository> {
    if v.is_empty() {
        Err(invalid(field, "is required"))
    } else {
        Ok(v.to_string())
    }
}

/// The restic repository a `Repository` message describes, with every required field checked (each
/// error names its field). What the agent adds on top is node policy: where local paths may lie.
pub fn repository(p: Option<&v1::Repository>) -> Result<Repository, InvalidRepository> {
    let p = p.ok_or_else(|| invalid("repository", "is required"))?;
    let backend = match &p.backend {
        None => {
            return Err(invalid(
                "backend",
                "exactly one of local, s3, rest is required",
            ));
        }
        Some(PBackend::Local(l)) => {
            let path = required("local.path", &l.path)?;
            let p = Path::new(&path);
            if !p.is_absolute() {
                return Err(invalid("local.path", "must be absolute"));
            }
            if p.components()
                .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
            {
                return Err(invalid("local.path", "must not contain '.' or '..'"));
            }
            Backend::Local { path }
        }
        Some(PBackend::S3(s)) => Backend::S3 {
            endpoint: required("s3.endpoint", &s.endpoint)?,
            bucket: required("s3.bucket", &s.bucket)?,
            prefix: s.prefix.clone(),
            region: s.region.clone(),
            access_key_id: required("s3.access_key_id", &s.access_key_id)?,
            secret_access_key: required("s3.secret_access_key", &s.secret_access_key)?,
        },
        Some(PBackend::Rest(r)) => Backend::Rest {
            url: required("rest.url", &r.url)?,
            username: r.username.clone(),
            password: r.password.clone(),
        },
    };
    Ok(Repository {
        backend,
        password: required("password", &p.password)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_each_backend_and_names_the_field() {
        let mut p = v1::Repository {
            password: "pw".into(),
            ..Default::default()
        };
        assert_eq!(repository(Some(&p)).unwrap_err().field, "backend");
        p.backend = Some(PBackend::Local(v1::LocalBackend { path: "rel".into() }));
        assert_eq!(repository(Some(&p)).unwrap_err().field, "local.path");
        p.backend = Some(PBackend::Local(v1::LocalBackend {
            path: "/srv/../etc".into(),
        }));
        assert_eq!(repository(Some(&p)).unwrap_err().field, "local.path");
        p.backend = Some(PBackend::Local(v1::LocalBackend {
            path: "/srv/repo".into(),
        }));
        assert_eq!(location(&p).as_deref(), Some("/srv/repo"));
        p.backend = Some(PBackend::S3(v1::S3Backend {
            endpoint: "http://e/".into(),
            bucket: "b".into(),
            prefix: "/team/".into(),
            ..Default::default()
        }));
        assert_eq!(repository(Some(&p)).unwrap_err().field, "s3.access_key_id");
        if let Some(PBackend::S3(s)) = &mut p.backend {
            s.access_key_id = "id".into();
            s.secret_access_key = "key".into();
        }
        assert_eq!(location(&p).as_deref(), Some("s3:http://e/b/team"));
        p.password.clear();
        p.backend = Some(PBackend::Rest(v1::RestBackend {
            url: "http://r".into(),
            ..Default::default()
        }));
        assert_eq!(repository(Some(&p)).unwrap_err().field, "password");
        assert!(repository(None).is_err());
    }
}
