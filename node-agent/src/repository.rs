//! Turning the repository description of a request into a restic-wrap repository.

use stowage_proto::v1::{self, repository::Backend as PBackend};

use restic_wrap::{Backend, Repository};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("repository.{field}: {reason}")]
pub struct InvalidRepository {
    pub field: &'static str,
    pub reason: &'static str,
}

fn required(field: &'static str, v: &str) -> Result<String, InvalidRepository> {
    if v.is_empty() {
        Err(InvalidRepository {
            field,
            reason: "is required",
        })
    } else {
        Ok(v.to_string())
    }
}

pub fn from_proto(p: Option<&v1::Repository>) -> Result<Repository, InvalidRepository> {
    let p = p.ok_or(InvalidRepository {
        field: "repository",
        reason: "is required",
    })?;
    let backend = match &p.backend {
        None => {
            return Err(InvalidRepository {
                field: "backend",
                reason: "exactly one of local, s3, rest is required",
            });
        }
        Some(PBackend::Local(l)) => {
            let path = required("local.path", &l.path)?;
            if !path.starts_with('/') {
                return Err(InvalidRepository {
                    field: "local.path",
                    reason: "must be absolute",
                });
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
    fn validates_each_backend() {
        let mut p = v1::Repository {
            password: "pw".into(),
            ..Default::default()
        };
        assert_eq!(from_proto(Some(&p)).unwrap_err().field, "backend");
        p.backend = Some(PBackend::Local(v1::LocalBackend { path: "rel".into() }));
        assert_eq!(from_proto(Some(&p)).unwrap_err().field, "local.path");
        p.backend = Some(PBackend::Local(v1::LocalBackend { path: "/r".into() }));
        assert_eq!(from_proto(Some(&p)).unwrap().location(), "/r");
        p.backend = Some(PBackend::S3(v1::S3Backend {
            endpoint: "http://e".into(),
            bucket: "b".into(),
            ..Default::default()
        }));
        assert_eq!(from_proto(Some(&p)).unwrap_err().field, "s3.access_key_id");
        p.password.clear();
        p.backend = Some(PBackend::Rest(v1::RestBackend {
            url: "http://r".into(),
            ..Default::default()
        }));
        assert_eq!(from_proto(Some(&p)).unwrap_err().field, "password");
        assert!(from_proto(None).is_err());
    }
}
