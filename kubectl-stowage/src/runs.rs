use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use kube::api::{Api, PostParams};
use serde::Serialize;
use serde::de::DeserializeOwned;
use stowage_api::{Backup, Restore, RunPhase, RunStatus};

use crate::PluginError;
use crate::cli::{BackupNowArgs, Format, RestoreArgs};
use crate::connect::Connection;
use crate::snapshots::schedule;

/// A valid object name: `<prefix>-<UTC time>`, the prefix cut so the whole fits in 63 characters.
pub fn run_name(prefix: &str, now: chrono::DateTime<chrono::Utc>) -> String {
    let stamp = now.format("%Y%m%d-%H%M%S").to_string();
    let clean: String = prefix
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let room = 63 - stamp.len() - 1;
    let cut: String = clean.chars().take(room).collect();
    format!(
        "{}-{stamp}",
        cut.trim_end_matches('-').trim_start_matches('-')
    )
}

pub async fn backup_now(
    conn: &Connection,
    args: &BackupNowArgs,
    format: Format,
) -> Result<i32, PluginError> {
    // Fails early with a clear message when the Schedule does not exist.
    schedule(conn, Some(&args.schedule)).await?;
    let name = run_name(&format!("{}-now", args.schedule), chrono::Utc::now());
    let obj: Backup = serde_json::from_value(serde_json::json!({
        "apiVersion": "stowage.dev/v1alpha1", "kind": "Backup",
        "metadata": {"name": name, "labels": {"stowage.dev/created-by": "kubectl-stowage"}},
        "spec": {"scheduleRef": {"name": args.schedule}}
    }))
    .map_err(|e| PluginError::Output(e.to_string()))?;
    let api: Api<Backup> = Api::namespaced(conn.client.clone(), &conn.namespace);
    api.create(&PostParams::default(), &obj)
        .await
        .map_err(PluginError::api(format!(
            "creating Backup {}/{name}",
            conn.namespace
        )))?;
    eprintln!("backup {}/{name} created", conn.namespace);
    if !args.wait {
        return Ok(0);
    }
    let done = follow(&api, &name, args.timeout, |st| {
        let items = st.items.len();
        let fine = st.items.iter().filter(|i| i.phase.is_fine()).count();
        let pct = if items == 0 {
            0.0
        } else {
            st.items
                .iter()
                .map(|i| {
                    if i.phase.is_fine() {
                        100.0
                    } else {
                        i.percent_done.unwrap_or(0.0) * 100.0
                    }
                })
                .sum::<f64>()
                / items as f64
        };
        (pct, format!("{fine}/{items} items"))
    })
    .await?;
    finish("backup", &done, format, |st| {
        st.items
            .iter()
            .map(|i| {
                format!(
                    "  {:<30} {:<10} {}",
                    i.name(),
                    format!("{:?}", i.phase),
                    i.error
                        .clone()
                        .or(i
                            .snapshot_id
                            .as_ref()
                            .map(|s| format!("snapshot {}", &s[..s.len().min(8)])))
                        .unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    })
}

pub async fn restore(
    conn: &Connection,
    args: &RestoreArgs,
    format: Format,
) -> Result<i32, PluginError> {
    let s = schedule(conn, args.schedule.as_deref()).await?;
    if !["Merge", "Replace", "IntoEmpty"].contains(&args.mode.as_str()) {
        return Err(PluginError::Usage(format!(
            "--mode {:?}: use Merge, Replace or IntoEmpty",
            args.mode
        )));
    }
    let name = run_name(&format!("restore-{}", args.pvc), chrono::Utc::now());
    let mut source = serde_json::json!({"pvc": args.pvc});
    match (&args.snapshot, &args.before) {
        (Some(id), _) => source["snapshot"] = id.clone().into(),
        (None, Some(t)) => source["before"] = t.clone().into(),
        (None, None) => source["snapshot"] = "latest".into(),
    }
    if !args.paths.is_empty() {
        source["include"] = args.paths.clone().into();
    }
    let mut target = serde_json::json!({"mode": args.mode});
    if let Some(p) = &args.target_pvc {
        target["pvc"] = p.clone().into();
    }
    if let Some(p) = &args.target_path {
        target["path"] = p.clone().into();
    }
    let obj: Restore = serde_json::from_value(serde_json::json!({
        "apiVersion": "stowage.dev/v1alpha1", "kind": "Restore",
        "metadata": {"name": name, "labels": {"stowage.dev/created-by": "kubectl-stowage"}},
        "spec": {"scheduleRef": {"name": s.metadata.name}, "source": source, "target": target,
                 "dryRun": args.dry_run}
    }))
    .map_err(|e| PluginError::Output(e.to_string()))?;
    let api: Api<Restore> = Api::namespaced(conn.client.clone(), &conn.namespace);
    api.create(&PostParams::default(), &obj)
        .await
        .map_err(PluginError::api(format!(
            "creating Restore {}/{name}",
            conn.namespace
        )))?;
    eprintln!("restore {}/{name} created", conn.namespace);
    let done = follow(&api, &name, args.timeout, |st| {
        let r = st.restore.clone().unwrap_or_default();
        let snap = r
            .snapshot_id
            .map(|s| format!("snapshot {s}"))
            .unwrap_or_else(|| "resolving the snapshot".into());
        let node = r.node.map(|n| format!(" on {n}")).unwrap_or_default();
        (
            r.percent_done.unwrap_or(0.0) * 100.0,
            format!("{snap}{node}"),
        )
    })
    .await?;
    finish("restore", &done, format, |st| {
        let r = st.restore.clone().unwrap_or_default();
        if let Some(p) = &r.preview {
            return preview_table(&r, p);
        }
        format!(
            "  snapshot {} ({}) into {}{} on {}: {} files, {} bytes in {:.1}s",
            r.snapshot_id.unwrap_or_default(),
            r.snapshot_time.unwrap_or_default(),
            r.pvc.unwrap_or_default(),
            r.path.map(|p| format!(":{p}")).unwrap_or_default(),
            r.node.unwrap_or_default(),
            r.files_restored.unwrap_or(0),
            r.bytes_restored.unwrap_or(0),
            r.duration_seconds.unwrap_or(0.0)
        )
    })
}

/// A dry run's findings as a table: per kind, the count, the bytes and the first paths (`-o json`
/// gives every path the status holds).
fn preview_table(r: &stowage_api::RestoreOutcome, p: &stowage_api::RestorePreview) -> String {
    const SHOWN: usize = 5;
    let mut out = format!(
        "  dry run of snapshot {} into {}{} on {} ({}): nothing was written\n",
        r.snapshot_id.as_deref().unwrap_or_default(),
        r.pvc.as_deref().unwrap_or_default(),
        r.path
            .as_deref()
            .map(|p| format!(":{p}"))
            .unwrap_or_default(),
        r.node.as_deref().unwrap_or_default(),
        r.mode.map(|m| format!("{m:?}")).unwrap_or_default(),
    );
    out.push_str(&format!(
        "  {:<10} {:>9} {:>12}  FIRST PATHS\n",
        "WOULD", "ENTRIES", "BYTES"
    ));
    for (kind, set) in [
        ("add", &p.added),
        ("change", &p.changed),
        ("delete", &p.deleted),
    ] {
        let mut shown = set
            .paths
            .iter()
            .take(SHOWN)
            .cloned()
            .collect::<Vec<_>>()
            .join(" ");
        if set.entries > SHOWN.min(set.paths.len()) as u64 {
            shown.push_str(&format!(
                " (and {} more)",
                set.entries - SHOWN.min(set.paths.len()) as u64
            ));
        }
        out.push_str(&format!(
            "  {kind:<10} {:>9} {:>12}  {shown}\n",
            set.entries, set.bytes
        ));
    }
    out.push_str(&format!("  {:<10} {:>9}", "keep", p.unchanged));
    out
}

/// A run object as followed: its name and last status.
#[derive(Serialize)]
pub struct Followed {
    pub name: String,
    pub status: RunStatus,
}

/// Polls the run once a second until it finishes or `timeout` passes, drawing a progress bar on
/// stderr (a line per change when stderr is not a terminal).
async fn follow<K>(
    api: &Api<K>,
    name: &str,
    timeout: Duration,
    progress: impl Fn(&RunStatus) -> (f64, String),
) -> Result<Followed, PluginError>
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug + HasRunStatus,
{
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut last_line = String::new();
    loop {
        let obj = api
            .get(name)
            .await
            .map_err(PluginError::api(format!("reading {name}")))?;
        let st = obj.run_status().unwrap_or_default();
        let finished = matches!(
            st.phase,
            Some(RunPhase::Succeeded | RunPhase::Failed | RunPhase::PartiallyFailed)
        );
        let (pct, what) = progress(&st);
        let pct = if st.phase == Some(RunPhase::Succeeded) {
            100.0
        } else {
            pct.clamp(0.0, 100.0)
        };
        let filled = (pct / 5.0).round() as usize;
        let line = format!(
            "[{}{}] {pct:5.1}%  {}  {what}",
            "#".repeat(filled),
            "-".repeat(20 - filled.min(20)),
            st.phase
                .map(|p| format!("{p:?}"))
                .unwrap_or_else(|| "Pending".into())
        );
        let line = crate::output::terminal_safe(&line);
        if line != last_line {
            let mut err = std::io::stderr();
            if tty {
                let _ = write!(err, "\r\x1b[2K{line}");
            } else {
                let _ = writeln!(err, "{line}");
            }
            let _ = err.flush();
            last_line = line;
        }
        if finished {
            if tty {
                eprintln!();
            }
            return Ok(Followed {
                name: name.to_string(),
                status: st,
            });
        }
        if started.elapsed() >= timeout {
            if tty {
                eprintln!();
            }
            return Err(PluginError::Usage(format!(
                "{name} did not finish within {}s (it keeps running; follow it with kubectl get)",
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Prints the outcome; exit code 0 only for Succeeded, else 1 with the reason.
fn finish(
    kind: &str,
    done: &Followed,
    format: Format,
    detail: impl Fn(&RunStatus) -> String,
) -> Result<i32, PluginError> {
    match format {
        Format::Json | Format::Yaml => crate::output::print(done, format, |_| String::new())?,
        Format::Table => {}
    }
    let st = &done.status;
    if st.phase == Some(RunPhase::Succeeded) {
        if format == Format::Table {
            println!("{kind} {} succeeded", done.name);
            println!("{}", crate::output::terminal_safe(&detail(st)));
        }
        return Ok(0);
    }
    let reason = st
        .conditions
        .iter()
        .find(|c| c.type_ == "Succeeded" || c.status == "False")
        .map(|c| format!("{}: {}", c.reason, c.message))
        .unwrap_or_else(|| "no reason recorded".into());
    eprintln!(
        "{kind} {} {:?}: {}",
        done.name,
        st.phase.unwrap_or_default(),
        crate::output::terminal_safe(&reason)
    );
    if format == Format::Table {
        eprintln!("{}", crate::output::terminal_safe(&detail(st)));
    }
    Ok(1)
}

/// Run objects whose status this plugin follows.
pub trait HasRunStatus {
    fn run_status(&self) -> Option<RunStatus>;
}

impl HasRunStatus for Backup {
    fn run_status(&self) -> Option<RunStatus> {
        self.status.clone()
    }
}

impl HasRunStatus for Restore {
    fn run_status(&self) -> Option<RunStatus> {
        self.status.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_names_fit_and_stay_valid() {
        let t = chrono::DateTime::parse_from_rfc3339("2026-11-26T02:03:04Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(run_name("restore-data", t), "restore-data-20261126-020304");
        let long = run_name(&format!("restore-{}", "x".repeat(300)), t);
        assert_eq!(long.len(), 63);
        assert!(long.ends_with("-20261126-020304"));
        assert_eq!(
            run_name("Restore_DATA.1-", t),
            "restore-data-1-20261126-020304"
        );
    }
}
