//! `kubectl-stowage`: kubectl finds it on PATH and runs it as `kubectl stowage ...`.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = kubectl_stowage::cli::Cli::parse();
    match kubectl_stowage::run(cli).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // A sentence for people, not a Debug dump.
            eprintln!(
                "error: {}",
                kubectl_stowage::output::terminal_safe(&e.to_string())
            );
            std::process::exit(1)
        }
    }
}
