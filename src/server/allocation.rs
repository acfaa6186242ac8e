//! One TURN allocation (RFC 8656 section 2.2): its relay socket handle, lifetime,
//! permissions and channel bindings. Pure data plus the small lookups the relay path
//! needs; no I/O and no clock of its own.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::{FiveTuple, RelayHandle};
use crate::auth::Key;
use crate::proto::TransactionId;

/// RFC 8656 section 9: permissions last 300 seconds (the default and the maximum of
/// `relay.permission_lifetime`, `Limits::permission_lifetime`).
pub const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
/// RFC 8656 section 12: channel bindings last 600 seconds (the default and the maximum
/// of `relay.channel_lifetime`, `Limits::channel_lifetime`).
pub const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);
/// RFC 8656 section 12: after a binding expires, neither its number nor its peer may be
/// rebound to something else for 5 more minutes.
pub const CHANNEL_COOLDOWN: Duration = Duration::from_secs(300);

/// RFC 8656 section 12: channel numbers 0x4000-0x4FFF; RFC 5766 allowed up to 0x7FFF
/// and deployed clients (coturn's uclient among them) still use that range.
pub const CHANNEL_MIN: u16 = 0x4000;
pub const CHANNEL_MAX: u16 = 0x7FFF;

#[derive(Debug, Clone)]
pub struct Permission {
    pub ip: IpAddr,
    pub expires: Instant,
    /// The peer IP is denied by the peer policy and was let in only because the peer
    /// transport address is a live relay of this server: traffic to or from any other
    /// port of that IP stays refused.
    pub relays_only: bool,
}

#[derive(Debug, Clone)]
pub struct Channel {
    pub number: u16,
    pub peer: SocketAddr,
    /// Data flows while `now < expires`; the binding is kept (blocking rebinding to
    /// another number or peer) until `expires + CHANNEL_COOLDOWN`.
    pub expires: Instant,
    /// A kernel fast-path entry was queued for it and not yet removed.
    pub in_kernel: bool,
}

/// Per-allocation traffic counters (for usage records and metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub packets_to_peer: u64,
    pub bytes_to_peer: u64,
    pub packets_to_client: u64,
    pub bytes_to_client: u64,
}

impl Usage {
    /// What was counted after `earlier` (an earlier reading of the same counters).
    pub fn since(&self, earlier: &Usage) -> Usage {
        Usage {
            packets_to_peer: self.packets_to_peer.wrapping_sub(earlier.packets_to_peer),
            bytes_to_peer: self.bytes_to_peer.wrapping_sub(earlier.bytes_to_peer),
            packets_to_client: self
                .packets_to_client
                .wrapping_sub(earlier.packets_to_client),
            bytes_to_client: self.bytes_to_client.wrapping_sub(earlier.bytes_to_client),
        }
    }
}

/// A relayed transport address of an allocation.
#[derive(Debug, Clone, Copy)]
pub struct Relayed {
    pub handle: RelayHandle,
    pub bound: SocketAddr,
    pub advertised: SocketAddr,
}

#[derive(Debug)]
pub struct Allocation {
    pub id: u64,
    pub five_tuple: FiveTuple,
    pub relay: RelayHandle,
    /// Address the relay socket is bound to.
    pub relay_addr: SocketAddr,
    /// Address advertised in XOR-RELAYED-ADDRESS (differs behind 1:1 NAT).
    pub advertised: SocketAddr,
    /// The IPv6 relay of a dual allocation (ADDITIONAL-ADDRESS-FAMILY, RFC 8656
    /// section 7.2); the IPv4 one is `relay`.
    pub second: Option<Relayed>,
    /// An RFC 6062 TCP allocation: `relay` is a listening TCP socket.
    pub tcp: bool,
    pub username: Box<str>,
    pub key: Key,
    pub created: Instant,
    pub expires: Instant,
    pub permissions: Vec<Permission>,
    pub channels: Vec<Channel>,
    /// The Allocate transaction and its success response, for retransmissions.
    pub allocate_tid: TransactionId,
    pub allocate_response: Box<[u8]>,
    /// Totals since the allocation was created.
    pub usage: Usage,
    /// `usage` as of the last interim usage record (`[log] usage_interval`): the next
    /// record, interim or final, holds `usage.since(&reported)`.
    pub reported: Usage,
    /// When the last interim usage record was written (`created` before the first).
    pub last_report: Instant,
    /// `[limits] max_bandwidth_per_allocation`, client to peer and peer to client.
    pub bucket_out: super::TokenBucket,
    pub bucket_in: super::TokenBucket,
}

impl Allocation {
    /// The relay socket that talks to peers of this family, if the allocation has one.
    #[inline]
    pub fn relay_for(&self, v6: bool) -> Option<RelayHandle> {
        if self.relay_addr.is_ipv6() == v6 {
            return Some(self.relay);
        }
        self.second
            .filter(|s| s.bound.is_ipv6() == v6)
            .map(|s| s.handle)
    }

    /// Every relayed address: (handle, bound, advertised).
    pub fn relayed(&self) -> impl Iterator<Item = Relayed> + '_ {
        std::iter::once(Relayed {
            handle: self.relay,
            bound: self.relay_addr,
            advertised: self.advertised,
        })
        .chain(self.second)
    }

    /// The live permission for `ip`, if any.
    #[inline]
    pub fn permission(&self, ip: IpAddr, now: Instant) -> Option<&Permission> {
        self.permissions
            .iter()
            .find(|p| p.ip == ip && now < p.expires)
    }

    /// Installs or refreshes a permission for `lifetime` (`Limits::permission_lifetime`).
    pub fn install_permission(
        &mut self,
        ip: IpAddr,
        relays_only: bool,
        now: Instant,
        lifetime: Duration,
    ) {
        let expires = now + lifetime;
        if let Some(p) = self.permissions.iter_mut().find(|p| p.ip == ip) {
            p.expires = expires;
            // Once the policy allowed the whole IP, keep it allowed; a relays-only grant
            // never widens an existing one, and a full grant narrows nothing.
            p.relays_only = p.relays_only && relays_only;
        } else {
            self.permissions.push(Permission {
                ip,
                expires,
                relays_only,
            });
        }
    }

    /// Number of permissions installing `ips` would add.
    pub fn new_permissions(&self, ips: &[IpAddr]) -> usize {
        let mut n = 0;
        for (i, ip) in ips.iter().enumerate() {
            let dup = ips[..i].contains(ip);
            if !dup && !self.permissions.iter().any(|p| p.ip == *ip) {
                n += 1;
            }
        }
        n
    }

    /// Live channel by number (data may flow).
    #[inline]
    pub fn channel_peer(&self, number: u16, now: Instant) -> Option<SocketAddr> {
        self.channels
            .iter()
            .find(|c| c.number == number && now < c.expires)
            .map(|c| c.peer)
    }

    /// Live channel by peer transport address.
    #[inline]
    pub fn channel_for_peer(&self, peer: SocketAddr, now: Instant) -> Option<u16> {
        self.channels
            .iter()
            .find(|c| c.peer == peer && now < c.expires)
            .map(|c| c.number)
    }

    /// Drops expired permissions and channels past their cool-down.
    pub fn prune(&mut self, now: Instant) {
        self.permissions.retain(|p| now < p.expires);
        self.channels.retain(|c| now < c.expires + CHANNEL_COOLDOWN);
    }
}

/// Outcome of a ChannelBind check (RFC 8656 section 11.2).
#[derive(Debug, PartialEq, Eq)]
pub enum BindCheck {
    /// New binding.
    New,
    /// Refresh (or revive within the cool-down) of the same number and peer.
    Refresh,
    /// Number bound to another peer, or peer bound to another number: 400.
    Conflict,
}

impl Allocation {
    pub fn check_channel_bind(&self, number: u16, peer: SocketAddr) -> BindCheck {
        for c in &self.channels {
            if c.number == number && c.peer == peer {
                return BindCheck::Refresh;
            }
            if c.number == number || c.peer == peer {
                return BindCheck::Conflict;
            }
        }
        BindCheck::New
    }

    /// Binds or refreshes a channel for `lifetime` (`Limits::channel_lifetime`).
    pub fn bind_channel(
        &mut self,
        number: u16,
        peer: SocketAddr,
        now: Instant,
        lifetime: Duration,
    ) {
        let expires = now + lifetime;
        if let Some(c) = self
            .channels
            .iter_mut()
            .find(|c| c.number == number && c.peer == peer)
        {
            c.expires = expires;
        } else {
            self.channels.push(Channel {
                number,
                peer,
                expires,
                in_kernel: false,
            });
        }
    }
}
