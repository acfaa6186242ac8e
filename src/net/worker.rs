//! One worker: a level-triggered epoll loop on its own thread driving one [`Server`]
//! core, this worker's listener sockets and the relay sockets of its allocations.
//!
//! The loop is the kernel floor's own shape: `epoll_wait`, then one `recvfrom` per ready
//! socket and one `sendto` per relayed packet. Level-triggered readiness means a socket
//! with more queued is simply reported again, so no call is spent on `EAGAIN`. No
//! lock, no heap allocation and no task hand-off on the relay path.

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use super::batch::{RecvBatch, SendBatch};
use super::ports::PortPool;
use super::socket;
use super::stream::Streams;
use super::{Common, WorkerSockets};
use crate::server::{
    BindError, BindResult, Clock, Event, FiveTuple, Output, RelayBinder, RelayHandle, Server,
    Transport, PEER_HEADROOM, PEER_TAILROOM,
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
/// How often the core's timers are run.
const TICK: Duration = Duration::from_secs(1);

struct RelayEntry {
    socket: UdpSocket,
    addr: SocketAddr,
}

#[derive(Default)]
struct Relays {
    entries: Vec<Option<RelayEntry>>,
    free: Vec<u32>,
}

impl Relays {
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
        let addr = sock.local_addr()?;
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
            .add(&sock, EpollEvent::new(EpollFlags::EPOLLIN, token))
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

    fn release(&mut self, relay: RelayHandle) {
        let Some(slot) = self.relays.entries.get_mut(relay.0 as usize) else {
            return;
        };
        if let Some(e) = slot.take() {
            // Closing the socket removes it from the epoll set.
            let _ = self.epoll.delete(&e.socket);
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
                    } else if let (Some(e), Some(bytes)) = (relays.get(relay), xbuf.get(payload)) {
                        let _ = e.socket.send_to(bytes, peer);
                    }
                }
            } else if token < RELAY_BASE {
                // A TCP or TLS listener.
                let i = (token - STREAM_LISTENER_BASE) as usize;
                if let Some((l, transport)) = stream_listeners.get(i) {
                    let tls = common.tls.load_full();
                    streams.accept(l, *transport, tls.as_ref(), &epoll, clock.now);
                }
            } else if token < STREAM_BASE {
                // A relay socket: one datagram from a peer.
                let handle = RelayHandle((token - RELAY_BASE) as u32);
                let Some(entry) = relays.get(handle) else {
                    continue;
                };
                let end = buf.len() - PEER_TAILROOM;
                let (len, from) = match entry.socket.recv_from(&mut buf[PEER_HEADROOM..end]) {
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
                // A client's TCP or TLS connection: complete frames go to the core.
                let gone = streams.on_event(
                    token,
                    ev.events(),
                    &epoll,
                    clock.now,
                    &mut |ft, frame, reply| {
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
                                if let Some(e) = relays.get(relay) {
                                    let _ = e.socket.send_to(data, peer);
                                }
                            }
                        }
                    },
                );
                closed.extend(gone);
            }
        }
        sbatch.flush(&listeners);
        let now = Instant::now();
        if now >= next_tick {
            next_tick = now + TICK;
            closed.extend(streams.tick(now, &epoll));
            let mut binder = Binder {
                relays: &mut relays,
                ports,
                epoll: &epoll,
                buffer,
            };
            core.handle_timeout(now, &mut binder);
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
        for ev in core.drain_events() {
            log_event(index, &ev);
        }
    }
}

fn log_event(worker: usize, ev: &Event) {
    match ev {
        Event::AllocationCreated {
            id,
            five_tuple,
            relay,
            username,
        } => tracing::info!(
            worker,
            allocation = id,
            client = %five_tuple.client,
            server = %five_tuple.server,
            transport = five_tuple.transport.as_str(),
            %relay,
            user = %username,
            "allocation created"
        ),
        Event::AllocationEnded {
            id,
            five_tuple,
            relay,
            username,
            duration,
            usage,
            reason,
        } => tracing::info!(
            worker,
            allocation = id,
            client = %five_tuple.client,
            %relay,
            user = %username,
            duration_ms = duration.as_millis() as u64,
            packets_to_peer = usage.packets_to_peer,
            bytes_to_peer = usage.bytes_to_peer,
            packets_to_client = usage.packets_to_client,
            bytes_to_client = usage.bytes_to_client,
            reason = ?reason,
            "allocation ended"
        ),
        Event::ErrorResponse { method, code } => {
            tracing::debug!(worker, method, code, "error response")
        }
    }
}
