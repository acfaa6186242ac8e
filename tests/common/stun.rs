//! Raw STUN Binding requests and answers, without the codec under test.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

pub const MAGIC_COOKIE: u32 = 0x2112_A442;

/// 12 random bytes (no extra dependency: std's randomly seeded hasher).
pub fn random_tid() -> [u8; 12] {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut out = [0u8; 12];
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    let a = h.finish().to_be_bytes();
    h.write_u64(u64::from_be_bytes(a));
    let b = h.finish().to_be_bytes();
    out[..8].copy_from_slice(&a);
    out[8..].copy_from_slice(&b[..4]);
    out
}

/// A 20-byte Binding request: type 0x0001, length 0, magic cookie, `tid`.
pub fn binding_request(tid: &[u8; 12]) -> [u8; 20] {
    let mut m = [0u8; 20];
    m[0..2].copy_from_slice(&0x0001u16.to_be_bytes());
    m[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    m[8..20].copy_from_slice(tid);
    m
}

/// If `buf` is a Binding success (0x0101) for `tid`, the XOR-MAPPED-ADDRESS (or
/// MAPPED-ADDRESS) it carries, `None` inside when it carries neither.
pub fn parse_binding_success(buf: &[u8], tid: &[u8; 12]) -> Option<Option<SocketAddr>> {
    if buf.len() < 20
        || buf[0..2] != [0x01, 0x01]
        || buf[4..8] != MAGIC_COOKIE.to_be_bytes()
        || buf[8..20] != tid[..]
    {
        return None;
    }
    let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
    let body = buf.get(20..20 + len)?;
    let mut mapped = None;
    let mut i = 0;
    while i + 4 <= body.len() {
        let typ = u16::from_be_bytes([body[i], body[i + 1]]);
        let alen = u16::from_be_bytes([body[i + 2], body[i + 3]]) as usize;
        let value = body.get(i + 4..i + 4 + alen)?;
        match typ {
            0x0020 => return Some(decode_address(value, true, tid)),
            0x0001 => mapped = decode_address(value, false, tid),
            _ => {}
        }
        i += 4 + alen.div_ceil(4) * 4;
    }
    Some(mapped)
}

fn decode_address(v: &[u8], xor: bool, tid: &[u8; 12]) -> Option<SocketAddr> {
    if v.len() < 8 {
        return None;
    }
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let mut port = u16::from_be_bytes([v[2], v[3]]);
    if xor {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    match v[1] {
        0x01 => {
            let mut ip = [v[4], v[5], v[6], v[7]];
            if xor {
                for (b, k) in ip.iter_mut().zip(cookie.iter()) {
                    *b ^= k;
                }
            }
            Some(SocketAddr::from((ip, port)))
        }
        0x02 if v.len() >= 20 => {
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&v[4..20]);
            if xor {
                let key: Vec<u8> = cookie.iter().chain(tid.iter()).copied().collect();
                for (b, k) in ip.iter_mut().zip(key.iter()) {
                    *b ^= k;
                }
            }
            Some(SocketAddr::from((ip, port)))
        }
        _ => None,
    }
}

/// Sends Binding requests to `server` (retransmitting every 250 ms) until a success
/// arrives or `timeout` passes. Returns (our local address, the reflexive address
/// the server reports).
pub fn stun_binding(
    server: SocketAddr,
    timeout: Duration,
) -> Result<(SocketAddr, SocketAddr), String> {
    let bind = if server.is_ipv6() {
        "[::1]:0"
    } else {
        "127.0.0.1:0"
    };
    let sock = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
    let local = sock.local_addr().map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_millis(250)))
        .map_err(|e| e.to_string())?;
    let tid = random_tid();
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        sock.send_to(&binding_request(&tid), server)
            .map_err(|e| e.to_string())?;
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            if from == server {
                if let Some(mapped) = parse_binding_success(&buf[..n], &tid) {
                    return mapped.map(|m| (local, m)).ok_or_else(|| {
                        format!("Binding success from {server} without a mapped address")
                    });
                }
            }
        }
    }
    Err(format!(
        "no Binding success from {server} to {local} within {timeout:?}"
    ))
}
