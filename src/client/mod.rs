//! Clients: `clipserve bench` (load generator).

pub mod bench;
