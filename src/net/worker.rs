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
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use super::batch::{RecvBatch, SendBatch};
use super::ports::PortPool;
use super::socket;
use super::stream::Streams;
use super::{Common, WorkerSockets};
use crate::server::{
    BindError, BindResult, Clock, Command, Event, FiveTuple, Output, RelayBinder, RelayHandle,
    Server, Transport, PEER_HEADROOM, PEER_TAILROOM,
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
    buffer: usize,
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
        let token = RELAY_BASE + u64::from(idx);
        if let Err(e) = self
            .epoll
            .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, token))
        {
            self.relays.free.push(idx);
            return Err(e.into());
        }
        self.relays.entries[idx as usize] = Some(RelayEntry { socket: sock, addr });
        Ok((RelayHandle(idx), addr))
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
            self.ports.give_back(e.addr.ip(), e.addr.port());
            self.relays.free.push(relay.0);
        }
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

/// Runs worker `index` until the process exits.
pub(crate) fn run(index: usize, common: Arc<Common>, sockets: WorkerSockets) {
    if let Err(e) = run_loop(index, &common, sockets) {
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

fn run_loop(index: usize, common: &Common, sockets: WorkerSockets) -> io::Result<()> {
    let ports = &common.ports;
    let buffer = common.buffer;
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
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
    let mut streams = Streams::with_counter(
        common.stream_limits.clone(),
        STREAM_BASE,
        common.conns.clone(),
    );
    let mut core = Server::new(common.shared.clone());
    let mut relays = Relays::default();
    let mut buf = vec![0u8; BUF_LEN];
    // Client data bound for a peer, with room to frame it if the peer is local.
    let mut xbuf = vec![0u8; BUF_LEN];
    let mut events = vec![EpollEvent::empty(); EVENTS];
    let mut rbatch = RecvBatch::new();
    let mut sbatch = SendBatch::new();
    let mut closed: Vec<FiveTuple> = Vec::new();
    let mut peers = PeerConns::default();
    let mut peer_check = Instant::now() + TICK;
    let mut next_tick = Instant::now() + TICK;
    // Benchmarks compare the in-worker hand-off between two allocations with the
    // kernel path: TURNSTONE_NO_HANDOFF=1 turns it off.
    let handoff = std::env::var_os("TURNSTONE_NO_HANDOFF").is_none();

    loop {
        let wait = next_tick.saturating_duration_since(Instant::now());
        let timeout = EpollTimeout::from(wait.as_millis().min(1000) as u16 + 1);
        let n = match epoll.wait(&mut events, timeout) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => return Err(e.into()),
        };
        // One reading of the clocks per batch of events.
        let clock = clock();
        core.counters.handled(n as u64);
        for ev in &events[..n] {
            let token = ev.data();
            if token < STREAM_LISTENER_BASE {
                // A UDP listener: every queued client datagram.
                let idx = token as usize;
                let Some((local, sock)) = listeners.get(idx) else {
                    continue;
                };
                let local = *local;
                let n = rbatch.recv(sock);
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
                        relays: &mut relays,
                        ports,
                        epoll: &epoll,
                        buffer,
                    };
                    let (relay, peer, len) = match core.handle_client(ft, data, clock, &mut binder)
                    {
                        Output::Nothing => continue,
                        Output::ToClient(d) => {
                            sbatch.push(&listeners, idx, d, from);
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
                    let local = if handoff {
                        core.local_relay(relay, peer)
                    } else {
                        None
                    };
                    if let Some((to, from_addr)) = local {
                        // Both allocations live in this worker: hand the packet over
                        // directly; the receiving allocation's permissions apply.
                        if let Some((ft2, range)) =
                            core.handle_peer(to, from_addr, &mut xbuf, payload, clock.now)
                        {
                            if let Some(bytes) = xbuf.get(range) {
                                ToClients {
                                    listeners: &listeners,
                                    sbatch: &mut sbatch,
                                }
                                .send(
                                    &mut streams,
                                    &epoll,
                                    &ft2,
                                    bytes,
                                );
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
                    streams.accept(l, *transport, tls.as_ref(), &epoll, clock.now);
                }
            } else if token >= PEER_BASE {
                // An RFC 6062 peer connection.
                peers.on_event(
                    token,
                    ev.events(),
                    &epoll,
                    &mut core,
                    &mut streams,
                    &mut buf,
                    clock.now,
                );
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
                                Some(id) => peers.add(id, stream, None, &epoll),
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
                if let Some((ft, range)) =
                    core.handle_peer(handle, from, &mut buf, payload, clock.now)
                {
                    if let Some(bytes) = buf.get(range) {
                        ToClients {
                            listeners: &listeners,
                            sbatch: &mut sbatch,
                        }
                        .send(&mut streams, &epoll, &ft, bytes);
                    }
                }
            } else if streams.owns(token) {
                // A client's TCP or TLS connection: complete frames go to the core; a
                // spliced RFC 6062 data connection's bytes go to its peer.
                let gone = streams.on_event(
                    token,
                    ev.events(),
                    &epoll,
                    clock.now,
                    &mut |ft, frame, reply| {
                        if let Some(id) = core.data_connection(&ft) {
                            peers.write(id, frame, &epoll);
                            return true;
                        }
                        let mut binder = Binder {
                            relays: &mut relays,
                            ports,
                            epoll: &epoll,
                            buffer,
                        };
                        match core.handle_client(ft, frame, clock, &mut binder) {
                            Output::Nothing => {}
                            Output::ToClient(d) => reply.extend_from_slice(d),
                            Output::ToPeer { relay, peer, data } => {
                                if let Some(s) = relays.get(relay).and_then(RelayEntry::udp) {
                                    let _ = s.send_to(data, peer);
                                }
                            }
                        }
                        // A successful ConnectionBind: what follows is application data.
                        core.data_connection(&ft).is_some()
                    },
                );
                closed.extend(gone);
            }
        }
        sbatch.flush(&listeners);
        let now = Instant::now();
        core.counters.busy(now.saturating_duration_since(clock.now));
        if now >= next_tick {
            next_tick = now + TICK;
            common.metrics.flush(index, &mut core.counters);
            closed.extend(streams.tick(now, &epoll));
            let mut binder = Binder {
                relays: &mut relays,
                ports,
                epoll: &epoll,
                buffer,
            };
            core.handle_timeout(now, &mut binder);
            relays.compact();
            let shared = core.shared().clone();
            if shared
                .publish_sessions
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                shared.set_sessions(index, core.sessions(now, clock.unix));
            }
        }
        if !closed.is_empty() {
            let mut binder = Binder {
                relays: &mut relays,
                ports,
                epoll: &epoll,
                buffer,
            };
            for ft in closed.drain(..) {
                core.client_closed(&ft, now, &mut binder);
            }
        }
        // What the core asked for outside its answers (RFC 6062 connections).
        while let Some(cmd) = core.poll_command() {
            match cmd {
                Command::ConnectPeer { id, relay, peer } => {
                    let started = relays
                        .get(relay)
                        .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
                        .and_then(|e| socket::tcp_connect_from(e.addr, peer));
                    match started {
                        Ok(stream) => peers.add(id, stream, Some(now), &epoll),
                        Err(_) => core.tcp_connected(id, false, now),
                    }
                }
                Command::Splice { id, data } => peers.splice(id, data, &epoll),
                Command::ClosePeer { id } => peers.remove(id, &epoll),
                Command::CloseClient { ft } => {
                    streams.close(&ft, &epoll);
                }
                Command::ToClient { ft, bytes } => {
                    ToClients {
                        listeners: &listeners,
                        sbatch: &mut sbatch,
                    }
                    .send(&mut streams, &epoll, &ft, &bytes);
                }
            }
        }
        if now >= peer_check {
            peer_check = now + TICK;
            peers.expire_connecting(now, &epoll, &mut core);
        }
        sbatch.flush(&listeners);
        for ev in core.drain_events() {
            log_event(index, &ev);
        }
    }
}

/// One RFC 6062 peer connection.
struct PeerConn {
    id: u32,
    stream: TcpStream,
    /// Set while the outgoing connection is being established.
    connecting: Option<Instant>,
    /// The client's data connection, once bound.
    data: Option<FiveTuple>,
    /// Bytes from the client not yet taken by the peer's socket.
    wbuf: Vec<u8>,
    interest: EpollFlags,
}

/// The RFC 6062 peer connections of one worker; connection `slot` is epoll token
/// `PEER_BASE + slot`.
#[derive(Default)]
struct PeerConns {
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
        if epoll
            .add(&stream, EpollEvent::new(interest, PEER_BASE + slot as u64))
            .is_err()
        {
            self.free.push(slot);
            return;
        }
        self.slots[slot] = Some(PeerConn {
            id,
            stream,
            connecting,
            data: None,
            wbuf: Vec::new(),
            interest,
        });
        self.by_id.insert(id, slot);
    }

    fn set_interest(conn: &mut PeerConn, slot: usize, epoll: &Epoll) {
        let mut want = EpollFlags::empty();
        if conn.data.is_some() {
            want |= EpollFlags::EPOLLIN;
        }
        if conn.connecting.is_some() || !conn.wbuf.is_empty() {
            want |= EpollFlags::EPOLLOUT;
        }
        if want != conn.interest {
            let mut ev = EpollEvent::new(want, PEER_BASE + slot as u64);
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
/// transport, user}`; the end record is the usage record billing consumes.
fn log_event(worker: usize, ev: &Event) {
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
        } => span(*id, five_tuple, username).in_scope(|| {
            tracing::info!(
                worker,
                allocation = id,
                client = %five_tuple.client,
                server = %five_tuple.server,
                transport = five_tuple.transport.as_str(),
                %relay,
                user = %username,
                duration_ms = duration.as_millis() as u64,
                packets_to_peer = usage.packets_to_peer,
                bytes_to_peer = usage.bytes_to_peer,
                packets_to_client = usage.packets_to_client,
                bytes_to_client = usage.bytes_to_client,
                reason = reason.as_str(),
                "allocation ended"
            )
        }),
        Event::ErrorResponse { method, code } => {
            tracing::debug!(worker, method, code, "error response")
        }
    }
}
