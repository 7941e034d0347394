//! `stowage-agent`: parse flags, start logging, hand over to the library.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = stowage_agent::config::Config::parse();
    stowage_common::runtime::init_logging(config.log_json, "info");
    stowage_agent::server::run(config).await?;
    Ok(())
}
