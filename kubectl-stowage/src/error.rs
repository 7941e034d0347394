use thiserror::Error;

#[derive(Debug, Error)]
pub enum PluginError {
    #[error("reading the kubeconfig: {0}")]
    Kubeconfig(String),
    /// The API error as a sentence (`stowage_common::kube_errors::sentence`), never its Debug form.
    #[error("{action}: {reason}")]
    Api { action: String, reason: String },
    #[error("{0}")]
    Usage(String),
    #[error("reading the repository of Schedule {schedule}: {reason}")]
    Repository { schedule: String, reason: String },
    #[error("restic could not list the snapshots: {0}")]
    Restic(#[from] restic_wrap::Error),
    #[error("{0}")]
    Init(String),
    #[error("writing the output: {0}")]
    Output(String),
}

impl PluginError {
    pub fn api(action: impl Into<String>) -> impl FnOnce(kube::Error) -> PluginError {
        let action = action.into();
        move |source| PluginError::Api {
            action,
            reason: stowage_common::kube_errors::sentence(&source),
        }
    }
}
