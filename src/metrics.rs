//! Prometheus metrics: the metric families (with the `prometheus-client` crate) that the
//! per-worker counters of [`crate::counters`] are folded into, and a tiny blocking HTTP/1.1
//! endpoint (`/metrics`, `/health`) for `[metrics] listen`.
//!
//! The relay hot path never touches a shared atomic: each worker owns a
//! [`WorkerCounters`] of plain `u64`s and hands it to [`Metrics::flush`] once a second,
//! which adds the deltas to the shared families and zeroes the counters. Every label
//! combination is created up front, so a flush is a few dozen relaxed atomic adds, no
//! lock and no allocation, and every series is exported (as 0) from the start.
//!
//! No label carries a username, address or other unbounded value.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::counters::{
    Direction, RelayPath, WorkerCounters, AUTH_FAILURES, DIRECTIONS, DROP_REASONS, END_REASONS,
    FAMILIES, PATHS, RESPONSE_LABELS, TRANSPORTS,
};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Content type of [`Metrics::encode`]'s output (OpenMetrics text, which Prometheus asks
/// for first).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// How long one HTTP request may take to arrive.
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// How long writing one HTTP response may block.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest HTTP request head accepted (431 beyond it).
pub const MAX_REQUEST: usize = 8 * 1024;

// ---------------------------------------------------------------------------------------------
// The shared metrics
// ---------------------------------------------------------------------------------------------

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];
type LoadGauge = Gauge<f64, AtomicU64>;

/// Every metric family of turnstone, shared by the workers (`Arc<Metrics>`).
///
/// Families (OpenMetrics names; counters end in `_total`):
/// - `turnstone_allocations_active{transport,family}` gauge
/// - `turnstone_allocations_created_total` counter
/// - `turnstone_allocations_ended_total{reason}` counter
/// - `turnstone_relayed_packets_total{direction,path}` / `turnstone_relayed_bytes_total{direction,path}`
/// - `turnstone_relayed_kernel_packets_total{direction,path}` /
///   `turnstone_relayed_kernel_bytes_total{direction,path}`: what the kernel fast path
///   (XDP) relayed, which the families above never count
/// - `turnstone_auth_failures_total{reason}`
/// - `turnstone_responses_total{code}` (error responses)
/// - `turnstone_dropped_packets_total{reason}`
/// - `turnstone_worker_load{worker}` gauge: busy fraction (0..1) over the last flush interval
/// - `turnstone_worker_packets_total{worker}`
/// - `turnstone_worker_stream_connections{worker}` gauge: TCP and TLS client connections
///   each worker's shard holds (its listeners accepted them, or they were handed over)
/// - `turnstone_stream_handovers_total`: RFC 6062 data connections handed from the
///   worker that accepted them to the one holding their allocation
/// - `turnstone_draining` gauge (1 while draining), `turnstone_reloads_total{result}`
/// - `turnstone_kernel_fast_path_entries` gauge: entries in the kernel fast path's four
///   maps (a channel or permission counts once per direction), read twice a second
///   (every 10 s above 4096 entries)
/// - `turnstone_store_up` gauge (1 while the fleet store is reachable; always 0 without `[store]`)
/// - `turnstone_tls_certificate_reloads_total{result}`: certificate pairs loaded (ok)
///   or refused after their files changed on disk (not SIGHUP reloads)
/// - `turnstone_tls_certificate_expiry_timestamp_seconds` gauge: the served
///   certificate's notAfter (Unix time; 0 without TLS)
/// - `turnstone_stream_connections_dropped_total{reason}`: TCP/TLS connections refused or
///   closed by the stream limits ([`crate::net::stream::Dropped`]), counted as they happen
pub struct Metrics {
    registry: Registry,
    active: [[Gauge; 2]; 3],
    created: Counter,
    ended: [Counter; 4],
    relayed_packets: [[Counter; 2]; 2],
    relayed_bytes: [[Counter; 2]; 2],
    kernel_packets: [[Counter; 2]; 2],
    kernel_bytes: [[Counter; 2]; 2],
    auth_failures: [Counter; 5],
    responses: [Counter; 17],
    dropped: [Counter; 7],
    worker_load: Vec<LoadGauge>,
    worker_packets: Vec<Counter>,
    worker_streams: Vec<Gauge>,
    stream_handovers: Counter,
    draining: Gauge,
    reloads: [Counter; 2],
    store_up: Gauge,
    kernel_entries: Gauge,
    cert_reloads: [Counter; 2],
    cert_expiry: Gauge,
    stream_drops: crate::net::stream::DropCounters,
    /// Per worker: milliseconds since `epoch` of its last flush.
    heartbeats: Vec<AtomicU64>,
    epoch: Instant,
    draining_flag: AtomicBool,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("workers", &self.heartbeats.len())
            .finish_non_exhaustive()
    }
}

fn one<M: Clone + Default>(family: &Family<Labels1, M>, key: &'static str, v: &'static str) -> M {
    family.get_or_create_owned(&[(key, v)])
}

fn counters1<const N: usize>(
    family: &Family<Labels1, Counter>,
    key: &'static str,
    values: [&'static str; N],
) -> [Counter; N] {
    values.map(|v| one(family, key, v))
}

fn counters2(
    family: &Family<Labels2, Counter>,
    keys: (&'static str, &'static str),
    a: [&'static str; 2],
    b: [&'static str; 2],
) -> [[Counter; 2]; 2] {
    a.map(|x| b.map(|y| family.get_or_create_owned(&[(keys.0, x), (keys.1, y)])))
}

impl Metrics {
    /// The metrics of a server with `workers` workers.
    pub fn new(workers: usize) -> Metrics {
        let mut reg = Registry::with_prefix("turnstone");

        let active = Family::<Labels2, Gauge>::default();
        reg.register(
            "allocations_active",
            "Allocations open now, by client transport and relayed address family",
            active.clone(),
        );
        let active = TRANSPORTS.map(|t| {
            FAMILIES.map(|f| active.get_or_create_owned(&[("transport", t), ("family", f)]))
        });

        let created = Counter::default();
        reg.register(
            "allocations_created",
            "Allocations created",
            created.clone(),
        );

        let ended = Family::<Labels1, Counter>::default();
        reg.register(
            "allocations_ended",
            "Allocations ended, by reason",
            ended.clone(),
        );
        let ended = counters1(&ended, "reason", END_REASONS);

        let packets = Family::<Labels2, Counter>::default();
        reg.register(
            "relayed_packets",
            "Packets relayed, by direction (to_peer, to_client) and client-side framing (channel, indication)",
            packets.clone(),
        );
        let relayed_packets = counters2(&packets, ("direction", "path"), DIRECTIONS, PATHS);
        let bytes = Family::<Labels2, Counter>::default();
        reg.register(
            "relayed_bytes",
            "Application data bytes relayed (without STUN/ChannelData framing), by direction and framing",
            bytes.clone(),
        );
        let relayed_bytes = counters2(&bytes, ("direction", "path"), DIRECTIONS, PATHS);
        let kpackets = Family::<Labels2, Counter>::default();
        reg.register(
            "relayed_kernel_packets",
            "Packets the kernel fast path (XDP, relay.kernel_fast_path) relayed, by direction and framing",
            kpackets.clone(),
        );
        let kernel_packets = counters2(&kpackets, ("direction", "path"), DIRECTIONS, PATHS);
        let kbytes = Family::<Labels2, Counter>::default();
        reg.register(
            "relayed_kernel_bytes",
            "Application data bytes the kernel fast path relayed, by direction and framing",
            kbytes.clone(),
        );
        let kernel_bytes = counters2(&kbytes, ("direction", "path"), DIRECTIONS, PATHS);

        let auth = Family::<Labels1, Counter>::default();
        reg.register(
            "auth_failures",
            "Requests whose authentication failed, by reason",
            auth.clone(),
        );
        let auth_failures = counters1(&auth, "reason", AUTH_FAILURES);

        let responses = Family::<Labels1, Counter>::default();
        reg.register(
            "responses",
            "Error responses sent, by STUN error code",
            responses.clone(),
        );
        let responses = counters1(&responses, "code", RESPONSE_LABELS);

        let dropped = Family::<Labels1, Counter>::default();
        reg.register(
            "dropped_packets",
            "Packets dropped, by reason",
            dropped.clone(),
        );
        let dropped = counters1(&dropped, "reason", DROP_REASONS);

        let load = Family::<[(&'static str, String); 1], LoadGauge>::default();
        reg.register(
            "worker_load",
            "Fraction of time each worker spent working (not waiting for packets) over the last second",
            load.clone(),
        );
        let wpackets = Family::<[(&'static str, String); 1], Counter>::default();
        reg.register(
            "worker_packets",
            "Packets handled by each worker",
            wpackets.clone(),
        );
        let worker_load = (0..workers)
            .map(|w| load.get_or_create_owned(&[("worker", w.to_string())]))
            .collect();
        let worker_packets = (0..workers)
            .map(|w| wpackets.get_or_create_owned(&[("worker", w.to_string())]))
            .collect();
        let wstreams = Family::<[(&'static str, String); 1], Gauge>::default();
        reg.register(
            "worker_stream_connections",
            "TCP and TLS client connections held by each worker",
            wstreams.clone(),
        );
        let worker_streams = (0..workers)
            .map(|w| wstreams.get_or_create_owned(&[("worker", w.to_string())]))
            .collect();
        let stream_handovers = Counter::default();
        reg.register(
            "stream_handovers",
            "RFC 6062 data connections handed from the worker that accepted them to the worker holding their allocation",
            stream_handovers.clone(),
        );

        let draining = Gauge::default();
        reg.register(
            "draining",
            "1 while the server drains (after SIGTERM), else 0",
            draining.clone(),
        );
        let reloads = Family::<Labels1, Counter>::default();
        reg.register(
            "reloads",
            "Configuration reloads (SIGHUP), by result (ok, refused)",
            reloads.clone(),
        );
        let reloads = counters1(&reloads, "result", ["ok", "refused"]);
        let store_up = Gauge::default();
        reg.register(
            "store_up",
            "1 while the fleet store (Redis, [store] url) is reachable, else 0 (also without a store)",
            store_up.clone(),
        );

        let kernel_entries = Gauge::default();
        reg.register(
            "kernel_fast_path_entries",
            "Entries in the kernel fast path's maps (each channel and permission once per direction), 0 without it",
            kernel_entries.clone(),
        );

        let cert_reloads = Family::<Labels1, Counter>::default();
        reg.register(
            "tls_certificate_reloads",
            "TLS certificate pairs loaded (ok) or refused after their files changed on disk",
            cert_reloads.clone(),
        );
        let cert_reloads = counters1(&cert_reloads, "result", ["ok", "refused"]);
        let cert_expiry = Gauge::default();
        reg.register(
            "tls_certificate_expiry_timestamp_seconds",
            "notAfter of the TLS certificate new handshakes get (Unix time), 0 without TLS",
            cert_expiry.clone(),
        );
        let drops = Family::<Labels1, Counter>::default();
        reg.register(
            "stream_connections_dropped",
            "TCP/TLS client connections refused or closed by the stream limits, by reason",
            drops.clone(),
        );
        let stream_drops = crate::net::stream::DropCounters::new(|r| one(&drops, "reason", r));

        Metrics {
            registry: reg,
            stream_drops,
            active,
            created,
            ended,
            relayed_packets,
            relayed_bytes,
            kernel_packets,
            kernel_bytes,
            auth_failures,
            responses,
            dropped,
            worker_load,
            worker_packets,
            worker_streams,
            stream_handovers,
            draining,
            reloads,
            store_up,
            kernel_entries,
            cert_reloads,
            cert_expiry,
            heartbeats: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            epoch: Instant::now(),
            draining_flag: AtomicBool::new(false),
        }
    }

    /// Worker `worker` holds `n` stream client connections now.
    pub fn set_worker_streams(&self, worker: usize, n: usize) {
        if let Some(g) = self.worker_streams.get(worker) {
            g.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// A stream connection was handed over to another worker.
    pub fn stream_handed_over(&self) {
        self.stream_handovers.inc();
    }

    /// The counters of dropped stream connections, for the connection counter
    /// ([`crate::net::stream::ConnCounter::with_drops`]), which counts into them directly.
    pub fn stream_drops(&self) -> crate::net::stream::DropCounters {
        self.stream_drops.clone()
    }

    /// Number of workers these metrics were made for.
    pub fn workers(&self) -> usize {
        self.heartbeats.len()
    }

    /// Entries in the kernel fast path's maps now (gauge `turnstone_kernel_fast_path_entries`).
    pub fn set_kernel_entries(&self, n: usize) {
        self.kernel_entries
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Adds what the kernel fast path relayed since the last call.
    pub fn kernel_relayed(&self, d: Direction, p: RelayPath, packets: u64, bytes: u64) {
        if let Some(c) = self
            .kernel_packets
            .get(d as usize)
            .and_then(|r| r.get(p as usize))
        {
            add(c, packets);
        }
        if let Some(c) = self
            .kernel_bytes
            .get(d as usize)
            .and_then(|r| r.get(p as usize))
        {
            add(c, bytes);
        }
    }

    /// Adds worker `worker`'s counts to the shared families, updates its load and
    /// heartbeat, and zeroes `counters`. Call about once a second from the worker's loop.
    pub fn flush(&self, worker: usize, c: &mut WorkerCounters) {
        let now = Instant::now();
        let mut created = 0u64;
        for (t, row) in self.active.iter().enumerate() {
            for (f, gauge) in row.iter().enumerate() {
                let up = c.created[t][f];
                let down = c.ended[t][f];
                created += up;
                let delta = i64::try_from(up)
                    .unwrap_or(i64::MAX)
                    .saturating_sub(i64::try_from(down).unwrap_or(i64::MAX));
                if delta != 0 {
                    gauge.inc_by(delta);
                }
            }
        }
        add(&self.created, created);
        add_all(&self.ended, &c.ended_by_reason);
        for d in 0..2 {
            add_all(&self.relayed_packets[d], &c.relayed_packets[d]);
            add_all(&self.relayed_bytes[d], &c.relayed_bytes[d]);
        }
        add_all(&self.auth_failures, &c.auth_failures);
        add_all(&self.responses, &c.responses);
        add_all(&self.dropped, &c.dropped);
        if let Some(p) = self.worker_packets.get(worker) {
            add(p, c.packets);
        }
        if let Some(g) = self.worker_load.get(worker) {
            let elapsed = now.saturating_duration_since(c.last_flush).as_secs_f64();
            if elapsed > 0.0 {
                g.set((c.busy.as_secs_f64() / elapsed).clamp(0.0, 1.0));
            }
        }
        if let Some(h) = self.heartbeats.get(worker) {
            h.store(self.millis(now), Ordering::Relaxed);
        }
        c.reset(now);
    }

    fn millis(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// Has every worker flushed within `max_age` (counting from creation for a worker
    /// that has not flushed yet)? For `/health` and the systemd watchdog.
    pub fn workers_alive(&self, max_age: Duration) -> bool {
        let now = self.millis(Instant::now());
        let max = u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX);
        self.heartbeats
            .iter()
            .all(|h| now.saturating_sub(h.load(Ordering::Relaxed)) <= max)
    }

    /// Marks the server draining (gauge `turnstone_draining`).
    pub fn set_draining(&self, on: bool) {
        self.draining_flag.store(on, Ordering::Relaxed);
        self.draining.set(i64::from(on));
    }

    pub fn is_draining(&self) -> bool {
        self.draining_flag.load(Ordering::Relaxed)
    }

    /// Whether the fleet store is reachable (gauge `turnstone_store_up`).
    pub fn set_store_up(&self, up: bool) {
        self.store_up.set(i64::from(up));
    }

    /// Counts a SIGHUP reload: applied (`true`) or refused.
    pub fn reload(&self, ok: bool) {
        self.reloads[usize::from(!ok)].inc();
    }

    /// Counts a certificate pair reloaded from changed files: loaded (`true`) or refused.
    pub fn tls_certificate_reload(&self, ok: bool) {
        self.cert_reloads[usize::from(!ok)].inc();
    }

    /// The served certificate's notAfter, in seconds since 1970.
    pub fn set_tls_certificate_expiry(&self, unix_seconds: u64) {
        self.cert_expiry
            .set(i64::try_from(unix_seconds).unwrap_or(i64::MAX));
    }

    /// Active allocations over all transports and families, as of the last flushes.
    pub fn active_allocations(&self) -> i64 {
        self.active.iter().flatten().map(Gauge::get).sum()
    }

    /// The OpenMetrics text exposition of every family ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[inline]
fn add(c: &Counter, n: u64) {
    if n != 0 {
        c.inc_by(n);
    }
}

fn add_all(counters: &[Counter], values: &[u64]) {
    for (c, &n) in counters.iter().zip(values) {
        add(c, n);
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP endpoint
// ---------------------------------------------------------------------------------------------

/// Whether the server is healthy, for `GET /health` (200 "ok" or 503).
pub type Health = Arc<dyn Fn() -> bool + Send + Sync>;

/// Binds `listen` and serves `/metrics` and `/health` on a thread of its own (see
/// [`serve_on`]). The bind error is returned (the caller names `metrics.listen`).
pub fn serve(
    listen: SocketAddr,
    metrics: Arc<Metrics>,
    health: Health,
) -> io::Result<JoinHandle<()>> {
    serve_on(TcpListener::bind(listen)?, metrics, health)
}

/// Serves HTTP/1.1 on `listener` from a thread named `turnstone-metrics`, one request per
/// connection, one connection at a time: `GET`/`HEAD` `/metrics` (OpenMetrics text) and
/// `/health` (200 "ok" / 503 "unhealthy"); 404 for other paths, 405 for other methods.
/// A request head must arrive within [`READ_TIMEOUT`] and fit in [`MAX_REQUEST`] bytes.
/// The thread runs until the process exits.
pub fn serve_on(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Health,
) -> io::Result<JoinHandle<()>> {
    serve_until(listener, metrics, health, None)
}

/// [`serve_on`], until `stop` is set (checked four times a second: the listener was
/// handed to a new process in an upgrade).
pub fn serve_until(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Health,
    stop: Option<Arc<std::sync::atomic::AtomicBool>>,
) -> io::Result<JoinHandle<()>> {
    use std::os::fd::AsFd;
    std::thread::Builder::new()
        .name("turnstone-metrics".to_owned())
        .spawn(move || loop {
            if let Some(stop) = &stop {
                if stop.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
                let mut fds = [nix::poll::PollFd::new(
                    listener.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                if !matches!(nix::poll::poll(&mut fds, 250u16), Ok(n) if n > 0)
                    || stop.load(std::sync::atomic::Ordering::Acquire)
                {
                    continue;
                }
            }
            match listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = handle(stream, &metrics, &health) {
                        tracing::debug!(error = %e, "metrics: request failed");
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "metrics: accept failed");
                    // EMFILE and the like: do not spin.
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        })
}

/// End of the request head (`\r\n\r\n`, or a bare `\n\n`), if complete.
fn head_complete(buf: &[u8]) -> bool {
    buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n")
}

fn handle(mut stream: TcpStream, metrics: &Metrics, health: &Health) -> io::Result<()> {
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut len = 0;
    while !head_complete(buf.get(..len).unwrap_or_default()) {
        let Some(space) = buf.get_mut(len..).filter(|s| !s.is_empty()) else {
            respond(&mut stream, 431, "text/plain", b"request too large\n", true)?;
            // Read what is left so that closing does not reset the connection before
            // the client has read the answer.
            discard_input(&mut stream);
            return Ok(());
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return respond(&mut stream, 408, "text/plain", b"request timeout\n", true);
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(space) {
            Ok(0) => return Ok(()),
            Ok(n) => len += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return respond(&mut stream, 408, "text/plain", b"request timeout\n", true);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let head = buf.get(..len).unwrap_or_default();
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let line = std::str::from_utf8(head.get(..line_end).unwrap_or_default())
        .unwrap_or("")
        .trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return respond(&mut stream, 400, "text/plain", b"bad request\n", true);
    };
    if !version.starts_with("HTTP/1.") {
        return respond(&mut stream, 400, "text/plain", b"bad request\n", true);
    }
    let body = method != "HEAD";
    let path = target.split('?').next().unwrap_or(target);
    let selftest = path == crate::selftest::PATH && crate::selftest::enabled();
    let known = selftest || matches!(path, "/metrics" | "/health");
    if known && !matches!(method, "GET" | "HEAD") {
        return respond(
            &mut stream,
            405,
            "text/plain",
            b"method not allowed\n",
            body,
        );
    }
    match path {
        "/metrics" => {
            let text = metrics.encode();
            respond(&mut stream, 200, CONTENT_TYPE, text.as_bytes(), body)
        }
        "/health" => {
            if health() {
                respond(&mut stream, 200, "text/plain", b"ok\n", body)
            } else {
                respond(&mut stream, 503, "text/plain", b"unhealthy\n", body)
            }
        }
        _ if selftest => respond(
            &mut stream,
            200,
            crate::selftest::CONTENT_TYPE,
            crate::selftest::PAGE.as_bytes(),
            body,
        ),
        _ => respond(&mut stream, 404, "text/plain", b"not found\n", body),
    }
}

/// Reads and drops what the client still sends, for at most 200 ms and 64 KiB.
fn discard_input(stream: &mut TcpStream) {
    let deadline = Instant::now() + Duration::from_millis(200);
    let mut sink = [0u8; 4096];
    let mut total = 0;
    while total < 64 * 1024 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(n) => total += n,
        }
    }
}

fn respond(
    stream: &mut TcpStream,
    code: u16,
    content_type: &str,
    body: &[u8],
    send_body: bool,
) -> io::Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let allow = if code == 405 {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut out = Vec::with_capacity(head.len() + body.len());
    out.extend_from_slice(head.as_bytes());
    if send_body {
        out.extend_from_slice(body);
    }
    stream.write_all(&out)?;
    stream.flush()?;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counters::{AuthFailure, Direction, DropReason, EndReason, RelayPath, Transport};

    fn get(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    fn server(metrics: Arc<Metrics>, healthy: Arc<AtomicBool>) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let health: Health = Arc::new(move || healthy.load(Ordering::Relaxed));
        serve_on(l, metrics, health).unwrap();
        addr
    }

    #[test]
    fn encode_has_every_family_at_zero() {
        let m = Metrics::new(2);
        let text = m.encode();
        for needle in [
            "# TYPE turnstone_allocations_active gauge",
            "turnstone_allocations_active{transport=\"udp\",family=\"ipv4\"} 0",
            "turnstone_allocations_active{transport=\"tls\",family=\"ipv6\"} 0",
            "turnstone_allocations_created_total 0",
            "turnstone_allocations_ended_total{reason=\"expired\"} 0",
            "turnstone_relayed_packets_total{direction=\"to_peer\",path=\"channel\"} 0",
            "turnstone_relayed_bytes_total{direction=\"to_client\",path=\"indication\"} 0",
            "turnstone_auth_failures_total{reason=\"stale_nonce\"} 0",
            "turnstone_responses_total{code=\"401\"} 0",
            "turnstone_responses_total{code=\"other\"} 0",
            "turnstone_dropped_packets_total{reason=\"no_permission\"} 0",
            "turnstone_dropped_packets_total{reason=\"rate_limited\"} 0",
            "turnstone_worker_load{worker=\"1\"} 0",
            "turnstone_worker_packets_total{worker=\"0\"} 0",
            "turnstone_draining 0",
            "turnstone_kernel_fast_path_entries 0",
            "turnstone_reloads_total{result=\"refused\"} 0",
            "# EOF",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }

    #[test]
    fn kernel_relayed_has_its_own_families() {
        let m = Metrics::new(1);
        m.kernel_relayed(Direction::ToPeer, RelayPath::Channel, 10, 1000);
        m.kernel_relayed(Direction::ToClient, RelayPath::Indication, 2, 20);
        let text = m.encode();
        for needle in [
            "turnstone_relayed_kernel_packets_total{direction=\"to_peer\",path=\"channel\"} 10",
            "turnstone_relayed_kernel_bytes_total{direction=\"to_peer\",path=\"channel\"} 1000",
            "turnstone_relayed_kernel_packets_total{direction=\"to_client\",path=\"indication\"} 2",
            "turnstone_relayed_packets_total{direction=\"to_peer\",path=\"channel\"} 0",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }

    #[test]
    fn flush_adds_and_resets() {
        let m = Metrics::new(2);
        let mut c = WorkerCounters::new();
        c.allocation_created(Transport::Udp, false);
        c.allocation_created(Transport::Udp, false);
        c.allocation_created(Transport::Tcp, true);
        c.allocation_ended(Transport::Udp, false, EndReason::Expired);
        c.relayed(Direction::ToPeer, RelayPath::Channel, 100);
        c.relayed(Direction::ToPeer, RelayPath::Channel, 50);
        c.relayed_many(Direction::ToClient, RelayPath::Indication, 3, 30);
        c.auth_failure(AuthFailure::BadCredentials);
        c.response(401);
        c.response(401);
        c.response(999);
        c.dropped(DropReason::Bandwidth);
        c.handled(7);
        c.busy(Duration::from_secs(10));
        m.flush(1, &mut c);
        assert_eq!(m.active_allocations(), 2);
        // The counters start over.
        m.flush(1, &mut c);
        assert_eq!(m.active_allocations(), 2);
        let mut c0 = WorkerCounters::new();
        c0.allocation_ended(Transport::Tcp, true, EndReason::ConnectionClosed);
        m.flush(0, &mut c0);
        // Out of range worker: counted, no per-worker series, no panic.
        m.flush(9, &mut WorkerCounters::new());
        assert_eq!(m.active_allocations(), 1);
        let text = m.encode();
        for needle in [
            "turnstone_allocations_active{transport=\"udp\",family=\"ipv4\"} 1",
            "turnstone_allocations_active{transport=\"tcp\",family=\"ipv6\"} 0",
            "turnstone_allocations_created_total 3",
            "turnstone_allocations_ended_total{reason=\"expired\"} 1",
            "turnstone_allocations_ended_total{reason=\"connection_closed\"} 1",
            "turnstone_relayed_packets_total{direction=\"to_peer\",path=\"channel\"} 2",
            "turnstone_relayed_bytes_total{direction=\"to_peer\",path=\"channel\"} 150",
            "turnstone_relayed_packets_total{direction=\"to_client\",path=\"indication\"} 3",
            "turnstone_relayed_bytes_total{direction=\"to_client\",path=\"indication\"} 30",
            "turnstone_auth_failures_total{reason=\"bad_credentials\"} 1",
            "turnstone_responses_total{code=\"401\"} 2",
            "turnstone_responses_total{code=\"other\"} 1",
            "turnstone_dropped_packets_total{reason=\"bandwidth\"} 1",
            "turnstone_worker_packets_total{worker=\"1\"} 7",
            // The second flush had no busy time.
            "turnstone_worker_load{worker=\"1\"} 0.0",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        m.set_draining(true);
        m.reload(true);
        assert!(m.is_draining());
        let text = m.encode();
        assert!(text.contains("turnstone_draining 1"), "{text}");
        assert!(
            text.contains("turnstone_reloads_total{result=\"ok\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn load_is_a_busy_fraction() {
        let m = Metrics::new(1);
        let mut c = WorkerCounters::new();
        c.busy(Duration::from_secs(3600));
        std::thread::sleep(Duration::from_millis(5));
        m.flush(0, &mut c);
        assert!(m
            .encode()
            .contains("turnstone_worker_load{worker=\"0\"} 1.0"));
    }

    #[test]
    fn heartbeats() {
        let m = Metrics::new(2);
        assert!(m.workers_alive(Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(30));
        assert!(!m.workers_alive(Duration::from_millis(10)));
        m.flush(0, &mut WorkerCounters::new());
        assert!(!m.workers_alive(Duration::from_millis(10)));
        m.flush(1, &mut WorkerCounters::new());
        assert!(m.workers_alive(Duration::from_millis(10)));
    }

    #[test]
    fn http_metrics_health_and_errors() {
        let m = Arc::new(Metrics::new(1));
        let mut c = WorkerCounters::new();
        c.allocation_created(Transport::Tls, false);
        m.flush(0, &mut c);
        let healthy = Arc::new(AtomicBool::new(true));
        let addr = server(m, healthy.clone());

        let r = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(
            r.contains(&format!("Content-Type: {CONTENT_TYPE}\r\n")),
            "{r}"
        );
        assert!(
            r.contains("turnstone_allocations_active{transport=\"tls\",family=\"ipv4\"} 1"),
            "{r}"
        );
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("Content-Length: {}\r\n", body.len())),
            "{head}"
        );

        let r = get(addr, "GET /health HTTP/1.0\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("\r\n\r\nok\n"),
            "{r}"
        );
        healthy.store(false, Ordering::Relaxed);
        let r = get(addr, "GET /health?verbose=1 HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 503 "), "{r}");

        let r = get(addr, "HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("\r\n\r\n"),
            "{r}"
        );
        let r = get(addr, "GET / HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 404 "), "{r}");
        let r = get(addr, "POST /metrics HTTP/1.1\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.1 405 ") && r.contains("Allow: GET, HEAD"),
            "{r}"
        );
        let r = get(addr, "garbage\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
        let r = get(addr, "GET /metrics SPDY/3\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 400 "), "{r}");

        // Too large: refused after 8 KiB without waiting for the end of the head.
        let big = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(10_000));
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(big.as_bytes());
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 431 "), "{out}");
    }

    #[test]
    fn http_slow_client_times_out_and_server_goes_on() {
        let m = Arc::new(Metrics::new(1));
        let addr = server(m, Arc::new(AtomicBool::new(true)));
        let started = Instant::now();
        let mut slow = TcpStream::connect(addr).unwrap();
        slow.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        slow.write_all(b"GET /metr").unwrap();
        let mut out = String::new();
        let _ = slow.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 408 "), "{out}");
        let took = started.elapsed();
        assert!(
            took >= READ_TIMEOUT - Duration::from_millis(100),
            "{took:?}"
        );
        assert!(took < READ_TIMEOUT + Duration::from_secs(3), "{took:?}");
        let r = get(addr, "GET /health HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 OK"), "{r}");
    }
}
