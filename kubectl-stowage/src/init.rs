//! `kubectl stowage init`: a namespace's own repository. Every namespace should have its own
//! location and password (docs/security.md, "Shared repositories"): anyone with a repository's
//! password reads every snapshot in it and can write snapshots that claim any namespace.
//!
//! It creates a random password in a Secret labelled as repository credentials, then the repository
//! with restic, run here with the caller's own rights (as `snapshots` does). It never replaces an
//! existing password nor initialises over an existing repository; if `restic init` fails, the
//! Secret it created is deleted again, so a retry starts clean.

use std::io::Read;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde::Serialize;
use stowage_api::contract::LABEL_CREDENTIALS;
use stowage_api::{BackendSpec, RestBackend, S3Backend, SecretKeyRef};
use stowage_common::backend::{self, Secrets};

use crate::PluginError;
use crate::cli::InitArgs;
use crate::connect::Connection;
use crate::output::columns;

/// Random bytes in the password (before base64: 32 bytes, 256 bits).
const PASSWORD_BYTES: usize = 32;

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct Created {
    pub namespace: String,
    pub password_secret: String,
    pub repository: String,
    /// The `backend` block for the namespace's Schedules.
    pub backend: BackendSpec,
}

/// 32 bytes from the operating system's random source, base64 (no padding): 43 characters.
fn random_password() -> Result<String, PluginError> {
    let mut bytes = [0u8; PASSWORD_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| PluginError::Init(format!("reading random bytes from /dev/urandom: {e}")))?;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    Ok(out)
}

fn backend_of(args: &InitArgs, namespace: &str) -> Result<BackendSpec, PluginError> {
    let password = SecretKeyRef {
        name: args.password_secret.clone(),
        key: "password".into(),
    };
    match (&args.s3_endpoint, &args.rest_url) {
        (Some(endpoint), None) => Ok(BackendSpec {
            repo_password_secret_ref: password,
            s3: Some(S3Backend {
                endpoint: endpoint.clone(),
                bucket: args.s3_bucket.clone().unwrap_or_default(),
                prefix: Some(args.s3_prefix.clone().unwrap_or_else(|| namespace.into())),
                region: args.s3_region.clone(),
                access_key_id_secret_ref: SecretKeyRef {
                    name: args.s3_secret.clone(),
                    key: "id".into(),
                },
                secret_access_key_secret_ref: SecretKeyRef {
                    name: args.s3_secret.clone(),
                    key: "secret".into(),
                },
            }),
            initialize: Some(false),
            ..Default::default()
        }),
        (None, Some(url)) => Ok(BackendSpec {
            repo_password_secret_ref: password,
            rest: Some(RestBackend {
                url: url.clone(),
                username_secret_ref: args.rest_secret.as_ref().map(|n| SecretKeyRef {
                    name: n.clone(),
                    key: "username".into(),
                }),
                password_secret_ref: args.rest_secret.as_ref().map(|n| SecretKeyRef {
                    name: n.clone(),
                    key: "password".into(),
                }),
            }),
            initialize: Some(false),
            ..Default::default()
        }),
        _ => Err(PluginError::Usage(
            "name the repository's place: --s3-endpoint and --s3-bucket, or --rest-url".into(),
        )),
    }
}

pub async fn init(conn: &Connection, args: &InitArgs) -> Result<Created, PluginError> {
    let ns = conn.namespace.clone();
    let spec = backend_of(args, &ns)?;
    let secrets: Api<Secret> = Api::namespaced(conn.client.clone(), &ns);
    let name = &args.password_secret;
    if secrets
        .get_metadata_opt(name)
        .await
        .map_err(PluginError::api(format!("reading Secret {ns}/{name}")))?
        .is_some()
    {
        return Err(PluginError::Init(format!(
            "Secret {ns}/{name} exists already; init never replaces a repository's password (choose another name with --password-secret, or use the existing repository)"
        )));
    }
    let mut secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns.clone()),
            labels: Some(
                [
                    (LABEL_CREDENTIALS.to_string(), "true".to_string()),
                    (
                        "app.kubernetes.io/managed-by".to_string(),
                        "kubectl-stowage".to_string(),
                    ),
                ]
                .into(),
            ),
            ..Default::default()
        },
        ..Default::default()
    };
    secret.string_data = Some([("password".to_string(), random_password()?)].into());
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .map_err(PluginError::api(format!("creating Secret {ns}/{name}")))?;
    match create_repository(conn, args, &spec).await {
        Ok(location) => Ok(Created {
            namespace: ns,
            password_secret: name.clone(),
            repository: location,
            backend: spec,
        }),
        Err(e) => {
            // Nothing half made: the password of a repository that does not exist goes again.
            let _ = secrets.delete(name, &DeleteParams::default()).await;
            Err(e)
        }
    }
}

/// `restic init` at the backend's location, unless a repository is there already.
async fn create_repository(
    conn: &Connection,
    args: &InitArgs,
    spec: &BackendSpec,
) -> Result<String, PluginError> {
    let resolved = backend::resolve(
        &Secrets::Api(conn.client.clone()),
        &[],
        &conn.namespace,
        spec,
        "the repository",
    )
    .await
    .map_err(|f| PluginError::Init(f.message))?;
    let repo = stowage_common::repository::repository(Some(&resolved))
        .map_err(|e| PluginError::Init(e.to_string()))?;
    let location = repo.location();
    let restic = restic_wrap::Restic::new(&args.restic, repo);
    // A repository there opens with no password but its own: the fresh one fails as wrong.
    let exists = match restic.exists().await {
        Ok(e) => e,
        Err(restic_wrap::Error::WrongPassword { .. }) => true,
        Err(e) => {
            return Err(PluginError::Init(format!(
                "looking for a repository at {location}: {e}"
            )));
        }
    };
    if exists {
        return Err(PluginError::Init(format!(
            "there is a repository at {location} already; init creates new ones only (give this namespace its own prefix or URL)"
        )));
    }
    restic
        .init()
        .await
        .map_err(|e| PluginError::Init(format!("creating the repository at {location}: {e}")))?;
    Ok(location)
}

pub fn table(c: &Created) -> String {
    let backend =
        serde_yaml::to_string(&serde_json::json!({ "backend": c.backend })).unwrap_or_default();
    format!(
        "{}\nA Schedule of namespace {} uses it with:\n{}",
        columns(
            &["NAMESPACE", "PASSWORD SECRET", "REPOSITORY"],
            &[vec![
                c.namespace.clone(),
                c.password_secret.clone(),
                c.repository.clone()
            ]],
        ),
        c.namespace,
        backend
            .lines()
            .map(|l| format!("  {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_43_characters_of_base64_and_differ() {
        let a = random_password().unwrap();
        let b = random_password().unwrap();
        assert_eq!(a.len(), 43, "{a}");
        assert!(
            a.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '/')
        );
        assert_ne!(a, b);
    }
}
