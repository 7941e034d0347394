//! Structured logging through `tracing`; `RUST_LOG` filters, `--log-json` for log pipelines.

use tracing_subscriber::EnvFilter;

pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: log files and collectors get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // A second init (tests starting several agents in one process) is not an error worth failing on.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
