//! Allocation rate: complete allocations per second (unauthenticated Allocate -> 401,
//! authenticated Allocate -> success, Refresh lifetime 0 -> success) for a fixed
//! duration, `--inflight` jobs at once per thread, each on a fresh socket whose source
//! port rotates through `--port-base .. --port-base + --port-count` (split between
//! threads), so no 5-tuple is reused for several seconds.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::engine::{Engine, Job, Stats, Step};
use crate::turn::User;
use crate::util::{cpu_us, ResultLine};

pub struct Opts {
    pub server: SocketAddr,
    pub user: User,
    pub duration: f64,
    pub inflight: usize,
    pub threads: usize,
    pub port_base: u16,
    pub port_count: u16,
    pub pid: Option<u32>,
    pub label: String,
}

pub fn run(o: Opts) -> io::Result<()> {
    let threads = o.threads.max(1);
    let per = (o.port_count as usize / threads).max(1);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(o.duration);
    let cpu0 = o.pid.and_then(|p| cpu_us(p).ok());
    let mut handles = Vec::new();
    for t in 0..threads {
        let engine = Engine {
            server: o.server,
            user: o.user.clone(),
            steps: vec![Step::Allocate, Step::Refresh0],
            inflight: o.inflight,
        };
        let lo = o.port_base as usize + t * per;
        handles.push(std::thread::spawn(move || -> io::Result<Stats> {
            let mut i = 0usize;
            let next = || {
                let port = (lo + i % per) as u16;
                i += 1;
                Some(Job { port, auth: None })
            };
            engine.run(next, |_| {}, Some(deadline))
        }));
    }
    let mut total = Stats::default();
    for h in handles {
        let s = h
            .join()
            .map_err(|_| io::Error::other("allocrate thread panicked"))??;
        total.completed += s.completed;
        total.timeouts += s.timeouts;
        total.bind_failures += s.bind_failures;
        total.abandoned += s.abandoned;
        for (c, n) in s.errors {
            *total.errors.entry(c).or_insert(0) += n;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu1 = o.pid.and_then(|p| cpu_us(p).ok());
    let mut r = ResultLine::new("allocrate");
    r.kv("label", &o.label)
        .kv(
            "allocs_per_s",
            format!("{:.0}", total.completed as f64 / secs),
        )
        .kv("completed", total.completed)
        .kv("secs", format!("{secs:.2}"))
        .kv("timeouts", total.timeouts)
        .kv("errors", total.errors_text())
        .kv("bind_failures", total.bind_failures);
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        let cpu = b.saturating_sub(a);
        r.kv("server_cpu_pct", format!("{:.1}", cpu as f64 / 1e4 / secs));
        if total.completed > 0 {
            r.kv(
                "cpu_us_per_alloc",
                format!("{:.1}", cpu as f64 / total.completed as f64),
            );
        }
    }
    r.print();
    Ok(())
}
