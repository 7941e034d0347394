//! Command-line flags; each one can also come from a `STOWAGE_*` environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "stowage-coordinator",
    version,
    about = "Stowage coordinator: turns Schedule, Backup, Check and Prune objects into work for the node agents"
)]
pub struct Config {
    /// Watch only these namespaces (repeat the flag, or separate with commas; default: every
    /// namespace). With RBAC bound per namespace (the chart's `rbac.scope: namespaced`), list
    /// exactly the namespaces bound.
    #[arg(
        long = "namespace",
        env = "STOWAGE_WATCH_NAMESPACE",
        value_delimiter = ','
    )]
    pub namespaces: Vec<String>,

    /// Namespace of the agent DaemonSet's pods.
    #[arg(
        long,
        env = "STOWAGE_AGENT_NAMESPACE",
        default_value = "stowage-system"
    )]
    pub agent_namespace: String,

    /// Label selector of the agent DaemonSet's pods.
    #[arg(
        long,
        env = "STOWAGE_AGENT_SELECTOR",
        default_value = "app.kubernetes.io/name=stowage-agent"
    )]
    pub agent_selector: String,

    /// The agents' gRPC port (dialled at podIP:port).
    #[arg(long, env = "STOWAGE_AGENT_PORT", default_value_t = 9443)]
    pub agent_port: u16,

    /// PEM CA bundle that signed the agents' serving certificates.
    #[arg(
        long,
        env = "STOWAGE_TLS_CA",
        required_unless_present = "insecure_plaintext"
    )]
    pub tls_ca: Option<PathBuf>,

    /// PEM client certificate presented to the agents.
    #[arg(
        long,
        env = "STOWAGE_TLS_CERT",
        required_unless_present = "insecure_plaintext"
    )]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(
        long,
        env = "STOWAGE_TLS_KEY",
        required_unless_present = "insecure_plaintext"
    )]
    pub tls_key: Option<PathBuf>,

    /// Name the agents' certificate is verified against (e.g. one shared `stowage-agent` DNS name);
    /// by default the pod IP, which the certificate must then carry as an IP SAN.
    #[arg(long, env = "STOWAGE_AGENT_TLS_SERVER_NAME")]
    pub agent_tls_server_name: Option<String>,

    /// The maintenance container beside the coordinator (`host:port`, normally 127.0.0.1 in the
    /// pod): an agent with `--maintenance-only` that runs the Prunes of backends with
    /// `maintenance` credentials, so those credentials never reach a node agent. Dialled with the
    /// agents' TLS settings.
    #[arg(long, env = "STOWAGE_MAINTENANCE_AGENT")]
    pub maintenance_agent: Option<String>,

    /// Dial agents without TLS: tests only.
    #[arg(long, env = "STOWAGE_INSECURE_PLAINTEXT", conflicts_with_all = ["tls_ca", "tls_cert", "tls_key"])]
    pub insecure_plaintext: bool,

    /// Address of /metrics and /healthz.
    #[arg(long, env = "STOWAGE_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    pub metrics_listen: SocketAddr,

    /// Namespace of the leader-election Lease (default: the pod's namespace, else stowage-system).
    #[arg(long, env = "POD_NAMESPACE", default_value = "stowage-system")]
    pub lease_namespace: String,

    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "STOWAGE_LEASE_NAME",
        default_value = "stowage-coordinator"
    )]
    pub lease_name: String,

    /// This replica's identity in the Lease (default: the pod name, else host and pid).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// How long a leader's Lease is honoured without renewal.
    #[arg(long, env = "STOWAGE_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,

    /// A fire time missed (coordinator down) by less than this still runs, once; older ones are
    /// counted as missed.
    #[arg(long, env = "STOWAGE_MISSED_RUN_DEADLINE", default_value = "10m", value_parser = parse_duration)]
    pub missed_run_deadline: Duration,

    /// Finished runs kept per Schedule and action (a Schedule's spec.keepRuns overrides it).
    #[arg(long, env = "STOWAGE_KEEP_RUNS", default_value_t = 3)]
    pub keep_runs: u32,

    /// HTTP/2 keepalive towards agents: an agent that stops answering pings for this long is
    /// considered dead and its volume fails (an agent process that exits fails it at once).
    #[arg(long, env = "STOWAGE_AGENT_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub agent_timeout: Duration,

    /// Image of mount-holder pods (they only hold a PVC mounted; the agent reads it).
    #[arg(
        long,
        env = "STOWAGE_MOUNT_HOLDER_IMAGE",
        default_value = concat!("ghcr.io/stowage-dev/stowage-pause:", env!("CARGO_PKG_VERSION"))
    )]
    pub mount_holder_image: String,

    /// Taints mount-holder pods tolerate, as a JSON list of Kubernetes tolerations (default: none,
    /// so a tenant's PVC never brings a pod onto nodes kept for others).
    #[arg(long, env = "STOWAGE_MOUNT_HOLDER_TOLERATIONS", default_value = "[]", value_parser = parse_tolerations)]
    pub mount_holder_tolerations: Tolerations,

    /// How long a mount-holder pod may take to be scheduled and running.
    #[arg(long, env = "STOWAGE_MOUNT_HOLDER_TIMEOUT", default_value = "2m", value_parser = parse_duration)]
    pub mount_holder_timeout: Duration,

    /// While a run waits for a repository lock, its Schedule's lock gauges are refreshed this often
    /// (they are also refreshed when every run ends).
    #[arg(long, env = "STOWAGE_LOCK_REFRESH_INTERVAL", default_value = "1m", value_parser = parse_duration)]
    pub lock_refresh_interval: Duration,

    /// A Schedule's repository figures (snapshots, bytes) are read at most this often when no Check
    /// or Prune has refreshed them meanwhile.
    #[arg(long, env = "STOWAGE_FIGURES_INTERVAL", default_value = "1h", value_parser = parse_duration)]
    pub figures_interval: Duration,

    /// Let a Restore read snapshots of another namespace (`spec.source.namespace`). Off by default:
    /// whoever can create a Restore in namespace A must not read namespace B's data.
    #[arg(long, env = "STOWAGE_ALLOW_CROSS_NAMESPACE_RESTORE")]
    pub allow_cross_namespace_restore: bool,

    /// Repository endpoints runs may use (`s3.endpoint`, `rest.url`): `host`, `host:port`,
    /// `*.domain[:port]`; repeat the flag, or separate with commas. A run whose endpoint is not
    /// listed fails before any Secret is read. Default: every endpoint.
    #[arg(long, env = "STOWAGE_ALLOWED_ENDPOINT", value_delimiter = ',')]
    pub allowed_endpoint: Vec<stowage_common::endpoints::EndpointPattern>,

    /// PreBackupPods starting (created, not yet ready) at once, across the cluster.
    #[arg(long, env = "STOWAGE_MAX_STARTING_PREBACKUP_PODS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_starting_prebackup_pods: u32,

    /// Of those, how many one namespace may have starting at once: a namespace whose PreBackupPods
    /// never become ready holds no more than this, and its others wait in its own queue (at most
    /// --prebackup-pod-timeout, then their items fail).
    #[arg(long, env = "STOWAGE_MAX_STARTING_PREBACKUP_PODS_PER_NAMESPACE", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_starting_prebackup_pods_per_namespace: u32,

    /// Let PreBackupPods ask for privileged containers, added capabilities beyond Pod Security's
    /// baseline, hostPath volumes, the host's namespaces or a ServiceAccount other than `default`.
    /// Off by default: their pods are created with the coordinator's rights.
    #[arg(long, env = "STOWAGE_ALLOW_PRIVILEGED_PREBACKUP_PODS")]
    pub allow_privileged_prebackup_pods: bool,

    /// How long a PreBackupPod may take to be scheduled and ready.
    #[arg(long, env = "STOWAGE_PREBACKUP_POD_TIMEOUT", default_value = "2m", value_parser = parse_duration)]
    pub prebackup_pod_timeout: Duration,

    /// Log as JSON lines.
    #[arg(long, env = "STOWAGE_LOG_JSON")]
    pub log_json: bool,
}

impl Config {
    pub fn identity(&self) -> String {
        self.identity.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "coordinator".into());
            format!("{host}-{}", std::process::id())
        })
    }
}

/// A list of tolerations (a newtype, so clap takes the flag's value as one JSON document).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tolerations(pub Vec<k8s_openapi::api::core::v1::Toleration>);

fn parse_tolerations(s: &str) -> Result<Tolerations, String> {
    serde_json::from_str(s).map(Tolerations).map_err(|e| {
        format!("not a JSON list of tolerations ({e}); e.g. [{{\"key\":\"dedicated\",\"operator\":\"Exists\"}}]")
    })
}

/// "30s", "10m", "1h30m", "500ms".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    restic_wrap::lock::parse_go_duration(s)
        .ok_or_else(|| format!("not a duration: {s:?} (e.g. 30s, 10m, 1h)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Config::command().debug_assert();
    }

    #[test]
    fn tls_is_required_unless_plaintext_is_explicit() {
        assert!(Config::try_parse_from(["c"]).is_err());
        let c =
            Config::try_parse_from(["c", "--insecure-plaintext", "--missed-run-deadline", "90s"])
                .unwrap();
        assert_eq!(c.missed_run_deadline, Duration::from_secs(90));
        assert_eq!(c.agent_port, 9443);
        assert!(parse_duration("soon").is_err());
        assert!(c.mount_holder_tolerations.0.is_empty());
        let t = Config::try_parse_from([
            "c",
            "--insecure-plaintext",
            "--mount-holder-tolerations",
            r#"[{"key":"stowage.dev/real-node","operator":"Exists"}]"#,
        ])
        .unwrap();
        assert_eq!(
            t.mount_holder_tolerations.0[0].key.as_deref(),
            Some("stowage.dev/real-node")
        );
        assert!(
            Config::try_parse_from([
                "c",
                "--insecure-plaintext",
                "--mount-holder-tolerations",
                "x"
            ])
            .is_err()
        );
    }
}
