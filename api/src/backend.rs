//! Where a repository lives, and the Secrets that open it: the `backend` block every Schedule and
//! run carries.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A key of a Secret in the object's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    pub name: String,
    pub key: String,
}

/// Where the restic repository lives. Exactly one of `local`, `s3`, `rest` must be set (checked by
/// the controller, which reports the field in a condition). Unknown keys are kept rather than pruned
/// by the API server, so a typo or an unsupported backend type (`gcs:`) is reported by name instead
/// of silently disappearing.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct BackendSpec {
    pub repo_password_secret_ref: SecretKeyRef,
    /// The password `repoPasswordSecretRef` replaces, during a rotation: when the current one does
    /// not open the repository and this one does, the coordinator adds a key for the current
    /// password, checks it, and removes this one's key (docs/hardening.md). Remove the field once
    /// the Schedule's `KeyRotated` Events say so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_password_secret_ref: Option<SecretKeyRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalBackend>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Backend>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rest: Option<RestBackend>,
    /// Upload bandwidth limit for restic, KiB/s.
    #[serde(
        default,
        rename = "limitUploadKiB",
        skip_serializing_if = "Option::is_none"
    )]
    pub limit_upload_kib: Option<u32>,
    /// Download bandwidth limit for restic, KiB/s.
    #[serde(
        default,
        rename = "limitDownloadKiB",
        skip_serializing_if = "Option::is_none"
    )]
    pub limit_download_kib: Option<u32>,
    /// Whether a run may create the repository when it does not exist. `true`: always; `false`:
    /// never. Unset: only the runs of a Schedule that has never had a successful backup (its first
    /// runs); a hand-made run with its own backend never. A typo in a bucket, prefix or path must not
    /// silently start a new, empty history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initialize: Option<bool>,
    /// Credentials that may delete, for Prune (forget and prune) only, when the ones above are
    /// append-only (docs/hardening.md). They never reach a node agent: such Prunes run on the
    /// coordinator's maintenance container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<MaintenanceAccess>,
    /// Keys this version does not know; the controller names them in a condition.
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(skip)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// Maintenance access to the same repository: for an `s3` backend other keys, for a `rest` one
/// another user and, if it is served elsewhere, another URL (the same repository).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MaintenanceAccess {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<MaintenanceS3>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rest: Option<MaintenanceRest>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MaintenanceS3 {
    #[serde(rename = "accessKeyIDSecretRef")]
    pub access_key_id_secret_ref: SecretKeyRef,
    pub secret_access_key_secret_ref: SecretKeyRef,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MaintenanceRest {
    /// Default: the backend's `rest.url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_secret_ref: Option<SecretKeyRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
}

/// A directory that exists on every node and is seen by the agents at this path.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalBackend {
    pub path: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Backend {
    pub endpoint: String,
    pub bucket: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(rename = "accessKeyIDSecretRef")]
    pub access_key_id_secret_ref: SecretKeyRef,
    pub secret_access_key_secret_ref: SecretKeyRef,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestBackend {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_secret_ref: Option<SecretKeyRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
}
