//! Command-line flags; each one can also come from a `STOWAGE_*` environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "stowage-agent",
    version,
    about = "Stowage node agent: backs up and restores this node's kubelet volumes"
)]
pub struct Config {
    /// This node's name (in Kubernetes: from the downward API, spec.nodeName).
    #[arg(long, env = "STOWAGE_NODE_NAME")]
    pub node_name: String,

    /// The kubelet's root directory; volumes are read from <kubelet-dir>/pods.
    #[arg(long, env = "STOWAGE_KUBELET_DIR", default_value = "/var/lib/kubelet")]
    pub kubelet_dir: PathBuf,

    /// Address of the gRPC API.
    #[arg(long, env = "STOWAGE_GRPC_LISTEN", default_value = "0.0.0.0:9443")]
    pub grpc_listen: SocketAddr,

    /// Address of /metrics and /healthz.
    #[arg(long, env = "STOWAGE_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    pub metrics_listen: SocketAddr,

    /// PEM certificate the gRPC server presents.
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

    /// PEM CA bundle; clients must present a certificate signed by it.
    #[arg(
        long,
        env = "STOWAGE_TLS_CLIENT_CA",
        required_unless_present = "insecure_plaintext"
    )]
    pub tls_client_ca: Option<PathBuf>,

    /// The identity the coordinator's client certificate must carry (a DNS or URI SAN, or the CN).
    /// A certificate signed by the CA with any other identity is refused. Repeatable.
    #[arg(
        long = "client-identity",
        env = "STOWAGE_CLIENT_IDENTITY",
        value_delimiter = ','
    )]
    pub client_identities: Vec<String>,

    /// Serve repository maintenance only (Check, Prune, repository reads), never a volume: the
    /// coordinator's maintenance container, which holds the credentials that may delete and must
    /// never run on a node agent (docs/hardening.md).
    #[arg(long, env = "STOWAGE_MAINTENANCE_ONLY")]
    pub maintenance_only: bool,

    /// Serve gRPC without TLS. Anyone who can reach the port can then read every volume: tests only.
    #[arg(long, env = "STOWAGE_INSECURE_PLAINTEXT", conflicts_with_all = ["tls_cert", "tls_key", "tls_client_ca"])]
    pub insecure_plaintext: bool,

    /// Volume operations run at once on this node; further requests queue (never dropped).
    #[arg(long, env = "STOWAGE_MAX_CONCURRENT", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub max_concurrent: u32,

    /// Of those, how many one namespace may hold at once (0: all but one, at least one); a
    /// namespace's requests beyond its share queue in their own FIFO, behind no other namespace's.
    #[arg(long, env = "STOWAGE_MAX_CONCURRENT_PER_NAMESPACE", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=256))]
    pub max_concurrent_per_namespace: u32,

    /// Memory for restic processes on this node, in MiB (0: no bound). Each operation reserves
    /// restic's estimated peak for its repository (a fixed part plus a multiple of the index size;
    /// see docs/operations.md) before it starts; what does not fit queues, FIFO. An operation
    /// estimated above the whole budget runs alone.
    #[arg(long, env = "STOWAGE_MEMORY_BUDGET", default_value_t = 0)]
    pub memory_budget: u32,

    /// The restic binary.
    #[arg(long, env = "STOWAGE_RESTIC", default_value = "restic")]
    pub restic: PathBuf,

    /// bubblewrap, the sandbox every restic that reads or writes volume data runs in.
    #[arg(long, env = "STOWAGE_BWRAP", default_value = "bwrap")]
    pub bwrap: PathBuf,

    /// A directory under which local (filesystem) repositories may live. Repeatable. With none,
    /// requests for a local repository are refused: tenants must not choose paths on the node.
    #[arg(
        long = "local-repository-root",
        env = "STOWAGE_LOCAL_REPOSITORY_ROOTS",
        value_delimiter = ','
    )]
    pub local_repository_roots: Vec<PathBuf>,

    /// A backup or restore whose restic reports no progress for this long is stopped and fails.
    /// Commands that print nothing until done (listing snapshots, opening the repository) may take
    /// this long in total.
    #[arg(long, env = "STOWAGE_STALL_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    pub stall_timeout: Duration,

    /// No single restic run lasts longer than this, progress or not.
    #[arg(long, env = "STOWAGE_MAX_DURATION", default_value = "12h", value_parser = parse_duration)]
    pub max_duration: Duration,

    /// restic's cache directory (speeds up incremental backups; safe to lose).
    #[arg(
        long,
        env = "STOWAGE_CACHE_DIR",
        default_value = "/var/cache/stowage/restic"
    )]
    pub cache_dir: PathBuf,

    /// A repository's cache unused for this long is removed (the node no longer backs it up).
    /// Keep it above --max-duration: an operation marks its cache used when it starts.
    #[arg(long, env = "STOWAGE_CACHE_MAX_AGE", default_value = "720h", value_parser = parse_duration)]
    pub cache_max_age: Duration,

    /// The most restic's caches may hold on this node together, in MiB (0: no bound); the least
    /// recently used go first, never one used within --max-duration.
    #[arg(long, env = "STOWAGE_CACHE_MAX_SIZE_MIB", default_value_t = 0)]
    pub cache_max_size_mib: u64,

    /// Verification drills restore into scratch space under --cache-dir; they never leave less than
    /// this share of its filesystem free (the kubelet's default eviction threshold is 10% of the
    /// node's filesystem). A drill that does not fit fails with a sentence saying so.
    #[arg(long, env = "STOWAGE_VERIFY_KEEP_FREE_PERCENT", default_value_t = 10, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub verify_keep_free_percent: u8,

    /// How often the caches are swept (and `stowage_agent_cache_bytes` measured).
    #[arg(long, env = "STOWAGE_CACHE_SWEEP_INTERVAL", default_value = "1h", value_parser = parse_duration)]
    pub cache_sweep_interval: Duration,

    /// A repository lock older than this gets one plain `restic unlock`, which removes it if restic
    /// too judges it stale (not refreshed for 30 minutes; live holders refresh every 5).
    #[arg(long, env = "STOWAGE_STALE_LOCK_AGE", default_value = "30m", value_parser = parse_duration)]
    pub stale_lock_age: Duration,

    /// How long an operation waits for a lock held by someone else before failing: a backup that
    /// fires during a prune waits for it, and a prune waits for running backups.
    #[arg(long, env = "STOWAGE_LOCK_WAIT", default_value = "1h", value_parser = parse_duration)]
    pub lock_wait: Duration,

    /// Full rescan of the kubelet directory as a safety net behind inotify (mounts raise no events).
    #[arg(long, env = "STOWAGE_RESYNC_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub resync_interval: Duration,

    /// Log as JSON lines.
    #[arg(long, env = "STOWAGE_LOG_JSON")]
    pub log_json: bool,
}

impl Config {
    /// A namespace's share of the node's slots: as set, or all but one (at least one).
    pub fn namespace_share(&self) -> u32 {
        match self.max_concurrent_per_namespace {
            0 => self.max_concurrent.saturating_sub(1).max(1),
            n => n.min(self.max_concurrent),
        }
    }
}

/// Parses "90s", "5m", "2h", "1500ms" or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let value: f64 = num.parse().map_err(|_| format!("not a duration: {s:?}"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("unknown unit in {s:?} (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
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
        assert!(Config::try_parse_from(["a", "--node-name", "n"]).is_err());
        let c = Config::try_parse_from(["a", "--node-name", "n", "--insecure-plaintext"]).unwrap();
        assert!(c.insecure_plaintext);
        assert!(
            Config::try_parse_from([
                "a",
                "--node-name",
                "n",
                "--insecure-plaintext",
                "--tls-cert",
                "c"
            ])
            .is_err()
        );
        let c = Config::try_parse_from([
            "a",
            "--node-name",
            "n",
            "--tls-cert",
            "c",
            "--tls-key",
            "k",
            "--tls-client-ca",
            "ca",
            "--max-concurrent",
            "3",
            "--stale-lock-age",
            "2s",
        ])
        .unwrap();
        assert_eq!(c.max_concurrent, 3);
        assert_eq!(c.stale_lock_age, Duration::from_secs(2));
        assert!(
            Config::try_parse_from([
                "a",
                "--node-name",
                "n",
                "--insecure-plaintext",
                "--max-concurrent",
                "0"
            ])
            .is_err()
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("x").is_err());
    }
}
