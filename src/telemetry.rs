//! Logging setup shared by every subcommand.

use clap::{Args, ValueEnum};
use tracing_subscriber::EnvFilter;

#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

#[derive(Args, Debug, Clone)]
pub struct LogArgs {
    /// Log output format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "SPILLWAY_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Log filter in `tracing` EnvFilter syntax (e.g. `info,spillway=debug`).
    #[arg(long, global = true, default_value = "info", env = "SPILLWAY_LOG")]
    pub log_level: String,
}

/// Installs the global subscriber. Fails on a malformed filter instead of silently logging nothing.
pub fn init(args: &LogArgs) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&args.log_level)
        .map_err(|e| anyhow::anyhow!("invalid --log-level {:?}: {e}", args.log_level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let res = match args.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    res.map_err(|e| anyhow::anyhow!("installing the log subscriber: {e}"))
}
