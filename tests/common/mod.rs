//! Shared harness for the black-box integration tests: runs a real `turnstone`
//! process (or, for differential checks, coturn's `turnserver`) on 127.0.0.1 with
//! its own ports, and offers small helpers (free ports, a raw STUN Binding client,
//! a TURN client over UDP/TCP/TLS, external tools with bounded run times). One concern
//! a submodule; the common names are re-exported here.
//!
//! Every test binary includes this module with `mod common;` and uses a part of it.
//!
//! Set `TURNSTONE_TEST_SERVER=coturn` to run the same tests against coturn's
//! `turnserver` (Debian package `coturn`) instead of turnstone: the harness then maps
//! the options below to turnserver flags. This is how the tests themselves were
//! validated; coturn cannot mix static users with REST secrets, so there the
//! secrets are used only when the user list is empty.
#![allow(dead_code)]

pub mod browser;
pub mod call;
pub mod corpus;

pub mod coturn;
pub mod debian;
pub mod fastpath;
pub mod handover;
pub mod haproxy;
pub mod metrics;
pub mod netns;
pub mod process;
pub mod redis_server;
pub mod rfc6062;
pub mod server;
pub mod service_manager;
pub mod stream;
pub mod stun;
pub mod traffic;
pub mod turn;
pub mod upgrade;

// Every test binary uses a part of these.
#[allow(unused_imports)]
pub use process::*;
#[allow(unused_imports)]
pub use server::*;
#[allow(unused_imports)]
pub use stream::*;
#[allow(unused_imports)]
pub use stun::*;
#[allow(unused_imports)]
pub use turn::*;
