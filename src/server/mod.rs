//! The sans-I/O STUN/TURN server core (RFC 8489, RFC 8656).
//!
//! One `Server` per worker. It owns the allocations whose client traffic reaches that
//! worker, takes a datagram plus the 5-tuple it came on and the current time, and says
//! what to send where. It never touches a socket or reads a clock: relay sockets are
//! bound through the [`RelayBinder`] the shell passes in, and time comes in as a [`Clock`].

mod allocation;
mod fastpath;
mod shard;
mod shared;
mod snapshot;
mod tcp;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use foldhash::fast::RandomState;

pub use allocation::{
    Allocation, Relayed, Usage, CHANNEL_COOLDOWN, CHANNEL_LIFETIME, CHANNEL_MAX, CHANNEL_MIN,
    PERMISSION_LIFETIME,
};
pub use fastpath::{
    ChannelEntry, ClientChannelKey, ClientPermissionKey, FastPathCommand, PermissionEntry,
    RelayPeerKey, RelayPermissionKey,
};
pub use shard::{owner_shard, reservation_shard};
pub use shared::{
    Limits, NodeLoad, QuotaError, RelayAddrs, Runtime, SessionInfo, Shared, StoreView,
};
pub use snapshot::{MonoClock, ShardState};
pub use tcp::{connection_shard, Command, CONNECTION_BIND_TIMEOUT};

use crate::auth::{Key, LookupError, NonceCheck};
use crate::counters::{AuthFailure, Direction, DropReason, RelayPath, WorkerCounters};
pub use crate::counters::{EndReason, Transport};
use crate::proto::{self, attr, method, Class, Message, MessageWriter, TransactionId};
use allocation::BindCheck;

/// The client side of an allocation: transport, client address, server address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FiveTuple {
    pub transport: Transport,
    pub client: SocketAddr,
    pub server: SocketAddr,
}

/// A relay socket, as numbered by the shell that owns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelayHandle(pub u32);

/// The time, passed in: a monotonic instant for every timer, and wall-clock Unix seconds
/// for what must survive a restart (nonces, TURN REST usernames).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub now: Instant,
    pub unix: u64,
}

/// What the shell must do after the core handled a client datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Output<'a> {
    Nothing,
    /// Send these bytes back to the client on the 5-tuple it came on.
    ToClient(&'a [u8]),
    /// Send `data` from relay socket `relay` to `peer`.
    ToPeer {
        relay: RelayHandle,
        peer: SocketAddr,
        data: &'a [u8],
    },
}

/// Why the shell could not bind a relay socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindError {
    /// No free port in the range (508).
    Exhausted,
    /// The family has no relay address (440).
    NoAddress,
}

/// A bound relay socket: its handle and address.
pub type BoundRelay = (RelayHandle, SocketAddr);
/// What [`RelayBinder::bind`] returns: the relay, and the reserved next port if asked.
pub type BindResult = Result<(RelayHandle, SocketAddr, Option<BoundRelay>), BindError>;

/// Relay sockets are I/O: the shell binds them when the core asks.
pub trait RelayBinder {
    /// Binds a relay socket on `ip` (port from the relay range; even if `even_port`;
    /// if `reserve_next`, also binds and holds port+1, returned as the second element).
    fn bind(&mut self, ip: IpAddr, even_port: bool, reserve_next: bool) -> BindResult;
    /// Binds a listening TCP relay socket on `ip` for an RFC 6062 TCP allocation.
    fn bind_tcp(&mut self, ip: IpAddr) -> Result<BoundRelay, BindError> {
        let _ = ip;
        Err(BindError::NoAddress)
    }
    /// Closes a relay socket.
    fn release(&mut self, relay: RelayHandle);
}

/// Bytes the shell must leave free in front of a peer datagram so the core can write a
/// ChannelData (4) or Data indication header (20 + 24 + 4 for IPv6) in place.
pub const PEER_HEADROOM: usize = 48;
/// Bytes the shell must leave free after a peer datagram (padding to 4).
pub const PEER_TAILROOM: usize = 4;

/// RFC 8656 section 14.9 (EVEN-PORT R bit): a reserved port is held for 30 seconds.
pub const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);
/// How many recently deleted allocations remember their last answer (retransmitted
/// Refresh with LIFETIME 0).
const RECENT_DELETES: usize = 256;
/// Largest remembered answer (a Refresh success with both integrity attributes, SOFTWARE
/// and FINGERPRINT is about 120 bytes); a longer one is not remembered.
const RECENT_DELETE_LEN: usize = 192;

/// The answer to a deleting Refresh, kept inline: the ring of these is allocated once, so
/// a wave of deletions leaves no small heap objects behind that would pin freed memory
/// (glibc can return an arena's free pages only below its highest live object).
struct RecentDelete {
    ft: FiveTuple,
    tid: TransactionId,
    len: u8,
    bytes: [u8; RECENT_DELETE_LEN],
}
/// Protocol numbers in REQUESTED-TRANSPORT (RFC 8656 section 14.7).
const PROTO_UDP: u8 = 17;
const PROTO_TCP: u8 = 6;
const NO_SLOT: u32 = u32::MAX;
/// At most this many interim usage records per [`Server::handle_timeout`]: allocations
/// made together (a restart, a mass reconnect) come due together, and the shell logs
/// each record on the worker; the rest come due again at the next call, their counts
/// still exact (each record holds what was relayed since the allocation's previous one).
pub const MAX_INTERIM_RECORDS_PER_TICK: usize = 1024;
/// Room for this many fast-path commands is made once when the fast path is on, so a
/// tick's worth of commands is usually queued without growing the queue.
const FAST_PATH_CAPACITY: usize = 256;

struct Reservation {
    token: [u8; 8],
    relay: RelayHandle,
    addr: SocketAddr,
    expires: Instant,
}

/// Events the shell may want to log or count; drained with [`Server::drain_events`].
#[derive(Debug, Clone)]
pub enum Event {
    AllocationCreated {
        id: u64,
        five_tuple: FiveTuple,
        relay: SocketAddr,
        username: String,
    },
    /// The final usage record: `usage` is what the allocation relayed since its last
    /// [`Event::AllocationUsage`] (all of it when there was none).
    AllocationEnded {
        id: u64,
        five_tuple: FiveTuple,
        relay: SocketAddr,
        username: String,
        duration: Duration,
        usage: Usage,
        reason: EndReason,
    },
    /// An interim usage record (`Runtime::usage_interval`, from [`Server::handle_timeout`]):
    /// `usage` is what the running allocation relayed since its previous record, so the
    /// interim records and the final one add up to its totals; `duration` is its age.
    AllocationUsage {
        id: u64,
        five_tuple: FiveTuple,
        relay: SocketAddr,
        username: String,
        duration: Duration,
        usage: Usage,
    },
    /// A request was answered with an error code.
    ErrorResponse { method: u16, code: u16 },
}

/// The per-worker TURN server state machine.
pub struct Server {
    shared: Arc<Shared>,
    allocations: Vec<Option<Allocation>>,
    free_slots: Vec<usize>,
    by_five_tuple: HashMap<FiveTuple, usize, RandomState>,
    /// Relay handle by relayed transport address (bound and advertised), for handing
    /// packets between two allocations of this worker without the kernel.
    by_relay_addr: HashMap<SocketAddr, RelayHandle, RandomState>,
    /// Allocation slot by relay handle (handles are small, dense numbers chosen by the
    /// shell); `NO_SLOT` where none.
    by_relay: Vec<u32>,
    reservations: Vec<Reservation>,
    recent_deletes: Vec<RecentDelete>,
    recent_next: usize,
    out: Vec<u8>,
    events: Vec<Event>,
    collect_events: bool,
    /// RFC 6062 peer connections by CONNECTION-ID.
    tcp_conns: HashMap<u32, tcp::TcpConn, RandomState>,
    next_conn_id: u32,
    /// This core's shard index, carried in the CONNECTION-IDs it hands out
    /// ([`connection_shard`]) so that the shell can route a ConnectionBind to it.
    shard: u32,
    /// Client data connections spliced to a peer connection.
    data_conns: HashMap<FiveTuple, u32, RandomState>,
    commands: Vec<Command>,
    /// Kernel fast-path commands for the shell ([`Server::drain_fast_path`]); only ever
    /// pushed to while `fast_path_on`.
    fast_path: Vec<FastPathCommand>,
    /// The fast path as of the last tick (or creation): [`Server::fast_path_wanted`].
    fast_path_on: bool,
    /// The time of the message being handled.
    last_now: Instant,
    /// The last kill entry this worker acted on.
    kill_seen: u64,
    /// The runtime as of the last tick: when a reload replaces it, allocations of users
    /// it no longer has keys for end ([`Server::handle_timeout`]).
    runtime_seen: Arc<Runtime>,
    /// Metrics counted by this worker, flushed by the shell once a second.
    pub counters: WorkerCounters,
    /// Limits copied from the runtime once a second (read on the relay path).
    hot: HotLimits,
    /// This worker's share of `[limits] max_total_bandwidth`.
    total_bucket: TokenBucket,
}

/// The limits the relay path reads, refreshed from the runtime every tick.
#[derive(Debug, Clone, Copy, Default)]
struct HotLimits {
    per_allocation: u64,
    total_per_worker: u64,
}

/// A byte token bucket holding up to one second of its rate.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: u64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(now: Instant) -> TokenBucket {
        // Starts full: one second's worth once the rate is known.
        TokenBucket {
            tokens: u64::MAX,
            last: now,
        }
    }

    /// Takes `n` bytes at `rate` bytes/s (0: unlimited); false if not enough are left.
    #[inline]
    pub fn take(&mut self, n: usize, rate: u64, now: Instant) -> bool {
        if rate == 0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last);
        if elapsed.as_micros() > 0 {
            let add = (rate as u128 * elapsed.as_micros() / 1_000_000) as u64;
            if add > 0 {
                self.tokens = self.tokens.saturating_add(add);
                self.last = now;
            }
        }
        self.tokens = self.tokens.min(rate);
        let n = n as u64;
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// Answers to unauthenticated requests, limited per source IP so the server cannot be
/// used as a reflector: a fixed table (no growth with the number of sources) of token
/// buckets, one per hash slot.
pub(crate) struct UnauthLimiter {
    slots: Box<[(Option<IpAddr>, u32, Instant)]>,
    hasher: RandomState,
}

const UNAUTH_SLOTS: usize = 4096;

impl UnauthLimiter {
    pub(crate) fn new(now: Instant) -> UnauthLimiter {
        UnauthLimiter {
            slots: vec![(None, 0, now); UNAUTH_SLOTS].into_boxed_slice(),
            hasher: RandomState::default(),
        }
    }

    /// May `ip` get one more unauthenticated answer now, at `rate` per second?
    pub(crate) fn allow(&mut self, ip: IpAddr, rate: u32, now: Instant) -> bool {
        if rate == 0 {
            return true;
        }
        use std::hash::BuildHasher;
        let i = (self.hasher.hash_one(ip) as usize) % UNAUTH_SLOTS;
        let Some(slot) = self.slots.get_mut(i) else {
            return true;
        };
        if slot.0 != Some(ip) {
            *slot = (Some(ip), rate, now);
        }
        let elapsed = now.saturating_duration_since(slot.2);
        let add = (u128::from(rate) * elapsed.as_millis() / 1000) as u32;
        if add > 0 {
            slot.1 = slot.1.saturating_add(add).min(rate);
            slot.2 = now;
        }
        if slot.1 > 0 {
            slot.1 -= 1;
            true
        } else {
            false
        }
    }
}

/// The outcome of authenticating a request.
struct Authed {
    key: Key,
    /// `key` prepared for HMAC-SHA1 (requests without MESSAGE-INTEGRITY-SHA256): the
    /// request was verified with it and its answer is signed with it.
    mac: Option<proto::IntegrityKey>,
    sha256: bool,
    /// The key came from a TURN REST shared secret (not a static user).
    rest: bool,
}

/// What the request handlers produce before framing.
enum Reply {
    /// A success response is in `self.out`.
    Done,
    /// Drop silently.
    Drop,
}

impl Server {
    pub fn new(shared: Arc<Shared>) -> Server {
        let mut s = Server::new_inner(shared);
        s.refresh_hot_limits();
        s.fast_path_on = s.fast_path_wanted();
        if s.fast_path_on {
            s.fast_path.reserve(FAST_PATH_CAPACITY);
            // A previous run's entries go before this run installs any.
            s.fast_path.push(FastPathCommand::Clear);
        }
        s
    }

    /// Should this server's UDP allocations have kernel fast-path entries? Only when the
    /// shell asked for them (`Runtime::kernel_fast_path`) and no bandwidth limit is set:
    /// the token buckets (`max_bandwidth_per_allocation`, `max_total_bandwidth`) live
    /// on the userspace relay path only, so while either is non-zero every allocation
    /// stays there, and a reload that sets one removes every entry at the next tick.
    fn fast_path_wanted(&self) -> bool {
        let rt = self.shared.runtime.load();
        rt.kernel_fast_path
            && rt.limits.max_bandwidth_per_allocation == 0
            && rt.limits.max_total_bandwidth == 0
    }

    /// Kernel fast-path commands queued since the last call, in the order to apply them.
    /// Empty unless `Runtime::kernel_fast_path` is on; then the shell drains it after
    /// every call that may queue (requests, `handle_timeout`, `close_all`).
    pub fn drain_fast_path(&mut self) -> std::vec::Drain<'_, FastPathCommand> {
        self.fast_path.drain(..)
    }

    /// Is the kernel fast path on (as of the last tick)?
    pub fn fast_path_on(&self) -> bool {
        self.fast_path_on
    }

    /// The fast path was switched on or off (a reload changed the switch or a bandwidth
    /// limit): install every live entry of the eligible allocations, or remove them all.
    fn sync_fast_path(&mut self, now: Instant) {
        let want = self.fast_path_wanted();
        if want == self.fast_path_on {
            return;
        }
        self.fast_path_on = want;
        for a in self.allocations.iter_mut().flatten() {
            if !fastpath::eligible(a) {
                continue;
            }
            if want {
                fastpath::install_all(a, now, &mut self.fast_path);
            } else {
                fastpath::remove_all(a, None, &mut self.fast_path);
            }
        }
    }

    fn refresh_hot_limits(&mut self) {
        let rt = self.shared.runtime.load();
        self.hot = HotLimits {
            per_allocation: rt.limits.max_bandwidth_per_allocation,
            total_per_worker: rt.limits.max_total_bandwidth / self.shared.workers() as u64,
        };
    }

    fn new_inner(shared: Arc<Shared>) -> Server {
        let runtime_seen = shared.runtime.load_full();
        Server {
            shared,
            allocations: Vec::new(),
            free_slots: Vec::new(),
            by_five_tuple: HashMap::default(),
            by_relay_addr: HashMap::default(),
            by_relay: Vec::new(),
            reservations: Vec::new(),
            recent_deletes: Vec::with_capacity(RECENT_DELETES),
            recent_next: 0,
            out: Vec::with_capacity(1500),
            events: Vec::new(),
            collect_events: true,
            tcp_conns: HashMap::default(),
            next_conn_id: rand::random(),
            shard: 0,
            data_conns: HashMap::default(),
            commands: Vec::new(),
            fast_path: Vec::new(),
            fast_path_on: false,
            last_now: Instant::now(),
            kill_seen: 0,
            runtime_seen,
            counters: WorkerCounters::new(),
            hot: HotLimits::default(),
            total_bucket: TokenBucket::new(Instant::now()),
        }
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Turns event collection off (benchmarks, fuzzing).
    pub fn set_collect_events(&mut self, on: bool) {
        self.collect_events = on;
    }

    pub fn drain_events(&mut self) -> std::vec::Drain<'_, Event> {
        self.events.drain(..)
    }

    pub fn allocation_count(&self) -> usize {
        self.by_five_tuple.len()
    }

    pub fn allocations(&self) -> impl Iterator<Item = &Allocation> {
        self.allocations.iter().flatten()
    }

    pub fn allocation_by_five_tuple(&self, ft: &FiveTuple) -> Option<&Allocation> {
        self.by_five_tuple
            .get(ft)
            .and_then(|&i| self.allocations.get(i))
            .and_then(|a| a.as_ref())
    }

    /// If `peer` is the relayed address of an allocation of this worker: that
    /// allocation's relay handle and the address its peers know the sender `from` by
    /// (the sender's advertised relay address). The shell then hands the packet to
    /// [`Server::handle_peer`] directly instead of through the kernel; permissions are
    /// checked there as for any peer.
    #[inline]
    pub fn local_relay(
        &self,
        from: RelayHandle,
        peer: SocketAddr,
    ) -> Option<(RelayHandle, SocketAddr)> {
        if self.by_relay_addr.is_empty() {
            return None;
        }
        let to = *self.by_relay_addr.get(&peer)?;
        let sender = self.by_handle(from)?.relayed().find(|r| r.handle == from)?;
        let target = self.by_handle(to)?.relayed().find(|r| r.handle == to)?;
        // Peers addressed by the advertised address see the sender's advertised one.
        let from_addr = if peer == target.advertised {
            sender.advertised
        } else {
            sender.bound
        };
        Some((to, from_addr))
    }

    fn by_handle(&self, h: RelayHandle) -> Option<&Allocation> {
        let slot = *self.by_relay.get(h.0 as usize)? as usize;
        self.allocations.get(slot)?.as_ref()
    }

    /// Handles one datagram (or one stream frame) from a client.
    pub fn handle_client<'s, B: RelayBinder>(
        &'s mut self,
        ft: FiveTuple,
        buf: &'s [u8],
        clock: Clock,
        binder: &mut B,
    ) -> Output<'s> {
        let Some(&first) = buf.first() else {
            return Output::Nothing;
        };
        self.last_now = clock.now;
        if proto::is_channel_data(first) {
            return self.client_channel_data(ft, buf, clock.now);
        }
        if first > 3 {
            return Output::Nothing;
        }
        let msg = match Message::parse(buf) {
            Ok(m) => m,
            Err(_) => {
                return match Message::parse_rfc3489(buf) {
                    Ok(m) if m.method() == method::BINDING && m.class() == Class::Request => {
                        self.binding_rfc3489(&ft, &m)
                    }
                    _ => Output::Nothing,
                };
            }
        };
        if msg.verify_fingerprint() == Some(false) {
            return Output::Nothing;
        }
        match msg.class() {
            Class::Indication => {
                if msg.method() == method::SEND {
                    self.send_indication(ft, &msg, clock.now)
                } else {
                    Output::Nothing
                }
            }
            Class::Request => {
                // The state may change: the fd store's journal is written soon after
                // (not for Binding, which changes nothing).
                if msg.method() != method::BINDING {
                    self.shared.changed();
                }
                match self.request(ft, &msg, clock, binder) {
                    Reply::Done => Output::ToClient(&self.out),
                    Reply::Drop => Output::Nothing,
                }
            }
            // Responses to us: we send no requests.
            _ => Output::Nothing,
        }
    }

    /// ChannelData from the client (RFC 8656 section 12.6): the hot path.
    #[inline]
    fn client_channel_data<'s>(
        &mut self,
        ft: FiveTuple,
        buf: &'s [u8],
        now: Instant,
    ) -> Output<'s> {
        let Some((number, data)) = proto::parse_channel_data(buf) else {
            self.counters.dropped(DropReason::Malformed);
            return Output::Nothing;
        };
        let Some(&slot) = self.by_five_tuple.get(&ft) else {
            self.counters.dropped(DropReason::NoAllocation);
            return Output::Nothing;
        };
        let Some(Some(alloc)) = self.allocations.get_mut(slot) else {
            return Output::Nothing;
        };
        if alloc.tcp {
            return Output::Nothing;
        }
        let Some(peer) = alloc.channel_peer(number, now) else {
            self.counters.dropped(DropReason::NoChannel);
            return Output::Nothing;
        };
        self.relay_to_peer(slot, peer, data, RelayPath::Channel, now)
    }

    /// Send indication (RFC 8656 section 11.2... 10.2): no authentication, no answer.
    fn send_indication<'s>(
        &mut self,
        ft: FiveTuple,
        msg: &Message<'s>,
        now: Instant,
    ) -> Output<'s> {
        let Some(&slot) = self.by_five_tuple.get(&ft) else {
            return Output::Nothing;
        };
        let Ok(Some(peer)) = msg.xor_peer_address() else {
            return Output::Nothing;
        };
        let Some(data) = msg.data() else {
            return Output::Nothing;
        };
        let Some(Some(alloc)) = self.allocations.get_mut(slot) else {
            return Output::Nothing;
        };
        if alloc.tcp {
            return Output::Nothing;
        }
        self.relay_to_peer(slot, peer, data, RelayPath::Indication, now)
    }

    /// What both client → peer paths check and count before `data` goes to `peer` from
    /// allocation `slot`'s relay socket of `peer`'s family: the permission (and, for a
    /// peer that is another allocation's relay, that the allocation still lives: its
    /// address is otherwise denied by the policy), both bandwidth buckets, the usage.
    #[inline]
    fn relay_to_peer<'s>(
        &mut self,
        slot: usize,
        peer: SocketAddr,
        data: &'s [u8],
        path: RelayPath,
        now: Instant,
    ) -> Output<'s> {
        let Some(Some(alloc)) = self.allocations.get_mut(slot) else {
            return Output::Nothing;
        };
        let Some(relay) = alloc.relay_for(peer.is_ipv6()) else {
            return Output::Nothing;
        };
        let Some(perm) = alloc.permission(peer.ip(), now) else {
            self.counters.dropped(DropReason::NoPermission);
            return Output::Nothing;
        };
        if perm.relays_only && !self.shared.is_live_relay(peer) {
            self.counters.dropped(DropReason::NoPermission);
            return Output::Nothing;
        }
        if !alloc
            .bucket_out
            .take(data.len(), self.hot.per_allocation, now)
            || !self
                .total_bucket
                .take(data.len(), self.hot.total_per_worker, now)
        {
            self.counters.dropped(DropReason::Bandwidth);
            return Output::Nothing;
        }
        alloc.usage.packets_to_peer += 1;
        alloc.usage.bytes_to_peer += data.len() as u64;
        self.counters.relayed(Direction::ToPeer, path, data.len());
        Output::ToPeer { relay, peer, data }
    }

    /// A datagram from a peer arrived on relay socket `relay`. Its payload is
    /// `buf[payload]`, with at least [`PEER_HEADROOM`] bytes before it and
    /// [`PEER_TAILROOM`] after it. The core frames it in place (ChannelData when a
    /// channel is bound to the peer, else a Data indication) and returns the client's
    /// 5-tuple and the range of `buf` to send there.
    pub fn handle_peer(
        &mut self,
        relay: RelayHandle,
        from: SocketAddr,
        buf: &mut [u8],
        payload: Range<usize>,
        now: Instant,
    ) -> Option<(FiveTuple, Range<usize>)> {
        let slot = *self.by_relay.get(relay.0 as usize)? as usize;
        let alloc = self.allocations.get_mut(slot)?.as_mut()?;
        let Some(perm) = alloc.permission(from.ip(), now) else {
            self.counters.dropped(DropReason::NoPermission);
            return None;
        };
        if perm.relays_only && !self.shared.is_live_relay(from) {
            self.counters.dropped(DropReason::NoPermission);
            return None;
        }
        let len = payload.end.checked_sub(payload.start)?;
        if !alloc.bucket_in.take(len, self.hot.per_allocation, now)
            || !self.total_bucket.take(len, self.hot.total_per_worker, now)
        {
            self.counters.dropped(DropReason::Bandwidth);
            return None;
        }
        if payload.start < PEER_HEADROOM || buf.len() < payload.end + PEER_TAILROOM {
            return None;
        }
        let ft = alloc.five_tuple;
        let range = if let Some(number) = alloc.channel_for_peer(from, now) {
            // RFC 8656 section 12.4: 4-byte header; padded to 4 on streams only.
            let len16 = u16::try_from(len).ok()?;
            let start = payload.start - proto::CHANNEL_DATA_HEADER;
            let header: &mut [u8; 4] = buf.get_mut(start..payload.start)?.try_into().ok()?;
            proto::write_channel_data_header(header, number, len16);
            let mut end = payload.end;
            if ft.transport.is_stream() {
                let padded = (len + 3) & !3;
                let pad = padded - len;
                buf.get_mut(end..end + pad)?.fill(0);
                end += pad;
            }
            self.counters
                .relayed(Direction::ToClient, RelayPath::Channel, len);
            start..end
        } else {
            self.counters
                .relayed(Direction::ToClient, RelayPath::Indication, len);
            // RFC 8656 section 11.3: Data indication with XOR-PEER-ADDRESS and DATA.
            let padded = (len + 3) & !3;
            let addr_len = if from.is_ipv6() { 20 } else { 8 };
            let header_len = 20 + 4 + addr_len + 4;
            let start = payload.start - header_len;
            let body_len = 4 + addr_len + 4 + padded;
            let tid = TransactionId(rand::random());
            let h = buf.get_mut(start..payload.start)?;
            let msg_type = message_type(method::DATA, Class::Indication);
            h[0..2].copy_from_slice(&msg_type.to_be_bytes());
            h[2..4].copy_from_slice(&u16::try_from(body_len).ok()?.to_be_bytes());
            h[4..8].copy_from_slice(&proto::MAGIC_COOKIE.to_be_bytes());
            h[8..20].copy_from_slice(&tid.0);
            h[20..22].copy_from_slice(&attr::XOR_PEER_ADDRESS.to_be_bytes());
            h[22..24].copy_from_slice(&(addr_len as u16).to_be_bytes());
            write_xor_address(&mut h[24..24 + addr_len], from, &tid);
            let d = 24 + addr_len;
            h[d..d + 2].copy_from_slice(&attr::DATA.to_be_bytes());
            h[d + 2..d + 4].copy_from_slice(&u16::try_from(len).ok()?.to_be_bytes());
            let end = payload.start + padded;
            buf.get_mut(payload.end..end)?.fill(0);
            start..end
        };
        alloc.usage.packets_to_client += 1;
        alloc.usage.bytes_to_client += len as u64;
        Some((ft, range))
    }

    /// Expires allocations, permissions, channels and reservations. Call at least once a
    /// second (see [`Server::poll_timeout`]).
    pub fn handle_timeout<B: RelayBinder>(&mut self, now: Instant, binder: &mut B) {
        self.refresh_hot_limits();
        // Users removed, revoked or killed fleet-wide: their allocations end.
        let (users, seen) = self.shared.kills_since(self.kill_seen);
        self.kill_seen = seen;
        if !users.is_empty() {
            let doomed: Vec<usize> = self
                .allocations
                .iter()
                .enumerate()
                .filter_map(|(i, a)| {
                    let a = a.as_ref()?;
                    let id = a.username.split_once(':').map(|(_, id)| id);
                    users
                        .iter()
                        .any(|u| **u == *a.username || Some(u.as_str()) == id)
                        .then_some(i)
                })
                .collect();
            for i in doomed {
                self.remove_allocation(i, now, EndReason::Deleted, binder);
            }
        }
        // A reload that removed a user from `[auth] users` (or the last secret a REST
        // username's key came from): its allocations end, as a revoked user's do.
        let rt = self.shared.runtime.load_full();
        let usage_interval = rt.usage_interval.filter(|_| self.collect_events);
        if !Arc::ptr_eq(&rt, &self.runtime_seen) {
            let store = self.shared.store.load();
            let doomed: Vec<usize> = self
                .allocations
                .iter()
                .enumerate()
                .filter_map(|(i, a)| {
                    let a = a.as_ref()?;
                    (!user_has_keys(&rt, &store, &a.username)).then_some(i)
                })
                .collect();
            for i in doomed {
                self.remove_allocation(i, now, EndReason::Deleted, binder);
            }
            self.runtime_seen = rt;
        }
        self.compact();
        let mut interim_left = MAX_INTERIM_RECORDS_PER_TICK;
        let mut expired = Vec::new();
        for (i, slot) in self.allocations.iter_mut().enumerate() {
            if let Some(a) = slot {
                if now >= a.expires {
                    expired.push(i);
                } else {
                    if self.fast_path_on && fastpath::eligible(a) {
                        fastpath::expire(a, now, &mut self.fast_path);
                    }
                    a.prune(now);
                    if let Some(interval) = usage_interval {
                        if interim_left > 0
                            && now.saturating_duration_since(a.last_report) >= interval
                        {
                            interim_left -= 1;
                            self.events.push(Event::AllocationUsage {
                                id: a.id,
                                five_tuple: a.five_tuple,
                                relay: a.advertised,
                                username: a.username.to_string(),
                                duration: now.saturating_duration_since(a.created),
                                usage: a.usage.since(&a.reported),
                            });
                            a.reported = a.usage;
                            a.last_report = now;
                        }
                    }
                }
            }
        }
        for i in expired {
            self.remove_allocation(i, now, EndReason::Expired, binder);
        }
        self.sync_fast_path(now);
        self.expire_tcp(now);
        let mut k = 0;
        while k < self.reservations.len() {
            if now >= self.reservations[k].expires {
                let r = self.reservations.swap_remove(k);
                binder.release(r.relay);
            } else {
                k += 1;
            }
        }
    }

    /// This worker's live allocations for the session registry; `now`/`unix` convert
    /// start instants to Unix time.
    pub fn sessions(&self, now: Instant, unix: u64) -> Vec<SessionInfo> {
        self.allocations
            .iter()
            .flatten()
            .map(|a| SessionInfo {
                id: a.id,
                user: a.username.to_string(),
                transport: a.five_tuple.transport.as_str(),
                client: a.five_tuple.client,
                relay: a.advertised,
                started: unix.saturating_sub(now.saturating_duration_since(a.created).as_secs()),
                bytes_to_peer: a.usage.bytes_to_peer,
                bytes_to_client: a.usage.bytes_to_client,
            })
            .collect()
    }

    /// Gives memory back after a wave of allocations has ended: trailing free slots are
    /// dropped and tables much larger than their contents are shrunk.
    fn compact(&mut self) {
        while matches!(self.allocations.last(), Some(None)) {
            self.allocations.pop();
        }
        let len = self.allocations.len();
        if self.free_slots.iter().any(|&s| s >= len) {
            self.free_slots.retain(|&s| s < len);
        }
        while self.by_relay.last() == Some(&NO_SLOT) {
            self.by_relay.pop();
        }
        fn shrink<K: std::hash::Hash + Eq, V>(m: &mut HashMap<K, V, RandomState>) {
            if m.capacity() > 64 && m.len() < m.capacity() / 4 {
                m.shrink_to_fit();
            }
        }
        shrink(&mut self.by_five_tuple);
        shrink(&mut self.by_relay_addr);
        shrink(&mut self.data_conns);
        shrink(&mut self.tcp_conns);
        for v in [&mut self.free_slots] {
            if v.capacity() > 64 && v.len() < v.capacity() / 4 {
                v.shrink_to_fit();
            }
        }
        if self.allocations.capacity() > 64
            && self.allocations.len() < self.allocations.capacity() / 4
        {
            self.allocations.shrink_to_fit();
        }
        if self.by_relay.capacity() > 64 && self.by_relay.len() < self.by_relay.capacity() / 4 {
            self.by_relay.shrink_to_fit();
        }
    }

    /// When the core next needs [`Server::handle_timeout`]: the earliest expiry or
    /// interim usage record (`Runtime::usage_interval`; an instant already past when
    /// [`MAX_INTERIM_RECORDS_PER_TICK`] left records for the next call).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let allocs = self.allocations.iter().flatten().map(|a| a.expires);
        let res = self.reservations.iter().map(|r| r.expires);
        let interval = self
            .shared
            .runtime
            .load()
            .usage_interval
            .filter(|_| self.collect_events);
        let reports = interval.into_iter().flat_map(|i| {
            self.allocations
                .iter()
                .flatten()
                .filter_map(move |a| a.last_report.checked_add(i))
        });
        allocs.chain(res).chain(reports).min()
    }

    /// The client's stream (TCP or TLS control connection) closed: its allocation ends
    /// with it (RFC 8656 section 3.1: an allocation is identified by its 5-tuple).
    pub fn client_closed<B: RelayBinder>(&mut self, ft: &FiveTuple, now: Instant, binder: &mut B) {
        if self.data_closed(ft) {
            return;
        }
        if let Some(&slot) = self.by_five_tuple.get(ft) {
            self.remove_allocation(slot, now, EndReason::Deleted, binder);
        }
    }

    /// Ends every allocation (shutdown): each writes its final usage record with
    /// reason [`EndReason::Shutdown`].
    pub fn close_all<B: RelayBinder>(&mut self, now: Instant, binder: &mut B) {
        for i in 0..self.allocations.len() {
            if self.allocations[i].is_some() {
                self.remove_allocation(i, now, EndReason::Shutdown, binder);
            }
        }
        for r in self.reservations.drain(..) {
            binder.release(r.relay);
        }
    }

    fn remove_allocation<B: RelayBinder>(
        &mut self,
        slot: usize,
        now: Instant,
        reason: EndReason,
        binder: &mut B,
    ) {
        let Some(mut a) = self.allocations.get_mut(slot).and_then(Option::take) else {
            return;
        };
        if self.fast_path_on && fastpath::eligible(&a) {
            fastpath::remove_all(&mut a, None, &mut self.fast_path);
        }
        self.free_slots.push(slot);
        self.by_five_tuple.remove(&a.five_tuple);
        for r in a.relayed() {
            self.unregister_relay(r, binder);
        }
        if a.tcp {
            self.close_tcp_of(slot);
        }
        self.shared.release(&a.username);
        self.counters
            .allocation_ended(a.five_tuple.transport, a.relay_addr.is_ipv6(), reason);
        if self.collect_events {
            self.events.push(Event::AllocationEnded {
                id: a.id,
                five_tuple: a.five_tuple,
                relay: a.advertised,
                username: a.username.to_string(),
                duration: now.saturating_duration_since(a.created),
                usage: a.usage.since(&a.reported),
                reason,
            });
        }
    }

    fn register_relay(&mut self, r: Relayed, slot: usize) {
        self.shared.add_relay(r.bound);
        self.shared.add_relay(r.advertised);
        self.by_relay_addr.insert(r.bound, r.handle);
        self.by_relay_addr.insert(r.advertised, r.handle);
        let h = r.handle.0 as usize;
        if self.by_relay.len() <= h {
            self.by_relay.resize(h + 1, NO_SLOT);
        }
        self.by_relay[h] = slot as u32;
    }

    fn unregister_relay<B: RelayBinder>(&mut self, r: Relayed, binder: &mut B) {
        self.by_relay_addr.remove(&r.bound);
        self.by_relay_addr.remove(&r.advertised);
        if let Some(s) = self.by_relay.get_mut(r.handle.0 as usize) {
            *s = NO_SLOT;
        }
        self.shared.remove_relay(r.bound);
        self.shared.remove_relay(r.advertised);
        binder.release(r.handle);
    }

    // ---------------------------------------------------------------- requests

    fn request<B: RelayBinder>(
        &mut self,
        ft: FiveTuple,
        msg: &Message<'_>,
        clock: Clock,
        binder: &mut B,
    ) -> Reply {
        let rt = self.shared.runtime.load_full();
        let m = msg.method();
        // Answers that cost the sender nothing (Binding, challenges, errors before
        // authentication) are limited per source IP: no amplification toward a
        // spoofed victim. Over UDP only: a TCP or TLS client's address is proven by
        // its handshake, and thousands of them may share one NAT address, each
        // allocation costing one 401 that a stream client does not send again.
        let unauthenticated = ft.transport == Transport::Udp
            && (m == method::BINDING || !msg.has_message_integrity());
        if unauthenticated
            && !self.shared.unauthenticated_allowed(
                ft.client.ip(),
                rt.limits.unauthenticated_rate,
                clock.now,
            )
        {
            self.counters.dropped(DropReason::RateLimited);
            return Reply::Drop;
        }
        if m == method::BINDING {
            // Binding needs no authentication: unknown attributes are checked at once.
            let unknown = msg.unknown_required(known_attribute);
            if !unknown.is_empty() {
                self.error(&rt, msg, 420, None, |w| {
                    w.unknown_attributes(&unknown);
                });
                return Reply::Done;
            }
            return self.binding(&rt, ft, msg);
        }
        if !matches!(
            m,
            method::ALLOCATE
                | method::REFRESH
                | method::CREATE_PERMISSION
                | method::CHANNEL_BIND
                | method::CONNECT
                | method::CONNECTION_BIND
        ) {
            self.error(&rt, msg, 400, None, |_| {});
            return Reply::Done;
        }
        // A retransmitted Allocate (RFC 8656 section 7.2) or a Refresh that deleted
        // its allocation gets the answer it got the first time.
        if let Some(reply) = self.retransmission(ft, msg) {
            return reply;
        }
        let auth = match self.authenticate(&rt, ft, msg, clock) {
            Ok(a) => a,
            Err(reply) => return reply,
        };
        // RFC 8489 section 6.3: unknown comprehension-required attributes are checked
        // once authentication has passed, and the 420 is signed.
        let unknown = msg.unknown_required(known_attribute);
        if !unknown.is_empty() {
            self.error(&rt, msg, 420, Some(&auth), |w| {
                w.unknown_attributes(&unknown);
            });
            return Reply::Done;
        }
        match m {
            method::ALLOCATE => self.allocate(&rt, ft, msg, &auth, clock, binder),
            method::REFRESH => self.refresh(&rt, ft, msg, &auth, clock, binder),
            method::CREATE_PERMISSION => self.create_permission(&rt, ft, msg, &auth, clock),
            method::CONNECT => self.connect(&rt, ft, msg, &auth),
            method::CONNECTION_BIND => self.connection_bind(&rt, ft, msg, &auth),
            _ => self.channel_bind(&rt, ft, msg, &auth, clock),
        }
    }

    fn retransmission(&mut self, ft: FiveTuple, msg: &Message<'_>) -> Option<Reply> {
        let tid = msg.transaction_id();
        if msg.method() == method::ALLOCATE {
            let a = self.allocation_by_five_tuple(&ft)?;
            if a.allocate_tid == tid {
                let resp = a.allocate_response.clone();
                self.out.clear();
                self.out.extend_from_slice(&resp);
                return Some(Reply::Done);
            }
            return None;
        }
        // Only a Refresh can repeat the Refresh that deleted an allocation.
        if msg.method() != method::REFRESH {
            return None;
        }
        let d = self
            .recent_deletes
            .iter()
            .find(|d| d.ft == ft && d.tid == tid)?;
        let resp = d.bytes.get(..d.len as usize)?;
        self.out.clear();
        self.out.extend_from_slice(resp);
        Some(Reply::Done)
    }

    /// Long-term credential check (RFC 8489 section 9.2.4). Stateless: nothing is
    /// stored for a request that fails it.
    fn authenticate(
        &mut self,
        rt: &Runtime,
        ft: FiveTuple,
        msg: &Message<'_>,
        clock: Clock,
    ) -> Result<Authed, Reply> {
        if !msg.has_message_integrity() {
            self.counters.auth_failure(AuthFailure::Missing);
            self.challenge(rt, ft, msg, 401, clock);
            return Err(Reply::Done);
        }
        let (Ok(Some(username)), Ok(Some(realm)), Ok(Some(nonce))) =
            (msg.username(), msg.realm(), msg.nonce())
        else {
            self.error(rt, msg, 400, None, |_| {});
            return Err(Reply::Done);
        };
        // Nonces are bound to the client's IP address, not its port: RFC 6062 data
        // connections come from new ports with the control connection's nonce.
        match rt.nonces.check(nonce, nonce_addr(ft), clock.unix) {
            NonceCheck::Valid => {}
            NonceCheck::Stale | NonceCheck::Invalid => {
                self.counters.auth_failure(AuthFailure::StaleNonce);
                self.challenge(rt, ft, msg, 438, clock);
                return Err(Reply::Done);
            }
        }
        if realm != rt.realm {
            self.counters.auth_failure(AuthFailure::BadCredentials);
            self.challenge(rt, ft, msg, 401, clock);
            return Err(Reply::Done);
        }
        let keys = match self.keys_for(rt, username, clock.unix) {
            Ok(k) => k,
            Err(e) => {
                self.counters.auth_failure(match e {
                    LookupError::Expired => AuthFailure::Expired,
                    _ => AuthFailure::UnknownUser,
                });
                self.challenge(rt, ft, msg, 401, clock);
                return Err(Reply::Done);
            }
        };
        let sha256 = msg.has(attr::MESSAGE_INTEGRITY_SHA256);
        for (key, rest) in keys {
            let (ok, mac) = if sha256 {
                (msg.verify_integrity(&key), None)
            } else {
                let mac = proto::IntegrityKey::new(&key);
                (msg.verify_integrity_sha1_with(&mac), Some(mac))
            };
            if ok {
                return Ok(Authed {
                    key,
                    mac,
                    sha256,
                    rest,
                });
            }
        }
        self.counters.auth_failure(AuthFailure::BadCredentials);
        self.challenge(rt, ft, msg, 401, clock);
        Err(Reply::Done)
    }

    /// Candidate keys for `username`: the configuration's users and secrets, then the
    /// fleet store's (cached; never waits on the store), each with `true` when it comes
    /// from a TURN REST secret. Revoked users have none.
    fn keys_for(
        &self,
        rt: &Runtime,
        username: &str,
        unix: u64,
    ) -> Result<Vec<(Key, bool)>, LookupError> {
        let store = self.shared.store.load();
        if store.is_revoked(username) {
            return Err(LookupError::UnknownUser);
        }
        let mut keys = match rt.credentials.keys_for(username, unix) {
            Ok(k) => k,
            Err(LookupError::Expired) => return Err(LookupError::Expired),
            Err(_) => Vec::new(),
        };
        if let Some(k) = store.users.get(username) {
            keys.push((*k, false));
        }
        if !store.secrets.is_empty() {
            // TURN REST username: "<expiry>[:<id>]".
            let expiry = username
                .split(':')
                .next()
                .and_then(|e| e.parse::<u64>().ok());
            if let Some(expiry) = expiry {
                if expiry <= unix {
                    return Err(LookupError::Expired);
                }
                for secret in &store.secrets {
                    let password = crate::auth::rest_password(secret, username);
                    let key = crate::auth::long_term_key(username, &rt.realm, &password);
                    keys.push((key, true));
                }
            }
        }
        if keys.is_empty() {
            Err(LookupError::UnknownUser)
        } else {
            Ok(keys)
        }
    }

    /// 401 or 438 with a fresh REALM and NONCE.
    fn challenge(
        &mut self,
        rt: &Runtime,
        ft: FiveTuple,
        msg: &Message<'_>,
        code: u16,
        clock: Clock,
    ) {
        let nonce = rt.nonces.make(nonce_addr(ft), clock.unix);
        self.error(rt, msg, code, None, |w| {
            w.attr(attr::REALM, rt.realm.as_bytes());
            w.attr(attr::NONCE, nonce.as_bytes());
        });
    }

    /// Builds an error response into `self.out`; signed with `auth` when the request
    /// was authenticated.
    fn error(
        &mut self,
        rt: &Runtime,
        msg: &Message<'_>,
        code: u16,
        auth: Option<&Authed>,
        extra: impl FnOnce(&mut MessageWriter<'_>),
    ) {
        self.counters.response(code);
        if self.collect_events {
            self.events.push(Event::ErrorResponse {
                method: msg.method(),
                code,
            });
        }
        let mut w = MessageWriter::new(
            &mut self.out,
            msg.method(),
            Class::Error,
            msg.transaction_id(),
        );
        w.error_code(code, proto::reason_phrase(code));
        extra(&mut w);
        finish(&mut w, rt, msg, auth);
    }

    fn binding(&mut self, rt: &Runtime, ft: FiveTuple, msg: &Message<'_>) -> Reply {
        // RFC 5780 CHANGE-REQUEST: we have one address, so only "change nothing" is served.
        if let Some(v) = msg.get(attr::CHANGE_REQUEST) {
            if v.iter().any(|&b| b != 0) {
                self.error(rt, msg, 420, None, |w| {
                    w.unknown_attributes(&[attr::CHANGE_REQUEST]);
                });
                return Reply::Done;
            }
        }
        let mut w = MessageWriter::new(
            &mut self.out,
            method::BINDING,
            Class::Success,
            msg.transaction_id(),
        );
        w.xor_address(attr::XOR_MAPPED_ADDRESS, ft.client);
        w.mapped_address(attr::MAPPED_ADDRESS, ft.client);
        w.xor_address(attr::RESPONSE_ORIGIN, ft.server);
        finish(&mut w, rt, msg, None);
        Reply::Done
    }

    /// RFC 3489 Binding request (no magic cookie): MAPPED-ADDRESS and SOURCE-ADDRESS.
    fn binding_rfc3489<'s>(&'s mut self, ft: &FiveTuple, msg: &Message<'_>) -> Output<'s> {
        if let Some(v) = msg.get(attr::CHANGE_REQUEST) {
            if v.iter().any(|&b| b != 0) {
                return Output::Nothing;
            }
        }
        let Some(tid16) = msg
            .raw()
            .get(4..20)
            .and_then(|s| <[u8; 16]>::try_from(s).ok())
        else {
            return Output::Nothing;
        };
        let mut w =
            MessageWriter::new_rfc3489(&mut self.out, method::BINDING, Class::Success, tid16);
        w.mapped_address(attr::MAPPED_ADDRESS, ft.client);
        w.mapped_address(attr::SOURCE_ADDRESS, ft.server);
        // RFC 3489 section 11.2.1 requires CHANGED-ADDRESS; we have no second address.
        w.mapped_address(attr::CHANGED_ADDRESS, ft.server);
        w.finish();
        Output::ToClient(&self.out)
    }

    fn allocate<B: RelayBinder>(
        &mut self,
        rt: &Runtime,
        ft: FiveTuple,
        msg: &Message<'_>,
        auth: &Authed,
        clock: Clock,
        binder: &mut B,
    ) -> Reply {
        let now = clock.now;
        let Ok(Some(username)) = msg.username() else {
            return self.fail(rt, msg, 400, auth);
        };
        if self.by_five_tuple.contains_key(&ft) {
            return self.fail(rt, msg, 437, auth);
        }
        // Draining (SIGTERM): new allocations go elsewhere (RFC 8489 section 10: 300
        // Try Alternate with ALTERNATE-SERVER) or are refused (508).
        if self.shared.is_draining() {
            if let Some(alt) = rt.alternate_servers.first().copied() {
                self.error(rt, msg, 300, Some(auth), |w| {
                    w.mapped_address(attr::ALTERNATE_SERVER, alt);
                });
                return Reply::Done;
            }
            return self.fail(rt, msg, 508, auth);
        }
        // Fleet load sharing: above `redirect_above`, send the client to the
        // least-loaded other node that has fewer allocations than this one.
        if rt.redirect_above > 0 {
            let ours = self.shared.total_allocations();
            if ours >= rt.redirect_above {
                let store = self.shared.store.load();
                let best = store
                    .nodes
                    .iter()
                    .filter(|n| n.allocations < ours)
                    .min_by_key(|n| n.allocations)
                    .map(|n| n.addr);
                if let Some(alt) = best {
                    self.error(rt, msg, 300, Some(auth), |w| {
                        w.mapped_address(attr::ALTERNATE_SERVER, alt);
                    });
                    return Reply::Done;
                }
            }
        }
        // RFC 8656 section 7.2 checks, in order.
        let tcp = match msg.requested_transport() {
            Ok(Some(PROTO_UDP)) => false,
            // RFC 6062 section 5.1: TCP relays only over a TCP or TLS control
            // connection, and without the UDP-only attributes.
            Ok(Some(PROTO_TCP)) => {
                if !ft.transport.is_stream()
                    || msg.has(attr::EVEN_PORT)
                    || msg.has(attr::RESERVATION_TOKEN)
                    || msg.has(attr::DONT_FRAGMENT)
                    || msg.has(attr::ADDITIONAL_ADDRESS_FAMILY)
                {
                    return self.fail(rt, msg, 400, auth);
                }
                true
            }
            Ok(Some(_)) => return self.fail(rt, msg, 442, auth),
            _ => return self.fail(rt, msg, 400, auth),
        };
        let Ok(even_port) = msg.even_port() else {
            return self.fail(rt, msg, 400, auth);
        };
        let Ok(token) = msg.reservation_token() else {
            return self.fail(rt, msg, 400, auth);
        };
        let Ok(family) = msg.requested_address_family() else {
            return self.fail(rt, msg, 400, auth);
        };
        let Ok(additional) = msg.additional_address_family() else {
            return self.fail(rt, msg, 400, auth);
        };
        if token.is_some() && (even_port.is_some() || family.is_some()) {
            return self.fail(rt, msg, 400, auth);
        }
        if family.is_some() && additional.is_some() {
            return self.fail(rt, msg, 400, auth);
        }
        if additional == Some(0x01) {
            // ADDITIONAL-ADDRESS-FAMILY may only ask for IPv6 (RFC 8656 section 7.2).
            return self.fail(rt, msg, 400, auth);
        }
        let v6 = match family {
            None | Some(0x01) => false,
            Some(0x02) => true,
            Some(_) => return self.fail(rt, msg, 440, auth),
        };
        let Ok(requested_lifetime) = msg.lifetime() else {
            return self.fail(rt, msg, 400, auth);
        };
        if let Err(q) = self.shared.acquire(username, auth.rest, &rt.limits) {
            let code = match q {
                QuotaError::User => 486,
                QuotaError::Total => 508,
            };
            return self.fail(rt, msg, code, auth);
        }
        // From here on the quota slot is held: give it back on every failure.
        let bound = if let Some(token) = token {
            match self.reservations.iter().position(|r| r.token == token) {
                Some(i) => {
                    let r = self.reservations.swap_remove(i);
                    Ok((r.relay, r.addr, None))
                }
                None => Err(508),
            }
        } else {
            match rt.relay.for_family(v6) {
                None => Err(440),
                Some(ip) if tcp => {
                    binder
                        .bind_tcp(ip)
                        .map(|(h, a)| (h, a, None))
                        .map_err(|e| match e {
                            BindError::Exhausted => 508,
                            BindError::NoAddress => 440,
                        })
                }
                Some(ip) => {
                    let even = even_port.is_some();
                    let reserve = even_port == Some(true);
                    binder.bind(ip, even, reserve).map_err(|e| match e {
                        BindError::Exhausted => 508,
                        BindError::NoAddress => 440,
                    })
                }
            }
        };
        let (relay, relay_addr, reserved) = match bound {
            Ok(b) => b,
            Err(code) => {
                self.shared.release(username);
                return self.fail(rt, msg, code, auth);
            }
        };
        // A dual allocation (RFC 8656 section 7.2): the IPv6 relay is best effort; if it
        // cannot be had, the IPv4 allocation stands and ADDRESS-ERROR-CODE says why.
        let mut second = None;
        let mut second_error = None;
        if additional == Some(0x02) {
            match rt.relay.for_family(true) {
                None => second_error = Some(440),
                Some(ip) => match binder.bind(ip, false, false) {
                    Ok((h, bound, _)) => {
                        second = Some(Relayed {
                            handle: h,
                            bound,
                            advertised: rt.relay.advertised(bound),
                        })
                    }
                    Err(BindError::NoAddress) => second_error = Some(440),
                    Err(BindError::Exhausted) => second_error = Some(508),
                },
            }
        }
        let lifetime = allocate_lifetime(requested_lifetime, &rt.limits);
        let advertised = rt.relay.advertised(relay_addr);
        let mut reservation_token = None;
        if let Some((rh, raddr)) = reserved {
            let token = shard::new_reservation_token(self.shard);
            self.reservations.push(Reservation {
                token,
                relay: rh,
                addr: raddr,
                expires: now + RESERVATION_LIFETIME,
            });
            reservation_token = Some(token);
        }
        let mut w = MessageWriter::new(
            &mut self.out,
            method::ALLOCATE,
            Class::Success,
            msg.transaction_id(),
        );
        w.xor_address(attr::XOR_RELAYED_ADDRESS, advertised);
        if let Some(r) = second {
            w.xor_address(attr::XOR_RELAYED_ADDRESS, r.advertised);
        }
        if let Some(code) = second_error {
            // RFC 8656 section 14.8: family, reserved, class, number, reason.
            let mut v = vec![0x02, 0, (code / 100) as u8, (code % 100) as u8];
            v.extend_from_slice(proto::reason_phrase(code).as_bytes());
            w.attr(attr::ADDRESS_ERROR_CODE, &v);
        }
        w.u32_attr(attr::LIFETIME, lifetime.as_secs() as u32);
        w.xor_address(attr::XOR_MAPPED_ADDRESS, ft.client);
        if let Some(t) = reservation_token {
            w.attr(attr::RESERVATION_TOKEN, &t);
        }
        finish(&mut w, rt, msg, Some(auth));

        let id = self.shared.next_allocation_id();
        let alloc = Allocation {
            id,
            five_tuple: ft,
            relay,
            relay_addr,
            advertised,
            second,
            tcp,
            username: username.into(),
            key: auth.key,
            created: now,
            expires: now + lifetime,
            permissions: Vec::new(),
            channels: Vec::new(),
            allocate_tid: msg.transaction_id(),
            allocate_response: self.out.clone().into_boxed_slice(),
            usage: Usage::default(),
            reported: Usage::default(),
            last_report: now,
            bucket_out: TokenBucket::new(now),
            bucket_in: TokenBucket::new(now),
        };
        let slot = match self.free_slots.pop() {
            Some(s) => {
                self.allocations[s] = Some(alloc);
                s
            }
            None => {
                self.allocations.push(Some(alloc));
                self.allocations.len() - 1
            }
        };
        self.by_five_tuple.insert(ft, slot);
        self.register_relay(
            Relayed {
                handle: relay,
                bound: relay_addr,
                advertised,
            },
            slot,
        );
        if let Some(r) = second {
            self.register_relay(r, slot);
        }
        self.counters
            .allocation_created(ft.transport, relay_addr.is_ipv6());
        if self.collect_events {
            self.events.push(Event::AllocationCreated {
                id,
                five_tuple: ft,
                relay: advertised,
                username: username.to_string(),
            });
        }
        Reply::Done
    }

    /// Looks up the allocation of `ft` for a request on it: 437 without one, 441 when
    /// the request's username is not the allocation's.
    fn owned_allocation(
        &mut self,
        rt: &Runtime,
        ft: FiveTuple,
        msg: &Message<'_>,
        auth: &Authed,
    ) -> Result<usize, Reply> {
        let Some(&slot) = self.by_five_tuple.get(&ft) else {
            return Err(self.fail(rt, msg, 437, auth));
        };
        let same_user = match (self.allocations.get(slot), msg.username()) {
            (Some(Some(a)), Ok(Some(u))) => *a.username == *u,
            _ => false,
        };
        if !same_user {
            return Err(self.fail(rt, msg, 441, auth));
        }
        Ok(slot)
    }

    fn refresh<B: RelayBinder>(
        &mut self,
        rt: &Runtime,
        ft: FiveTuple,
        msg: &Message<'_>,
        auth: &Authed,
        clock: Clock,
        binder: &mut B,
    ) -> Reply {
        let slot = match self.owned_allocation(rt, ft, msg, auth) {
            Ok(s) => s,
            Err(r) => return r,
        };
        let Ok(requested) = msg.lifetime() else {
            return self.fail(rt, msg, 400, auth);
        };
        // REQUESTED-ADDRESS-FAMILY names one relay of the allocation (RFC 8656 section
        // 7.3): 443 if it has none of that family; on a dual allocation, LIFETIME 0
        // with it deletes only that family's relay.
        let mut only_family = None;
        if let Ok(Some(f)) = msg.requested_address_family() {
            let Some(Some(a)) = self.allocations.get(slot) else {
                return Reply::Drop;
            };
            let v6 = f == 0x02;
            if a.relay_for(v6).is_none() {
                return self.fail(rt, msg, 443, auth);
            }
            if a.second.is_some() {
                only_family = Some(v6);
            }
        }
        if let (Some(v6), Some(0)) = (only_family, requested) {
            self.drop_family(slot, v6, binder);
            return self.success_with_lifetime(rt, msg, auth, 0);
        }
        // RFC 8656 section 7.3: as for Allocate, but 0 deletes.
        let lifetime = match requested {
            Some(0) => Duration::ZERO,
            other => allocate_lifetime(other, &rt.limits),
        };
        let mut w = MessageWriter::new(
            &mut self.out,
            method::REFRESH,
            Class::Success,
            msg.transaction_id(),
        );
        w.u32_attr(attr::LIFETIME, lifetime.as_secs() as u32);
        finish(&mut w, rt, msg, Some(auth));
        if lifetime.is_zero() {
            self.remove_allocation(slot, clock.now, EndReason::Deleted, binder);
            if let Ok(len) = u8::try_from(self.out.len()) {
                let mut entry = RecentDelete {
                    ft,
                    tid: msg.transaction_id(),
                    len,
                    bytes: [0; RECENT_DELETE_LEN],
                };
                if let Some(dst) = entry.bytes.get_mut(..self.out.len()) {
                    dst.copy_from_slice(&self.out);
                    if self.recent_deletes.len() < RECENT_DELETES {
                        self.recent_deletes.push(entry);
                    } else if let Some(slot) = self.recent_deletes.get_mut(self.recent_next) {
                        *slot = entry;
                    }
                    self.recent_next = (self.recent_next + 1) % RECENT_DELETES;
                }
            }
        } else if let Some(Some(a)) = self.allocations.get_mut(slot) {
            a.expires = clock.now + lifetime;
        }
        Reply::Done
    }

    /// Checks a peer address against family and policy. `Ok(relays_only)`.
    /// The policy is checked first, so a denied address is refused (403) whatever its
    /// family; an allowed one of the other family gets 443.
    fn check_peer(&self, rt: &Runtime, family_ok: bool, peer: SocketAddr) -> Result<bool, u16> {
        let relays_only = if rt.policy.is_allowed(peer.ip()) {
            false
        } else if self.shared.is_live_relay(peer) {
            // Relaying between two allocations of this server is always allowed,
            // whatever range the relay address is in; only that exact transport address.
            true
        } else {
            return Err(403);
        };
        if !family_ok {
            return Err(443);
        }
        Ok(relays_only)
    }

    fn create_permission(
        &mut self,
        rt: &Runtime,
        ft: FiveTuple,
        msg: &Message<'_>,
        auth: &Authed,
        clock: Clock,
    ) -> Reply {
        let slot = match self.owned_allocation(rt, ft, msg, auth) {
            Ok(s) => s,
            Err(r) => return r,
        };
        let peers = match msg.xor_peer_addresses() {
            Ok(p) if !p.is_empty() => p,
            _ => return self.fail(rt, msg, 400, auth),
        };
        let Some(Some(alloc)) = self.allocations.get(slot) else {
            return Reply::Drop;
        };
        let mut grants = Vec::with_capacity(peers.len());
        for p in &peers {
            let family_ok = alloc.relay_for(p.is_ipv6()).is_some();
            match self.check_peer(rt, family_ok, *p) {
                Ok(relays_only) => grants.push((p.ip(), relays_only)),
                Err(code) => return self.fail(rt, msg, code, auth),
            }
        }
        let ips: Vec<IpAddr> = grants.iter().map(|g| g.0).collect();
        if alloc.permissions.len() + alloc.new_permissions(&ips)
            > rt.limits.max_permissions_per_allocation
        {
            return self.fail(rt, msg, 508, auth);
        }
        if let Some(Some(alloc)) = self.allocations.get_mut(slot) {
            let fast_path = self.fast_path_on && fastpath::eligible(alloc);
            for (ip, relays_only) in grants {
                alloc.install_permission(ip, relays_only, clock.now, rt.limits.permission_lifetime);
                if fast_path {
                    fastpath::install_permission(alloc, ip, &mut self.fast_path);
                }
            }
        }
        self.success(rt, msg, auth)
    }

    fn channel_bind(
        &mut self,
        rt: &Runtime,
        ft: FiveTuple,
        msg: &Message<'_>,
        auth: &Authed,
        clock: Clock,
    ) -> Reply {
        let slot = match self.owned_allocation(rt, ft, msg, auth) {
            Ok(s) => s,
            Err(r) => return r,
        };
        let (Ok(Some(number)), Ok(Some(peer))) = (msg.channel_number(), msg.xor_peer_address())
        else {
            return self.fail(rt, msg, 400, auth);
        };
        if !(CHANNEL_MIN..=CHANNEL_MAX).contains(&number) {
            return self.fail(rt, msg, 400, auth);
        }
        let Some(Some(alloc)) = self.allocations.get(slot) else {
            return Reply::Drop;
        };
        let family_ok = alloc.relay_for(peer.is_ipv6()).is_some();
        let relays_only = match self.check_peer(rt, family_ok, peer) {
            Ok(r) => r,
            Err(code) => return self.fail(rt, msg, code, auth),
        };
        match alloc.check_channel_bind(number, peer) {
            BindCheck::Conflict => return self.fail(rt, msg, 400, auth),
            BindCheck::New => {
                if alloc.channels.len() >= rt.limits.max_channels_per_allocation {
                    return self.fail(rt, msg, 508, auth);
                }
                let new_perm = alloc.new_permissions(&[peer.ip()]);
                if alloc.permissions.len() + new_perm > rt.limits.max_permissions_per_allocation {
                    return self.fail(rt, msg, 508, auth);
                }
            }
            BindCheck::Refresh => {}
        }
        if let Some(Some(alloc)) = self.allocations.get_mut(slot) {
            let l = &rt.limits;
            alloc.bind_channel(number, peer, clock.now, l.channel_lifetime);
            alloc.install_permission(peer.ip(), relays_only, clock.now, l.permission_lifetime);
            // A new binding, a refresh, or a binding revived within its cool-down (whose
            // entry went at its expiry): all (re)install, permission first.
            if self.fast_path_on && fastpath::eligible(alloc) {
                fastpath::install_permission(alloc, peer.ip(), &mut self.fast_path);
                fastpath::install_channel(alloc, number, &mut self.fast_path);
            }
        }
        self.success(rt, msg, auth)
    }

    fn success_with_lifetime(
        &mut self,
        rt: &Runtime,
        msg: &Message<'_>,
        auth: &Authed,
        lifetime: u32,
    ) -> Reply {
        let mut w = MessageWriter::new(
            &mut self.out,
            msg.method(),
            Class::Success,
            msg.transaction_id(),
        );
        w.u32_attr(attr::LIFETIME, lifetime);
        finish(&mut w, rt, msg, Some(auth));
        Reply::Done
    }

    /// Removes one family's relay from a dual allocation; the other stays.
    fn drop_family<B: RelayBinder>(&mut self, slot: usize, v6: bool, binder: &mut B) {
        let Some(Some(a)) = self.allocations.get_mut(slot) else {
            return;
        };
        if a.second.is_none() {
            return;
        }
        // The family's entries go while its relay is still the allocation's.
        if self.fast_path_on && fastpath::eligible(a) {
            fastpath::remove_all(a, Some(v6), &mut self.fast_path);
        }
        let Some(second) = a.second.take() else {
            return;
        };
        let gone = if second.bound.is_ipv6() == v6 {
            second
        } else {
            // The primary goes: the second relay takes its place.
            let old = Relayed {
                handle: a.relay,
                bound: a.relay_addr,
                advertised: a.advertised,
            };
            a.relay = second.handle;
            a.relay_addr = second.bound;
            a.advertised = second.advertised;
            old
        };
        a.permissions.retain(|p| p.ip.is_ipv6() != v6);
        a.channels.retain(|c| c.peer.is_ipv6() != v6);
        self.unregister_relay(gone, binder);
    }

    fn success(&mut self, rt: &Runtime, msg: &Message<'_>, auth: &Authed) -> Reply {
        let mut w = MessageWriter::new(
            &mut self.out,
            msg.method(),
            Class::Success,
            msg.transaction_id(),
        );
        finish(&mut w, rt, msg, Some(auth));
        Reply::Done
    }

    fn fail(&mut self, rt: &Runtime, msg: &Message<'_>, code: u16, auth: &Authed) -> Reply {
        self.error(rt, msg, code, Some(auth), |_| {});
        Reply::Done
    }
}

/// SOFTWARE, integrity (with the request's algorithm) and FINGERPRINT (when the request
/// had one), in that order.
fn finish(w: &mut MessageWriter<'_>, rt: &Runtime, msg: &Message<'_>, auth: Option<&Authed>) {
    if let Some(s) = &rt.software {
        w.attr(attr::SOFTWARE, s.as_bytes());
    }
    if let Some(a) = auth {
        match (&a.mac, a.sha256) {
            (_, true) => w.message_integrity_sha256(&a.key),
            (Some(mac), false) => w.message_integrity_with(mac),
            (None, false) => w.message_integrity(&a.key),
        };
    }
    if msg.has_fingerprint() {
        w.fingerprint();
    }
}

/// What a nonce is bound to: the client's IP address.
fn nonce_addr(ft: FiveTuple) -> SocketAddr {
    SocketAddr::new(ft.client.ip(), 0)
}

/// Does `username` still have a key, whatever the time: a static user of the
/// configuration or the fleet store, or a TURN REST username while a secret remains
/// (its expiry only matters to new requests).
fn user_has_keys(rt: &Runtime, store: &StoreView, username: &str) -> bool {
    rt.credentials.knows(username)
        || store.users.contains_key(username)
        || (!store.secrets.is_empty()
            && username
                .split(':')
                .next()
                .is_some_and(|e| e.parse::<u64>().is_ok()))
}

/// RFC 8656 section 7.2: the default lifetime unless the client asks for more, capped.
fn allocate_lifetime(requested: Option<u32>, limits: &Limits) -> Duration {
    match requested {
        Some(secs) => Duration::from_secs(u64::from(secs))
            .max(limits.default_lifetime)
            .min(limits.max_lifetime),
        None => limits.default_lifetime,
    }
}

/// Attributes this server understands in requests (RFC 8489 section 14, RFC 8656
/// section 14, RFC 6062, RFC 5780 CHANGE-REQUEST/RESPONSE-PORT).
fn known_attribute(t: u16) -> bool {
    matches!(
        t,
        attr::MAPPED_ADDRESS
            | attr::CHANGE_REQUEST
            | attr::USERNAME
            | attr::MESSAGE_INTEGRITY
            | attr::ERROR_CODE
            | attr::UNKNOWN_ATTRIBUTES
            | attr::CHANNEL_NUMBER
            | attr::LIFETIME
            | attr::XOR_PEER_ADDRESS
            | attr::DATA
            | attr::REALM
            | attr::NONCE
            | attr::XOR_RELAYED_ADDRESS
            | attr::REQUESTED_ADDRESS_FAMILY
            | attr::EVEN_PORT
            | attr::REQUESTED_TRANSPORT
            | attr::DONT_FRAGMENT
            | attr::MESSAGE_INTEGRITY_SHA256
            | attr::XOR_MAPPED_ADDRESS
            | attr::RESERVATION_TOKEN
            | attr::PRIORITY
            | attr::USE_CANDIDATE
            | attr::PADDING
            | attr::RESPONSE_PORT
            | attr::CONNECTION_ID
    )
}

/// STUN message type from method and class (RFC 8489 section 5).
fn message_type(method: u16, class: Class) -> u16 {
    let c: u16 = match class {
        Class::Request => 0b00,
        Class::Indication => 0b01,
        Class::Success => 0b10,
        Class::Error => 0b11,
    };
    (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((c & 0b01) << 4)
        | ((c & 0b10) << 7)
}

/// XOR-address value (family, port, address) written into a slice of 8 or 20 bytes.
fn write_xor_address(dst: &mut [u8], addr: SocketAddr, tid: &TransactionId) {
    let cookie = proto::MAGIC_COOKIE.to_be_bytes();
    dst[0] = 0;
    dst[2..4].copy_from_slice(&(addr.port() ^ (proto::MAGIC_COOKIE >> 16) as u16).to_be_bytes());
    match addr.ip() {
        IpAddr::V4(ip) => {
            dst[1] = 0x01;
            let o = ip.octets();
            for i in 0..4 {
                dst[4 + i] = o[i] ^ cookie[i];
            }
        }
        IpAddr::V6(ip) => {
            dst[1] = 0x02;
            let o = ip.octets();
            for i in 0..16 {
                let k = if i < 4 { cookie[i] } else { tid.0[i - 4] };
                dst[4 + i] = o[i] ^ k;
            }
        }
    }
}
