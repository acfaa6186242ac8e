//! Address attribute values: MAPPED-ADDRESS style (RFC 8489 14.1) and
//! XOR-MAPPED-ADDRESS style (RFC 8489 14.2), shared by reader and writer.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use super::{ParseError, TransactionId, MAGIC_COOKIE};

/// Address family 0x01: IPv4 (RFC 8489 14.1).
pub(crate) const FAMILY_IPV4: u8 = 0x01;
/// Address family 0x02: IPv6 (RFC 8489 14.1).
pub(crate) const FAMILY_IPV6: u8 = 0x02;

/// Value length of an IPv4 address attribute: reserved, family, port, 4 address bytes.
const IPV4_VALUE_LEN: usize = 8;
/// Value length of an IPv6 address attribute: reserved, family, port, 16 address bytes.
const IPV6_VALUE_LEN: usize = 20;

/// XOR mask applied to the port: the most significant 16 bits of the cookie (RFC 8489 14.2).
const PORT_MASK: u16 = (MAGIC_COOKIE >> 16) as u16;

fn port_and_family(value: &[u8]) -> Result<(u8, u16, &[u8]), ParseError> {
    match value {
        [_reserved, family, p0, p1, rest @ ..] => {
            Ok((*family, u16::from_be_bytes([*p0, *p1]), rest))
        }
        _ => Err(ParseError::BadAddress),
    }
}

/// Decodes a plain address value (MAPPED-ADDRESS, RFC 8489 14.1; also the RFC 3489
/// RESPONSE-ADDRESS, SOURCE-ADDRESS, CHANGED-ADDRESS, and RFC 5780 RESPONSE-ORIGIN /
/// OTHER-ADDRESS). The length must be exactly 8 (IPv4) or 20 (IPv6).
pub fn decode_address(value: &[u8]) -> Result<SocketAddr, ParseError> {
    let (family, port, addr) = port_and_family(value)?;
    match (family, addr.len() + 4) {
        (FAMILY_IPV4, IPV4_VALUE_LEN) => {
            let a: [u8; 4] = addr.try_into().map_err(|_| ParseError::BadAddress)?;
            Ok(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(a), port)))
        }
        (FAMILY_IPV6, IPV6_VALUE_LEN) => {
            let a: [u8; 16] = addr.try_into().map_err(|_| ParseError::BadAddress)?;
            Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a),
                port,
                0,
                0,
            )))
        }
        _ => Err(ParseError::BadAddress),
    }
}

/// The 16 bytes an IPv6 address is XORed with: magic cookie then transaction ID.
fn xor_key(tid: &TransactionId) -> [u8; 16] {
    let mut k = [0u8; 16];
    let (cookie, rest) = k.split_at_mut(4);
    cookie.copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    rest.copy_from_slice(&tid.0);
    k
}

/// Decodes an XOR address value (XOR-MAPPED-ADDRESS RFC 8489 14.2, XOR-PEER-ADDRESS
/// RFC 8656 18.3, XOR-RELAYED-ADDRESS RFC 8656 18.5). The length must be exactly 8 (IPv4)
/// or 20 (IPv6).
pub fn decode_xor_address(value: &[u8], tid: &TransactionId) -> Result<SocketAddr, ParseError> {
    let (family, xport, addr) = port_and_family(value)?;
    let port = xport ^ PORT_MASK;
    match (family, addr.len() + 4) {
        (FAMILY_IPV4, IPV4_VALUE_LEN) => {
            let a: [u8; 4] = addr.try_into().map_err(|_| ParseError::BadAddress)?;
            let ip = u32::from_be_bytes(a) ^ MAGIC_COOKIE;
            Ok(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)))
        }
        (FAMILY_IPV6, IPV6_VALUE_LEN) => {
            let a: [u8; 16] = addr.try_into().map_err(|_| ParseError::BadAddress)?;
            let ip = u128::from_be_bytes(a) ^ u128::from_be_bytes(xor_key(tid));
            Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(ip),
                port,
                0,
                0,
            )))
        }
        _ => Err(ParseError::BadAddress),
    }
}

/// Appends the XOR address value (8 or 20 bytes, no attribute header) to `out`
/// (RFC 8489 14.2).
pub fn encode_xor_address(addr: SocketAddr, tid: &TransactionId, out: &mut Vec<u8>) {
    let port = addr.port() ^ PORT_MASK;
    match addr {
        SocketAddr::V4(a) => {
            out.extend_from_slice(&[0, FAMILY_IPV4]);
            out.extend_from_slice(&port.to_be_bytes());
            out.extend_from_slice(&(u32::from(*a.ip()) ^ MAGIC_COOKIE).to_be_bytes());
        }
        SocketAddr::V6(a) => {
            out.extend_from_slice(&[0, FAMILY_IPV6]);
            out.extend_from_slice(&port.to_be_bytes());
            let ip = u128::from(*a.ip()) ^ u128::from_be_bytes(xor_key(tid));
            out.extend_from_slice(&ip.to_be_bytes());
        }
    }
}

/// Appends the plain address value (8 or 20 bytes, no attribute header) to `out`
/// (RFC 8489 14.1).
pub fn encode_address(addr: SocketAddr, out: &mut Vec<u8>) {
    match addr {
        SocketAddr::V4(a) => {
            out.extend_from_slice(&[0, FAMILY_IPV4]);
            out.extend_from_slice(&a.port().to_be_bytes());
            out.extend_from_slice(&a.ip().octets());
        }
        SocketAddr::V6(a) => {
            out.extend_from_slice(&[0, FAMILY_IPV6]);
            out.extend_from_slice(&a.port().to_be_bytes());
            out.extend_from_slice(&a.ip().octets());
        }
    }
}
