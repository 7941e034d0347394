use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use serde::Serialize;
use stowage_api::{Backup, RunPhase, Schedule};

use crate::PluginError;
use crate::connect::Connection;
use crate::output::{columns, or_dash};

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub schedules: Vec<ScheduleRow>,
    pub volumes: Vec<VolumeRow>,
    pub agents: Vec<AgentRow>,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleRow {
    pub namespace: String,
    pub name: String,
    pub backup: Option<String>,
    pub paused: bool,
    pub ready: Option<String>,
    pub last_success: Option<String>,
    pub next_backup: Option<String>,
}

/// The newest successful backup of a volume (or backup command) among the Backup runs kept.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct VolumeRow {
    pub namespace: String,
    /// The PVC, or `command <owner>/<container>`.
    pub name: String,
    pub last_success: String,
    pub snapshot: Option<String>,
    pub node: Option<String>,
    pub run: String,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct AgentRow {
    pub node: String,
    pub namespace: String,
    pub pod: String,
    pub ready: bool,
    pub restarts: i32,
    pub ip: Option<String>,
}

pub async fn gather(conn: &Connection, all: bool) -> Result<Status, PluginError> {
    let (schedules, backups): (Api<Schedule>, Api<Backup>) = if all {
        (Api::all(conn.client.clone()), Api::all(conn.client.clone()))
    } else {
        (
            Api::namespaced(conn.client.clone(), &conn.namespace),
            Api::namespaced(conn.client.clone(), &conn.namespace),
        )
    };
    let lp = ListParams::default();
    let schedules = schedules
        .list(&lp)
        .await
        .map_err(PluginError::api("listing Schedules"))?;
    let backups = backups
        .list(&lp)
        .await
        .map_err(PluginError::api("listing Backups"))?;
    let agents = Api::<Pod>::all(conn.client.clone())
        .list(&ListParams::default().labels("app.kubernetes.io/name=stowage-agent"))
        .await
        .map_err(PluginError::api("listing the agent pods"))?;

    let schedules = schedules
        .items
        .iter()
        .map(|s| {
            let st = s.status.as_ref();
            ScheduleRow {
                namespace: s.metadata.namespace.clone().unwrap_or_default(),
                name: s.metadata.name.clone().unwrap_or_default(),
                backup: s.spec.backup.as_ref().map(|b| b.schedule.clone()),
                paused: s.spec.paused,
                ready: st.and_then(|st| {
                    st.conditions.iter().find(|c| c.type_ == "Ready").map(|c| {
                        if c.status == "True" {
                            "True".to_string()
                        } else {
                            format!("{}: {}", c.reason, c.message)
                        }
                    })
                }),
                last_success: st.and_then(|st| st.last_success_time.clone()),
                next_backup: st.and_then(|st| st.next_runs.as_ref()?.backup.clone()),
            }
        })
        .collect();

    // Newest success per (namespace, item), by the run's completion time.
    let mut newest: BTreeMap<(String, String), VolumeRow> = BTreeMap::new();
    for b in &backups.items {
        let Some(st) = &b.status else { continue };
        let Some(done) = st.completion_time.clone() else {
            continue;
        };
        for item in st.items.iter().filter(|i| i.phase == RunPhase::Succeeded) {
            let key = (item.namespace.clone(), item.name());
            if newest.get(&key).is_some_and(|v| v.last_success >= done) {
                continue;
            }
            newest.insert(
                key.clone(),
                VolumeRow {
                    namespace: key.0,
                    name: key.1,
                    last_success: done.clone(),
                    snapshot: item.snapshot_id.clone(),
                    node: item.node.clone(),
                    run: b.metadata.name.clone().unwrap_or_default(),
                },
            );
        }
    }

    let mut agents: Vec<AgentRow> = agents
        .items
        .iter()
        .map(|p| {
            let st = p.status.as_ref();
            AgentRow {
                node: p
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .unwrap_or_default(),
                namespace: p.metadata.namespace.clone().unwrap_or_default(),
                pod: p.metadata.name.clone().unwrap_or_default(),
                ready: st
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
                restarts: st
                    .and_then(|s| s.container_statuses.as_ref())
                    .map(|cs| cs.iter().map(|c| c.restart_count).sum())
                    .unwrap_or(0),
                ip: st.and_then(|s| s.pod_ip.clone()),
            }
        })
        .collect();
    agents.sort_by(|a, b| (&a.node, &a.namespace, &a.pod).cmp(&(&b.node, &b.namespace, &b.pod)));
    Ok(Status {
        schedules,
        volumes: newest.into_values().collect(),
        agents,
    })
}

pub fn table(s: &Status) -> String {
    let mut out = String::from("SCHEDULES\n");
    out += &columns(
        &[
            "NAMESPACE",
            "NAME",
            "BACKUP",
            "READY",
            "LAST SUCCESS",
            "NEXT BACKUP",
        ],
        &s.schedules
            .iter()
            .map(|r| {
                vec![
                    r.namespace.clone(),
                    r.name.clone(),
                    if r.paused {
                        "paused".into()
                    } else {
                        or_dash(r.backup.as_ref())
                    },
                    or_dash(r.ready.as_ref()),
                    or_dash(r.last_success.as_ref()),
                    or_dash(r.next_backup.as_ref()),
                ]
            })
            .collect::<Vec<_>>(),
    );
    out += "\nVOLUMES (newest successful backup among the runs kept)\n";
    out += &columns(
        &[
            "NAMESPACE",
            "VOLUME",
            "LAST SUCCESS",
            "SNAPSHOT",
            "NODE",
            "RUN",
        ],
        &s.volumes
            .iter()
            .map(|v| {
                vec![
                    v.namespace.clone(),
                    v.name.clone(),
                    v.last_success.clone(),
                    or_dash(
                        v.snapshot
                            .as_ref()
                            .map(|id| id.chars().take(8).collect::<String>()),
                    ),
                    or_dash(v.node.as_ref()),
                    v.run.clone(),
                ]
            })
            .collect::<Vec<_>>(),
    );
    out += "\nAGENTS\n";
    out += &columns(
        &["NODE", "NAMESPACE", "POD", "READY", "RESTARTS", "IP"],
        &s.agents
            .iter()
            .map(|a| {
                vec![
                    a.node.clone(),
                    a.namespace.clone(),
                    a.pod.clone(),
                    if a.ready { "yes".into() } else { "NO".into() },
                    a.restarts.to_string(),
                    or_dash(a.ip.as_ref()),
                ]
            })
            .collect::<Vec<_>>(),
    );
    out
}
