//! Commands that keep a kernel data plane's relay entries in step with the core.
//
// The core stays the only place that decides what may be relayed: it queues install /
// remove commands for (client 5-tuple, channel or peer) <-> (relay address, peer)
// entries, and the shell applies them to the kernel's maps (drained with
// `Server::drain_fast_path`). Each `Server` writes only the entries of its own
// allocations, so every entry has exactly one writer.
//
// Which allocations get entries: only those whose client 5-tuple is UDP (TCP and TLS
// control connections and RFC 6062 TCP allocations never do), and only while
// `Runtime::kernel_fast_path` is on and no bandwidth limit is set (see
// `Server::fast_path_wanted`). Entries exist for permitted, policy-checked peers only:
// they are made from the permissions and channel bindings the request handlers
// granted, never from anything else.
//
// When entries go: a permission's entry is removed by the first `handle_timeout` at or
// after its expiry, a channel's by the first one at or after the binding's expiry (its
// cool-down keeps the number reserved in the core but relays nothing, so the entry goes
// at expiry and only a new ChannelBind installs it again), and every entry of an
// allocation goes when the allocation ends, whatever the reason (Refresh 0, expiry, a
// user revoked or killed in the fleet store, or removed from the configuration by a
// reload, ended at the next tick, `close_all`, which the shell calls at drain end or
// applies as its own teardown). A revoked or removed user's requests are refused, so
// nothing new installs for it. A reload ends the allocations of users it leaves without
// a key (`Credentials::knows`, the fleet store's users and secrets: a TURN REST username
// keeps its allocations while a secret remains). Lifetimes are `Limits::
// permission_lifetime` and `channel_lifetime` (`[relay]`, at most the RFC's 300 s and
// 600 s), so no entry outlives what allowed it by more than one tick.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use super::allocation::{Allocation, Channel, Permission};
use super::Transport;

/// A channel binding as the kernel relays it.
///
/// Client to peer: ChannelData with `number` arriving from `client` on `server` leaves
/// as a UDP datagram from `relay` to `peer` (key [`ChannelEntry::client_key`]). Peer
/// to client: a UDP datagram from `peer` to `relay` leaves as ChannelData with `number`
/// from `server` to `client` (key [`ChannelEntry::relay_key`]). Either direction also
/// needs the [`PermissionEntry`] of the peer's IP on the same relay, as in the core:
/// a binding outlives its permission when only the permission is not refreshed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChannelEntry {
    /// The allocation's id (as in `Event::AllocationCreated`), for per-allocation counters.
    pub allocation: u64,
    /// The client's address (the client side of the UDP 5-tuple).
    pub client: SocketAddr,
    /// The server's listening address the client talks to.
    pub server: SocketAddr,
    /// The relay socket's address as bound (the source of datagrams to the peer).
    pub relay: SocketAddr,
    /// The relay address as advertised in XOR-RELAYED-ADDRESS (differs behind 1:1 NAT);
    /// what a peer that is another allocation of this server was told.
    pub relay_advertised: SocketAddr,
    /// The peer's transport address.
    pub peer: SocketAddr,
    /// The channel number (0x4000-0x7FFF).
    pub number: u16,
    /// The binding's expiry: the shell may age the entry out on its own at this instant
    /// (the core removes it at its first tick at or after it anyway).
    pub expires: Instant,
}

/// A permission as the kernel relays it.
///
/// Peer to client: a UDP datagram from `peer_ip` (any port) to `relay` leaves as a Data
/// indication to `client` unless a [`ChannelEntry`] for that peer makes it ChannelData
/// (key [`PermissionEntry::relay_key`]). Client to peer: a Send indication from `client`
/// on `server` whose XOR-PEER-ADDRESS has `peer_ip` leaves as a UDP datagram from
/// `relay` (key [`PermissionEntry::client_key`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PermissionEntry {
    /// The allocation's id, for per-allocation counters.
    pub allocation: u64,
    pub client: SocketAddr,
    pub server: SocketAddr,
    /// The relay socket of the peer's family, as bound.
    pub relay: SocketAddr,
    /// The same relay as advertised.
    pub relay_advertised: SocketAddr,
    pub peer_ip: IpAddr,
    /// The peer policy denies `peer_ip`; it was permitted only because a relay address
    /// of this server is on it. The kernel must then relay only to and from transport
    /// addresses that are live relay addresses of this server (as the core checks with
    /// `Shared::is_live_relay`), never to another port of that IP.
    pub relays_only: bool,
    /// The permission's expiry (the shell may age the entry out on its own).
    pub expires: Instant,
}

/// Client to peer key of a channel: (client 5-tuple, channel number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientChannelKey {
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub number: u16,
}

/// Peer to client key of a channel: (relay address as bound, peer transport address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelayPeerKey {
    pub relay: SocketAddr,
    pub peer: SocketAddr,
}

/// Client to peer key of a permission (Send indications): (client 5-tuple, peer IP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientPermissionKey {
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub peer_ip: IpAddr,
}

/// Peer to client key of a permission: (relay address as bound, peer IP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelayPermissionKey {
    pub relay: SocketAddr,
    pub peer_ip: IpAddr,
}

impl ChannelEntry {
    pub fn client_key(&self) -> ClientChannelKey {
        ClientChannelKey {
            client: self.client,
            server: self.server,
            number: self.number,
        }
    }
    pub fn relay_key(&self) -> RelayPeerKey {
        RelayPeerKey {
            relay: self.relay,
            peer: self.peer,
        }
    }
}

impl PermissionEntry {
    pub fn client_key(&self) -> ClientPermissionKey {
        ClientPermissionKey {
            client: self.client,
            server: self.server,
            peer_ip: self.peer_ip,
        }
    }
    pub fn relay_key(&self) -> RelayPermissionKey {
        RelayPermissionKey {
            relay: self.relay,
            peer_ip: self.peer_ip,
        }
    }
}

/// What the shell must do to the kernel's maps; drained with
/// [`Server::drain_fast_path`](super::Server::drain_fast_path), applied in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FastPathCommand {
    /// Insert both keys of the binding, or overwrite them (a refresh: same keys, later
    /// `expires`; also a binding revived within its cool-down).
    InstallChannel(ChannelEntry),
    /// Delete both keys of the binding.
    RemoveChannel(ChannelEntry),
    /// Insert or overwrite both keys of the permission (a refresh: later `expires`).
    InstallPermission(PermissionEntry),
    /// Delete both keys of the permission.
    RemovePermission(PermissionEntry),
    /// Delete every entry (a previous run's leftovers): queued once by `Server::new`
    /// when the fast path is on, before any install. Every worker's `Server` queues
    /// one; the shell applies the first and only before any worker serves traffic.
    Clear,
}

/// Can this allocation's traffic move to the kernel at all? Only a UDP client 5-tuple
/// with a UDP relay.
#[inline]
pub(super) fn eligible(a: &Allocation) -> bool {
    a.five_tuple.transport == Transport::Udp && !a.tcp
}

pub(super) fn channel_entry(a: &Allocation, c: &Channel) -> Option<ChannelEntry> {
    let r = a
        .relayed()
        .find(|r| r.bound.is_ipv6() == c.peer.is_ipv6())?;
    Some(ChannelEntry {
        allocation: a.id,
        client: a.five_tuple.client,
        server: a.five_tuple.server,
        relay: r.bound,
        relay_advertised: r.advertised,
        peer: c.peer,
        number: c.number,
        expires: c.expires,
    })
}

pub(super) fn permission_entry(a: &Allocation, p: &Permission) -> Option<PermissionEntry> {
    let r = a.relayed().find(|r| r.bound.is_ipv6() == p.ip.is_ipv6())?;
    Some(PermissionEntry {
        allocation: a.id,
        client: a.five_tuple.client,
        server: a.five_tuple.server,
        relay: r.bound,
        relay_advertised: r.advertised,
        peer_ip: p.ip,
        relays_only: p.relays_only,
        expires: p.expires,
    })
}

/// Queues the install (or refresh) of the permission for `ip`, as it now stands.
pub(super) fn install_permission(a: &Allocation, ip: IpAddr, out: &mut Vec<FastPathCommand>) {
    if let Some(e) = a
        .permissions
        .iter()
        .find(|p| p.ip == ip)
        .and_then(|p| permission_entry(a, p))
    {
        out.push(FastPathCommand::InstallPermission(e));
    }
}

/// Queues the install (or refresh) of channel `number` as it now stands, and marks it
/// as in the kernel.
pub(super) fn install_channel(a: &mut Allocation, number: u16, out: &mut Vec<FastPathCommand>) {
    let Some(i) = a.channels.iter().position(|c| c.number == number) else {
        return;
    };
    if let Some(e) = a.channels.get(i).and_then(|c| channel_entry(a, c)) {
        out.push(FastPathCommand::InstallChannel(e));
        if let Some(c) = a.channels.get_mut(i) {
            c.in_kernel = true;
        }
    }
}

/// Queues the install of everything of `a` that is live at `now` (the fast path was
/// just switched on). Expired permissions have been pruned before this is called.
pub(super) fn install_all(a: &mut Allocation, now: Instant, out: &mut Vec<FastPathCommand>) {
    for p in &a.permissions {
        if let Some(e) = permission_entry(a, p).filter(|_| now < p.expires) {
            out.push(FastPathCommand::InstallPermission(e));
        }
    }
    for i in 0..a.channels.len() {
        let live = a.channels.get(i).is_some_and(|c| now < c.expires);
        if let (true, Some(number)) = (live, a.channels.get(i).map(|c| c.number)) {
            install_channel(a, number, out);
        }
    }
}

/// Queues the removal of every entry `a` has in the kernel for peers of family `v6`
/// (`None`: every family), and unmarks its channels.
pub(super) fn remove_all(a: &mut Allocation, v6: Option<bool>, out: &mut Vec<FastPathCommand>) {
    let family = |ip: IpAddr| v6.is_none_or(|v6| ip.is_ipv6() == v6);
    // Channels first: a channel entry is useless without its permission.
    for c in a
        .channels
        .iter()
        .filter(|c| c.in_kernel && family(c.peer.ip()))
    {
        if let Some(e) = channel_entry(a, c) {
            out.push(FastPathCommand::RemoveChannel(e));
        }
    }
    for c in a.channels.iter_mut().filter(|c| family(c.peer.ip())) {
        c.in_kernel = false;
    }
    for p in a.permissions.iter().filter(|p| family(p.ip)) {
        if let Some(e) = permission_entry(a, p) {
            out.push(FastPathCommand::RemovePermission(e));
        }
    }
}

/// Queues the removal of what has expired at `now`: channels past their expiry (their
/// cool-down starts; the core keeps them until it ends) and permissions about to be
/// pruned. Call right before [`Allocation::prune`].
pub(super) fn expire(a: &mut Allocation, now: Instant, out: &mut Vec<FastPathCommand>) {
    for c in a
        .channels
        .iter()
        .filter(|c| c.in_kernel && now >= c.expires)
    {
        if let Some(e) = channel_entry(a, c) {
            out.push(FastPathCommand::RemoveChannel(e));
        }
    }
    for c in a.channels.iter_mut().filter(|c| now >= c.expires) {
        c.in_kernel = false;
    }
    for p in a.permissions.iter().filter(|p| now >= p.expires) {
        if let Some(e) = permission_entry(a, p) {
            out.push(FastPathCommand::RemovePermission(e));
        }
    }
}
