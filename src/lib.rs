//! clipserve: a model server for OpenAI CLIP ViT-B/32 embeddings over gRPC.
//!
//! Requests flow through [`engine::Engine`]: validation and admission, decoding, preprocessing and tokenizing on a
//! CPU pool, then the per-modality queues of [`batching::Batcher`], from which the model worker threads of
//! [`model`] form batches whenever they are free.

pub mod auth;
pub mod batching;
pub mod cache;
pub mod cli;
pub mod client;
pub mod config;
pub mod duration;
pub mod engine;
pub mod error;
pub mod grpc;
pub mod http;
pub mod inputs;
pub mod model;
pub mod prepare;
pub mod server;
pub mod state;
pub mod telemetry;
pub mod timing;
pub mod tls;
pub mod zeroshot;

/// Code generated from `proto/clipserve/v1/clipserve.proto`.
pub mod pb {
    tonic::include_proto!("clipserve.v1");

    /// Encoded descriptor set, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("clipserve_descriptor");
}
