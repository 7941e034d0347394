//! Pre- and post-backup hooks of one pod, shared by the tasks of its volumes: the pre-hook runs once,
//! before the first of them reads anything; the post-hook once, after the last of them ended,
//! whether it succeeded or not. The agent of the pod's node runs them (the exec API).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use stowage_api::contract::{
    ANNOTATION_HOOK_CONTAINER, ANNOTATION_HOOK_ON_ERROR, ANNOTATION_HOOK_TIMEOUT,
    ANNOTATION_POST_BACKUP_COMMAND, ANNOTATION_PRE_BACKUP_COMMAND,
};
use stowage_proto::v1::HookRequest;
use tokio::sync::OnceCell;

use crate::context::Ctx;
use crate::dispatch;
use stowage_api::HookOutcome;

/// A hook's time limit unless annotated.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// The agent's own API calls around a hook, on top of its time limit.
const CALL_MARGIN: Duration = Duration::from_secs(120);

/// What the annotations of a pod ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookSpec {
    pub pre: Option<String>,
    pub post: Option<String>,
    pub container: String,
    pub timeout: Duration,
    /// `hook-on-error: Continue`: back the volumes up even when the pre-hook failed.
    pub continue_on_error: bool,
}

impl HookSpec {
    /// The pod's hooks, or `None` when it has none; a bad value is an error naming the annotation.
    pub fn from_annotations(a: &BTreeMap<String, String>) -> Result<Option<HookSpec>, String> {
        let command = |k: &str| {
            a.get(k)
                .map(|c| c.trim().to_string())
                .filter(|c| !c.is_empty())
        };
        let (pre, post) = (
            command(ANNOTATION_PRE_BACKUP_COMMAND),
            command(ANNOTATION_POST_BACKUP_COMMAND),
        );
        if pre.is_none() && post.is_none() {
            return Ok(None);
        }
        let timeout = match a.get(ANNOTATION_HOOK_TIMEOUT) {
            None => DEFAULT_TIMEOUT,
            Some(v) => crate::config::parse_duration(v)
                .ok()
                .filter(|d| !d.is_zero() && d.as_secs() <= 24 * 3600)
                .ok_or_else(|| {
                    format!("annotation {ANNOTATION_HOOK_TIMEOUT}: {v:?} is not a duration between 1s and 24h (e.g. 30s, 5m)")
                })?,
        };
        let continue_on_error = match a.get(ANNOTATION_HOOK_ON_ERROR).map(String::as_str) {
            None | Some("Fail") => false,
            Some("Continue") => true,
            Some(other) => {
                return Err(format!(
                    "annotation {ANNOTATION_HOOK_ON_ERROR}: {other:?} is neither Fail nor Continue"
                ));
            }
        };
        Ok(Some(HookSpec {
            pre,
            post,
            container: a
                .get(ANNOTATION_HOOK_CONTAINER)
                .cloned()
                .unwrap_or_default(),
            timeout,
            continue_on_error,
        }))
    }
}

/// The hooks of one pod in one run.
pub struct PodHooks {
    pub spec: HookSpec,
    pub run_id: String,
    pub namespace: String,
    pub pod: String,
    pub node: String,
    pre: OnceCell<Option<HookOutcome>>,
    /// Volume tasks of the pod that have not ended yet.
    remaining: AtomicUsize,
    post: OnceCell<Option<HookOutcome>>,
}

impl PodHooks {
    pub fn new(
        spec: HookSpec,
        run_id: &str,
        namespace: &str,
        pod: &str,
        node: &str,
        volumes: usize,
    ) -> Self {
        Self {
            spec,
            run_id: run_id.into(),
            namespace: namespace.into(),
            pod: pod.into(),
            node: node.into(),
            pre: OnceCell::new(),
            remaining: AtomicUsize::new(volumes),
            post: OnceCell::new(),
        }
    }

    async fn run(&self, ctx: &Ctx, kind: &str, command: &str) -> HookOutcome {
        let req = HookRequest {
            run_id: self.run_id.clone(),
            namespace: self.namespace.clone(),
            pod: self.pod.clone(),
            container: self.spec.container.clone(),
            command: command.to_string(),
            timeout_seconds: u32::try_from(self.spec.timeout.as_secs()).unwrap_or(u32::MAX),
            kind: kind.into(),
        };
        let within = self.spec.timeout + CALL_MARGIN;
        match dispatch::run_hook(&ctx.agents, &self.node, req, within).await {
            Ok(r) => HookOutcome {
                exit_code: r.exit_code,
                duration_seconds: (r.duration_seconds * 1000.0).round() / 1000.0,
                timed_out: r.timed_out,
                error: (r.exit_code != 0).then(|| {
                    let how = if r.timed_out {
                        format!(
                            "did not finish within {}s and was killed",
                            self.spec.timeout.as_secs()
                        )
                    } else {
                        format!("exited with status {}", r.exit_code)
                    };
                    let stderr = crate::errors::bounded(r.stderr.trim(), 300);
                    if stderr.is_empty() {
                        format!("{kind}-backup hook `{command}` {how}")
                    } else {
                        format!("{kind}-backup hook `{command}` {how}: {stderr}")
                    }
                }),
            },
            Err(e) => HookOutcome {
                exit_code: -1,
                duration_seconds: 0.0,
                timed_out: false,
                error: Some(format!("{kind}-backup hook `{command}` could not run: {e}")),
            },
        }
    }

    /// How many volume tasks of the pod this attempt runs (a resumed run skips volumes already
    /// backed up): the post-hook runs after the last of them.
    pub fn set_tasks(&self, n: usize) {
        self.remaining.store(n, Ordering::Release);
    }

    /// The pre-hook's outcome, running it the first time (`None`: the pod has none).
    pub async fn pre(&self, ctx: &Ctx) -> Option<HookOutcome> {
        self.pre
            .get_or_init(|| async {
                match &self.spec.pre {
                    Some(c) => Some(self.run(ctx, "pre", c).await),
                    None => None,
                }
            })
            .await
            .clone()
    }

    /// One of the pod's volume tasks ended; the last one runs the post-hook and gets its outcome.
    pub async fn done(&self, ctx: &Ctx) -> Option<HookOutcome> {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return None;
        }
        self.post
            .get_or_init(|| async {
                match &self.spec.post {
                    Some(c) => Some(self.run(ctx, "post", c).await),
                    None => None,
                }
            })
            .await
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn hooks_come_from_annotations_and_bad_values_name_the_annotation() {
        assert_eq!(HookSpec::from_annotations(&ann(&[])), Ok(None));
        let h = HookSpec::from_annotations(&ann(&[
            ("stowage.dev/pre-backup-command", "sync"),
            ("stowage.dev/hook-timeout", "5s"),
            ("stowage.dev/hook-on-error", "Continue"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(h.pre.as_deref(), Some("sync"));
        assert_eq!(h.post, None);
        assert_eq!(h.timeout, Duration::from_secs(5));
        assert!(h.continue_on_error);
        let e = HookSpec::from_annotations(&ann(&[
            ("stowage.dev/post-backup-command", "x"),
            ("stowage.dev/hook-on-error", "Ignore"),
        ]))
        .unwrap_err();
        assert!(e.starts_with("annotation stowage.dev/hook-on-error"), "{e}");
        let e = HookSpec::from_annotations(&ann(&[
            ("stowage.dev/pre-backup-command", "x"),
            ("stowage.dev/hook-timeout", "soon"),
        ]))
        .unwrap_err();
        assert!(e.contains("stowage.dev/hook-timeout"), "{e}");
    }
}
