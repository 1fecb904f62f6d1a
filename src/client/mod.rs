//! Clients: `clipserve embed` (bulk embedding) and `clipserve bench` (load generator).

pub mod bench;
pub mod embed;
