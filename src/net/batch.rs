//! Batched UDP system calls on the listener sockets: `recvmmsg` takes every queued
//! client datagram in one call, and `sendmmsg` sends everything bound for clients in
//! one call per loop iteration. Relay sockets each talk to their own peers and gain
//! nothing from batching, so they use plain `recvfrom`/`sendto`.

use std::io::{IoSlice, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::ops::Range;
use std::os::fd::AsRawFd;

use arrayvec::ArrayVec;
use nix::sys::socket::{recvmmsg, sendmmsg, MsgFlags, MultiHeaders, SockaddrStorage};

/// Datagrams per `recvmmsg` / `sendmmsg`.
pub const BATCH: usize = 32;
/// One receive slot holds the largest UDP payload.
const SLOT: usize = 65536;

fn to_std(s: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = s.as_sockaddr_in() {
        return Some(SocketAddr::from(*v4));
    }
    s.as_sockaddr_in6().map(|v6| SocketAddr::from(*v6))
}

/// Receive side: BATCH slots of SLOT bytes (only the bytes the kernel writes are ever
/// touched, so resident memory stays small).
pub struct RecvBatch {
    headers: MultiHeaders<SockaddrStorage>,
    arena: Vec<u8>,
    /// (slot, length, sender) of each datagram received by the last `recv`.
    got: ArrayVec<(usize, usize, SocketAddr), BATCH>,
}

impl RecvBatch {
    pub fn new() -> RecvBatch {
        RecvBatch {
            headers: MultiHeaders::preallocate(BATCH, None),
            arena: vec![0u8; BATCH * SLOT],
            got: ArrayVec::new(),
        }
    }

    /// Receives what is queued (up to BATCH) without blocking; returns how many.
    pub fn recv(&mut self, sock: &UdpSocket) -> usize {
        let RecvBatch {
            headers,
            arena,
            got,
        } = self;
        got.clear();
        // A plain array (no Drop) so the slices may borrow for as long as the headers.
        let mut chunks = arena.chunks_mut(SLOT);
        let mut iovs: [[IoSliceMut<'_>; 1]; BATCH] =
            std::array::from_fn(|_| [IoSliceMut::new(chunks.next().unwrap_or_default())]);
        let Ok(results) = recvmmsg(
            sock.as_raw_fd(),
            headers,
            iovs.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        ) else {
            return 0;
        };
        for (slot, r) in results.enumerate() {
            // Never hand on a partial datagram.
            if r.flags.contains(MsgFlags::MSG_TRUNC) {
                continue;
            }
            if let Some(addr) = r.address.as_ref().and_then(to_std) {
                got.push((slot, r.bytes.min(SLOT), addr));
            }
        }
        got.len()
    }

    /// The k-th received datagram: its bytes and sender.
    pub fn get(&self, k: usize) -> Option<(&[u8], SocketAddr)> {
        let &(slot, len, addr) = self.got.get(k)?;
        let start = slot * SLOT;
        Some((self.arena.get(start..start + len)?, addr))
    }
}

/// Send side: datagrams for clients collected during one loop iteration.
pub struct SendBatch {
    headers: MultiHeaders<SockaddrStorage>,
    arena: Vec<u8>,
    items: ArrayVec<(Range<usize>, Option<SockaddrStorage>), BATCH>,
    /// Which listener the queued datagrams go out on.
    listener: usize,
    /// Datagrams the kernel refused (send buffer full, unreachable).
    pub dropped: u64,
}

impl SendBatch {
    pub fn new() -> SendBatch {
        SendBatch {
            headers: MultiHeaders::preallocate(BATCH, None),
            arena: Vec::with_capacity(BATCH * 2048),
            items: ArrayVec::new(),
            listener: 0,
            dropped: 0,
        }
    }

    /// Queues `data` for `to` on listener `listener`, flushing first when the batch
    /// is full or bound for another listener.
    pub fn push(
        &mut self,
        listeners: &[(SocketAddr, UdpSocket)],
        listener: usize,
        data: &[u8],
        to: SocketAddr,
    ) {
        if self.items.is_full() || (!self.items.is_empty() && self.listener != listener) {
            self.flush(listeners);
        }
        self.listener = listener;
        let start = self.arena.len();
        self.arena.extend_from_slice(data);
        self.items
            .push((start..self.arena.len(), Some(SockaddrStorage::from(to))));
    }

    /// Sends everything queued.
    pub fn flush(&mut self, listeners: &[(SocketAddr, UdpSocket)]) {
        let SendBatch {
            headers,
            arena,
            items,
            listener,
            dropped,
        } = self;
        if items.is_empty() {
            return;
        }
        if let Some((_, sock)) = listeners.get(*listener) {
            let slices: ArrayVec<[IoSlice<'_>; 1], BATCH> = items
                .iter()
                .map(|(r, _)| [IoSlice::new(arena.get(r.clone()).unwrap_or_default())])
                .collect();
            let addrs: ArrayVec<Option<SockaddrStorage>, BATCH> =
                items.iter().map(|(_, a)| *a).collect();
            let total = items.len();
            let mut sent = 0;
            while sent < total {
                let no_cmsgs: [nix::sys::socket::ControlMessage<'_>; 0] = [];
                match sendmmsg(
                    sock.as_raw_fd(),
                    headers,
                    slices[sent..].iter(),
                    &addrs[sent..],
                    no_cmsgs,
                    MsgFlags::MSG_DONTWAIT,
                ) {
                    Ok(r) => {
                        let n = r.count();
                        if n == 0 {
                            break;
                        }
                        sent += n;
                    }
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(_) => {
                        // The first datagram could not go (buffer full or an
                        // unreachable destination): drop it, go on with the rest.
                        sent += 1;
                        *dropped += 1;
                    }
                }
            }
        }
        items.clear();
        arena.clear();
    }
}
