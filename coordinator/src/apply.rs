//! Every status the coordinator writes goes through here: a server-side apply of the whole status
//! by one field manager. A field that became empty is simply left out and the API server drops it;
//! nothing is merged with nulls.

use kube::api::{Patch, PatchParams};
use kube::{Api, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The field manager of everything the coordinator writes.
pub const FIELD_MANAGER: &str = "stowage-coordinator";

/// Applies `status` to object `name`. With `resource_version`, the write succeeds only on exactly
/// that version of the object (409 otherwise).
pub async fn status<K>(
    api: &Api<K>,
    name: &str,
    status: &impl Serialize,
    resource_version: Option<&str>,
) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let mut body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": {"name": name},
        "status": status,
    });
    if let Some(rv) = resource_version {
        body["metadata"]["resourceVersion"] = rv.into();
    }
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map(drop)
}
