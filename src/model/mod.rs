//! The model: the backend that runs `model.pt` ([`backend`]), the worker threads that run batches on it
//! ([`worker`]) and their start-up ([`pool`]); devices, the manifest, batch staging and test-only faults.

pub mod backend;
pub mod device;
pub mod faults;
pub mod manifest;
pub mod pool;
pub mod staging;
pub mod worker;

pub use backend::{Backend, TorchBackend};
pub use manifest::Manifest;
pub use pool::{ModelPool, PoolConfig};
pub use worker::{run_worker, BackendFactory};
