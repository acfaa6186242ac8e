//! A MESSAGE-INTEGRITY key prepared once: its HMAC-SHA1 inner and outer pads (RFC 8489 14.5).

use ring::hmac;

/// The HMAC-SHA1 state of a key (a long-term key MD5(username:realm:password), or a
/// short-term password). Verifying a request and signing its answer with one
/// `IntegrityKey` hashes the key's pads once instead of twice.
pub struct IntegrityKey(pub(super) hmac::Key);

impl IntegrityKey {
    pub fn new(key: &[u8]) -> IntegrityKey {
        IntegrityKey(hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, key))
    }
}

impl std::fmt::Debug for IntegrityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IntegrityKey(<redacted>)")
    }
}
