//! Credentials: long-term keys (RFC 8489 9.2), TURN REST API shared secrets (coturn
//! `use-auth-secret` / eturnal compatible) and stateless nonces.
//!
//! This module owns *which keys may have signed a request* and *whether a nonce is fresh*.
//! It does no I/O and reads no clock: wall-clock seconds are passed in.
//!
//! - Static users: `key = MD5(username ":" realm ":" password)` (RFC 8489 9.2.2), computed once.
//! - REST API (draft-uberti-behave-turn-rest-00, as coturn and eturnal do it): the username is
//!   `<expiry-unix-time>[:<user-id>]`, the password is `base64(HMAC-SHA1(secret, username))`.
//!   Several secrets may be configured (rotation); each yields one candidate key.
//! - Nonces (RFC 8489 9.2.3 leaves the format to the server): `<8 hex: issue time>` followed by
//!   `<16 hex: first 8 bytes of HMAC-SHA256(server secret, time || client ip || client port)>`.
//!   No state is kept; a nonce is bound to the client's transport address and expires.
//!
//! Secrets, passwords and keys are never printed: every `Debug` impl here redacts them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use base64::Engine as _;
use md5::{Digest as _, Md5};
use ring::hmac;
use subtle::ConstantTimeEq;

/// A TURN REST shared secret as an HMAC-SHA1 key (its inner and outer pads computed once).
type HmacSha1 = hmac::Key;

/// A long-term credential key: `MD5(username ":" realm ":" password)` (RFC 8489 9.2.2).
pub type Key = [u8; 16];

/// Longest USERNAME value accepted (RFC 8489 14.3: "MUST contain a UTF-8-encoded sequence of
/// fewer than 509 bytes"; RFC 8656 allows up to 513 bytes for the value as received).
pub const MAX_USERNAME_LEN: usize = 513;

/// Length of base64(HMAC-SHA1(..)): 20 bytes -> 28 characters with padding.
const REST_PASSWORD_LEN: usize = 28;

/// Computes the long-term key `MD5(username ":" realm ":" password)` (RFC 8489 9.2.2).
///
/// The password is used as given (no OpaqueString/SASLprep processing), as coturn does.
pub fn long_term_key(username: &str, realm: &str, password: &str) -> Key {
    long_term_key_bytes(username.as_bytes(), realm.as_bytes(), password.as_bytes())
}

fn long_term_key_bytes(username: &[u8], realm: &[u8], password: &[u8]) -> Key {
    let mut md5 = Md5::new();
    md5.update(username);
    md5.update(b":");
    md5.update(realm);
    md5.update(b":");
    md5.update(password);
    md5.finalize().into()
}

/// The TURN REST API password for `username`: `base64(HMAC-SHA1(secret, username))`
/// (standard alphabet, with padding), exactly as coturn's `use-auth-secret`.
pub fn rest_password(secret: &str, username: &str) -> String {
    let mac = rest_mac(&rest_hmac(secret), username);
    base64::engine::general_purpose::STANDARD.encode(mac)
}

/// The TURN REST API username: `"<expiry_unix>:<user_id>"`.
///
/// The format is always `<expiry>:<id>`, even for an empty `user_id` (`"1700000000:"`),
/// which [`Credentials::keys_for`] accepts.
pub fn rest_username(expiry_unix: u64, user_id: &str) -> String {
    format!("{expiry_unix}:{user_id}")
}

fn rest_hmac(secret: &str) -> HmacSha1 {
    // The REST API is defined with HMAC-SHA1 (coturn, eturnal); ring keeps it for such
    // legacy protocols.
    hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret.as_bytes())
}

fn rest_mac(keyed: &HmacSha1, username: &str) -> [u8; 20] {
    let tag = hmac::sign(keyed, username.as_bytes());
    let mut out = [0u8; 20];
    for (o, b) in out.iter_mut().zip(tag.as_ref()) {
        *o = *b;
    }
    out
}

/// Why no key could be found for a username.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// Neither a static user nor a REST API username that a configured secret could sign.
    #[error("unknown user")]
    UnknownUser,
    /// A REST API username whose expiry time has passed.
    #[error("credential expired")]
    Expired,
    /// Empty, too long, or a REST expiry that is not a number we can represent.
    #[error("malformed username")]
    Malformed,
}

/// Long-term credentials known to the server: the realm, the static users (as precomputed
/// keys) and the REST API shared secrets (as pre-keyed HMACs).
#[derive(Clone)]
pub struct Credentials {
    realm: String,
    users: BTreeMap<String, Key>,
    secrets: Vec<HmacSha1>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("realm", &self.realm)
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .field(
                "secrets",
                &format_args!("<{} redacted>", self.secrets.len()),
            )
            .finish()
    }
}

/// A REST API username split into its parts.
#[derive(Debug, PartialEq, Eq)]
enum RestName {
    /// `<expiry>[:<id>]` with a representable expiry.
    Expiry(u64),
    /// Starts with digits (and `:` or end) but the number overflows u64.
    Overflow,
    /// Not REST-shaped.
    No,
}

fn parse_rest_username(username: &str) -> RestName {
    let expiry = match username.split_once(':') {
        Some((expiry, _id)) => expiry,
        None => username,
    };
    if expiry.is_empty() || !expiry.bytes().all(|b| b.is_ascii_digit()) {
        return RestName::No;
    }
    match expiry.parse::<u64>() {
        Ok(t) => RestName::Expiry(t),
        Err(_) => RestName::Overflow,
    }
}

impl Credentials {
    /// Builds the credential set. Static user keys are computed here, once.
    pub fn new(realm: &str, users: &BTreeMap<String, String>, secrets: &[String]) -> Self {
        Credentials {
            realm: realm.to_owned(),
            users: users
                .iter()
                .map(|(user, pass)| (user.clone(), long_term_key(user, realm, pass)))
                .collect(),
            secrets: secrets.iter().map(|s| rest_hmac(s)).collect(),
        }
    }

    /// Builds the credential set from a validated configuration.
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self::new(
            &config.server.realm,
            &config.auth.users,
            &config.auth.secrets,
        )
    }

    /// The realm every key is computed with.
    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// True if at least one REST API shared secret is configured.
    pub fn has_secrets(&self) -> bool {
        !self.secrets.is_empty()
    }

    /// Candidate keys for `username` at wall-clock `now_unix` (seconds), each with `true`
    /// when it comes from a TURN REST secret (quotas treat those apart): the static user's
    /// key first, then (if `username` is `<expiry>[:<id>]` with `expiry > now_unix`) one key
    /// per configured secret, in configuration order. The caller tries each against
    /// MESSAGE-INTEGRITY. The only allocation is the returned Vec.
    pub fn keys_for(&self, username: &str, now_unix: u64) -> Result<Vec<(Key, bool)>, LookupError> {
        if username.is_empty() || username.len() > MAX_USERNAME_LEN {
            return Err(LookupError::Malformed);
        }
        let mut keys = Vec::with_capacity(1 + self.secrets.len());
        if let Some(key) = self.users.get(username) {
            keys.push((*key, false));
        }
        let mut expired = false;
        let mut overflow = false;
        if !self.secrets.is_empty() {
            match parse_rest_username(username) {
                RestName::Expiry(expiry) if expiry > now_unix => {
                    for secret in &self.secrets {
                        keys.push((self.rest_key(secret, username), true));
                    }
                }
                RestName::Expiry(_) => expired = true,
                RestName::Overflow => overflow = true,
                RestName::No => {}
            }
        }
        if !keys.is_empty() {
            Ok(keys)
        } else if expired {
            Err(LookupError::Expired)
        } else if overflow {
            Err(LookupError::Malformed)
        } else {
            Err(LookupError::UnknownUser)
        }
    }

    /// Would [`Credentials::keys_for`] have a key for `username` at some time: a static
    /// user, or a TURN REST username while a secret is configured (expired or not).
    pub fn knows(&self, username: &str) -> bool {
        self.users.contains_key(username)
            || (!self.secrets.is_empty()
                && matches!(parse_rest_username(username), RestName::Expiry(_)))
    }

    /// MD5(username:realm:base64(HMAC-SHA1(secret, username))) without heap allocation.
    fn rest_key(&self, secret: &HmacSha1, username: &str) -> Key {
        let mac = rest_mac(secret, username);
        let mut b64 = [0u8; REST_PASSWORD_LEN];
        let n = base64::engine::general_purpose::STANDARD
            .encode_slice(mac, &mut b64)
            .unwrap_or(0);
        let password = b64.get(..n).unwrap_or(&[]);
        long_term_key_bytes(username.as_bytes(), self.realm.as_bytes(), password)
    }
}

/// Result of checking a NONCE attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceCheck {
    /// Made by us, for this client, and not older than the lifetime.
    Valid,
    /// Made by us for this client, but too old (or from the future): answer 438 Stale Nonce.
    Stale,
    /// Not one of ours, or for another client address: treat as a missing nonce (401).
    Invalid,
}

/// Length of a nonce: 8 hex digits of time + 16 hex digits of MAC.
pub const NONCE_LEN: usize = 24;

/// Makes and checks stateless nonces bound to the client's transport address and issue time.
#[derive(Clone)]
pub struct NonceMaker {
    /// HMAC-SHA256 keyed with the process's nonce secret (pads computed once).
    key: hmac::Key,
    lifetime_secs: u64,
}

impl fmt::Debug for NonceMaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NonceMaker")
            .field("secret", &"<redacted>")
            .field("lifetime_secs", &self.lifetime_secs)
            .finish()
    }
}

impl NonceMaker {
    /// `secret` keys the nonce MAC (keep it per process, or shared by workers); a nonce is
    /// valid for `lifetime_secs` seconds after it was made (inclusive).
    pub fn new(secret: [u8; 32], lifetime_secs: u64) -> Self {
        NonceMaker {
            key: hmac::Key::new(hmac::HMAC_SHA256, &secret),
            lifetime_secs,
        }
    }

    /// A maker with a fresh random secret (nonces from a previous process become Invalid,
    /// which clients handle like a first request: 401 with a new nonce).
    pub fn with_random_secret(lifetime_secs: u64) -> Self {
        Self::new(rand::random::<[u8; 32]>(), lifetime_secs)
    }

    /// Nonce lifetime in seconds.
    pub fn lifetime_secs(&self) -> u64 {
        self.lifetime_secs
    }

    fn mac(&self, time: u32, client: SocketAddr) -> [u8; 8] {
        let mut mac = hmac::Context::with_key(&self.key);
        mac.update(b"turnstone nonce v2");
        mac.update(&time.to_be_bytes());
        match client.ip() {
            IpAddr::V4(ip) => {
                mac.update(&[4]);
                mac.update(&ip.octets());
            }
            IpAddr::V6(ip) => {
                mac.update(&[6]);
                mac.update(&ip.octets());
            }
        }
        // Bound to the address only: RFC 6062 data connections reuse the control
        // connection's nonce from new ports.
        let full = mac.sign();
        let mut out = [0u8; 8];
        for (o, b) in out.iter_mut().zip(full.as_ref()) {
            *o = *b;
        }
        out
    }

    /// A nonce for `client` issued at `now_unix`. Times are kept modulo 2^32 seconds.
    pub fn make(&self, client: SocketAddr, now_unix: u64) -> String {
        let time = now_unix as u32;
        let mac = self.mac(time, client);
        let mut s = String::with_capacity(NONCE_LEN);
        push_hex(&mut s, &time.to_be_bytes());
        push_hex(&mut s, &mac);
        s
    }

    /// Checks a nonce received from `client` at `now_unix`. The MAC is compared in constant
    /// time; only an authentic nonce can be `Stale`.
    pub fn check(&self, nonce: &str, client: SocketAddr, now_unix: u64) -> NonceCheck {
        let bytes = nonce.as_bytes();
        if bytes.len() != NONCE_LEN {
            return NonceCheck::Invalid;
        }
        let mut time_bytes = [0u8; 4];
        let mut mac_bytes = [0u8; 8];
        let (time_hex, mac_hex) = bytes.split_at(8);
        if !decode_hex(time_hex, &mut time_bytes) || !decode_hex(mac_hex, &mut mac_bytes) {
            return NonceCheck::Invalid;
        }
        let issued = u32::from_be_bytes(time_bytes);
        let expected = self.mac(issued, client);
        if !bool::from(expected.ct_eq(&mac_bytes)) {
            return NonceCheck::Invalid;
        }
        // Wrapping age: a nonce from the future (clock stepped back) looks very old: Stale.
        let age = u64::from((now_unix as u32).wrapping_sub(issued));
        if age > self.lifetime_secs {
            NonceCheck::Stale
        } else {
            NonceCheck::Valid
        }
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn push_hex(s: &mut String, bytes: &[u8]) {
    for b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// Decodes lowercase hex `src` (exactly 2 * out.len() digits) into `out`.
fn decode_hex(src: &[u8], out: &mut [u8]) -> bool {
    if src.len() != out.len() * 2 {
        return false;
    }
    for (o, pair) in out.iter_mut().zip(src.chunks_exact(2)) {
        match (
            pair.first().copied().and_then(hex_val),
            pair.get(1).copied().and_then(hex_val),
        ) {
            (Some(hi), Some(lo)) => *o = (hi << 4) | lo,
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_699_999_000;

    fn hex(bytes: &[u8]) -> String {
        let mut s = String::new();
        push_hex(&mut s, bytes);
        s
    }

    /// The candidate keys without their source.
    fn key_list(c: &Credentials, user: &str, now: u64) -> Result<Vec<Key>, LookupError> {
        c.keys_for(user, now)
            .map(|k| k.into_iter().map(|(key, _)| key).collect())
    }

    fn creds(users: &[(&str, &str)], secrets: &[&str]) -> Credentials {
        let users: BTreeMap<String, String> = users
            .iter()
            .map(|(u, p)| (u.to_string(), p.to_string()))
            .collect();
        let secrets: Vec<String> = secrets.iter().map(|s| s.to_string()).collect();
        Credentials::new("turnstone.test", &users, &secrets)
    }

    #[test]
    fn long_term_key_matches_md5() {
        // python3: hashlib.md5(b"user:realm:pass").hexdigest()
        assert_eq!(
            hex(&long_term_key("user", "realm", "pass")),
            "8493fbc53ba582fb4c044c456bdc40eb"
        );
        assert_eq!(
            hex(&long_term_key("alice", "turnstone.test", "wonderland")),
            "2c774ccc3dd642c0a15cc1c7ba0ef410"
        );
    }

    #[test]
    fn rest_password_known_vector() {
        // Computed independently:
        // python3 -c 'import hmac,hashlib,base64;print(base64.b64encode(hmac.new(b"s3cret",
        //   b"1700000000:alice",hashlib.sha1).digest()).decode())'
        assert_eq!(
            rest_password("s3cret", "1700000000:alice"),
            "TtElzSjT0GdnTQ9xdcRNxx96yQs="
        );
        assert_eq!(rest_username(1_700_000_000, "alice"), "1700000000:alice");
    }

    #[test]
    fn rest_key_known_vector() {
        // python3: md5(b"1700000000:alice:turnstone.test:" + password).hexdigest()
        let c = creds(&[], &["s3cret"]);
        let keys = key_list(&c, "1700000000:alice", NOW).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(hex(&keys[0]), "003f654d6a05233682133579ac31f79c");
        assert_eq!(
            keys[0],
            long_term_key(
                "1700000000:alice",
                "turnstone.test",
                &rest_password("s3cret", "1700000000:alice")
            )
        );
    }

    /// `knows`: what a reload keeps allocations for. A REST username is known while a
    /// secret is configured, expired or not; a static user while it is configured.
    #[test]
    fn knows_static_users_and_rest_names_while_a_secret_remains() {
        let c = creds(&[("alice", "wonderland")], &["s3cret"]);
        assert!(c.knows("alice"));
        assert!(!c.knows("bob"));
        assert!(c.knows("1700000000:bob"));
        assert!(c.knows("1000:bob"), "expired: still known");
        assert_eq!(key_list(&c, "1000:bob", NOW), Err(LookupError::Expired));
        assert!(!c.knows("99999999999999999999999:bob"), "overflow");
        assert!(!c.knows(""));
        let c = creds(&[("alice", "wonderland")], &[]);
        assert!(!c.knows("1700000000:bob"), "no secret left");
        assert!(c.knows("alice"));
    }

    #[test]
    fn static_user_and_unknown() {
        let c = creds(&[("alice", "wonderland")], &[]);
        assert_eq!(
            key_list(&c, "alice", NOW).unwrap(),
            vec![long_term_key("alice", "turnstone.test", "wonderland")]
        );
        assert_eq!(key_list(&c, "bob", NOW), Err(LookupError::UnknownUser));
        // No secrets: REST-shaped names are just unknown users.
        assert_eq!(
            key_list(&c, "1700000000:bob", NOW),
            Err(LookupError::UnknownUser)
        );
        assert_eq!(key_list(&c, "", NOW), Err(LookupError::Malformed));
        let long = "a".repeat(MAX_USERNAME_LEN + 1);
        assert_eq!(key_list(&c, &long, NOW), Err(LookupError::Malformed));
    }

    #[test]
    fn rest_expiry_forms_and_expiry() {
        let c = creds(&[], &["s3cret"]);
        assert!(key_list(&c, "1700000000", NOW).is_ok());
        assert!(key_list(&c, "1700000000:", NOW).is_ok());
        assert!(key_list(&c, "1700000000:a:b", NOW).is_ok());
        assert_eq!(
            key_list(&c, "1700000000:alice", 1_700_000_000),
            Err(LookupError::Expired)
        );
        assert_eq!(
            key_list(&c, "1700000000:alice", 1_800_000_000),
            Err(LookupError::Expired)
        );
        assert!(key_list(&c, "1700000000:alice", 1_699_999_999).is_ok());
        assert_eq!(key_list(&c, "alice", NOW), Err(LookupError::UnknownUser));
        assert_eq!(key_list(&c, ":alice", NOW), Err(LookupError::UnknownUser));
        assert_eq!(
            key_list(&c, "17x:alice", NOW),
            Err(LookupError::UnknownUser)
        );
        assert_eq!(key_list(&c, "-5:alice", NOW), Err(LookupError::UnknownUser));
        assert_eq!(
            key_list(&c, "99999999999999999999999:alice", NOW),
            Err(LookupError::Malformed)
        );
    }

    #[test]
    fn several_secrets_each_verify() {
        let c = creds(&[], &["old", "new"]);
        let user = rest_username(1_700_000_000, "carol");
        let keys = key_list(&c, &user, NOW).unwrap();
        assert_eq!(keys.len(), 2);
        for secret in ["old", "new"] {
            let k = long_term_key(&user, "turnstone.test", &rest_password(secret, &user));
            assert!(keys.contains(&k), "secret {secret}");
        }
        assert_ne!(keys[0], keys[1]);
    }

    #[test]
    fn static_users_come_first() {
        let c = creds(&[("1700000000:alice", "pw")], &["s3cret"]);
        let keys = key_list(&c, "1700000000:alice", NOW).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(
            keys[0],
            long_term_key("1700000000:alice", "turnstone.test", "pw")
        );
        // The static key is marked as such, the REST one as REST (for the quotas).
        let sources: Vec<bool> = c
            .keys_for("1700000000:alice", NOW)
            .unwrap()
            .iter()
            .map(|(_, rest)| *rest)
            .collect();
        assert_eq!(sources, [false, true]);
        // A static user named like an expired REST credential still works.
        let keys = key_list(&c, "1700000000:alice", 1_800_000_000).unwrap();
        assert_eq!(
            keys,
            vec![long_term_key("1700000000:alice", "turnstone.test", "pw")]
        );
    }

    #[test]
    fn debug_redacts_secrets() {
        let c = creds(&[("alice", "wonderland")], &["s3cret"]);
        let s = format!("{c:?}");
        assert!(!s.contains("wonderland") && !s.contains("s3cret"), "{s}");
        assert!(s.contains("alice"));
        let key = long_term_key("alice", "turnstone.test", "wonderland");
        assert!(!s.contains(&format!("{:?}", key[0..4].to_vec())));
        let n = NonceMaker::new([0xab; 32], 600);
        let s = format!("{n:?}");
        assert!(!s.contains("171") && !s.contains("ab, "), "{s}");
    }

    fn client() -> SocketAddr {
        "192.0.2.7:50000".parse().unwrap()
    }

    #[test]
    fn nonce_roundtrip_and_lifetime() {
        let n = NonceMaker::new([7; 32], 600);
        let nonce = n.make(client(), NOW);
        assert_eq!(nonce.len(), NONCE_LEN);
        assert!(nonce.starts_with(&format!("{:08x}", NOW as u32)));
        assert!(nonce.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(n.check(&nonce, client(), NOW), NonceCheck::Valid);
        assert_eq!(n.check(&nonce, client(), NOW + 600), NonceCheck::Valid);
        assert_eq!(n.check(&nonce, client(), NOW + 601), NonceCheck::Stale);
        // From the future (clock went back): stale, never valid forever.
        assert_eq!(n.check(&nonce, client(), NOW - 1), NonceCheck::Stale);
    }

    #[test]
    fn nonce_bound_to_client_address_and_secret() {
        let n = NonceMaker::new([7; 32], 600);
        let nonce = n.make(client(), NOW);
        let other_port: SocketAddr = "192.0.2.7:50001".parse().unwrap();
        let other_ip: SocketAddr = "192.0.2.8:50000".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::7]:50000".parse().unwrap();
        // Another port of the same address is fine (RFC 6062 data connections).
        assert_eq!(n.check(&nonce, other_port, NOW), NonceCheck::Valid);
        assert_eq!(n.check(&nonce, other_ip, NOW), NonceCheck::Invalid);
        assert_eq!(n.check(&nonce, v6, NOW), NonceCheck::Invalid);
        let other = NonceMaker::new([8; 32], 600);
        assert_eq!(other.check(&nonce, client(), NOW), NonceCheck::Invalid);
        let v6nonce = n.make(v6, NOW);
        assert_eq!(n.check(&v6nonce, v6, NOW), NonceCheck::Valid);
    }

    #[test]
    fn nonce_garbage_is_invalid() {
        let n = NonceMaker::new([7; 32], 600);
        let good = n.make(client(), NOW);
        // Tampered time: MAC no longer matches -> Invalid, not Stale.
        let mut tampered = good.clone().into_bytes();
        tampered[0] = if tampered[0] == b'0' { b'1' } else { b'0' };
        let tampered = String::from_utf8(tampered).unwrap();
        for bad in [
            "",
            "x",
            "0123456789abcdef01234567x",
            "0123456789abcdef0123456",
            "zzzzzzzzzzzzzzzzzzzzzzzz",
            &good.to_uppercase(),
            &tampered,
            "ééééééééééééé",
            &good[..23],
            &format!("{good}0"),
        ] {
            assert_eq!(n.check(bad, client(), NOW), NonceCheck::Invalid, "{bad:?}");
        }
    }

    #[test]
    fn nonce_time_wraps_without_panic() {
        let n = NonceMaker::new([1; 32], 600);
        let t = u64::from(u32::MAX) - 10;
        let nonce = n.make(client(), t);
        assert_eq!(n.check(&nonce, client(), t + 100), NonceCheck::Valid);
        let nonce = n.make(client(), u64::MAX);
        assert_eq!(n.check(&nonce, client(), u64::MAX), NonceCheck::Valid);
    }

    #[test]
    fn random_input_never_panics() {
        use rand::Rng;
        let mut rng = rand::rng();
        let n = NonceMaker::new([3; 32], 600);
        let c = creds(&[("alice", "pw")], &["s3cret", "other"]);
        for _ in 0..2000 {
            let len = rng.random_range(0..40);
            let bytes: Vec<u8> = (0..len).map(|_| rng.random_range(b' '..=b'z')).collect();
            let s = String::from_utf8(bytes).unwrap();
            let now = rng.random::<u64>();
            assert_ne!(n.check(&s, client(), now), NonceCheck::Valid);
            let _ = key_list(&c, &s, now);
        }
    }

    #[test]
    fn random_makers_differ() {
        let a = NonceMaker::with_random_secret(60);
        let b = NonceMaker::with_random_secret(60);
        let nonce = a.make(client(), NOW);
        assert_eq!(a.check(&nonce, client(), NOW), NonceCheck::Valid);
        assert_eq!(b.check(&nonce, client(), NOW), NonceCheck::Invalid);
    }
}
