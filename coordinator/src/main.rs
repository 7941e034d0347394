//! `stowage-coordinator`: parse flags, start telemetry, hand over to the library.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = stowage_coordinator::config::Config::parse();
    stowage_coordinator::telemetry::init(config.log_json);
    stowage_coordinator::controller::run(config).await?;
    Ok(())
}
