//! Interim usage records (`[log] usage_interval`) from the real binary: a client relays known amounts in phases across 1 s intervals; each interim record carries what was relayed since the allocation's previous record (a quiet interval: zeros), and the interim records plus the final one add up to everything sent, packets and bytes both ways; a reload switches them on and off; allocations still live when a drain times out write their final record (reason "shutdown") before the process exits; with the kernel fast path (root: network namespaces), what the kernel relayed is in the interim records too.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::fastpath::{config, rig, PEER, PORT, SERVER};
use common::traffic::udp_socket;
use common::{relayed_payload, Backend, ServerOptions, TestServer, TurnClient};

const CHANNEL: u16 = 0x4000;
/// Datagrams in flight at once (the rest wait), so no socket buffer overflows.
const WINDOW: usize = 20;

/// Packets and bytes each way, as a usage record counts them (application data).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    packets_to_peer: u64,
    bytes_to_peer: u64,
    packets_to_client: u64,
    bytes_to_client: u64,
}

impl Counts {
    fn add(self, o: Counts) -> Counts {
        Counts {
            packets_to_peer: self.packets_to_peer + o.packets_to_peer,
            bytes_to_peer: self.bytes_to_peer + o.bytes_to_peer,
            packets_to_client: self.packets_to_client + o.packets_to_client,
            bytes_to_client: self.bytes_to_client + o.bytes_to_client,
        }
    }

    /// Each field at most `o`'s.
    fn within(self, o: Counts) -> bool {
        self.packets_to_peer <= o.packets_to_peer
            && self.bytes_to_peer <= o.bytes_to_peer
            && self.packets_to_client <= o.packets_to_client
            && self.bytes_to_client <= o.bytes_to_client
    }

    fn is_zero(self) -> bool {
        self == Counts::default()
    }
}

/// One usage record of a JSON log.
#[derive(Debug)]
struct Record {
    interim: bool,
    allocation: u64,
    counts: Counts,
    /// The `kernel_*` part of `counts`.
    kernel: Counts,
    /// The final record's `reason`.
    reason: Option<String>,
    line: String,
}

/// The usage records in a JSON log, in order: "allocation usage" (`kind` "interim") and
/// "allocation ended" (`kind` "final") lines. A last line still being written is left out.
fn records(log: &str) -> Vec<Record> {
    let complete = log.rsplit_once('\n').map_or("", |(done, _)| done);
    let mut out = Vec::new();
    for line in complete.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        let f = &v["fields"];
        let interim = match (f["message"].as_str(), f["kind"].as_str()) {
            (Some("allocation usage"), Some("interim")) => true,
            (Some("allocation ended"), Some("final")) => false,
            (Some("allocation usage" | "allocation ended"), kind) => {
                panic!("usage record with kind {kind:?}: {line}")
            }
            _ => continue,
        };
        let n = |k: &str| {
            f[k].as_u64()
                .unwrap_or_else(|| panic!("no number {k} in {line}"))
        };
        for k in ["user", "client", "server", "relay", "transport"] {
            assert!(f[k].is_string(), "no {k} in {line}");
        }
        n("duration_ms");
        out.push(Record {
            interim,
            allocation: n("allocation"),
            counts: Counts {
                packets_to_peer: n("packets_to_peer"),
                bytes_to_peer: n("bytes_to_peer"),
                packets_to_client: n("packets_to_client"),
                bytes_to_client: n("bytes_to_client"),
            },
            kernel: Counts {
                packets_to_peer: n("kernel_packets_to_peer"),
                bytes_to_peer: n("kernel_bytes_to_peer"),
                packets_to_client: n("kernel_packets_to_client"),
                bytes_to_client: n("kernel_bytes_to_client"),
            },
            reason: f["reason"].as_str().map(str::to_owned),
            line: line.to_owned(),
        });
    }
    out
}

fn sum<'a>(rs: impl IntoIterator<Item = &'a Record>) -> Counts {
    rs.into_iter()
        .fold(Counts::default(), |t, r| t.add(r.counts))
}

fn interim(rs: &[Record]) -> Vec<&Record> {
    rs.iter().filter(|r| r.interim).collect()
}

fn lines(rs: &[Record]) -> String {
    rs.iter().map(|r| format!("{}\n", r.line)).collect()
}

/// What one phase relays: `to_peer` datagrams of `to_peer_len` bytes from the client
/// (ChannelData, or Send indications if `indications`), then `to_client` of
/// `to_client_len` bytes from the peer; every one must arrive.
struct Phase {
    to_peer: usize,
    to_peer_len: usize,
    indications: bool,
    to_client: usize,
    to_client_len: usize,
}

impl Phase {
    const fn new(
        to_peer: usize,
        to_peer_len: usize,
        to_client: usize,
        to_client_len: usize,
    ) -> Phase {
        Phase {
            to_peer,
            to_peer_len,
            indications: false,
            to_client,
            to_client_len,
        }
    }

    /// Relays the phase through `c`'s allocation (`relay`) and `peer`; returns what the
    /// server must count for it.
    fn run(&self, c: &mut TurnClient, peer: &UdpSocket, relay: SocketAddr) -> Counts {
        let peer_addr = peer.local_addr().unwrap();
        let mut buf = vec![0u8; 2048];
        let out = vec![0x42u8; self.to_peer_len];
        let mut left = self.to_peer;
        while left > 0 {
            let k = left.min(WINDOW);
            for _ in 0..k {
                if self.indications {
                    c.send_to_peer(peer_addr, &out)
                } else {
                    c.send_channel(CHANNEL, &out)
                }
                .expect("send to the server");
            }
            for _ in 0..k {
                let (len, _) = peer
                    .recv_from(&mut buf)
                    .expect("every datagram relayed to the peer");
                assert_eq!(&buf[..len], &out[..], "relayed to the peer as sent");
            }
            left -= k;
        }
        let back = vec![0x24u8; self.to_client_len];
        let mut left = self.to_client;
        while left > 0 {
            let k = left.min(WINDOW);
            for _ in 0..k {
                peer.send_to(&back, relay).expect("send to the relay");
            }
            for _ in 0..k {
                let got = c
                    .recv(Duration::from_secs(2))
                    .expect("every datagram relayed to the client");
                assert_eq!(relayed_payload(&got), Some(&back[..]), "relayed as sent");
            }
            left -= k;
        }
        Counts {
            packets_to_peer: self.to_peer as u64,
            bytes_to_peer: (self.to_peer * self.to_peer_len) as u64,
            packets_to_client: self.to_client as u64,
            bytes_to_client: (self.to_client * self.to_client_len) as u64,
        }
    }
}

/// Waits (bounded) until the interim records add up to `sent`, never more on the way;
/// then for the next interim record, which must be all zeros (nothing relayed since).
/// Returns the records so far.
fn settle(log: &dyn Fn() -> String, sent: Counts, what: &str) -> Vec<Record> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let reached = loop {
        let rs = records(&log());
        let got = sum(interim(&rs));
        assert!(
            got.within(sent),
            "{what}: interim records add up to more than was sent ({got:?} > {sent:?}):\n{}",
            lines(&rs)
        );
        if got == sent {
            break interim(&rs).len();
        }
        assert!(
            Instant::now() < deadline,
            "{what}: interim records add up to {got:?}, not {sent:?}, after 10 s:\n{}",
            lines(&rs)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rs = records(&log());
        if let Some(next) = interim(&rs).get(reached) {
            assert!(
                next.counts.is_zero() && next.kernel.is_zero(),
                "{what}: a quiet interval's record is not all zeros: {}",
                next.line
            );
            return rs;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: no interim record within 10 s after the last one:\n{}",
            lines(&rs)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits (bounded) for the final record; returns all records.
fn ended(log: &dyn Fn() -> String) -> Vec<Record> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let rs = records(&log());
        if rs.iter().any(|r| !r.interim) {
            return rs;
        }
        assert!(
            Instant::now() < deadline,
            "no final usage record within 5 s:\n{}",
            lines(&rs)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn options(usage_interval: Option<&str>) -> ServerOptions {
    let mut log = "[log]\nlevel = \"info\"\nformat = \"json\"\n".to_owned();
    if let Some(i) = usage_interval {
        log.push_str(&format!("usage_interval = \"{i}\"\n"));
    }
    ServerOptions::default().extra_toml(&log)
}

/// A client with an allocation and channel [`CHANNEL`] bound to a peer on 127.0.0.1;
/// returns (client, peer socket, relay address).
fn session(srv: &TestServer) -> (TurnClient, UdpSocket, SocketAddr) {
    let peer = udp_socket(Duration::from_secs(2));
    let mut c = TurnClient::udp(srv.addr, common::USER, common::PASSWORD);
    let relay = c.must_allocate();
    c.bind(CHANNEL, peer.local_addr().unwrap());
    (c, peer, relay)
}

#[test]
fn interim_records_carry_each_intervals_traffic_and_add_up_to_the_totals() {
    let srv = TestServer::start_with(Backend::Turnstone, options(Some("1s")));
    let log = || srv.stderr();
    let (mut c, peer, relay) = session(&srv);
    let phases = [
        Phase::new(40, 100, 30, 200),
        Phase {
            indications: true,
            ..Phase::new(20, 300, 10, 50)
        },
        Phase::new(25, 1000, 35, 10),
    ];
    let mut sent = Counts::default();
    for (i, p) in phases.iter().enumerate() {
        sent = sent.add(p.run(&mut c, &peer, relay));
        settle(&log, sent, &format!("phase {}", i + 1));
    }
    // The last phase ends with the allocation: the final record holds what no interim
    // record had.
    sent = sent.add(Phase::new(7, 70, 9, 90).run(&mut c, &peer, relay));
    c.refresh(0).expect_success("Refresh 0");
    let rs = ended(&log);
    let all = lines(&rs);
    let id = rs[0].allocation;
    assert!(
        rs.iter().all(|r| r.allocation == id),
        "one allocation:\n{all}"
    );
    let finals: Vec<&Record> = rs.iter().filter(|r| !r.interim).collect();
    assert_eq!(finals.len(), 1, "one final record:\n{all}");
    assert!(
        rs.last().is_some_and(|r| !r.interim),
        "no record after the final one:\n{all}"
    );
    // Three phases and three quiet intervals at least.
    assert!(interim(&rs).len() >= 6, "{all}");
    assert_eq!(
        sum(&rs),
        sent,
        "interim + final records = what was sent:\n{all}"
    );
    eprintln!("{} records, sum {sent:?}:\n{all}", rs.len());
}

#[test]
fn a_reload_switches_interim_records_on_and_off() {
    let srv = TestServer::start_with(Backend::Turnstone, options(None));
    let log = || srv.stderr();
    let (mut c, peer, relay) = session(&srv);
    let a = Phase::new(10, 100, 10, 100).run(&mut c, &peer, relay);
    std::thread::sleep(Duration::from_millis(2500));
    assert!(records(&log()).is_empty(), "off by default:\n{}", log());

    // On: the first record carries everything since the allocation began.
    srv.reload(&options(Some("1s")));
    let rs = settle(&log, a, "switched on");
    assert_eq!(interim(&rs)[0].counts, a, "{}", lines(&rs));

    // Off again ("0s"): no more interim records; the final one has the rest.
    srv.reload(&options(Some("0s")));
    let before = interim(&records(&log())).len();
    let b = Phase::new(5, 10, 3, 30).run(&mut c, &peer, relay);
    std::thread::sleep(Duration::from_millis(2500));
    c.refresh(0).expect_success("Refresh 0");
    let rs = ended(&log);
    assert_eq!(interim(&rs).len(), before, "switched off:\n{}", lines(&rs));
    let last = rs.last().unwrap();
    assert!(!last.interim);
    assert_eq!(last.counts, b, "{}", lines(&rs));
    assert_eq!(sum(&rs), a.add(b), "{}", lines(&rs));
}

/// SIGTERM with allocations still live on several workers whose shards move between
/// threads every 50 ms: when the drain timeout passes, each ends with a final record
/// (reason "shutdown") holding what no interim record had, and the process exits after
/// writing them.
#[test]
fn a_drain_timeout_ends_live_allocations_with_their_final_records() {
    const CLIENTS: usize = 6;
    let mut srv = TestServer::start_with(
        Backend::Turnstone,
        options(Some("1s"))
            .server_toml("drain_timeout = \"1s\"")
            .workers(4)
            .env("TURNSTONE_TEST_SHARD_FLIP_MS", "50"),
    );
    let mut sessions: Vec<_> = (0..CLIENTS).map(|_| session(&srv)).collect();
    let mut sent = Counts::default();
    for (c, peer, relay) in sessions.iter_mut() {
        sent = sent.add(Phase::new(12, 100, 8, 100).run(c, peer, *relay));
    }
    settle(&|| srv.stderr(), sent, "before SIGTERM");
    for (c, peer, relay) in sessions.iter_mut() {
        sent = sent.add(Phase::new(6, 600, 4, 400).run(c, peer, *relay));
    }
    srv.signal("TERM");
    let st = srv
        .wait_exit(Duration::from_secs(8))
        .expect("exits after the drain timeout");
    assert!(st.success(), "exit status {st}");
    let rs = records(&srv.stderr());
    let all = lines(&rs);
    let finals: Vec<&Record> = rs.iter().filter(|r| !r.interim).collect();
    assert_eq!(finals.len(), CLIENTS, "one final record each:\n{all}");
    for f in &finals {
        assert_eq!(f.reason.as_deref(), Some("shutdown"), "{}", f.line);
        let later = rs
            .iter()
            .skip_while(|r| !std::ptr::eq(*r, *f))
            .skip(1)
            .any(|r| r.allocation == f.allocation);
        assert!(!later, "a record after the final one:\n{all}");
    }
    assert_eq!(sum(&rs), sent, "interim + final = sent:\n{all}");
    let workers: std::collections::BTreeSet<u64> = finals
        .iter()
        .filter_map(|f| {
            let v: serde_json::Value = serde_json::from_str(&f.line).ok()?;
            v["fields"]["worker"].as_u64()
        })
        .collect();
    eprintln!("final records (reason shutdown) from workers {workers:?}");
}

/// With the kernel fast path (root): the kernel relays the channel's traffic, and its
/// counts are in the interim records (`kernel_*`, and in the totals), read when the
/// record is written; interim + final = what was sent.
#[test]
fn kernel_relayed_packets_are_in_the_interim_records() {
    let n = rig();
    let dir = tempfile::tempdir().unwrap();
    let server = n.turnstone(
        "server",
        dir.path(),
        "turnstone-usage",
        &config(
            "required",
            "\n[log]\nformat = \"json\"\nusage_interval = \"1s\"\n",
        ),
    );
    let log = || server.stderr();
    let peer = n.enter("peer", || UdpSocket::bind((PEER, 0)).expect("peer socket"));
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let server_addr: SocketAddr = format!("{SERVER}:{PORT}").parse().unwrap();
    let mut c = n.enter("client", || {
        let sock = UdpSocket::bind("10.78.1.2:0").expect("client socket");
        TurnClient::new(
            common::Link::Udp {
                sock,
                server: server_addr,
            },
            "alice",
            "wonderland",
        )
        .with_realm("fp.test")
    });
    let relay = c.must_allocate();
    c.bind(CHANNEL, peer.local_addr().unwrap());
    // The channel's entries are installed with the ChannelBind answer's tick; the first
    // phase may still go partly through userspace, the second goes through the kernel.
    let mut sent = Counts::default();
    let mut kernel = Counts::default();
    for (i, p) in [
        Phase::new(200, 100, 200, 100),
        Phase::new(300, 50, 100, 500),
    ]
    .iter()
    .enumerate()
    {
        sent = sent.add(p.run(&mut c, &peer, relay));
        let rs = settle(&log, sent, &format!("phase {}", i + 1));
        kernel = interim(&rs)
            .iter()
            .fold(Counts::default(), |t, r| t.add(r.kernel));
    }
    assert!(
        kernel.packets_to_peer >= 300 && kernel.packets_to_client >= 100,
        "the kernel's packets are in the interim records: {kernel:?}\n{}",
        lines(&records(&log()))
    );
    c.refresh(0).expect_success("Refresh 0");
    let rs = ended(&log);
    assert_eq!(sum(&rs), sent, "interim + final = sent:\n{}", lines(&rs));
    let kernel_all = rs.iter().fold(Counts::default(), |t, r| t.add(r.kernel));
    assert_eq!(
        kernel_all,
        kernel,
        "nothing relayed after the last interim record:\n{}",
        lines(&rs)
    );
    eprintln!("kernel part of the interim records: {kernel:?}; sent {sent:?}");
}
