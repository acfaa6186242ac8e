//! Which shard a request belongs to: the RESERVATION-TOKENs a core hands out carry its shard index, as CONNECTION-IDs do ([`super::tcp::connection_shard`]), so the shell can take a stream connection to the core that holds what it names.

use crate::proto::{attr, method, Class, Message};

/// Bits of a RESERVATION-TOKEN's first two bytes that hold the shard index (the rest
/// of its 8 bytes are random).
const SHARD_MASK: u16 = (1 << 10) - 1;

/// A new RESERVATION-TOKEN of shard `shard`: its index in the first two bytes, then
/// six random bytes.
pub(super) fn new_reservation_token(shard: u32) -> [u8; 8] {
    let mut token: [u8; 8] = rand::random();
    let index = (shard as u16) & SHARD_MASK;
    token[..2].copy_from_slice(&index.to_be_bytes());
    token
}

/// The shard index a RESERVATION-TOKEN names.
pub fn reservation_shard(token: [u8; 8]) -> usize {
    usize::from(u16::from_be_bytes([token[0], token[1]]) & SHARD_MASK)
}

/// If `frame` is a request that names something a core handed out, the shard index of
/// that core: a ConnectionBind's CONNECTION-ID (RFC 6062), or an Allocate's
/// RESERVATION-TOKEN (RFC 8656 section 7.2: the second half of an EVEN-PORT pair, which
/// a client may send on another connection, and so to another worker). Anything else is
/// `None`.
pub fn owner_shard(frame: &[u8]) -> Option<usize> {
    if frame.first().is_none_or(|&b| b > 3) {
        return None;
    }
    // One parse for both kinds of request.
    let msg = Message::parse(frame).ok()?;
    if msg.class() != Class::Request {
        return None;
    }
    match msg.method() {
        method::CONNECTION_BIND => msg
            .get(attr::CONNECTION_ID)
            .and_then(|v| <[u8; 4]>::try_from(v).ok())
            .map(|id| super::tcp::connection_shard(u32::from_be_bytes(id))),
        method::ALLOCATE => msg
            .reservation_token()
            .ok()
            .flatten()
            .map(reservation_shard),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{MessageWriter, TransactionId};

    fn request(m: u16, token: Option<[u8; 8]>) -> Vec<u8> {
        let mut buf = Vec::new();
        let mut w = MessageWriter::new(&mut buf, m, Class::Request, TransactionId([9; 12]));
        if let Some(t) = token {
            w.attr(attr::RESERVATION_TOKEN, &t);
        }
        w.finish();
        buf
    }

    #[test]
    fn allocate_with_a_reservation_token_names_its_shard() {
        let t = new_reservation_token(5);
        assert_eq!(owner_shard(&request(method::ALLOCATE, Some(t))), Some(5));
        assert_eq!(owner_shard(&request(method::ALLOCATE, None)), None);
        assert_eq!(owner_shard(&request(method::REFRESH, Some(t))), None);
        assert_eq!(owner_shard(&[0x40, 0, 0, 4, 1, 2, 3, 4]), None);
    }

    #[test]
    fn reservation_tokens_name_their_shard() {
        for shard in [0, 1, 7, 1023] {
            let t = new_reservation_token(shard);
            assert_eq!(reservation_shard(t), shard as usize);
        }
        // Random apart from the index.
        assert_ne!(new_reservation_token(3), new_reservation_token(3));
    }
}
