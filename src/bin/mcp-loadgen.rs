//! `mcp-loadgen`: the bench kit's load generator (see `mcp_gateway::loadgen`).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use mcp_gateway::loadgen::{parse_sources, run, Plan, Protocol};

/// Opens connections to an MCP gateway at a given rate from a range of loopback source
/// addresses, sends a JSON-RPC tools/call per interval on each, holds them, and prints a report.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Gateway address (HTTP/WebSocket port, or the MCPB port with --protocol mcpb).
    #[arg(long, default_value = "127.0.0.1:8080")]
    target: SocketAddr,
    #[arg(long, value_enum, default_value_t = Proto::Http)]
    protocol: Proto,
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// New connections per second (0 = as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Seconds each connection is held after its first answer.
    #[arg(long, default_value_t = 0.0)]
    hold: f64,
    /// Seconds between messages on a held connection (0 = only the first message).
    #[arg(long, default_value_t = 0.0)]
    interval: f64,
    /// Source addresses, e.g. 127.0.0.2-127.0.0.33.
    #[arg(long, default_value = "127.0.0.1")]
    sources: String,
    /// Threads, each with its own runtime.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

#[derive(Clone, Copy, ValueEnum)]
enum Proto {
    Http,
    Ws,
    Mcpb,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let sources = match parse_sources(&cli.sources) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mcp-loadgen: {e}");
            return ExitCode::from(64);
        }
    };
    let plan = Plan {
        target: cli.target,
        protocol: match cli.protocol {
            Proto::Http => Protocol::Http,
            Proto::Ws => Protocol::WebSocket,
            Proto::Mcpb => Protocol::Mcpb,
        },
        connections: cli.connections,
        rate: cli.rate,
        hold: Duration::from_secs_f64(cli.hold.max(0.0)),
        interval: (cli.interval > 0.0).then(|| Duration::from_secs_f64(cli.interval)),
        sources,
        threads: cli.threads,
    };
    // Each connection is a descriptor: raise the soft limit to the hard one.
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    match run(&plan) {
        Ok(report) => {
            print!("{}", report.render());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mcp-loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}
