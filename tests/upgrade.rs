//! `turnstone upgrade` keeps calls: numbered packets both ways (ChannelData and
//! Send/Data indications, 500/s each way) through 20 upgrades in a row, with a
//! rollback, a binary that dies and one that refuses its configuration among them.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::traffic::{seq_of, seq_payload, udp_socket};
use common::*;
use turnstone::proto::{self, attr, method, Class, Message};

const CHANNEL: u16 = 0x4000;
/// Every allocation's lifetime (`[limits] default_lifetime`): short enough that the
/// allocation left alone expires during the upgrades.
const LIFETIME: Duration = Duration::from_secs(20);

/// One numbered stream's receiving end: packets must come in order, none missing, from
/// the expected source; the longest silence is kept.
#[derive(Default)]
struct Stream {
    next: u32,
    errors: Vec<String>,
    last: Option<Instant>,
    longest_gap: Duration,
}

impl Stream {
    fn got(&mut self, name: &str, seq: u32) {
        let now = Instant::now();
        if let Some(last) = self.last {
            self.longest_gap = self.longest_gap.max(now - last);
        }
        self.last = Some(now);
        if seq != self.next && self.errors.len() < 10 {
            self.errors
                .push(format!("{name}: expected {} got {seq}", self.next));
        }
        self.next = seq + 1;
    }
}

/// Receives on `sock` until `stop`: numbered payloads from `from` into `stream`.
fn peer_receiver(
    name: &'static str,
    sock: UdpSocket,
    from: SocketAddr,
    stream: Arc<Mutex<Stream>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            let Ok((n, src)) = sock.recv_from(&mut buf) else {
                continue;
            };
            let mut s = stream.lock().unwrap();
            if src != from {
                s.errors
                    .push(format!("{name}: from {src}, not the relay {from}"));
                continue;
            }
            if let Some(seq) = seq_of(&buf[..n]) {
                s.got(name, seq);
            }
        }
    })
}

#[test]
fn twenty_upgrades_keep_a_call_whole() {
    let server = TestServer::start(
        ServerOptions {
            upgradable: true,
            workers: Some(2),
            ..ServerOptions::default()
        }
        .limits_toml(&format!("default_lifetime = \"{}s\"", LIFETIME.as_secs())),
    );
    // The call: one client, two peers (one over a channel, one over Send/Data).
    let mut client = TurnClient::udp(server.addr, USER, PASSWORD);
    let relayed = client.must_allocate();
    let peer_a = udp_socket(Duration::from_millis(100));
    let peer_b = udp_socket(Duration::from_millis(100));
    let (a, b) = (peer_a.local_addr().unwrap(), peer_b.local_addr().unwrap());
    client.permit(b);
    client.bind(CHANNEL, a);
    // A second allocation left alone: it must expire when it was due, upgrades or not.
    let mut idle = TurnClient::udp(server.addr, USER, PASSWORD);
    idle.must_allocate();
    let idle_created = Instant::now();

    let sock = client.udp_socket().try_clone().unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let streams: Vec<Arc<Mutex<Stream>>> = (0..4)
        .map(|_| Arc::new(Mutex::new(Stream::default())))
        .collect();
    let mut threads = vec![
        peer_receiver(
            "client->a (ChannelData)",
            peer_a.try_clone().unwrap(),
            relayed,
            streams[0].clone(),
            stop.clone(),
        ),
        peer_receiver(
            "client->b (Send)",
            peer_b.try_clone().unwrap(),
            relayed,
            streams[1].clone(),
            stop.clone(),
        ),
    ];
    // The client's receiver: ChannelData from a, Data indications from b, and the
    // answers to the requests the test makes meanwhile.
    let (answers_tx, answers) = mpsc::channel::<Vec<u8>>();
    {
        let (sock, stop) = (sock.try_clone().unwrap(), stop.clone());
        let (to_client_a, to_client_b) = (streams[2].clone(), streams[3].clone());
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                let Ok(n) = sock.recv(&mut buf) else {
                    continue;
                };
                let f = &buf[..n];
                if proto::is_channel_data(f[0]) {
                    let Some((ch, data)) = proto::parse_channel_data(f) else {
                        continue;
                    };
                    let mut s = to_client_a.lock().unwrap();
                    if ch != CHANNEL {
                        s.errors.push(format!("ChannelData on {ch:#x}"));
                    } else if let Some(seq) = seq_of(data) {
                        s.got("a->client (ChannelData)", seq);
                    }
                } else if let Ok(m) = Message::parse(f) {
                    if m.class() == Class::Indication && m.method() == method::DATA {
                        let mut s = to_client_b.lock().unwrap();
                        let from = m.xor_address(attr::XOR_PEER_ADDRESS).ok().flatten();
                        if from != Some(b) {
                            s.errors.push(format!("Data indication from {from:?}"));
                        } else if let Some(seq) = m.data().and_then(seq_of) {
                            s.got("b->client (Data)", seq);
                        }
                    } else {
                        let _ = answers_tx.send(f.to_vec());
                    }
                }
            }
        }));
    }
    // 500 packets a second each way: every 2 ms one to a peer (ChannelData and Send
    // indications in turn) and one from a peer (a and b in turn).
    let sent = Arc::new(Mutex::new([0u32; 4]));
    {
        let (sock, stop, sent) = (sock.try_clone().unwrap(), stop.clone(), sent.clone());
        let (peer_a, peer_b) = (peer_a.try_clone().unwrap(), peer_b.try_clone().unwrap());
        let srv = server.addr;
        threads.push(std::thread::spawn(move || {
            let start = Instant::now();
            let mut tick = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut n = sent.lock().unwrap();
                let k = (tick % 2) as usize;
                let seq = n[k];
                let payload = seq_payload(seq, 160);
                if k == 0 {
                    sock.send_to(&channel_data(CHANNEL, &payload), srv).unwrap();
                    peer_a.send_to(&payload, relayed).unwrap();
                } else {
                    sock.send_to(&send_indication(b, &payload), srv).unwrap();
                    peer_b.send_to(&payload, relayed).unwrap();
                }
                n[k] += 1;
                n[k + 2] += 1;
                drop(n);
                tick += 1;
                let due = start + Duration::from_millis(2 * tick);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
        }));
    }
    // A request on the call's 5-tuple while the traffic runs (answers come through the
    // receiver thread).
    let ask = |client: &TurnClient, m: u16, attrs: &dyn Fn(&mut proto::MessageWriter<'_>)| {
        let req = client.build(m, client.nonce.as_deref(), attrs, &|w| {
            w.fingerprint();
        });
        let tid = Message::parse(&req).unwrap().transaction_id();
        for _ in 0..5 {
            sock.send_to(&req, server.addr).unwrap();
            let until = Instant::now() + Duration::from_millis(500);
            while let Ok(a) = answers.recv_timeout(until.saturating_duration_since(Instant::now()))
            {
                let msg = Message::parse(&a).unwrap();
                if msg.transaction_id() == tid {
                    return Answer { raw: a };
                }
            }
        }
        panic!("no answer to method {m:#x}\n{}", server.logs());
    };

    let previous = server.dir().join("bin").join("turnstone-previous");
    std::fs::copy(env!("CARGO_BIN_EXE_turnstone"), &previous).unwrap();
    let mut upgrades = Vec::new();
    let mut idle_checked = (false, false);
    // The allocation left alone: alive just before its expiry, gone just after.
    let check_idle = |idle: &mut TurnClient, checked: &mut (bool, bool)| {
        let age = idle_created.elapsed();
        if !checked.0
            && age >= LIFETIME - Duration::from_secs(4)
            && age < LIFETIME - Duration::from_millis(1500)
        {
            idle.permit(a);
            checked.0 = true;
        }
        if !checked.1 && age > LIFETIME + Duration::from_millis(1500) {
            let r = idle.create_permission(a);
            assert_eq!(
                r.code(),
                Some(437),
                "the idle allocation expired on time: {}",
                r.describe()
            );
            checked.1 = true;
        }
    };
    for i in 0..20u16 {
        std::thread::sleep(Duration::from_millis(700));
        match i {
            // A new binary that dies at once: the old process goes on.
            5 => {
                server.install_script("dies", "echo 'dying on purpose' >&2; exit 3");
                let e = server
                    .upgrade()
                    .expect_err("a dying binary cannot take over");
                assert!(e.contains("exited"), "the command says why: {e}");
                server.install_built_binary();
            }
            // One that refuses the configuration (here: no file there).
            9 => {
                let real = env!("CARGO_BIN_EXE_turnstone");
                server.install_script(
                    "bad-config",
                    &format!("exec {real} --config /nonexistent/turnstone.toml"),
                );
                let e = server.upgrade().expect_err("a refused configuration");
                assert!(e.contains("exited"), "the command says why: {e}");
                server.install_built_binary();
            }
            // A rollback: to the binary installed before, then forward again.
            12 => {
                server.install_binary(&previous);
                upgrades.push(server.must_upgrade());
                server.install_built_binary();
            }
            _ => upgrades.push(server.must_upgrade()),
        }
        // After each: Refresh, a new ChannelBind, and Allocate on the same 5-tuple is
        // 437 (the allocation moved; it was not made anew).
        let r = ask(&client, method::REFRESH, &|w| {
            w.u32_attr(attr::LIFETIME, LIFETIME.as_secs() as u32);
        });
        assert!(
            r.is_success(),
            "Refresh after upgrade {i}: {}",
            r.describe()
        );
        let peer = SocketAddr::from(([127, 0, 0, 1], 20_000 + i));
        let number = CHANNEL + 1 + i;
        let r = ask(&client, method::CHANNEL_BIND, &|w| {
            let [x, y] = number.to_be_bytes();
            w.attr(attr::CHANNEL_NUMBER, &[x, y, 0, 0]);
            w.xor_address(attr::XOR_PEER_ADDRESS, peer);
        });
        assert!(
            r.is_success(),
            "ChannelBind after upgrade {i}: {}",
            r.describe()
        );
        let r = ask(&client, method::ALLOCATE, &udp_transport);
        assert_eq!(
            r.code(),
            Some(437),
            "Allocate again after upgrade {i}: {}",
            r.describe()
        );
        check_idle(&mut idle, &mut idle_checked);
    }
    while !idle_checked.1 {
        check_idle(&mut idle, &mut idle_checked);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        idle_checked.0,
        "the idle allocation was checked alive before it expired"
    );
    // Let the last packets arrive, then stop.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let sent = *sent.lock().unwrap();
    let names = [
        "client->a (ChannelData)",
        "client->b (Send)",
        "a->client (ChannelData)",
        "b->client (Data)",
    ];
    let mut report = String::new();
    for (k, s) in streams.iter().enumerate() {
        let s = s.lock().unwrap();
        report += &format!(
            "{}: sent {}, received up to {}, longest gap {:?}\n",
            names[k], sent[k], s.next, s.longest_gap
        );
        assert!(
            s.errors.is_empty(),
            "{}: {:?}\n{}",
            names[k],
            s.errors,
            server.logs()
        );
        assert_eq!(
            s.next, sent[k],
            "{}: every packet arrived\n{report}",
            names[k]
        );
    }
    let pauses: Vec<f64> = upgrades.iter().map(|u| u.pause_ms).collect();
    eprintln!(
        "{} upgrades; hand-over pauses (ms): {pauses:.1?}\n{report}",
        upgrades.len()
    );
    assert_eq!(upgrades.len(), 18, "18 upgrades succeeded (2 refused)");
    assert!(upgrades
        .iter()
        .all(|u| u.allocations == 2 || u.allocations == 1));
    // The idle allocation's end was recorded once, as expired.
    let log = server.stderr();
    let ended: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("allocation ended"))
        .collect();
    assert_eq!(ended.len(), 1, "one allocation ended: {ended:#?}");
    assert!(ended[0].contains("reason=\"expired\""), "{}", ended[0]);
}
