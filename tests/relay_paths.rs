//! 100,000 packets through each relay path of a real turnstone, at a paced rate, with
//! none lost or reordered: ChannelData, Send/Data indications, and client to client
//! through two allocations of the same server. Then the same while the worker shards
//! move between threads every 50 ms (adaptive workers, forced by a testing aid).

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::{ServerOptions, TestServer};
use turnstone::auth::long_term_key;
use turnstone::proto::{self, attr, method, Class, Message, MessageWriter, TransactionId};

const PACKETS: u32 = 100_000;
/// Packets sent per millisecond tick: 20,000 packets/s.
const PER_TICK: u32 = 20;
const REALM: &str = "turnstone.test";

fn socket() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let s2 = socket2::SockRef::from(&s);
    let _ = s2.set_recv_buffer_size(4 << 20);
    let _ = s2.set_send_buffer_size(4 << 20);
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s
}

/// A minimal TURN client over UDP (long-term credentials, alice/wonderland).
struct Client {
    sock: UdpSocket,
    server: SocketAddr,
    nonce: String,
    key: [u8; 16],
    next: u8,
}

impl Client {
    fn new(server: SocketAddr) -> Client {
        Client {
            sock: socket(),
            server,
            nonce: String::new(),
            key: long_term_key("alice", REALM, "wonderland"),
            next: 0,
        }
    }

    fn transact(&mut self, m: u16, attrs: &dyn Fn(&mut MessageWriter<'_>)) -> Vec<u8> {
        for _ in 0..3 {
            self.next = self.next.wrapping_add(1);
            let tid = TransactionId([self.next; 12]);
            let mut buf = Vec::new();
            let mut w = MessageWriter::new(&mut buf, m, Class::Request, tid);
            attrs(&mut w);
            if !self.nonce.is_empty() {
                w.attr(attr::USERNAME, b"alice");
                w.attr(attr::REALM, REALM.as_bytes());
                w.attr(attr::NONCE, self.nonce.as_bytes());
                w.message_integrity(&self.key);
            }
            w.finish();
            self.sock.send_to(&buf, self.server).unwrap();
            let mut rbuf = vec![0u8; 2048];
            let (n, _) = self.sock.recv_from(&mut rbuf).expect("server answers");
            rbuf.truncate(n);
            let msg = Message::parse(&rbuf).unwrap();
            if let Ok(Some((401 | 438, _))) = msg.error_code() {
                self.nonce = msg.nonce().unwrap().unwrap().to_string();
                continue;
            }
            assert_eq!(msg.class(), Class::Success, "{:?}", msg.error_code());
            return rbuf;
        }
        panic!("no success after three tries");
    }

    fn allocate(&mut self) -> SocketAddr {
        let resp = self.transact(method::ALLOCATE, &|w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        });
        Message::parse(&resp)
            .unwrap()
            .xor_address(attr::XOR_RELAYED_ADDRESS)
            .unwrap()
            .unwrap()
    }

    fn permit(&mut self, peer: SocketAddr) {
        self.transact(method::CREATE_PERMISSION, &|w| {
            w.xor_address(attr::XOR_PEER_ADDRESS, peer);
        });
    }

    fn bind(&mut self, channel: u16, peer: SocketAddr) {
        self.transact(method::CHANNEL_BIND, &|w| {
            w.attr(
                attr::CHANNEL_NUMBER,
                &[(channel >> 8) as u8, channel as u8, 0, 0],
            );
            w.xor_address(attr::XOR_PEER_ADDRESS, peer);
        });
    }
}

fn channel_data(channel: u16, seq: u32) -> Vec<u8> {
    let mut v = vec![(channel >> 8) as u8, channel as u8, 0, 100];
    v.extend_from_slice(&seq.to_be_bytes());
    v.resize(104, 0x5A);
    v
}

fn send_indication(peer: SocketAddr, seq: u32) -> Vec<u8> {
    let mut payload = seq.to_be_bytes().to_vec();
    payload.resize(100, 0x5A);
    let mut buf = Vec::new();
    let mut tid = [0u8; 12];
    tid[..4].copy_from_slice(&seq.to_be_bytes());
    let mut w = MessageWriter::new(
        &mut buf,
        method::SEND,
        Class::Indication,
        TransactionId(tid),
    );
    w.xor_address(attr::XOR_PEER_ADDRESS, peer);
    w.attr(attr::DATA, &payload);
    w.finish();
    buf
}

/// The sequence number in what a client receives (ChannelData or Data indication).
fn client_seq(buf: &[u8]) -> Option<u32> {
    let payload = if proto::is_channel_data(*buf.first()?) {
        proto::parse_channel_data(buf)?.1
    } else {
        Message::parse(buf).ok()?.data()?
    };
    Some(u32::from_be_bytes(payload.get(..4)?.try_into().ok()?))
}

/// Sends `PACKETS` packets made by `make` from `tx` to `to` at a paced rate on this
/// thread while `rx` is drained on another; asserts every sequence number arrives in
/// order.
fn run_path(
    tx: &UdpSocket,
    to: SocketAddr,
    make: impl Fn(u32) -> Vec<u8>,
    rx: UdpSocket,
    seq_of: fn(&[u8]) -> Option<u32>,
) {
    let receiver = std::thread::spawn(move || {
        let mut buf = vec![0u8; 2048];
        let mut expected = 0u32;
        let deadline = Instant::now() + Duration::from_secs(60);
        while expected < PACKETS && Instant::now() < deadline {
            let Ok((n, _)) = rx.recv_from(&mut buf) else {
                break;
            };
            let Some(seq) = seq_of(&buf[..n]) else {
                continue;
            };
            assert_eq!(
                seq, expected,
                "lost or reordered: got {seq}, expected {expected}"
            );
            expected += 1;
        }
        expected
    });
    let start = Instant::now();
    let mut seq = 0u32;
    let mut tick = 0u64;
    while seq < PACKETS {
        for _ in 0..PER_TICK {
            if seq == PACKETS {
                break;
            }
            tx.send_to(&make(seq), to).unwrap();
            seq += 1;
        }
        tick += 1;
        let due = start + Duration::from_millis(tick);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let got = receiver.join().unwrap();
    assert_eq!(got, PACKETS, "packets received in order");
}

fn options() -> ServerOptions {
    ServerOptions::default()
        .users(&[("alice", "wonderland")])
        .allow_peers(&["127.0.0.0/8"])
}

fn server() -> TestServer {
    TestServer::start(options())
}

/// Four worker shards that gather on thread 0 and spread back every 50 ms.
fn moving_server() -> TestServer {
    TestServer::start(
        options()
            .workers(4)
            .env("TURNSTONE_TEST_SHARD_FLIP_MS", "50")
            .extra_toml("[log]\nlevel = \"debug\"\n"),
    )
}

#[test]
fn paths_while_shards_move_between_threads() {
    let srv = moving_server();
    // Several clients, so that allocations land on several shards.
    let mut clients: Vec<Client> = (0..6).map(|_| Client::new(srv.addr)).collect();
    let relays: Vec<SocketAddr> = clients.iter_mut().map(|c| c.allocate()).collect();
    let peer = socket();
    let peer_addr = peer.local_addr().unwrap();
    clients[0].bind(0x4000, peer_addr);
    run_path(
        &clients[0].sock,
        srv.addr,
        |seq| channel_data(0x4000, seq),
        peer,
        |b| Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?)),
    );
    // Client to client between allocations of (most likely) different shards.
    let (a, rest) = clients.split_at_mut(1);
    let b = &mut rest[4];
    b.permit(relays[0]);
    a[0].bind(0x4001, relays[5]);
    let rx = b.sock.try_clone().unwrap();
    run_path(
        &a[0].sock,
        srv.addr,
        |seq| channel_data(0x4001, seq),
        rx,
        client_seq,
    );
    // The shards really moved, many times, both ways.
    let logs = srv.logs();
    let gathers = logs.matches("worker shards gather").count();
    let spreads = logs.matches("worker shards spread").count();
    assert!(
        gathers >= 20 && spreads >= 20,
        "expected the shards to move every 50 ms; saw {gathers} gathers and {spreads} spreads"
    );
}

#[test]
fn channel_data_path() {
    let srv = server();
    let mut c = Client::new(srv.addr);
    c.allocate();
    let peer = socket();
    let peer_addr = peer.local_addr().unwrap();
    c.bind(0x4000, peer_addr);
    run_path(
        &c.sock,
        srv.addr,
        |seq| channel_data(0x4000, seq),
        peer,
        |b| Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?)),
    );
}

#[test]
fn send_indication_path() {
    let srv = server();
    let mut c = Client::new(srv.addr);
    let relay = c.allocate();
    let peer = socket();
    let peer_addr = peer.local_addr().unwrap();
    c.permit(peer_addr);
    // Peer to client: Data indications (no channel bound).
    let rx = c.sock.try_clone().unwrap();
    run_path(
        &peer,
        relay,
        |seq| {
            let mut v = seq.to_be_bytes().to_vec();
            v.resize(100, 0x5A);
            v
        },
        rx,
        client_seq,
    );
    // Client to peer: Send indications.
    let peer_rx = peer.try_clone().unwrap();
    run_path(
        &c.sock,
        srv.addr,
        |seq| send_indication(peer_addr, seq),
        peer_rx,
        |b| Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?)),
    );
}

#[test]
fn client_to_client_path() {
    let srv = server();
    let mut a = Client::new(srv.addr);
    let mut b = Client::new(srv.addr);
    let relay_a = a.allocate();
    let relay_b = b.allocate();
    b.permit(relay_a);
    a.bind(0x4001, relay_b);
    let rx = b.sock.try_clone().unwrap();
    run_path(
        &a.sock,
        srv.addr,
        |seq| channel_data(0x4001, seq),
        rx,
        client_seq,
    );
}
