//! RFC 6062 TCP allocations: Connect, ConnectionBind, ConnectionAttempt and the peer
//! connections they create. The core keeps the connection table and its 30 second
//! timers; the shell owns the sockets and is told what to do through [`Command`]s.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::{Authed, FiveTuple, Reply, Runtime, Server};
use crate::proto::{attr, method, Class, Message, MessageWriter, TransactionId};

/// RFC 6062 section 5.2/5.3: a connection must be bound with ConnectionBind within 30 s.
pub const CONNECTION_BIND_TIMEOUT: Duration = Duration::from_secs(30);

/// What the core asks the shell to do outside the answer to the current message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Open a TCP connection from the relayed address of `relay` to `peer`, then call
    /// [`Server::tcp_connected`].
    ConnectPeer {
        id: u32,
        relay: super::RelayHandle,
        peer: SocketAddr,
    },
    /// Peer connection `id` is bound to the client's data connection `data`: start
    /// moving bytes both ways.
    Splice { id: u32, data: FiveTuple },
    /// Close peer connection `id`.
    ClosePeer { id: u32 },
    /// Close the client's stream `ft` (a data connection whose peer went away).
    CloseClient { ft: FiveTuple },
    /// Send a message to a client on its stream (answers that come later, indications).
    ToClient { ft: FiveTuple, bytes: Vec<u8> },
}

#[derive(Debug)]
pub(super) enum TcpState {
    /// Connect sent; waiting for the shell's outgoing connection.
    Connecting {
        tid: TransactionId,
        sha256: bool,
        fingerprint: bool,
    },
    /// Established (or accepted); waiting for ConnectionBind until `expires`.
    Pending { expires: Instant },
    /// Bound to the client's data connection.
    Bound { data: FiveTuple },
}

#[derive(Debug)]
pub(super) struct TcpConn {
    pub slot: usize,
    pub peer: SocketAddr,
    /// Opened by a Connect request (not accepted from the peer).
    pub outgoing: bool,
    pub state: TcpState,
}

/// Bits of a CONNECTION-ID that carry the shard index of the core that handed it out
/// (the high bits; `[server] workers` is at most 1024).
const SHARD_BITS: u32 = 10;
const SERIAL_BITS: u32 = 32 - SHARD_BITS;
const SERIAL_MASK: u32 = (1 << SERIAL_BITS) - 1;

/// The shard index a CONNECTION-ID names: the core that handed it out holds its peer
/// connection and allocation.
pub fn connection_shard(id: u32) -> usize {
    (id >> SERIAL_BITS) as usize
}

impl Server {
    /// Sets this core's shard index (0 unless called), which every CONNECTION-ID it
    /// hands out from now on carries ([`connection_shard`]). Indexes above 1023 are
    /// taken modulo 1024.
    pub fn set_shard(&mut self, index: usize) {
        self.shard = (index as u32) & ((1 << SHARD_BITS) - 1);
    }

    fn next_connection_id(&mut self) -> u32 {
        loop {
            self.next_conn_id = self.next_conn_id.wrapping_add(1) & SERIAL_MASK;
            let id = (self.shard << SERIAL_BITS) | self.next_conn_id;
            if id != 0 && !self.tcp_conns.contains_key(&id) {
                return id;
            }
        }
    }

    /// Connect request (RFC 6062 section 5.2): answered later, when the shell reports
    /// the outgoing connection's fate.
    pub(super) fn connect(
        &mut self,
        rt: &Runtime,
        ft: FiveTuple,
        msg: &Message<'_>,
        auth: &Authed,
    ) -> Reply {
        let slot = match self.owned_allocation(rt, ft, msg, auth) {
            Ok(s) => s,
            Err(r) => return r,
        };
        let Ok(Some(peer)) = msg.xor_peer_address() else {
            return self.fail(rt, msg, 400, auth);
        };
        let Some(Some(alloc)) = self.allocations.get(slot) else {
            return Reply::Drop;
        };
        if !alloc.tcp {
            return self.fail(rt, msg, 400, auth);
        }
        let family_ok = alloc.relay_for(peer.is_ipv6()).is_some();
        let relay = alloc.relay;
        let relays_only = match self.check_peer(rt, family_ok, peer) {
            Ok(r) => r,
            Err(code) => return self.fail(rt, msg, code, auth),
        };
        if self
            .tcp_conns
            .values()
            .any(|c| c.slot == slot && c.peer == peer && c.outgoing)
        {
            // 446 Connection Already Exists.
            return self.fail(rt, msg, 446, auth);
        }
        let now = self.last_now;
        if let Some(Some(alloc)) = self.allocations.get_mut(slot) {
            alloc.install_permission(peer.ip(), relays_only, now, rt.limits.permission_lifetime);
        }
        let id = self.next_connection_id();
        self.tcp_conns.insert(
            id,
            TcpConn {
                slot,
                peer,
                outgoing: true,
                state: TcpState::Connecting {
                    tid: msg.transaction_id(),
                    sha256: auth.sha256,
                    fingerprint: msg.has_fingerprint(),
                },
            },
        );
        self.commands.push(Command::ConnectPeer { id, relay, peer });
        Reply::Drop
    }

    /// ConnectionBind (RFC 6062 section 5.4) on a new client connection: it becomes the
    /// data connection of peer connection CONNECTION-ID.
    pub(super) fn connection_bind(
        &mut self,
        rt: &Runtime,
        ft: FiveTuple,
        msg: &Message<'_>,
        auth: &Authed,
    ) -> Reply {
        if !ft.transport.is_stream() || self.by_five_tuple.contains_key(&ft) {
            return self.fail(rt, msg, 400, auth);
        }
        let Some(id) = msg
            .get(attr::CONNECTION_ID)
            .and_then(|v| <[u8; 4]>::try_from(v).ok())
            .map(u32::from_be_bytes)
        else {
            return self.fail(rt, msg, 400, auth);
        };
        let Some(conn) = self.tcp_conns.get(&id) else {
            return self.fail(rt, msg, 400, auth);
        };
        if !matches!(conn.state, TcpState::Pending { .. }) {
            return self.fail(rt, msg, 400, auth);
        }
        let same_user = match (self.allocations.get(conn.slot), msg.username()) {
            (Some(Some(a)), Ok(Some(u))) => *a.username == *u,
            _ => false,
        };
        if !same_user {
            return self.fail(rt, msg, 441, auth);
        }
        if let Some(c) = self.tcp_conns.get_mut(&id) {
            c.state = TcpState::Bound { data: ft };
        }
        self.data_conns.insert(ft, id);
        self.commands.push(Command::Splice { id, data: ft });
        self.success(rt, msg, auth)
    }

    /// The shell's outgoing connection for Connect `id` succeeded or failed: answer the
    /// Connect (success with CONNECTION-ID, or 447).
    pub fn tcp_connected(&mut self, id: u32, ok: bool, now: Instant) {
        let Some(conn) = self.tcp_conns.get_mut(&id) else {
            return;
        };
        let TcpState::Connecting {
            tid,
            sha256,
            fingerprint,
        } = conn.state
        else {
            return;
        };
        let slot = conn.slot;
        if ok {
            conn.state = TcpState::Pending {
                expires: now + CONNECTION_BIND_TIMEOUT,
            };
        } else {
            self.tcp_conns.remove(&id);
        }
        let Some(Some(alloc)) = self.allocations.get(slot) else {
            return;
        };
        let rt = self.shared.runtime.load_full();
        let mut bytes = Vec::with_capacity(96);
        let class = if ok { Class::Success } else { Class::Error };
        let mut w = MessageWriter::new(&mut bytes, method::CONNECT, class, tid);
        if ok {
            w.u32_attr(attr::CONNECTION_ID, id);
        } else {
            w.error_code(447, crate::proto::reason_phrase(447));
        }
        if let Some(s) = &rt.software {
            w.attr(attr::SOFTWARE, s.as_bytes());
        }
        if sha256 {
            w.message_integrity_sha256(&alloc.key);
        } else {
            w.message_integrity(&alloc.key);
        }
        if fingerprint {
            w.fingerprint();
        }
        w.finish();
        self.commands.push(Command::ToClient {
            ft: alloc.five_tuple,
            bytes,
        });
    }

    /// A peer connected to the relayed address of TCP allocation `relay` (RFC 6062
    /// section 5.3). With a permission for its IP, the client is told by a
    /// ConnectionAttempt indication and the connection gets an id; without one, `None`
    /// and the shell closes it.
    pub fn tcp_incoming(
        &mut self,
        relay: super::RelayHandle,
        peer: SocketAddr,
        now: Instant,
    ) -> Option<u32> {
        let slot = *self.by_relay.get(relay.0 as usize)? as usize;
        let alloc = self.allocations.get(slot)?.as_ref()?;
        if !alloc.tcp {
            return None;
        }
        let perm = alloc.permission(peer.ip(), now)?;
        if perm.relays_only && !self.shared.is_live_relay(peer) {
            return None;
        }
        let ft = alloc.five_tuple;
        let id = self.next_connection_id();
        self.tcp_conns.insert(
            id,
            TcpConn {
                slot,
                peer,
                outgoing: false,
                state: TcpState::Pending {
                    expires: now + CONNECTION_BIND_TIMEOUT,
                },
            },
        );
        let mut bytes = Vec::with_capacity(64);
        let mut w = MessageWriter::new(
            &mut bytes,
            method::CONNECTION_ATTEMPT,
            Class::Indication,
            TransactionId(rand::random()),
        );
        w.u32_attr(attr::CONNECTION_ID, id);
        w.xor_address(attr::XOR_PEER_ADDRESS, peer);
        w.finish();
        self.commands.push(Command::ToClient { ft, bytes });
        Some(id)
    }

    /// The peer side of connection `id` closed: its data connection (if bound) goes too.
    pub fn tcp_closed(&mut self, id: u32) {
        if let Some(conn) = self.tcp_conns.remove(&id) {
            if let TcpState::Bound { data } = conn.state {
                self.data_conns.remove(&data);
                self.commands.push(Command::CloseClient { ft: data });
            }
        }
    }

    /// The peer connection a client data connection is spliced to, if any.
    #[inline]
    pub fn data_connection(&self, ft: &FiveTuple) -> Option<u32> {
        if self.data_conns.is_empty() {
            return None;
        }
        self.data_conns.get(ft).copied()
    }

    /// Takes the next command for the shell.
    pub fn poll_command(&mut self) -> Option<Command> {
        if self.commands.is_empty() {
            None
        } else {
            Some(self.commands.remove(0))
        }
    }

    /// A client's data connection closed: its peer connection goes too.
    pub(super) fn data_closed(&mut self, ft: &FiveTuple) -> bool {
        let Some(id) = self.data_conns.remove(ft) else {
            return false;
        };
        self.tcp_conns.remove(&id);
        self.commands.push(Command::ClosePeer { id });
        true
    }

    /// Ends every connection of allocation `slot` (the allocation is going away).
    pub(super) fn close_tcp_of(&mut self, slot: usize) {
        let ids: Vec<u32> = self
            .tcp_conns
            .iter()
            .filter(|(_, c)| c.slot == slot)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(conn) = self.tcp_conns.remove(&id) {
                if let TcpState::Bound { data } = conn.state {
                    self.data_conns.remove(&data);
                    self.commands.push(Command::CloseClient { ft: data });
                }
                self.commands.push(Command::ClosePeer { id });
            }
        }
    }

    /// Connections not bound within 30 s are closed.
    pub(super) fn expire_tcp(&mut self, now: Instant) {
        if self.tcp_conns.is_empty() {
            return;
        }
        let expired: Vec<u32> = self
            .tcp_conns
            .iter()
            .filter(|(_, c)| matches!(c.state, TcpState::Pending { expires } if now >= expires))
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.tcp_conns.remove(&id);
            self.commands.push(Command::ClosePeer { id });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(m: u16, id: Option<u32>) -> Vec<u8> {
        let mut buf = Vec::new();
        let mut w = MessageWriter::new(&mut buf, m, Class::Request, TransactionId([7; 12]));
        if let Some(id) = id {
            w.u32_attr(attr::CONNECTION_ID, id);
        }
        w.finish();
        buf
    }

    #[test]
    fn connection_ids_name_their_shard() {
        for shard in [0usize, 1, 3, 1023] {
            let id = ((shard as u32) << SERIAL_BITS) | 0x1234;
            assert_eq!(connection_shard(id), shard);
            assert_eq!(
                super::super::owner_shard(&request(method::CONNECTION_BIND, Some(id))),
                Some(shard)
            );
        }
        // Not a ConnectionBind request with a CONNECTION-ID: nothing to route.
        assert_eq!(
            super::super::owner_shard(&request(method::CONNECTION_BIND, None)),
            None
        );
        assert_eq!(
            super::super::owner_shard(&request(method::BINDING, Some(1 << 22))),
            None
        );
        assert_eq!(
            super::super::owner_shard(&[0x40, 0, 0, 4, 1, 2, 3, 4]),
            None
        );
        assert_eq!(super::super::owner_shard(&[0, 0x0B, 0]), None);
    }
}
