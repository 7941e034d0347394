//! Declared key rotation. A backend that names `previousPasswordSecretRef` beside
//! `repoPasswordSecretRef` is in rotation; before a run works with it, the coordinator makes sure
//! the current password opens the repository:
//!
//! 1. look (an agent lists the keys with each password);
//! 2. the current one opens nothing but the previous one does: add a key for the current password
//!    (opened with the previous one), and check in the same answer that it opens;
//! 3. both open, through different keys: remove the previous one's key, opened with the current
//!    password. restic takes its exclusive lock for that, so it waits until no run of the
//!    repository is running. A backend with `maintenance` credentials removes it on the maintenance
//!    container (append-only credentials may not delete keys).
//!
//! Each step is an Event on the run and the run's `KeyRotated` condition. Every state a crash can
//! leave (before the add, after it, after the removal) is one the next run's look continues from;
//! no step removes a key before the current password is seen to open the repository.

use std::time::Duration;

use kube::ResourceExt;
use stowage_proto::v1::{KeyAction, KeysRequest, KeysResponse, Repository};

use crate::agents::AgentEndpoint;
use crate::conditions::{self, Finding};
use crate::context::Ctx;
use crate::dispatch::{self, DispatchError};
use crate::errors;
use crate::run::status::StatusHandle;
use crate::runs::RunObject;
use stowage_api::BackendSpec;
use stowage_common::backend::{self, Secrets};

/// The run condition that reports the rotation.
pub const KEY_ROTATED: &str = "KeyRotated";
pub const WRONG_PASSWORDS: &str = "NoPasswordOpens";
/// One key step: restic's runs, a removal's lock wait included (the agent bounds it too).
const STEP_WITHIN: Duration = Duration::from_secs(3600);

/// Tries the ready agents in turn for one key step.
async fn on_some_agent(ctx: &Ctx, req: &KeysRequest) -> Result<KeysResponse, DispatchError> {
    let mut last = None;
    let nodes = ctx.agents.ready_nodes();
    if nodes.is_empty() {
        return Err(DispatchError::Agent {
            node: "(none)".into(),
            code: tonic::Code::Unavailable,
            message: "no Stowage agent is ready to look at the repository's keys".into(),
        });
    }
    for node in nodes {
        let ep = ctx.agents.endpoint(&node)?;
        match dispatch::keys(&ctx.agents, &ep, req.clone(), STEP_WITHIN).await {
            Ok(r) => return Ok(r),
            Err(e) if e.try_elsewhere() => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or(DispatchError::NoResult {
        node: "(none ready)".into(),
    }))
}

async fn on(
    ctx: &Ctx,
    ep: Option<&AgentEndpoint>,
    req: &KeysRequest,
) -> Result<KeysResponse, DispatchError> {
    match ep {
        Some(ep) => dispatch::keys(&ctx.agents, ep, req.clone(), STEP_WITHIN).await,
        None => on_some_agent(ctx, req).await,
    }
}

/// Reports a step: an Event on the run and its `KeyRotated` condition.
async fn report<K: RunObject>(
    ctx: &Ctx,
    run: &K,
    status: &StatusHandle,
    ok: bool,
    finding: Finding,
) {
    let generation = run.meta().generation;
    let (reason, message) = (
        finding.reason,
        errors::bounded(&finding.message, errors::CONDITION_MESSAGE_MAX),
    );
    status.run(move |s| {
        conditions::set(
            &mut s.conditions,
            KEY_ROTATED,
            ok,
            reason,
            &message,
            generation,
        );
    });
    if ok {
        ctx.notifier.normal(run, "KeyRotation", &finding).await;
    } else {
        ctx.notifier.warn(run, "KeyRotation", &finding).await;
    }
}

/// Makes the current password open the repository of `spec` (see the module's comment). `Err`
/// only when no password opens it, or a step failed before the current one worked: the run must
/// not go on. A removal that fails leaves a working key and is retried by the next run.
pub async fn ensure_current_key<K: RunObject>(
    ctx: &Ctx,
    run: &K,
    status: &StatusHandle,
    spec: &BackendSpec,
    at: &str,
    repository: &Repository,
) -> Result<(), Finding> {
    let namespace = run.namespace().unwrap_or_default();
    let secrets = Secrets::Api(ctx.client.clone());
    let Some(previous) = backend::previous_password(&secrets, &namespace, spec, at).await? else {
        return Ok(());
    };
    let failed = |what: &str, e: DispatchError| {
        Finding::new(WRONG_PASSWORDS, format!("{at}: key rotation, {what}: {e}"))
    };
    let request = |action: KeyAction, repository: &Repository| KeysRequest {
        repository: Some(repository.clone()),
        previous_password: previous.clone(),
        action: action.into(),
        namespace: namespace.clone(),
    };
    let mut state = on(ctx, None, &request(KeyAction::Status, repository))
        .await
        .map_err(|e| failed("looking at the keys", e))?;
    if !state.current_opens && !state.previous_opens {
        return Err(Finding::new(
            WRONG_PASSWORDS,
            format!(
                "{at}: neither repoPasswordSecretRef nor previousPasswordSecretRef opens the repository; nothing was changed"
            ),
        ));
    }
    if !state.current_opens {
        state = on(ctx, None, &request(KeyAction::AddCurrent, repository))
            .await
            .map_err(|e| failed("adding a key for the current password", e))?;
        if !state.current_opens {
            return Err(Finding::new(
                WRONG_PASSWORDS,
                format!(
                    "{at}: key rotation added a key for the current password but it does not open the repository; the previous key stays"
                ),
            ));
        }
        report(
            ctx,
            run,
            status,
            true,
            Finding::new(
                "KeyAdded",
                format!(
                    "{at}.repoPasswordSecretRef: added key {} for the current password (opened with previousPasswordSecretRef) and checked that it opens the repository",
                    short(&state.current_key_id)
                ),
            ),
        )
        .await;
    }
    if state.previous_opens && state.previous_key_id != state.current_key_id {
        // Append-only credentials may not delete a key: the maintenance side removes it.
        let maintenance = backend::maintenance_spec(spec, at)?;
        let (target, repo) = match maintenance {
            None => (None, repository.clone()),
            Some(m) => match ctx.agents.maintenance_endpoint() {
                Some(ep) => {
                    let repo = backend::resolve(
                        &secrets,
                        &ctx.config.allowed_endpoint,
                        &namespace,
                        &m,
                        &format!("{at}.maintenance"),
                    )
                    .await?;
                    (Some(ep), repo)
                }
                None => {
                    report(ctx, run, status, false, Finding::new(
                        "PreviousKeyKept",
                        format!("{at}.maintenance: the previous password's key {} stays: removing it needs the maintenance credentials, and this coordinator has no maintenance container", short(&state.previous_key_id)),
                    )).await;
                    return Ok(());
                }
            },
        };
        let removed = on(
            ctx,
            target.as_ref(),
            &request(KeyAction::RemovePrevious, &repo),
        )
        .await;
        match removed {
            Ok(after) if after.current_opens && !after.previous_opens => {
                report(
                    ctx,
                    run,
                    status,
                    true,
                    Finding::new(
                        "PreviousKeyRemoved",
                        format!(
                            "{at}.previousPasswordSecretRef: removed the previous password's key {}; only the current password opens the repository now ({} key(s) left). Remove previousPasswordSecretRef",
                            short(&state.previous_key_id),
                            after.keys
                        ),
                    ),
                )
                .await;
            }
            Ok(_) => {
                report(ctx, run, status, false, Finding::new(
                    "PreviousKeyKept",
                    format!("{at}.previousPasswordSecretRef: the previous password still opens the repository after the removal; the next run tries again"),
                )).await;
            }
            Err(e) => {
                report(
                    ctx,
                    run,
                    status,
                    false,
                    Finding::new(
                        "PreviousKeyKept",
                        format!(
                            "{at}.previousPasswordSecretRef: the previous password's key stays (the current one works); removing it failed: {e}. The next run tries again"
                        ),
                    ),
                )
                .await;
            }
        }
    }
    Ok(())
}

fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}
