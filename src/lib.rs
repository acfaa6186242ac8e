//! turnstone: a STUN/TURN server (RFC 8489, RFC 8656).
//!
//! Layers, from the wire up:
//! - [`proto`]: wire formats only (zero-copy STUN codec, ChannelData, stream framing).
//! - [`auth`], [`policy`], [`config`]: credentials and nonces, peer-address policy, TOML config.
//! - [`cli`]: the command line's definition (the binary in `main.rs` runs it).
//! - [`server`]: the sans-I/O TURN/STUN state machine.
//! - [`net`]: the tokio shell that moves bytes between sockets and the core.
//! - [`counters`]: what the core and the shell count, and the words for it (below both
//!   `server` and `metrics`).
//! - [`notify`], [`metrics`]: the systemd notify protocol; Prometheus metrics and their HTTP endpoint.
//! - [`store`]: the Redis fleet store (users, secrets, revocations, quotas, sessions).
//! - [`sys`]: the only `unsafe` code (one allocator call std and nix do not wrap).
#![deny(unsafe_code)]
pub mod auth;
pub mod cli;
pub mod config;
pub mod counters;
pub mod metrics;
pub mod net;
pub mod notify;
pub mod policy;
pub mod probe;
pub mod proto;
pub mod selftest;
pub mod server;
pub mod store;
pub mod sys;
