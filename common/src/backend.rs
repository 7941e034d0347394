//! A run's `backend` block: its shape is checked without I/O; resolving reads the referenced
//! Secrets and yields the agent's `Repository` message. Secret values travel only inside that
//! message (over mTLS) and reach restic through its environment; they are never logged.
//!
//! Length: the backend block from shape to resolved message (validation, Secrets, maintenance and rotation variants) in one place, with its unit tests.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client};
use stowage_proto::v1::{self as pb, repository::Backend as PbBackend};

use stowage_api::contract;

use crate::endpoints::{self, EndpointPattern};
use crate::finding::Finding;
use stowage_api::{BackendSpec, SecretKeyRef};

pub const INVALID_BACKEND: &str = "InvalidBackend";
pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
pub const SECRET_KEY_NOT_FOUND: &str = "SecretKeyNotFound";
pub const SECRET_NOT_LABELLED: &str = "SecretNotLabelled";

/// Exactly one known backend type, and its Secret references. `at` is the field path of the block.
pub fn validate(spec: &BackendSpec, at: &str) -> Result<(), Finding> {
    if let Some(key) = spec.unknown.keys().next() {
        return Err(Finding::new(
            INVALID_BACKEND,
            format!("{at}.{key}: unknown backend type or field (backends: local, s3, rest)"),
        ));
    }
    let set: Vec<&str> = [
        ("local", spec.local.is_some()),
        ("s3", spec.s3.is_some()),
        ("rest", spec.rest.is_some()),
    ]
    .into_iter()
    .filter_map(|(n, on)| on.then_some(n))
    .collect();
    match set.as_slice() {
        [] => {
            return Err(Finding::new(
                INVALID_BACKEND,
                format!("{at}: set exactly one of local, s3, rest (none is set)"),
            ));
        }
        [_] => {}
        many => {
            return Err(Finding::new(
                INVALID_BACKEND,
                format!(
                    "{at}: set exactly one of local, s3, rest ({} are set)",
                    many.join(" and ")
                ),
            ));
        }
    }
    // Required fields and path rules are the shared contract's (`stowage_api::contract`),
    // checked by `resolve` once the block is a `Repository` message.
    ref_ok(
        &spec.repo_password_secret_ref,
        &format!("{at}.repoPasswordSecretRef"),
    )?;
    if let Some(s) = &spec.s3 {
        ref_ok(
            &s.access_key_id_secret_ref,
            &format!("{at}.s3.accessKeyIDSecretRef"),
        )?;
        ref_ok(
            &s.secret_access_key_secret_ref,
            &format!("{at}.s3.secretAccessKeySecretRef"),
        )?;
    }
    Ok(())
}

fn ref_ok(r: &SecretKeyRef, at: &str) -> Result<(), Finding> {
    if r.name.is_empty() || r.key.is_empty() {
        return Err(Finding::new(
            INVALID_BACKEND,
            format!("{at}: name and key are required"),
        ));
    }
    Ok(())
}

/// Where Secrets are read from: the API (to run: the values are needed), or the coordinator's
/// watch cache of labelled Secrets, which holds key names and whether each value is empty, never
/// the values (to validate, on every reconcile, without a request; a miss asks the API for the
/// Secret's metadata, to tell a missing Secret from an unlabelled one).
///
/// Either way a Secret serves only with the label `stowage.dev/credentials: "true"`: whoever may
/// create a run, but not read Secrets, must not be able to point restic at any Secret and send its
/// value to an endpoint of their own.
#[derive(Clone)]
pub enum Secrets {
    Api(Client),
    Cache(Vec<Store<Secret>>, Client),
}

/// Reads Secrets of one namespace, each at most once per resolution.
struct SecretReader {
    source: Secrets,
    namespace: String,
    cache: BTreeMap<String, Option<Secret>>,
}

fn labelled(labels: Option<&BTreeMap<String, String>>) -> bool {
    labels
        .and_then(|l| l.get(contract::LABEL_CREDENTIALS))
        .is_some_and(|v| v == "true")
}

impl SecretReader {
    fn read_error(&self, r: &SecretKeyRef, at: &str, e: &kube::Error) -> Finding {
        Finding::new(
            SECRET_NOT_FOUND,
            format!(
                "{at}: reading Secret {}/{}: {}",
                self.namespace,
                r.name,
                crate::kube_errors::sentence(e)
            ),
        )
    }

    /// `Ok(false)` when the Secret exists without the credentials label; only its metadata is read.
    async fn exists_unlabelled(
        &self,
        client: &Client,
        r: &SecretKeyRef,
        at: &str,
    ) -> Result<bool, Finding> {
        let meta = Api::<Secret>::namespaced(client.clone(), &self.namespace)
            .get_metadata_opt(&r.name)
            .await
            .map_err(|e| self.read_error(r, at, &e))?;
        Ok(meta.is_some_and(|m| !labelled(m.metadata.labels.as_ref())))
    }

    fn unlabelled(&self, r: &SecretKeyRef, at: &str) -> Finding {
        Finding::new(
            SECRET_NOT_LABELLED,
            format!(
                "{at}: Secret {ns}/{name} lacks the label {label}=true, without which Stowage never uses a Secret as repository credentials; someone allowed to update the Secret can add it: kubectl label secret -n {ns} {name} {label}=true",
                ns = self.namespace,
                name = r.name,
                label = contract::LABEL_CREDENTIALS,
            ),
        )
    }

    async fn value(&mut self, r: &SecretKeyRef, at: &str) -> Result<String, Finding> {
        if !self.cache.contains_key(&r.name) {
            let got = match &self.source {
                Secrets::Api(client) => {
                    // Metadata first: the value of an unlabelled Secret is never even fetched.
                    if self.exists_unlabelled(client, r, at).await? {
                        return Err(self.unlabelled(r, at));
                    }
                    Api::<Secret>::namespaced(client.clone(), &self.namespace)
                        .get_opt(&r.name)
                        .await
                        .map_err(|e| self.read_error(r, at, &e))?
                }
                Secrets::Cache(stores, client) => {
                    match stores
                        .iter()
                        .find_map(|s| s.get(&ObjectRef::new(&r.name).within(&self.namespace)))
                    {
                        Some(s) => Some(s.as_ref().clone()),
                        None if self.exists_unlabelled(client, r, at).await? => {
                            return Err(self.unlabelled(r, at));
                        }
                        None => None,
                    }
                }
            };
            self.cache.insert(r.name.clone(), got);
        }
        let Some(Some(secret)) = self.cache.get(&r.name) else {
            return Err(Finding::new(
                SECRET_NOT_FOUND,
                format!("{at}: Secret {}/{} not found", self.namespace, r.name),
            ));
        };
        // The label is checked on what was read, too: it may have been removed meanwhile.
        if !labelled(secret.metadata.labels.as_ref()) {
            return Err(self.unlabelled(r, at));
        }
        let data = secret.data.as_ref();
        let string_data = secret.string_data.as_ref();
        let value = data
            .and_then(|d| d.get(&r.key))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .or_else(|| string_data.and_then(|d| d.get(&r.key)).cloned());
        match value {
            Some(v) if !v.is_empty() => Ok(v),
            Some(_) => Err(Finding::new(
                SECRET_KEY_NOT_FOUND,
                format!(
                    "{at}: key {:?} of Secret {}/{} is empty",
                    r.key, self.namespace, r.name
                ),
            )),
            None => {
                let keys: Vec<&str> = data
                    .map(|d| d.keys().map(String::as_str).collect())
                    .unwrap_or_default();
                Err(Finding::new(
                    SECRET_KEY_NOT_FOUND,
                    format!(
                        "{at}: Secret {}/{} has no key {:?} (it has: {})",
                        self.namespace,
                        r.name,
                        r.key,
                        if keys.is_empty() {
                            "none".to_string()
                        } else {
                            keys.join(", ")
                        }
                    ),
                ))
            }
        }
    }
}

/// Where a block's repository is, from the spec alone (no Secret is read): the local path, the S3
/// endpoint's host with bucket and prefix, or the REST URL without user info. Two blocks with the
/// same location write into one repository.
pub fn spec_location(spec: &BackendSpec) -> Option<String> {
    let trim = |s: &str| s.trim_matches('/').to_string();
    let host = |url: &str| {
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
        trim(rest).to_ascii_lowercase()
    };
    if let Some(l) = &spec.local {
        Some(format!("local:{}", l.path.trim_end_matches('/')))
    } else if let Some(s) = &spec.s3 {
        Some(format!(
            "s3:{}/{}/{}",
            host(&s.endpoint),
            s.bucket,
            trim(s.prefix.as_deref().unwrap_or(""))
        ))
    } else {
        spec.rest.as_ref().map(|r| format!("rest:{}", host(&r.url)))
    }
}

/// Where a repository is, as restic names it, without secrets (for caches and messages).
pub fn location(r: &pb::Repository) -> String {
    crate::repository::location(r).unwrap_or_default()
}

/// The spec field (below the backend block) a field of the `Repository` message comes from.
fn spec_field(proto_field: &str) -> &str {
    match proto_field {
        "password" => "repoPasswordSecretRef",
        "s3.access_key_id" => "s3.accessKeyIDSecretRef",
        "s3.secret_access_key" => "s3.secretAccessKeySecretRef",
        other => other,
    }
}

/// The backend as maintenance reaches it: `spec` with its `maintenance` credentials (and REST URL)
/// in place of the append-only ones; `None` without a `maintenance` block. Its fields are named
/// under `{at}.maintenance`.
pub fn maintenance_spec(spec: &BackendSpec, at: &str) -> Result<Option<BackendSpec>, Finding> {
    let Some(m) = &spec.maintenance else {
        return Ok(None);
    };
    let field = format!("{at}.maintenance");
    let mut out = BackendSpec {
        maintenance: None,
        ..spec.clone()
    };
    match (&m.s3, &m.rest, &mut out.s3, &mut out.rest) {
        (Some(ms3), None, Some(s3), None) => {
            s3.access_key_id_secret_ref = ms3.access_key_id_secret_ref.clone();
            s3.secret_access_key_secret_ref = ms3.secret_access_key_secret_ref.clone();
        }
        (None, Some(mr), None, Some(rest)) => {
            if let Some(url) = &mr.url {
                rest.url = url.clone();
            }
            rest.username_secret_ref = mr.username_secret_ref.clone();
            rest.password_secret_ref = mr.password_secret_ref.clone();
        }
        _ => {
            return Err(Finding::new(
                INVALID_BACKEND,
                format!(
                    "{field}: set exactly one of s3, rest, of the backend's own type (maintenance credentials are for the same repository; a local backend has none)"
                ),
            ));
        }
    }
    Ok(Some(out))
}

/// The previous repository password of a backend in rotation (`previousPasswordSecretRef`), read
/// under the same rules as the others (a labelled Secret); `None` without one.
pub async fn previous_password(
    source: &Secrets,
    namespace: &str,
    spec: &BackendSpec,
    at: &str,
) -> Result<Option<String>, Finding> {
    let Some(r) = &spec.previous_password_secret_ref else {
        return Ok(None);
    };
    ref_ok(r, &format!("{at}.previousPasswordSecretRef"))?;
    let mut secrets = SecretReader {
        source: source.clone(),
        namespace: namespace.to_string(),
        cache: BTreeMap::new(),
    };
    secrets
        .value(r, &format!("{at}.previousPasswordSecretRef"))
        .await
        .map(Some)
}

/// Validates `spec`, checks its endpoint against `allowed` (before any Secret is read), and reads
/// its Secrets from `namespace`.
///
/// With [`Secrets::Cache`] the secret values in the result are placeholders: use it to validate.
pub async fn resolve(
    source: &Secrets,
    allowed: &[EndpointPattern],
    namespace: &str,
    spec: &BackendSpec,
    at: &str,
) -> Result<pb::Repository, Finding> {
    validate(spec, at)?;
    endpoints::check(allowed, spec, at)?;
    let mut secrets = SecretReader {
        source: source.clone(),
        namespace: namespace.to_string(),
        cache: BTreeMap::new(),
    };
    let password = secrets
        .value(
            &spec.repo_password_secret_ref,
            &format!("{at}.repoPasswordSecretRef"),
        )
        .await?;
    let backend = if let Some(l) = &spec.local {
        PbBackend::Local(pb::LocalBackend {
            path: l.path.clone(),
        })
    } else if let Some(s) = &spec.s3 {
        PbBackend::S3(pb::S3Backend {
            endpoint: s.endpoint.clone(),
            bucket: s.bucket.clone(),
            prefix: s.prefix.clone().unwrap_or_default(),
            region: s.region.clone().unwrap_or_default(),
            access_key_id: secrets
                .value(
                    &s.access_key_id_secret_ref,
                    &format!("{at}.s3.accessKeyIDSecretRef"),
                )
                .await?,
            secret_access_key: secrets
                .value(
                    &s.secret_access_key_secret_ref,
                    &format!("{at}.s3.secretAccessKeySecretRef"),
                )
                .await?,
        })
    } else if let Some(r) = &spec.rest {
        let mut optional = async |sr: &Option<SecretKeyRef>, field: &str| match sr {
            Some(sr) => secrets.value(sr, &format!("{at}.rest.{field}")).await,
            None => Ok(String::new()),
        };
        let username = optional(&r.username_secret_ref, "usernameSecretRef").await?;
        let password = optional(&r.password_secret_ref, "passwordSecretRef").await?;
        PbBackend::Rest(pb::RestBackend {
            url: r.url.clone(),
            username,
            password,
        })
    } else {
        return Err(Finding::new(
            INVALID_BACKEND,
            format!("{at}: set exactly one of local, s3, rest"),
        ));
    };
    let repository = pb::Repository {
        backend: Some(backend),
        password,
        // Only when asked; a Schedule's first runs are allowed by the caller (see `initialize`).
        // Check and Prune never create a repository.
        auto_init: spec.initialize == Some(true),
        limit_upload_kib: spec.limit_upload_kib.unwrap_or(0),
        limit_download_kib: spec.limit_download_kib.unwrap_or(0),
    };
    // The agents check the same contract; checking it here names the spec field up front.
    crate::repository::repository(Some(&repository)).map_err(|e| {
        Finding::new(
            INVALID_BACKEND,
            format!("{at}.{}: {}", spec_field(e.field), e.reason),
        )
    })?;
    Ok(repository)
}

#[cfg(test)]
mod tests {
    use super::*;
    use stowage_api::{LocalBackend, RestBackend, S3Backend};

    fn local() -> BackendSpec {
        BackendSpec {
            repo_password_secret_ref: SecretKeyRef {
                name: "repo".into(),
                key: "password".into(),
            },
            local: Some(LocalBackend {
                path: "/var/lib/stowage-repo".into(),
            }),
            ..Default::default()
        }
    }

    /// Field rules of the shared contract (`stowage_api::contract`) are named as spec fields; the
    /// Secrets come from the watch cache, which holds no values.
    #[tokio::test]
    async fn the_shared_contract_is_checked_and_names_spec_fields() {
        use k8s_openapi::ByteString;
        use kube::runtime::{reflector, watcher};
        let (store, mut writer) = reflector::store::<Secret>();
        let mut secret = Secret {
            data: Some([("password".to_string(), ByteString(vec![1]))].into()),
            ..Default::default()
        };
        secret.metadata.name = Some("repo".into());
        secret.metadata.namespace = Some("shop".into());
        secret.metadata.labels = Some([(contract::LABEL_CREDENTIALS.into(), "true".into())].into());
        writer.apply_watcher_event(&watcher::Event::Apply(secret));
        // A cache miss asks the API for metadata: here nothing answers, which is a read error.
        let nobody =
            kube::Client::try_from(kube::Config::new("http://127.0.0.1:1".parse().unwrap()))
                .unwrap();
        let cache = Secrets::Cache(vec![store], nobody);
        assert!(
            resolve(&cache, &[], "shop", &local(), "spec.backend")
                .await
                .is_ok()
        );
        let mut relative = local();
        relative.local = Some(LocalBackend {
            path: "repo".into(),
        });
        let e = resolve(&cache, &[], "shop", &relative, "spec.backend")
            .await
            .unwrap_err();
        assert_eq!(e.message, "spec.backend.local.path: must be absolute");
        let missing = resolve(&cache, &[], "other", &local(), "spec.backend")
            .await
            .unwrap_err();
        assert_eq!(missing.reason, SECRET_NOT_FOUND);
    }

    #[test]
    fn exactly_one_known_backend_is_required_and_named() {
        assert!(validate(&local(), "spec.backend").is_ok());
        let mut two = local();
        two.rest = Some(RestBackend {
            url: "http://x".into(),
            ..Default::default()
        });
        let e = validate(&two, "spec.backend").unwrap_err();
        assert_eq!(e.reason, INVALID_BACKEND);
        assert!(
            e.message.contains("local and rest are set"),
            "{}",
            e.message
        );
        let mut none = local();
        none.local = None;
        assert!(
            validate(&none, "spec.backend")
                .unwrap_err()
                .message
                .contains("none is set")
        );
        let unknown: BackendSpec = serde_json::from_value(serde_json::json!({
            "repoPasswordSecretRef": {"name": "r", "key": "k"},
            "gcs": {"bucket": "b"}
        }))
        .unwrap();
        let e = validate(&unknown, "spec.backend").unwrap_err();
        assert!(
            e.message
                .starts_with("spec.backend.gcs: unknown backend type"),
            "{}",
            e.message
        );
        let mut s3 = local();
        s3.local = None;
        s3.s3 = Some(S3Backend {
            endpoint: "http://127.0.0.1:9000".into(),
            bucket: "b".into(),
            ..Default::default()
        });
        let e = validate(&s3, "spec.backend").unwrap_err();
        assert!(
            e.message.contains("s3.accessKeyIDSecretRef"),
            "{}",
            e.message
        );
    }

    #[test]
    fn unknown_keys_round_trip_and_known_ones_do_not_leak_into_them() {
        let spec: BackendSpec = serde_json::from_value(serde_json::json!({
            "repoPasswordSecretRef": {"name": "r", "key": "k"},
            "local": {"path": "/r"},
            "limitUploadKiB": 100
        }))
        .unwrap();
        assert!(spec.unknown.is_empty());
        assert_eq!(spec.limit_upload_kib, Some(100));
    }
}
