use std::io::IsTerminal;

use clap::Parser;
use clipserve::cli::{Cli, Command};

// jemalloc with background purging hands freed memory back to the system within seconds: after a burst of large
// request bodies glibc's malloc kept over 100 MiB per burst resident in its per-thread arenas.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options: purge unused pages from a background thread, a second after they were freed.
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8; 60] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

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
