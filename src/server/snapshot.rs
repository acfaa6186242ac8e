//! A worker's UDP allocations as plain data, for handing them to a new process (an
//! upgrade): exported from one core, imported into another, with relay sockets named by
//! the shell's numbers and instants as `CLOCK_MONOTONIC` nanoseconds (one clock for every
//! process of the machine). No I/O: the shell moves the bytes and the sockets.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::allocation::{Channel, Permission};
use super::{
    fastpath, Allocation, FiveTuple, RelayHandle, Relayed, Reservation, Server, TokenBucket,
    Transport, Usage,
};
use crate::proto::TransactionId;

/// An instant and the same moment as `CLOCK_MONOTONIC` nanoseconds, read together by the
/// shell: converts the core's instants to and from numbers another process understands.
#[derive(Debug, Clone, Copy)]
pub struct MonoClock {
    pub now: Instant,
    pub mono_ns: u64,
}

impl MonoClock {
    fn ns(self, t: Instant) -> u64 {
        if t >= self.now {
            let d = t.duration_since(self.now).as_nanos();
            self.mono_ns
                .saturating_add(u64::try_from(d).unwrap_or(u64::MAX))
        } else {
            let d = self.now.duration_since(t).as_nanos();
            self.mono_ns
                .saturating_sub(u64::try_from(d).unwrap_or(u64::MAX))
        }
    }

    fn instant(self, ns: u64) -> Instant {
        if ns >= self.mono_ns {
            let d = Duration::from_nanos(ns - self.mono_ns);
            self.now
                .checked_add(d)
                .unwrap_or(self.now + Duration::from_secs(86_400 * 365))
        } else {
            let d = Duration::from_nanos(self.mono_ns - ns);
            self.now.checked_sub(d).unwrap_or(self.now)
        }
    }
}

/// One relayed transport address: the socket (an index into the hand-over's list of
/// file descriptors), the address it is bound to and the one advertised.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RelayState {
    pub socket: u32,
    pub bound: SocketAddr,
    pub advertised: SocketAddr,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PermissionState {
    pub ip: IpAddr,
    pub expires: u64,
    pub relays_only: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChannelState {
    pub number: u16,
    pub peer: SocketAddr,
    /// Data flows until then; the cool-down runs [`super::CHANNEL_COOLDOWN`] after it.
    pub expires: u64,
}

/// A token bucket: tokens left and when it was last filled.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct BucketState {
    pub tokens: u64,
    pub last: u64,
}

/// One UDP allocation, whole.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AllocationState {
    pub id: u64,
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub relay: RelayState,
    pub second: Option<RelayState>,
    pub username: String,
    pub key: [u8; 16],
    pub created: u64,
    pub expires: u64,
    pub permissions: Vec<PermissionState>,
    pub channels: Vec<ChannelState>,
    pub allocate_tid: [u8; 12],
    pub allocate_response: Vec<u8>,
    /// Packets and bytes to the peer, packets and bytes to the client: totals, and as of
    /// the last usage record.
    pub usage: [u64; 4],
    pub reported: [u64; 4],
    pub last_report: u64,
    pub bucket_out: BucketState,
    pub bucket_in: BucketState,
}

/// A port reserved by an EVEN-PORT request with the R bit, waiting for its token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReservationState {
    pub token: [u8; 8],
    pub socket: u32,
    pub addr: SocketAddr,
    pub expires: u64,
}

/// Everything one worker hands over.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ShardState {
    pub allocations: Vec<AllocationState>,
    pub reservations: Vec<ReservationState>,
}

impl AllocationState {
    /// Its relayed addresses: the first, and the IPv6 one of a dual allocation.
    pub fn relays(&self) -> impl Iterator<Item = &RelayState> {
        std::iter::once(&self.relay).chain(&self.second)
    }
}

impl ShardState {
    /// Every socket number it names: the allocations' relays, then the reservations'.
    pub fn sockets(&self) -> impl Iterator<Item = u32> + '_ {
        self.allocations
            .iter()
            .flat_map(|a| a.relays().map(|r| r.socket))
            .chain(self.reservations.iter().map(|r| r.socket))
    }
}

fn usage_array(u: &Usage) -> [u64; 4] {
    [
        u.packets_to_peer,
        u.bytes_to_peer,
        u.packets_to_client,
        u.bytes_to_client,
    ]
}

fn usage_from(a: [u64; 4]) -> Usage {
    Usage {
        packets_to_peer: a[0],
        bytes_to_peer: a[1],
        packets_to_client: a[2],
        bytes_to_client: a[3],
    }
}

/// Does this allocation move with an upgrade? UDP clients only: a TCP or TLS client's
/// connection stays with the old process, and so does its allocation.
fn moves(a: &Allocation) -> bool {
    a.five_tuple.transport == Transport::Udp && !a.tcp
}

impl Server {
    /// The state of every UDP allocation and reservation, for a new process. `socket`
    /// names each relay socket (the shell duplicates it into the hand-over's list and
    /// returns its index there). The core is unchanged: if the hand-over fails, it goes
    /// on as before.
    pub fn export_udp(
        &self,
        clock: MonoClock,
        socket: &mut dyn FnMut(RelayHandle) -> u32,
    ) -> ShardState {
        let mut relay = |r: Relayed| RelayState {
            socket: socket(r.handle),
            bound: r.bound,
            advertised: r.advertised,
        };
        let bucket = |b: &TokenBucket| BucketState {
            tokens: b.tokens,
            last: clock.ns(b.last),
        };
        let mut out = ShardState::default();
        for a in self.allocations.iter().flatten().filter(|a| moves(a)) {
            out.allocations.push(AllocationState {
                id: a.id,
                client: a.five_tuple.client,
                server: a.five_tuple.server,
                relay: relay(Relayed {
                    handle: a.relay,
                    bound: a.relay_addr,
                    advertised: a.advertised,
                }),
                second: a.second.map(&mut relay),
                username: a.username.to_string(),
                key: a.key,
                created: clock.ns(a.created),
                expires: clock.ns(a.expires),
                permissions: a
                    .permissions
                    .iter()
                    .map(|p| PermissionState {
                        ip: p.ip,
                        expires: clock.ns(p.expires),
                        relays_only: p.relays_only,
                    })
                    .collect(),
                channels: a
                    .channels
                    .iter()
                    .map(|c| ChannelState {
                        number: c.number,
                        peer: c.peer,
                        expires: clock.ns(c.expires),
                    })
                    .collect(),
                allocate_tid: a.allocate_tid.0,
                allocate_response: a.allocate_response.to_vec(),
                usage: usage_array(&a.usage),
                reported: usage_array(&a.reported),
                last_report: clock.ns(a.last_report),
                bucket_out: bucket(&a.bucket_out),
                bucket_in: bucket(&a.bucket_in),
            });
        }
        for r in &self.reservations {
            out.reservations.push(ReservationState {
                token: r.token,
                socket: socket(r.relay),
                addr: r.addr,
                expires: clock.ns(r.expires),
            });
        }
        out
    }

    /// Takes over what [`Server::export_udp`] wrote in another process. `socket` gives
    /// the shell's handle of each socket index (registered by the shell beforehand), or
    /// `None` when there is no such socket: the state is refused whole. Allocations whose
    /// time ran out during the hand-over are taken too, and end at the next
    /// [`Server::handle_timeout`] with their usage records. Quotas count them whatever
    /// the limits now say (they exist already). Returns how many allocations were taken.
    pub fn import_udp(
        &mut self,
        state: &ShardState,
        clock: MonoClock,
        socket: &mut dyn FnMut(u32) -> Option<RelayHandle>,
    ) -> Result<usize, String> {
        let now = clock.now;
        // Check everything before changing anything.
        let mut seen = std::collections::HashSet::new();
        for a in &state.allocations {
            let ft = FiveTuple {
                transport: Transport::Udp,
                client: a.client,
                server: a.server,
            };
            if self.by_five_tuple.contains_key(&ft) || !seen.insert(ft) {
                return Err(format!("allocation {} of {} twice", a.id, a.client));
            }
            for r in a.relays() {
                if socket(r.socket).is_none() {
                    return Err(format!(
                        "allocation {} names relay socket {} that was not handed over",
                        a.id, r.socket
                    ));
                }
            }
            if a.channels
                .iter()
                .any(|c| !(super::CHANNEL_MIN..=super::CHANNEL_MAX).contains(&c.number))
            {
                return Err(format!(
                    "allocation {} has a channel number out of range",
                    a.id
                ));
            }
        }
        for r in &state.reservations {
            if socket(r.socket).is_none() {
                return Err(format!(
                    "a reservation names relay socket {} that was not handed over",
                    r.socket
                ));
            }
        }
        let bucket = |b: &BucketState| TokenBucket {
            tokens: b.tokens,
            last: clock.instant(b.last),
        };
        let mut max_id = 0;
        for s in &state.allocations {
            let handle =
                |r: &RelayState, socket: &mut dyn FnMut(u32) -> Option<RelayHandle>| Relayed {
                    handle: socket(r.socket).unwrap_or(RelayHandle(u32::MAX)),
                    bound: r.bound,
                    advertised: r.advertised,
                };
            let first = handle(&s.relay, socket);
            let second = s.second.as_ref().map(|r| handle(r, socket));
            let ft = FiveTuple {
                transport: Transport::Udp,
                client: s.client,
                server: s.server,
            };
            max_id = max_id.max(s.id);
            let mut alloc = Allocation {
                id: s.id,
                five_tuple: ft,
                relay: first.handle,
                relay_addr: first.bound,
                advertised: first.advertised,
                second,
                tcp: false,
                username: s.username.as_str().into(),
                key: s.key,
                created: clock.instant(s.created),
                expires: clock.instant(s.expires),
                permissions: s
                    .permissions
                    .iter()
                    .map(|p| Permission {
                        ip: p.ip,
                        expires: clock.instant(p.expires),
                        relays_only: p.relays_only,
                    })
                    .collect(),
                channels: s
                    .channels
                    .iter()
                    .map(|c| Channel {
                        number: c.number,
                        peer: c.peer,
                        expires: clock.instant(c.expires),
                        in_kernel: false,
                    })
                    .collect(),
                allocate_tid: TransactionId(s.allocate_tid),
                allocate_response: s.allocate_response.clone().into_boxed_slice(),
                usage: usage_from(s.usage),
                reported: usage_from(s.reported),
                last_report: clock.instant(s.last_report),
                bucket_out: bucket(&s.bucket_out),
                bucket_in: bucket(&s.bucket_in),
            };
            if self.fast_path_on && fastpath::eligible(&alloc) && now < alloc.expires {
                alloc.prune(now);
                fastpath::install_all(&mut alloc, now, &mut self.fast_path);
            }
            self.shared.adopt(&alloc.username);
            let slot = match self.free_slots.pop() {
                Some(i) => {
                    self.allocations[i] = Some(alloc);
                    i
                }
                None => {
                    self.allocations.push(Some(alloc));
                    self.allocations.len() - 1
                }
            };
            self.by_five_tuple.insert(ft, slot);
            self.register_relay(first, slot);
            if let Some(r) = second {
                self.register_relay(r, slot);
            }
            self.counters
                .allocation_created(Transport::Udp, first.bound.is_ipv6());
        }
        for r in &state.reservations {
            self.reservations.push(Reservation {
                token: r.token,
                relay: socket(r.socket).unwrap_or(RelayHandle(u32::MAX)),
                addr: r.addr,
                expires: clock.instant(r.expires),
            });
        }
        self.shared.ids_above(max_id);
        Ok(state.allocations.len())
    }

    /// The new process took the UDP allocations and reservations over: forget them here
    /// without a usage record or a kernel command (they live on there), releasing their
    /// relay sockets (this process's copies) through `binder`.
    pub fn forget_udp<B: super::RelayBinder>(&mut self, binder: &mut B) -> usize {
        let mut n = 0;
        for slot in 0..self.allocations.len() {
            if !self.allocations[slot].as_ref().is_some_and(moves) {
                continue;
            }
            let Some(a) = self.allocations[slot].take() else {
                continue;
            };
            self.free_slots.push(slot);
            self.by_five_tuple.remove(&a.five_tuple);
            for r in a.relayed() {
                self.unregister_relay(r, binder);
            }
            self.shared.release(&a.username);
            n += 1;
        }
        for r in self.reservations.drain(..) {
            binder.release(r.relay);
        }
        n
    }

    /// Adds what the kernel relayed for each UDP allocation (`take` gives it by
    /// allocation id, taken out of the kernel's accounts) to its usage, not yet reported:
    /// the next usage record, in this process or the next, carries it.
    pub fn fold_kernel_usage(&mut self, take: &mut dyn FnMut(u64) -> Option<[u64; 4]>) {
        for a in self.allocations.iter_mut().flatten().filter(|a| moves(a)) {
            if let Some(k) = take(a.id) {
                let k = usage_from(k);
                a.usage.packets_to_peer += k.packets_to_peer;
                a.usage.bytes_to_peer += k.bytes_to_peer;
                a.usage.packets_to_client += k.packets_to_client;
                a.usage.bytes_to_client += k.bytes_to_client;
            }
        }
    }

    /// Ends every allocation that does not move with an upgrade (TCP and TLS clients',
    /// RFC 6062 ones) with reason shutdown and its usage record: a restart, whose
    /// process takes those connections with it.
    pub fn close_streams<B: super::RelayBinder>(&mut self, now: Instant, binder: &mut B) -> usize {
        let mut n = 0;
        for slot in 0..self.allocations.len() {
            if self.allocations[slot].as_ref().is_some_and(|a| !moves(a)) {
                self.remove_allocation(slot, now, super::EndReason::Shutdown, binder);
                n += 1;
            }
        }
        n
    }

    /// The kernel fast path's maps were emptied under this core (the process gave its
    /// program up for an upgrade that then failed and loaded it again): install every
    /// live entry again at the next tick.
    pub fn reinstall_fast_path(&mut self) {
        if self.fast_path_on {
            self.fast_path_on = false;
            for a in self.allocations.iter_mut().flatten() {
                for c in &mut a.channels {
                    c.in_kernel = false;
                }
            }
        }
    }
}
