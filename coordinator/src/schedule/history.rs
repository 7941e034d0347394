//! The run history: finished runs beyond `keepRuns` are deleted, newest kept.

use std::sync::Arc;

use kube::api::DeleteParams;
use kube::{Api, ResourceExt};

use super::fire::runs_of;
use crate::context::Ctx;
use crate::crd::{RunPhase, Schedule};
use crate::runs::{RunObject, is_terminal};

/// Deletes finished runs beyond `keep` (newest kept); returns the newest Succeeded completion time.
pub(super) async fn prune_history<K: RunObject>(
    ctx: &Ctx,
    s: &Schedule,
    keep: usize,
) -> Result<Option<String>, kube::Error> {
    let ns = s.namespace().unwrap_or_default();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
    let mut finished: Vec<Arc<K>> = runs_of::<K>(ctx, s)
        .into_iter()
        .filter(|r| is_terminal(r.run_status().and_then(|st| st.phase)))
        .collect();
    finished.sort_by(|a, b| {
        b.meta()
            .creation_timestamp
            .cmp(&a.meta().creation_timestamp)
            .then_with(|| b.name_any().cmp(&a.name_any()))
    });
    let last_success = finished
        .iter()
        .filter_map(|r| r.run_status())
        .filter(|st| st.phase == Some(RunPhase::Succeeded))
        .filter_map(|st| st.completion_time.clone())
        .max();
    for old in finished.iter().skip(keep) {
        match api
            .delete(&old.name_any(), &DeleteParams::background())
            .await
        {
            Ok(_) => {
                tracing::info!(namespace = %ns, run = %old.name_any(), "deleted old run (keepRuns)")
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(last_success)
}
