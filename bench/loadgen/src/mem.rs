//! Server memory per idle allocation: VmRSS (and open fds) of `--pid` at rest, after
//! `--count` allocations (each from its own source port, the socket closed once the
//! allocation succeeded: the allocation stays on the server for its lifetime), and after
//! deleting them all again (Refresh lifetime 0 from the same source port, with the
//! nonce that port was given).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use crate::engine::{Engine, Job, Step};
use crate::turn::{Auth, User};
use crate::util::{fd_count, rss_kib, ResultLine};

pub struct Opts {
    pub server: SocketAddr,
    pub user: User,
    pub pid: u32,
    pub count: usize,
    pub inflight: usize,
    pub port_base: u16,
    pub settle_secs: f64,
    pub label: String,
}

pub fn run(o: Opts) -> io::Result<()> {
    if o.port_base as usize + o.count > 65535 {
        return Err(io::Error::other("--port-base + --count exceeds 65535"));
    }
    let settle = Duration::from_secs_f64(o.settle_secs);
    let rss0 = rss_kib(o.pid)?;
    let fd0 = fd_count(o.pid)?;

    // Create.
    let engine = Engine {
        server: o.server,
        user: o.user.clone(),
        steps: vec![Step::Allocate],
        inflight: o.inflight,
    };
    let mut next_port = o.port_base as usize;
    let end = o.port_base as usize + o.count;
    let mut made: Vec<(u16, Auth)> = Vec::with_capacity(o.count);
    let stats_create = engine.run(
        || {
            if next_port >= end {
                return None;
            }
            let port = next_port as u16;
            next_port += 1;
            Some(Job { port, auth: None })
        },
        |out| {
            if let (Ok(()), Some(a)) = (out.result, out.auth) {
                made.push((out.port, a));
            }
        },
        None,
    )?;
    std::thread::sleep(settle);
    let rss1 = rss_kib(o.pid)?;
    let fd1 = fd_count(o.pid)?;

    // Delete.
    let engine = Engine {
        steps: vec![Step::Refresh0],
        ..engine
    };
    let created = made.len();
    let mut jobs = made.into_iter();
    let stats_delete = engine.run(
        || {
            jobs.next().map(|(port, auth)| Job {
                port,
                auth: Some(auth),
            })
        },
        |_| {},
        None,
    )?;
    std::thread::sleep(settle);
    let rss2 = rss_kib(o.pid)?;
    let fd2 = fd_count(o.pid)?;

    let per_alloc_kib = if created > 0 {
        (rss1 as f64 - rss0 as f64) / created as f64
    } else {
        0.0
    };
    ResultLine::new("mem")
        .kv("label", &o.label)
        .kv("allocations", created)
        .kv("create_errors", stats_create.errors_text())
        .kv("create_timeouts", stats_create.timeouts)
        .kv("deleted", stats_delete.completed)
        .kv("delete_errors", stats_delete.errors_text())
        .kv("rss0_kib", rss0)
        .kv("rss_full_kib", rss1)
        .kv("rss_after_kib", rss2)
        .kv("per_alloc_kib", format!("{per_alloc_kib:.2}"))
        .kv("fd0", fd0)
        .kv("fd_full", fd1)
        .kv("fd_after", fd2)
        .print();
    Ok(())
}
