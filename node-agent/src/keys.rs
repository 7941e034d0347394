//! Repository keys: which key the current and the previous password open, and the two steps of a
//! declared rotation (the coordinator decides which, `coordinator/src/rotation.rs`):
//!
//! - add a key for the current password, opening the repository with the previous one (an
//!   append: allowed with append-only credentials);
//! - remove the previous password's key, opening the repository with the current one, which must
//!   open it first: the repository is never left without a working key. restic takes its
//!   exclusive lock for the removal, so it waits for every running operation.
//!
//! Like Check and Prune, restic runs here without a sandbox: it reads no tenant's volume. The new
//! password reaches restic on its stdin, never in its arguments or environment.

use stowage_proto::v1::{KeyAction, KeysRequest, KeysResponse};

use crate::context::AgentContext;
use crate::error::AgentError;
use crate::memory::Operation;
use crate::repository;

/// What one password opens: `None` for a wrong password, else the key and its creation time.
async fn opens(restic: &restic_wrap::Restic) -> Result<Option<(String, String, u32)>, AgentError> {
    match restic.keys().await {
        Ok(keys) => {
            let count = u32::try_from(keys.len()).unwrap_or(u32::MAX);
            Ok(keys
                .into_iter()
                .find(|k| k.current)
                .map(|k| (k.id, created_rfc3339(&k.created), count)))
        }
        Err(restic_wrap::Error::WrongPassword { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// restic's `2006-01-02 15:04:05` (the agent's local time, UTC in its image) as RFC 3339.
pub fn created_rfc3339(created: &str) -> String {
    chrono::NaiveDateTime::parse_from_str(created, "%Y-%m-%d %H:%M:%S")
        .map(|t| {
            t.and_utc()
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        })
        .unwrap_or_default()
}

async fn status(
    current: &restic_wrap::Restic,
    previous: Option<&restic_wrap::Restic>,
) -> Result<KeysResponse, AgentError> {
    let mut r = KeysResponse::default();
    if let Some((id, created, count)) = opens(current).await? {
        r.current_opens = true;
        r.current_key_id = id;
        r.current_key_created = created;
        r.keys = count;
    }
    if let Some(previous) = previous
        && let Some((id, _, count)) = opens(previous).await?
    {
        r.previous_opens = true;
        r.previous_key_id = id;
        r.keys = r.keys.max(count);
    }
    Ok(r)
}

pub async fn handle(ctx: &AgentContext, req: KeysRequest) -> Result<KeysResponse, AgentError> {
    let repo = repository::from_proto(req.repository.as_ref(), &ctx.local_roots)?;
    let action = KeyAction::try_from(req.action).unwrap_or(KeyAction::Status);
    let need = ctx.memory_estimate(Operation::Read, &repo);
    let _slot = ctx
        .limiter
        .acquire(&req.namespace, need)
        .await
        .ok_or(AgentError::ShuttingDown)?;
    let current_password = repo.password.clone();
    let current = ctx.restic(repo.clone(), req.repository.as_ref(), None);
    let previous = (!req.previous_password.is_empty()).then(|| {
        let mut old = repo.clone();
        old.password = req.previous_password.clone();
        ctx.restic(old, req.repository.as_ref(), None)
    });
    match action {
        KeyAction::Status => {}
        KeyAction::AddCurrent => {
            let previous = previous.as_ref().ok_or_else(|| {
                AgentError::InvalidArgument("adding a key needs the previous password".into())
            })?;
            previous.key_add(&current_password).await?;
            tracing::info!(repository = %repo.location(), "added a key for the current password");
        }
        KeyAction::RemovePrevious => {
            let before = status(&current, previous.as_ref()).await?;
            if !before.current_opens {
                return Err(AgentError::InvalidArgument(
                    "the current password does not open the repository; the previous key stays"
                        .into(),
                ));
            }
            if before.previous_opens && before.previous_key_id != before.current_key_id {
                current.key_remove(&before.previous_key_id).await?;
                tracing::info!(repository = %repo.location(), key = %before.previous_key_id, "removed the previous password's key");
            }
        }
    }
    status(&current, previous.as_ref()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restic_key_times_become_rfc3339() {
        assert_eq!(
            created_rfc3339("2026-12-06 14:02:03"),
            "2026-12-06T14:02:03Z"
        );
        assert_eq!(created_rfc3339("yesterday"), "");
    }
}
