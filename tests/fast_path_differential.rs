//! Differential test of the kernel fast path (root): one scripted client/peer sequence (channel and indication traffic both ways, drops, a permission's expiry, deletion) through `kernel_fast_path = "off"` and `"required"` gives identical arrivals at client and peers, and the "required" run relayed its in-kernel parts in the kernel.
//
// The rig is tests/common/fastpath.rs. Every socket has a fixed address, so what arrives
// (bytes, order, source, a Data indication's attributes without its random transaction
// id) can be compared between the runs as text; the relay address, whose port differs
// between the runs, is written "relay".

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::fastpath::{config_relay, kernel, metrics, rig, CLIENT, PEER, PORT, SERVER};
use common::netns::Netns;
use common::TurnClient;
use turnstone::proto::{self, attr, Message};

const CHANNEL: u16 = 0x4000;
/// A channel number that is never bound.
const UNBOUND: u16 = 0x4001;
/// Permissions last 4 s (a phase of [`traffic`] takes about 2.5 s); the binding
/// outlives the script (until Refresh 0).
const LIFETIMES: &str = "permission_lifetime = \"4s\"\nchannel_lifetime = \"60s\"\n";
/// How long a step waits for what it caused to arrive.
const SETTLE: Duration = Duration::from_millis(300);

/// The sockets of one run, each at a fixed address.
struct Ends {
    client: TurnClient,
    /// The peer the channel is bound to.
    peer: UdpSocket,
    /// Another port of the peer's IP: permitted, not bound (Data indications).
    peer2: UdpSocket,
    /// An IP without a permission (the client's namespace, another port).
    stranger: UdpSocket,
    relay: SocketAddr,
}

impl Ends {
    fn name(&self, a: SocketAddr) -> String {
        if a == self.relay {
            "relay".into()
        } else if a == self.peer.local_addr().unwrap() {
            "peer".into()
        } else if a == self.peer2.local_addr().unwrap() {
            "peer2".into()
        } else if a == self.stranger.local_addr().unwrap() {
            "stranger".into()
        } else if a == server() {
            "server".into()
        } else {
            a.to_string()
        }
    }
}

fn server() -> SocketAddr {
    format!("{SERVER}:{PORT}").parse().unwrap()
}

fn at(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().unwrap()
}

/// What arrived, as comparable text: ChannelData with its number, length and payload;
/// a STUN message with its type, length, attributes in order (values in hex) and
/// whether its FINGERPRINT verifies; anything else in hex.
fn describe(buf: &[u8]) -> String {
    if buf.first().is_some_and(|b| proto::is_channel_data(*b)) {
        if let Some((number, payload)) = proto::parse_channel_data(buf) {
            return format!(
                "ChannelData {number:#06x} len={} {:?}",
                buf.len(),
                String::from_utf8_lossy(payload)
            );
        }
    }
    if let Ok(m) = Message::parse(buf) {
        let attrs: Vec<String> = m
            .attributes()
            .map(|(t, v)| {
                let hex: String = v.iter().map(|b| format!("{b:02x}")).collect();
                format!("{t:#06x}={hex}")
            })
            .collect();
        return format!(
            "STUN method={:#05x} class={:?} len={} attrs=[{}] integrity={} fingerprint={:?}",
            m.method(),
            m.class(),
            buf.len(),
            attrs.join(" "),
            m.has(attr::MESSAGE_INTEGRITY),
            m.verify_fingerprint()
        );
    }
    let hex: String = buf.iter().map(|b| format!("{b:02x}")).collect();
    format!("raw {hex}")
}

/// Everything that arrives at the four sockets within [`SETTLE`] (the client's messages
/// through [`describe`], the peers' payloads as text), as lines
/// "`step`: `receiver` <- `source` `what`".
fn collect(e: &Ends, step: &str, log: &mut Vec<String>) {
    let mut buf = vec![0u8; 2048];
    let deadline = Instant::now() + SETTLE;
    let socks: [(&str, &UdpSocket); 4] = [
        ("client", e.client.udp_socket()),
        ("peer", &e.peer),
        ("peer2", &e.peer2),
        ("stranger", &e.stranger),
    ];
    for (who, sock) in socks {
        loop {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(20));
            sock.set_read_timeout(Some(left)).unwrap();
            match sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    // The client gets TURN framing; peers get the bare payload.
                    let what = if who == "client" {
                        describe(&buf[..n])
                    } else {
                        format!("{:?}", String::from_utf8_lossy(&buf[..n]))
                    };
                    log.push(format!("{step}: {who} <- {} {what}", e.name(from)));
                }
                Err(_) => break,
            }
        }
    }
}

/// Sends what the client and the peers send in one phase of the script: ChannelData on
/// the bound and an unbound number, Send indications to the peer and the stranger, and
/// datagrams from the peer, the peer's other port and the stranger to the relay.
fn traffic(e: &mut Ends, phase: &str, log: &mut Vec<String>) {
    let (peer, stranger) = (
        e.peer.local_addr().unwrap(),
        e.stranger.local_addr().unwrap(),
    );
    let relay = e.relay;
    e.client
        .send_channel(CHANNEL, format!("{phase} client channel").as_bytes())
        .unwrap();
    collect(e, &format!("{phase}/client channel"), log);
    e.peer
        .send_to(format!("{phase} peer to relay").as_bytes(), relay)
        .unwrap();
    collect(e, &format!("{phase}/peer to relay"), log);
    e.client
        .send_to_peer(peer, format!("{phase} client send indication").as_bytes())
        .unwrap();
    collect(e, &format!("{phase}/client send indication"), log);
    e.peer2
        .send_to(format!("{phase} peer2 to relay").as_bytes(), relay)
        .unwrap();
    collect(e, &format!("{phase}/peer2 to relay"), log);
    e.stranger
        .send_to(format!("{phase} stranger to relay").as_bytes(), relay)
        .unwrap();
    collect(e, &format!("{phase}/stranger to relay"), log);
    e.client
        .send_channel(UNBOUND, format!("{phase} unbound channel").as_bytes())
        .unwrap();
    collect(e, &format!("{phase}/unbound channel"), log);
    e.client
        .send_to_peer(stranger, format!("{phase} send to stranger").as_bytes())
        .unwrap();
    collect(e, &format!("{phase}/send to stranger"), log);
}

/// One run of the script against a server in `mode`: the arrivals and the metrics.
fn run(n: &Netns, mode: &str) -> (Vec<String>, String) {
    let dir = tempfile::tempdir().unwrap();
    let _server = n.turnstone(
        "server",
        dir.path(),
        &format!("turnstone-diff-{mode}"),
        &config_relay(mode, LIFETIMES, ""),
    );
    let (peer, peer2) = n.enter("peer", || {
        (
            UdpSocket::bind(at(PEER, 41000)).expect("peer socket"),
            UdpSocket::bind(at(PEER, 41001)).expect("peer2 socket"),
        )
    });
    let (client, stranger) = n.enter("client", || {
        let sock = UdpSocket::bind(at(CLIENT, 41002)).expect("client socket");
        let client = TurnClient::new(
            common::Link::Udp {
                sock,
                server: server(),
            },
            "alice",
            "wonderland",
        )
        .with_realm("fp.test");
        (
            client,
            UdpSocket::bind(at(CLIENT, 41003)).expect("stranger socket"),
        )
    });
    let mut e = Ends {
        client,
        peer,
        peer2,
        stranger,
        relay: "0.0.0.0:0".parse().unwrap(),
    };
    let mut log = Vec::new();
    e.relay = e.client.must_allocate();
    let peer_addr = e.peer.local_addr().unwrap();

    // Permission and binding: everything permitted arrives, the rest is dropped.
    e.client.permit(peer_addr);
    e.client.bind(CHANNEL, peer_addr);
    traffic(&mut e, "bound", &mut log);

    // The permission (4 s) expires while the binding lives, and a tick passes: nothing
    // passes either way.
    e.client.permit(peer_addr);
    let permitted = Instant::now();
    let wait =
        (permitted + Duration::from_millis(4000 + 1500)).saturating_duration_since(Instant::now());
    std::thread::sleep(wait);
    traffic(&mut e, "expired", &mut log);

    // A new CreatePermission: the binding relays again.
    e.client.permit(peer_addr);
    traffic(&mut e, "permitted again", &mut log);

    // Refresh 0: the allocation is gone and nothing passes.
    e.client.refresh(0).expect_success("Refresh 0");
    traffic(&mut e, "deleted", &mut log);
    assert!(
        permitted.elapsed() < Duration::from_secs(60),
        "the script outlived the binding"
    );

    // The counters are read twice a second.
    std::thread::sleep(Duration::from_millis(1200));
    (log, metrics(n))
}

#[test]
fn off_and_required_give_identical_arrivals() {
    let n = rig();
    let (off, off_text) = run(&n, "off");
    let (on, on_text) = run(&n, "required");
    eprintln!("off run:\n{}", off.join("\n"));
    if off != on {
        let mut diff = String::new();
        for i in 0..off.len().max(on.len()) {
            let (a, b) = (off.get(i), on.get(i));
            if a != b {
                diff += &format!("#{i}\n  off:      {a:?}\n  required: {b:?}\n");
            }
        }
        panic!("the runs differ:\n{diff}");
    }

    // What arrived is what the rules allow: each permitted leg once, nothing else.
    let arrived = |step: &str| -> Vec<&String> {
        off.iter()
            .filter(|l| l.starts_with(&format!("{step}: ")))
            .collect()
    };
    for phase in ["bound", "permitted again"] {
        let one = |step: &str, needle: &str| {
            let got = arrived(&format!("{phase}/{step}"));
            assert!(
                got.len() == 1 && got[0].contains(needle),
                "{phase}/{step}: {got:?}"
            );
        };
        one(
            "client channel",
            &format!("peer <- relay \"{phase} client channel\""),
        );
        one("peer to relay", "client <- server ChannelData 0x4000 ");
        one(
            "client send indication",
            &format!("peer <- relay \"{phase} client send indication\""),
        );
        // A Data indication (method 0x007) carrying peer2's datagram.
        let data: String = format!("{phase} peer2 to relay")
            .bytes()
            .map(|b| format!("{b:02x}"))
            .collect();
        one(
            "peer2 to relay",
            "client <- server STUN method=0x007 class=Indication",
        );
        one("peer2 to relay", &format!("0x0013={data}]"));
        for dropped in ["stranger to relay", "unbound channel", "send to stranger"] {
            let got = arrived(&format!("{phase}/{dropped}"));
            assert!(got.is_empty(), "{phase}/{dropped}: {got:?}");
        }
    }
    for phase in ["expired", "deleted"] {
        let got: Vec<&String> = off
            .iter()
            .filter(|l| l.starts_with(&format!("{phase}/")))
            .collect();
        assert!(got.is_empty(), "{phase}: {got:?}");
    }

    // The kernel carried its part in "required" and none in "off".
    for (direction, path) in [
        ("to_peer", "channel"),
        ("to_client", "channel"),
        ("to_peer", "indication"),
        ("to_client", "indication"),
    ] {
        eprintln!(
            "{direction} {path}: kernel packets off {}, required {}",
            kernel(&off_text, direction, path),
            kernel(&on_text, direction, path)
        );
        assert_eq!(kernel(&off_text, direction, path), 0.0, "off: {off_text}");
        assert!(
            kernel(&on_text, direction, path) > 0.0,
            "required: {direction} {path} not in the kernel: {on_text}"
        );
    }
}
