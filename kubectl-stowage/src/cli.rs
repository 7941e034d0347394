use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(name = "kubectl stowage", bin_name = "kubectl stowage", version)]
#[command(about = "Stowage from the terminal: status, snapshots, backups and restores")]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// The flags kubectl users expect, with kubectl's meanings.
#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true, env = "KUBECONFIG")]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// The kubeconfig context to use (default: the current context).
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// The namespace (default: the context's namespace, else "default").
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// Every namespace (status).
    #[arg(short = 'A', long, global = true)]
    pub all_namespaces: bool,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Schedules, the newest successful backup of each volume, and the agents per node.
    Status,
    /// Snapshots of this namespace's volumes (read from the Schedule's repository with restic).
    Snapshots(SnapshotsArgs),
    /// Start a backup.
    #[command(subcommand)]
    Backup(BackupCommand),
    /// Restore a volume in place (or into another PVC) and follow it to the end.
    Restore(RestoreArgs),
    /// Give the namespace a repository of its own: a random password in a labelled Secret, and
    /// the repository created with restic (never over an existing one).
    Init(InitArgs),
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// S3 endpoint (e.g. https://s3.eu-west-1.amazonaws.com); with --s3-bucket.
    #[arg(long, requires = "s3_bucket", conflicts_with = "rest_url")]
    pub s3_endpoint: Option<String>,
    #[arg(long)]
    pub s3_bucket: Option<String>,
    /// Default: the namespace's name, so every namespace has its own place in the bucket.
    #[arg(long)]
    pub s3_prefix: Option<String>,
    #[arg(long)]
    pub s3_region: Option<String>,
    /// The labelled Secret holding the S3 keys (keys `id` and `secret`).
    #[arg(long, default_value = "s3-credentials")]
    pub s3_secret: String,
    /// A REST server's repository URL (instead of S3).
    #[arg(long)]
    pub rest_url: Option<String>,
    /// The labelled Secret holding the REST user (keys `username` and `password`), if it needs one.
    #[arg(long)]
    pub rest_secret: Option<String>,
    /// The Secret to create for the repository password (key `password`).
    #[arg(long, default_value = "backup-repo")]
    pub password_secret: String,
    /// The restic binary.
    #[arg(long, default_value = "restic", env = "STOWAGE_RESTIC")]
    pub restic: std::path::PathBuf,
}

#[derive(Args, Debug)]
pub struct SnapshotsArgs {
    /// Only this PVC's snapshots.
    #[arg(long)]
    pub pvc: Option<String>,
    /// The Schedule whose repository to read (default: the namespace's only Schedule).
    #[arg(long)]
    pub schedule: Option<String>,
    /// The restic binary.
    #[arg(long, default_value = "restic", env = "STOWAGE_RESTIC")]
    pub restic: std::path::PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum BackupCommand {
    /// A Backup run of a Schedule, now.
    Now(BackupNowArgs),
}

#[derive(Args, Debug)]
pub struct BackupNowArgs {
    #[arg(long)]
    pub schedule: String,
    /// Follow the run until it finishes (exit 1 unless it succeeded).
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    pub timeout: std::time::Duration,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Whose snapshots: this PVC's, in the namespace.
    #[arg(long)]
    pub pvc: String,
    /// A snapshot id (default: the newest of the PVC).
    #[arg(long, conflicts_with = "before")]
    pub snapshot: Option<String>,
    /// The newest snapshot at or before this time (RFC 3339).
    #[arg(long)]
    pub before: Option<String>,
    /// Only these paths inside the volume (repeatable).
    #[arg(long = "path")]
    pub paths: Vec<String>,
    /// Merge (default), Replace or IntoEmpty.
    #[arg(long, default_value = "Merge")]
    pub mode: String,
    /// Restore into this PVC instead (same namespace).
    #[arg(long)]
    pub target_pvc: Option<String>,
    /// A subdirectory of the target volume to restore into.
    #[arg(long)]
    pub target_path: Option<String>,
    /// The Schedule whose repository to use (default: the namespace's only Schedule).
    #[arg(long)]
    pub schedule: Option<String>,
    /// Write nothing: show what the restore would add, change and (Replace) delete.
    #[arg(long)]
    pub dry_run: bool,
    /// How long to follow the restore.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub timeout: std::time::Duration,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 30m or 2h"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{s:?} is not a duration like 90s, 30m or 2h")),
    };
    Ok(std::time::Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_flags() {
        assert_eq!(
            parse_duration("90s"),
            Ok(std::time::Duration::from_secs(90))
        );
        assert_eq!(
            parse_duration("2h"),
            Ok(std::time::Duration::from_secs(7200))
        );
        assert!(parse_duration("soon").is_err());
        let cli = Cli::try_parse_from([
            "kubectl-stowage",
            "-n",
            "shop",
            "restore",
            "--pvc",
            "data",
            "--before",
            "2026-11-20T00:00:00Z",
            "--path",
            "/a",
            "--path",
            "/b",
            "-o",
            "json",
        ])
        .unwrap();
        assert_eq!(cli.global.namespace.as_deref(), Some("shop"));
        assert_eq!(cli.global.output, Format::Json);
        let Command::Restore(r) = cli.command else {
            panic!("restore")
        };
        assert_eq!(r.paths, ["/a", "/b"]);
        assert!(
            Cli::try_parse_from([
                "kubectl-stowage",
                "restore",
                "--pvc",
                "d",
                "--snapshot",
                "ab",
                "--before",
                "x"
            ])
            .is_err()
        );
    }
}
