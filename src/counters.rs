//! What the core and the shell count, in words both use: the client transport, why an
//! allocation ended, the direction and framing of relayed data, why authentication failed
//! or a packet was dropped (the label values of the metrics), and the per-worker plain
//! counters. It sits below both the core (`server`, which counts) and `metrics` (which
//! exports the counts), so neither imports the other.

use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Label values
// ---------------------------------------------------------------------------------------------

/// Transport of the client side of a 5-tuple (`transport` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp = 0,
    Tcp = 1,
    Tls = 2,
}
pub(crate) const TRANSPORTS: [&str; 3] = ["udp", "tcp", "tls"];

impl Transport {
    pub fn is_stream(self) -> bool {
        !matches!(self, Transport::Udp)
    }
    pub fn as_str(self) -> &'static str {
        TRANSPORTS[self as usize]
    }
}

/// Relayed address family of an allocation (`family` label): index 0 "ipv4", 1 "ipv6".
pub(crate) const FAMILIES: [&str; 2] = ["ipv4", "ipv6"];

/// Why an allocation ended (`reason` label of `turnstone_allocations_ended_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// Refresh with LIFETIME 0.
    Deleted = 0,
    /// Its lifetime ran out.
    Expired = 1,
    /// Its TCP/TLS connection closed.
    ConnectionClosed = 2,
    /// The server shut down (drain timeout) with it still open.
    Shutdown = 3,
}
pub(crate) const END_REASONS: [&str; 4] = ["deleted", "expired", "connection_closed", "shutdown"];

impl EndReason {
    pub fn as_str(self) -> &'static str {
        END_REASONS[self as usize]
    }
}

/// Which way relayed data went (`direction` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    ToPeer = 0,
    ToClient = 1,
}
pub(crate) const DIRECTIONS: [&str; 2] = ["to_peer", "to_client"];

/// How relayed data was framed on the client side (`path` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayPath {
    /// ChannelData.
    Channel = 0,
    /// Send / Data indications.
    Indication = 1,
}
pub(crate) const PATHS: [&str; 2] = ["channel", "indication"];

/// Why authentication failed (`reason` label of `turnstone_auth_failures_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthFailure {
    /// No MESSAGE-INTEGRITY (the first, challenged request of every client counts here).
    Missing = 0,
    /// MESSAGE-INTEGRITY did not verify.
    BadCredentials = 1,
    /// The nonce had expired (438).
    StaleNonce = 2,
    /// No such static user and not a REST API username.
    UnknownUser = 3,
    /// A REST API username whose expiry time has passed.
    Expired = 4,
}
pub(crate) const AUTH_FAILURES: [&str; 5] = [
    "missing",
    "bad_credentials",
    "stale_nonce",
    "unknown_user",
    "expired",
];

/// Why a packet was dropped (`reason` label of `turnstone_dropped_packets_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// From or to a peer without a permission.
    NoPermission = 0,
    /// Data for a 5-tuple or relay without an allocation.
    NoAllocation = 1,
    /// ChannelData on an unbound channel.
    NoChannel = 2,
    /// Over `max_bandwidth_per_allocation` or `max_total_bandwidth`.
    Bandwidth = 3,
    /// The socket's send buffer was full (EAGAIN / ENOBUFS) or a stream's queue was full.
    SendBuffer = 4,
    /// Over `unauthenticated_rate` for its source address.
    RateLimited = 5,
    /// Not STUN or ChannelData, or failed to parse.
    Malformed = 6,
}
pub(crate) const DROP_REASONS: [&str; 7] = [
    "no_permission",
    "no_allocation",
    "no_channel",
    "bandwidth",
    "send_buffer",
    "rate_limited",
    "malformed",
];

/// Error codes counted by `turnstone_responses_total{code}`; anything else is "other".
pub const RESPONSE_CODES: [u16; 16] = [
    300, 400, 401, 403, 420, 437, 438, 440, 441, 442, 443, 446, 447, 486, 500, 508,
];
pub(crate) const RESPONSE_LABELS: [&str; 17] = [
    "300", "400", "401", "403", "420", "437", "438", "440", "441", "442", "443", "446", "447",
    "486", "500", "508", "other",
];

pub(crate) fn response_slot(code: u16) -> usize {
    RESPONSE_CODES
        .iter()
        .position(|&c| c == code)
        .unwrap_or(RESPONSE_CODES.len())
}

// ---------------------------------------------------------------------------------------------
// Per-worker counters
// ---------------------------------------------------------------------------------------------

/// One worker's counts since its last [`Metrics::flush`]: plain integers, owned by the
/// worker (or its core), incremented on the relay path without any synchronisation.
#[derive(Clone, Debug)]
pub struct WorkerCounters {
    pub(crate) created: [[u64; 2]; 3],
    pub(crate) ended: [[u64; 2]; 3],
    pub(crate) ended_by_reason: [u64; 4],
    pub(crate) relayed_packets: [[u64; 2]; 2],
    pub(crate) relayed_bytes: [[u64; 2]; 2],
    pub(crate) auth_failures: [u64; 5],
    pub(crate) responses: [u64; 17],
    pub(crate) dropped: [u64; 7],
    pub(crate) packets: u64,
    pub(crate) busy: Duration,
    pub(crate) last_flush: Instant,
}

impl Default for WorkerCounters {
    fn default() -> Self {
        WorkerCounters::new()
    }
}

impl WorkerCounters {
    pub fn new() -> WorkerCounters {
        WorkerCounters {
            created: [[0; 2]; 3],
            ended: [[0; 2]; 3],
            ended_by_reason: [0; 4],
            relayed_packets: [[0; 2]; 2],
            relayed_bytes: [[0; 2]; 2],
            auth_failures: [0; 5],
            responses: [0; 17],
            dropped: [0; 7],
            packets: 0,
            busy: Duration::ZERO,
            last_flush: Instant::now(),
        }
    }

    /// An allocation was created; `ipv6`: its relayed address is IPv6.
    #[inline]
    pub fn allocation_created(&mut self, transport: Transport, ipv6: bool) {
        let t = transport as usize;
        self.created[t][usize::from(ipv6)] += 1;
    }

    /// An allocation ended (every created allocation must end exactly once, or the
    /// active gauge drifts).
    #[inline]
    pub fn allocation_ended(&mut self, transport: Transport, ipv6: bool, reason: EndReason) {
        let t = transport as usize;
        self.ended[t][usize::from(ipv6)] += 1;
        self.ended_by_reason[reason as usize] += 1;
    }

    /// One packet of `bytes` application data relayed.
    #[inline]
    pub fn relayed(&mut self, direction: Direction, path: RelayPath, bytes: usize) {
        let (d, p) = (direction as usize, path as usize);
        self.relayed_packets[d][p] += 1;
        self.relayed_bytes[d][p] += bytes as u64;
    }

    /// `packets` packets of `bytes` bytes in total relayed (for callers that batch).
    #[inline]
    pub fn relayed_many(
        &mut self,
        direction: Direction,
        path: RelayPath,
        packets: u64,
        bytes: u64,
    ) {
        let (d, p) = (direction as usize, path as usize);
        self.relayed_packets[d][p] += packets;
        self.relayed_bytes[d][p] += bytes;
    }

    #[inline]
    pub fn auth_failure(&mut self, reason: AuthFailure) {
        self.auth_failures[reason as usize] += 1;
    }

    /// An error response with this code was sent.
    #[inline]
    pub fn response(&mut self, code: u16) {
        if let Some(n) = self.responses.get_mut(response_slot(code)) {
            *n += 1;
        }
    }

    #[inline]
    pub fn dropped(&mut self, reason: DropReason) {
        self.dropped[reason as usize] += 1;
    }

    /// `n` packets (of any kind, in or out) handled: `turnstone_worker_packets_total`.
    #[inline]
    pub fn handled(&mut self, n: u64) {
        self.packets += n;
    }

    /// Time spent working (outside `epoll_wait`): `turnstone_worker_load`.
    #[inline]
    pub fn busy(&mut self, d: Duration) {
        self.busy += d;
    }

    pub(crate) fn reset(&mut self, now: Instant) {
        *self = WorkerCounters {
            last_flush: now,
            ..WorkerCounters::new()
        };
    }
}
