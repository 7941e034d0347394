use kube::Api;
use kube::api::ListParams;
use restic_wrap::options::SnapshotsOptions;
use serde::Serialize;
use stowage_api::Schedule;
use stowage_api::contract::{TAG_NAMESPACE, TAG_PVC};
use stowage_common::backend::{self, Secrets};

use crate::PluginError;
use crate::cli::SnapshotsArgs;
use crate::connect::Connection;
use crate::output::{columns, or_dash};

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRow {
    pub id: String,
    pub short_id: String,
    pub time: String,
    pub namespace: String,
    pub pvc: Option<String>,
    pub host: String,
    pub paths: Vec<String>,
    pub tags: Vec<String>,
}

/// The Schedule named, or the namespace's only one.
pub async fn schedule(conn: &Connection, name: Option<&str>) -> Result<Schedule, PluginError> {
    let api: Api<Schedule> = Api::namespaced(conn.client.clone(), &conn.namespace);
    if let Some(name) = name {
        return api.get(name).await.map_err(PluginError::api(format!(
            "reading Schedule {}/{name}",
            conn.namespace
        )));
    }
    let mut all = api
        .list(&ListParams::default())
        .await
        .map_err(PluginError::api("listing Schedules"))?
        .items;
    match all.len() {
        1 => Ok(all.remove(0)),
        0 => Err(PluginError::Usage(format!(
            "namespace {} has no Schedule; name the repository's Schedule with --schedule",
            conn.namespace
        ))),
        n => Err(PluginError::Usage(format!(
            "namespace {} has {n} Schedules; choose one with --schedule",
            conn.namespace
        ))),
    }
}

/// Lists the namespace's snapshots (one PVC's with `--pvc`) from the Schedule's repository with
/// restic, with the repository credentials read from the Schedule's Secrets (so the caller needs
/// to be allowed to read them).
pub async fn list(
    conn: &Connection,
    args: &SnapshotsArgs,
) -> Result<Vec<SnapshotRow>, PluginError> {
    let s = schedule(conn, args.schedule.as_deref()).await?;
    let name = s.metadata.name.clone().unwrap_or_default();
    let repo = backend::resolve(
        &Secrets::Api(conn.client.clone()),
        // The coordinator's endpoint allow-list is the administrator's rule for the coordinator's
        // rights; here restic runs with the caller's own. The credentials label still applies:
        // a Schedule someone else wrote must not send the caller's Secrets to its endpoint.
        &[],
        &conn.namespace,
        &s.spec.backend,
        "spec.backend",
    )
    .await
    .map_err(|f| PluginError::Repository {
        schedule: name.clone(),
        reason: f.message,
    })?;
    let repo = stowage_common::repository::repository(Some(&repo)).map_err(|e| {
        PluginError::Repository {
            schedule: name.clone(),
            reason: e.to_string(),
        }
    })?;
    let mut tags = vec![format!("{TAG_NAMESPACE}={}", conn.namespace)];
    if let Some(pvc) = &args.pvc {
        tags.push(format!("{TAG_PVC}={pvc}"));
    }
    let restic = restic_wrap::Restic::new(&args.restic, repo);
    let mut snaps = restic
        .snapshots(&SnapshotsOptions {
            tags,
            ..Default::default()
        })
        .await?;
    snaps.sort_by_key(|s| s.timestamp());
    Ok(snaps
        .into_iter()
        .map(|s| SnapshotRow {
            namespace: s.tag_value(TAG_NAMESPACE).unwrap_or_default().to_string(),
            pvc: s.tag_value(TAG_PVC).map(String::from),
            id: s.id,
            short_id: s.short_id,
            time: s.time,
            host: s.hostname,
            paths: s.paths,
            tags: s.tags,
        })
        .collect())
}

pub fn table(rows: &[SnapshotRow]) -> String {
    columns(
        &["ID", "TIME", "PVC", "HOST"],
        &rows
            .iter()
            .map(|r| {
                vec![
                    r.short_id.clone(),
                    r.time
                        .chars()
                        .take(19)
                        .collect::<String>()
                        .replace('T', " "),
                    or_dash(r.pvc.as_ref()),
                    r.host.clone(),
                ]
            })
            .collect::<Vec<_>>(),
    )
}
