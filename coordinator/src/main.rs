//! `stowage-coordinator`: parse flags, start logging, hand over to the library.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = stowage_coordinator::config::Config::parse();
    stowage_common::runtime::init_logging(config.log_json, "info,kube_runtime=warn");
    stowage_coordinator::controller::run(config).await?;
    Ok(())
}
