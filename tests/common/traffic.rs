//! Test traffic through a relay: numbered payloads, paced sending and UDP peers.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A payload of `len` bytes (at least 4) that starts with `seq` (big-endian).
pub fn seq_payload(seq: u32, len: usize) -> Vec<u8> {
    let mut v = seq.to_be_bytes().to_vec();
    v.resize(len, 0x5A);
    v
}

/// The sequence number at the start of a payload made by [`seq_payload`].
pub fn seq_of(payload: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(payload.get(..4)?.try_into().ok()?))
}

/// Calls `send(seq)` for `first..first + count`, `per_ms` of them every millisecond.
pub fn pace(first: u32, count: u32, per_ms: u32, mut send: impl FnMut(u32)) {
    let start = Instant::now();
    let mut tick = 0u64;
    let mut seq = first;
    while seq < first + count {
        for _ in 0..per_ms {
            if seq == first + count {
                break;
            }
            send(seq);
            seq += 1;
        }
        tick += 1;
        if let Some(wait) =
            (start + Duration::from_millis(tick)).checked_duration_since(Instant::now())
        {
            std::thread::sleep(wait);
        }
    }
}

/// A UDP socket on 127.0.0.1 with 4 MiB buffers and a read timeout of `timeout`.
pub fn udp_socket(timeout: Duration) -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let r = socket2::SockRef::from(&s);
    let _ = r.set_recv_buffer_size(4 << 20);
    let _ = r.set_send_buffer_size(4 << 20);
    s.set_read_timeout(Some(timeout)).expect("read timeout");
    s
}

/// A UDP peer on 127.0.0.1 that echoes (or just counts) what it receives, until dropped.
pub struct UdpPeer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Bytes received so far.
    pub bytes: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UdpPeer {
    pub fn start(echo: bool) -> UdpPeer {
        let sock = udp_socket(Duration::from_millis(50));
        let addr = sock.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let bytes = Arc::new(AtomicU64::new(0));
        let (s, b) = (stop.clone(), bytes.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    b.fetch_add(n as u64, Ordering::Relaxed);
                    if echo {
                        let _ = sock.send_to(&buf[..n], from);
                    }
                }
            }
        });
        UdpPeer {
            addr,
            stop,
            bytes,
            thread: Some(thread),
        }
    }
}

impl Drop for UdpPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Is the UDP port `relay` closed (nothing bound to it any more)? A datagram to it is
/// answered with ICMP port unreachable, and the next recv on a connected socket is refused.
pub fn relay_closed(relay: SocketAddr) -> bool {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.set_read_timeout(Some(Duration::from_millis(20)))
        .expect("timeout");
    s.connect(relay).expect("connect");
    let _ = s.send(b"probe");
    let mut buf = [0u8; 64];
    matches!(s.recv(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}
