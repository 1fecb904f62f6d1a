//! The command line: `clipserve serve`, `clipserve embed` and `clipserve bench`.

use clap::{Parser, Subcommand};

/// clipserve: CLIP ViT-B/32 embeddings over gRPC.
#[derive(Debug, Parser)]
#[command(name = "clipserve", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC service and the HTTP listener on one model.
    Serve(crate::config::ServeArgs),
    /// Embed a folder, file list, JSONL, webdataset tar shards or Parquet files of images and texts through
    /// EmbedStream on one or more servers (clip-retrieval, Parquet, npy or JSONL output; resumable; --shard I/N).
    Embed(crate::client::embed::EmbedArgs),
    /// Load a server (or time the raw model) and print throughput and latency.
    Bench(crate::client::bench::BenchArgs),
}
