//! Where a repository lives and the secrets to open it. Secrets are rendered only into environment
//! variables for the child process; `Debug` redacts them.

use std::fmt;

/// The storage backend of a repository.
#[derive(Clone, PartialEq, Eq)]
pub enum Backend {
    /// A directory seen by this process.
    Local { path: String },
    /// An S3-protocol bucket (AWS or compatible).
    S3 {
        endpoint: String,
        bucket: String,
        prefix: String,
        region: String,
        access_key_id: String,
        secret_access_key: String,
    },
    /// A restic REST server.
    Rest {
        url: String,
        username: String,
        password: String,
    },
}

/// A repository: its backend plus the password that opens it.
#[derive(Clone, PartialEq, Eq)]
pub struct Repository {
    pub backend: Backend,
    pub password: String,
}

impl Repository {
    /// The `-r` value. Never contains a secret: REST credentials go through the environment.
    pub fn location(&self) -> String {
        match &self.backend {
            Backend::Local { path } => path.clone(),
            Backend::S3 {
                endpoint,
                bucket,
                prefix,
                ..
            } => {
                let endpoint = endpoint.trim_end_matches('/');
                let prefix = prefix.trim_matches('/');
                if prefix.is_empty() {
                    format!("s3:{endpoint}/{bucket}")
                } else {
                    format!("s3:{endpoint}/{bucket}/{prefix}")
                }
            }
            Backend::Rest { url, .. } => format!("rest:{url}"),
        }
    }

    /// Environment variables carrying the secrets for restic.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![("RESTIC_PASSWORD".to_string(), self.password.clone())];
        match &self.backend {
            Backend::Local { .. } => {}
            Backend::S3 {
                region,
                access_key_id,
                secret_access_key,
                ..
            } => {
                env.push(("AWS_ACCESS_KEY_ID".into(), access_key_id.clone()));
                env.push(("AWS_SECRET_ACCESS_KEY".into(), secret_access_key.clone()));
                if !region.is_empty() {
                    env.push(("AWS_DEFAULT_REGION".into(), region.clone()));
                }
            }
            Backend::Rest {
                username, password, ..
            } => {
                // Supported since restic 0.15; older versions need them in the URL, which we refuse
                // to do (argv is visible in /proc). Empty means an unauthenticated server.
                if !username.is_empty() {
                    env.push(("RESTIC_REST_USERNAME".into(), username.clone()));
                    env.push(("RESTIC_REST_PASSWORD".into(), password.clone()));
                }
            }
        }
        env
    }
}

impl fmt::Debug for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Repository")
            .field("location", &self.location())
            .field("password", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3(prefix: &str) -> Repository {
        Repository {
            backend: Backend::S3 {
                endpoint: "http://127.0.0.1:9000/".into(),
                bucket: "b".into(),
                prefix: prefix.into(),
                region: String::new(),
                access_key_id: "AKID".into(),
                secret_access_key: "SECRET".into(),
            },
            password: "pw".into(),
        }
    }

    #[test]
    fn s3_location_joins_endpoint_bucket_prefix() {
        assert_eq!(s3("").location(), "s3:http://127.0.0.1:9000/b");
        assert_eq!(s3("/shop/").location(), "s3:http://127.0.0.1:9000/b/shop");
    }

    #[test]
    fn secrets_only_in_env_and_redacted_in_debug() {
        let r = s3("p");
        assert!(!r.location().contains("SECRET"));
        let env = r.env();
        assert!(env.contains(&("AWS_SECRET_ACCESS_KEY".into(), "SECRET".into())));
        assert!(env.contains(&("RESTIC_PASSWORD".into(), "pw".into())));
        let dbg = format!("{r:?}");
        assert!(!dbg.contains("SECRET") && !dbg.contains("\"pw\""), "{dbg}");
    }
}
