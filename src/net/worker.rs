//! One worker: a current-thread tokio runtime driving one [`Server`] core, this worker's
//! listener sockets and the relay sockets of its allocations. Tasks share the core
//! through a `RefCell` and never hold a borrow across an `.await`.

use std::cell::RefCell;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::net::UdpSocket;
use tokio::task::{AbortHandle, LocalSet};

use super::ports::PortPool;
use super::socket;
use crate::server::{
    BindError, BindResult, Clock, Event, FiveTuple, Output, RelayBinder, RelayHandle, Server,
    Shared, Transport, PEER_HEADROOM, PEER_TAILROOM,
};

/// Largest UDP payload plus room to frame it in place.
const BUF_LEN: usize = PEER_HEADROOM + 65536 + PEER_TAILROOM;

struct RelayEntry {
    socket: Rc<UdpSocket>,
    addr: SocketAddr,
    task: Option<AbortHandle>,
}

#[derive(Default)]
struct Relays {
    entries: Vec<Option<RelayEntry>>,
    free: Vec<u32>,
    /// Sockets bound during the last core call whose receive task is not running yet.
    pending: Vec<u32>,
}

impl Relays {
    fn get(&self, h: RelayHandle) -> Option<&RelayEntry> {
        self.entries.get(h.0 as usize).and_then(|e| e.as_ref())
    }
}

/// The shell's side of relay socket binding.
struct Binder<'a> {
    relays: &'a mut Relays,
    ports: &'a PortPool,
}

impl Binder<'_> {
    fn bind_one(&mut self, ip: IpAddr, port: u16) -> io::Result<(RelayHandle, SocketAddr)> {
        let std_sock = socket::udp_relay(SocketAddr::new(ip, port))?;
        let sock = UdpSocket::from_std(std_sock)?;
        let addr = sock.local_addr()?;
        let idx = match self.relays.free.pop() {
            Some(i) => i,
            None => {
                self.relays.entries.push(None);
                (self.relays.entries.len() - 1) as u32
            }
        };
        self.relays.entries[idx as usize] = Some(RelayEntry {
            socket: Rc::new(sock),
            addr,
            task: None,
        });
        self.relays.pending.push(idx);
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
            if let Some(t) = e.task {
                t.abort();
            }
            self.ports.give_back(e.addr.ip(), e.addr.port());
            self.relays.free.push(relay.0);
            self.relays.pending.retain(|&p| p != relay.0);
        }
    }
}

struct Worker {
    index: usize,
    core: RefCell<Server>,
    relays: RefCell<Relays>,
    ports: Arc<PortPool>,
    listeners: Vec<(SocketAddr, Rc<UdpSocket>)>,
    /// One receive buffer per worker: tasks use it only between awaits.
    buf: RefCell<Vec<u8>>,
}

fn clock() -> Clock {
    Clock {
        now: Instant::now(),
        unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    }
}

pub fn run(
    index: usize,
    shared: Arc<Shared>,
    ports: Arc<PortPool>,
    sockets: Vec<std::net::UdpSocket>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "worker {index}: cannot start runtime");
            return;
        }
    };
    let local = LocalSet::new();
    local.block_on(&rt, async move {
        let mut listeners = Vec::new();
        for s in sockets {
            let addr = match s.local_addr() {
                Ok(a) => a,
                Err(_) => continue,
            };
            match UdpSocket::from_std(s) {
                Ok(sock) => listeners.push((addr, Rc::new(sock))),
                Err(e) => tracing::error!(error = %e, "worker {index}: listener"),
            }
        }
        let w = Rc::new(Worker {
            index,
            core: RefCell::new(Server::new(shared)),
            relays: RefCell::new(Relays::default()),
            ports,
            listeners,
            buf: RefCell::new(vec![0u8; BUF_LEN]),
        });
        for i in 0..w.listeners.len() {
            tokio::task::spawn_local(listener_task(w.clone(), i));
        }
        timer_task(w).await;
    });
}

impl Worker {
    fn listener_for(&self, server: SocketAddr) -> Option<&Rc<UdpSocket>> {
        self.listeners
            .iter()
            .find(|(a, _)| *a == server)
            .map(|(_, s)| s)
    }

    /// Starts receive tasks for relay sockets bound during the last core call.
    fn spawn_pending(self: &Rc<Self>) {
        let pending = std::mem::take(&mut self.relays.borrow_mut().pending);
        for idx in pending {
            let sock = {
                let relays = self.relays.borrow();
                match relays.get(RelayHandle(idx)) {
                    Some(e) => e.socket.clone(),
                    None => continue,
                }
            };
            let task = tokio::task::spawn_local(relay_task(self.clone(), RelayHandle(idx), sock));
            if let Some(Some(e)) = self.relays.borrow_mut().entries.get_mut(idx as usize) {
                e.task = Some(task.abort_handle());
            }
        }
    }

    fn log_events(&self) {
        let mut core = self.core.borrow_mut();
        for ev in core.drain_events() {
            log_event(self.index, &ev);
        }
    }
}

async fn listener_task(w: Rc<Worker>, i: usize) {
    let (local, sock) = w.listeners[i].clone();
    loop {
        if sock.readable().await.is_err() {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        let mut bound_any = false;
        // Drain what is queued, then wait again.
        for _ in 0..64 {
            let mut buf = w.buf.borrow_mut();
            let (n, from) = match sock.try_recv_from(&mut buf[..]) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => continue,
            };
            let ft = FiveTuple {
                transport: Transport::Udp,
                client: from,
                server: local,
            };
            let mut core = w.core.borrow_mut();
            let mut relays = w.relays.borrow_mut();
            let mut binder = Binder {
                relays: &mut relays,
                ports: &w.ports,
            };
            match core.handle_client(ft, &buf[..n], clock(), &mut binder) {
                Output::Nothing => {}
                Output::ToClient(d) => {
                    let _ = sock.try_send_to(d, from);
                }
                Output::ToPeer { relay, peer, data } => {
                    if let Some(e) = binder.relays.get(relay) {
                        let _ = e.socket.try_send_to(data, peer);
                    }
                }
            }
            bound_any |= !binder.relays.pending.is_empty();
        }
        if bound_any {
            w.spawn_pending();
        }
        w.log_events();
    }
}

async fn relay_task(w: Rc<Worker>, handle: RelayHandle, sock: Rc<UdpSocket>) {
    loop {
        if sock.readable().await.is_err() {
            return;
        }
        for _ in 0..64 {
            let mut buf = w.buf.borrow_mut();
            let end = buf.len() - PEER_TAILROOM;
            let (n, from) = match sock.try_recv_from(&mut buf[PEER_HEADROOM..end]) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => continue,
            };
            let mut core = w.core.borrow_mut();
            let out = core.handle_peer(
                handle,
                from,
                &mut buf,
                PEER_HEADROOM..PEER_HEADROOM + n,
                Instant::now(),
            );
            if let Some((ft, range)) = out {
                if let (Some(l), Some(bytes)) = (w.listener_for(ft.server), buf.get(range)) {
                    let _ = l.try_send_to(bytes, ft.client);
                }
            }
        }
    }
}

async fn timer_task(w: Rc<Worker>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        {
            let mut core = w.core.borrow_mut();
            let mut relays = w.relays.borrow_mut();
            let mut binder = Binder {
                relays: &mut relays,
                ports: &w.ports,
            };
            core.handle_timeout(Instant::now(), &mut binder);
        }
        w.log_events();
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
