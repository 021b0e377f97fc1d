//! `mcp-gateway`: parses the command line and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mcp_gateway::config::Config;

/// Thread-per-core io_uring gateway for MCP traffic with connection limits and DoS protection.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (YAML; `.toml` is read as TOML). Default: config/gateway.yaml when it
    /// exists, else built-in defaults.
    #[arg(short, long, global = true)]
    config: Option<PathBuf>,
    /// Log lines on stderr: `text`, or `json` (one object per line, for log pipelines).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Validate the configuration and print the effective configuration.
    Check,
}

/// EX_USAGE: a configuration error, as sysexits.h says.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let file = cli.config.clone().or_else(|| {
        let default = PathBuf::from("config/gateway.yaml");
        default.exists().then_some(default)
    });
    let config = match file.as_deref().map_or(Ok(Config::default()), Config::load) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mcp-gateway: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Check => {
            print!("{}", config.to_yaml());
            ExitCode::SUCCESS
        }
        Command::Run => {
            let _log = mcp_gateway::logging::init(matches!(cli.log_format, LogFormat::Json));
            match mcp_gateway::runtime::run(config, file.as_deref()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "mcp-gateway could not run");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
