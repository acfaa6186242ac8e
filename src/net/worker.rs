//! One worker: a level-triggered epoll loop on its own thread driving one [`Server`]
//! core, this worker's listener sockets and the relay sockets of its allocations.
//!
//! The loop is the kernel floor's own shape: `epoll_wait`, then one `recvfrom` per ready
//! socket and one `sendto` per relayed packet. Level-triggered readiness means a socket
//! with more queued is simply reported again, so no call is spent on `EAGAIN`. No
//! lock, no heap allocation and no task hand-off on the relay path.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::batch::{RecvBatch, SendBatch, BATCH};
use super::ports::PortPool;
use super::socket;
use super::stream::{After, HandedOver, Streams};
use super::{Common, WorkerSockets};
use crate::server::{
    owner_shard, BindError, BindResult, Clock, Command, Event, FiveTuple, Output, RelayBinder,
    RelayHandle, Server, Transport, PEER_HEADROOM, PEER_TAILROOM,
};

/// Largest UDP payload plus room to frame it in place.
const BUF_LEN: usize = PEER_HEADROOM + 65536 + PEER_TAILROOM;
/// Events taken per `epoll_wait`.
const EVENTS: usize = 256;
/// Tokens: UDP listener `i` is `i`; stream listener `i` is `STREAM_LISTENER_BASE + i`;
/// relay `i` is `RELAY_BASE + i`; stream connections are `STREAM_BASE` and up.
const STREAM_LISTENER_BASE: u64 = 1 << 31;
const RELAY_BASE: u64 = 1 << 32;
const STREAM_BASE: u64 = 1 << 40;
const PEER_BASE: u64 = 1 << 48;
/// An outgoing RFC 6062 connection that has not completed in this long fails (447).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes queued toward a peer before the pair is closed.
const MAX_PEER_BUFFER: usize = 1 << 20;
/// How often the core's timers are run.
const TICK: Duration = Duration::from_secs(1);

/// A relay socket: UDP, or the listening socket of an RFC 6062 TCP allocation.
enum RelaySock {
    Udp(UdpSocket),
    Tcp(TcpListener),
}

struct RelayEntry {
    socket: RelaySock,
    addr: SocketAddr,
}

impl RelayEntry {
    #[inline]
    fn udp(&self) -> Option<&UdpSocket> {
        match &self.socket {
            RelaySock::Udp(s) => Some(s),
            RelaySock::Tcp(_) => None,
        }
    }
}

#[derive(Default)]
struct Relays {
    entries: Vec<Option<RelayEntry>>,
    free: Vec<u32>,
}

impl Relays {
    /// Drops trailing free slots and shrinks the tables after a wave of allocations.
    fn compact(&mut self) {
        while matches!(self.entries.last(), Some(None)) {
            self.entries.pop();
        }
        let len = self.entries.len() as u32;
        self.free.retain(|&i| i < len);
        if self.entries.capacity() > 64 && self.entries.len() < self.entries.capacity() / 4 {
            self.entries.shrink_to_fit();
        }
        if self.free.capacity() > 64 && self.free.len() < self.free.capacity() / 4 {
            self.free.shrink_to_fit();
        }
    }

    #[inline]
    fn get(&self, h: RelayHandle) -> Option<&RelayEntry> {
        self.entries.get(h.0 as usize).and_then(|e| e.as_ref())
    }
}

/// The shell's side of relay socket binding.
struct Binder<'a> {
    relays: &'a mut Relays,
    ports: &'a PortPool,
    epoll: &'a Epoll,
    /// The shard's token tag (see [`guest_tag`]).
    tag: u64,
    buffer: usize,
    /// systemd's fd store, which keeps every relay socket while it is open.
    store: Option<&'a super::fdstore::FdStore>,
}

impl Binder<'_> {
    fn bind_one(&mut self, ip: IpAddr, port: u16) -> io::Result<(RelayHandle, SocketAddr)> {
        let sock = socket::udp_relay(SocketAddr::new(ip, port), self.buffer)?;
        self.register(RelaySock::Udp(sock))
    }

    fn register(&mut self, sock: RelaySock) -> io::Result<(RelayHandle, SocketAddr)> {
        let (addr, fd) = match &sock {
            RelaySock::Udp(s) => (s.local_addr()?, s.as_fd()),
            RelaySock::Tcp(l) => (l.local_addr()?, l.as_fd()),
        };
        let idx = match self.relays.free.pop() {
            Some(i) => i,
            None => {
                self.relays.entries.push(None);
                (self.relays.entries.len() - 1) as u32
            }
        };
        let token = self.tag + RELAY_BASE + u64::from(idx);
        if let Err(e) = self
            .epoll
            .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, token))
        {
            self.relays.free.push(idx);
            return Err(e.into());
        }
        if let Some(store) = self.store {
            match &sock {
                RelaySock::Udp(s) => store.add(&super::fdstore::relay_name(addr, false), s.as_fd()),
                RelaySock::Tcp(l) => store.add(&super::fdstore::relay_name(addr, true), l.as_fd()),
            }
        }
        self.relays.entries[idx as usize] = Some(RelayEntry { socket: sock, addr });
        Ok((RelayHandle(idx), addr))
    }
}

/// The binder of a shard's relay sockets (`relays` registered in `epoll` under `tag`).
fn binder<'a>(
    relays: &'a mut Relays,
    epoll: &'a Epoll,
    tag: u64,
    common: &'a Common,
) -> Binder<'a> {
    Binder {
        relays,
        ports: &common.ports,
        epoll,
        tag,
        buffer: common.buffer,
        store: common.fd_store.as_ref(),
    }
}

/// How many ports to try when binding fails because another process holds them.
const BIND_ATTEMPTS: usize = 16;

impl RelayBinder for Binder<'_> {
    fn bind(&mut self, ip: IpAddr, even_port: bool, reserve_next: bool) -> BindResult {
        for _ in 0..BIND_ATTEMPTS {
            let port = self
                .ports
                .take(ip, even_port, reserve_next)
                .ok_or(BindError::Exhausted)?;
            let first = match self.bind_one(ip, port) {
                Ok(b) => b,
                // Held by someone else: leave it marked used and try another.
                Err(_) => continue,
            };
            if !reserve_next {
                return Ok((first.0, first.1, None));
            }
            match self.bind_one(ip, port + 1) {
                Ok(second) => return Ok((first.0, first.1, Some(second))),
                Err(_) => {
                    self.release(first.0);
                    continue;
                }
            }
        }
        Err(BindError::Exhausted)
    }

    fn bind_tcp(&mut self, ip: IpAddr) -> Result<crate::server::BoundRelay, BindError> {
        for _ in 0..BIND_ATTEMPTS {
            let port = self
                .ports
                .take(ip, false, false)
                .ok_or(BindError::Exhausted)?;
            let Ok(l) = socket::tcp_relay_listener(SocketAddr::new(ip, port)) else {
                continue;
            };
            if let Ok(b) = self.register(RelaySock::Tcp(l)) {
                return Ok(b);
            }
        }
        Err(BindError::Exhausted)
    }

    fn release(&mut self, relay: RelayHandle) {
        let Some(slot) = self.relays.entries.get_mut(relay.0 as usize) else {
            return;
        };
        if let Some(e) = slot.take() {
            // Closing the socket removes it from the epoll set.
            let _ = match &e.socket {
                RelaySock::Udp(s) => self.epoll.delete(s),
                RelaySock::Tcp(l) => self.epoll.delete(l),
            };
            if let Some(store) = self.store {
                store.remove(&super::fdstore::relay_name(
                    e.addr,
                    matches!(e.socket, RelaySock::Tcp(_)),
                ));
            }
            self.ports.give_back(e.addr.ip(), e.addr.port());
            self.relays.free.push(relay.0);
        }
    }
}

/// The time now as an instant and as `CLOCK_MONOTONIC` nanoseconds, read together (for
/// state another process reads: it converts with its own pair).
fn mono_clock() -> crate::server::MonoClock {
    let mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        (t.tv_sec() as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(t.tv_nsec() as u64)
    });
    crate::server::MonoClock {
        now: Instant::now(),
        mono_ns: mono,
    }
}

fn clock() -> Clock {
    Clock {
        now: Instant::now(),
        unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    }
}

/// Runs the worker thread of `shard` (built by [`Shard::new`] on the main thread) until
/// the process exits. See [`Pool`] for how shards gather on thread 0 when the load is
/// light.
pub(crate) fn run(common: Arc<Common>, shard: Shard) {
    let index = shard.index;
    let result = if index == 0 {
        host_loop(&common, shard)
    } else {
        home_loop(&common, shard)
    };
    if let Err(e) = result {
        tracing::error!(worker = index, error = %e, "worker stopped");
    }
}

/// Where a packet for a client goes: the UDP send batch or its stream.
struct ToClients<'a> {
    listeners: &'a [(SocketAddr, UdpSocket)],
    sbatch: &'a mut SendBatch,
}

impl ToClients<'_> {
    #[inline]
    fn send(&mut self, streams: &mut Streams, epoll: &Epoll, ft: &FiveTuple, bytes: &[u8]) {
        if ft.transport.is_stream() {
            streams.send(ft, bytes, epoll);
        } else if let Some(l) = self.listeners.iter().position(|(a, _)| *a == ft.server) {
            self.sbatch.push(self.listeners, l, bytes, ft.client);
        }
    }
}

/// Token of the thread's wake-up eventfd in its home shard's epoll set.
const WAKE_TOKEN: u64 = u64::MAX;
/// While shard `k` is thread 0's guest, its sockets sit in thread 0's epoll set with
/// their tokens tagged `(k + 1) << TAG_SHIFT`; every untagged token is below
/// `GUEST_BASE` (the largest, `PEER_BASE` + a connection slot, is far below it), and
/// `MAX_WORKERS` shards fit in the tag bits below `WAKE_TOKEN`'s.
const TAG_SHIFT: u32 = 50;
const GUEST_BASE: u64 = 1 << TAG_SHIFT;
const UNTAG: u64 = GUEST_BASE - 1;

fn guest_tag(index: usize) -> u64 {
    (index as u64 + 1) << TAG_SHIFT
}

/// Adaptive worker threads. Every worker thread owns one shard (a `SO_REUSEPORT` listener
/// socket, its TURN core and its allocations' relay sockets). Below a light load, the
/// shards of threads 1..N move to thread 0, whose epoll set then holds their sockets too
/// (under tagged tokens): one thread wakes up for a burst of packets instead of N, and on a
/// small machine those wake-ups are most of a relay's cost. When thread 0 gets busy, the
/// shards go home and every core relays again. Moving a shard moves its sockets and
/// state whole between threads; packets wait in the socket buffers meanwhile, so nothing
/// is lost or reordered.
pub(crate) struct Pool {
    /// Each thread's wake-up eventfd (blocking: a parked thread sleeps in `read`).
    wake: Vec<EventFd>,
    /// Each thread's CPU time in nanoseconds, published four times a second (each on
    /// its own cache line).
    busy_ns: Vec<BusyCounter>,
    /// True while shards 1..N live on thread 0.
    gathered: AtomicBool,
    /// Shards on their way to thread 0.
    to_host: Mutex<Vec<Shard>>,
    /// Shards on their way home, by thread.
    home: Vec<Mutex<Option<Shard>>>,
    /// Stream connections handed over to each shard (RFC 6062 data connections whose
    /// ConnectionBind names an allocation of that shard), by shard index.
    inbox: Vec<Inbox>,
    /// Whether to gather at all (`[server] adaptive_workers`).
    adaptive: bool,
    /// Testing aid: flip between gathered and spread this often, whatever the load.
    flip_every: Option<Duration>,
    /// The process is stopping: every shard ends its live allocations (their final
    /// usage records, reason "shutdown") at its next pass ([`Pool::begin_stop`]).
    stopping: AtomicBool,
    /// Shards that have done so.
    stopped: AtomicUsize,
    /// An upgrade's requests to the shards ([`Pool::upgrade`]).
    upgrade: UpgradeSync,
}

/// What the main thread asks every shard during an upgrade; each shard acts once on
/// each request (by generation) at its next pass, wherever it is served.
#[derive(Default)]
struct UpgradeSync {
    generation: AtomicU64,
    request: std::sync::atomic::AtomicU8,
    /// Shards that acted on the current request.
    done: AtomicUsize,
    exports: Mutex<Vec<ShardExport>>,
    /// An upgrade is in progress: shards stay where they are.
    active: AtomicBool,
    /// A shard could not act on the current request.
    failed: AtomicBool,
    /// One request at a time (an upgrade's and the journal's snapshots).
    one: Mutex<()>,
}

/// Upgrade requests ([`Pool::upgrade`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpgradeStep {
    /// Stop reading the UDP listeners and the UDP allocations' relay sockets, and
    /// export them with the allocations' state.
    Freeze = 1,
    /// The upgrade failed: read them again, as before.
    Resume = 2,
    /// The new process serves them: close this process's copies and forget the
    /// allocations (no usage record: they go on there).
    Commit = 3,
    /// Export the state only (no socket copies, nothing frozen), for the fd store's
    /// journal: sockets are numbered in the order [`Shard::freeze`] would copy them.
    Snapshot = 4,
    /// A restart: end the TCP/TLS clients' allocations (their connections go with this
    /// process), writing their usage records; the rest stays frozen.
    EndStreams = 5,
}

impl UpgradeStep {
    fn from_u8(v: u8) -> Option<UpgradeStep> {
        [
            UpgradeStep::Freeze,
            UpgradeStep::Resume,
            UpgradeStep::Commit,
            UpgradeStep::Snapshot,
            UpgradeStep::EndStreams,
        ]
        .into_iter()
        .find(|s| *s as u8 == v)
    }
}

/// One shard's part of the hand-over: duplicates of its sockets and its state, with
/// socket indexes into `fds`.
pub(crate) struct ShardExport {
    pub index: usize,
    /// The UDP listeners, then the stream listeners, in configuration order.
    pub udp: Vec<u32>,
    pub streams: Vec<u32>,
    pub state: crate::server::ShardState,
    /// The copies (empty for a snapshot).
    pub fds: Vec<std::os::fd::OwnedFd>,
    /// How many socket numbers the export uses.
    pub count: u32,
}

/// What a shard took out of its epoll set for an upgrade.
#[derive(Default)]
struct Frozen {
    relays: std::collections::HashSet<u32>,
}

/// Connections on their way to one shard; `pending` is checked (one relaxed load) on
/// every pass of the shard's loop, wherever the shard is served.
#[derive(Default)]
struct Inbox {
    items: Mutex<Vec<HandedOver>>,
    pending: AtomicBool,
}

/// A thread's CPU nanoseconds, alone on its cache line (no false sharing).
#[derive(Default)]
#[repr(align(128))]
struct BusyCounter(AtomicU64);

/// Gather when all worker threads together used less than this fraction of one core's
/// CPU time, in each of [`GATHER_AFTER`] seconds in a row. Spread shards cost at least as
/// much CPU as gathered ones for the same traffic (about 15% more at 100k packets/s
/// here: two threads waking up instead of one), so with `GATHER_BELOW < SPREAD_ABOVE`
/// the two states cannot chase each other. At 0.7 a pool that a short preemption had
/// spread at 100k packets/s (0.75 of a core spread, 0.64 gathered) never gathered again.
const GATHER_BELOW: f64 = 0.8;
const GATHER_AFTER: u32 = 3;
/// Spread again as soon as thread 0, holding every shard, used more than this fraction
/// of a core's CPU time over the last three [`Balance::CHECK`] intervals (150 ms), or
/// was busy (outside `epoll_wait`, by the wall clock) more than [`SATURATED`] of each of
/// [`SATURATED_CHECKS`] intervals in a row: a thread that waits for a contended core
/// falls just as far behind, but a busy machine also preempts a thread that keeps up,
/// for a while, so that takes longer to count.
const SPREAD_ABOVE: f64 = 0.85;
const SATURATED: f64 = 0.97;
const SATURATED_CHECKS: u32 = 10;
/// Also spread at once when, within one [`Balance::CHECK`] interval, at least this many
/// listener reads (and at least half of them) found a full batch of datagrams waiting:
/// the socket queues are growing faster than one thread drains them.
const BEHIND_READS: u32 = 8;

/// CPU time this thread has used, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(0, |t| {
        (t.tv_sec() as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(t.tv_nsec() as u64)
    })
}

impl Pool {
    pub(crate) fn new(threads: usize, adaptive: bool) -> io::Result<Pool> {
        let mut wake = Vec::with_capacity(threads);
        for _ in 0..threads {
            wake.push(EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC)?);
        }
        let flip_every = std::env::var("TURNSTONE_TEST_SHARD_FLIP_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis);
        Ok(Pool {
            wake,
            busy_ns: (0..threads).map(|_| BusyCounter::default()).collect(),
            // Load starts at zero: start gathered.
            gathered: AtomicBool::new(adaptive && threads > 1),
            to_host: Mutex::new(Vec::new()),
            home: (0..threads).map(|_| Mutex::new(None)).collect(),
            inbox: (0..threads).map(|_| Inbox::default()).collect(),
            adaptive: adaptive && threads > 1,
            flip_every,
            stopping: AtomicBool::new(false),
            stopped: AtomicUsize::new(0),
            upgrade: UpgradeSync::default(),
        })
    }

    /// Asks every shard to end its live allocations now, writing their final usage
    /// records, and wakes the threads so that they do it at once
    /// ([`Pool::all_stopped`] says when all have).
    pub(crate) fn begin_stop(&self) {
        self.stopping.store(true, Ordering::Release);
        for k in 0..self.wake.len() {
            self.signal(k);
        }
    }

    /// Asks every shard for `step` and waits up to `timeout` for all of them to act;
    /// returns the exports (for [`UpgradeStep::Freeze`]), or an error naming how many
    /// did not act in time.
    pub(crate) fn upgrade(
        &self,
        step: UpgradeStep,
        timeout: Duration,
    ) -> Result<Vec<ShardExport>, String> {
        let u = &self.upgrade;
        let _one = u.one.lock().unwrap_or_else(|e| e.into_inner());
        match step {
            UpgradeStep::Freeze => u.active.store(true, Ordering::Release),
            UpgradeStep::Resume | UpgradeStep::Commit => u.active.store(false, Ordering::Release),
            UpgradeStep::Snapshot | UpgradeStep::EndStreams => {}
        }
        u.done.store(0, Ordering::Release);
        u.failed.store(false, Ordering::Release);
        u.exports.lock().unwrap_or_else(|e| e.into_inner()).clear();
        u.request.store(step as u8, Ordering::Release);
        u.generation.fetch_add(1, Ordering::AcqRel);
        for k in 0..self.wake.len() {
            self.signal(k);
        }
        let until = Instant::now() + timeout;
        while u.done.load(Ordering::Acquire) < self.wake.len() {
            if Instant::now() >= until {
                return Err(format!(
                    "{} of {} workers did not answer within {timeout:?}",
                    self.wake.len() - u.done.load(Ordering::Acquire),
                    self.wake.len()
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if u.failed.load(Ordering::Acquire) {
            return Err("a worker could not export its sockets (see the log)".into());
        }
        let mut exports = std::mem::take(&mut *u.exports.lock().unwrap_or_else(|e| e.into_inner()));
        exports.sort_by_key(|e| e.index);
        exports.dedup_by_key(|e| e.index);
        let wanted = matches!(step, UpgradeStep::Freeze | UpgradeStep::Snapshot);
        if wanted && exports.len() != self.wake.len() {
            return Err(format!(
                "{} of {} workers exported their state",
                exports.len(),
                self.wake.len()
            ));
        }
        Ok(exports)
    }

    /// Has a shard that last acted on generation `seen` an upgrade request to act on?
    fn upgrade_pending(&self, seen: u64) -> bool {
        self.upgrade.generation.load(Ordering::Acquire) != seen
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Has every shard ended its allocations and logged their records since
    /// [`Pool::begin_stop`]?
    pub(crate) fn all_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire) >= self.wake.len()
    }

    fn signal(&self, thread: usize) {
        if let Some(fd) = self.wake.get(thread) {
            let _ = fd.write(1);
        }
    }

    fn gathered(&self) -> bool {
        self.gathered.load(Ordering::Acquire)
    }

    /// Queues `conn` for shard `k` and wakes both threads that may be serving it (its
    /// own, and thread 0 while it may be a guest there): a shard on the move finds it
    /// on its next pass wherever it lands.
    fn deliver(&self, k: usize, conn: HandedOver) -> Result<(), HandedOver> {
        let Some(inbox) = self.inbox.get(k) else {
            return Err(conn);
        };
        inbox
            .items
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(conn);
        inbox.pending.store(true, Ordering::Release);
        self.signal(k);
        if k != 0 {
            self.signal(0);
        }
        Ok(())
    }

    fn has_mail(&self, k: usize) -> bool {
        self.inbox
            .get(k)
            .is_some_and(|i| i.pending.load(Ordering::Acquire))
    }

    fn take_mail(&self, k: usize) -> Vec<HandedOver> {
        let Some(inbox) = self.inbox.get(k) else {
            return Vec::new();
        };
        inbox.pending.store(false, Ordering::Release);
        std::mem::take(&mut *inbox.items.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Per-thread scratch: receive and send batches and buffers (not `Send`, so they stay
/// with their thread while shards move).
struct Scratch {
    buf: Vec<u8>,
    xbuf: Vec<u8>,
    events: Vec<EpollEvent>,
    /// Thread 0, gathered: each guest shard's ready events (untagged), by shard index.
    guest_events: Vec<Vec<EpollEvent>>,
    rbatch: RecvBatch,
    sbatch: SendBatch,
    /// Listener reads since the last balance check, and how many of them filled the
    /// whole batch (the sign of a thread that has fallen behind).
    reads: u32,
    full_reads: u32,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            buf: vec![0u8; BUF_LEN],
            xbuf: vec![0u8; BUF_LEN],
            events: vec![EpollEvent::empty(); EVENTS],
            guest_events: Vec::new(),
            rbatch: RecvBatch::new(),
            sbatch: SendBatch::new(),
            reads: 0,
            full_reads: 0,
        }
    }
}

/// One shard: a listener socket per configured address (UDP, TCP and TLS, all
/// `SO_REUSEPORT`), its TCP and TLS client connections, the TURN core, its relay sockets
/// and RFC 6062 peer connections, all in one epoll set.
pub(crate) struct Shard {
    index: usize,
    /// The epoll set this shard's sockets are registered in: its own, or thread 0's
    /// while it is a guest there.
    epoll: Arc<Epoll>,
    /// The shard's own epoll set, where its home thread waits.
    own: Arc<Epoll>,
    /// Added to every token this shard registers: 0 at home, `guest_tag` as a guest.
    tag: u64,
    listeners: Vec<(SocketAddr, UdpSocket)>,
    stream_listeners: Vec<(TcpListener, Transport)>,
    streams: Streams,
    core: Server,
    relays: Relays,
    closed: Vec<FiveTuple>,
    peers: PeerConns,
    peer_check: Instant,
    next_tick: Instant,
    handoff: bool,
    /// Its allocations were ended for the process stopping ([`Pool::begin_stop`]).
    stopped: bool,
    /// The last upgrade request acted on, and what a freeze took out of the epoll set.
    upgrade_seen: u64,
    frozen: Option<Frozen>,
    /// Sockets taken over from the process before (an upgrade) or thawed (a failed
    /// one) whose queued datagrams are not all read yet: the kernel fast path's entries
    /// wait until they are (or [`HOLD_MAX`] passes), or the kernel would relay newer
    /// datagrams ahead of them.
    hold: Option<Hold>,
}

/// The longest the kernel fast path's entries wait for a taken-over shard's backlog.
const HOLD_MAX: Duration = Duration::from_secs(2);

/// See [`Shard::hold`].
struct Hold {
    listeners: Vec<usize>,
    relays: Vec<RelayHandle>,
    /// Set at the first check (the shard serves from then on).
    until: Option<Instant>,
}

impl Hold {
    fn new(listeners: usize, relays: impl IntoIterator<Item = RelayHandle>) -> Hold {
        Hold {
            listeners: (0..listeners).collect(),
            relays: relays.into_iter().collect(),
            until: None,
        }
    }
}

/// Whether a datagram is waiting in `sock` (non-blocking).
fn queued(sock: &UdpSocket) -> bool {
    let mut b = [0u8; 1];
    sock.peek_from(&mut b).is_ok()
}

impl Shard {
    pub(crate) fn new(index: usize, common: &Common, sockets: WorkerSockets) -> io::Result<Shard> {
        let epoll = Arc::new(Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?);
        let mut listeners = Vec::with_capacity(sockets.udp.len());
        for (i, s) in sockets.udp.into_iter().enumerate() {
            let addr = s.local_addr()?;
            epoll.add(&s, EpollEvent::new(EpollFlags::EPOLLIN, i as u64))?;
            listeners.push((addr, s));
        }
        let stream_listeners = sockets.streams;
        for (i, (l, _)) in stream_listeners.iter().enumerate() {
            epoll.add(
                l,
                EpollEvent::new(EpollFlags::EPOLLIN, STREAM_LISTENER_BASE + i as u64),
            )?;
        }
        let streams = Streams::with_counter(
            common.stream_limits.clone(),
            STREAM_BASE,
            common.conns.clone(),
        );
        Ok(Shard {
            index,
            own: epoll.clone(),
            epoll,
            tag: 0,
            listeners,
            stream_listeners,
            streams,
            core: {
                let mut core = Server::new(common.shared.clone());
                core.set_shard(index);
                core
            },
            relays: Relays::default(),
            closed: Vec::new(),
            peers: PeerConns::default(),
            peer_check: Instant::now() + TICK,
            next_tick: Instant::now() + TICK,
            // Benchmarks compare the in-worker hand-off between two allocations with
            // the kernel path: TURNSTONE_NO_HANDOFF=1 turns it off.
            handoff: std::env::var_os("TURNSTONE_NO_HANDOFF").is_none(),
            stopped: false,
            upgrade_seen: common.pool.upgrade.generation.load(Ordering::Acquire),
            frozen: None,
            hold: None,
        })
    }

    /// Moves this shard's sockets into `to` under token tag `tag` (thread 0's set as a
    /// guest, or back into its own set with tag 0): its UDP and stream listeners, its
    /// allocations' relay sockets, its TCP and TLS client connections and its RFC 6062
    /// peer connections (these two keep their interest). Two `epoll_ctl` calls per
    /// socket; what arrives meanwhile waits in the socket buffers, and a connection
    /// whose handshake or frame was half-read keeps its state in the shard.
    fn register_in(&mut self, to: Arc<Epoll>, tag: u64) {
        let from = std::mem::replace(&mut self.epoll, to);
        self.tag = tag;
        if Arc::ptr_eq(&from, &self.epoll) {
            return;
        }
        self.streams.move_to(&from, &self.epoll, tag);
        self.peers.move_to(&from, &self.epoll, tag);
        let epoll = &self.epoll;
        let moved = |fd: std::os::fd::BorrowedFd<'_>, token: u64| {
            let _ = from.delete(fd);
            if let Err(e) = epoll.add(fd, EpollEvent::new(EpollFlags::EPOLLIN, tag + token)) {
                tracing::error!(error = %e, shard = self.index, "cannot move a socket between epoll sets");
            }
        };
        // What an upgrade froze stays out of every epoll set until it resumes.
        let frozen = self.frozen.as_ref();
        for (i, (_, sock)) in self.listeners.iter().enumerate() {
            if frozen.is_none() {
                moved(sock.as_fd(), i as u64);
            }
        }
        for (i, (l, _)) in self.stream_listeners.iter().enumerate() {
            if frozen.is_none() {
                moved(l.as_fd(), STREAM_LISTENER_BASE + i as u64);
            }
        }
        for (i, entry) in self.relays.entries.iter().enumerate() {
            if frozen.is_some_and(|f| f.relays.contains(&(i as u32))) {
                let _ = from.delete(match entry {
                    Some(e) => match &e.socket {
                        RelaySock::Udp(s) => s.as_fd(),
                        RelaySock::Tcp(l) => l.as_fd(),
                    },
                    None => continue,
                });
                continue;
            }
            if let Some(e) = entry {
                let fd = match &e.socket {
                    RelaySock::Udp(s) => s.as_fd(),
                    RelaySock::Tcp(l) => l.as_fd(),
                };
                moved(fd, RELAY_BASE + i as u64);
            }
        }
    }

    pub(crate) fn index(&self) -> usize {
        self.index
    }

    /// Acts on the pool's current upgrade request ([`UpgradeStep`]).
    fn upgrade_step(&mut self, common: &Common, clock: Clock) {
        let u = &common.pool.upgrade;
        self.upgrade_seen = u.generation.load(Ordering::Acquire);
        let step = UpgradeStep::from_u8(u.request.load(Ordering::Acquire));
        if step == Some(UpgradeStep::Snapshot) {
            let mut export = self.snapshot();
            if let Some(k) = &common.fast_path {
                // What the kernel relayed and no record holds yet, in the copy only.
                let k = k.lock().unwrap_or_else(|e| e.into_inner());
                for a in &mut export.state.allocations {
                    if let Some(u) = k.peek_usage(a.id) {
                        for (x, y) in a.usage.iter_mut().zip(u) {
                            *x += y;
                        }
                    }
                }
            }
            u.exports
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(export);
        } else if step == Some(UpgradeStep::Freeze) && self.frozen.is_none() {
            match self.freeze(common) {
                Ok(export) => u
                    .exports
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(export),
                Err(e) => {
                    // The request fails at once, and the upgrade resumes.
                    tracing::error!(shard = self.index, error = %e, "upgrade: cannot export this worker's sockets");
                    u.failed.store(true, Ordering::Release);
                }
            }
        } else if step == Some(UpgradeStep::EndStreams) {
            let mut binder = binder(&mut self.relays, &self.epoll, self.tag, common);
            self.core.close_streams(clock.now, &mut binder);
            for ev in self.core.drain_events() {
                log_event(self.index, &ev, None);
            }
        } else if step == Some(UpgradeStep::Resume) {
            let mut thawed = Vec::new();
            if let Some(f) = self.frozen.take() {
                self.thaw(&f);
                thawed.extend(f.relays.iter().map(|&h| RelayHandle(h)));
            }
            if common.fast_path.is_some() {
                // The kernel program was given up and loaded again: empty maps (for
                // every shard, frozen or not), filled again once what queued meanwhile
                // is read.
                self.core.reinstall_fast_path();
                self.hold = Some(Hold::new(self.listeners.len(), thawed));
            }
        } else if step == Some(UpgradeStep::Commit) && self.frozen.take().is_some() {
            // The new process reads them now: close this process's copies.
            self.listeners.clear();
            self.stream_listeners.clear();
            let mut binder = Binder {
                store: None,
                ..binder(&mut self.relays, &self.epoll, self.tag, common)
            };
            let n = self.core.forget_udp(&mut binder);
            tracing::debug!(shard = self.index, allocations = n, "upgrade: handed over");
        }
        u.done.fetch_add(1, Ordering::AcqRel);
    }

    /// Takes the UDP listeners, stream listeners and UDP allocations' relay sockets out
    /// of the epoll set (what arrives waits in their buffers) and exports duplicates of
    /// them with the allocations' state. The kernel fast path's counts of these
    /// allocations are folded into their usage first (the program was detached).
    fn freeze(&mut self, common: &Common) -> io::Result<ShardExport> {
        if let Some(k) = &common.fast_path {
            let mut k = k.lock().unwrap_or_else(|e| e.into_inner());
            // Once more: a packet the program was relaying on another CPU as it was
            // detached ([`Kernel::shutdown`] read the counters then) is counted too.
            k.read_counters(&common.metrics);
            self.core.fold_kernel_usage(&mut |id| k.take_usage(id));
        }
        let mut fds: Vec<std::os::fd::OwnedFd> = Vec::new();
        let mut udp = Vec::new();
        for (_, sock) in &self.listeners {
            udp.push(fds.len() as u32);
            fds.push(sock.as_fd().try_clone_to_owned()?);
        }
        let mut streams = Vec::new();
        for (l, _) in &self.stream_listeners {
            streams.push(fds.len() as u32);
            fds.push(l.as_fd().try_clone_to_owned()?);
        }
        let mut frozen = Frozen::default();
        let mut failed = None;
        let mono = mono_clock();
        let relays = &self.relays;
        let state = self.core.export_udp(mono, &mut |h| {
            let i = fds.len() as u32;
            match relays.get(h).map(|e| match &e.socket {
                RelaySock::Udp(s) => s.as_fd().try_clone_to_owned(),
                RelaySock::Tcp(l) => l.as_fd().try_clone_to_owned(),
            }) {
                Some(Ok(fd)) => fds.push(fd),
                Some(Err(e)) => failed = Some(e),
                None => failed = Some(io::Error::other(format!("relay {} has no socket", h.0))),
            }
            frozen.relays.insert(h.0);
            i
        });
        if let Some(e) = failed {
            return Err(e);
        }
        for (_, sock) in &self.listeners {
            let _ = self.epoll.delete(sock);
        }
        for (l, _) in &self.stream_listeners {
            let _ = self.epoll.delete(l);
        }
        for &h in &frozen.relays {
            if let Some(e) = self.relays.get(RelayHandle(h)) {
                let _ = match &e.socket {
                    RelaySock::Udp(s) => self.epoll.delete(s),
                    RelaySock::Tcp(l) => self.epoll.delete(l),
                };
            }
        }
        self.frozen = Some(frozen);
        Ok(ShardExport {
            index: self.index,
            udp,
            streams,
            state,
            count: fds.len() as u32,
            fds,
        })
    }

    /// The state [`Shard::freeze`] would export, without copying or freezing anything.
    fn snapshot(&self) -> ShardExport {
        let mut n = 0u32;
        let mut next = || {
            n += 1;
            n - 1
        };
        let udp = self.listeners.iter().map(|_| next()).collect();
        let streams = self.stream_listeners.iter().map(|_| next()).collect();
        let state = self.core.export_udp(mono_clock(), &mut |_| next());
        ShardExport {
            index: self.index,
            udp,
            streams,
            state,
            fds: Vec::new(),
            count: n,
        }
    }

    /// Puts what [`Shard::freeze`] took out back into the epoll set.
    fn thaw(&mut self, f: &Frozen) {
        let add = |fd: std::os::fd::BorrowedFd<'_>, token: u64| {
            if let Err(e) = self
                .epoll
                .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, self.tag + token))
            {
                tracing::error!(error = %e, shard = self.index, "upgrade: cannot resume a socket");
            }
        };
        for (i, (_, sock)) in self.listeners.iter().enumerate() {
            add(sock.as_fd(), i as u64);
        }
        for (i, (l, _)) in self.stream_listeners.iter().enumerate() {
            add(l.as_fd(), STREAM_LISTENER_BASE + i as u64);
        }
        for &h in &f.relays {
            if let Some(e) = self.relays.get(RelayHandle(h)) {
                let fd = match &e.socket {
                    RelaySock::Udp(s) => s.as_fd(),
                    RelaySock::Tcp(l) => l.as_fd(),
                };
                add(fd, RELAY_BASE + u64::from(h));
            }
        }
    }

    /// Takes over a shard's state from the process before (an upgrade): registers the
    /// relay sockets of `state` (taken out of `fds` by index) and imports the
    /// allocations into the core.
    pub(crate) fn import(
        &mut self,
        common: &Common,
        state: &crate::server::ShardState,
        fds: &mut [Option<std::os::fd::OwnedFd>],
    ) -> Result<usize, String> {
        let mut handles: HashMap<u32, RelayHandle> = HashMap::new();
        let wanted = state.sockets();
        // The store holds these already (the previous process put them there).
        let mut binder = Binder {
            store: None,
            ..binder(&mut self.relays, &self.epoll, self.tag, common)
        };
        for i in wanted {
            let Some(fd) = fds.get_mut(i as usize).and_then(Option::take) else {
                return Err(format!("relay socket {i} missing or named twice"));
            };
            let sock = UdpSocket::from(fd);
            let addr = sock
                .local_addr()
                .map_err(|e| format!("relay socket {i}: {e}"))?;
            let _ = sock.set_nonblocking(true);
            let (h, _) = binder
                .register(RelaySock::Udp(sock))
                .map_err(|e| format!("relay socket {i}: {e}"))?;
            common.ports.mark_taken(addr.ip(), addr.port());
            handles.insert(i, h);
        }
        let clock = mono_clock();
        if common.fast_path.is_some() {
            self.hold = Some(Hold::new(self.listeners.len(), handles.values().copied()));
        }
        self.core
            .import_udp(state, clock, &mut |i| handles.get(&i).copied())
    }

    /// Handles a batch of this shard's epoll events, then its timers and queued work.
    fn process(&mut self, common: &Common, s: &mut Scratch, events: &[EpollEvent], clock: Clock) {
        let ports = &common.ports;
        let store = common.fd_store.as_ref();
        let buffer = common.buffer;
        let workers = common.pool.inbox.len();
        let Shard {
            index,
            epoll,
            own: _,
            tag,
            listeners,
            stream_listeners,
            streams,
            core,
            relays,
            closed,
            peers,
            peer_check: _,
            next_tick: _,
            handoff,
            stopped: _,
            upgrade_seen: _,
            frozen: _,
            hold: _,
        } = self;
        let Scratch {
            buf,
            xbuf,
            rbatch,
            sbatch,
            reads,
            full_reads,
            ..
        } = s;
        core.counters.handled(events.len() as u64);
        for ev in events {
            let token = ev.data();
            if token < STREAM_LISTENER_BASE {
                // A UDP listener: every queued client datagram.
                let idx = token as usize;
                let Some((local, sock)) = listeners.get(idx) else {
                    continue;
                };
                let local = *local;
                let n = rbatch.recv(sock);
                *reads += 1;
                if n == BATCH {
                    *full_reads += 1;
                }
                for k in 0..n {
                    let Some((data, from)) = rbatch.get(k) else {
                        continue;
                    };
                    let ft = FiveTuple {
                        transport: Transport::Udp,
                        client: from,
                        server: local,
                    };
                    let mut binder = Binder {
                        relays,
                        ports,
                        epoll,
                        tag: *tag,
                        buffer,
                        store,
                    };
                    let (relay, peer, len) = match core.handle_client(ft, data, clock, &mut binder)
                    {
                        Output::Nothing => continue,
                        Output::ToClient(d) => {
                            sbatch.push(listeners, idx, d, from);
                            continue;
                        }
                        Output::ToPeer { relay, peer, data } => {
                            let len = data.len();
                            let Some(dst) = xbuf.get_mut(PEER_HEADROOM..PEER_HEADROOM + len) else {
                                continue;
                            };
                            dst.copy_from_slice(data);
                            (relay, peer, len)
                        }
                    };
                    let payload = PEER_HEADROOM..PEER_HEADROOM + len;
                    let local = if *handoff {
                        core.local_relay(relay, peer)
                    } else {
                        None
                    };
                    if let Some((to, from_addr)) = local {
                        // Both allocations live in this shard: hand the packet over
                        // directly; the receiving allocation's permissions apply.
                        if let Some((ft2, range)) =
                            core.handle_peer(to, from_addr, xbuf, payload, clock.now)
                        {
                            if let Some(bytes) = xbuf.get(range) {
                                ToClients { listeners, sbatch }.send(streams, epoll, &ft2, bytes);
                            }
                        }
                    } else if let (Some(s), Some(bytes)) = (
                        relays.get(relay).and_then(RelayEntry::udp),
                        xbuf.get(payload),
                    ) {
                        let _ = s.send_to(bytes, peer);
                    }
                }
            } else if token < RELAY_BASE {
                // A TCP or TLS listener.
                let i = (token - STREAM_LISTENER_BASE) as usize;
                if let Some((l, transport)) = stream_listeners.get(i) {
                    let tls = common.tls.load_full();
                    streams.accept(l, *transport, tls.as_ref(), epoll, clock.now);
                }
            } else if token >= GUEST_BASE {
                // Not this shard's (the host loop's own tokens).
            } else if token >= PEER_BASE {
                // An RFC 6062 peer connection.
                peers.on_event(token, ev.events(), epoll, core, streams, buf, clock.now);
            } else if token < STREAM_BASE {
                let handle = RelayHandle((token - RELAY_BASE) as u32);
                let Some(entry) = relays.get(handle) else {
                    continue;
                };
                let sock = match &entry.socket {
                    RelaySock::Udp(s) => s,
                    RelaySock::Tcp(l) => {
                        // A peer connecting to a TCP allocation's relayed address.
                        for _ in 0..16 {
                            let Ok((stream, from)) = l.accept() else {
                                break;
                            };
                            match core.tcp_incoming(handle, from, clock.now) {
                                Some(id) => peers.add(id, stream, None, epoll),
                                None => drop(stream),
                            }
                        }
                        continue;
                    }
                };
                // A relay socket: one datagram from a peer.
                let end = buf.len() - PEER_TAILROOM;
                let (len, from) = match sock.recv_from(&mut buf[PEER_HEADROOM..end]) {
                    Ok(r) => r,
                    Err(_) => continue,
                };
                let payload = PEER_HEADROOM..PEER_HEADROOM + len;
                if let Some((ft, range)) = core.handle_peer(handle, from, buf, payload, clock.now) {
                    if let Some(bytes) = buf.get(range) {
                        ToClients { listeners, sbatch }.send(streams, epoll, &ft, bytes);
                    }
                }
            } else if streams.owns(token) {
                // A client's TCP or TLS connection: complete frames go to the core; a
                // spliced RFC 6062 data connection's bytes go to its peer.
                let mut ctx = FrameCtx {
                    store: common.fd_store.as_ref(),
                    index: *index,
                    workers,
                    core: &mut *core,
                    peers: &mut *peers,
                    relays: &mut *relays,
                    ports,
                    epoll,
                    tag: *tag,
                    buffer,
                    clock,
                };
                let gone = streams.on_event(
                    token,
                    ev.events(),
                    epoll,
                    clock.now,
                    &mut |ft, frame, reply| ctx.frame(ft, frame, reply),
                );
                closed.extend(gone);
                for h in streams.take_handed_over() {
                    hand_over(common, *index, streams, h);
                }
            }
        }
    }

    /// Takes on the stream connections other shards handed over to this one.
    fn adopt_mail(&mut self, common: &Common, clock: Clock) {
        let workers = common.pool.inbox.len();
        for h in common.pool.take_mail(self.index) {
            let mut ctx = FrameCtx {
                store: common.fd_store.as_ref(),
                index: self.index,
                workers,
                core: &mut self.core,
                peers: &mut self.peers,
                relays: &mut self.relays,
                ports: &common.ports,
                epoll: &self.epoll,
                tag: self.tag,
                buffer: common.buffer,
                clock,
            };
            tracing::debug!(shard = self.index, client = %h.five_tuple().client, "stream connection handed over to this shard");
            let gone = self
                .streams
                .adopt(h, &self.epoll, clock.now, &mut |ft, frame, reply| {
                    ctx.frame(ft, frame, reply)
                });
            self.closed.extend(gone);
        }
        // Handed on again (a later ConnectionBind naming yet another shard).
        for h in self.streams.take_handed_over() {
            hand_over(common, self.index, &mut self.streams, h);
        }
    }

    /// Timers (once a tick), closed streams, the core's commands; `clock` is this
    /// iteration's reading.
    fn maintain(&mut self, common: &Common, s: &mut Scratch, clock: Clock) {
        let index = self.index;
        let sbatch = &mut s.sbatch;
        let now = Instant::now();
        if now >= self.next_tick {
            self.next_tick = now + TICK;
            common.metrics.flush(index, &mut self.core.counters);
            common.metrics.set_worker_streams(index, self.streams.len());
            self.closed.extend(self.streams.tick(now, &self.epoll));
            // Frozen for an upgrade or a restart, the state is the new process's: no
            // expiry, interim record or kill here, or both would act on it (the freeze
            // lasts milliseconds, or until this process exits).
            if self.frozen.is_none() {
                let mut binder = binder(&mut self.relays, &self.epoll, self.tag, common);
                self.core.handle_timeout(now, &mut binder);
            }
            self.relays.compact();
            let shared = self.core.shared().clone();
            if shared
                .publish_sessions
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                shared.set_sessions(index, self.core.sessions(now, clock.unix));
            }
        }
        if !self.closed.is_empty() {
            let mut binder = binder(&mut self.relays, &self.epoll, self.tag, common);
            for ft in self.closed.drain(..) {
                self.core.client_closed(&ft, now, &mut binder);
            }
        }
        // The process is stopping: the live allocations end here, so that their final
        // usage records (below) are written before it exits.
        let stop = !self.stopped && common.pool.stopping();
        if stop {
            let mut binder = binder(&mut self.relays, &self.epoll, self.tag, common);
            if self.frozen.is_some() {
                // Still frozen (an upgrade's Commit never reached this shard): its UDP
                // allocations may be the new process's; only its own streams end here.
                binder.store = None;
                self.core.close_streams(now, &mut binder);
            } else {
                self.core.close_all(now, &mut binder);
            }
        }
        // What the core asked for outside its answers (RFC 6062 connections).
        while let Some(cmd) = self.core.poll_command() {
            match cmd {
                Command::ConnectPeer { id, relay, peer } => {
                    let started = self
                        .relays
                        .get(relay)
                        .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
                        .and_then(|e| socket::tcp_connect_from(e.addr, peer));
                    match started {
                        Ok(stream) => self.peers.add(id, stream, Some(now), &self.epoll),
                        Err(_) => self.core.tcp_connected(id, false, now),
                    }
                }
                Command::Splice { id, data } => self.peers.splice(id, data, &self.epoll),
                Command::ClosePeer { id } => self.peers.remove(id, &self.epoll),
                Command::CloseClient { ft } => {
                    self.streams.close(&ft, &self.epoll);
                }
                Command::ToClient { ft, bytes } => {
                    ToClients {
                        listeners: &self.listeners,
                        sbatch,
                    }
                    .send(&mut self.streams, &self.epoll, &ft, &bytes);
                }
            }
        }
        if now >= self.peer_check {
            self.peer_check = now + TICK;
            self.peers
                .expire_connecting(now, &self.epoll, &mut self.core);
        }
        // The kernel fast path's entries for this shard's allocations (only ever queued
        // while it is loaded), before the usage records that read their last counts.
        if let Some(h) = &mut self.hold {
            let until = *h.until.get_or_insert(now + HOLD_MAX);
            let (listeners, relays) = (&self.listeners, &self.relays);
            h.listeners
                .retain(|&i| listeners.get(i).is_some_and(|(_, s)| queued(s)));
            h.relays
                .retain(|&r| relays.get(r).and_then(RelayEntry::udp).is_some_and(queued));
            if (h.listeners.is_empty() && h.relays.is_empty()) || now >= until {
                self.hold = None;
            }
        }
        if let (Some(k), None) = (&common.fast_path, &self.hold) {
            let mut cmds = self.core.drain_fast_path().peekable();
            if cmds.peek().is_some() {
                let mut k = k.lock().unwrap_or_else(|e| e.into_inner());
                for cmd in cmds {
                    k.apply(&cmd, &common.metrics);
                }
            }
        }
        let events: Vec<Event> = self.core.drain_events().collect();
        // Interim usage records add what the kernel relayed for their allocations since
        // the last record (one read of their counters for all of them)...
        let mut interim = Vec::new();
        if let Some(k) = &common.fast_path {
            let ids: Vec<u64> = events
                .iter()
                .filter_map(|ev| match ev {
                    Event::AllocationUsage { id, .. } => Some(*id),
                    _ => None,
                })
                .collect();
            if !ids.is_empty() {
                interim = k
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .usage_since_last_read(&ids, &common.metrics);
            }
        }
        let mut interim = interim.into_iter();
        for ev in &events {
            // ... and the final one the rest of it.
            let kernel = match (ev, &common.fast_path) {
                (Event::AllocationEnded { id, .. }, Some(k)) => {
                    k.lock().unwrap_or_else(|e| e.into_inner()).take_usage(*id)
                }
                (Event::AllocationUsage { .. }, Some(_)) => interim.next(),
                _ => None,
            };
            log_event(index, ev, kernel);
        }
        if stop {
            self.stopped = true;
            common.pool.stopped.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// One pass: handle `events`, then the rest; counts the time as this shard's load.
    /// Datagrams for clients stay in the send batch; the caller flushes it. Listener `i`
    /// of every shard is bound to the same address, so one flush through any shard's
    /// listeners sends what several shards queued (one `sendmmsg` per wake-up, gathered
    /// or not).
    fn run_once(&mut self, common: &Common, s: &mut Scratch, events: &[EpollEvent]) {
        let clock = clock();
        self.streams.new_pass();
        self.process(common, s, events, clock);
        if common.pool.has_mail(self.index) {
            self.adopt_mail(common, clock);
        }
        self.maintain(common, s, clock);
        if common.pool.upgrade_pending(self.upgrade_seen) {
            self.upgrade_step(common, clock);
        }
        self.core
            .counters
            .busy(Instant::now().saturating_duration_since(clock.now));
    }
}

/// What the frames of a shard's stream connections reach: its core, its RFC 6062 peer
/// connections and its relay sockets.
struct FrameCtx<'a> {
    index: usize,
    workers: usize,
    core: &'a mut Server,
    peers: &'a mut PeerConns,
    relays: &'a mut Relays,
    ports: &'a PortPool,
    epoll: &'a Epoll,
    tag: u64,
    buffer: usize,
    clock: Clock,
    store: Option<&'a super::fdstore::FdStore>,
}

impl FrameCtx<'_> {
    /// One frame (or, on a spliced RFC 6062 data connection, a chunk of bytes) from
    /// client connection `ft`. A ConnectionBind naming a CONNECTION-ID of another shard,
    /// or an Allocate naming a RESERVATION-TOKEN of another shard, on a connection
    /// without an allocation here, is not taken: the connection goes to that shard, which
    /// holds the peer connection and allocation, or the reserved relay socket.
    fn frame(&mut self, ft: FiveTuple, frame: &[u8], reply: &mut Vec<u8>) -> After {
        if let Some(id) = self.core.data_connection(&ft) {
            self.peers.write(id, frame, self.epoll);
            return After::Raw;
        }
        // Only a connection without an allocation here may move (checked first: most
        // frames are on connections with one, and need no parse for this).
        if self.core.allocation_by_five_tuple(&ft).is_none() {
            if let Some(owner) = owner_shard(frame) {
                if owner != self.index && owner < self.workers {
                    return After::HandOver;
                }
            }
        }
        let mut binder = Binder {
            relays: self.relays,
            ports: self.ports,
            epoll: self.epoll,
            tag: self.tag,
            buffer: self.buffer,
            store: self.store,
        };
        match self.core.handle_client(ft, frame, self.clock, &mut binder) {
            Output::Nothing => {}
            Output::ToClient(d) => reply.extend_from_slice(d),
            Output::ToPeer { relay, peer, data } => {
                if let Some(s) = self.relays.get(relay).and_then(RelayEntry::udp) {
                    let _ = s.send_to(data, peer);
                }
            }
        }
        // A successful ConnectionBind: what follows is application data.
        if self.core.data_connection(&ft).is_some() {
            After::Raw
        } else {
            After::Next
        }
    }
}

/// Sends a connection that shard `from`'s frame callback handed over to the shard its
/// ConnectionBind or Allocate with a RESERVATION-TOKEN (the first unread frame) names;
/// closes it if there is none.
fn hand_over(common: &Common, from: usize, streams: &mut Streams, h: HandedOver) {
    let unread = h.unread();
    let owner = unread
        .get(2..4)
        .map(|l| 20 + usize::from(u16::from_be_bytes([l[0], l[1]])))
        .and_then(|n| unread.get(..n))
        .and_then(owner_shard);
    let client = h.five_tuple().client;
    let Some(to) = owner else {
        streams.drop_handed_over(h);
        return;
    };
    tracing::debug!(from, to, %client, "stream connection handed over to the shard that holds what it names");
    common.metrics.stream_handed_over();
    if let Err(h) = common.pool.deliver(to, h) {
        streams.drop_handed_over(h);
    }
}

/// epoll timeout until `deadline` (at least 1 ms, at most about a second).
fn timeout_until(deadline: Instant) -> EpollTimeout {
    let wait = deadline.saturating_duration_since(Instant::now());
    EpollTimeout::from(wait.as_millis().min(1000) as u16 + 1)
}

fn wait(epoll: &Epoll, events: &mut [EpollEvent], timeout: EpollTimeout) -> io::Result<usize> {
    match epoll.wait(events, timeout) {
        Ok(n) => Ok(n),
        Err(nix::errno::Errno::EINTR) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// Threads 1..N: serve the own shard; hand it to thread 0 when the pool gathers, and
/// sleep until it comes back.
fn home_loop(common: &Common, shard: Shard) -> io::Result<()> {
    let pool = &common.pool;
    let index = shard.index;
    let mut s = Scratch::new();
    let mut shard = Some(shard);
    let mut publish = Instant::now();
    loop {
        let Some(mut sh) = shard.take() else {
            // Parked: wait for the shard to come home.
            let _ = pool.wake.get(index).map(EventFd::read);
            shard = pool
                .home
                .get(index)
                .and_then(|m| m.lock().unwrap_or_else(|e| e.into_inner()).take());
            continue;
        };
        if let Some(fd) = pool.wake.get(index) {
            sh.own
                .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, WAKE_TOKEN))?;
        }
        // Serve until the pool gathers.
        while !pool.gathered() {
            let n = wait(&sh.own, &mut s.events, timeout_until(sh.next_tick))?;
            let start = Instant::now();
            let events = std::mem::take(&mut s.events);
            let woken = events
                .get(..n)
                .is_some_and(|e| e.iter().any(|e| e.data() == WAKE_TOKEN));
            sh.run_once(common, &mut s, events.get(..n).unwrap_or_default());
            s.sbatch.flush(&sh.listeners);
            s.events = events;
            if start >= publish {
                publish = start + TICK / 4;
                if let Some(b) = pool.busy_ns.get(index) {
                    b.0.store(thread_cpu_ns(), Ordering::Relaxed);
                }
            }
            if woken {
                if let Some(fd) = pool.wake.get(index) {
                    let _ = fd.read();
                }
            }
        }
        if let Some(fd) = pool.wake.get(index) {
            let _ = sh.own.delete(fd);
        }
        pool.to_host
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(sh);
        pool.signal(0);
    }
}

/// Thread 0: serves shard 0 (which never moves) and, while the pool is gathered, the
/// other shards as guests; decides when to gather and when to spread.
fn host_loop(common: &Common, mut home: Shard) -> io::Result<()> {
    let pool = &common.pool;
    let mut s = Scratch::new();
    let mut guests: Vec<Shard> = Vec::new();
    s.guest_events = (0..pool.wake.len())
        .map(|_| Vec::with_capacity(EVENTS))
        .collect();
    if let Some(fd) = pool.wake.first() {
        home.epoll
            .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, WAKE_TOKEN))?;
    }
    let mut balance = Balance::new(pool);
    loop {
        let deadline = guests
            .iter()
            .map(|g| g.next_tick)
            .fold(home.next_tick.min(balance.next), Instant::min);
        let n = wait(&home.epoll, &mut s.events, timeout_until(deadline))?;
        let start = Instant::now();
        let events = std::mem::take(&mut s.events);
        let ready = events.get(..n).unwrap_or_default();
        let woken = ready.iter().any(|ev| ev.data() == WAKE_TOKEN);
        if !guests.is_empty() {
            // One pass over the ready list sorts the guests' events (tagged tokens, which
            // the home shard skips) by shard, untagged; then each guest serves its own.
            let mut gev = std::mem::take(&mut s.guest_events);
            for ev in ready {
                let data = ev.data();
                if data == WAKE_TOKEN || data < GUEST_BASE {
                    continue;
                }
                let k = usize::try_from((data >> TAG_SHIFT) - 1).unwrap_or(usize::MAX);
                if let Some(list) = gev.get_mut(k) {
                    list.push(EpollEvent::new(ev.events(), data & UNTAG));
                }
            }
            for g in guests.iter_mut() {
                if let Some(list) = gev.get_mut(g.index) {
                    if !list.is_empty() {
                        g.run_once(common, &mut s, list);
                        list.clear();
                    }
                }
            }
            s.guest_events = gev;
        }
        home.run_once(common, &mut s, ready);
        s.events = events;
        // Guests' timers run even when they had no traffic, and their hand-overs.
        let now = Instant::now();
        for g in guests.iter_mut().filter(|g| {
            now >= g.next_tick
                || (pool.stopping() && !g.stopped)
                || pool.has_mail(g.index)
                || pool.upgrade_pending(g.upgrade_seen)
        }) {
            g.run_once(common, &mut s, &[]);
        }
        s.sbatch.flush(&home.listeners);
        if woken {
            if let Some(fd) = pool.wake.first() {
                let _ = fd.read();
            }
            let arrived =
                std::mem::take(&mut *pool.to_host.lock().unwrap_or_else(|e| e.into_inner()));
            for mut g in arrived {
                if pool.gathered() {
                    let tag = guest_tag(g.index);
                    g.register_in(home.epoll.clone(), tag);
                    guests.push(g);
                } else {
                    send_home(pool, g);
                }
            }
        }
        let now = Instant::now();
        balance.busy += now.saturating_duration_since(start);
        match balance.decide(pool, now, &mut s) {
            Move::Stay => {}
            Move::Gather => {
                tracing::debug!("worker shards gather on one thread");
                pool.gathered.store(true, Ordering::Release);
                for k in 1..pool.wake.len() {
                    pool.signal(k);
                }
            }
            Move::Spread => {
                tracing::debug!("worker shards spread over their threads");
                pool.gathered.store(false, Ordering::Release);
                for mut g in guests.drain(..) {
                    let own = g.own.clone();
                    g.register_in(own, 0);
                    send_home(pool, g);
                }
            }
        }
    }
}

enum Move {
    Stay,
    Gather,
    Spread,
}

/// Thread 0's gather / spread decisions. Spreading must be quick (a gathered thread that
/// falls behind drops packets once the socket buffers fill), so thread 0's wall-clock
/// busy fraction is checked every [`Balance::CHECK`]: wall clock, not CPU time, because a
/// thread that is runnable but waiting for a core is just as far behind. Gathering can
/// wait: the CPU time of all threads is summed once a second.
struct Balance {
    next: Instant,
    /// Thread 0's time outside `epoll_wait` since `check_start`.
    busy: Duration,
    check_start: Instant,
    second_start: Instant,
    next_second: Instant,
    cpu_last: Vec<u64>,
    quiet: u32,
    /// Thread 0's CPU time at the last check.
    check_cpu: u64,
    /// Checks in a row in which thread 0 was busy more than [`SATURATED`].
    saturated_checks: u32,
    /// Thread 0's CPU fraction in the last three checks.
    recent_cpu: [f64; 3],
}

impl Balance {
    const CHECK: Duration = Duration::from_millis(50);

    fn new(pool: &Pool) -> Balance {
        let now = Instant::now();
        Balance {
            next: now + pool.flip_every.unwrap_or(Self::CHECK),
            busy: Duration::ZERO,
            check_start: now,
            second_start: now,
            next_second: now + TICK,
            cpu_last: vec![0; pool.wake.len()],
            quiet: 0,
            check_cpu: thread_cpu_ns(),
            saturated_checks: 0,
            recent_cpu: [0.0; 3],
        }
    }

    fn decide(&mut self, pool: &Pool, now: Instant, s: &mut Scratch) -> Move {
        if now < self.next {
            return Move::Stay;
        }
        let (reads, full_reads) = (s.reads, s.full_reads);
        s.reads = 0;
        s.full_reads = 0;
        let gathered = pool.gathered();
        if let Some(every) = pool.flip_every {
            // Testing aid: alternate whatever the load.
            self.next = now + every;
            return if gathered { Move::Spread } else { Move::Gather };
        }
        self.next = now + Self::CHECK;
        if !pool.adaptive || pool.upgrade.active.load(Ordering::Acquire) {
            return Move::Stay;
        }
        let span = now.duration_since(self.check_start).as_secs_f64().max(1e-3);
        let busy = self.busy.as_secs_f64() / span;
        let cpu_now = thread_cpu_ns();
        let cpu = cpu_now.saturating_sub(self.check_cpu) as f64 / 1e9 / span;
        self.check_cpu = cpu_now;
        self.busy = Duration::ZERO;
        self.check_start = now;
        self.saturated_checks = if busy > SATURATED {
            self.saturated_checks + 1
        } else {
            0
        };
        self.recent_cpu = [self.recent_cpu[1], self.recent_cpu[2], cpu];
        let cpu_average = self.recent_cpu.iter().sum::<f64>() / 3.0;
        let saturated = self.saturated_checks >= SATURATED_CHECKS;
        let behind = full_reads >= BEHIND_READS && full_reads * 2 >= reads;
        if gathered && (behind || saturated || cpu_average > SPREAD_ABOVE) {
            tracing::debug!(busy, cpu = cpu_average, full_reads, reads, "heavy load");
            self.quiet = 0;
            self.saturated_checks = 0;
            self.recent_cpu = [0.0; 3];
            return Move::Spread;
        }
        if now < self.next_second {
            return Move::Stay;
        }
        let secs = now
            .duration_since(self.second_start)
            .as_secs_f64()
            .max(1e-3);
        self.second_start = now;
        self.next_second = now + TICK;
        let mut total = 0.0;
        for (k, last) in self.cpu_last.iter_mut().enumerate() {
            let cpu = if k == 0 {
                thread_cpu_ns()
            } else {
                pool.busy_ns
                    .get(k)
                    .map_or(0, |b| b.0.load(Ordering::Relaxed))
            };
            total += cpu.saturating_sub(*last) as f64 / 1e9 / secs;
            *last = cpu;
        }
        self.quiet = if total < GATHER_BELOW {
            self.quiet + 1
        } else {
            0
        };
        if !gathered && self.quiet >= GATHER_AFTER {
            tracing::debug!(cpu = total, "light load");
            return Move::Gather;
        }
        Move::Stay
    }
}

fn send_home(pool: &Pool, shard: Shard) {
    let k = shard.index;
    if let Some(slot) = pool.home.get(k) {
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(shard);
        pool.signal(k);
    }
}

/// One RFC 6062 peer connection.
struct PeerConn {
    id: u32,
    stream: TcpStream,
    /// Its epoll token (with the shard's tag).
    token: u64,
    /// Set while the outgoing connection is being established.
    connecting: Option<Instant>,
    /// The client's data connection, once bound.
    data: Option<FiveTuple>,
    /// Bytes from the client not yet taken by the peer's socket.
    wbuf: Vec<u8>,
    interest: EpollFlags,
}

/// The RFC 6062 peer connections of one worker; connection `slot` is epoll token
/// `tag + PEER_BASE + slot`.
#[derive(Default)]
struct PeerConns {
    /// The shard's token tag (see [`guest_tag`]).
    tag: u64,
    slots: Vec<Option<PeerConn>>,
    free: Vec<usize>,
    by_id: HashMap<u32, usize>,
}

impl PeerConns {
    fn add(&mut self, id: u32, stream: TcpStream, connecting: Option<Instant>, epoll: &Epoll) {
        let _ = stream.set_nonblocking(true);
        let _ = stream.set_nodelay(true);
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        // Connecting: wait for writability. Accepted: nothing until bound.
        let interest = if connecting.is_some() {
            EpollFlags::EPOLLOUT
        } else {
            EpollFlags::empty()
        };
        let token = self.tag + PEER_BASE + slot as u64;
        if epoll
            .add(&stream, EpollEvent::new(interest, token))
            .is_err()
        {
            self.free.push(slot);
            return;
        }
        self.slots[slot] = Some(PeerConn {
            id,
            stream,
            token,
            connecting,
            data: None,
            wbuf: Vec::new(),
            interest,
        });
        self.by_id.insert(id, slot);
    }

    /// Moves every connection from `from` to `to` under token tag `tag`, keeping each
    /// one's interest.
    fn move_to(&mut self, from: &Epoll, to: &Epoll, tag: u64) {
        self.tag = tag;
        for (slot, conn) in self.slots.iter_mut().enumerate() {
            let Some(conn) = conn else {
                continue;
            };
            let _ = from.delete(&conn.stream);
            conn.token = tag + PEER_BASE + slot as u64;
            if let Err(e) = to.add(&conn.stream, EpollEvent::new(conn.interest, conn.token)) {
                tracing::error!(error = %e, "cannot move a peer connection between epoll sets");
                // It gets no more events: end it (the peer sees the close); the core's
                // entry goes with its allocation.
                let _ = conn.stream.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    fn set_interest(conn: &mut PeerConn, _slot: usize, epoll: &Epoll) {
        let mut want = EpollFlags::empty();
        if conn.data.is_some() {
            want |= EpollFlags::EPOLLIN;
        }
        if conn.connecting.is_some() || !conn.wbuf.is_empty() {
            want |= EpollFlags::EPOLLOUT;
        }
        if want != conn.interest {
            let mut ev = EpollEvent::new(want, conn.token);
            if epoll.modify(&conn.stream, &mut ev).is_ok() {
                conn.interest = want;
            }
        }
    }

    fn splice(&mut self, id: u32, data: FiveTuple, epoll: &Epoll) {
        let Some(&slot) = self.by_id.get(&id) else {
            return;
        };
        if let Some(Some(conn)) = self.slots.get_mut(slot) {
            conn.data = Some(data);
            Self::set_interest(conn, slot, epoll);
        }
    }

    fn remove(&mut self, id: u32, epoll: &Epoll) {
        if let Some(slot) = self.by_id.remove(&id) {
            if let Some(conn) = self.slots.get_mut(slot).and_then(Option::take) {
                let _ = epoll.delete(&conn.stream);
                self.free.push(slot);
            }
        }
    }

    /// Bytes from the client's data connection toward the peer.
    fn write(&mut self, id: u32, bytes: &[u8], epoll: &Epoll) {
        let Some(&slot) = self.by_id.get(&id) else {
            return;
        };
        let Some(Some(conn)) = self.slots.get_mut(slot) else {
            return;
        };
        let mut done = 0;
        if conn.wbuf.is_empty() {
            while done < bytes.len() {
                match conn.stream.write(&bytes[done..]) {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
        }
        if done < bytes.len() {
            if conn.wbuf.len() + bytes.len() - done > MAX_PEER_BUFFER {
                // The peer does not keep up: shut the connection; its read side then
                // reports the close.
                let _ = conn.stream.shutdown(std::net::Shutdown::Both);
                return;
            }
            conn.wbuf.extend_from_slice(&bytes[done..]);
        }
        Self::set_interest(conn, slot, epoll);
    }

    #[allow(clippy::too_many_arguments)]
    fn on_event(
        &mut self,
        token: u64,
        flags: EpollFlags,
        epoll: &Epoll,
        core: &mut Server,
        streams: &mut Streams,
        buf: &mut [u8],
        now: Instant,
    ) {
        let slot = (token - PEER_BASE) as usize;
        let Some(Some(conn)) = self.slots.get_mut(slot) else {
            return;
        };
        let id = conn.id;
        if conn.connecting.is_some() {
            let ok =
                matches!(conn.stream.take_error(), Ok(None)) && conn.stream.peer_addr().is_ok();
            if !ok
                && !flags
                    .intersects(EpollFlags::EPOLLERR | EpollFlags::EPOLLHUP | EpollFlags::EPOLLOUT)
            {
                return;
            }
            if ok {
                conn.connecting = None;
                Self::set_interest(conn, slot, epoll);
                core.tcp_connected(id, true, now);
            } else {
                self.remove(id, epoll);
                core.tcp_connected(id, false, now);
            }
            return;
        }
        let mut gone = false;
        if flags.contains(EpollFlags::EPOLLOUT) && !conn.wbuf.is_empty() {
            match conn.stream.write(&conn.wbuf) {
                Ok(n) => {
                    conn.wbuf.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => gone = true,
            }
        }
        if let Some(data) = conn.data {
            if !gone
                && flags
                    .intersects(EpollFlags::EPOLLIN | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR)
            {
                match conn.stream.read(buf) {
                    Ok(0) => gone = true,
                    Ok(n) => {
                        if !streams.send(&data, &buf[..n], epoll) {
                            gone = true;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => gone = true,
                }
            }
        } else if flags.intersects(EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR) {
            gone = true;
        }
        if gone {
            self.remove(id, epoll);
            core.tcp_closed(id);
        } else if let Some(Some(conn)) = self.slots.get_mut(slot) {
            Self::set_interest(conn, slot, epoll);
        }
    }

    /// Outgoing connections that did not complete in time fail (447).
    fn expire_connecting(&mut self, now: Instant, epoll: &Epoll, core: &mut Server) {
        let late: Vec<u32> = self
            .slots
            .iter()
            .flatten()
            .filter(|c| {
                c.connecting
                    .is_some_and(|t| now.saturating_duration_since(t) >= CONNECT_TIMEOUT)
            })
            .map(|c| c.id)
            .collect();
        for id in late {
            self.remove(id, epoll);
            core.tcp_connected(id, false, now);
        }
    }
}

/// Allocation events are logged inside a span `allocation{id, client, server,
/// transport, user}`; the usage records billing consumes are the end record
/// (`kind="final"`) and, with `[log] usage_interval`, the interim ones
/// (`kind="interim"`), each with what was relayed since the allocation's previous
/// record, so that an allocation's records add up to its totals.
/// `kernel`: what the kernel fast path relayed for the allocation in the same span
/// (packets and bytes to the peer, then to the client), included in the counts and shown
/// apart as `kernel_*`.
/// One usage record's fields, as [`log_event`] writes both kinds.
struct UsageRecord<'a> {
    worker: usize,
    id: u64,
    five_tuple: &'a FiveTuple,
    relay: &'a std::net::SocketAddr,
    username: &'a str,
    duration: Duration,
    usage: &'a crate::server::Usage,
}

impl UsageRecord<'_> {
    /// Logs the record: the final one ("allocation ended", `kind="final"`) with the end
    /// `reason`, an interim one ("allocation usage", `kind="interim"`) without.
    fn log(&self, kernel: Option<[u64; 4]>, reason: Option<&str>) {
        let [kp, kb, kcp, kcb] = kernel.unwrap_or_default();
        let (kind, message) = match reason {
            Some(_) => ("final", "allocation ended"),
            None => ("interim", "allocation usage"),
        };
        let (ft, u) = (self.five_tuple, self.usage);
        tracing::info!(
            worker = self.worker,
            allocation = self.id,
            client = %ft.client,
            server = %ft.server,
            transport = ft.transport.as_str(),
            relay = %self.relay,
            user = %self.username,
            duration_ms = self.duration.as_millis() as u64,
            packets_to_peer = u.packets_to_peer + kp,
            bytes_to_peer = u.bytes_to_peer + kb,
            packets_to_client = u.packets_to_client + kcp,
            bytes_to_client = u.bytes_to_client + kcb,
            kernel_packets_to_peer = kp,
            kernel_bytes_to_peer = kb,
            kernel_packets_to_client = kcp,
            kernel_bytes_to_client = kcb,
            reason,
            kind,
            "{message}"
        )
    }
}

fn log_event(worker: usize, ev: &Event, kernel: Option<[u64; 4]>) {
    let span = |id: u64, ft: &FiveTuple, user: &str| {
        tracing::info_span!(
            "allocation",
            id,
            client = %ft.client,
            server = %ft.server,
            transport = ft.transport.as_str(),
            user = %user
        )
    };
    // A final record (with the reason it ended) or an interim one, in its span.
    let record = |r: UsageRecord<'_>, reason: Option<&str>| {
        span(r.id, r.five_tuple, r.username).in_scope(|| r.log(kernel, reason))
    };
    match ev {
        Event::AllocationCreated {
            id,
            five_tuple,
            relay,
            username,
        } => span(*id, five_tuple, username).in_scope(|| {
            tracing::info!(
                worker,
                allocation = id,
                client = %five_tuple.client,
                server = %five_tuple.server,
                transport = five_tuple.transport.as_str(),
                %relay,
                user = %username,
                "allocation created"
            )
        }),
        Event::AllocationEnded {
            id,
            five_tuple,
            relay,
            username,
            duration,
            usage,
            reason,
        } => record(
            UsageRecord {
                worker,
                id: *id,
                five_tuple,
                relay,
                username,
                duration: *duration,
                usage,
            },
            Some(reason.as_str()),
        ),
        Event::AllocationUsage {
            id,
            five_tuple,
            relay,
            username,
            duration,
            usage,
        } => record(
            UsageRecord {
                worker,
                id: *id,
                five_tuple,
                relay,
                username,
                duration: *duration,
                usage,
            },
            None,
        ),
        Event::ErrorResponse { method, code } => {
            tracing::debug!(worker, method, code, "error response")
        }
    }
}
