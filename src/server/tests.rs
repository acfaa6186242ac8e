//! Unit tests of the sans-I/O core with fixed instants: every timer (allocation,
//! permission, channel, nonce, reservation), authentication, quotas and peer policy.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::auth::{self, Credentials, NonceMaker};
use crate::policy::PeerPolicy;
use crate::proto::{attr, method, Class, Message, MessageWriter, TransactionId};

const REALM: &str = "turnstone.test";
const T0_UNIX: u64 = 1_800_000_000;

struct MockBinder {
    next_port: u16,
    capacity: usize,
    live: Vec<RelayHandle>,
    released: Vec<RelayHandle>,
    next_handle: u32,
}

impl MockBinder {
    fn new(capacity: usize) -> Self {
        MockBinder {
            next_port: 50000,
            capacity,
            live: Vec::new(),
            released: Vec::new(),
            next_handle: 0,
        }
    }
    fn one(&mut self, ip: IpAddr, even: bool) -> Result<(RelayHandle, SocketAddr), BindError> {
        if self.live.len() >= self.capacity {
            return Err(BindError::Exhausted);
        }
        if even && self.next_port % 2 == 1 {
            self.next_port += 1;
        }
        let h = RelayHandle(self.next_handle);
        self.next_handle += 1;
        let addr = SocketAddr::new(ip, self.next_port);
        self.next_port += 1;
        self.live.push(h);
        Ok((h, addr))
    }
}

impl RelayBinder for MockBinder {
    fn bind(&mut self, ip: IpAddr, even_port: bool, reserve_next: bool) -> BindResult {
        let a = self.one(ip, even_port)?;
        let b = if reserve_next {
            Some(self.one(ip, false)?)
        } else {
            None
        };
        Ok((a.0, a.1, b))
    }
    fn release(&mut self, relay: RelayHandle) {
        self.live.retain(|h| *h != relay);
        self.released.push(relay);
    }
}

fn runtime(allow: &[&str], max_per_user: usize, max_total: usize) -> Runtime {
    let mut users = BTreeMap::new();
    users.insert("alice".to_string(), "wonderland".to_string());
    users.insert("bob".to_string(), "builder".to_string());
    let allow: Vec<ipnet::IpNet> = allow.iter().map(|s| s.parse().unwrap()).collect();
    Runtime {
        realm: REALM.into(),
        software: Some("turnstone-test".into()),
        credentials: Credentials::new(REALM, &users, &["s3cret".to_string()]),
        nonces: NonceMaker::new([7; 32], 600),
        policy: PeerPolicy::new(&allow, &[]),
        limits: Limits {
            max_bandwidth_per_allocation: 0,
            max_total_bandwidth: 0,
            unauthenticated_rate: 0,
            max_allocations: max_total,
            max_allocations_per_user: max_per_user,
            max_allocations_per_rest_user: max_per_user,
            max_permissions_per_allocation: 8,
            max_channels_per_allocation: 8,
            default_lifetime: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
            permission_lifetime: PERMISSION_LIFETIME,
            channel_lifetime: CHANNEL_LIFETIME,
        },
        alternate_servers: Vec::new(),
        redirect_above: 0,
        usage_interval: None,
        kernel_fast_path: false,
        relay: RelayAddrs {
            v4: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            ..Default::default()
        },
    }
}

struct Harness {
    server: Server,
    binder: MockBinder,
    t0: Instant,
    nonce: String,
}

fn ft(port: u16) -> FiveTuple {
    FiveTuple {
        transport: Transport::Udp,
        client: SocketAddr::from(([127, 0, 0, 1], port)),
        server: SocketAddr::from(([127, 0, 0, 1], 3478)),
    }
}

fn tid(n: u8) -> TransactionId {
    TransactionId([n; 12])
}

/// An owned copy of a response, parsed on demand.
struct Resp(Vec<u8>);
impl Resp {
    fn msg(&self) -> Message<'_> {
        Message::parse(&self.0).expect("response parses")
    }
    fn class(&self) -> Class {
        self.msg().class()
    }
    fn code(&self) -> Option<u16> {
        self.msg().error_code().unwrap().map(|(c, _)| c)
    }
}

fn key(user: &str, pass: &str) -> auth::Key {
    auth::long_term_key(user, REALM, pass)
}

impl Harness {
    fn new(rt: Runtime) -> Harness {
        Harness::with_binder(rt, MockBinder::new(1000))
    }
    fn with_binder(rt: Runtime, binder: MockBinder) -> Harness {
        let shared = Shared::new(rt);
        let mut server = Server::new(shared);
        server.set_collect_events(true);
        let mut h = Harness {
            server,
            binder,
            t0: Instant::now(),
            nonce: String::new(),
        };
        h.nonce = h
            .shared()
            .runtime
            .load()
            .nonces
            .make(ft(40000).client, T0_UNIX);
        h
    }
    fn shared(&self) -> Arc<Shared> {
        self.server.shared().clone()
    }
    fn clock(&self, secs: u64) -> Clock {
        Clock {
            now: self.t0 + Duration::from_secs(secs),
            unix: T0_UNIX + secs,
        }
    }
    fn send(&mut self, f: FiveTuple, bytes: &[u8], secs: u64) -> Option<Resp> {
        let clock = self.clock(secs);
        match self.server.handle_client(f, bytes, clock, &mut self.binder) {
            Output::ToClient(d) => Some(Resp(d.to_vec())),
            _ => None,
        }
    }
    fn nonce_for(&self, f: FiveTuple, secs: u64) -> String {
        self.shared()
            .runtime
            .load()
            .nonces
            .make(f.client, T0_UNIX + secs)
    }
    /// Builds an authenticated request.
    #[allow(clippy::too_many_arguments)]
    fn request(
        &self,
        f: FiveTuple,
        m: u16,
        t: TransactionId,
        user: &str,
        pass: &str,
        secs: u64,
        attrs: impl FnOnce(&mut MessageWriter<'_>),
    ) -> Vec<u8> {
        let nonce = self.nonce_for(f, secs);
        let mut buf = Vec::new();
        let mut w = MessageWriter::new(&mut buf, m, Class::Request, t);
        attrs(&mut w);
        w.attr(attr::USERNAME, user.as_bytes());
        w.attr(attr::REALM, REALM.as_bytes());
        w.attr(attr::NONCE, nonce.as_bytes());
        w.message_integrity(&key(user, pass));
        w.finish();
        buf
    }
    fn allocate(&mut self, f: FiveTuple, t: u8, secs: u64) -> Resp {
        let req = self.request(
            f,
            method::ALLOCATE,
            tid(t),
            "alice",
            "wonderland",
            secs,
            |w| {
                w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
            },
        );
        self.send(f, &req, secs).expect("allocate answered")
    }
    fn relayed(&self, r: &Resp) -> SocketAddr {
        r.msg()
            .xor_address(attr::XOR_RELAYED_ADDRESS)
            .unwrap()
            .expect("XOR-RELAYED-ADDRESS")
    }
    fn permission(&mut self, f: FiveTuple, peer: SocketAddr, t: u8, secs: u64) -> Resp {
        let req = self.request(
            f,
            method::CREATE_PERMISSION,
            tid(t),
            "alice",
            "wonderland",
            secs,
            |w| {
                w.xor_address(attr::XOR_PEER_ADDRESS, peer);
            },
        );
        self.send(f, &req, secs).expect("answered")
    }
    fn channel(&mut self, f: FiveTuple, number: u16, peer: SocketAddr, t: u8, secs: u64) -> Resp {
        let req = self.request(
            f,
            method::CHANNEL_BIND,
            tid(t),
            "alice",
            "wonderland",
            secs,
            |w| {
                w.attr(
                    attr::CHANNEL_NUMBER,
                    &[(number >> 8) as u8, number as u8, 0, 0],
                );
                w.xor_address(attr::XOR_PEER_ADDRESS, peer);
            },
        );
        self.send(f, &req, secs).expect("answered")
    }
    fn refresh(&mut self, f: FiveTuple, lifetime: u32, t: u8, secs: u64) -> Resp {
        let req = self.request(
            f,
            method::REFRESH,
            tid(t),
            "alice",
            "wonderland",
            secs,
            |w| {
                w.u32_attr(attr::LIFETIME, lifetime);
            },
        );
        self.send(f, &req, secs).expect("answered")
    }
    /// Peer datagram through the relay of `relay`; returns what goes to the client.
    fn peer_sends(
        &mut self,
        relay: RelayHandle,
        from: SocketAddr,
        payload: &[u8],
        secs: u64,
    ) -> Option<(FiveTuple, Vec<u8>)> {
        let mut buf = vec![0u8; PEER_HEADROOM + payload.len() + PEER_TAILROOM];
        buf[PEER_HEADROOM..PEER_HEADROOM + payload.len()].copy_from_slice(payload);
        let now = self.t0 + Duration::from_secs(secs);
        let (f, r) = self.server.handle_peer(
            relay,
            from,
            &mut buf,
            PEER_HEADROOM..PEER_HEADROOM + payload.len(),
            now,
        )?;
        Some((f, buf[r].to_vec()))
    }
    fn send_indication(
        &mut self,
        f: FiveTuple,
        peer: SocketAddr,
        data: &[u8],
        secs: u64,
    ) -> Option<(SocketAddr, Vec<u8>)> {
        let mut buf = Vec::new();
        let mut w = MessageWriter::new(&mut buf, method::SEND, Class::Indication, tid(99));
        w.xor_address(attr::XOR_PEER_ADDRESS, peer);
        w.attr(attr::DATA, data);
        w.finish();
        let clock = self.clock(secs);
        match self.server.handle_client(f, &buf, clock, &mut self.binder) {
            Output::ToPeer { peer, data, .. } => Some((peer, data.to_vec())),
            _ => None,
        }
    }
    fn channel_data(
        &mut self,
        f: FiveTuple,
        number: u16,
        data: &[u8],
        secs: u64,
    ) -> Option<(SocketAddr, Vec<u8>)> {
        let mut buf = vec![(number >> 8) as u8, number as u8, 0, data.len() as u8];
        buf.extend_from_slice(data);
        let clock = self.clock(secs);
        match self.server.handle_client(f, &buf, clock, &mut self.binder) {
            Output::ToPeer { peer, data, .. } => Some((peer, data.to_vec())),
            _ => None,
        }
    }
    fn tick(&mut self, secs: u64) {
        let now = self.t0 + Duration::from_secs(secs);
        self.server.handle_timeout(now, &mut self.binder);
    }
}

fn peer() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7000))
}

#[test]
fn binding_returns_reflexive_address() {
    let mut h = Harness::new(runtime(&["127.0.0.0/8"], 10, 100));
    let mut buf = Vec::new();
    MessageWriter::new(&mut buf, method::BINDING, Class::Request, tid(1)).finish();
    let r = h.send(ft(40000), &buf, 0).unwrap();
    assert_eq!(r.class(), Class::Success);
    assert_eq!(
        r.msg().xor_address(attr::XOR_MAPPED_ADDRESS).unwrap(),
        Some(ft(40000).client)
    );
    assert!(r.msg().get(attr::MAPPED_ADDRESS).is_some());
}

#[test]
fn unauthenticated_allocate_gets_401_with_realm_and_nonce_and_no_state() {
    let mut h = Harness::new(runtime(&["127.0.0.0/8"], 10, 100));
    let mut buf = Vec::new();
    let mut w = MessageWriter::new(&mut buf, method::ALLOCATE, Class::Request, tid(1));
    w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    w.finish();
    let r = h.send(ft(40000), &buf, 0).unwrap();
    assert_eq!(r.code(), Some(401));
    assert_eq!(r.msg().realm().unwrap(), Some(REALM));
    assert!(r.msg().nonce().unwrap().is_some());
    assert_eq!(h.server.allocation_count(), 0);
    assert!(h.binder.live.is_empty());
}

#[test]
fn allocate_retransmission_and_437() {
    let mut h = Harness::new(runtime(&["127.0.0.0/8"], 10, 100));
    let r1 = h.allocate(ft(40000), 1, 0);
    assert_eq!(r1.class(), Class::Success, "{:?}", r1.code());
    assert!(r1.msg().verify_integrity(&key("alice", "wonderland")));
    assert_eq!(r1.msg().lifetime().unwrap(), Some(600));
    let r2 = h.allocate(ft(40000), 1, 1);
    assert_eq!(r1.0, r2.0, "a retransmitted Allocate gets the same answer");
    let r3 = h.allocate(ft(40000), 2, 1);
    assert_eq!(r3.code(), Some(437));
    assert_eq!(h.server.allocation_count(), 1);
}

#[test]
fn wrong_password_401_and_unknown_user_401() {
    let mut h = Harness::new(runtime(&["127.0.0.0/8"], 10, 100));
    let req = h.request(
        ft(40000),
        method::ALLOCATE,
        tid(1),
        "alice",
        "nope",
        0,
        |w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        },
    );
    assert_eq!(h.send(ft(40000), &req, 0).unwrap().code(), Some(401));
    let req = h.request(
        ft(40000),
        method::ALLOCATE,
        tid(2),
        "mallory",
        "x",
        0,
        |w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        },
    );
    assert_eq!(h.send(ft(40000), &req, 0).unwrap().code(), Some(401));
    assert_eq!(h.server.allocation_count(), 0);
}

#[test]
fn nonce_expires_with_438() {
    let mut h = Harness::new(runtime(&["127.0.0.0/8"], 10, 100));
    // Nonce made at t=0, request at t=601 still carrying it.
    let nonce = h.nonce.clone();
    let mut buf = Vec::new();
    let mut w = MessageWriter::new(&mut buf, method::ALLOCATE, Class::Request, tid(1));
    w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    w.attr(attr::USERNAME, b"alice");
    w.attr(attr::REALM, REALM.as_bytes());
    w.attr(attr::NONCE, nonce.as_bytes());
    w.message_integrity(&key("alice", "wonderland"));
    w.finish();
    let ok = h.send(ft(40000), &buf, 599).unwrap();
    assert_eq!(ok.class(), Class::Success, "{:?}", ok.code());
    let mut h = Harness::new(runtime(&["127.0.0.0/8"], 10, 100));
    let stale = h.send(ft(40000), &buf, 601).unwrap();
    assert_eq!(stale.code(), Some(438));
    assert!(stale.msg().nonce().unwrap().is_some());
}

#[test]
fn rest_credentials_valid_and_expired() {
    let mut h = Harness::new(runtime(&["127.0.0.0/8"], 10, 100));
    let user = auth::rest_username(T0_UNIX + 60, "carol");
    let pass = auth::rest_password("s3cret", &user);
    let req = h.request(ft(40000), method::ALLOCATE, tid(1), &user, &pass, 0, |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    });
    assert_eq!(h.send(ft(40000), &req, 0).unwrap().class(), Class::Success);
    let req = h.request(ft(40001), method::ALLOCATE, tid(2), &user, &pass, 61, |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    });
    assert_eq!(h.send(ft(40001), &req, 61).unwrap().code(), Some(401));
}

#[test]
fn allocation_lifetime_and_refresh() {
    let mut h = Harness::new(runtime(&["127.0.0.0/8"], 10, 100));
    assert_eq!(h.allocate(ft(40000), 1, 0).class(), Class::Success);
    h.tick(599);
    assert_eq!(h.server.allocation_count(), 1);
    // Refresh at 500 s for 600 s: now ends at 1100 s.
    let r = h.refresh(ft(40000), 600, 2, 500);
    assert_eq!(r.msg().lifetime().unwrap(), Some(600));
    h.tick(1099);
    assert_eq!(h.server.allocation_count(), 1);
    h.tick(1100);
    assert_eq!(h.server.allocation_count(), 0);
    assert_eq!(h.binder.released.len(), 1);
    assert_eq!(h.shared().total_allocations(), 0);
    let ended = h
        .server
        .drain_events()
        .filter(|e| {
            matches!(
                e,
                Event::AllocationEnded {
                    reason: EndReason::Expired,
                    ..
                }
            )
        })
        .count();
    assert_eq!(ended, 1);
}

#[test]
fn lifetime_is_clamped() {
    let mut h = Harness::new(runtime(&["127.0.0.0/8"], 10, 100));
    let f = ft(40000);
    let req = h.request(f, method::ALLOCATE, tid(1), "alice", "wonderland", 0, |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        w.u32_attr(attr::LIFETIME, 99_999);
    });
    assert_eq!(
        h.send(f, &req, 0).unwrap().msg().lifetime().unwrap(),
        Some(3600)
    );
    let f = ft(40001);
    let req = h.request(f, method::ALLOCATE, tid(2), "alice", "wonderland", 0, |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        w.u32_attr(attr::LIFETIME, 30);
    });
    assert_eq!(
        h.send(f, &req, 0).unwrap().msg().lifetime().unwrap(),
        Some(600)
    );
}

#[test]
fn refresh_zero_deletes_and_retransmission_gets_same_answer() {
    let mut h = Harness::new(runtime(&["127.0.0.0/8"], 10, 100));
    h.allocate(ft(40000), 1, 0);
    let r = h.refresh(ft(40000), 0, 2, 10);
    assert_eq!(r.class(), Class::Success);
    assert_eq!(h.server.allocation_count(), 0);
    let again = h.refresh(ft(40000), 0, 2, 11);
    assert_eq!(r.0, again.0);
    let other = h.refresh(ft(40000), 0, 3, 11);
    assert_eq!(other.code(), Some(437));
}

#[test]
fn permission_timer_and_data_both_ways() {
    let mut h = Harness::new(runtime(&["127.0.0.0/8"], 10, 100));
    let f = ft(40000);
    h.allocate(f, 1, 0);
    let relay = RelayHandle(0);
    // No permission yet: nothing either way.
    assert!(h.send_indication(f, peer(), b"hi", 1).is_none());
    assert!(h.peer_sends(relay, peer(), b"yo", 1).is_none());
    assert_eq!(h.permission(f, peer(), 2, 10).class(), Class::Success);
    let (to, data) = h.send_indication(f, peer(), b"hi", 11).unwrap();
    assert_eq!((to, data.as_slice()), (peer(), &b"hi"[..]));
    // Permission is per IP: another port of the same IP passes too.
    let other_port = SocketAddr::from(([127, 0, 0, 1], 7001));
    assert!(h.send_indication(f, other_port, b"hi", 12).is_some());
    // Peer data comes back as a Data indication.
    let (to, bytes) = h.peer_sends(relay, peer(), b"hello", 12).unwrap();
    assert_eq!(to, f);
    let m = Message::parse(&bytes).expect("data indication parses");
    assert_eq!((m.method(), m.class()), (method::DATA, Class::Indication));
    assert_eq!(m.data(), Some(&b"hello"[..]));
    assert_eq!(m.xor_peer_address().unwrap(), Some(peer()));
    // Expires 300 s after it was made (t=10).
    assert!(h.peer_sends(relay, peer(), b"x", 309).is_some());
    assert!(h.peer_sends(relay, peer(), b"x", 310).is_none());
    assert!(h.send_indication(f, peer(), b"x", 310).is_none());
}

#[test]
fn channel_timer_rebinding_rules_and_in_place_framing() {
    let mut h = Harness::new(runtime(&["127.0.0.0/8"], 10, 100));
    let f = ft(40000);
    h.allocate(f, 1, 0);
    let relay = RelayHandle(0);
    let p2 = SocketAddr::from(([127, 0, 0, 2], 7000));
    assert_eq!(h.channel(f, 0x4000, peer(), 2, 0).class(), Class::Success);
    // uclient's RFC 5766 numbers are accepted; out of range is 400.
    assert_eq!(h.channel(f, 0x7ce4, p2, 3, 0).class(), Class::Success);
    assert_eq!(h.channel(f, 0x8000, peer(), 4, 0).code(), Some(400));
    assert_eq!(h.channel(f, 0x3FFF, peer(), 5, 0).code(), Some(400));
    // Same number to another peer, or same peer on another number: 400.
    let p3 = SocketAddr::from(([127, 0, 0, 3], 7000));
    assert_eq!(h.channel(f, 0x4000, p3, 6, 0).code(), Some(400));
    assert_eq!(h.channel(f, 0x4001, peer(), 7, 0).code(), Some(400));
    // Refreshing the same binding is fine.
    assert_eq!(h.channel(f, 0x4000, peer(), 8, 200).class(), Class::Success);

    let (to, data) = h.channel_data(f, 0x4000, b"abc", 201).unwrap();
    assert_eq!((to, data.as_slice()), (peer(), &b"abc"[..]));
    let (_, bytes) = h.peer_sends(relay, peer(), b"hello", 201).unwrap();
    assert_eq!(&bytes[..4], &[0x40, 0x00, 0x00, 0x05]);
    assert_eq!(&bytes[4..], b"hello");
    // Unbound channel number: dropped.
    assert!(h.channel_data(f, 0x4002, b"abc", 201).is_none());

    // The binding made/refreshed at 200 s lasts until 800 s; its permission until 500 s.
    assert!(h.channel_data(f, 0x4000, b"abc", 499).is_some());
    assert!(h.channel_data(f, 0x4000, b"abc", 500).is_none());
    h.permission(f, peer(), 9, 700);
    assert!(h.channel_data(f, 0x4000, b"abc", 799).is_some());
    assert!(h.channel_data(f, 0x4000, b"abc", 800).is_none());
    // After expiry, peer data goes as Data indication.
    let (_, bytes) = h.peer_sends(relay, peer(), b"hello", 801).unwrap();
    assert!(Message::parse(&bytes).is_ok());
    // During the 5 minute cool-down the number can't go to another peer...
    h.refresh(f, 3600, 10, 801);
    h.tick(900);
    assert_eq!(h.channel(f, 0x4000, p3, 11, 900).code(), Some(400));
    // ...but after it, it can.
    h.tick(1101);
    assert_eq!(h.channel(f, 0x4000, p3, 12, 1101).class(), Class::Success);
}

#[test]
fn forbidden_peers_get_403_with_default_policy() {
    let mut h = Harness::new(runtime(&[], 10, 100));
    let f = ft(40000);
    h.allocate(f, 1, 0);
    let forbidden = [
        "0.0.0.0:9",
        "[::]:9",
        "[::1]:9",
        "[::ffff:127.0.0.1]:9",
        "169.254.169.254:80",
        "10.0.0.1:9",
        "224.0.0.1:9",
        "127.0.0.1:22",
        "192.168.1.1:9",
    ];
    for (i, p) in forbidden.iter().enumerate() {
        let peer: SocketAddr = p.parse().unwrap();
        let r = h.permission(f, peer, 10 + i as u8, 1);
        assert_eq!(r.code(), Some(403), "CreatePermission {p}");
        let r = h.channel(f, 0x4000, peer, 40 + i as u8, 1);
        assert_eq!(r.code(), Some(403), "ChannelBind {p}");
        assert!(h.send_indication(f, peer, b"x", 1).is_none());
    }
    // A public address of the wrong family: 443; of the right one: fine.
    assert_eq!(
        h.permission(f, "[2606:4700::1111]:9".parse().unwrap(), 90, 1)
            .code(),
        Some(443)
    );
    assert_eq!(
        h.permission(f, "8.8.8.8:53".parse().unwrap(), 91, 1)
            .class(),
        Class::Success
    );
}

#[test]
fn relay_to_relay_allowed_only_for_live_relays() {
    // Relay address 127.0.0.1 is denied by the default policy.
    let mut h = Harness::new(runtime(&[], 10, 100));
    let (a, b) = (ft(40000), ft(40001));
    let ra = h.allocate(a, 1, 0);
    let rb = h.allocate(b, 2, 0);
    let (relay_a, relay_b) = (h.relayed(&ra), h.relayed(&rb));
    assert_eq!(h.permission(a, relay_b, 3, 1).class(), Class::Success);
    assert_eq!(h.channel(b, 0x4000, relay_a, 4, 1).class(), Class::Success);
    assert!(h.send_indication(a, relay_b, b"x", 2).is_some());
    // Another port on the relay's IP stays unreachable.
    let host_service = SocketAddr::new(relay_b.ip(), 22);
    assert!(h.send_indication(a, host_service, b"x", 2).is_none());
    assert_eq!(h.permission(a, host_service, 5, 2).code(), Some(403));
    // ...and cannot send in either.
    assert!(h
        .peer_sends(RelayHandle(0), host_service, b"x", 2)
        .is_none());
    assert!(h.peer_sends(RelayHandle(0), relay_b, b"x", 2).is_some());
    // Once b's allocation is gone, its address is an ordinary denied address.
    h.refresh(b, 0, 6, 3);
    assert!(h.send_indication(a, relay_b, b"x", 4).is_none());
}

#[test]
fn quotas_486_508_and_recovery() {
    let mut h = Harness::new(runtime(&["127.0.0.0/8"], 2, 3));
    assert_eq!(h.allocate(ft(1), 1, 0).class(), Class::Success);
    assert_eq!(h.allocate(ft(2), 2, 0).class(), Class::Success);
    assert_eq!(h.allocate(ft(3), 3, 0).code(), Some(486));
    let req = h.request(ft(4), method::ALLOCATE, tid(4), "bob", "builder", 0, |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    });
    assert_eq!(h.send(ft(4), &req, 0).unwrap().class(), Class::Success);
    let req = h.request(ft(5), method::ALLOCATE, tid(5), "bob", "builder", 0, |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    });
    assert_eq!(h.send(ft(5), &req, 0).unwrap().code(), Some(508));
    h.refresh(ft(1), 0, 6, 1);
    assert_eq!(h.allocate(ft(3), 7, 1).class(), Class::Success);
}

/// The defaults' split: a static user has no per-user limit of its own (many clients
/// share one), while each TURN REST username stops at `max_allocations_per_rest_user`
/// with 486; `max_allocations_per_user`, when set, binds REST usernames too.
#[test]
fn rest_limit_binds_rest_usernames_not_static_users() {
    let mut rt = runtime(&["127.0.0.0/8"], usize::MAX, 1000);
    rt.limits.max_allocations_per_rest_user = 2;
    let mut h = Harness::new(rt);
    for i in 0..50u16 {
        let r = h.allocate(ft(100 + i), (i % 200) as u8, 0);
        assert_eq!(r.class(), Class::Success, "static allocation {i}");
    }
    let user = auth::rest_username(T0_UNIX + 60, "carol");
    let pass = auth::rest_password("s3cret", &user);
    let rest_allocate = |h: &mut Harness, port: u16, t: u8| {
        let req = h.request(ft(port), method::ALLOCATE, tid(t), &user, &pass, 0, |w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        });
        h.send(ft(port), &req, 0).expect("allocate answered")
    };
    assert_eq!(rest_allocate(&mut h, 200, 1).class(), Class::Success);
    assert_eq!(rest_allocate(&mut h, 201, 2).class(), Class::Success);
    assert_eq!(rest_allocate(&mut h, 202, 3).code(), Some(486));
    // A per-user limit below the REST one binds REST usernames too.
    let mut rt = runtime(&["127.0.0.0/8"], 1, 1000);
    rt.limits.max_allocations_per_rest_user = 100;
    let mut h = Harness::new(rt);
    assert_eq!(rest_allocate(&mut h, 200, 1).class(), Class::Success);
    assert_eq!(rest_allocate(&mut h, 201, 2).code(), Some(486));
    assert_eq!(h.allocate(ft(300), 3, 0).class(), Class::Success);
    assert_eq!(h.allocate(ft(301), 4, 0).code(), Some(486));
}

#[test]
fn port_exhaustion_508_then_recovery() {
    let mut h = Harness::with_binder(runtime(&["127.0.0.0/8"], 100, 100), MockBinder::new(2));
    assert_eq!(h.allocate(ft(1), 1, 0).class(), Class::Success);
    assert_eq!(h.allocate(ft(2), 2, 0).class(), Class::Success);
    assert_eq!(h.allocate(ft(3), 3, 0).code(), Some(508));
    assert_eq!(h.shared().total_allocations(), 2, "quota slot given back");
    h.refresh(ft(1), 0, 4, 1);
    assert_eq!(h.allocate(ft(3), 5, 1).class(), Class::Success);
}

#[test]
fn wrong_credentials_on_allocation_441() {
    let mut h = Harness::new(runtime(&["127.0.0.0/8"], 10, 100));
    let f = ft(40000);
    h.allocate(f, 1, 0);
    let req = h.request(f, method::REFRESH, tid(2), "bob", "builder", 1, |w| {
        w.u32_attr(attr::LIFETIME, 600);
    });
    assert_eq!(h.send(f, &req, 1).unwrap().code(), Some(441));
}

#[test]
fn unknown_comprehension_required_attribute_420() {
    let mut h = Harness::new(runtime(&["127.0.0.0/8"], 10, 100));
    let mut buf = Vec::new();
    let mut w = MessageWriter::new(&mut buf, method::BINDING, Class::Request, tid(1));
    w.attr(0x0031, b"zz");
    w.attr(0xC057, b"ok!!");
    w.finish();
    let r = h.send(ft(40000), &buf, 0).unwrap();
    assert_eq!(r.code(), Some(420));
    assert_eq!(
        r.msg().get(attr::UNKNOWN_ATTRIBUTES),
        Some(&[0x00, 0x31][..])
    );
}

#[test]
fn requests_without_transport_or_bad_family() {
    let mut h = Harness::new(runtime(&["127.0.0.0/8"], 10, 100));
    let req = h.request(
        ft(1),
        method::ALLOCATE,
        tid(1),
        "alice",
        "wonderland",
        0,
        |_| {},
    );
    assert_eq!(h.send(ft(1), &req, 0).unwrap().code(), Some(400));
    let req = h.request(
        ft(2),
        method::ALLOCATE,
        tid(2),
        "alice",
        "wonderland",
        0,
        |w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[99, 0, 0, 0]);
        },
    );
    assert_eq!(h.send(ft(2), &req, 0).unwrap().code(), Some(442));
    // No IPv6 relay address configured: 440.
    let req = h.request(
        ft(3),
        method::ALLOCATE,
        tid(3),
        "alice",
        "wonderland",
        0,
        |w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
            w.attr(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
        },
    );
    assert_eq!(h.send(ft(3), &req, 0).unwrap().code(), Some(440));
    assert_eq!(h.shared().total_allocations(), 0);
}

#[test]
fn even_port_reservation_is_claimed_or_expires() {
    let mut h = Harness::new(runtime(&["127.0.0.0/8"], 10, 100));
    let req = h.request(
        ft(1),
        method::ALLOCATE,
        tid(1),
        "alice",
        "wonderland",
        0,
        |w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
            w.attr(attr::EVEN_PORT, &[0x80]);
        },
    );
    let r = h.send(ft(1), &req, 0).unwrap();
    assert_eq!(r.class(), Class::Success);
    assert_eq!(h.relayed(&r).port() % 2, 0);
    let token = r.msg().reservation_token().unwrap().expect("token");
    let req = h.request(
        ft(2),
        method::ALLOCATE,
        tid(2),
        "alice",
        "wonderland",
        1,
        |w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
            w.attr(attr::RESERVATION_TOKEN, &token);
        },
    );
    let r2 = h.send(ft(2), &req, 1).unwrap();
    assert_eq!(h.relayed(&r2).port(), h.relayed(&r).port() + 1);
    // A second reservation that nobody claims is released after 30 s.
    let req = h.request(
        ft(3),
        method::ALLOCATE,
        tid(3),
        "alice",
        "wonderland",
        2,
        |w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
            w.attr(attr::EVEN_PORT, &[0x80]);
        },
    );
    h.send(ft(3), &req, 2).unwrap();
    let live = h.binder.live.len();
    h.tick(32);
    assert_eq!(h.binder.live.len(), live - 1);
}

#[test]
fn garbage_never_panics_and_gets_nothing() {
    let mut h = Harness::new(runtime(&["127.0.0.0/8"], 10, 100));
    let mut seed = 1u64;
    for len in 0..300usize {
        let mut buf = vec![0u8; len];
        for b in buf.iter_mut() {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            *b = (seed >> 56) as u8;
        }
        if let Some(first) = buf.first_mut() {
            *first &= 0x7F;
        }
        let _ = h.send(ft(40000), &buf, 0);
    }
    assert_eq!(h.server.allocation_count(), 0);
}

#[test]
fn local_relay_hand_off_knows_both_allocations() {
    let mut h = Harness::new(runtime(&[], 10, 100));
    let (a, b) = (ft(40000), ft(40001));
    let ra = h.allocate(a, 1, 0);
    let rb = h.allocate(b, 2, 0);
    let (relay_a, relay_b) = (h.relayed(&ra), h.relayed(&rb));
    let (ha, hb) = (RelayHandle(0), RelayHandle(1));
    assert_eq!(h.server.local_relay(ha, relay_b), Some((hb, relay_a)));
    assert_eq!(h.server.local_relay(ha, peer()), None);
    // The receiving side still needs its permission.
    assert!(h.peer_sends(hb, relay_a, b"x", 1).is_none());
    h.permission(b, relay_a, 3, 1);
    let (to, _) = h.peer_sends(hb, relay_a, b"x", 1).unwrap();
    assert_eq!(to, b);
    h.refresh(b, 0, 4, 2);
    assert_eq!(h.server.local_relay(ha, relay_b), None);
}

#[test]
fn dual_allocation_with_additional_address_family() {
    let mut rt = runtime(&["127.0.0.0/8", "::1/128"], 10, 100);
    rt.relay.v6 = Some("::1".parse().unwrap());
    let mut h = Harness::new(rt);
    let f = ft(40000);
    let req = h.request(f, method::ALLOCATE, tid(1), "alice", "wonderland", 0, |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        w.attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    });
    let r = h.send(f, &req, 0).unwrap();
    assert_eq!(r.class(), Class::Success, "{:?}", r.code());
    let relayed: Vec<SocketAddr> = r
        .msg()
        .attributes()
        .filter(|(t, _)| *t == attr::XOR_RELAYED_ADDRESS)
        .map(|(_, v)| crate::proto::decode_xor_address(v, &r.msg().transaction_id()).unwrap())
        .collect();
    assert_eq!(relayed.len(), 2);
    assert!(relayed[0].is_ipv4() && relayed[1].is_ipv6());
    // Peers of both families are accepted, each through its own relay.
    let p4 = peer();
    let p6: SocketAddr = "[::1]:7000".parse().unwrap();
    assert_eq!(h.permission(f, p4, 2, 1).class(), Class::Success);
    assert_eq!(h.permission(f, p6, 3, 1).class(), Class::Success);
    let (to, _) = h.send_indication(f, p6, b"six", 2).unwrap();
    assert_eq!(to, p6);
    assert!(h.peer_sends(RelayHandle(1), p6, b"back", 2).is_some());
    // LIFETIME 0 with REQUESTED-ADDRESS-FAMILY IPv6 drops only the IPv6 relay.
    let req = h.request(f, method::REFRESH, tid(4), "alice", "wonderland", 3, |w| {
        w.u32_attr(attr::LIFETIME, 0);
        w.attr(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    });
    assert_eq!(h.send(f, &req, 3).unwrap().class(), Class::Success);
    assert_eq!(h.server.allocation_count(), 1);
    assert!(h.send_indication(f, p6, b"six", 4).is_none());
    assert!(h.send_indication(f, p4, b"four", 4).is_some());
    assert_eq!(h.binder.released, vec![RelayHandle(1)]);
    // Without an IPv6 relay address, the IPv4 allocation stands with ADDRESS-ERROR-CODE.
    let mut h = Harness::new(runtime(&["127.0.0.0/8"], 10, 100));
    let req = h.request(f, method::ALLOCATE, tid(5), "alice", "wonderland", 0, |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        w.attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    });
    let r = h.send(f, &req, 0).unwrap();
    assert_eq!(r.class(), Class::Success);
    let aec = r
        .msg()
        .get(attr::ADDRESS_ERROR_CODE)
        .expect("ADDRESS-ERROR-CODE");
    assert_eq!(&aec[..4], &[2, 0, 4, 40]);
    // Both families at once, or IPv4 as the additional one: 400.
    let req = h.request(
        ft(2),
        method::ALLOCATE,
        tid(6),
        "alice",
        "wonderland",
        0,
        |w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
            w.attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[1, 0, 0, 0]);
        },
    );
    assert_eq!(h.send(ft(2), &req, 0).unwrap().code(), Some(400));
}

#[test]
fn bandwidth_per_allocation_token_bucket() {
    let mut rt = runtime(&["127.0.0.0/8"], 10, 100);
    rt.limits.max_bandwidth_per_allocation = 1500;
    let mut h = Harness::new(rt);
    let f = ft(40000);
    h.allocate(f, 1, 0);
    h.channel(f, 0x4000, peer(), 2, 0);
    let payload = [0u8; 100];
    // One second's worth (1500 bytes) passes, the rest of the burst is dropped.
    let sent = (0..30)
        .filter(|_| h.channel_data(f, 0x4000, &payload, 1).is_some())
        .count();
    assert_eq!(sent, 15);
    assert!(h.channel_data(f, 0x4000, &payload, 1).is_none());
    // A second later the bucket has refilled.
    assert!(h.channel_data(f, 0x4000, &payload, 2).is_some());
    // The other direction has its own bucket.
    assert!(h.peer_sends(RelayHandle(0), peer(), &payload, 2).is_some());
}

#[test]
fn draining_refuses_new_allocations_300_or_508() {
    let mut rt = runtime(&["127.0.0.0/8"], 10, 100);
    rt.alternate_servers = vec!["192.0.2.7:3478".parse().unwrap()];
    let mut h = Harness::new(rt);
    h.allocate(ft(1), 1, 0);
    h.shared().set_draining(true);
    let r = h.allocate(ft(2), 2, 0);
    assert_eq!(r.code(), Some(300));
    assert!(r.msg().verify_integrity(&key("alice", "wonderland")));
    assert_eq!(
        r.msg().address(attr::ALTERNATE_SERVER).unwrap(),
        Some("192.0.2.7:3478".parse().unwrap())
    );
    // Existing allocations go on: Refresh works.
    assert_eq!(h.refresh(ft(1), 600, 3, 1).class(), Class::Success);
    let mut h = Harness::new(runtime(&["127.0.0.0/8"], 10, 100));
    h.shared().set_draining(true);
    assert_eq!(h.allocate(ft(2), 2, 0).code(), Some(508));
}

#[test]
fn unauthenticated_answers_are_rate_limited_per_source() {
    let mut rt = runtime(&["127.0.0.0/8"], 10, 100);
    rt.limits.unauthenticated_rate = 5;
    let mut h = Harness::new(rt);
    let mut buf = Vec::new();
    MessageWriter::new(&mut buf, method::BINDING, Class::Request, tid(1)).finish();
    let answered = (0..50).filter(|_| h.send(ft(1), &buf, 0).is_some()).count();
    assert_eq!(answered, 5);
    // Another source is not affected; the first recovers after a second.
    let other = FiveTuple {
        client: "127.0.0.9:5000".parse().unwrap(),
        ..ft(1)
    };
    assert!(h.send(other, &buf, 0).is_some());
    assert!(h.send(ft(1), &buf, 1).is_some());
    // TCP and TLS clients (their address proven by the handshake) are not limited.
    for transport in [Transport::Tcp, Transport::Tls] {
        let stream = FiveTuple { transport, ..ft(1) };
        let answered = (0..50)
            .filter(|_| h.send(stream, &buf, 1).is_some())
            .count();
        assert_eq!(answered, 50, "{transport:?}");
    }
    // Authenticated requests are not limited.
    let answered = (0..20u8)
        .filter(|i| h.refresh(ft(7), 600, 100 + i, 1).code() == Some(437))
        .count();
    assert_eq!(answered, 20);
}

#[test]
fn fleet_store_users_revocation_kills_quota_and_redirect() {
    use super::shared::{NodeLoad, StoreView};
    let mut rt = runtime(&["127.0.0.0/8"], 2, 100);
    rt.redirect_above = 3;
    let mut h = Harness::new(rt);
    let carol = |h: &Harness, f: FiveTuple, t: u8, secs: u64| {
        h.request(f, method::ALLOCATE, tid(t), "carol", "secret", secs, |w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        })
    };
    // Unknown until the store knows her.
    let req = carol(&h, ft(1), 1, 0);
    assert_eq!(h.send(ft(1), &req, 0).unwrap().code(), Some(401));
    let mut view = StoreView {
        up: true,
        ..Default::default()
    };
    view.users.insert("carol".into(), key("carol", "secret"));
    view.secrets.push("fleet-secret".into());
    h.shared().store.store(Arc::new(view));
    let req = carol(&h, ft(1), 2, 0);
    assert_eq!(h.send(ft(1), &req, 0).unwrap().class(), Class::Success);
    // A REST credential from a store secret.
    let user = auth::rest_username(T0_UNIX + 60, "dave");
    let pass = auth::rest_password("fleet-secret", &user);
    let req = h.request(ft(2), method::ALLOCATE, tid(3), &user, &pass, 0, |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    });
    assert_eq!(h.send(ft(2), &req, 0).unwrap().class(), Class::Success);
    // Fleet quota: carol has one here and one elsewhere: a third is refused (486).
    let mut view = StoreView {
        up: true,
        ..Default::default()
    };
    view.users.insert("carol".into(), key("carol", "secret"));
    view.remote_user_counts.insert("carol".into(), 1);
    h.shared().store.store(Arc::new(view));
    let req = carol(&h, ft(3), 4, 0);
    assert_eq!(h.send(ft(3), &req, 0).unwrap().code(), Some(486));
    // Revoked: no more authentication; killed: allocations end at the next tick.
    let mut view = StoreView {
        up: true,
        ..Default::default()
    };
    view.users.insert("carol".into(), key("carol", "secret"));
    view.revoked.insert("carol".into());
    h.shared().store.store(Arc::new(view));
    let req = carol(&h, ft(4), 5, 1);
    assert_eq!(h.send(ft(4), &req, 1).unwrap().code(), Some(401));
    assert_eq!(h.server.allocation_count(), 2);
    h.shared().kill_user("carol");
    h.shared().kill_user("dave");
    h.tick(2);
    assert_eq!(h.server.allocation_count(), 0);
    // Redirect above 3 active allocations to the least-loaded other node.
    h.shared().store.store(Arc::new(StoreView {
        up: true,
        nodes: vec![
            NodeLoad {
                id: "b".into(),
                addr: "192.0.2.2:3478".parse().unwrap(),
                allocations: 2,
            },
            NodeLoad {
                id: "c".into(),
                addr: "192.0.2.3:3478".parse().unwrap(),
                allocations: 1,
            },
        ],
        ..Default::default()
    }));
    for i in 0..2u8 {
        assert_eq!(
            h.allocate(ft(10 + u16::from(i)), 20 + i, 3).class(),
            Class::Success
        );
    }
    let req = h.request(
        ft(12),
        method::ALLOCATE,
        tid(22),
        "bob",
        "builder",
        3,
        |w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        },
    );
    assert_eq!(h.send(ft(12), &req, 3).unwrap().class(), Class::Success);
    let req = h.request(
        ft(20),
        method::ALLOCATE,
        tid(30),
        "bob",
        "builder",
        3,
        |w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        },
    );
    let r = h.send(ft(20), &req, 3).unwrap();
    assert_eq!(r.code(), Some(300));
    assert_eq!(
        r.msg().address(attr::ALTERNATE_SERVER).unwrap(),
        Some("192.0.2.3:3478".parse().unwrap())
    );
}

/// The usage records drained since the last call: (final?, age in seconds, usage).
fn usage_records(h: &mut Harness) -> Vec<(bool, u64, Usage)> {
    h.server
        .drain_events()
        .filter_map(|e| match e {
            Event::AllocationUsage {
                duration, usage, ..
            } => Some((false, duration.as_secs(), usage)),
            Event::AllocationEnded {
                duration, usage, ..
            } => Some((true, duration.as_secs(), usage)),
            _ => None,
        })
        .collect()
}

fn usage(
    packets_to_peer: u64,
    bytes_to_peer: u64,
    packets_to_client: u64,
    bytes_to_client: u64,
) -> Usage {
    Usage {
        packets_to_peer,
        bytes_to_peer,
        packets_to_client,
        bytes_to_client,
    }
}

/// `usage_interval`: a running allocation gets an interim record every interval with
/// what it relayed since its previous record (zeros too), `poll_timeout` names the next
/// one, the final record holds the rest, and together they add up to the totals. A
/// reload's new interval applies from the next tick; switched off, no more interim
/// records and the final one holds everything since the last.
#[test]
fn interim_usage_records_add_up_to_the_totals() {
    let mut rt = runtime(&["127.0.0.0/8"], 10, 100);
    rt.usage_interval = Some(Duration::from_secs(10));
    let mut h = Harness::new(rt);
    let mut all = Vec::new();
    let mut expect = |h: &mut Harness, want: Vec<(bool, u64, Usage)>| {
        let got = usage_records(h);
        assert_eq!(got, want);
        all.extend(got);
    };
    let f = ft(40000);
    h.allocate(f, 1, 0);
    let relay = RelayHandle(0);
    assert_eq!(h.channel(f, 0x4000, peer(), 2, 0).class(), Class::Success);
    assert_eq!(
        h.server.poll_timeout(),
        Some(h.t0 + Duration::from_secs(10))
    );

    // 0-10 s: 3 x 3 bytes to the peer, 2 x 5 back.
    for s in 1..4 {
        assert!(h.channel_data(f, 0x4000, b"abc", s).is_some());
    }
    for s in 1..3 {
        assert!(h.peer_sends(relay, peer(), b"hello", s).is_some());
    }
    h.tick(9);
    assert_eq!(usage_records(&mut h), vec![], "not before the interval");
    h.tick(10);
    expect(&mut h, vec![(false, 10, usage(3, 9, 2, 10))]);
    assert_eq!(
        h.server.poll_timeout(),
        Some(h.t0 + Duration::from_secs(20))
    );

    // 10-20 s: one each way, as a Send indication and a ChannelData.
    assert!(h.send_indication(f, peer(), b"abcdefg", 12).is_some());
    assert!(h.peer_sends(relay, peer(), b"x", 15).is_some());
    h.tick(19);
    expect(&mut h, vec![]);
    h.tick(20);
    expect(&mut h, vec![(false, 20, usage(1, 7, 1, 1))]);

    // 20-30 s: nothing relayed, still a record (the allocation is alive).
    h.tick(30);
    expect(&mut h, vec![(false, 30, usage(0, 0, 0, 0))]);

    // A reload to 60 s: the next record 60 s after the last one.
    let mut rt = runtime(&["127.0.0.0/8"], 10, 100);
    rt.usage_interval = Some(Duration::from_secs(60));
    h.shared().runtime.store(Arc::new(rt));
    h.tick(40);
    assert!(h.channel_data(f, 0x4000, b"ab", 50).is_some());
    assert!(h.channel_data(f, 0x4000, b"ab", 51).is_some());
    h.tick(89);
    expect(&mut h, vec![]);
    h.tick(90);
    expect(&mut h, vec![(false, 90, usage(2, 4, 0, 0))]);

    // Switched off by a reload: no more interim records; the final one has the rest.
    h.shared()
        .runtime
        .store(Arc::new(runtime(&["127.0.0.0/8"], 10, 100)));
    assert!(h.channel_data(f, 0x4000, b"abcd", 100).is_some());
    assert!(h.peer_sends(relay, peer(), b"back", 100).is_some());
    h.tick(200);
    expect(&mut h, vec![]);
    assert_eq!(
        h.server.poll_timeout(),
        Some(h.t0 + Duration::from_secs(600))
    );
    assert_eq!(h.refresh(f, 0, 3, 201).class(), Class::Success);
    expect(&mut h, vec![(true, 201, usage(1, 4, 1, 4))]);

    // Everything relayed, counted once: 7 packets (9 + 7 + 4 + 4 bytes) to the peer,
    // 4 (10 + 1 + 4 bytes) to the client, in four interim records and the final one.
    assert_eq!(all.len(), 5);
    let sum = all.iter().fold(Usage::default(), |t, (_, _, u)| {
        usage(
            t.packets_to_peer + u.packets_to_peer,
            t.bytes_to_peer + u.bytes_to_peer,
            t.packets_to_client + u.packets_to_client,
            t.bytes_to_client + u.bytes_to_client,
        )
    });
    assert_eq!(sum, usage(7, 24, 4, 15));
}

/// Allocations that come due together get at most [`MAX_INTERIM_RECORDS_PER_TICK`]
/// interim records per tick; the rest get theirs at the next tick, with what they
/// relayed up to then.
#[test]
fn interim_records_per_tick_are_capped_and_the_rest_follow() {
    let n = MAX_INTERIM_RECORDS_PER_TICK + 3;
    let mut rt = runtime(&["127.0.0.0/8"], n, n);
    rt.usage_interval = Some(Duration::from_secs(10));
    let mut h = Harness::with_binder(rt, MockBinder::new(n));
    for i in 0..n {
        let r = h.allocate(ft(1000 + i as u16), 1, 0);
        assert_eq!(r.class(), Class::Success, "{i}");
    }
    let f = ft(1000 + n as u16 - 1);
    assert_eq!(h.channel(f, 0x4000, peer(), 2, 0).class(), Class::Success);
    h.server.drain_events().for_each(drop);
    assert!(h.channel_data(f, 0x4000, b"abc", 5).is_some());
    h.tick(10);
    let first = usage_records(&mut h);
    assert_eq!(first.len(), MAX_INTERIM_RECORDS_PER_TICK);
    assert!(h.server.poll_timeout() <= Some(h.t0 + Duration::from_secs(10)));
    assert!(h.channel_data(f, 0x4000, b"abcde", 10).is_some());
    h.tick(11);
    let rest = usage_records(&mut h);
    assert_eq!(rest.len(), 3);
    // The last allocation's record came in the second tick, with both packets.
    assert!(rest.contains(&(false, 11, usage(2, 8, 0, 0))), "{rest:?}");
    h.tick(12);
    assert_eq!(usage_records(&mut h), vec![]);
    assert_eq!(
        h.server.poll_timeout(),
        Some(h.t0 + Duration::from_secs(20))
    );
}

/// Without `usage_interval` there are no interim records, and the final record holds
/// the allocation's totals.
#[test]
fn without_usage_interval_only_the_final_record() {
    let mut h = Harness::new(runtime(&["127.0.0.0/8"], 10, 100));
    let f = ft(40000);
    h.allocate(f, 1, 0);
    assert_eq!(h.channel(f, 0x4000, peer(), 2, 0).class(), Class::Success);
    for s in [1, 100, 250] {
        assert!(h.channel_data(f, 0x4000, b"abc", s).is_some());
        assert!(h.peer_sends(RelayHandle(0), peer(), b"hello", s).is_some());
        h.tick(s + 1);
    }
    assert_eq!(usage_records(&mut h), vec![]);
    h.tick(600);
    assert_eq!(usage_records(&mut h), vec![(true, 600, usage(3, 9, 3, 15))]);
}

/// The kernel fast-path command queue: exact sequences per scenario, and a replay check
/// that the installed entries are exactly the live permissions and bindings.
/// An allocation exported from one core and imported into another (an upgrade) is the
/// same allocation: same relayed address, permission, channel, expiry and usage; the
/// first core forgets it without a usage record.
#[test]
fn allocation_state_moves_between_cores_whole() {
    let rt = || runtime(&["127.0.0.0/8"], 10, 100);
    let mut a = Harness::new(rt());
    let f = ft(40000);
    let r = a.allocate(f, 1, 0);
    let relayed = a.relayed(&r);
    assert_eq!(a.permission(f, peer(), 2, 1).class(), Class::Success);
    assert_eq!(a.channel(f, 0x4001, peer(), 3, 2).class(), Class::Success);
    assert!(a.channel_data(f, 0x4001, b"hello", 3).is_some());
    let handle = a.server.allocations().next().unwrap().relay;
    let mono = |h: &Harness, secs: u64| MonoClock {
        now: h.t0 + Duration::from_secs(secs),
        mono_ns: 5_000_000_000_000 + secs * 1_000_000_000,
    };
    let state = a.server.export_udp(mono(&a, 10), &mut |h| h.0 + 100);
    assert_eq!(state.allocations.len(), 1);
    assert_eq!(state.allocations[0].relay.socket, handle.0 + 100);
    // JSON both ways (the hand-over format), as the shell sends it.
    let state: ShardState = serde_json::from_slice(&serde_json::to_vec(&state).unwrap()).unwrap();

    let mut b = Harness::new(rt());
    let taken = RelayHandle(7);
    // An unknown socket number refuses the whole state, changing nothing.
    assert!(b
        .server
        .import_udp(&state, mono(&b, 10), &mut |_| None)
        .is_err());
    assert_eq!(b.server.allocation_count(), 0);
    let n = b
        .server
        .import_udp(&state, mono(&b, 10), &mut |i| {
            (i == handle.0 + 100).then_some(taken)
        })
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(b.shared().total_allocations(), 1);
    // The same 5-tuple: 437; the permission and channel work from the peer's side.
    assert_eq!(b.allocate(f, 4, 11).code(), Some(437));
    let (to, bytes) = b.peer_sends(taken, peer(), b"back", 12).expect("relayed");
    assert_eq!(to, f);
    assert_eq!(&bytes[..2], &[0x40, 0x01], "as ChannelData on the channel");
    assert!(b.channel_data(f, 0x4001, b"again", 12).is_some());
    let moved = b.server.allocations().next().unwrap();
    assert_eq!(moved.advertised, relayed);
    assert_eq!(
        moved.usage.packets_to_peer, 2,
        "usage carried over and counted on"
    );
    // Expiry as before: 600 s after the Allocate at 0.
    b.tick(599);
    assert_eq!(b.server.allocation_count(), 1);
    b.server.drain_events().count();
    b.tick(601);
    assert_eq!(b.server.allocation_count(), 0);
    let ended = b
        .server
        .drain_events()
        .find(|e| matches!(e, Event::AllocationEnded { .. }));
    match ended {
        Some(Event::AllocationEnded { usage, reason, .. }) => {
            assert_eq!(reason, EndReason::Expired);
            assert_eq!(usage.packets_to_peer, 2);
            assert_eq!(usage.packets_to_client, 1);
        }
        other => panic!("expected the end of the moved allocation: {other:?}"),
    }
    assert!(b.binder.released.contains(&taken));

    // The first core lets go: no record, its socket copy released, quota freed.
    a.server.drain_events().count();
    assert_eq!(a.server.forget_udp(&mut a.binder), 1);
    assert_eq!(a.server.allocation_count(), 0);
    assert_eq!(a.shared().total_allocations(), 0);
    assert!(a.binder.released.contains(&handle));
    assert!(!a
        .server
        .drain_events()
        .any(|e| matches!(e, Event::AllocationEnded { .. })));
}

mod fast_path {
    use super::*;
    use std::collections::HashMap;

    fn on(mut rt: Runtime) -> Runtime {
        rt.kernel_fast_path = true;
        rt
    }

    /// The scenarios' usual runtime: loopback peers allowed, the fast path on.
    fn fast() -> Runtime {
        on(runtime(&["127.0.0.0/8"], 10, 100))
    }

    /// A command reduced to what the scenarios compare; expiries in seconds after t0.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum C {
        Clear,
        InsCh(u16, SocketAddr, u64),
        RmCh(u16, SocketAddr),
        InsPerm(IpAddr, u64),
        RmPerm(IpAddr),
    }
    use C::*;

    impl Harness {
        fn secs(&self, t: Instant) -> u64 {
            t.duration_since(self.t0).as_secs()
        }
        fn fp_raw(&mut self) -> Vec<FastPathCommand> {
            self.server.drain_fast_path().collect()
        }
        fn fp(&mut self) -> Vec<C> {
            self.fp_raw()
                .into_iter()
                .map(|c| match c {
                    FastPathCommand::Clear => Clear,
                    FastPathCommand::InstallChannel(e) => {
                        InsCh(e.number, e.peer, self.secs(e.expires))
                    }
                    FastPathCommand::RemoveChannel(e) => RmCh(e.number, e.peer),
                    FastPathCommand::InstallPermission(e) => {
                        InsPerm(e.peer_ip, self.secs(e.expires))
                    }
                    FastPathCommand::RemovePermission(e) => RmPerm(e.peer_ip),
                })
                .collect()
        }
        fn long_refresh(&mut self, f: FiveTuple, t: u8, secs: u64) {
            assert_eq!(self.refresh(f, 3600, t, secs).class(), Class::Success);
        }
    }

    fn ip() -> IpAddr {
        peer().ip()
    }

    fn peer2() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 2], 7002))
    }

    #[test]
    fn clear_at_start_then_bind_installs_with_every_field() {
        let mut h = Harness::new(fast());
        assert!(h.server.fast_path_on());
        assert_eq!(h.fp(), vec![Clear]);
        let f = ft(40000);
        let r = h.allocate(f, 1, 0);
        let relay = h.relayed(&r);
        assert_eq!(h.fp(), vec![], "an allocation alone relays nothing");
        assert_eq!(h.channel(f, 0x4000, peer(), 2, 1).class(), Class::Success);
        let id = h.server.allocations().next().unwrap().id;
        let t0 = h.t0;
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(
            h.fp_raw(),
            vec![
                FastPathCommand::InstallPermission(PermissionEntry {
                    allocation: id,
                    client: f.client,
                    server: f.server,
                    relay,
                    relay_advertised: relay,
                    peer_ip: ip(),
                    relays_only: false,
                    expires: at(1 + 300),
                }),
                FastPathCommand::InstallChannel(ChannelEntry {
                    allocation: id,
                    client: f.client,
                    server: f.server,
                    relay,
                    relay_advertised: relay,
                    peer: peer(),
                    number: 0x4000,
                    expires: at(1 + 600),
                }),
            ]
        );
    }

    #[test]
    fn advertised_relay_address_behind_nat() {
        let mut rt = fast();
        rt.relay.external_v4 = Some("203.0.113.7".parse().unwrap());
        let mut h = Harness::new(rt);
        h.fp();
        let f = ft(40000);
        let r = h.allocate(f, 1, 0);
        let advertised = h.relayed(&r);
        h.permission(f, peer(), 2, 0);
        let cmds = h.fp_raw();
        let [FastPathCommand::InstallPermission(e)] = cmds.as_slice() else {
            panic!("{cmds:?}");
        };
        assert_eq!(e.relay_advertised, advertised);
        assert_eq!(
            e.relay,
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), advertised.port())
        );
    }

    /// The scenario table: each runs on a fresh harness and compares the exact commands
    /// queued by each step.
    #[test]
    fn scenarios() {
        type Step = (&'static str, fn(&mut Harness), Vec<C>);
        let table: Vec<(&str, Runtime, Vec<Step>)> = vec![
            (
                "bind, refresh, permission refresh",
                fast(),
                vec![
                    ("allocate", |h| drop(h.allocate(ft(40000), 1, 0)), vec![]),
                    (
                        "bind",
                        |h| drop(h.channel(ft(40000), 0x4000, peer(), 2, 0)),
                        vec![InsPerm(ip(), 300), InsCh(0x4000, peer(), 600)],
                    ),
                    (
                        "bind again: reinstall with later expiry",
                        |h| drop(h.channel(ft(40000), 0x4000, peer(), 3, 100)),
                        vec![InsPerm(ip(), 400), InsCh(0x4000, peer(), 700)],
                    ),
                    (
                        "CreatePermission refreshes only the permission",
                        |h| drop(h.permission(ft(40000), peer(), 4, 200)),
                        vec![InsPerm(ip(), 500)],
                    ),
                    (
                        "two peers in one CreatePermission",
                        |h| {
                            let req = h.request(
                                ft(40000),
                                method::CREATE_PERMISSION,
                                tid(5),
                                "alice",
                                "wonderland",
                                210,
                                |w| {
                                    w.xor_address(attr::XOR_PEER_ADDRESS, peer2());
                                    w.xor_address(attr::XOR_PEER_ADDRESS, peer());
                                },
                            );
                            assert_eq!(
                                h.send(ft(40000), &req, 210).unwrap().class(),
                                Class::Success
                            );
                        },
                        vec![InsPerm(peer2().ip(), 510), InsPerm(ip(), 510)],
                    ),
                    (
                        "a conflicting bind: 400, nothing",
                        |h| drop(h.channel(ft(40000), 0x4001, peer(), 6, 220)),
                        vec![],
                    ),
                ],
            ),
            (
                "expiries: first tick at or after each",
                fast(),
                vec![
                    (
                        "allocate",
                        |h| {
                            drop(h.allocate(ft(40000), 1, 0));
                            h.long_refresh(ft(40000), 2, 0);
                        },
                        vec![],
                    ),
                    (
                        "bind at 0",
                        |h| drop(h.channel(ft(40000), 0x4000, peer(), 3, 0)),
                        vec![InsPerm(ip(), 300), InsCh(0x4000, peer(), 600)],
                    ),
                    (
                        "permission at 10",
                        |h| drop(h.permission(ft(40000), peer2(), 4, 10)),
                        vec![InsPerm(peer2().ip(), 310)],
                    ),
                    ("tick 299", |h| h.tick(299), vec![]),
                    (
                        "tick 300: the bound peer's permission",
                        |h| h.tick(300),
                        vec![RmPerm(ip())],
                    ),
                    ("tick 309", |h| h.tick(309), vec![]),
                    (
                        "tick 312: late tick still removes",
                        |h| h.tick(312),
                        vec![RmPerm(peer2().ip())],
                    ),
                    ("tick 599", |h| h.tick(599), vec![]),
                    (
                        "tick 600: the binding",
                        |h| h.tick(600),
                        vec![RmCh(0x4000, peer())],
                    ),
                    ("tick 601: removed once", |h| h.tick(601), vec![]),
                    (
                        "rebind within the cool-down reinstalls",
                        |h| drop(h.channel(ft(40000), 0x4000, peer(), 5, 700)),
                        vec![InsPerm(ip(), 1000), InsCh(0x4000, peer(), 1300)],
                    ),
                    (
                        "tick 1300",
                        |h| h.tick(1300),
                        vec![RmCh(0x4000, peer()), RmPerm(ip())],
                    ),
                    (
                        "cool-down ends: nothing reinstalls",
                        |h| {
                            h.tick(1600);
                            h.tick(1700);
                        },
                        vec![],
                    ),
                ],
            ),
            (
                "Refresh 0 removes every entry",
                fast(),
                vec![
                    ("allocate", |h| drop(h.allocate(ft(40000), 1, 0)), vec![]),
                    (
                        "bind",
                        |h| drop(h.channel(ft(40000), 0x4000, peer(), 2, 0)),
                        vec![InsPerm(ip(), 300), InsCh(0x4000, peer(), 600)],
                    ),
                    (
                        "permission",
                        |h| drop(h.permission(ft(40000), peer2(), 3, 0)),
                        vec![InsPerm(peer2().ip(), 300)],
                    ),
                    (
                        "refresh 0",
                        |h| drop(h.refresh(ft(40000), 0, 4, 1)),
                        vec![RmCh(0x4000, peer()), RmPerm(ip()), RmPerm(peer2().ip())],
                    ),
                    (
                        "its retransmission",
                        |h| drop(h.refresh(ft(40000), 0, 4, 1)),
                        vec![],
                    ),
                    (
                        "ticks",
                        |h| {
                            h.tick(2);
                            h.tick(700);
                        },
                        vec![],
                    ),
                ],
            ),
            (
                "a binding in its cool-down is not removed twice",
                fast(),
                vec![
                    (
                        "allocate",
                        |h| {
                            drop(h.allocate(ft(40000), 1, 0));
                            h.long_refresh(ft(40000), 2, 0);
                        },
                        vec![],
                    ),
                    (
                        "bind",
                        |h| drop(h.channel(ft(40000), 0x4000, peer(), 3, 0)),
                        vec![InsPerm(ip(), 300), InsCh(0x4000, peer(), 600)],
                    ),
                    (
                        "expire",
                        |h| h.tick(600),
                        vec![RmCh(0x4000, peer()), RmPerm(ip())],
                    ),
                    (
                        "refresh 0 during the cool-down",
                        |h| drop(h.refresh(ft(40000), 0, 4, 650)),
                        vec![],
                    ),
                ],
            ),
            (
                "allocation expiry removes",
                fast(),
                vec![
                    ("allocate", |h| drop(h.allocate(ft(40000), 1, 0)), vec![]),
                    (
                        "bind at 500",
                        |h| drop(h.channel(ft(40000), 0x4000, peer(), 2, 500)),
                        vec![InsPerm(ip(), 800), InsCh(0x4000, peer(), 1100)],
                    ),
                    ("tick 599", |h| h.tick(599), vec![]),
                    (
                        "allocation ends at 600",
                        |h| h.tick(600),
                        vec![RmCh(0x4000, peer()), RmPerm(ip())],
                    ),
                ],
            ),
            (
                "a user killed by the fleet store",
                fast(),
                vec![
                    ("allocate", |h| drop(h.allocate(ft(40000), 1, 0)), vec![]),
                    (
                        "permission",
                        |h| drop(h.permission(ft(40000), peer(), 2, 0)),
                        vec![InsPerm(ip(), 300)],
                    ),
                    (
                        "kill",
                        |h| {
                            h.shared().kill_user("alice");
                            h.tick(1);
                        },
                        vec![RmPerm(ip())],
                    ),
                ],
            ),
            (
                "a revoked user is refused: nothing installs",
                fast(),
                vec![
                    ("allocate", |h| drop(h.allocate(ft(40000), 1, 0)), vec![]),
                    (
                        "revoke, then bind",
                        |h| {
                            let mut v = shared::StoreView::default();
                            v.revoked.insert("alice".into());
                            h.shared().store.store(Arc::new(v));
                            assert_eq!(
                                h.channel(ft(40000), 0x4000, peer(), 2, 0).code(),
                                Some(401)
                            );
                        },
                        vec![],
                    ),
                ],
            ),
            (
                "close_all (drain end) removes",
                fast(),
                vec![
                    ("allocate", |h| drop(h.allocate(ft(40000), 1, 0)), vec![]),
                    (
                        "bind",
                        |h| drop(h.channel(ft(40000), 0x4000, peer(), 2, 0)),
                        vec![InsPerm(ip(), 300), InsCh(0x4000, peer(), 600)],
                    ),
                    (
                        "close_all",
                        |h| {
                            let now = h.t0;
                            h.server.close_all(now, &mut h.binder);
                        },
                        vec![RmCh(0x4000, peer()), RmPerm(ip())],
                    ),
                ],
            ),
            (
                "peer refused by policy: nothing",
                on(runtime(&[], 10, 100)),
                vec![
                    ("allocate", |h| drop(h.allocate(ft(40000), 1, 0)), vec![]),
                    (
                        "403s",
                        |h| {
                            let p: SocketAddr = "10.0.0.1:9".parse().unwrap();
                            assert_eq!(h.permission(ft(40000), p, 2, 0).code(), Some(403));
                            assert_eq!(h.channel(ft(40000), 0x4000, p, 3, 0).code(), Some(403));
                            // One denied peer among allowed ones refuses them all.
                            let req = h.request(
                                ft(40000),
                                method::CREATE_PERMISSION,
                                tid(4),
                                "alice",
                                "wonderland",
                                0,
                                |w| {
                                    w.xor_address(
                                        attr::XOR_PEER_ADDRESS,
                                        "8.8.8.8:53".parse().unwrap(),
                                    );
                                    w.xor_address(attr::XOR_PEER_ADDRESS, p);
                                },
                            );
                            assert_eq!(h.send(ft(40000), &req, 0).unwrap().code(), Some(403));
                        },
                        vec![],
                    ),
                ],
            ),
        ];
        for (name, rt, steps) in table {
            let mut h = Harness::new(rt);
            assert_eq!(h.fp(), vec![Clear], "{name}: start");
            for (step, run, want) in steps {
                run(&mut h);
                assert_eq!(h.fp(), want, "{name}: {step}");
            }
        }
    }

    /// Whatever happens, these never queue a command.
    #[test]
    fn nothing_for_tcp_tls_bandwidth_limits_or_switch_off() {
        let tcp = FiveTuple {
            transport: Transport::Tcp,
            ..ft(40001)
        };
        let tls = FiveTuple {
            transport: Transport::Tls,
            ..ft(40002)
        };
        let mut per_alloc = fast();
        per_alloc.limits.max_bandwidth_per_allocation = 1500;
        let mut total = fast();
        total.limits.max_total_bandwidth = 1_000_000;
        let cases: Vec<(&str, Runtime, Vec<FiveTuple>, bool)> = vec![
            (
                "switch off",
                runtime(&["127.0.0.0/8"], 10, 100),
                vec![ft(40000), tcp],
                false,
            ),
            ("TCP and TLS clients", fast(), vec![tcp, tls], true),
            (
                "per-allocation bandwidth limit",
                per_alloc,
                vec![ft(40000)],
                false,
            ),
            ("total bandwidth limit", total, vec![ft(40000)], false),
        ];
        for (name, rt, clients, clear) in cases {
            let mut h = Harness::new(rt);
            let start = if clear { vec![Clear] } else { vec![] };
            assert_eq!(h.fp(), start, "{name}");
            for (i, &c) in clients.iter().enumerate() {
                let t = 10 * i as u8;
                assert_eq!(h.allocate(c, t + 1, 0).class(), Class::Success, "{name}");
                assert_eq!(
                    h.channel(c, 0x4000, peer(), t + 2, 1).class(),
                    Class::Success
                );
                assert_eq!(h.permission(c, peer2(), t + 3, 2).class(), Class::Success);
                assert!(
                    h.channel_data(c, 0x4000, b"x", 3).is_some(),
                    "{name}: userspace relays"
                );
            }
            h.tick(300);
            h.tick(600);
            assert_eq!(h.fp(), vec![], "{name}");
        }
    }

    /// Client to client through two allocations: relays-only permissions carry the flag.
    #[test]
    fn relay_to_relay_entries_are_relays_only() {
        let mut h = Harness::new(on(runtime(&[], 10, 100)));
        h.fp();
        let (a, b) = (ft(40000), ft(40001));
        let r = h.allocate(a, 1, 0);
        let ra = h.relayed(&r);
        let r = h.allocate(b, 2, 0);
        let rb = h.relayed(&r);
        h.channel(a, 0x4000, rb, 3, 0);
        h.channel(b, 0x4000, ra, 4, 0);
        let cmds = h.fp_raw();
        assert_eq!(cmds.len(), 4, "{cmds:?}");
        let perms: Vec<_> = cmds
            .iter()
            .filter_map(|c| match c {
                FastPathCommand::InstallPermission(e) => Some((e.relay, e.peer_ip, e.relays_only)),
                _ => None,
            })
            .collect();
        assert_eq!(perms, vec![(ra, rb.ip(), true), (rb, ra.ip(), true)]);
    }

    /// Dropping one family of a dual allocation removes that family's entries only.
    #[test]
    fn dual_allocation_family_drop() {
        let mut rt = on(runtime(&["127.0.0.0/8", "::1/128"], 10, 100));
        rt.relay.v6 = Some("::1".parse().unwrap());
        let mut h = Harness::new(rt);
        h.fp();
        let f = ft(40000);
        let req = h.request(f, method::ALLOCATE, tid(1), "alice", "wonderland", 0, |w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
            w.attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]);
        });
        assert_eq!(h.send(f, &req, 0).unwrap().class(), Class::Success);
        let p6: SocketAddr = "[::1]:7000".parse().unwrap();
        h.channel(f, 0x4000, peer(), 2, 0);
        h.channel(f, 0x4001, p6, 3, 0);
        let cmds = h.fp_raw();
        let relays: Vec<SocketAddr> = cmds
            .iter()
            .filter_map(|c| match c {
                FastPathCommand::InstallChannel(e) => Some(e.relay),
                _ => None,
            })
            .collect();
        assert!(relays[0].is_ipv4() && relays[1].is_ipv6(), "{relays:?}");
        let req = h.request(f, method::REFRESH, tid(4), "alice", "wonderland", 1, |w| {
            w.u32_attr(attr::LIFETIME, 0);
            w.attr(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
        });
        assert_eq!(h.send(f, &req, 1).unwrap().class(), Class::Success);
        assert_eq!(h.fp(), vec![RmCh(0x4001, p6), RmPerm(p6.ip())]);
        h.refresh(f, 0, 5, 2);
        assert_eq!(h.fp(), vec![RmCh(0x4000, peer()), RmPerm(ip())]);
    }

    /// A reload that removes a user ends that user's allocations at the next tick, like a
    /// revocation (usage record, reason "deleted"), and with them their kernel entries;
    /// other users' stay, and a TURN REST username's stay while a secret remains, expired
    /// or not. Ticks without a reload end nothing.
    #[test]
    fn reload_removing_a_user_ends_its_allocations_and_entries() {
        let mut h = Harness::new(fast());
        h.fp();
        let (fa, fb, fd) = (ft(40000), ft(40001), ft(40002));
        h.allocate(fa, 1, 0);
        h.channel(fa, 0x4000, peer(), 2, 0);
        let alloc = |h: &mut Harness, f: FiveTuple, t: u8, user: &str, pass: &str| {
            let req = h.request(f, method::ALLOCATE, tid(t), user, pass, 0, |w| {
                w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
            });
            assert_eq!(
                h.send(f, &req, 0).unwrap().class(),
                Class::Success,
                "{user}"
            );
        };
        alloc(&mut h, fb, 3, "bob", "builder");
        let dave = auth::rest_username(T0_UNIX + 60, "dave");
        alloc(&mut h, fd, 4, &dave, &auth::rest_password("s3cret", &dave));
        let req = h.request(
            fd,
            method::CREATE_PERMISSION,
            tid(5),
            &dave,
            &auth::rest_password("s3cret", &dave),
            0,
            |w| {
                w.xor_address(attr::XOR_PEER_ADDRESS, peer2());
            },
        );
        assert_eq!(h.send(fd, &req, 0).unwrap().class(), Class::Success);
        assert_eq!(h.fp().len(), 3);
        h.tick(5);
        assert_eq!(h.server.allocation_count(), 3, "no reload: nothing ends");
        h.server.drain_events().for_each(drop);

        // Reload without alice (same secret): hers ends at the next tick, nothing else.
        let mut users = BTreeMap::new();
        users.insert("bob".to_string(), "builder".to_string());
        let mut rt = fast();
        rt.credentials = Credentials::new(REALM, &users, &["s3cret".to_string()]);
        h.shared().runtime.store(Arc::new(rt));
        assert_eq!(
            h.server.allocation_count(),
            3,
            "ends at the tick, not before"
        );
        h.tick(100);
        assert_eq!(h.server.allocation_count(), 2);
        assert_eq!(h.fp(), vec![RmCh(0x4000, peer()), RmPerm(ip())]);
        let ended: Vec<(String, EndReason)> = h
            .server
            .drain_events()
            .filter_map(|e| match e {
                Event::AllocationEnded {
                    username, reason, ..
                } => Some((username, reason)),
                _ => None,
            })
            .collect();
        assert_eq!(ended, vec![("alice".to_string(), EndReason::Deleted)]);
        assert_eq!(h.shared().total_allocations(), 2);
        // Dave's username expired at 60 s: still his while the secret remains.
        h.tick(101);
        assert_eq!(h.server.allocation_count(), 2);

        // Reload without the secret: dave's REST allocation ends; bob's stays.
        let mut rt = fast();
        rt.credentials = Credentials::new(REALM, &users, &[]);
        h.shared().runtime.store(Arc::new(rt));
        h.tick(102);
        assert_eq!(h.server.allocation_count(), 1);
        assert_eq!(h.fp(), vec![RmPerm(peer2().ip())]);
        assert_eq!(
            h.server.allocations().next().unwrap().username.as_ref(),
            "bob"
        );
    }

    /// Shorter permission and channel lifetimes (`relay.permission_lifetime`,
    /// `relay.channel_lifetime`): the entries carry them and go at the first tick at or
    /// after them; a refresh before expiry keeps them.
    #[test]
    fn configured_lifetimes_set_expiries_and_removals() {
        let mut rt = fast();
        rt.limits.permission_lifetime = Duration::from_secs(2);
        rt.limits.channel_lifetime = Duration::from_secs(3);
        let mut h = Harness::new(rt);
        h.fp();
        let f = ft(40000);
        h.allocate(f, 1, 0);
        let handle = h.server.allocations().next().unwrap().relay;
        assert_eq!(h.channel(f, 0x4000, peer(), 2, 0).class(), Class::Success);
        assert_eq!(h.fp(), vec![InsPerm(ip(), 2), InsCh(0x4000, peer(), 3)]);
        assert!(h.peer_sends(handle, peer(), b"x", 1).is_some());
        // Refreshed at 1: permission to 3, channel to 4.
        assert_eq!(h.channel(f, 0x4000, peer(), 3, 1).class(), Class::Success);
        assert_eq!(h.fp(), vec![InsPerm(ip(), 3), InsCh(0x4000, peer(), 4)]);
        h.tick(2);
        assert_eq!(h.fp(), vec![], "refreshed: nothing goes at 2");
        assert!(h.peer_sends(handle, peer(), b"x", 2).is_some());
        h.tick(3);
        assert_eq!(h.fp(), vec![RmPerm(ip())]);
        assert!(h.peer_sends(handle, peer(), b"x", 3).is_none());
        h.tick(4);
        assert_eq!(h.fp(), vec![RmCh(0x4000, peer())]);
        assert_eq!(h.channel_data(f, 0x4000, b"x", 4), None);
    }

    /// A reload that sets a bandwidth limit (or turns the switch off) removes every entry
    /// at the next tick; undoing it installs the live ones again.
    #[test]
    fn reload_switches_the_fast_path() {
        let mut h = Harness::new(fast());
        h.fp();
        let f = ft(40000);
        h.allocate(f, 1, 0);
        h.long_refresh(f, 2, 0);
        h.channel(f, 0x4000, peer(), 3, 0);
        h.permission(f, peer2(), 4, 200);
        h.fp();
        let mut limited = fast();
        limited.limits.max_bandwidth_per_allocation = 1000;
        h.shared().runtime.store(Arc::new(limited));
        h.tick(10);
        assert!(!h.server.fast_path_on());
        assert_eq!(
            h.fp(),
            vec![RmCh(0x4000, peer()), RmPerm(ip()), RmPerm(peer2().ip())]
        );
        h.permission(f, peer2(), 5, 20);
        h.tick(300);
        assert_eq!(h.fp(), vec![], "off: nothing, expiries included");
        // Back on at 310: the binding (to 600) and the second peer (to 320) are live;
        // the bound peer's permission expired at 300.
        h.shared().runtime.store(Arc::new(fast()));
        h.tick(310);
        assert_eq!(
            h.fp(),
            vec![InsPerm(peer2().ip(), 320), InsCh(0x4000, peer(), 600)]
        );
        h.tick(320);
        assert_eq!(h.fp(), vec![RmPerm(peer2().ip())]);
        h.shared()
            .runtime
            .store(Arc::new(runtime(&["127.0.0.0/8"], 10, 100)));
        h.tick(330);
        assert_eq!(h.fp(), vec![RmCh(0x4000, peer())]);
    }

    /// Replays commands into maps keyed as the kernel's would be (both directions).
    #[derive(Default)]
    struct Kernel {
        ch_client: HashMap<ClientChannelKey, ChannelEntry>,
        ch_relay: HashMap<RelayPeerKey, ChannelEntry>,
        perm_client: HashMap<ClientPermissionKey, PermissionEntry>,
        perm_relay: HashMap<RelayPermissionKey, PermissionEntry>,
    }

    impl Kernel {
        fn apply(&mut self, cmds: Vec<FastPathCommand>) {
            for c in cmds {
                match c {
                    FastPathCommand::Clear => *self = Kernel::default(),
                    FastPathCommand::InstallChannel(e) => {
                        self.ch_client.insert(e.client_key(), e);
                        self.ch_relay.insert(e.relay_key(), e);
                    }
                    FastPathCommand::RemoveChannel(e) => {
                        assert!(self.ch_client.remove(&e.client_key()).is_some(), "{e:?}");
                        assert!(self.ch_relay.remove(&e.relay_key()).is_some(), "{e:?}");
                    }
                    FastPathCommand::InstallPermission(e) => {
                        self.perm_client.insert(e.client_key(), e);
                        self.perm_relay.insert(e.relay_key(), e);
                    }
                    FastPathCommand::RemovePermission(e) => {
                        assert!(self.perm_client.remove(&e.client_key()).is_some(), "{e:?}");
                        assert!(self.perm_relay.remove(&e.relay_key()).is_some(), "{e:?}");
                    }
                }
            }
            // The paired maps agree.
            assert_eq!(self.ch_client.len(), self.ch_relay.len());
            assert_eq!(self.perm_client.len(), self.perm_relay.len());
            for e in self.ch_client.values() {
                assert_eq!(self.ch_relay.get(&e.relay_key()), Some(e));
            }
            for e in self.perm_client.values() {
                assert_eq!(self.perm_relay.get(&e.relay_key()), Some(e));
            }
        }
    }

    /// What the kernel should hold: `strict` (right after a tick) every permission and
    /// every unexpired binding of the UDP allocations; otherwise (between ticks) the
    /// unexpired ones must be there and nothing that the core no longer has.
    fn check(h: &Harness, k: &Kernel, now: Instant, strict: bool) {
        let mut perms = HashMap::new();
        let mut chans = HashMap::new();
        let mut maybe_perms = HashMap::new();
        let mut maybe_chans = HashMap::new();
        for a in h.server.allocations() {
            if !fastpath::eligible(a) {
                continue;
            }
            for p in &a.permissions {
                let e = fastpath::permission_entry(a, p).unwrap();
                maybe_perms.insert(e.client_key(), e);
                if now < p.expires || strict {
                    perms.insert(e.client_key(), e);
                }
            }
            for c in &a.channels {
                let e = fastpath::channel_entry(a, c).unwrap();
                if now < c.expires {
                    chans.insert(e.client_key(), e);
                }
                if c.in_kernel {
                    maybe_chans.insert(e.client_key(), e);
                }
            }
        }
        if strict {
            assert_eq!(k.perm_client, perms);
            assert_eq!(k.ch_client, chans);
        } else {
            for (key, e) in &perms {
                assert_eq!(k.perm_client.get(key), Some(e));
            }
            for (key, e) in &chans {
                assert_eq!(k.ch_client.get(key), Some(e));
            }
            for key in k.perm_client.keys() {
                assert!(maybe_perms.contains_key(key));
            }
            assert_eq!(k.ch_client, maybe_chans);
        }
    }

    /// Random sequences of allocations (UDP and TCP clients), permissions, bindings,
    /// refreshes, deletions, kills and ticks: replaying the queued commands always gives
    /// exactly the live permissions and bindings of the UDP allocations.
    #[test]
    fn replayed_entries_match_live_state() {
        let clients = [
            ft(40000),
            ft(40001),
            FiveTuple {
                transport: Transport::Tcp,
                ..ft(40002)
            },
        ];
        let peers: [SocketAddr; 4] = [
            peer(),
            peer2(),
            "127.0.0.3:7003".parse().unwrap(),
            "127.0.0.1:7004".parse().unwrap(),
        ];
        let (mut installs, mut removes) = (0, 0);
        for seed in 1..=200u64 {
            let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut next = move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            let mut h = Harness::new(fast());
            let mut k = Kernel::default();
            let mut secs = 0u64;
            let mut t = 0u8;
            for c in clients {
                t += 1;
                h.allocate(c, t, 0);
            }
            for _ in 0..80 {
                let r = next();
                let c = clients[(r % 3) as usize];
                let p = peers[((r >> 8) % 4) as usize];
                let number = 0x4000 + ((r >> 16) % 3) as u16;
                t = t.wrapping_add(1);
                let strict = match (r >> 24) % 9 {
                    0 => {
                        h.allocate(c, t, secs);
                        false
                    }
                    1 => {
                        h.permission(c, p, t, secs);
                        false
                    }
                    2 | 3 => {
                        h.channel(c, number, p, t, secs);
                        false
                    }
                    4 => {
                        let lifetime = [0, 600, 3600][((r >> 32) % 3) as usize];
                        h.refresh(c, lifetime, t, secs);
                        false
                    }
                    5 if (r >> 32) % 8 == 0 => {
                        h.shared().kill_user("alice");
                        h.tick(secs);
                        true
                    }
                    _ => {
                        secs += [1, 30, 120, 299, 300, 301][((r >> 32) % 6) as usize];
                        h.tick(secs);
                        true
                    }
                };
                let cmds = h.fp_raw();
                installs += cmds
                    .iter()
                    .filter(|c| matches!(c, FastPathCommand::InstallChannel(_)))
                    .count();
                removes += cmds
                    .iter()
                    .filter(|c| matches!(c, FastPathCommand::RemoveChannel(_)))
                    .count();
                k.apply(cmds);
                check(&h, &k, h.t0 + Duration::from_secs(secs), strict);
            }
            let now = h.t0 + Duration::from_secs(secs);
            h.server.close_all(now, &mut h.binder);
            k.apply(h.fp_raw());
            assert!(
                k.ch_client.is_empty() && k.perm_client.is_empty(),
                "seed {seed}"
            );
        }
        // The sequences do exercise bindings coming and going.
        assert!(installs > 400 && removes > 300, "{installs} {removes}");
    }
}
