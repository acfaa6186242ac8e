//! The PROXY protocol header, versions 1 (text) and 2 (binary), that a load balancer
//! (haproxy `send-proxy` / `send-proxy-v2`, AWS NLB, ...) writes at the start of a TCP
//! connection to pass on the client's address
//! (<https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>).
//!
//! [`parse_proxy_header`] is a pure function over the bytes received so far: it says
//! whether they hold a whole header (and how long it is, and which addresses it
//! carries), need more bytes, or can never become a valid header. It decides as early as
//! the bytes allow: a first byte that starts neither version is invalid at once, so a
//! client that speaks STUN or TLS straight away is never mistaken for a slow header.
//!
//! Written here rather than taken from the `ppp` crate: the server needs this exact
//! three-way answer on every prefix of the input (invalid at the first wrong byte,
//! incomplete otherwise), a hard size bound, no allocation and no panic, and the whole
//! format is a hundred lines; it is fuzzed with the stream framing
//! (`fuzz/fuzz_targets/stream_framing.rs`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The longest version 1 header, CRLF included (the specification's limit).
pub const V1_MAX: usize = 107;
/// The version 1 header's start.
pub const V1_PREFIX: &[u8; 6] = b"PROXY ";
/// The version 2 header's first 12 bytes.
pub const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The fixed part of a version 2 header (signature, version/command, family, length).
pub const V2_FIXED: usize = 16;
/// The longest header accepted (version 2 with its address block and TLVs). Longer ones
/// are refused as soon as the length field shows it.
pub const MAX_HEADER: usize = 4096;

/// The addresses a header carries: the client's (`source`) and the one it connected to
/// at the load balancer (`destination`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyAddresses {
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

/// What the bytes received so far amount to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyHeader {
    /// A valid prefix of a header: wait for more bytes.
    Incomplete,
    /// A whole header of `header_len` bytes (what follows is the connection's own
    /// data). `addresses` is `None` when the connection's own addresses stand: a
    /// version 2 LOCAL command (the load balancer's health check), a version 1
    /// `UNKNOWN`, or a version 2 family other than TCP over IPv4/IPv6 (UNSPEC, UDP, UNIX).
    Done {
        header_len: usize,
        addresses: Option<ProxyAddresses>,
    },
    /// Not a header, and no more bytes can make it one; the reason, for the log.
    Invalid(&'static str),
}

/// Parses the PROXY header at the start of `buf` (version 1 or 2).
pub fn parse_proxy_header(buf: &[u8]) -> ProxyHeader {
    match buf.first() {
        None => ProxyHeader::Incomplete,
        Some(b'P') => parse_v1(buf),
        Some(b'\r') => parse_v2(buf),
        Some(_) => ProxyHeader::Invalid("no PROXY header"),
    }
}

/// `buf` starts with as much of `prefix` as it holds.
fn starts_like(buf: &[u8], prefix: &[u8]) -> bool {
    let n = buf.len().min(prefix.len());
    buf.get(..n) == prefix.get(..n)
}

fn parse_v1(buf: &[u8]) -> ProxyHeader {
    use ProxyHeader::{Done, Incomplete, Invalid};
    if !starts_like(buf, V1_PREFIX) {
        return Invalid("not a PROXY v1 header");
    }
    let window = buf.get(..buf.len().min(V1_MAX)).unwrap_or_default();
    let Some(cr) = window.iter().position(|&b| b == b'\r') else {
        if window.iter().any(|b| !(0x20..=0x7e).contains(b)) {
            return Invalid("PROXY v1 header with a control character");
        }
        if buf.len() >= V1_MAX {
            return Invalid("PROXY v1 header longer than 107 bytes");
        }
        return Incomplete;
    };
    let Some(line) = window.get(V1_PREFIX.len()..cr) else {
        return Invalid("not a PROXY v1 header");
    };
    if line.iter().any(|b| !(0x20..=0x7e).contains(b)) {
        return Invalid("PROXY v1 header with a control character");
    }
    match window.get(cr + 1) {
        Some(b'\n') => {}
        Some(_) => return Invalid("PROXY v1 header: CR without LF"),
        None if buf.len() >= V1_MAX => return Invalid("PROXY v1 header longer than 107 bytes"),
        None => return Incomplete,
    }
    let header_len = cr + 2;
    // Printable ASCII, so UTF-8.
    let Ok(line) = std::str::from_utf8(line) else {
        return Invalid("PROXY v1 header with a control character");
    };
    let mut parts = line.split(' ');
    let v6 = match parts.next() {
        // The rest of the line is ignored (specification 2.1).
        Some("UNKNOWN") => {
            return Done {
                header_len,
                addresses: None,
            }
        }
        Some("TCP4") => false,
        Some("TCP6") => true,
        _ => return Invalid("PROXY v1 header: protocol not TCP4, TCP6 or UNKNOWN"),
    };
    let (Some(src), Some(dst), Some(sport), Some(dport), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Invalid("PROXY v1 header: not four fields after the protocol");
    };
    let ip = |s: &str| -> Option<IpAddr> {
        if v6 {
            s.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
        } else {
            s.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
        }
    };
    let (Some(src), Some(dst)) = (ip(src), ip(dst)) else {
        return Invalid("PROXY v1 header: an address is not of its protocol's family");
    };
    let (Some(sport), Some(dport)) = (port(sport), port(dport)) else {
        return Invalid("PROXY v1 header: a port is not a number 0-65535");
    };
    Done {
        header_len,
        addresses: Some(ProxyAddresses {
            source: SocketAddr::new(src, sport),
            destination: SocketAddr::new(dst, dport),
        }),
    }
}

/// A decimal port: 1 to 5 digits, no sign, no leading zero, at most 65535.
fn port(s: &str) -> Option<u16> {
    if s.is_empty()
        || s.len() > 5
        || !s.bytes().all(|b| b.is_ascii_digit())
        || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn parse_v2(buf: &[u8]) -> ProxyHeader {
    use ProxyHeader::{Done, Incomplete, Invalid};
    if !starts_like(buf, V2_SIGNATURE) {
        return Invalid("not a PROXY v2 signature");
    }
    let (Some(&ver_cmd), Some(&family), Some(len)) = (buf.get(12), buf.get(13), be16(buf, 14))
    else {
        return Incomplete;
    };
    if ver_cmd >> 4 != 2 {
        return Invalid("PROXY v2 header: version is not 2");
    }
    let local = match ver_cmd & 0x0f {
        0 => true,
        1 => false,
        _ => return Invalid("PROXY v2 header: command neither LOCAL nor PROXY"),
    };
    let total = V2_FIXED + usize::from(len);
    if total > MAX_HEADER {
        return Invalid("PROXY v2 header longer than 4096 bytes");
    }
    // The family is known before the body: refuse a wrong one without waiting for it.
    let (addr_len, tcp) = match family {
        0x00 => (0, false),          // UNSPEC
        0x11 => (12, true),          // TCP over IPv4
        0x12 => (12, false),         // UDP over IPv4
        0x21 => (36, true),          // TCP over IPv6
        0x22 => (36, false),         // UDP over IPv6
        0x31 | 0x32 => (216, false), // UNIX stream / datagram
        _ => return Invalid("PROXY v2 header: unknown address family or protocol"),
    };
    if usize::from(len) < addr_len {
        return Invalid("PROXY v2 header: length shorter than its addresses");
    }
    let Some(body) = buf.get(V2_FIXED..total) else {
        return Incomplete;
    };
    let (Some(addrs), Some(mut tlvs)) = (body.get(..addr_len), body.get(addr_len..)) else {
        return Invalid("PROXY v2 header: length shorter than its addresses");
    };
    // TLVs (type, 16-bit length, value) fill the rest exactly; their values are not used.
    while !tlvs.is_empty() {
        let Some(l) = be16(tlvs, 1) else {
            return Invalid("PROXY v2 header: truncated TLV");
        };
        match tlvs.get(3 + usize::from(l)..) {
            Some(rest) => tlvs = rest,
            None => return Invalid("PROXY v2 header: TLV longer than the header"),
        }
    }
    let addresses = if local || !tcp {
        None
    } else {
        v2_addresses(family, addrs)
    };
    Done {
        header_len: total,
        addresses,
    }
}

fn v2_addresses(family: u8, a: &[u8]) -> Option<ProxyAddresses> {
    let (src, dst, ports): (IpAddr, IpAddr, &[u8]) = if family == 0x11 {
        let s: [u8; 4] = a.get(0..4)?.try_into().ok()?;
        let d: [u8; 4] = a.get(4..8)?.try_into().ok()?;
        (s.into(), d.into(), a.get(8..12)?)
    } else {
        let s: [u8; 16] = a.get(0..16)?.try_into().ok()?;
        let d: [u8; 16] = a.get(16..32)?.try_into().ok()?;
        (s.into(), d.into(), a.get(32..36)?)
    };
    Some(ProxyAddresses {
        source: SocketAddr::new(src, be16(ports, 0)?),
        destination: SocketAddr::new(dst, be16(ports, 2)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ProxyHeader::{Done, Incomplete, Invalid};

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn addrs(src: &str, dst: &str) -> Option<ProxyAddresses> {
        Some(ProxyAddresses {
            source: sa(src),
            destination: sa(dst),
        })
    }

    /// A v2 header: command (0 LOCAL, 1 PROXY), family byte, address block, TLVs.
    fn v2(cmd: u8, family: u8, block: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | cmd);
        h.push(family);
        h.extend_from_slice(&((block.len() + tlvs.len()) as u16).to_be_bytes());
        h.extend_from_slice(block);
        h.extend_from_slice(tlvs);
        h
    }

    fn v4_block() -> Vec<u8> {
        let mut b = vec![192, 0, 2, 7, 10, 0, 0, 5];
        b.extend_from_slice(&47142u16.to_be_bytes());
        b.extend_from_slice(&443u16.to_be_bytes());
        b
    }

    fn v6_block() -> Vec<u8> {
        let mut b = "2001:db8::7".parse::<Ipv6Addr>().unwrap().octets().to_vec();
        b.extend_from_slice(&"2001:db8::5".parse::<Ipv6Addr>().unwrap().octets());
        b.extend_from_slice(&50000u16.to_be_bytes());
        b.extend_from_slice(&5349u16.to_be_bytes());
        b
    }

    fn tlv(t: u8, v: &[u8]) -> Vec<u8> {
        let mut out = vec![t];
        out.extend_from_slice(&(v.len() as u16).to_be_bytes());
        out.extend_from_slice(v);
        out
    }

    /// Every proper prefix of a valid header is Incomplete; the whole is `want`, also
    /// with data after it (which is not part of the header).
    fn whole(h: &[u8], want: ProxyHeader) {
        for n in 0..h.len() {
            assert_eq!(
                parse_proxy_header(&h[..n]),
                Incomplete,
                "prefix {n} of {h:02x?}"
            );
        }
        assert_eq!(parse_proxy_header(h), want, "{h:02x?}");
        let mut more = h.to_vec();
        more.extend_from_slice(&[0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42]);
        assert_eq!(parse_proxy_header(&more), want, "with data after it");
    }

    fn invalid(h: &[u8]) {
        assert!(
            matches!(parse_proxy_header(h), Invalid(_)),
            "{:?}: {:?}",
            String::from_utf8_lossy(h),
            parse_proxy_header(h)
        );
    }

    #[test]
    fn v1_table() {
        let cases: &[(&str, Option<ProxyAddresses>)] = &[
            (
                "PROXY TCP4 192.0.2.7 10.0.0.5 47142 443\r\n",
                addrs("192.0.2.7:47142", "10.0.0.5:443"),
            ),
            (
                "PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
                addrs("255.255.255.255:65535", "255.255.255.255:65535"),
            ),
            (
                "PROXY TCP6 2001:db8::7 2001:db8::5 50000 5349\r\n",
                addrs("[2001:db8::7]:50000", "[2001:db8::5]:5349"),
            ),
            (
                "PROXY TCP6 ::ffff:192.0.2.7 ::1 0 3478\r\n",
                addrs("[::ffff:192.0.2.7]:0", "[::1]:3478"),
            ),
            ("PROXY UNKNOWN\r\n", None),
            ("PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", None),
        ];
        for (h, a) in cases {
            whole(
                h.as_bytes(),
                Done {
                    header_len: h.len(),
                    addresses: *a,
                },
            );
        }
        // The longest v1 header (the specification's example) is exactly 107 bytes.
        let longest = "PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(longest.len(), V1_MAX);
        whole(
            longest.as_bytes(),
            Done {
                header_len: V1_MAX,
                addresses: None,
            },
        );
        let tcp6 = longest.replace("UNKNOWN", "TCP6");
        assert!(matches!(
            parse_proxy_header(tcp6.as_bytes()),
            Done {
                header_len: 104,
                addresses: Some(_)
            }
        ));
    }

    #[test]
    fn v1_invalid() {
        for h in [
            "PROXY TCP4 192.0.2.7 10.0.0.5 47142\r\n", // a field missing
            "PROXY TCP4 192.0.2.7 10.0.0.5 47142 443 9\r\n", // one too many
            "PROXY TCP4 2001:db8::7 10.0.0.5 47142 443\r\n", // family mismatch
            "PROXY TCP6 192.0.2.7 2001:db8::5 1 2\r\n", // family mismatch
            "PROXY TCP4 192.0.2.7 10.0.0.5 65536 443\r\n", // port too large
            "PROXY TCP4 192.0.2.7 10.0.0.5 -1 443\r\n", // sign
            "PROXY TCP4 192.0.2.7 10.0.0.5 0443 443\r\n", // leading zero
            "PROXY TCP4 192.0.2.7  10.0.0.5 1 443\r\n", // two spaces
            "PROXY TCP4 192.0.2.256 10.0.0.5 1 443\r\n", // not an address
            "PROXY UDP4 192.0.2.7 10.0.0.5 1 443\r\n", // not TCP
            "PROXY tcp4 192.0.2.7 10.0.0.5 1 443\r\n", // case
            "PROXY TCP4 192.0.2.7 10.0.0.5 1 443\rX",  // CR without LF
            "PROXY TCP4 192.0.2.7 10.0.0.5 1 443\n",   // LF alone: a control char
            "PROXY \r\n",                              // nothing
            "PROXX TCP4",                              // wrong start
            "PROXYTCP4",                               // no space
            "PR\x00",                                  // wrong start, early
        ] {
            invalid(h.as_bytes());
        }
        // 107 bytes without CRLF: refused without waiting for more.
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(V1_MAX, b'x');
        invalid(&long);
        // 106 bytes, the 107th not LF.
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(V1_MAX - 1, b'x');
        assert_eq!(parse_proxy_header(&long), Incomplete);
        long.push(b'\r');
        invalid(&long);
    }

    #[test]
    fn v2_table() {
        let b4 = v4_block();
        let b6 = v6_block();
        let v4 = addrs("192.0.2.7:47142", "10.0.0.5:443");
        let v6 = addrs("[2001:db8::7]:50000", "[2001:db8::5]:5349");
        let tlvs = [
            tlv(0x01, b"stun.turn"),        // ALPN
            tlv(0x02, b"turn.example.com"), // authority
            tlv(0x04, &[0; 5]),             // NOOP
            tlv(0x05, b""),                 // unique ID, empty
        ]
        .concat();
        let unix = vec![0u8; 216];
        let cases: Vec<(Vec<u8>, Option<ProxyAddresses>)> = vec![
            (v2(1, 0x11, &b4, &[]), v4),
            (v2(1, 0x21, &b6, &[]), v6),
            (v2(1, 0x11, &b4, &tlvs), v4),
            (v2(1, 0x21, &b6, &tlvs), v6),
            // LOCAL: the connection's own addresses, whatever the block says.
            (v2(0, 0x00, &[], &[]), None),
            (v2(0, 0x11, &b4, &[]), None),
            (v2(0, 0x00, &[], &tlv(0x04, b"health")), None),
            // Families whose addresses are not a TCP client's: the connection's own.
            (v2(1, 0x00, &[], &[]), None),
            (v2(1, 0x12, &b4, &[]), None),
            (v2(1, 0x22, &b6, &[]), None),
            (v2(1, 0x31, &unix, &[]), None),
        ];
        for (h, a) in cases {
            whole(
                &h,
                Done {
                    header_len: h.len(),
                    addresses: a,
                },
            );
        }
        // Up to the size limit.
        let pad = tlv(0x04, &vec![0; MAX_HEADER - V2_FIXED - 12 - 3]);
        let h = v2(1, 0x11, &b4, &pad);
        assert_eq!(h.len(), MAX_HEADER);
        assert_eq!(
            parse_proxy_header(&h),
            Done {
                header_len: MAX_HEADER,
                addresses: v4
            }
        );
    }

    #[test]
    fn v2_invalid() {
        let b4 = v4_block();
        // Wrong signature, from its first differing byte on.
        let mut h = v2(1, 0x11, &b4, &[]);
        h[7] = b'q';
        invalid(&h);
        invalid(&h[..8]);
        assert_eq!(parse_proxy_header(&h[..7]), Incomplete);
        // Version 1 in the v2 layout, version 3; command 2.
        for byte12 in [0x11, 0x31, 0x22, 0x2f] {
            let mut h = v2(1, 0x11, &b4, &[]);
            h[12] = byte12;
            invalid(&h[..16]);
        }
        // Unknown families and protocols, refused before the body arrives.
        for family in [0x10, 0x13, 0x01, 0x23, 0x33, 0x41, 0xff] {
            invalid(&v2(1, family, &b4, &[])[..16]);
        }
        // Lying lengths: shorter than the addresses of its family.
        invalid(&v2(1, 0x11, &b4[..11], &[]));
        invalid(&v2(1, 0x21, &v6_block()[..35], &[]));
        invalid(&v2(1, 0x31, &[0u8; 100], &[]));
        // ... known from the fixed part alone.
        invalid(&v2(1, 0x21, &b4, &[])[..16]);
        // Oversized: refused from the 16 fixed bytes, before any body.
        let mut big = v2(1, 0x11, &b4, &[]);
        big[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
        invalid(&big[..16]);
        big[14..16].copy_from_slice(&((MAX_HEADER - V2_FIXED + 1) as u16).to_be_bytes());
        invalid(&big[..16]);
        // TLVs that do not fill the rest exactly.
        let mut t = tlv(0x01, b"stun.turn");
        t[2] += 1; // says 10, carries 9
        invalid(&v2(1, 0x11, &b4, &t));
        invalid(&v2(1, 0x11, &b4, &[0x04, 0x00])); // 2 bytes of a TLV header
        invalid(&v2(1, 0x11, &b4, &[0x04]));
        // A header whose length is right but whose body has not all arrived: incomplete.
        let h = v2(1, 0x11, &b4, &tlv(0x01, b"x"));
        assert_eq!(parse_proxy_header(&h[..h.len() - 1]), Incomplete);
    }

    #[test]
    fn not_a_header_at_all() {
        // What a client that skips the header sends first: STUN, ChannelData, TLS, HTTP.
        for first in [
            &[0x00u8, 0x01, 0x00, 0x00][..],
            &[0x40, 0x00, 0x00, 0x04],
            &[0x16, 0x03, 0x01, 0x02, 0x00],
            b"GET / HTTP/1.1\r\n",
            b"\n",
            b"\r\n\r\n\x00\r\nQUIT\r",
        ] {
            invalid(first);
        }
        // Decided by the first byte alone where it starts neither version.
        for first in [0x00u8, 0x01, 0x16, 0x40, 0x7f, b'G', b'\n', 0xff] {
            invalid(&[first]);
        }
        assert_eq!(parse_proxy_header(b""), Incomplete);
        assert_eq!(parse_proxy_header(b"P"), Incomplete);
        assert_eq!(parse_proxy_header(b"\r"), Incomplete);
    }
}
