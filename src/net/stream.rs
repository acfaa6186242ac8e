//! Stream client connections (TCP and TLS, RFC 8656 section 3.1 / 12.5) of one worker:
//! accepting, per-connection buffers, TLS (rustls), splitting the byte stream into STUN
//! and ChannelData frames, writing replies with backpressure, and the stream safety rules
//! (slow-loris deadline, maximum frame size, idle timeout, per-address and total caps).
//!
//! A connection is *established* once it has sent a complete first message (TCP) or
//! finished its TLS handshake (TLS). Until then it has the short deadline
//! ([`StreamLimits::handshake_and_partial_deadline`]) and counts against the small cap of
//! unestablished connections per source address; after that the long idle timeout
//! applies and it counts against the large per-source cap, so that thousands of clients
//! behind one NAT address are served while one address cannot hold many silent or
//! half-open connections.
//!
//! A listener with `proxy_protocol` ([`StreamLimits::proxy`]) takes connections only from
//! its `proxy_from` sources, and each must start with a PROXY protocol header
//! ([`crate::proto::proxy`]) before anything else (before the TLS handshake on a tls
//! listener). The header's source address becomes the connection's client address: its
//! 5-tuple, the per-source caps, logs and whatever the core does with it. Until the
//! header is complete the connection counts only in the total, under the short deadline;
//! a missing, malformed, oversized or slow header closes it, and nothing of it is ever
//! framed as STUN.
//!
//! Driven by the worker's level-triggered epoll loop: non-blocking std sockets, one epoll
//! token per connection (`token_base + slot`), no tokio. Protocol logic stays in the core:
//! each complete frame is handed to a callback together with the connection's 5-tuple.
//!
//! Memory: an idle connection holds its socket, a few small fields and (TLS) a rustls
//! connection of a few KiB. Read and write buffers are empty `Vec`s until a partial frame
//! or an unsent reply needs them, and are given back once drained.

use std::cell::Cell;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags};
use rustls::ServerConnection;

use crate::proto::{next_frame, parse_proxy_header, Frame, ProxyAddresses, ProxyHeader};
use crate::server::{FiveTuple, Transport};

/// Connections accepted per readiness event of a listener (level-triggered: the rest are
/// reported again).
const ACCEPT_BATCH: usize = 64;
/// Socket reads per readiness event of a connection.
const READS_PER_EVENT: usize = 4;
/// TLS connections still handshaking that one pass of the worker's loop reads from (a
/// full handshake costs about 170-190 µs of CPU, most of it on the ClientHello): more are
/// left for the next pass (level-triggered epoll reports them again at once), so a burst
/// of handshakes delays the relaying on the same worker by at most this many of them
/// per pass, not by all of them.
const HANDSHAKES_PER_PASS: u32 = 4;
/// Size of the worker-wide read buffer.
const SCRATCH_LEN: usize = 64 * 1024;
/// A drained buffer larger than this is freed rather than kept for the next message.
const KEEP_CAPACITY: usize = 4 * 1024;
/// TLS record overhead per 16 KiB record (header + AEAD tag + content type), for the
/// write-buffer accounting.
const TLS_RECORD_OVERHEAD: usize = 5 + 16 + 1 + 256;
const TLS_RECORD_PAYLOAD: usize = 16 * 1024;

/// Stream safety limits (issue 4: slow-loris, frame size, idle, caps, backpressure;
/// issue 16: caps that hold thousands of clients behind one address). From `[limits]`
/// ([`StreamLimits::from_config`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamLimits {
    /// Largest frame accepted (STUN: 20 + length; ChannelData: 4 + length padded to 4).
    /// A frame header announcing more closes the connection.
    pub max_frame: usize,
    /// A new connection must be established (a complete first frame on TCP, the TLS
    /// handshake finished) within this, and an incomplete frame must complete within it
    /// (`limits.stream_handshake_timeout`).
    pub handshake_and_partial_deadline: Duration,
    /// An established connection that delivers no complete frame for this long is closed
    /// (`limits.stream_idle_timeout`).
    pub idle_timeout: Duration,
    /// Established connections from one source IP address; one that would exceed it is
    /// closed when it becomes established (`limits.max_connections_per_source`).
    pub max_per_source: usize,
    /// Connections from one source IP address not yet established; excess connections
    /// are closed at once (`limits.max_unauthenticated_per_source`).
    pub max_unestablished_per_source: usize,
    /// Connections in total (counted by the [`ConnCounter`], which may be shared;
    /// `limits.max_connections`).
    pub max_total: usize,
    /// Listeners (by their configured address) whose connections must start with a PROXY
    /// protocol header, and the sources allowed to connect to them
    /// (`listen[N].proxy_protocol`, `listen[N].proxy_from`).
    pub proxy: Vec<(SocketAddr, Vec<ipnet::IpNet>)>,
    /// Unsent bytes queued per connection. Peer data beyond it is dropped (the frame, not
    /// the connection: [`Streams::send`] returns false); a reply to the client's own
    /// request that does not fit closes the connection.
    pub max_write_buffer: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            // The largest ChannelData (65535 bytes of data, padded), RFC 8656 12.5.
            max_frame: 4 + 65536,
            handshake_and_partial_deadline: crate::config::DEFAULT_STREAM_HANDSHAKE_TIMEOUT,
            idle_timeout: crate::config::DEFAULT_STREAM_IDLE_TIMEOUT,
            max_per_source: crate::config::DEFAULT_MAX_CONNECTIONS_PER_SOURCE,
            max_unestablished_per_source: crate::config::DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE,
            max_total: crate::config::DEFAULT_MAX_CONNECTIONS,
            proxy: Vec::new(),
            max_write_buffer: 1024 * 1024,
        }
    }
}

impl StreamLimits {
    /// The limits `[limits]` of `config` sets.
    pub fn from_config(config: &crate::config::Config) -> StreamLimits {
        let l = &config.limits;
        StreamLimits {
            handshake_and_partial_deadline: l.stream_handshake_timeout,
            idle_timeout: l.stream_idle_timeout,
            max_per_source: l.max_connections_per_source,
            max_unestablished_per_source: l.max_unauthenticated_per_source,
            max_total: l.max_connections,
            proxy: config
                .listen
                .iter()
                .filter(|l| l.proxy_protocol && l.transport.is_stream())
                .map(|l| (l.address, l.proxy_from.clone()))
                .collect(),
            ..StreamLimits::default()
        }
    }
}

/// Why the server refused or dropped a stream connection, as counted in
/// `turnstone_stream_connections_dropped_total{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// `limits.max_connections` reached: refused at accept.
    TotalLimit,
    /// `limits.max_connections_per_source` reached: closed when it became established.
    SourceLimit,
    /// `limits.max_unauthenticated_per_source` reached: refused at accept.
    UnauthenticatedLimit,
    /// Not established within `limits.stream_handshake_timeout`.
    HandshakeTimeout,
    /// On a `proxy_protocol` listener, from a source not in its `proxy_from`.
    ProxyUntrusted,
    /// On a `proxy_protocol` listener, no valid PROXY header first (missing, malformed,
    /// oversized).
    ProxyInvalid,
    /// On a `proxy_protocol` listener, the header not complete within
    /// `limits.stream_handshake_timeout`.
    ProxyTimeout,
}

impl Dropped {
    pub const ALL: [Dropped; 7] = [
        Dropped::TotalLimit,
        Dropped::SourceLimit,
        Dropped::UnauthenticatedLimit,
        Dropped::HandshakeTimeout,
        Dropped::ProxyUntrusted,
        Dropped::ProxyInvalid,
        Dropped::ProxyTimeout,
    ];

    /// The metric's `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            Dropped::TotalLimit => "total_limit",
            Dropped::SourceLimit => "source_limit",
            Dropped::UnauthenticatedLimit => "unauthenticated_limit",
            Dropped::HandshakeTimeout => "handshake_timeout",
            Dropped::ProxyUntrusted => "proxy_untrusted",
            Dropped::ProxyInvalid => "proxy_invalid",
            Dropped::ProxyTimeout => "proxy_timeout",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Dropped::TotalLimit => "total connection limit (limits.max_connections)",
            Dropped::SourceLimit => {
                "per-address connection limit (limits.max_connections_per_source)"
            }
            Dropped::UnauthenticatedLimit => {
                "per-address limit of unestablished connections (limits.max_unauthenticated_per_source)"
            }
            Dropped::HandshakeTimeout => "deadline for the first message or TLS handshake",
            Dropped::ProxyUntrusted => {
                "not from a load balancer in the listener's proxy_from (PROXY protocol)"
            }
            Dropped::ProxyInvalid => "no valid PROXY protocol header",
            Dropped::ProxyTimeout => "deadline for the PROXY protocol header",
        }
    }
}

/// The counters of [`Dropped`] connections, one per reason (shared with the metrics
/// endpoint; see [`crate::metrics::Metrics::stream_drops`]).
#[derive(Clone, Debug, Default)]
pub struct DropCounters {
    counters: [prometheus_client::metrics::counter::Counter; Dropped::ALL.len()],
}

impl DropCounters {
    /// Counters built from `make(reason label)`.
    pub fn new(
        mut make: impl FnMut(&'static str) -> prometheus_client::metrics::counter::Counter,
    ) -> Self {
        DropCounters {
            counters: Dropped::ALL.map(|d| make(d.label())),
        }
    }

    pub fn count(&self, why: Dropped) {
        if let Some(c) = self.counters.get(why as usize) {
            c.inc();
        }
    }

    pub fn get(&self, why: Dropped) -> u64 {
        self.counters.get(why as usize).map_or(0, |c| c.get())
    }
}

/// Connection counts per source address and in total, the drop counters, and the limits
/// a reload set. One per worker by default ([`Streams::new`]); share one between workers
/// ([`Streams::with_counter`]) to make the caps process-wide. Locked only on accept,
/// establishment and close, never on the data path.
#[derive(Debug, Default)]
pub struct ConnCounter {
    inner: Mutex<CounterInner>,
    drops: DropCounters,
    /// Limits set by [`ConnCounter::set_limits`] (a reload), with a generation number
    /// that every [`Streams`] compares on its tick.
    reloaded: Mutex<(u64, Option<StreamLimits>)>,
}

#[derive(Debug, Default)]
struct CounterInner {
    per_ip: HashMap<IpAddr, PerSource>,
    total: usize,
}

/// One source address's connections.
#[derive(Debug, Default, Clone, Copy)]
struct PerSource {
    unestablished: usize,
    established: usize,
}

/// How a connection is counted in the [`ConnCounter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counted {
    /// Waiting for its PROXY header (and so for its client address): in the total only.
    Awaiting,
    /// Not yet established, under its source address.
    Unestablished(IpAddr),
    /// Established, under its source address.
    Established(IpAddr),
}

/// The source the per-source caps count a client address under: an IPv4 address (an
/// IPv4-mapped IPv6 one too) as it is, an IPv6 address by its /64, which one host or site
/// holds whole (counted by full address, one IPv6 host could take a new source address
/// per connection and get around every per-source cap).
fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let seg = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(
                    seg[0], seg[1], seg[2], seg[3], 0, 0, 0, 0,
                ))
            }
        },
    }
}

impl Counted {
    /// `self`, or [`Counted::Awaiting`] (which nothing establishes) when `frame` is not
    /// a STUN message (a first byte with its top two bits clear and the magic cookie).
    fn filter_stun(self, frame: &[u8]) -> Counted {
        let stun = frame.len() >= 20
            && frame.first().is_some_and(|&b| b & 0xc0 == 0)
            && frame.get(4..8) == Some(&[0x21, 0x12, 0xa4, 0x42][..]);
        if stun {
            self
        } else {
            Counted::Awaiting
        }
    }
}

impl ConnCounter {
    pub fn new() -> Self {
        Self::default()
    }

    /// A counter that counts drops in `drops` (the metrics' counters).
    pub fn with_drops(drops: DropCounters) -> Self {
        ConnCounter {
            drops,
            ..Self::default()
        }
    }

    /// Connections counted now.
    pub fn total(&self) -> usize {
        self.lock().total
    }

    /// Connections counted drops of each reason.
    pub fn drops(&self) -> &DropCounters {
        &self.drops
    }

    /// New limits for every [`Streams`] sharing this counter (a reload); each takes them
    /// on its next tick. Caps apply to new connections (and establishments), timeouts to
    /// every connection from then on.
    pub fn set_limits(&self, limits: StreamLimits) {
        let mut r = self.reloaded.lock().unwrap_or_else(|p| p.into_inner());
        r.0 += 1;
        r.1 = Some(limits);
    }

    /// The limits set since generation `seen`, if any, and the generation now.
    fn limits_since(&self, seen: u64) -> (u64, Option<StreamLimits>) {
        let r = self.reloaded.lock().unwrap_or_else(|p| p.into_inner());
        if r.0 == seen {
            (seen, None)
        } else {
            (r.0, r.1.clone())
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CounterInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a new, unestablished connection from `ip` if the caps allow it.
    fn open(&self, ip: IpAddr, limits: &StreamLimits) -> Result<Counted, Dropped> {
        let ip = source(ip);
        let mut c = self.lock();
        if c.total >= limits.max_total {
            return Err(Dropped::TotalLimit);
        }
        let n = c.per_ip.entry(ip).or_default();
        if n.unestablished >= limits.max_unestablished_per_source {
            if n.unestablished == 0 && n.established == 0 {
                c.per_ip.remove(&ip);
            }
            return Err(Dropped::UnauthenticatedLimit);
        }
        n.unestablished += 1;
        c.total += 1;
        Ok(Counted::Unestablished(ip))
    }

    /// Counts a new connection whose client address a PROXY header will give, if the
    /// total allows it.
    fn open_awaiting(&self, limits: &StreamLimits) -> Result<Counted, Dropped> {
        let mut c = self.lock();
        if c.total >= limits.max_total {
            return Err(Dropped::TotalLimit);
        }
        c.total += 1;
        Ok(Counted::Awaiting)
    }

    /// Counts an awaiting connection under the client address its header gave, if the
    /// unestablished cap of that address allows it (otherwise nothing changes).
    fn assign(
        &self,
        counted: Counted,
        ip: IpAddr,
        limits: &StreamLimits,
    ) -> Result<Counted, Dropped> {
        if counted != Counted::Awaiting {
            return Ok(counted);
        }
        let ip = source(ip);
        let mut c = self.lock();
        let n = c.per_ip.entry(ip).or_default();
        if n.unestablished >= limits.max_unestablished_per_source {
            if n.unestablished == 0 && n.established == 0 {
                c.per_ip.remove(&ip);
            }
            return Err(Dropped::UnauthenticatedLimit);
        }
        n.unestablished += 1;
        Ok(Counted::Unestablished(ip))
    }

    /// Moves an unestablished connection to the established ones of its address, if
    /// the per-source cap allows it (otherwise nothing changes).
    fn establish(&self, counted: Counted, limits: &StreamLimits) -> Result<Counted, Dropped> {
        let Counted::Unestablished(ip) = counted else {
            return Ok(counted);
        };
        let mut c = self.lock();
        let n = c.per_ip.entry(ip).or_default();
        if n.established >= limits.max_per_source {
            return Err(Dropped::SourceLimit);
        }
        n.unestablished = n.unestablished.saturating_sub(1);
        n.established += 1;
        Ok(Counted::Established(ip))
    }

    fn remove(&self, counted: Counted) {
        let mut c = self.lock();
        c.total = c.total.saturating_sub(1);
        let (ip, established) = match counted {
            Counted::Awaiting => return,
            Counted::Unestablished(ip) => (ip, false),
            Counted::Established(ip) => (ip, true),
        };
        if let Some(n) = c.per_ip.get_mut(&ip) {
            if established {
                n.established = n.established.saturating_sub(1);
            } else {
                n.unestablished = n.unestablished.saturating_sub(1);
            }
            if n.established == 0 && n.unestablished == 0 {
                c.per_ip.remove(&ip);
            }
        }
    }
}

/// The per-frame callback: `(connection 5-tuple, one complete frame, reply)`. Whatever it
/// appends to `reply` is sent back on the same connection, after the frames of the same
/// read (one write for a burst of pipelined requests).
/// Called with each complete frame (or, on a raw connection, each chunk of bytes) and a
/// buffer for the reply; says what comes next (see [`After`]).
pub type OnFrame<'a> = dyn FnMut(FiveTuple, &[u8], &mut Vec<u8>) -> After + 'a;

/// What the frame callback wants done after a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    /// Go on framing.
    Next,
    /// The connection carries raw bytes from now on (an RFC 6062 data connection after
    /// its ConnectionBind): what follows the frame is then handed over unframed.
    Raw,
    /// The frame was not taken: the connection, with this frame and everything after it
    /// still unread, leaves this set ([`Streams::take_handed_over`]) for another worker's
    /// ([`Streams::adopt`]), as an RFC 6062 data connection whose ConnectionBind names an
    /// allocation held elsewhere.
    HandOver,
}

/// Why a connection is closed (logged at debug level).
enum Close {
    PeerClosed,
    Io(io::Error),
    Tls(rustls::Error),
    /// Not STUN/ChannelData, or a frame over `max_frame`.
    BadFrame,
    /// A reply to the client's own request did not fit in the write buffer.
    ReplyOverflow,
    /// A connection cap (see [`Dropped`]).
    Limit(Dropped),
    /// Not a valid PROXY protocol header.
    Proxy(&'static str),
    /// The PROXY header gave the 5-tuple of a connection that exists.
    DuplicateFiveTuple,
}

impl std::fmt::Display for Close {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Close::PeerClosed => f.write_str("closed by the client"),
            Close::Io(e) => write!(f, "socket error: {e}"),
            Close::Tls(e) => write!(f, "TLS: {e}"),
            Close::BadFrame => f.write_str("not STUN/ChannelData, or frame too long"),
            Close::ReplyOverflow => f.write_str("replies not read (write buffer full)"),
            Close::Limit(d) => f.write_str(d.describe()),
            Close::Proxy(why) => write!(f, "PROXY protocol: {why}"),
            Close::DuplicateFiveTuple => {
                f.write_str("PROXY header gave the addresses of an open connection")
            }
        }
    }
}

struct Conn {
    socket: TcpStream,
    ft: FiveTuple,
    token: u64,
    tls: Option<Box<ServerConnection>>,
    /// Received plaintext not yet framed (an incomplete frame).
    rbuf: Vec<u8>,
    /// Bytes (ciphertext for TLS) waiting for the socket; `wbuf[wpos..]` is unsent.
    wbuf: Vec<u8>,
    wpos: usize,
    /// Since when an incomplete frame or an unfinished TLS handshake has been waiting.
    partial_since: Option<Instant>,
    /// Last complete frame (or accept / handshake completion).
    last_frame: Instant,
    /// EPOLLOUT is in the registered interest.
    out_interest: bool,
    /// A write failed: closed on the next event or tick.
    broken: bool,
    /// An RFC 6062 data connection: bytes pass through unframed, no timers.
    raw: bool,
    /// The frame callback asked for a hand-over: read nothing more here.
    handover: bool,
    /// When it was accepted: until it is established it must be within the short
    /// deadline of this, whatever it sends.
    accepted: Instant,
    /// How the connection is counted (established or not, under which address).
    counted: Counted,
    /// On a `proxy_protocol` listener, until its header is complete: what has come of it.
    proxy_header: Option<Vec<u8>>,
    /// Bytes that came after the PROXY header in its last read, taken before the socket's.
    early: Vec<u8>,
}

/// A stream connection on its way from one worker's [`Streams`] to another's, whole:
/// socket, 5-tuple, TLS state, unread bytes, unsent bytes and timers. It stays counted
/// in the shared [`ConnCounter`] meanwhile.
pub struct HandedOver(Box<Conn>);

impl HandedOver {
    /// The connection's 5-tuple.
    pub fn five_tuple(&self) -> FiveTuple {
        self.0.ft
    }

    /// The bytes it had read but not framed yet; the first is the frame it was handed
    /// over on.
    pub fn unread(&self) -> &[u8] {
        &self.0.rbuf
    }
}

impl std::fmt::Debug for HandedOver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandedOver")
            .field("ft", &self.0.ft)
            .finish_non_exhaustive()
    }
}

impl Conn {
    fn pending(&self) -> usize {
        self.wbuf.len().saturating_sub(self.wpos)
    }

    /// Write-buffer bytes `len` plaintext bytes will take.
    fn wire_len(&self, len: usize) -> usize {
        if self.tls.is_some() {
            len + (len / TLS_RECORD_PAYLOAD + 1) * TLS_RECORD_OVERHEAD
        } else {
            len
        }
    }

    /// Writes what is queued, as far as the socket takes it.
    fn flush(&mut self) -> io::Result<()> {
        while self.wpos < self.wbuf.len() {
            let Some(rest) = self.wbuf.get(self.wpos..) else {
                break;
            };
            match self.socket.write(rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if self.wpos >= self.wbuf.len() {
            self.wpos = 0;
            if self.wbuf.capacity() > KEEP_CAPACITY {
                self.wbuf = Vec::new();
            } else {
                self.wbuf.clear();
            }
        } else if self.wpos > self.wbuf.len() / 2 {
            self.wbuf.drain(..self.wpos);
            self.wpos = 0;
        }
        Ok(())
    }

    /// Moves whatever rustls has to send (handshake, alerts, records) into `wbuf`.
    fn drain_tls(&mut self) -> io::Result<()> {
        if let Some(tls) = self.tls.as_mut() {
            while tls.wants_write() {
                tls.write_tls(&mut self.wbuf)?;
            }
        }
        Ok(())
    }

    /// Sends `bytes` (plaintext) whole: written now as far as the socket takes it, the rest
    /// queued. The caller has checked the write-buffer limit.
    fn push(&mut self, bytes: &[u8]) -> io::Result<()> {
        if let Some(tls) = self.tls.as_mut() {
            tls.writer().write_all(bytes)?;
            self.drain_tls()?;
            return self.flush();
        }
        if self.pending() == 0 {
            let n = match self.socket.write(bytes) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    0
                }
                Err(e) => return Err(e),
            };
            if let Some(rest) = bytes.get(n..) {
                self.wbuf.extend_from_slice(rest);
            }
            Ok(())
        } else {
            self.wbuf.extend_from_slice(bytes);
            self.flush()
        }
    }

    /// Registers EPOLLOUT only while something is waiting to be written.
    fn update_interest(&mut self, epoll: &Epoll) {
        let want = self.pending() > 0;
        if want == self.out_interest {
            return;
        }
        let flags = if want {
            EpollFlags::EPOLLIN | EpollFlags::EPOLLOUT
        } else {
            EpollFlags::EPOLLIN
        };
        let mut ev = EpollEvent::new(flags, self.token);
        match epoll.modify(&self.socket, &mut ev) {
            Ok(()) => self.out_interest = want,
            Err(_) => self.broken = true,
        }
    }

    /// Queues the replies collected in `reply` (closing on overflow) and clears it.
    fn send_replies(&mut self, reply: &mut Vec<u8>, limits: &StreamLimits) -> Result<(), Close> {
        if reply.is_empty() {
            return Ok(());
        }
        let need = self.pending() + self.wire_len(reply.len());
        let r = if need > limits.max_write_buffer {
            Err(Close::ReplyOverflow)
        } else {
            self.push(reply).map_err(Close::Io)
        };
        reply.clear();
        r
    }

    /// Frames `data` (received plaintext) after what `rbuf` holds, calling `on_frame` for
    /// each complete frame; keeps the incomplete tail in `rbuf`. Updates the timers.
    fn ingest(
        &mut self,
        data: &[u8],
        limits: &StreamLimits,
        now: Instant,
        reply: &mut Vec<u8>,
        on_frame: &mut OnFrame<'_>,
    ) -> Result<(), Close> {
        if data.is_empty() {
            return Ok(());
        }
        if self.raw {
            on_frame(self.ft, data, reply);
            self.last_frame = now;
            return Ok(());
        }
        if self.handover {
            // Read after a hand-over was asked for (TLS plaintext): keep it for the
            // worker that adopts the connection.
            self.rbuf.extend_from_slice(data);
            return Ok(());
        }
        let result = if self.rbuf.is_empty() {
            let r = split_frames(self.ft, data, limits.max_frame, reply, on_frame);
            if let Ok((used, _)) = r {
                if let Some(rest) = data.get(used..) {
                    self.rbuf.extend_from_slice(rest);
                }
            }
            r
        } else {
            self.rbuf.extend_from_slice(data);
            let buf = std::mem::take(&mut self.rbuf);
            let r = split_frames(self.ft, &buf, limits.max_frame, reply, on_frame);
            self.rbuf = buf;
            if let Ok((used, _)) = r {
                self.rbuf.drain(..used.min(self.rbuf.len()));
                if self.rbuf.is_empty() && self.rbuf.capacity() > KEEP_CAPACITY {
                    self.rbuf = Vec::new();
                }
            }
            r
        };
        let (used, after) = result?;
        if after == After::HandOver {
            self.handover = true;
            return Ok(());
        }
        if after == After::Raw {
            // What followed the ConnectionBind is already application data.
            self.raw = true;
            self.partial_since = None;
            self.last_frame = now;
            let rest = std::mem::take(&mut self.rbuf);
            if !rest.is_empty() {
                on_frame(self.ft, &rest, reply);
            }
            return Ok(());
        }
        if used > 0 {
            self.last_frame = now;
            self.partial_since = if self.rbuf.is_empty() {
                None
            } else {
                Some(now)
            };
        } else {
            self.partial_since.get_or_insert(now);
        }
        Ok(())
    }

    /// Reads a plain TCP connection.
    fn read_tcp(
        &mut self,
        scratch: &mut [u8],
        limits: &StreamLimits,
        now: Instant,
        reply: &mut Vec<u8>,
        on_frame: &mut OnFrame<'_>,
    ) -> Result<(), Close> {
        if !self.early.is_empty() {
            let early = std::mem::take(&mut self.early);
            let framed = self.ingest(&early, limits, now, reply, on_frame);
            self.send_replies(reply, limits)?;
            framed?;
        }
        for _ in 0..READS_PER_EVENT {
            let n = match self.socket.read(scratch) {
                Ok(0) => return Err(Close::PeerClosed),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Close::Io(e)),
            };
            let data = scratch.get(..n).unwrap_or_default();
            let framed = self.ingest(data, limits, now, reply, on_frame);
            // Answer what was complete even when the stream then turned bad.
            self.send_replies(reply, limits)?;
            framed?;
            if n < scratch.len() || self.handover {
                break;
            }
        }
        Ok(())
    }

    /// Reads a TLS connection: ciphertext in, handshake out, plaintext framed.
    fn read_tls(
        &mut self,
        scratch: &mut [u8],
        limits: &StreamLimits,
        now: Instant,
        reply: &mut Vec<u8>,
        on_frame: &mut OnFrame<'_>,
    ) -> Result<(), Close> {
        let mut reads = 0;
        loop {
            // Ciphertext that came after a PROXY header first, then the socket's.
            let from_early = !self.early.is_empty();
            if !from_early {
                if reads >= READS_PER_EVENT {
                    break;
                }
                reads += 1;
            }
            let Some(tls) = self.tls.as_mut() else {
                return Err(Close::PeerClosed);
            };
            let was_handshaking = tls.is_handshaking();
            let read = if from_early {
                let mut rest: &[u8] = &self.early;
                let r = tls.read_tls(&mut rest);
                let used = self.early.len() - rest.len();
                self.early.drain(..used);
                match r {
                    // rustls took nothing (its buffer is full): not a TLS client.
                    Ok(0) => return Err(Close::BadFrame),
                    r => r,
                }
            } else {
                tls.read_tls(&mut self.socket)
            };
            let Some(tls) = self.tls.as_mut() else {
                return Err(Close::PeerClosed);
            };
            let (n, eof) = match read {
                Ok(0) => (0, true),
                Ok(n) => (n, false),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Close::Io(e)),
            };
            if let Err(e) = tls.process_new_packets() {
                // rustls queued an alert: send it if the socket takes it now.
                let _ = self.drain_tls().and_then(|()| self.flush());
                return Err(Close::Tls(e));
            }
            let mut got_plaintext = false;
            let mut closed = eof;
            while let Some(tls) = self.tls.as_mut() {
                match tls.reader().read(scratch) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(m) => {
                        got_plaintext = true;
                        let data = scratch.get(..m).unwrap_or_default();
                        let framed = self.ingest(data, limits, now, reply, on_frame);
                        if framed.is_err() {
                            let _ = self.send_replies(reply, limits);
                            return framed;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        // UnexpectedEof: TCP closed without close_notify.
                        closed = true;
                        break;
                    }
                }
            }
            self.send_replies(reply, limits)?;
            self.drain_tls().map_err(Close::Io)?;
            self.flush().map_err(Close::Io)?;
            let handshaking = self.tls.as_ref().is_some_and(|t| t.is_handshaking());
            if was_handshaking && !handshaking {
                self.last_frame = now;
                if self.rbuf.is_empty() {
                    self.partial_since = None;
                }
            } else if !handshaking && !got_plaintext && n > 0 {
                // A TLS record arriving in pieces counts as an incomplete message.
                self.partial_since.get_or_insert(now);
            }
            if closed {
                return Err(Close::PeerClosed);
            }
            if self.handover {
                break;
            }
        }
        Ok(())
    }

    /// Frames what an adopted connection brought along: the bytes it had read but not
    /// framed and (TLS) the plaintext rustls still holds. New bytes on the socket come
    /// as the usual readiness events.
    fn resume(
        &mut self,
        scratch: &mut [u8],
        limits: &StreamLimits,
        now: Instant,
        reply: &mut Vec<u8>,
        on_frame: &mut OnFrame<'_>,
    ) -> Result<(), Close> {
        let carried = std::mem::take(&mut self.rbuf);
        let framed = self.ingest(&carried, limits, now, reply, on_frame);
        self.send_replies(reply, limits)?;
        framed?;
        while !self.handover {
            let Some(tls) = self.tls.as_mut() else {
                break;
            };
            match tls.reader().read(scratch) {
                Ok(0) => return Err(Close::PeerClosed),
                Ok(m) => {
                    let data = scratch.get(..m).unwrap_or_default();
                    let framed = self.ingest(data, limits, now, reply, on_frame);
                    self.send_replies(reply, limits)?;
                    framed?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return Err(Close::PeerClosed),
            }
        }
        self.drain_tls().map_err(Close::Io)?;
        self.flush().map_err(Close::Io)
    }

    /// Reads what has come of a PROXY header. `Ok(Some(addresses))` once it is complete
    /// (what followed it is kept in `early`), `Ok(None)` while it is not.
    fn read_proxy_header(
        &mut self,
        scratch: &mut [u8],
    ) -> Result<Option<Option<ProxyAddresses>>, Close> {
        for _ in 0..READS_PER_EVENT {
            let Some(buf) = self.proxy_header.as_mut() else {
                return Ok(Some(None));
            };
            // Never more than a header can be, so a flood of bytes costs nothing.
            let room = crate::proto::proxy::MAX_HEADER
                .saturating_sub(buf.len())
                .clamp(1, scratch.len());
            let Some(into) = scratch.get_mut(..room) else {
                return Err(Close::Proxy("no room"));
            };
            let n = match self.socket.read(into) {
                Ok(0) => return Err(Close::PeerClosed),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Close::Io(e)),
            };
            buf.extend_from_slice(into.get(..n).unwrap_or_default());
            match parse_proxy_header(buf) {
                ProxyHeader::Incomplete => {}
                ProxyHeader::Invalid(why) => return Err(Close::Proxy(why)),
                ProxyHeader::Done {
                    header_len,
                    addresses,
                } => {
                    self.early = buf.get(header_len..).unwrap_or_default().to_vec();
                    self.proxy_header = None;
                    return Ok(Some(addresses));
                }
            }
        }
        Ok(None)
    }

    /// Has a TLS connection become established (its handshake finished)? A TCP
    /// connection is established by its first STUN message, in the frame gate of
    /// [`Streams::on_event`].
    fn is_established_now(&self) -> bool {
        self.tls.as_ref().is_some_and(|tls| !tls.is_handshaking())
    }

    /// Before a close we decide on: TLS close_notify, best effort.
    fn goodbye(&mut self) {
        if let Some(tls) = self.tls.as_mut() {
            tls.send_close_notify();
            let _ = self.drain_tls().and_then(|()| self.flush());
        }
    }
}

/// Calls `on_frame` for each complete frame at the front of `buf`; returns how many bytes
/// they took. `Err(BadFrame)` when the stream is not STUN/ChannelData or a frame is too long.
fn split_frames(
    ft: FiveTuple,
    buf: &[u8],
    max_frame: usize,
    reply: &mut Vec<u8>,
    on_frame: &mut OnFrame<'_>,
) -> Result<(usize, After), Close> {
    let mut off = 0;
    loop {
        let rest = buf.get(off..).unwrap_or_default();
        let n = match next_frame(rest, max_frame) {
            Frame::NeedMore => return Ok((off, After::Next)),
            Frame::Stun(n) | Frame::ChannelData { total: n } => n,
            Frame::Invalid => return Err(Close::BadFrame),
        };
        let Some(frame) = rest.get(..n).filter(|f| !f.is_empty()) else {
            return Err(Close::BadFrame);
        };
        match on_frame(ft, frame, reply) {
            After::Next => off += n,
            After::Raw => return Ok((off + n, After::Raw)),
            // Not taken: the frame stays unread.
            After::HandOver => return Ok((off, After::HandOver)),
        }
    }
}

/// All stream connections of one worker. Connection `slot` is registered with epoll under
/// token `tag + token_base + slot` (`tag` is 0 unless [`Streams::move_to`] set one); the
/// tokens given to [`Streams::owns`] and [`Streams::on_event`] are without the tag.
pub struct Streams {
    limits: StreamLimits,
    token_base: u64,
    tag: u64,
    /// Connections that left for another worker, until taken.
    handed: Vec<HandedOver>,
    slots: Vec<Option<Conn>>,
    free: Vec<usize>,
    by_five_tuple: HashMap<FiveTuple, usize>,
    counter: Arc<ConnCounter>,
    scratch: Box<[u8]>,
    reply: Vec<u8>,
    live: usize,
    /// The generation of the counter's reloaded limits last taken.
    limits_seen: u64,
    /// Handshaking TLS connections read from in this pass ([`HANDSHAKES_PER_PASS`]).
    handshakes: u32,
    /// Reads of handshaking connections left for a later pass, in all.
    deferred: u64,
}

impl Streams {
    /// Connections of one worker, with caps counted for this worker alone.
    pub fn new(limits: StreamLimits, token_base: u64) -> Self {
        Self::with_counter(limits, token_base, Arc::new(ConnCounter::new()))
    }

    /// The limits in force.
    pub fn limits(&self) -> &StreamLimits {
        &self.limits
    }

    /// A new pass of the worker's loop begins: [`HANDSHAKES_PER_PASS`] handshaking
    /// connections may be read from again.
    pub fn new_pass(&mut self) {
        self.handshakes = 0;
    }

    /// How many times a handshaking connection's readiness was left for a later pass.
    pub fn handshakes_deferred(&self) -> u64 {
        self.deferred
    }

    /// Connections of one worker, with caps counted in `counter` (share one between
    /// workers for process-wide per-address and total caps).
    pub fn with_counter(limits: StreamLimits, token_base: u64, counter: Arc<ConnCounter>) -> Self {
        // Limits a reload set before this worker started win over `limits`.
        let (limits_seen, reloaded) = counter.limits_since(0);
        let limits = reloaded.unwrap_or(limits);
        Streams {
            limits_seen,
            handshakes: 0,
            deferred: 0,
            limits,
            token_base,
            tag: 0,
            handed: Vec::new(),
            slots: Vec::new(),
            free: Vec::new(),
            by_five_tuple: HashMap::new(),
            counter,
            scratch: vec![0u8; SCRATCH_LEN].into_boxed_slice(),
            reply: Vec::new(),
            live: 0,
        }
    }

    /// Is `token` one of this set's connection tokens?
    pub fn owns(&self, token: u64) -> bool {
        token
            .checked_sub(self.token_base)
            .is_some_and(|s| s < self.slots.len() as u64)
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Is there an open connection with this 5-tuple?
    pub fn contains(&self, ft: &FiveTuple) -> bool {
        self.by_five_tuple.contains_key(ft)
    }

    /// Accepts what is pending on `listener` (non-blocking; at most [`ACCEPT_BATCH`] per
    /// call), closes at once what exceeds the caps, and registers the rest with `epoll`
    /// (EPOLLIN) under their tokens. `transport` is `Tcp` or `Tls`; `Tls` needs `tls`.
    /// Returns how many connections were taken on.
    pub fn accept(
        &mut self,
        listener: &TcpListener,
        transport: Transport,
        tls: Option<&Arc<rustls::ServerConfig>>,
        epoll: &Epoll,
        now: Instant,
    ) -> usize {
        let mut taken = 0;
        // A PROXY protocol listener: which entry of `limits.proxy` (looked up by the
        // listener's own address).
        let proxy = if self.limits.proxy.is_empty() {
            None
        } else {
            listener
                .local_addr()
                .ok()
                .and_then(|a| self.limits.proxy.iter().position(|(l, _)| *l == a))
        };
        for _ in 0..ACCEPT_BATCH {
            let (socket, peer) = match listener.accept() {
                Ok(a) => a,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE/ENFILE and the like: try again on the next event.
                    tracing::warn!(error = %e, "accept failed");
                    break;
                }
            };
            let opened = match proxy.and_then(|i| self.limits.proxy.get(i)) {
                Some((_, from)) => {
                    let ip = peer.ip().to_canonical();
                    if !from.iter().any(|n| n.contains(&ip)) {
                        self.counter.drops.count(Dropped::ProxyUntrusted);
                        tracing::debug!(client = %peer, reason = Dropped::ProxyUntrusted.describe(), "stream connection refused");
                        reject(socket);
                        continue;
                    }
                    self.counter.open_awaiting(&self.limits)
                }
                None => self.counter.open(peer.ip(), &self.limits),
            };
            let counted = match opened {
                Ok(c) => c,
                Err(why) => {
                    self.counter.drops.count(why);
                    tracing::debug!(client = %peer, reason = why.describe(), "stream connection refused");
                    reject(socket);
                    continue;
                }
            };
            match self.register(
                socket,
                peer,
                transport,
                tls,
                epoll,
                now,
                counted,
                proxy.is_some(),
            ) {
                Ok(()) => taken += 1,
                Err(e) => {
                    self.counter.remove(counted);
                    tracing::debug!(client = %peer, error = %e, "stream connection dropped");
                }
            }
        }
        taken
    }

    #[allow(clippy::too_many_arguments)]
    fn register(
        &mut self,
        socket: TcpStream,
        peer: SocketAddr,
        transport: Transport,
        tls: Option<&Arc<rustls::ServerConfig>>,
        epoll: &Epoll,
        now: Instant,
        counted: Counted,
        proxy_header: bool,
    ) -> io::Result<()> {
        socket.set_nonblocking(true)?;
        socket.set_nodelay(true)?;
        let local = socket.local_addr()?;
        let tls = match transport {
            Transport::Tls => {
                let Some(cfg) = tls else {
                    return Err(io::Error::other("tls listener without a TLS configuration"));
                };
                let mut conn = ServerConnection::new(cfg.clone()).map_err(io::Error::other)?;
                // Our own write buffer does the accounting.
                conn.set_buffer_limit(None);
                Some(Box::new(conn))
            }
            Transport::Tcp => None,
            Transport::Udp => return Err(io::Error::other("not a stream transport")),
        };
        let ft = FiveTuple {
            transport,
            client: peer,
            server: local,
        };
        if self.by_five_tuple.contains_key(&ft) {
            return Err(io::Error::other("duplicate 5-tuple"));
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let token = self.tag + self.token_base + slot as u64;
        if let Err(e) = epoll.add(&socket, EpollEvent::new(EpollFlags::EPOLLIN, token)) {
            self.free.push(slot);
            return Err(e.into());
        }
        // The short deadline runs from the accept until the connection is established
        // (TCP: a complete first frame; TLS: the handshake), so a silent connection is
        // closed after it rather than the idle timeout.
        let partial_since = Some(now);
        if let Some(s) = self.slots.get_mut(slot) {
            *s = Some(Conn {
                socket,
                ft,
                token,
                tls,
                rbuf: Vec::new(),
                wbuf: Vec::new(),
                wpos: 0,
                partial_since,
                last_frame: now,
                out_interest: false,
                broken: false,
                raw: false,
                handover: false,
                accepted: now,
                counted,
                proxy_header: proxy_header.then(Vec::new),
                early: Vec::new(),
            });
        }
        self.by_five_tuple.insert(ft, slot);
        self.live += 1;
        Ok(())
    }

    /// Handles an epoll event on connection `token`: flushes on EPOLLOUT; on EPOLLIN (or
    /// HUP/ERR) reads a bounded amount, decrypts (TLS), splits complete frames and calls
    /// `on_frame(five_tuple, frame, reply)` for each, then sends what the callback appended
    /// to `reply`. Returns the connection's 5-tuple if it was closed (peer closed, error,
    /// bad frame, TLS failure, reply overflow): only this one connection can close here.
    pub fn on_event(
        &mut self,
        token: u64,
        flags: EpollFlags,
        epoll: &Epoll,
        now: Instant,
        on_frame: &mut OnFrame<'_>,
    ) -> Option<FiveTuple> {
        let slot = usize::try_from(token.checked_sub(self.token_base)?).ok()?;
        let readable =
            flags.intersects(EpollFlags::EPOLLIN | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR);
        if readable && self.slots.get(slot)?.as_ref()?.proxy_header.is_some() {
            match self.proxy_header(slot) {
                Ok(true) => {}
                Ok(false) => return None,
                Err(why) => {
                    let conn = self.slots.get(slot)?.as_ref()?;
                    tracing::debug!(client = %conn.ft.client, transport = conn.ft.transport.as_str(), reason = %why, "stream connection closed");
                    return self.close_slot(slot, epoll);
                }
            }
        }
        let conn = self.slots.get_mut(slot)?.as_mut()?;
        if readable && conn.tls.as_ref().is_some_and(|t| t.is_handshaking()) {
            if self.handshakes >= HANDSHAKES_PER_PASS {
                self.deferred += 1;
                return None;
            }
            self.handshakes += 1;
        }
        let mut result = Ok(());
        if flags.contains(EpollFlags::EPOLLOUT) && conn.pending() > 0 {
            result = conn.flush().map_err(Close::Io);
        }
        if result.is_ok()
            && flags.intersects(EpollFlags::EPOLLIN | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR)
        {
            self.reply.clear();
            // The first complete frame establishes the connection (if the handshake has
            // not): checked against the per-source cap before the core sees the frame,
            // so a connection over it never reaches the core.
            let counted = Cell::new(conn.counted);
            let refused = Cell::new(None);
            let (counter, limits) = (&self.counter, &self.limits);
            // A connection handed over on a frame is established here first: it moves
            // counted as such.
            let mut gate = |ft: FiveTuple, frame: &[u8], reply: &mut Vec<u8>| -> After {
                if refused.get().is_some() {
                    return After::Next;
                }
                // Only a STUN message establishes a connection: ChannelData or zeros
                // (which the core ignores before an allocation) do not lift the short
                // deadline or move it under the larger cap.
                if let c @ Counted::Unestablished(_) = counted.get().filter_stun(frame) {
                    match counter.establish(c, limits) {
                        Ok(c) => counted.set(c),
                        Err(why) => {
                            refused.set(Some(why));
                            return After::Next;
                        }
                    }
                }
                on_frame(ft, frame, reply)
            };
            result = if conn.tls.is_some() {
                conn.read_tls(&mut self.scratch, limits, now, &mut self.reply, &mut gate)
            } else {
                conn.read_tcp(&mut self.scratch, limits, now, &mut self.reply, &mut gate)
            };
            conn.counted = counted.get();
            if let Some(why) = refused.get() {
                self.counter.drops.count(why);
                result = Err(Close::Limit(why));
            }
            if self.reply.capacity() > self.limits.max_write_buffer {
                self.reply = Vec::new();
            }
        }
        if result.is_ok() && conn.handover && !conn.broken {
            self.detach(slot, epoll);
            return None;
        }
        // A TLS handshake that finished establishes the connection too.
        if result.is_ok()
            && matches!(conn.counted, Counted::Unestablished(_))
            && conn.is_established_now()
        {
            match self.counter.establish(conn.counted, &self.limits) {
                Ok(c) => conn.counted = c,
                Err(why) => {
                    self.counter.drops.count(why);
                    result = Err(Close::Limit(why));
                }
            }
        }
        match result {
            Ok(()) if !conn.broken => {
                conn.update_interest(epoll);
                if !conn.broken {
                    return None;
                }
                tracing::debug!(client = %conn.ft.client, "stream connection closed: epoll");
            }
            Ok(()) => {
                tracing::debug!(client = %conn.ft.client, "stream connection closed: write failed")
            }
            Err(why) => {
                if matches!(why, Close::BadFrame | Close::ReplyOverflow) {
                    conn.goodbye();
                }
                tracing::debug!(client = %conn.ft.client, transport = conn.ft.transport.as_str(), reason = %why, "stream connection closed");
            }
        }
        self.close_slot(slot, epoll)
    }

    /// Reads the PROXY header of connection `slot`: `Ok(true)` once it is complete (the
    /// connection then has its client's address, and is counted under it), `Ok(false)`
    /// while it is not.
    fn proxy_header(&mut self, slot: usize) -> Result<bool, Close> {
        let Some(Some(conn)) = self.slots.get_mut(slot) else {
            return Err(Close::PeerClosed);
        };
        let addresses = match conn.read_proxy_header(&mut self.scratch) {
            Ok(None) => return Ok(false),
            Ok(Some(a)) => a,
            Err(e) => {
                if matches!(e, Close::Proxy(_)) {
                    self.counter.drops.count(Dropped::ProxyInvalid);
                }
                return Err(e);
            }
        };
        let via = conn.ft.client;
        // LOCAL (a health check), UNKNOWN and non-TCP families keep the connection's own.
        let client = addresses.map_or(via, |a| {
            SocketAddr::new(a.source.ip().to_canonical(), a.source.port())
        });
        if let Err(why) = self
            .counter
            .assign(conn.counted, client.ip(), &self.limits)
            .map(|c| conn.counted = c)
        {
            self.counter.drops.count(why);
            return Err(Close::Limit(why));
        }
        let ft = FiveTuple { client, ..conn.ft };
        if ft != conn.ft {
            if self.by_five_tuple.contains_key(&ft) {
                return Err(Close::DuplicateFiveTuple);
            }
            self.by_five_tuple.remove(&conn.ft);
            self.by_five_tuple.insert(ft, slot);
            conn.ft = ft;
        }
        tracing::debug!(client = %client, via = %via, transport = ft.transport.as_str(), "PROXY protocol header");
        Ok(true)
    }

    /// Sends `bytes` (a whole frame: a response, or peer data the core framed and padded)
    /// to the client on connection `ft`. Returns false, sending nothing, if there is no such
    /// connection or its write buffer has no room for the whole frame (dropped: UDP-like
    /// loss under backpressure, the connection stays).
    pub fn send(&mut self, ft: &FiveTuple, bytes: &[u8], epoll: &Epoll) -> bool {
        let Some(&slot) = self.by_five_tuple.get(ft) else {
            return false;
        };
        let Some(Some(conn)) = self.slots.get_mut(slot) else {
            return false;
        };
        if conn.broken {
            return false;
        }
        if conn.pending() + conn.wire_len(bytes.len()) > self.limits.max_write_buffer {
            return false;
        }
        if conn.push(bytes).is_err() {
            // Closed on its next event (EPOLLHUP/EPOLLERR) or tick.
            conn.broken = true;
            return false;
        }
        conn.update_interest(epoll);
        true
    }

    /// Closes connection `ft` (for example when the core decides so). Returns whether it
    /// existed. Not reported again by `on_event`/`tick`.
    pub fn close(&mut self, ft: &FiveTuple, epoll: &Epoll) -> bool {
        let Some(&slot) = self.by_five_tuple.get(ft) else {
            return false;
        };
        if let Some(Some(conn)) = self.slots.get_mut(slot) {
            conn.goodbye();
        }
        self.close_slot(slot, epoll).is_some()
    }

    /// Call about once a second: closes connections whose incomplete frame or TLS
    /// handshake is older than the deadline, that have been idle too long, or whose writes
    /// failed. Returns their 5-tuples.
    pub fn tick(&mut self, now: Instant, epoll: &Epoll) -> Vec<FiveTuple> {
        let (seen, reloaded) = self.counter.limits_since(self.limits_seen);
        self.limits_seen = seen;
        if let Some(l) = reloaded {
            self.limits = l;
        }
        let mut closed = Vec::new();
        for slot in 0..self.slots.len() {
            let Some(Some(conn)) = self.slots.get_mut(slot) else {
                continue;
            };
            let deadline = self.limits.handshake_and_partial_deadline;
            let unestablished = !matches!(conn.counted, Counted::Established(_));
            let slow = !conn.raw
                && (conn
                    .partial_since
                    .is_some_and(|t| now.saturating_duration_since(t) >= deadline)
                    || (unestablished && now.saturating_duration_since(conn.accepted) >= deadline));
            // Data connections live as long as their allocation and peer connection.
            let idle = !conn.raw
                && now.saturating_duration_since(conn.last_frame) >= self.limits.idle_timeout;
            if !(slow || idle || conn.broken) {
                continue;
            }
            let reason = if conn.broken {
                "write failed"
            } else if slow && conn.proxy_header.is_some() {
                "PROXY header deadline"
            } else if slow && conn.tls.as_ref().is_some_and(|t| t.is_handshaking()) {
                "TLS handshake deadline"
            } else if slow && unestablished {
                "first message deadline"
            } else if slow {
                "incomplete message deadline"
            } else {
                "idle timeout"
            };
            if slow && !conn.broken {
                if conn.proxy_header.is_some() {
                    self.counter.drops.count(Dropped::ProxyTimeout);
                } else if unestablished {
                    self.counter.drops.count(Dropped::HandshakeTimeout);
                }
            }
            tracing::debug!(client = %conn.ft.client, transport = conn.ft.transport.as_str(), reason, "stream connection closed");
            if !conn.broken {
                conn.goodbye();
            }
            if let Some(ft) = self.close_slot(slot, epoll) {
                closed.push(ft);
            }
        }
        closed
    }

    /// Takes connection `slot` out of this set (and `epoll`) for another worker; it stays
    /// counted in the shared counter.
    fn detach(&mut self, slot: usize, epoll: &Epoll) {
        let Some(mut conn) = self.slots.get_mut(slot).and_then(Option::take) else {
            return;
        };
        let _ = epoll.delete(&conn.socket);
        self.by_five_tuple.remove(&conn.ft);
        self.free.push(slot);
        self.live = self.live.saturating_sub(1);
        conn.handover = false;
        conn.out_interest = false;
        self.handed.push(HandedOver(Box::new(conn)));
    }

    /// The connections the frame callback handed over (see [`After::HandOver`]) since the
    /// last call; pass each to the owning worker's [`Streams::adopt`]. A connection
    /// dropped instead must be given back with [`Streams::drop_handed_over`].
    pub fn take_handed_over(&mut self) -> Vec<HandedOver> {
        std::mem::take(&mut self.handed)
    }

    /// Closes a handed-over connection that no worker adopts (uncounts it).
    pub fn drop_handed_over(&self, h: HandedOver) {
        self.counter.remove(h.0.counted);
    }

    /// Takes on a connection another worker handed over: registers it with `epoll` and
    /// frames what it brought along (the frame it was handed over on first) through
    /// `on_frame`, as [`Streams::on_event`] would. Returns its 5-tuple if it was closed
    /// meanwhile (or could not be registered). Both sets must share one [`ConnCounter`].
    pub fn adopt(
        &mut self,
        handed: HandedOver,
        epoll: &Epoll,
        now: Instant,
        on_frame: &mut OnFrame<'_>,
    ) -> Option<FiveTuple> {
        let mut conn = handed.0;
        let ft = conn.ft;
        if self.by_five_tuple.contains_key(&ft) {
            // The 5-tuple is a live connection's here (two load-balanced connections
            // given one client address): close the newcomer alone, leaving that
            // connection and its allocation alone.
            self.counter.remove(conn.counted);
            return None;
        }
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        conn.token = self.tag + self.token_base + slot as u64;
        if epoll
            .add(
                &conn.socket,
                EpollEvent::new(EpollFlags::EPOLLIN, conn.token),
            )
            .is_err()
        {
            self.free.push(slot);
            self.counter.remove(conn.counted);
            return Some(ft);
        }
        if let Some(s) = self.slots.get_mut(slot) {
            *s = Some(*conn);
        }
        self.by_five_tuple.insert(ft, slot);
        self.live += 1;
        let Some(Some(conn)) = self.slots.get_mut(slot) else {
            return None;
        };
        self.reply.clear();
        let result = conn.resume(
            &mut self.scratch,
            &self.limits,
            now,
            &mut self.reply,
            on_frame,
        );
        if result.is_ok() && conn.handover && !conn.broken {
            self.detach(slot, epoll);
            return None;
        }
        match result {
            Ok(()) if !conn.broken => {
                conn.update_interest(epoll);
                if !conn.broken {
                    return None;
                }
            }
            Ok(()) => {}
            Err(why) => {
                if matches!(why, Close::BadFrame | Close::ReplyOverflow) {
                    conn.goodbye();
                }
                tracing::debug!(client = %conn.ft.client, transport = conn.ft.transport.as_str(), reason = %why, "stream connection closed");
            }
        }
        self.close_slot(slot, epoll)
    }

    /// Moves every connection from `from` to `to` under token tag `tag` (a worker's
    /// shard moving between threads), keeping each one's interest.
    pub fn move_to(&mut self, from: &Epoll, to: &Epoll, tag: u64) {
        self.tag = tag;
        for (slot, conn) in self.slots.iter_mut().enumerate() {
            let Some(conn) = conn else {
                continue;
            };
            let _ = from.delete(&conn.socket);
            conn.token = tag + self.token_base + slot as u64;
            let flags = if conn.out_interest {
                EpollFlags::EPOLLIN | EpollFlags::EPOLLOUT
            } else {
                EpollFlags::EPOLLIN
            };
            if let Err(e) = to.add(&conn.socket, EpollEvent::new(flags, conn.token)) {
                tracing::error!(error = %e, client = %conn.ft.client, "cannot move a stream connection between epoll sets");
                // Closed on the next tick.
                conn.broken = true;
            }
        }
    }

    fn close_slot(&mut self, slot: usize, epoll: &Epoll) -> Option<FiveTuple> {
        let conn = self.slots.get_mut(slot)?.take()?;
        let _ = epoll.delete(&conn.socket);
        self.by_five_tuple.remove(&conn.ft);
        self.counter.remove(conn.counted);
        self.free.push(slot);
        self.live = self.live.saturating_sub(1);
        Some(conn.ft)
    }
}

/// Closes a refused connection with a reset, so it leaves no TIME_WAIT behind.
fn reject(socket: TcpStream) {
    let _ = socket2::SockRef::from(&socket).set_linger(Some(Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::epoll::{EpollCreateFlags, EpollTimeout};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::thread::JoinHandle;

    const LISTENER: u64 = 1;
    const BASE: u64 = 1000;
    const IO_TIMEOUT: Duration = Duration::from_secs(5);

    /// A worker-like epoll loop on its own thread: one listener, an echo `on_frame`, a
    /// tick every 50 ms, `send` requests through a channel. Stops on drop (or after 30 s).
    struct Harness {
        addr: SocketAddr,
        stop: Arc<AtomicBool>,
        closed: Arc<Mutex<Vec<FiveTuple>>>,
        sends: mpsc::Sender<(FiveTuple, Vec<u8>)>,
        sent: mpsc::Receiver<bool>,
        live: Arc<AtomicUsize>,
        thread: Option<JoinHandle<()>>,
    }

    impl Harness {
        fn start(
            limits: StreamLimits,
            transport: Transport,
            tls: Option<Arc<rustls::ServerConfig>>,
        ) -> Harness {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            let addr = listener.local_addr().unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let closed = Arc::new(Mutex::new(Vec::new()));
            let (sends, send_rx) = mpsc::channel::<(FiveTuple, Vec<u8>)>();
            let (sent_tx, sent) = mpsc::channel();
            let (stop2, closed2) = (stop.clone(), closed.clone());
            let live = Arc::new(AtomicUsize::new(0));
            let live2 = live.clone();
            let thread = std::thread::spawn(move || {
                let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).unwrap();
                epoll
                    .add(&listener, EpollEvent::new(EpollFlags::EPOLLIN, LISTENER))
                    .unwrap();
                let mut streams = Streams::new(limits, BASE);
                let mut events = [EpollEvent::empty(); 64];
                let end = Instant::now() + Duration::from_secs(30);
                let mut next_tick = Instant::now();
                let mut echo = |_ft: FiveTuple, frame: &[u8], reply: &mut Vec<u8>| {
                    reply.extend_from_slice(frame);
                    After::Next
                };
                while !stop2.load(Ordering::Relaxed) && Instant::now() < end {
                    let n = epoll
                        .wait(&mut events, EpollTimeout::from(10u16))
                        .unwrap_or(0);
                    streams.new_pass();
                    for ev in &events[..n] {
                        let now = Instant::now();
                        if ev.data() == LISTENER {
                            streams.accept(&listener, transport, tls.as_ref(), &epoll, now);
                        } else {
                            assert!(streams.owns(ev.data()));
                            if let Some(ft) =
                                streams.on_event(ev.data(), ev.events(), &epoll, now, &mut echo)
                            {
                                closed2.lock().unwrap().push(ft);
                            }
                        }
                    }
                    live2.store(streams.len(), Ordering::Relaxed);
                    while let Ok((ft, bytes)) = send_rx.try_recv() {
                        let _ = sent_tx.send(streams.send(&ft, &bytes, &epoll));
                    }
                    let now = Instant::now();
                    if now >= next_tick {
                        next_tick = now + Duration::from_millis(50);
                        let gone = streams.tick(now, &epoll);
                        closed2.lock().unwrap().extend(gone);
                    }
                }
            });
            Harness {
                addr,
                stop,
                closed,
                sends,
                sent,
                live,
                thread: Some(thread),
            }
        }

        /// Open connections, as of the loop's last round.
        fn accepted(&self) -> usize {
            self.live.load(Ordering::Relaxed)
        }

        fn connect(&self) -> TcpStream {
            let s = TcpStream::connect(self.addr).unwrap();
            s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            s.set_nodelay(true).unwrap();
            s
        }

        fn ft(&self, client: &TcpStream, transport: Transport) -> FiveTuple {
            FiveTuple {
                transport,
                client: client.local_addr().unwrap(),
                server: self.addr,
            }
        }

        fn send(&self, ft: FiveTuple, bytes: &[u8]) -> bool {
            self.sends.send((ft, bytes.to_vec())).unwrap();
            self.sent.recv_timeout(IO_TIMEOUT).unwrap()
        }

        fn was_closed(&self, ft: &FiveTuple) -> bool {
            self.closed.lock().unwrap().contains(ft)
        }
    }

    impl Drop for Harness {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn stun(tid: u8, attr_len: u16) -> Vec<u8> {
        let mut m = vec![0x00, 0x01];
        m.extend_from_slice(&(attr_len + 4 * u16::from(attr_len > 0)).to_be_bytes());
        m.extend_from_slice(&0x2112_A442u32.to_be_bytes());
        m.extend_from_slice(&[tid; 12]);
        if attr_len > 0 {
            m.extend_from_slice(&0x8022u16.to_be_bytes()); // SOFTWARE
            m.extend_from_slice(&attr_len.to_be_bytes());
            m.extend(std::iter::repeat_n(b'x', usize::from(attr_len)));
        }
        m
    }

    fn channel_data(payload: &[u8]) -> Vec<u8> {
        let mut m = vec![0x40, 0x00];
        m.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        m.extend_from_slice(payload);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    fn three_frames() -> Vec<u8> {
        let mut all = stun(1, 0);
        all.extend(stun(2, 8));
        all.extend(channel_data(b"hello"));
        assert_eq!(all.len(), 20 + 32 + 12);
        all
    }

    fn read_exact_timeout(s: &mut impl Read, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        s.read_exact(&mut buf).expect("reply in time");
        buf
    }

    /// The server closed the connection: EOF or reset within the timeout (not a timeout).
    fn assert_closed(s: &mut impl Read) {
        let mut buf = [0u8; 256];
        let start = Instant::now();
        loop {
            match s.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::UnexpectedEof
                            | io::ErrorKind::InvalidData
                    ) =>
                {
                    return
                }
                Err(e) => panic!("not closed after {:?}: {e}", start.elapsed()),
            }
        }
    }

    fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let end = Instant::now() + IO_TIMEOUT;
        while !f() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn tcp_frames_in_one_write_and_byte_by_byte() {
        let h = Harness::start(StreamLimits::default(), Transport::Tcp, None);
        let all = three_frames();

        let mut a = h.connect();
        a.write_all(&all).unwrap();
        assert_eq!(read_exact_timeout(&mut a, all.len()), all);

        let mut b = h.connect();
        for byte in &all {
            b.write_all(std::slice::from_ref(byte)).unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(read_exact_timeout(&mut b, all.len()), all);

        // Both still open; the peer closing is reported with the right 5-tuple.
        a.write_all(&all).unwrap();
        assert_eq!(read_exact_timeout(&mut a, all.len()), all);
        let fta = h.ft(&a, Transport::Tcp);
        drop(a);
        wait_until("close report", || h.was_closed(&fta));
        assert!(!h.was_closed(&h.ft(&b, Transport::Tcp)));
    }

    #[test]
    fn frame_over_max_and_garbage_close() {
        let limits = StreamLimits {
            max_frame: 1500,
            ..StreamLimits::default()
        };
        let h = Harness::start(limits, Transport::Tcp, None);
        let good = h.connect();

        // A STUN header announcing 2000 bytes closes at once, without waiting for them.
        let mut a = h.connect();
        let mut hdr = stun(3, 0);
        hdr[2..4].copy_from_slice(&2000u16.to_be_bytes());
        a.write_all(&hdr).unwrap();
        assert_closed(&mut a);
        // A complete frame before the bad one is still answered.
        let mut b = h.connect();
        let mut bytes = stun(4, 0);
        bytes.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        b.write_all(&bytes).unwrap();
        assert_eq!(read_exact_timeout(&mut b, 20), stun(4, 0));
        assert_closed(&mut b);

        let mut good = good;
        good.write_all(&stun(5, 0)).unwrap();
        assert_eq!(read_exact_timeout(&mut good, 20), stun(5, 0));
    }

    #[test]
    fn slow_loris_and_idle_timeouts() {
        let limits = StreamLimits {
            handshake_and_partial_deadline: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(1200),
            ..StreamLimits::default()
        };
        let h = Harness::start(limits, Transport::Tcp, None);
        let mut slow = h.connect();
        let mut idle = h.connect();
        let mut busy = h.connect();
        // Complete frames that are not STUN messages (empty ChannelData) every 100 ms do
        // not establish a connection: it gets the short deadline as a silent one does.
        let mut junk = h.connect();
        let start = Instant::now();
        slow.write_all(&stun(6, 0)[..10]).unwrap();
        idle.write_all(&stun(7, 0)).unwrap();
        assert_eq!(read_exact_timeout(&mut idle, 20), stun(7, 0));

        // The partial message is dropped after ~300 ms; the busy client, sending a
        // frame every 100 ms, is untouched.
        let slow_ft = h.ft(&slow, Transport::Tcp);
        let idle_ft = h.ft(&idle, Transport::Tcp);
        let junk_ft = h.ft(&junk, Transport::Tcp);
        while !h.was_closed(&idle_ft) {
            assert!(start.elapsed() < IO_TIMEOUT, "idle connection not closed");
            busy.write_all(&stun(8, 0)).unwrap();
            assert_eq!(read_exact_timeout(&mut busy, 20), stun(8, 0));
            let _ = junk.write_all(&channel_data(&[]));
            if start.elapsed() < Duration::from_millis(250) {
                assert!(!h.was_closed(&slow_ft), "closed too early");
                assert!(!h.was_closed(&junk_ft), "closed too early");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let idle_after = start.elapsed();
        assert!(h.was_closed(&slow_ft));
        assert!(
            h.was_closed(&junk_ft),
            "non-STUN frames kept the connection open"
        );
        assert!(idle_after >= Duration::from_millis(1100), "{idle_after:?}");
        assert_closed(&mut slow);
        assert_closed(&mut idle);
        assert!(!h.was_closed(&h.ft(&busy, Transport::Tcp)));
        busy.write_all(&stun(9, 0)).unwrap();
        assert_eq!(read_exact_timeout(&mut busy, 20), stun(9, 0));
    }

    #[test]
    fn ipv6_sources_count_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source(a), source(b));
        assert_ne!(source(a), source(other));
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(source(v4), v4);
        assert_eq!(source("::ffff:192.0.2.1".parse().unwrap()), v4);
        // One /64 holds the unestablished cap whatever addresses it uses.
        let limits = StreamLimits {
            max_unestablished_per_source: 2,
            ..StreamLimits::default()
        };
        let counter = ConnCounter::new();
        let one = counter.open(a, &limits).expect("first");
        let two = counter.open(b, &limits).expect("second");
        assert_eq!(
            counter.open("2001:db8:1:2::9".parse().unwrap(), &limits),
            Err(Dropped::UnauthenticatedLimit)
        );
        assert!(counter.open(other, &limits).is_ok(), "another /64");
        counter.remove(one);
        assert!(counter.open(a, &limits).is_ok(), "room again");
        let _ = two;
    }

    #[test]
    fn per_ip_cap_refuses_extra_connection_only() {
        let limits = StreamLimits {
            max_per_source: 3,
            ..StreamLimits::default()
        };
        let h = Harness::start(limits, Transport::Tcp, None);
        let mut conns: Vec<TcpStream> = (0..3).map(|_| h.connect()).collect();
        for (i, c) in conns.iter_mut().enumerate() {
            c.write_all(&stun(i as u8, 0)).unwrap();
            assert_eq!(read_exact_timeout(c, 20), stun(i as u8, 0));
        }
        // The fourth is taken on, but closed at its first frame, unanswered (the core
        // never sees it).
        let mut extra = h.connect();
        let _ = extra.write_all(&stun(9, 0));
        let mut got = Vec::new();
        let _ = extra.read_to_end(&mut got);
        assert!(
            got.is_empty(),
            "a frame over the cap was answered: {got:02x?}"
        );
        for (i, c) in conns.iter_mut().enumerate() {
            c.write_all(&stun(i as u8 + 10, 0)).unwrap();
            assert_eq!(read_exact_timeout(c, 20), stun(i as u8 + 10, 0));
        }
        // A slot freed by a close can be used again.
        let first = conns.remove(0);
        let ft = h.ft(&first, Transport::Tcp);
        drop(first);
        wait_until("close report", || h.was_closed(&ft));
        let mut again = h.connect();
        again.write_all(&stun(20, 0)).unwrap();
        assert_eq!(read_exact_timeout(&mut again, 20), stun(20, 0));
    }

    #[test]
    fn unestablished_cap_and_silent_connections() {
        let limits = StreamLimits {
            max_unestablished_per_source: 2,
            handshake_and_partial_deadline: Duration::from_millis(400),
            ..StreamLimits::default()
        };
        let h = Harness::start(limits, Transport::Tcp, None);
        let mut served = h.connect();
        served.write_all(&stun(1, 0)).unwrap();
        assert_eq!(read_exact_timeout(&mut served, 20), stun(1, 0));
        // Two silent connections fill the cap; a third is refused at once.
        let mut a = h.connect();
        let b = h.connect();
        wait_until("two accepted", || h.accepted() >= 3);
        let t = Instant::now();
        let mut c = h.connect();
        assert_closed(&mut c);
        assert!(
            t.elapsed() < Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
        // Established connections are not counted there: one more served client.
        let mut a_frame = stun(2, 0);
        a.write_all(&a_frame).unwrap();
        assert_eq!(read_exact_timeout(&mut a, 20), a_frame);
        let mut d = h.connect();
        a_frame = stun(3, 0);
        d.write_all(&a_frame).unwrap();
        assert_eq!(read_exact_timeout(&mut d, 20), a_frame);
        // The silent one is closed after the short deadline, not the idle timeout;
        // the established ones stay.
        let mut b = b;
        let t = Instant::now();
        assert_closed(&mut b);
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "{:?}",
            t.elapsed()
        );
        for (s, tid) in [(&mut a, 4), (&mut served, 5), (&mut d, 6)] {
            s.write_all(&stun(tid, 0)).unwrap();
            assert_eq!(read_exact_timeout(s, 20), stun(tid, 0));
        }
    }

    #[test]
    fn counter_counts_and_reloads() {
        let counter = ConnCounter::new();
        let limits = StreamLimits {
            max_per_source: 1,
            max_unestablished_per_source: 1,
            max_total: 3,
            ..StreamLimits::default()
        };
        let ip1: IpAddr = "192.0.2.1".parse().unwrap();
        let ip2: IpAddr = "192.0.2.2".parse().unwrap();
        let c1 = counter.open(ip1, &limits).unwrap();
        assert_eq!(
            counter.open(ip1, &limits),
            Err(Dropped::UnauthenticatedLimit)
        );
        let c1 = counter.establish(c1, &limits).unwrap();
        assert_eq!(c1, Counted::Established(ip1));
        let c2 = counter.open(ip1, &limits).unwrap();
        assert_eq!(counter.establish(c2, &limits), Err(Dropped::SourceLimit));
        let c3 = counter.open(ip2, &limits).unwrap();
        assert_eq!(counter.total(), 3);
        assert_eq!(counter.open(ip2, &limits), Err(Dropped::TotalLimit));
        for c in [c1, c2, c3] {
            counter.remove(c);
        }
        assert_eq!(counter.total(), 0);
        assert!(counter.lock().per_ip.is_empty());
        // Reloaded limits reach a Streams on its tick.
        let counter = Arc::new(counter);
        let mut streams = Streams::with_counter(StreamLimits::default(), BASE, counter.clone());
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).unwrap();
        counter.set_limits(limits.clone());
        assert_eq!(streams.limits(), &StreamLimits::default());
        streams.tick(Instant::now(), &epoll);
        assert_eq!(streams.limits(), &limits);
        // A Streams made after the reload starts with them.
        let later = Streams::with_counter(StreamLimits::default(), BASE, counter);
        assert_eq!(later.limits(), &limits);
    }

    #[test]
    fn send_backpressure_drops_whole_frames() {
        let limits = StreamLimits {
            max_write_buffer: 64 * 1024,
            ..StreamLimits::default()
        };
        let h = Harness::start(limits, Transport::Tcp, None);
        let mut c = h.connect();
        c.write_all(&stun(1, 0)).unwrap();
        assert_eq!(read_exact_timeout(&mut c, 20), stun(1, 0));
        let ft = h.ft(&c, Transport::Tcp);
        let unknown = FiveTuple {
            client: "127.0.0.1:1".parse().unwrap(),
            ..ft
        };
        assert!(!h.send(unknown, &channel_data(b"x")));

        // The client reads nothing: frames beyond socket buffers + 64 KiB are dropped.
        // (Loopback socket buffers take several MiB first.)
        let mut accepted = Vec::new();
        let mut dropped = 0;
        for i in 0..8000u32 {
            let mut payload = vec![0u8; 8 * 1024 - 1];
            payload[..4].copy_from_slice(&i.to_be_bytes());
            if h.send(ft, &channel_data(&payload)) {
                accepted.push(i);
            } else {
                dropped += 1;
                if dropped == 20 {
                    break;
                }
            }
        }
        assert_eq!(dropped, 20, "nothing dropped");
        assert!(accepted.len() > 8, "too few accepted: {}", accepted.len());
        // What was accepted arrives whole and in order; the connection still works.
        for i in &accepted {
            let f = read_exact_timeout(&mut c, 8 * 1024 + 4);
            assert_eq!(&f[..4], &[0x40, 0x00, 0x1F, 0xFF]);
            assert_eq!(&f[4..8], &i.to_be_bytes());
        }
        c.write_all(&stun(2, 0)).unwrap();
        assert_eq!(read_exact_timeout(&mut c, 20), stun(2, 0));
        assert!(!h.was_closed(&ft));
    }

    fn tls_client_config(
        root: rustls::pki_types::CertificateDer<'static>,
        alpn: &[&[u8]],
        version: &'static rustls::SupportedProtocolVersion,
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root).unwrap();
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(cfg)
    }

    fn tls_connect(
        h: &Harness,
        cfg: Arc<rustls::ClientConfig>,
    ) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let conn = rustls::ClientConnection::new(cfg, name).unwrap();
        let mut s = rustls::StreamOwned::new(conn, h.connect());
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock).expect("handshake");
        }
        s
    }

    fn tls_harness(limits: StreamLimits) -> (Harness, CertificateDerStatic, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, der) = crate::net::tls::tests::self_signed(dir.path());
        let cfg = crate::net::tls::server_config(&cert, &key).unwrap();
        (Harness::start(limits, Transport::Tls, Some(cfg)), der, dir)
    }

    type CertificateDerStatic = rustls::pki_types::CertificateDer<'static>;

    #[test]
    fn handshakes_are_spread_over_passes_and_none_is_lost() {
        const N: usize = 10;
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, der) = crate::net::tls::tests::self_signed(dir.path());
        let server_cfg = crate::net::tls::server_config(&cert, &key).unwrap();
        let client_cfg = tls_client_config(der, &[], &rustls::version::TLS13);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).unwrap();
        let mut streams = Streams::new(StreamLimits::default(), BASE);
        // N clients, each with its ClientHello sent, before the server reads any.
        let mut clients: Vec<TcpStream> = (0..N)
            .map(|_| {
                let mut sock = TcpStream::connect(addr).unwrap();
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                let mut conn = rustls::ClientConnection::new(client_cfg.clone(), name).unwrap();
                conn.write_tls(&mut sock).unwrap();
                sock.set_nonblocking(true).unwrap();
                sock
            })
            .collect();
        let now = Instant::now();
        for _ in 0..100 {
            if streams.len() == N {
                break;
            }
            streams.accept(&listener, Transport::Tls, Some(&server_cfg), &epoll, now);
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(streams.len(), N);
        std::thread::sleep(Duration::from_millis(50));
        let mut ignore = |_: FiveTuple, _: &[u8], _: &mut Vec<u8>| After::Next;
        let mut events = [EpollEvent::empty(); 64];
        let answered = |clients: &mut [TcpStream]| {
            clients
                .iter_mut()
                .filter(|c| c.peek(&mut [0u8; 1]).is_ok_and(|n| n > 0))
                .count()
        };
        // One pass: every connection is readable, HANDSHAKES_PER_PASS are served.
        let n = epoll
            .wait(&mut events, EpollTimeout::from(1000u16))
            .unwrap();
        assert_eq!(n, N, "every ClientHello readable");
        streams.new_pass();
        for ev in &events[..n] {
            assert_eq!(
                streams.on_event(ev.data(), ev.events(), &epoll, now, &mut ignore),
                None
            );
        }
        let per_pass = HANDSHAKES_PER_PASS as usize;
        assert_eq!(streams.handshakes_deferred(), (N - per_pass) as u64);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(answered(&mut clients), per_pass, "served in the first pass");
        // The rest come up again at once (level-triggered) and are served in later
        // passes: none is lost.
        for _ in 0..N {
            let n = epoll.wait(&mut events, EpollTimeout::from(100u16)).unwrap();
            streams.new_pass();
            for ev in &events[..n] {
                streams.on_event(ev.data(), ev.events(), &epoll, now, &mut ignore);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(answered(&mut clients), N, "every ClientHello answered");
        assert_eq!(streams.len(), N);
    }

    #[test]
    fn tls_frames_alpn_and_versions() {
        let (h, der, _dir) = tls_harness(StreamLimits::default());
        let all = three_frames();
        for (alpn, version) in [
            (&[&b"stun.turn"[..]][..], &rustls::version::TLS13),
            (&[&b"stun.nat-discovery"[..]][..], &rustls::version::TLS12),
            (&[][..], &rustls::version::TLS13),
        ] {
            let mut s = tls_connect(&h, tls_client_config(der.clone(), alpn, version));
            assert_eq!(s.conn.alpn_protocol(), alpn.first().copied());
            assert_eq!(s.conn.protocol_version(), Some(version.version));
            s.write_all(&all).unwrap();
            assert_eq!(read_exact_timeout(&mut s, all.len()), all);
            for byte in &all {
                s.write_all(std::slice::from_ref(byte)).unwrap();
            }
            assert_eq!(read_exact_timeout(&mut s, all.len()), all);
            // Peer data through `send`, encrypted.
            let ft = h.ft(&s.sock, Transport::Tls);
            assert!(h.send(ft, &channel_data(b"from peer")));
            assert_eq!(read_exact_timeout(&mut s, 16), channel_data(b"from peer"));
            s.conn.send_close_notify();
            let _ = s.conn.complete_io(&mut s.sock);
            wait_until("close report", || h.was_closed(&ft));
        }
        // A client offering only other protocols is refused (RFC 7301 3.2).
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let cfg = tls_client_config(der, &[b"http/1.1"], &rustls::version::TLS13);
        let conn = rustls::ClientConnection::new(cfg, name).unwrap();
        let mut s = rustls::StreamOwned::new(conn, h.connect());
        let err = loop {
            match s.conn.complete_io(&mut s.sock) {
                Ok(_) if s.conn.is_handshaking() => continue,
                Ok(_) => panic!("handshake succeeded"),
                Err(e) => break e,
            }
        };
        assert!(err.to_string().contains("NoApplicationProtocol"), "{err}");
    }

    #[test]
    fn tls_garbage_old_versions_and_slow_handshake_close() {
        let limits = StreamLimits {
            handshake_and_partial_deadline: Duration::from_millis(300),
            ..StreamLimits::default()
        };
        let (h, der, _dir) = tls_harness(limits);
        let mut good = tls_connect(
            &h,
            tls_client_config(der, &[b"stun.turn"], &rustls::version::TLS13),
        );

        // Garbage instead of a ClientHello: an alert, then closed.
        let mut g = h.connect();
        g.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_closed(&mut g);
        wait_until("close report", || h.was_closed(&h.ft(&g, Transport::Tls)));

        // A TLS 1.0-only ClientHello (no supported_versions): protocol_version alert.
        let mut hello = vec![
            0x16, 0x03, 0x01, 0x00, 0x2d, 0x01, 0x00, 0x00, 0x29, 0x03, 0x01,
        ];
        hello.extend_from_slice(&[7u8; 32]);
        hello.extend_from_slice(&[0x00, 0x00, 0x02, 0x00, 0x2f, 0x01, 0x00]);
        let mut old = h.connect();
        old.write_all(&hello).unwrap();
        let mut resp = Vec::new();
        let _ = old.read_to_end(&mut resp);
        assert_eq!(resp.first(), Some(&0x15), "expected an alert: {resp:?}");
        assert_eq!(resp.get(5), Some(&2), "fatal alert expected: {resp:?}");

        // A handshake that stops half-way is dropped after the deadline.
        let mut stalled = h.connect();
        stalled
            .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
            .unwrap();
        let t = Instant::now();
        assert_closed(&mut stalled);
        assert!(
            t.elapsed() >= Duration::from_millis(250),
            "{:?}",
            t.elapsed()
        );
        // A client that connects and says nothing likewise.
        let mut mute = h.connect();
        assert_closed(&mut mute);

        // The good client was served throughout.
        good.write_all(&stun(1, 0)).unwrap();
        assert_eq!(read_exact_timeout(&mut good, 20), stun(1, 0));
    }

    /// Heap held per idle connection after a handshake and one request, measured on the
    /// worker's thread (allocation-counter counts per thread).
    #[test]
    fn idle_connection_memory_is_small() {
        const N: usize = 20;
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, der) = crate::net::tls::tests::self_signed(dir.path());
        let server_cfg = crate::net::tls::server_config(&cert, &key).unwrap();
        for transport in [Transport::Tcp, Transport::Tls] {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            let addr = listener.local_addr().unwrap();
            let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).unwrap();
            epoll
                .add(&listener, EpollEvent::new(EpollFlags::EPOLLIN, LISTENER))
                .unwrap();
            let mut streams = Streams::new(StreamLimits::default(), BASE);
            let mut events = [EpollEvent::empty(); 64];
            let stop = Arc::new(AtomicBool::new(false));
            let (done_tx, done_rx) = mpsc::channel();
            let mut clients = Vec::new();
            for i in 0..N {
                let (stop, done_tx, der) = (stop.clone(), done_tx.clone(), der.clone());
                clients.push(std::thread::spawn(move || {
                    let tcp = TcpStream::connect(addr).unwrap();
                    tcp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                    let mut s: Box<dyn ReadWrite> = if transport == Transport::Tls {
                        let cfg = tls_client_config(der, &[b"stun.turn"], &rustls::version::TLS13);
                        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                        let conn = rustls::ClientConnection::new(cfg, name).unwrap();
                        Box::new(rustls::StreamOwned::new(conn, tcp))
                    } else {
                        Box::new(tcp)
                    };
                    s.write_all(&stun(i as u8, 8)).unwrap();
                    assert_eq!(read_exact_timeout(&mut s, 32), stun(i as u8, 8));
                    done_tx.send(()).unwrap();
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }));
            }
            let mut echo = |_ft: FiveTuple, frame: &[u8], reply: &mut Vec<u8>| {
                reply.extend_from_slice(frame);
                After::Next
            };
            let mut done = 0;
            let end = Instant::now() + IO_TIMEOUT;
            let info = allocation_counter::measure(|| {
                while done < N && Instant::now() < end {
                    let n = epoll
                        .wait(&mut events, EpollTimeout::from(10u16))
                        .unwrap_or(0);
                    streams.new_pass();
                    for ev in &events[..n] {
                        let now = Instant::now();
                        if ev.data() == LISTENER {
                            streams.accept(&listener, transport, Some(&server_cfg), &epoll, now);
                        } else {
                            assert!(streams
                                .on_event(ev.data(), ev.events(), &epoll, now, &mut echo)
                                .is_none());
                        }
                    }
                    while done_rx.try_recv().is_ok() {
                        done += 1;
                    }
                }
            });
            assert_eq!(done, N);
            assert_eq!(streams.len(), N);
            let per_conn = info.bytes_current as usize / N;
            eprintln!(
                "{transport:?}: {per_conn} bytes of heap per idle connection (peak total {})",
                info.bytes_max
            );
            let budget = if transport == Transport::Tls {
                16 * 1024
            } else {
                1024
            };
            assert!(
                per_conn < budget,
                "{transport:?}: {per_conn} bytes per connection"
            );
            stop.store(true, Ordering::Relaxed);
            for c in clients {
                c.join().unwrap();
            }
        }
    }

    /// A connection handed over mid-read (the hand-over frame and the ones after it in
    /// the same write) to another set, over TCP and TLS (the rustls state moves too):
    /// every frame is answered once, in order, by the set that holds the connection
    /// then; the shared counter counts it once throughout.
    #[test]
    fn hand_over_moves_the_connection_whole() {
        const HAND_OVER: u8 = 0xB0;
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, der) = crate::net::tls::tests::self_signed(dir.path());
        let server_cfg = crate::net::tls::server_config(&cert, &key).unwrap();
        for transport in [Transport::Tcp, Transport::Tls] {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            let addr = listener.local_addr().unwrap();
            let counter = Arc::new(ConnCounter::new());
            let log = Arc::new(Mutex::new(Vec::<(char, u8)>::new()));
            let stop = Arc::new(AtomicBool::new(false));
            let (stop2, log2, counter2, cfg2) = (
                stop.clone(),
                log.clone(),
                counter.clone(),
                server_cfg.clone(),
            );
            let server = std::thread::spawn(move || {
                let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).unwrap();
                epoll
                    .add(&listener, EpollEvent::new(EpollFlags::EPOLLIN, LISTENER))
                    .unwrap();
                let limits = StreamLimits::default();
                let mut a = Streams::with_counter(limits.clone(), BASE, counter2.clone());
                let mut b = Streams::with_counter(limits, 100_000, counter2);
                let mut events = [EpollEvent::empty(); 64];
                let end = Instant::now() + Duration::from_secs(30);
                let log_a = log2.clone();
                let mut on_a = |_ft: FiveTuple, frame: &[u8], reply: &mut Vec<u8>| {
                    if frame[8] == HAND_OVER {
                        return After::HandOver;
                    }
                    log_a.lock().unwrap().push(('a', frame[8]));
                    reply.extend_from_slice(frame);
                    After::Next
                };
                let mut on_b = |_ft: FiveTuple, frame: &[u8], reply: &mut Vec<u8>| {
                    log2.lock().unwrap().push(('b', frame[8]));
                    reply.extend_from_slice(frame);
                    After::Next
                };
                while !stop2.load(Ordering::Relaxed) && Instant::now() < end {
                    let n = epoll
                        .wait(&mut events, EpollTimeout::from(10u16))
                        .unwrap_or(0);
                    a.new_pass();
                    b.new_pass();
                    for ev in &events[..n] {
                        let now = Instant::now();
                        if ev.data() == LISTENER {
                            a.accept(&listener, transport, Some(&cfg2), &epoll, now);
                        } else if a.owns(ev.data()) {
                            a.on_event(ev.data(), ev.events(), &epoll, now, &mut on_a);
                            for h in a.take_handed_over() {
                                assert!(b.adopt(h, &epoll, now, &mut on_b).is_none());
                            }
                        } else {
                            assert!(b.owns(ev.data()));
                            b.on_event(ev.data(), ev.events(), &epoll, now, &mut on_b);
                        }
                    }
                }
                (a.len(), b.len())
            });
            let tcp = TcpStream::connect(addr).unwrap();
            tcp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            let mut c: Box<dyn ReadWrite> = if transport == Transport::Tls {
                let cfg = tls_client_config(der.clone(), &[b"stun.turn"], &rustls::version::TLS13);
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                let conn = rustls::ClientConnection::new(cfg, name).unwrap();
                Box::new(rustls::StreamOwned::new(conn, tcp))
            } else {
                Box::new(tcp)
            };
            c.write_all(&stun(1, 0)).unwrap();
            assert_eq!(read_exact_timeout(&mut c, 20), stun(1, 0));
            // The hand-over frame with two more in one write, the last one incomplete.
            let mut burst = stun(HAND_OVER, 8);
            burst.extend(stun(2, 0));
            let third = stun(3, 4);
            burst.extend_from_slice(&third[..10]);
            c.write_all(&burst).unwrap();
            c.flush().unwrap();
            std::thread::sleep(Duration::from_millis(50));
            c.write_all(&third[10..]).unwrap();
            let mut want = stun(HAND_OVER, 8);
            want.extend(stun(2, 0));
            want.extend(third);
            assert_eq!(read_exact_timeout(&mut c, want.len()), want);
            c.write_all(&stun(4, 0)).unwrap();
            assert_eq!(read_exact_timeout(&mut c, 20), stun(4, 0));
            assert_eq!(counter.total(), 1, "{transport:?}: counted once");
            assert_eq!(
                *log.lock().unwrap(),
                [('a', 1), ('b', HAND_OVER), ('b', 2), ('b', 3), ('b', 4)],
                "{transport:?}"
            );
            stop.store(true, Ordering::Relaxed);
            assert_eq!(server.join().unwrap(), (0, 1), "{transport:?}");
            drop(c);
        }
    }

    trait ReadWrite: Read + Write {}
    impl<T: Read + Write> ReadWrite for T {}
}
