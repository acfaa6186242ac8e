//! `loadgen`: the tools of turnstone's benchmark (`bench/run` drives them; see
//! `bench/README.md`). Every subcommand talks only to loopback (or, in `bench/netns`, to
//! the rig's own namespaces), runs for a bounded time and prints one
//! `RESULT <tool> key=value ...` line on stdout.
//!
//! - `floor`: the minimal UDP forwarder (the kernel's own cost of relaying).
//! - `echo`: a UDP echo peer.
//! - `load`: paced TURN ChannelData / Send-indication or plain-UDP load, with loss and
//!   server CPU per relayed packet.
//! - `rtt`: round-trip latency probe through one channel-bound allocation.
//! - `allocrate`: complete allocations per second.
//! - `mem`: server RSS per idle allocation, and after deleting them.
//! - `wait`: waits until a STUN server answers a Binding request.

mod allocrate;
mod engine;
mod floor;
mod load;
mod mem;
mod rtt;
mod turn;
mod util;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::load::Mode;
use crate::turn::User;

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "turnstone benchmark tools (loopback, or the bench/netns namespaces)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// TURN server (or floor forwarder) address.
    #[arg(long, default_value = "127.0.0.1:3678")]
    server: SocketAddr,
    #[arg(long, default_value = "bench")]
    user: String,
    #[arg(long, default_value = "bench")]
    password: String,
    /// Free-form label copied into the RESULT line.
    #[arg(long, default_value = "-")]
    label: String,
}

impl Common {
    fn user(&self) -> User {
        User {
            name: self.user.clone(),
            password: self.password.clone(),
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Minimal UDP forwarder: client side on --listen, peer side connected to --peer.
    Floor {
        #[arg(long, default_value = "127.0.0.1:3678")]
        listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:3680")]
        peer: SocketAddr,
        /// Exit after this many seconds at the latest.
        #[arg(long, default_value_t = 600)]
        max_secs: u64,
    },
    /// UDP echo peer.
    Echo {
        #[arg(long, default_value = "127.0.0.1:3680")]
        listen: SocketAddr,
        #[arg(long, default_value_t = 600)]
        max_secs: u64,
    },
    /// Paced load at a fixed offered rate of relayed packets/s.
    Load {
        #[command(flatten)]
        common: Common,
        #[arg(long, value_enum, default_value = "channel")]
        mode: Mode,
        /// Echo peer address (started here unless --external-peer).
        #[arg(long, default_value = "127.0.0.1:3680")]
        peer: SocketAddr,
        /// Use an echo peer that is already running at --peer.
        #[arg(long)]
        external_peer: bool,
        /// Local address of the client sockets (e.g. a network namespace's own address).
        #[arg(long, default_value = "127.0.0.1")]
        bind: std::net::IpAddr,
        /// Number of allocations (TURN modes; the floor mode uses one socket).
        #[arg(long, default_value_t = 50)]
        allocs: usize,
        /// Offered relayed packets/s (half sent by the generator, half echoed).
        #[arg(long, default_value_t = 100_000)]
        rate: u64,
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        #[arg(long, default_value_t = 8.0)]
        duration: f64,
        /// UDP payload bytes (application data inside ChannelData / DATA).
        #[arg(long, default_value_t = 170)]
        payload: usize,
        /// Server process whose CPU time is measured.
        #[arg(long)]
        pid: Option<u32>,
    },
    /// Round-trip latency through one channel-bound allocation (or the floor).
    Rtt {
        #[command(flatten)]
        common: Common,
        #[arg(long, value_enum, default_value = "channel")]
        mode: Mode,
        /// Where the probe's own echo peer binds.
        #[arg(long, default_value = "127.0.0.1:0")]
        peer: SocketAddr,
        #[arg(long, default_value_t = 10)]
        interval_ms: u64,
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        #[arg(long, default_value_t = 100)]
        payload: usize,
    },
    /// Complete allocations per second (401 round trip, Allocate, Refresh 0).
    Allocrate {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        /// Jobs in flight per thread.
        #[arg(long, default_value_t = 64)]
        inflight: usize,
        #[arg(long, default_value_t = 1)]
        threads: usize,
        #[arg(long, default_value_t = 10000)]
        port_base: u16,
        #[arg(long, default_value_t = 22000)]
        port_count: u16,
        #[arg(long)]
        pid: Option<u32>,
    },
    /// RSS per idle allocation, and after deleting them.
    Mem {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        pid: u32,
        #[arg(long, default_value_t = 10000)]
        count: usize,
        #[arg(long, default_value_t = 64)]
        inflight: usize,
        #[arg(long, default_value_t = 20000)]
        port_base: u16,
        /// Seconds to wait before each reading.
        #[arg(long, default_value_t = 2.0)]
        settle_secs: f64,
    },
    /// Wait until a STUN server answers a Binding request.
    Wait {
        #[arg(long, default_value = "127.0.0.1:3678")]
        server: SocketAddr,
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Floor {
            listen,
            peer,
            max_secs,
        } => floor::run(listen, peer, max_secs),
        Cmd::Echo { listen, max_secs } => util::Echo::start(listen).map(|e| {
            eprintln!("echo: on {} (at most {max_secs} s)", e.addr);
            std::thread::sleep(Duration::from_secs(max_secs));
        }),
        Cmd::Load {
            common,
            mode,
            peer,
            external_peer,
            bind,
            allocs,
            rate,
            warmup,
            duration,
            payload,
            pid,
        } => load::run(load::Opts {
            mode,
            server: common.server,
            peer,
            external_peer,
            bind,
            allocs,
            rate,
            warmup,
            duration,
            payload,
            pid,
            user: common.user(),
            label: common.label,
        }),
        Cmd::Rtt {
            common,
            mode,
            peer,
            interval_ms,
            duration,
            payload,
        } => rtt::run(rtt::Opts {
            mode,
            server: common.server,
            peer,
            interval_ms,
            duration,
            payload,
            user: common.user(),
            label: common.label,
        }),
        Cmd::Allocrate {
            common,
            duration,
            inflight,
            threads,
            port_base,
            port_count,
            pid,
        } => allocrate::run(allocrate::Opts {
            server: common.server,
            user: common.user(),
            duration,
            inflight,
            threads,
            port_base,
            port_count,
            pid,
            label: common.label,
        }),
        Cmd::Mem {
            common,
            pid,
            count,
            inflight,
            port_base,
            settle_secs,
        } => mem::run(mem::Opts {
            server: common.server,
            user: common.user(),
            pid,
            count,
            inflight,
            port_base,
            settle_secs,
            label: common.label,
        }),
        Cmd::Wait { server, timeout } => {
            turn::wait_for_server(server, Duration::from_secs_f64(timeout))
        }
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}
