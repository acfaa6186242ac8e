//! Peer policy: which peer addresses a client may relay to (CreatePermission, ChannelBind,
//! Send, and TCP Connect all ask here).
//!
//! Safe by default: loopback, private, link-local, CGNAT, multicast, reserved, documentation,
//! cloud-metadata addresses (169.254.169.254, fd00:ec2::254) and every IPv6 form that embeds
//! an IPv4 address are refused unless an `allow_peers` rule names them. This is the place
//! where coturn had CVE-2020-26262 and CVE-2026-27624; the default list follows eturnal's
//! `blacklist_peers: recommended` plus the IANA special-purpose registries.
//!
//! Precedence: `deny_peers` > `allow_peers` > the built-in default-deny list.
//!
//! IPv6 forms that embed an IPv4 address:
//! - IPv4-mapped `::ffff:a.b.c.d` and NAT64 well-known prefix `64:ff9b::a.b.c.d`: judged
//!   entirely as the embedded IPv4 address (deny rules, allow rules and the default list).
//!   So `allow_peers = ["127.0.0.0/8"]` also allows `::ffff:127.0.0.1`.
//! - IPv4-compatible `::a.b.c.d` (deprecated): denied by default whatever it embeds; rules on
//!   the embedded IPv4 address apply (deny first, then allow).
//! - 6to4 `2002:AABB:CCDD::/48` and Teredo `2001:0::/32` (server v4 in bits 32..64, client v4
//!   obfuscated in the last 32 bits): denied by default as whole ranges; an `allow_peers` rule
//!   on the IPv6 range can open them, but deny rules on any embedded IPv4 still apply.
//!   `::` and `::1` are not treated as embedding an IPv4 address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// Built-in default-deny IPv4 ranges: (network, prefix length).
const DEFAULT_DENY_V4: &[(u32, u8)] = &[
    (0x0000_0000, 8),  // 0.0.0.0/8 "this network" (RFC 791, RFC 1122)
    (0x0a00_0000, 8),  // 10.0.0.0/8 private (RFC 1918)
    (0x6440_0000, 10), // 100.64.0.0/10 shared address space / CGNAT (RFC 6598)
    (0x7f00_0000, 8),  // 127.0.0.0/8 loopback (RFC 1122)
    (0xa9fe_0000, 16), // 169.254.0.0/16 link-local, incl. 169.254.169.254 metadata (RFC 3927)
    (0xac10_0000, 12), // 172.16.0.0/12 private (RFC 1918)
    (0xc000_0000, 24), // 192.0.0.0/24 IETF protocol assignments (RFC 6890)
    (0xc000_0200, 24), // 192.0.2.0/24 TEST-NET-1 documentation (RFC 5737)
    (0xc058_6300, 24), // 192.88.99.0/24 6to4 relay anycast (RFC 7526)
    (0xc0a8_0000, 16), // 192.168.0.0/16 private (RFC 1918)
    (0xc612_0000, 15), // 198.18.0.0/15 benchmarking (RFC 2544)
    (0xc633_6400, 24), // 198.51.100.0/24 TEST-NET-2 documentation (RFC 5737)
    (0xcb00_7100, 24), // 203.0.113.0/24 TEST-NET-3 documentation (RFC 5737)
    (0xe000_0000, 4),  // 224.0.0.0/4 multicast (RFC 5771)
    (0xf000_0000, 4),  // 240.0.0.0/4 reserved (RFC 1112), includes 255.255.255.255 broadcast
];

/// Built-in default-deny IPv6 ranges: (network, prefix length). IPv4-mapped and NAT64
/// well-known-prefix addresses are judged by their embedded IPv4 address instead.
const DEFAULT_DENY_V6: &[(u128, u8)] = &[
    (0, 128),                                        // ::/128 unspecified (RFC 4291)
    (1, 128),                                        // ::1/128 loopback (RFC 4291)
    (0, 96),                                         // ::/96 IPv4-compatible, deprecated (RFC 4291)
    (0x0000_0000_0000_0000_0000_ffff_0000_0000, 96), // ::ffff:0:0/96 IPv4-mapped (see embedded_v4)
    (0x0064_ff9b_0001_0000_0000_0000_0000_0000, 48), // 64:ff9b:1::/48 local-use NAT64 (RFC 8215)
    (0x0100_0000_0000_0000_0000_0000_0000_0000, 64), // 100::/64 discard-only (RFC 6666)
    (0x2001_0000_0000_0000_0000_0000_0000_0000, 32), // 2001::/32 Teredo (RFC 4380)
    (0x2001_0002_0000_0000_0000_0000_0000_0000, 48), // 2001:2::/48 benchmarking (RFC 5180)
    (0x2001_0010_0000_0000_0000_0000_0000_0000, 28), // 2001:10::/28 ORCHID, deprecated (RFC 4843)
    (0x2001_0020_0000_0000_0000_0000_0000_0000, 28), // 2001:20::/28 ORCHIDv2 (RFC 7343)
    (0x2001_0db8_0000_0000_0000_0000_0000_0000, 32), // 2001:db8::/32 documentation (RFC 3849)
    (0x2002_0000_0000_0000_0000_0000_0000_0000, 16), // 2002::/16 6to4 (RFC 3056)
    (0x3fff_0000_0000_0000_0000_0000_0000_0000, 20), // 3fff::/20 documentation (RFC 9637)
    (0x5f00_0000_0000_0000_0000_0000_0000_0000, 16), // 5f00::/16 SRv6 SIDs (RFC 9602)
    (0xfc00_0000_0000_0000_0000_0000_0000_0000, 7), // fc00::/7 unique local, incl. fd00:ec2::254 (RFC 4193)
    (0xfe80_0000_0000_0000_0000_0000_0000_0000, 10), // fe80::/10 link-local (RFC 4291)
    (0xfec0_0000_0000_0000_0000_0000_0000_0000, 10), // fec0::/10 site-local, deprecated (RFC 3879)
    (0xff00_0000_0000_0000_0000_0000_0000_0000, 8), // ff00::/8 multicast (RFC 4291)
];

fn in_v4(ip: u32, net: u32, len: u8) -> bool {
    let mask = u32::MAX
        .checked_shl(32 - u32::from(len.min(32)))
        .unwrap_or(0);
    (ip & mask) == (net & mask)
}

fn in_v6(ip: u128, net: u128, len: u8) -> bool {
    let mask = u128::MAX
        .checked_shl(128 - u32::from(len.min(128)))
        .unwrap_or(0);
    (ip & mask) == (net & mask)
}

/// How an IPv6 address embeds an IPv4 address, if it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Embedded {
    /// `::ffff:a.b.c.d` or `64:ff9b::a.b.c.d`: the address *is* the IPv4 address.
    Full(Ipv4Addr),
    /// `::a.b.c.d`: rules on the IPv4 address apply (deny, then allow), default stays deny.
    Compatible(Ipv4Addr),
    /// 6to4 / Teredo: deny rules on these IPv4 addresses apply; nothing else.
    DenyOnly([Option<Ipv4Addr>; 2]),
}

fn embedded_v4(ip: Ipv6Addr) -> Option<Embedded> {
    let bits = u128::from(ip);
    let low32 = Ipv4Addr::from(bits as u32);
    if in_v6(bits, 0xffff_0000_0000, 96) {
        return Some(Embedded::Full(low32));
    }
    if in_v6(bits, 0x0064_ff9b_0000_0000_0000_0000_0000_0000, 96) {
        return Some(Embedded::Full(low32));
    }
    if in_v6(bits, 0, 96) {
        // :: and ::1 are the IPv6 unspecified and loopback addresses, not IPv4-compatible.
        return if bits <= 1 {
            None
        } else {
            Some(Embedded::Compatible(low32))
        };
    }
    if in_v6(bits, 0x2002_0000_0000_0000_0000_0000_0000_0000, 16) {
        let v4 = Ipv4Addr::from((bits >> 80) as u32);
        return Some(Embedded::DenyOnly([Some(v4), None]));
    }
    if in_v6(bits, 0x2001_0000_0000_0000_0000_0000_0000_0000, 32) {
        let server = Ipv4Addr::from((bits >> 64) as u32);
        let client = Ipv4Addr::from(!(bits as u32));
        return Some(Embedded::DenyOnly([Some(server), Some(client)]));
    }
    None
}

fn default_denied_v4(ip: Ipv4Addr) -> bool {
    let bits = u32::from(ip);
    DEFAULT_DENY_V4
        .iter()
        .any(|&(net, len)| in_v4(bits, net, len))
}

/// The peer-address policy: user rules on top of the built-in default-deny list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerPolicy {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

impl PeerPolicy {
    /// `allow` opens ranges of the default-deny list; `deny` closes ranges and wins over both.
    pub fn new(allow: &[IpNet], deny: &[IpNet]) -> Self {
        PeerPolicy {
            allow: allow.iter().map(IpNet::trunc).collect(),
            deny: deny.iter().map(IpNet::trunc).collect(),
        }
    }

    /// The policy of a validated configuration's `[policy]` section.
    pub fn from_config(policy: &crate::config::PolicySection) -> Self {
        Self::new(&policy.allow_peers, &policy.deny_peers)
    }

    /// The `allow_peers` rules.
    pub fn allow_rules(&self) -> &[IpNet] {
        &self.allow
    }

    /// The `deny_peers` rules.
    pub fn deny_rules(&self) -> &[IpNet] {
        &self.deny
    }

    fn denied_by_rule(&self, ip: IpAddr) -> bool {
        self.deny.iter().any(|net| net.contains(&ip))
    }

    fn allowed_by_rule(&self, ip: IpAddr) -> bool {
        self.allow.iter().any(|net| net.contains(&ip))
    }

    /// May a client relay to `ip`? `deny_peers` wins over `allow_peers`, `allow_peers` wins
    /// over the built-in default-deny list. IPv6 forms embedding an IPv4 address are judged as
    /// described in the module documentation.
    pub fn is_allowed(&self, ip: IpAddr) -> bool {
        let v6 = match ip {
            IpAddr::V4(_) => {
                return !self.denied_by_rule(ip)
                    && (self.allowed_by_rule(ip) || !Self::default_denied(ip));
            }
            IpAddr::V6(v6) => v6,
        };
        match embedded_v4(v6) {
            Some(Embedded::Full(v4)) => {
                let v4 = IpAddr::V4(v4);
                !self.denied_by_rule(ip)
                    && !self.denied_by_rule(v4)
                    && (self.allowed_by_rule(ip)
                        || self.allowed_by_rule(v4)
                        || !Self::default_denied(v4))
            }
            Some(Embedded::Compatible(v4)) => {
                let v4 = IpAddr::V4(v4);
                !self.denied_by_rule(ip)
                    && !self.denied_by_rule(v4)
                    && (self.allowed_by_rule(ip) || self.allowed_by_rule(v4))
            }
            Some(Embedded::DenyOnly(v4s)) => {
                let embedded_denied = v4s
                    .iter()
                    .flatten()
                    .any(|v4| self.denied_by_rule(IpAddr::V4(*v4)));
                !self.denied_by_rule(ip)
                    && !embedded_denied
                    && (self.allowed_by_rule(ip) || !Self::default_denied(ip))
            }
            None => {
                !self.denied_by_rule(ip) && (self.allowed_by_rule(ip) || !Self::default_denied(ip))
            }
        }
    }

    /// Is `ip` on the built-in default-deny list (ignoring `allow_peers`/`deny_peers`)?
    /// IPv4-mapped and NAT64 well-known-prefix addresses answer for their embedded IPv4 address.
    pub fn default_denied(ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => default_denied_v4(v4),
            IpAddr::V6(v6) => {
                if let Some(Embedded::Full(v4)) = embedded_v4(v6) {
                    return default_denied_v4(v4);
                }
                let bits = u128::from(v6);
                DEFAULT_DENY_V6
                    .iter()
                    .any(|&(net, len)| in_v6(bits, net, len))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn policy(allow: &[&str], deny: &[&str]) -> PeerPolicy {
        PeerPolicy::new(&nets(allow), &nets(deny))
    }

    const DENIED_BY_DEFAULT: &[&str] = &[
        "0.0.0.0",
        "0.1.2.3",
        "10.0.0.1",
        "10.255.255.255",
        "100.64.0.1",
        "100.127.255.255",
        "127.0.0.1",
        "127.255.255.254",
        "169.254.169.254",
        "169.254.0.1",
        "172.16.0.1",
        "172.31.255.255",
        "192.0.0.8",
        "192.0.2.1",
        "192.88.99.1",
        "192.168.1.1",
        "198.18.0.1",
        "198.19.255.255",
        "198.51.100.7",
        "203.0.113.9",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "::",
        "::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "::ffff:0.0.0.0",
        "::127.0.0.1",
        "::8.8.8.8",
        "::0.0.0.2",
        "64:ff9b::a00:1",
        "64:ff9b::7f00:1",
        "64:ff9b::a9fe:a9fe",
        "64:ff9b:1::808:808",
        "2002:7f00:1::",
        "2002:808:808::1",
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",
        "2001::1",
        "2001:db8::1",
        "2001:2::1",
        "2001:10::1",
        "2001:20::1",
        "3fff::1",
        "100::1",
        "fc00::1",
        "fd00::1",
        "fd00:ec2::254",
        "fe80::1",
        "febf::1",
        "fec0::1",
        "ff02::1",
        "ff0e::1",
        "5f00::1",
    ];

    const ALLOWED_BY_DEFAULT: &[&str] = &[
        "8.8.8.8",
        "1.1.1.1",
        "100.63.255.255",
        "100.128.0.0",
        "172.15.255.255",
        "172.32.0.0",
        "192.0.1.1",
        "192.169.0.1",
        "198.20.0.1",
        "223.255.255.255",
        "2606:4700::1111",
        "2001:4860:4860::8888",
        "2a00:1450:4001::1",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
        "2001:200::1",
    ];

    #[test]
    fn default_list() {
        let p = PeerPolicy::default();
        for s in DENIED_BY_DEFAULT {
            assert!(!p.is_allowed(ip(s)), "{s} should be denied");
            assert!(PeerPolicy::default_denied(ip(s)), "{s}");
        }
        for s in ALLOWED_BY_DEFAULT {
            assert!(p.is_allowed(ip(s)), "{s} should be allowed");
            assert!(!PeerPolicy::default_denied(ip(s)), "{s}");
        }
    }

    #[test]
    fn default_denied_explains_embedded_forms() {
        assert!(PeerPolicy::default_denied(ip("::ffff:127.0.0.1")));
        assert!(!PeerPolicy::default_denied(ip("::ffff:8.8.8.8")));
        assert!(PeerPolicy::default_denied(ip("64:ff9b::a00:1")));
        assert!(PeerPolicy::default_denied(ip("2002:808:808::")));
        assert!(PeerPolicy::default_denied(ip("::8.8.8.8")));
    }

    #[test]
    fn allow_loopback_covers_embedded_forms() {
        let p = policy(&["127.0.0.0/8", "::1/128"], &[]);
        for s in [
            "127.0.0.1",
            "::ffff:127.0.0.1",
            "64:ff9b::7f00:1",
            "::127.0.0.1",
            "::1",
        ] {
            assert!(p.is_allowed(ip(s)), "{s}");
        }
        // Other private ranges stay closed.
        for s in [
            "10.0.0.1",
            "::ffff:10.0.0.1",
            "169.254.169.254",
            "::",
            "0.0.0.0",
        ] {
            assert!(!p.is_allowed(ip(s)), "{s}");
        }
        // 6to4 and Teredo are not opened by an IPv4 allow rule.
        assert!(!p.is_allowed(ip("2002:7f00:1::")));
    }

    #[test]
    fn deny_beats_allow_in_every_form() {
        let p = policy(
            &["127.0.0.0/8", "2002::/16", "2001::/32", "10.0.0.0/8"],
            &["127.0.0.1/32", "10.1.0.0/16"],
        );
        for s in [
            "127.0.0.1",
            "::ffff:127.0.0.1",
            "64:ff9b::7f00:1",
            "::127.0.0.1",
            "2002:7f00:1::",
            "2002:7f00:1:ffff::1",
            "10.1.2.3",
            "::ffff:10.1.2.3",
            // Teredo with server 10.1.0.1
            "2001:0:a01:1::1",
            // Teredo with client 127.0.0.1 (obfuscated: ~0x7f000001 = 0x80fffffe)
            "2001:0:808:808:0:0:80ff:fffe",
        ] {
            assert!(!p.is_allowed(ip(s)), "{s}");
        }
        for s in [
            "127.0.0.2",
            "::ffff:127.0.0.2",
            "10.2.0.1",
            "2002:808:808::1",
            "2001:0:808:808::1",
        ] {
            assert!(p.is_allowed(ip(s)), "{s}");
        }
    }

    #[test]
    fn deny_public_and_v6_rules() {
        let p = policy(&[], &["8.8.8.0/24", "2606:4700::/32"]);
        assert!(!p.is_allowed(ip("8.8.8.8")));
        assert!(!p.is_allowed(ip("::ffff:8.8.8.8")));
        assert!(!p.is_allowed(ip("64:ff9b::808:808")));
        assert!(!p.is_allowed(ip("2606:4700::1111")));
        assert!(p.is_allowed(ip("8.8.4.4")));
        assert!(p.is_allowed(ip("2a00:1450:4001::1")));
        // A deny rule written in the mapped form applies to the mapped form.
        let p = policy(&[], &["::ffff:0:0/96"]);
        assert!(!p.is_allowed(ip("::ffff:8.8.8.8")));
        assert!(p.is_allowed(ip("8.8.8.8")));
    }

    #[test]
    fn v6_allow_rules_open_v6_ranges() {
        let p = policy(&["fd00::/8", "2002::/16", "::/128"], &[]);
        assert!(p.is_allowed(ip("fd00:ec2::254")));
        assert!(p.is_allowed(ip("2002:808:808::1")));
        assert!(p.is_allowed(ip("2002:7f00:1::")));
        assert!(p.is_allowed(ip("::")));
        assert!(!p.is_allowed(ip("fc00::1")));
        assert!(!p.is_allowed(ip("0.0.0.0")));
    }

    #[test]
    fn allow_everything_still_honours_deny() {
        let p = policy(
            &["0.0.0.0/0", "::/0"],
            &["169.254.169.254/32", "fd00:ec2::254/128"],
        );
        assert!(p.is_allowed(ip("10.0.0.1")));
        assert!(p.is_allowed(ip("::1")));
        assert!(!p.is_allowed(ip("169.254.169.254")));
        assert!(!p.is_allowed(ip("::ffff:169.254.169.254")));
        assert!(!p.is_allowed(ip("64:ff9b::a9fe:a9fe")));
        assert!(!p.is_allowed(ip("::169.254.169.254")));
        assert!(!p.is_allowed(ip("2002:a9fe:a9fe::1")));
        assert!(!p.is_allowed(ip("fd00:ec2::254")));
    }

    #[test]
    fn host_bits_in_rules_are_ignored() {
        let p = PeerPolicy::new(&nets(&["127.0.0.1/8"]), &[]);
        assert!(p.is_allowed(ip("127.9.9.9")));
    }

    #[test]
    fn prefix_edge_lengths() {
        assert!(in_v4(0x0102_0304, 0, 0));
        assert!(in_v4(0x0102_0304, 0x0102_0304, 32));
        assert!(!in_v4(0x0102_0305, 0x0102_0304, 32));
        assert!(in_v6(u128::MAX, 0, 0));
        assert!(in_v6(5, 5, 128));
        assert!(!in_v6(4, 5, 128));
    }

    #[test]
    fn random_addresses_never_panic_and_deny_rules_hold() {
        use rand::Rng;
        let mut rng = rand::rng();
        let p = policy(&["0.0.0.0/0", "::/0"], &["10.0.0.0/8"]);
        for _ in 0..10_000 {
            let v6 = Ipv6Addr::from(rng.random::<u128>());
            let v4 = Ipv4Addr::from(rng.random::<u32>());
            let _ = p.is_allowed(IpAddr::V6(v6));
            let _ = PeerPolicy::default_denied(IpAddr::V6(v6));
            let _ = PeerPolicy::default().is_allowed(IpAddr::V4(v4));
            // Any form embedding a 10/8 address is refused, whatever allow says.
            let ten = Ipv4Addr::from(0x0a00_0000 | (rng.random::<u32>() & 0x00ff_ffff));
            assert!(!p.is_allowed(IpAddr::V6(ten.to_ipv6_mapped())));
            assert!(!p.is_allowed(IpAddr::V6(ten.to_ipv6_compatible())));
            let nat64 = Ipv6Addr::from(0x0064_ff9b_u128 << 96 | u128::from(u32::from(ten)));
            assert!(!p.is_allowed(IpAddr::V6(nat64)));
            let sixtofour = Ipv6Addr::from(0x2002_u128 << 112 | u128::from(u32::from(ten)) << 80);
            assert!(!p.is_allowed(IpAddr::V6(sixtofour)));
        }
    }

    #[test]
    fn embedded_extraction() {
        let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        assert_eq!(
            embedded_v4(v6("::ffff:1.2.3.4")),
            Some(Embedded::Full(Ipv4Addr::new(1, 2, 3, 4)))
        );
        assert_eq!(
            embedded_v4(v6("64:ff9b::1.2.3.4")),
            Some(Embedded::Full(Ipv4Addr::new(1, 2, 3, 4)))
        );
        assert_eq!(
            embedded_v4(v6("::1.2.3.4")),
            Some(Embedded::Compatible(Ipv4Addr::new(1, 2, 3, 4)))
        );
        assert_eq!(embedded_v4(v6("::")), None);
        assert_eq!(embedded_v4(v6("::1")), None);
        assert_eq!(
            embedded_v4(v6("2002:102:304::")),
            Some(Embedded::DenyOnly([Some(Ipv4Addr::new(1, 2, 3, 4)), None]))
        );
        assert_eq!(
            embedded_v4(v6("2001:0:102:304::fefd:fcfb")),
            Some(Embedded::DenyOnly([
                Some(Ipv4Addr::new(1, 2, 3, 4)),
                Some(Ipv4Addr::new(1, 2, 3, 4))
            ]))
        );
        assert_eq!(embedded_v4(v6("2606:4700::1111")), None);
    }
}
