use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::PluginError;
use crate::cli::Global;

/// A client for the chosen context, and the namespace commands apply to.
pub struct Connection {
    pub client: kube::Client,
    pub namespace: String,
}

/// As kubectl: `--kubeconfig`, else $KUBECONFIG, else ~/.kube/config (or in-cluster); `--context`,
/// else the current context; `-n`, else the context's namespace, else "default".
pub async fn connect(g: &Global) -> Result<Connection, PluginError> {
    let opts = KubeConfigOptions {
        context: g.context.clone(),
        ..Default::default()
    };
    let config = match &g.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .map_err(|e| PluginError::Kubeconfig(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &opts).await
        }
        None => kube::Config::from_kubeconfig(&opts).await,
    }
    .map_err(|e| PluginError::Kubeconfig(e.to_string()))?;
    let namespace = g
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client =
        kube::Client::try_from(config).map_err(|e| PluginError::Kubeconfig(e.to_string()))?;
    Ok(Connection { client, namespace })
}
