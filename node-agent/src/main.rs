//! `stowage-agent`: parse flags, start telemetry, hand over to the library.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = stowage_agent::config::Config::parse();
    stowage_agent::telemetry::init(config.log_json);
    stowage_agent::server::run(config).await?;
    Ok(())
}
