//! The relay hot path allocates nothing: ChannelData and Send indications from the
//! client, and peer data framed as ChannelData or Data indications, are counted under
//! a counting global allocator (the
//! `allocation-counter` crate).

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use turnstone::auth::{long_term_key, Credentials, NonceMaker};
use turnstone::policy::PeerPolicy;
use turnstone::proto::{attr, method, Class, Message, MessageWriter, TransactionId};
use turnstone::server::{
    BindError, BindResult, Clock, FiveTuple, Limits, Output, RelayAddrs, RelayBinder, RelayHandle,
    Runtime, Server, Shared, Transport, PEER_HEADROOM, PEER_TAILROOM,
};

struct Binder(u16);
impl RelayBinder for Binder {
    fn bind(&mut self, ip: IpAddr, _even: bool, _reserve: bool) -> BindResult {
        self.0 += 1;
        if self.0 > 100 {
            return Err(BindError::Exhausted);
        }
        Ok((
            RelayHandle(u32::from(self.0)),
            SocketAddr::new(ip, 50000 + self.0),
            None,
        ))
    }
    fn release(&mut self, _relay: RelayHandle) {}
}

const REALM: &str = "turnstone.test";

fn server(kernel_fast_path: bool) -> Server {
    let mut users = BTreeMap::new();
    users.insert("alice".to_string(), "wonderland".to_string());
    let rt = Runtime {
        realm: REALM.into(),
        software: None,
        credentials: Credentials::new(REALM, &users, &[]),
        nonces: NonceMaker::new([1; 32], 600),
        policy: PeerPolicy::new(&["127.0.0.0/8".parse().unwrap()], &[]),
        limits: Limits {
            max_bandwidth_per_allocation: 0,
            max_total_bandwidth: 0,
            unauthenticated_rate: 0,
            max_allocations: 10,
            max_allocations_per_user: 10,
            max_allocations_per_rest_user: 10,
            max_permissions_per_allocation: 10,
            max_channels_per_allocation: 10,
            default_lifetime: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
            permission_lifetime: turnstone::server::PERMISSION_LIFETIME,
            channel_lifetime: turnstone::server::CHANNEL_LIFETIME,
        },
        alternate_servers: Vec::new(),
        redirect_above: 0,
        usage_interval: None,
        kernel_fast_path,
        relay: RelayAddrs {
            v4: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            ..Default::default()
        },
    };
    let mut s = Server::new(Shared::new(rt));
    s.set_collect_events(false);
    s
}

fn request(m: u16, t: u8, nonce: &str, attrs: impl FnOnce(&mut MessageWriter<'_>)) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut w = MessageWriter::new(&mut buf, m, Class::Request, TransactionId([t; 12]));
    attrs(&mut w);
    w.attr(attr::USERNAME, b"alice");
    w.attr(attr::REALM, REALM.as_bytes());
    w.attr(attr::NONCE, nonce.as_bytes());
    w.message_integrity(&long_term_key("alice", REALM, "wonderland"));
    w.finish();
    buf
}

#[test]
fn relay_path_does_not_allocate() {
    relay_path(false);
}

/// With the kernel fast path's commands queued (the shell would move these flows to the
/// kernel), the userspace relay path still allocates nothing.
#[test]
fn relay_path_does_not_allocate_with_fast_path_commands() {
    relay_path(true);
}

fn relay_path(kernel_fast_path: bool) {
    let mut s = server(kernel_fast_path);
    let mut binder = Binder(0);
    let client = FiveTuple {
        transport: Transport::Udp,
        client: "127.0.0.1:40000".parse().unwrap(),
        server: "127.0.0.1:3478".parse().unwrap(),
    };
    let peer_ch: SocketAddr = "127.0.0.1:7000".parse().unwrap();
    let peer_ind: SocketAddr = "127.0.0.2:7000".parse().unwrap();
    let clock = Clock {
        now: Instant::now(),
        unix: 1_800_000_000,
    };
    let nonce = s
        .shared()
        .runtime
        .load()
        .nonces
        .make(client.client, clock.unix);
    let ok = |out: Output<'_>| match out {
        Output::ToClient(d) => Message::parse(d).unwrap().class() == Class::Success,
        _ => false,
    };
    let req = request(method::ALLOCATE, 1, &nonce, |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    });
    assert!(ok(s.handle_client(client, &req, clock, &mut binder)));
    let req = request(method::CHANNEL_BIND, 2, &nonce, |w| {
        w.attr(attr::CHANNEL_NUMBER, &[0x40, 0x00, 0, 0]);
        w.xor_address(attr::XOR_PEER_ADDRESS, peer_ch);
    });
    assert!(ok(s.handle_client(client, &req, clock, &mut binder)));
    let req = request(method::CREATE_PERMISSION, 3, &nonce, |w| {
        w.xor_address(attr::XOR_PEER_ADDRESS, peer_ind);
    });
    assert!(ok(s.handle_client(client, &req, clock, &mut binder)));
    // Clear, then the channel's permission and binding, then the second permission.
    let queued = s.drain_fast_path().count();
    assert_eq!(queued, if kernel_fast_path { 4 } else { 0 });

    let channel_data = common::channel_data(0x4000, &[0xAB; 170]);
    let send = common::send_indication(peer_ind, &[0xCD; 170]);
    let mut peer_buf = vec![0u8; PEER_HEADROOM + 170 + PEER_TAILROOM];
    let payload = PEER_HEADROOM..PEER_HEADROOM + 170;

    let mut relayed = 0usize;
    let mut run = |s: &mut Server, binder: &mut Binder, relayed: &mut usize| {
        for _ in 0..10_000 {
            if let Output::ToPeer { peer, .. } =
                s.handle_client(client, &channel_data, clock, binder)
            {
                assert_eq!(peer, peer_ch);
                *relayed += 1;
            }
            if let Output::ToPeer { peer, .. } = s.handle_client(client, &send, clock, binder) {
                assert_eq!(peer, peer_ind);
                *relayed += 1;
            }
            for from in [peer_ch, peer_ind] {
                if s.handle_peer(
                    RelayHandle(1),
                    from,
                    &mut peer_buf,
                    payload.clone(),
                    clock.now,
                )
                .is_some()
                {
                    *relayed += 1;
                }
            }
        }
    };
    // Warm up once (thread-local RNG initialisation and the like), then count.
    run(&mut s, &mut binder, &mut relayed);
    relayed = 0;
    let info = allocation_counter::measure(|| run(&mut s, &mut binder, &mut relayed));
    assert_eq!(relayed, 40_000, "every packet of every path was relayed");
    assert_eq!(info.count_total, 0, "heap allocations on the relay path");
}
