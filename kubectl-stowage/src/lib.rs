//! The `kubectl stowage` plugin: what a person asks of Stowage from a terminal.
//!
//! - [`cli`]: the commands and flags;
//! - [`connect`]: kubeconfig, context and namespace, resolved as kubectl resolves them;
//! - [`status`]: Schedules, the newest success per volume, and the agents per node;
//! - [`snapshots`]: a namespace's snapshots, read from the repository with restic;
//! - [`runs`]: `backup now` and `restore`, created as objects and followed to their end;
//! - [`init`]: a namespace's own repository (password Secret and `restic init`);
//! - [`output`]: tables for people, JSON or YAML for programs.

pub mod cli;
pub mod connect;
pub mod error;
pub mod init;
pub mod output;
pub mod runs;
pub mod snapshots;
pub mod status;

pub use error::PluginError;

/// Runs one command; the exit code is 0 only when what was asked for succeeded.
pub async fn run(cli: cli::Cli) -> Result<i32, PluginError> {
    let conn = connect::connect(&cli.global).await?;
    match cli.command {
        cli::Command::Status => {
            let s = status::gather(&conn, cli.global.all_namespaces).await?;
            output::print(&s, cli.global.output, status::table)?;
            Ok(0)
        }
        cli::Command::Snapshots(args) => {
            let snaps = snapshots::list(&conn, &args).await?;
            output::print(snaps.as_slice(), cli.global.output, snapshots::table)?;
            Ok(0)
        }
        cli::Command::Backup(cli::BackupCommand::Now(args)) => {
            runs::backup_now(&conn, &args, cli.global.output).await
        }
        cli::Command::Restore(args) => runs::restore(&conn, &args, cli.global.output).await,
        cli::Command::Init(args) => {
            let created = init::init(&conn, &args).await?;
            output::print(&created, cli.global.output, init::table)?;
            Ok(0)
        }
    }
}
