use std::io::IsTerminal;

use clap::Parser;
use clipserve::config::{Cli, Command};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match cli.command {
        Command::Serve(args) => clipserve::server::run(args),
        Command::Bench(args) => clipserve::client::bench::run(args),
        Command::Embed(args) => clipserve::client::embed::run(args),
    }
}
