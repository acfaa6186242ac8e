//! Running turnstone like production (issue 5), against the real binary:
//!
//! - SIGHUP reloads while an allocation relays (nothing lost), removes users (they can
//!   neither allocate nor refresh, their running allocation ends at the next tick), adds
//!   secrets (usable at once), and a reload that fails validation changes nothing and
//!   logs each problem with its key;
//! - SIGTERM drains: 300 Try Alternate with ALTERNATE-SERVER (or 508), live allocations
//!   keep relaying, exit 0 when the last one ends or `drain_timeout` passes;
//! - the Prometheus endpoint (`/metrics`, `/health`);
//! - `max_bandwidth_per_allocation` and `unauthenticated_rate` (the reflection factor);
//! - text and JSON logs with the allocation usage record, and no password in them.
//!
//! Each test starts the binary with the shared harness (`TestServer`), talks to it on
//! 127.0.0.1 with the harness's TURN client, rewrites its config file and sends signals.

mod common;

use common::metrics::sample;
use common::traffic::{pace, seq_of, seq_payload, udp_socket, UdpPeer};
use common::{channel_data, tid, udp_transport, Backend, ServerOptions, TestServer, TurnClient};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use turnstone::auth::{rest_password, rest_username};
use turnstone::proto::{self, attr, method, Class, MessageWriter};

const REALM: &str = "ops.test";
const CHANNEL: u16 = 0x4000;

/// Options for a turnstone in realm ops.test with `users`, no secrets, and logs at
/// level info in `format`.
fn logging(users: &[(&str, &str)], format: &str) -> ServerOptions {
    ServerOptions::default()
        .realm(REALM)
        .users(users)
        .secrets(&[])
        .log("info", format)
}

fn conf(users: &[(&str, &str)]) -> ServerOptions {
    logging(users, "text")
}

fn start(conf: &ServerOptions) -> TestServer {
    TestServer::start_with(Backend::Turnstone, conf.clone())
}

fn client(srv: &TestServer, user: &str, password: &str) -> TurnClient {
    TurnClient::udp(srv.addr, user, password).with_realm(REALM)
}

/// Sends `count` ChannelData packets (sequence numbers `first..first+count`, 100-byte
/// payload) at `per_ms` packets per millisecond through the client's channel to an
/// echo peer; returns how many distinct sequence numbers came back (waiting up to 2 s
/// after the last send). `during` runs on another thread while the stream flows.
fn echo_stream(
    c: &TurnClient,
    first: u32,
    count: u32,
    per_ms: u32,
    during: impl FnOnce() + Send,
) -> u32 {
    let rx = c.udp_socket().try_clone().unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let server = c.server();
    std::thread::scope(|scope| {
        let receiver = scope.spawn(move || {
            let mut seen = vec![false; count as usize];
            let mut got = 0u32;
            let mut buf = vec![0u8; 2048];
            let stop = Instant::now() + Duration::from_millis(u64::from(count / per_ms) + 2000);
            while got < count && Instant::now() < stop {
                let Ok((n, _)) = rx.recv_from(&mut buf) else {
                    continue;
                };
                let Some((CHANNEL, payload)) = proto::parse_channel_data(&buf[..n]) else {
                    continue;
                };
                let Some(seq) = seq_of(payload) else {
                    continue;
                };
                if let Some(s) = seq
                    .checked_sub(first)
                    .and_then(|i| seen.get_mut(i as usize))
                {
                    if !*s {
                        *s = true;
                        got += 1;
                    }
                }
            }
            got
        });
        let side = scope.spawn(during);
        pace(first, count, per_ms, |seq| {
            c.udp_socket()
                .send_to(&channel_data(CHANNEL, &seq_payload(seq, 100)), server)
                .unwrap();
        });
        side.join().expect("side thread");
        receiver.join().expect("receiver")
    })
}

/// A client of `srv` with an allocation and channel `CHANNEL` bound to `peer`.
fn relaying_client(srv: &TestServer, user: &str, password: &str, peer: &UdpPeer) -> TurnClient {
    let mut c = client(srv, user, password);
    c.must_allocate();
    c.bind(CHANNEL, peer.addr);
    c
}

// ---------------------------------------------------------------------------------------------
// SIGHUP: reload
// ---------------------------------------------------------------------------------------------

#[test]
fn reload_while_relaying_loses_nothing() {
    let mut conf = conf(&[("alice", "alice-pw-1")]);
    let srv = start(&conf);
    let peer = UdpPeer::start(true);
    let mut c = relaying_client(&srv, "alice", "alice-pw-1", &peer);

    // 3,000 packets at 1,000/s, echoed back; three reloads at 0.6, 1.4 and 2.2 s, each
    // adding a user (so that each one really changes the running configuration).
    const N: u32 = 3000;
    let confs: Vec<ServerOptions> = (1..=3)
        .map(|i| {
            conf.users.push((format!("user{i}"), format!("user{i}-pw")));
            conf.clone()
        })
        .collect();
    let got = echo_stream(&c, 0, N, 1, || {
        let start = Instant::now();
        for (i, cf) in confs.iter().enumerate() {
            let at = Duration::from_millis(600 + 800 * i as u64);
            if let Some(w) = (start + at).checked_duration_since(Instant::now()) {
                std::thread::sleep(w);
            }
            srv.reload(cf);
        }
    });
    assert_eq!(got, N, "packets lost across 3 reloads");
    assert_eq!(srv.stderr().matches("configuration reloaded").count(), 3);

    // The allocation still works (relay and Refresh), and the last reload took effect.
    assert_eq!(echo_stream(&c, N, 200, 1, || {}), 200);
    c.refresh(600)
        .expect_success("Refresh of the live allocation");
    client(&srv, "user3", "user3-pw").must_allocate();
}

#[test]
fn reload_removing_a_user() {
    let mut conf = conf(&[("alice", "alice-pw-2"), ("bob", "bob-pw-2")]);
    let srv = start(&conf);
    let peer = UdpPeer::start(true);
    let mut bob = relaying_client(&srv, "bob", "bob-pw-2", &peer);
    assert_eq!(echo_stream(&bob, 0, 50, 1, || {}), 50);

    conf.users.retain(|(u, _)| u != "bob");
    srv.reload(&conf);

    // A new allocation for bob: 401 (even with the right password).
    let mut bob2 = client(&srv, "bob", "bob-pw-2");
    let resp = bob2.allocate();
    assert_eq!(resp.code(), Some(401), "bob allocates after removal");
    assert!(bob2.nonce.is_some(), "the retry carried credentials");
    // Bob's running allocation ends at the next tick (within a second), as a revoked
    // user's does, with its usage record...
    let log = srv.wait_log("bob's usage record", Duration::from_secs(3), |l| {
        l.lines()
            .any(|l| l.contains("allocation ended") && l.contains("user=bob"))
    });
    let ended = log
        .lines()
        .find(|l| l.contains("allocation ended") && l.contains("user=bob"))
        .unwrap();
    assert!(
        ended.contains("reason=\"deleted\"") && ended.contains("packets_to_peer=50 "),
        "{ended}"
    );
    // ...its Refresh fails authentication, and it relays nothing more.
    assert_eq!(bob.refresh(600).code(), Some(401), "bob refreshes");
    assert_eq!(
        echo_stream(&bob, 50, 200, 1, || {}),
        0,
        "relayed after removal"
    );
    // Alice is unaffected.
    client(&srv, "alice", "alice-pw-2").must_allocate();
}

#[test]
fn reload_adding_a_secret_works_at_once() {
    let mut conf = conf(&[]).secrets(&["old-secret-0123456789"]);
    let srv = start(&conf);
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let user = rest_username(expiry, "carol");
    let new_secret = "new-secret-9876543210";
    let pass = rest_password(new_secret, &user);
    // The old secret works; the new one does not yet.
    let old_pass = rest_password("old-secret-0123456789", &user);
    client(&srv, &user, &old_pass).must_allocate();
    let resp = client(&srv, &user, &pass).allocate();
    assert_eq!(resp.code(), Some(401), "new secret before reload");

    conf.secrets.push(new_secret.into());
    let written = srv.config_for(&conf);
    srv.write_config(&written);
    srv.signal("HUP");
    let sent = Instant::now();
    loop {
        let mut c = client(&srv, &user, &pass);
        if c.allocate().is_success() {
            break;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(1),
            "new secret not accepted within 1 s of SIGHUP"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("new secret accepted {:?} after SIGHUP", sent.elapsed());
}

#[test]
fn reload_failing_validation_keeps_running_config() {
    let conf = conf(&[("alice", "alice-pw-4")]);
    let srv = start(&conf);
    let peer = UdpPeer::start(true);
    let c = relaying_client(&srv, "alice", "alice-pw-4", &peer);

    // Bad file 1: empty realm, and alice replaced by carol.
    let mut bad = conf.clone();
    bad.realm = String::new();
    bad.users = vec![("carol".into(), "carol-pw-4".into())];
    srv.reload_raw(&srv.config_for(&bad), false);
    // Bad file 2: a valid realm but an unknown key, and carol again.
    let mut bad2 = conf.clone();
    bad2.users = vec![("carol".into(), "carol-pw-4".into())];
    bad2 = bad2.limits_toml("frobnicate = 2");
    srv.reload_raw(&srv.config_for(&bad2), false);

    let log = srv.stderr();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("reload refused"))
        .collect();
    assert!(
        refused.iter().any(|l| l.contains("server.realm")),
        "no refusal naming server.realm: {refused:#?}"
    );
    assert!(
        refused.iter().any(|l| l.contains("limits.frobnicate")),
        "no refusal naming limits.frobnicate: {refused:#?}"
    );
    assert!(!log.contains("configuration reloaded"));

    // The running configuration is unchanged: alice allocates, carol does not, the
    // realm is still the old one, and the allocation still relays.
    let mut a = client(&srv, "alice", "alice-pw-4");
    a.must_allocate();
    let resp = client(&srv, "carol", "carol-pw-4").allocate();
    assert_eq!(resp.code(), Some(401), "carol from the refused file");
    let mut x = client(&srv, "x", "y");
    let challenge = x.transact(&x.plain(method::ALLOCATE, &udp_transport));
    assert_eq!(challenge.msg().realm().unwrap(), Some(REALM));
    assert_eq!(echo_stream(&c, 0, 100, 1, || {}), 100);
}

// ---------------------------------------------------------------------------------------------
// SIGTERM: drain
// ---------------------------------------------------------------------------------------------

#[test]
fn drain_with_alternate_server() {
    let conf = conf(&[("alice", "alice-pw-5")])
        .server_toml("alternate_servers = [\"127.0.0.1:3999\"]")
        .metrics();
    let mut srv = start(&conf);
    assert_eq!(srv.http_get("/health").0, 200);
    let peer = UdpPeer::start(true);
    let mut c = relaying_client(&srv, "alice", "alice-pw-5", &peer);

    srv.signal("TERM");
    srv.wait_log("draining", Duration::from_secs(2), |l| {
        l.contains("draining")
    });
    let (status, body) = srv.http_get("/health");
    assert_eq!(status, 503, "/health while draining: {body}");
    assert_eq!(
        sample(&srv.metrics_text(), "turnstone_draining", &[]),
        Some(1.0)
    );

    // A new Allocate: 300 Try Alternate with ALTERNATE-SERVER.
    let mut other = client(&srv, "alice", "alice-pw-5");
    let resp = other.allocate();
    let msg = resp.msg();
    assert_eq!(resp.code(), Some(300), "{:?}", msg.error_code());
    let alt =
        proto::decode_address(msg.get(attr::ALTERNATE_SERVER).expect("ALTERNATE-SERVER")).unwrap();
    assert_eq!(alt, "127.0.0.1:3999".parse().unwrap());
    assert!(
        msg.verify_integrity(&other.key),
        "300 carries MESSAGE-INTEGRITY"
    );

    // The live allocation keeps relaying, and refreshing.
    assert_eq!(echo_stream(&c, 0, 200, 1, || {}), 200);
    c.refresh(600)
        .expect_success("Refresh of the live allocation");
    assert!(srv.wait_exit(Duration::ZERO).is_none(), "exited too early");

    // Its end ends the drain.
    let deleted = Instant::now();
    let resp = c.refresh(0);
    assert_eq!(resp.class(), Class::Success);
    let st = srv
        .wait_exit(Duration::from_millis(1500))
        .expect("still running 1.5 s after the last allocation ended");
    assert!(st.success(), "exit status {st}");
    eprintln!(
        "exited {:?} after the last allocation ended",
        deleted.elapsed()
    );
}

#[test]
fn drain_without_alternate_times_out() {
    let conf = conf(&[("alice", "alice-pw-6")]).server_toml("drain_timeout = \"2s\"");
    let mut srv = start(&conf);
    let peer = UdpPeer::start(true);
    let c = relaying_client(&srv, "alice", "alice-pw-6", &peer);

    srv.signal("TERM");
    let term = Instant::now();
    srv.wait_log("draining", Duration::from_secs(2), |l| {
        l.contains("draining")
    });
    let resp = client(&srv, "alice", "alice-pw-6").allocate();
    assert_eq!(resp.code(), Some(508));
    assert_eq!(echo_stream(&c, 0, 100, 1, || {}), 100);

    let st = srv
        .wait_exit(Duration::from_secs(4))
        .expect("still running 4 s after SIGTERM with drain_timeout 2s");
    let took = term.elapsed();
    assert!(st.success(), "exit status {st}");
    assert!(
        took >= Duration::from_millis(1800) && took < Duration::from_millis(3200),
        "exited {took:?} after SIGTERM, want ~2 s"
    );
    assert!(srv.stderr().contains("drain timeout passed"));
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

const FAMILIES: [&str; 6] = [
    "turnstone_allocations_active",
    "turnstone_relayed_packets_total",
    "turnstone_auth_failures_total",
    "turnstone_responses_total",
    "turnstone_dropped_packets_total",
    "turnstone_worker_load",
];

#[test]
fn metrics_endpoint() {
    let user = "metrics-user-q7z";
    let conf = conf(&[(user, "metrics-pw-7")]).metrics();
    let srv = start(&conf);
    let (status, body) = srv.http_get("/health");
    assert_eq!((status, body.trim()), (200, "ok"));
    let text = srv.metrics_text();
    for f in FAMILIES {
        assert!(
            text.lines().any(|l| l.starts_with(f)),
            "/metrics lacks {f}:\n{text}"
        );
    }

    let peer = UdpPeer::start(true);
    let c = relaying_client(&srv, user, "metrics-pw-7", &peer);
    const N: u32 = 300;
    assert_eq!(echo_stream(&c, 0, N, 1, || {}), N);
    let to_peer = srv.wait_metric(
        "turnstone_relayed_packets_total",
        &[("direction", "to_peer"), ("path", "channel")],
        f64::from(N),
    );
    srv.wait_metric(
        "turnstone_relayed_packets_total",
        &[("direction", "to_client"), ("path", "channel")],
        f64::from(N),
    );
    srv.wait_metric(
        "turnstone_relayed_bytes_total",
        &[("direction", "to_peer"), ("path", "channel")],
        f64::from(N * 100),
    );
    srv.wait_metric(
        "turnstone_allocations_active",
        &[("transport", "udp"), ("family", "ipv4")],
        1.0,
    );
    // The first Allocate was challenged (401, MESSAGE-INTEGRITY missing).
    srv.wait_metric(
        "turnstone_auth_failures_total",
        &[("reason", "missing")],
        1.0,
    );
    srv.wait_metric("turnstone_responses_total", &[("code", "401")], 1.0);
    let text = srv.metrics_text();
    assert!(!text.contains(user), "username in /metrics");
    assert!(!text.contains("127.0.0.1:"), "address in /metrics");
    eprintln!("to_peer channel packets: {to_peer}\n----- /metrics -----\n{text}");
}

// ---------------------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------------------

#[test]
fn bandwidth_limit_per_allocation() {
    let conf = conf(&[("alice", "alice-pw-8")])
        .limits_toml("max_bandwidth_per_allocation = \"20KB\"")
        .metrics();
    let srv = start(&conf);
    let peer = UdpPeer::start(false);
    let c = relaying_client(&srv, "alice", "alice-pw-8", &peer);

    // 1,000 packets of 100 bytes in 1 s: 100 KB offered at 100 KB/s.
    let start = Instant::now();
    for seq in 0..1000u32 {
        c.udp_socket()
            .send_to(&channel_data(CHANNEL, &seq_payload(seq, 100)), srv.addr)
            .unwrap();
        if let Some(w) = (start + Duration::from_millis(u64::from(seq + 1)))
            .checked_duration_since(Instant::now())
        {
            std::thread::sleep(w);
        }
    }
    let sent_for = start.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let got = peer.bytes.load(Ordering::Relaxed);
    eprintln!("bandwidth: offered 100000 B in {sent_for:?}, peer received {got} B");
    // One second of burst plus what refills while sending (≈ 20 KB/s × 1 s).
    let refill = 20_000.0 * sent_for.as_secs_f64();
    assert!(
        (got as f64) <= 20_000.0 + refill + 2_000.0,
        "received {got} B, want <= ~40 KB"
    );
    assert!(
        got >= 20_000,
        "received only {got} B, want >= the 20 KB burst"
    );
    let dropped = srv.wait_metric(
        "turnstone_dropped_packets_total",
        &[("reason", "bandwidth")],
        1.0,
    );
    assert!(dropped >= 500.0, "bandwidth drops counted: {dropped}");
}

/// Floods `count` unauthenticated Allocate requests (28 bytes each, like Chromium's
/// first Allocate) from `sockets` source sockets as fast as possible; returns (bytes
/// sent, bytes received back, answers).
fn flood(server: SocketAddr, count: usize, sockets: usize) -> (u64, u64, u64) {
    let socks: Vec<UdpSocket> = (0..sockets)
        .map(|_| udp_socket(Duration::from_millis(200)))
        .collect();
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let receivers: Vec<_> = socks
            .iter()
            .map(|s| {
                let done = &done;
                scope.spawn(move || {
                    let mut buf = vec![0u8; 2048];
                    let (mut bytes, mut answers) = (0u64, 0u64);
                    let mut last = Instant::now();
                    loop {
                        match s.recv_from(&mut buf) {
                            Ok((n, from)) if from == server => {
                                bytes += n as u64;
                                answers += 1;
                                last = Instant::now();
                            }
                            _ => {
                                if done.load(Ordering::Relaxed)
                                    && last.elapsed() > Duration::from_millis(500)
                                {
                                    return (bytes, answers);
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        let mut sent = 0u64;
        for i in 0..count {
            let mut req = Vec::new();
            let mut w = MessageWriter::new(&mut req, method::ALLOCATE, Class::Request, tid());
            udp_transport(&mut w);
            w.finish();
            assert_eq!(req.len(), 28);
            let s = &socks[i % socks.len()];
            s.send_to(&req, server).unwrap();
            sent += req.len() as u64;
        }
        done.store(true, Ordering::Relaxed);
        let (mut bytes, mut answers) = (0, 0);
        for r in receivers {
            let (b, a) = r.join().unwrap();
            bytes += b;
            answers += a;
        }
        (sent, bytes, answers)
    })
}

#[test]
fn reflection_factor() {
    let mut factors = Vec::new();
    // 50 per second, unlimited, and the default (no key).
    for rate in [Some(50u32), Some(0), None] {
        let mut conf = conf(&[("alice", "alice-pw-9")]);
        if let Some(r) = rate {
            conf = conf.limits_toml(&format!("unauthenticated_rate = {r}"));
        }
        if rate == Some(50) {
            conf = conf.metrics();
        }
        let srv = start(&conf);
        let start = Instant::now();
        let (sent, back, answers) = flood(srv.addr, 2000, 1);
        let factor = back as f64 / sent as f64;
        let rate = rate.map_or("default".to_string(), |r| r.to_string());
        eprintln!(
            "reflection factor: {factor:.3} (unauthenticated_rate = {rate}; 2000 requests, \
             {sent} B sent, {answers} answers, {back} B back, {:?})",
            start.elapsed()
        );
        if rate == "50" {
            assert!(factor < 0.2, "reflection factor {factor} with rate {rate}");
            srv.wait_metric(
                "turnstone_dropped_packets_total",
                &[("reason", "rate_limited")],
                1000.0,
            );
            // The same flood from 8 source ports of the same address: the limit is
            // kept per worker, so with W workers up to W times as many answers.
            let (sent, back, answers) = flood(srv.addr, 2000, 8);
            eprintln!(
                "reflection factor: {:.3} (unauthenticated_rate = {rate}; same IP, 8 source \
                 ports; {answers} answers)",
                back as f64 / sent as f64
            );
        }
        factors.push(factor);
    }
    assert!(factors[1] > 2.0, "a 401 is several times the request");
}

// ---------------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------------

const LOG_PASSWORD: &str = "s3cret-Log-Password";

/// Runs one allocation (10 packets each way, then deleted) on a server logging in
/// `format`; returns the server's stderr.
fn allocation_logs(format: &'static str) -> String {
    let conf = logging(&[("alice", LOG_PASSWORD)], format).secrets(&["log-secret-abcdef"]);
    let srv = start(&conf);
    let peer = UdpPeer::start(true);
    let mut c = relaying_client(&srv, "alice", LOG_PASSWORD, &peer);
    assert_eq!(echo_stream(&c, 0, 10, 1, || {}), 10);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(c.refresh(0).class(), Class::Success);
    let log = srv.wait_log("allocation ended", Duration::from_secs(2), |l| {
        l.contains("allocation ended")
    });
    let all = format!("{}{log}", srv.stdout());
    assert!(!all.contains(LOG_PASSWORD), "password in the logs");
    assert!(!all.contains("log-secret-abcdef"), "secret in the logs");
    log
}

/// Removes ANSI SGR escape sequences (`ESC [ ... m`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn json_logs() {
    let log = allocation_logs("json");
    let mut created = None;
    let mut ended = None;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        match v["fields"]["message"].as_str() {
            Some("allocation created") => created = Some((line, v)),
            Some("allocation ended") => ended = Some((line, v)),
            _ => {}
        }
    }
    let (cl, c) = created.expect("an 'allocation created' line");
    let (el, e) = ended.expect("an 'allocation ended' line");
    let (cf, ef) = (&c["fields"], &e["fields"]);
    assert_eq!(cf["user"], "alice", "{cl}");
    assert!(cf["allocation"].is_u64() && cf["client"].is_string() && cf["relay"].is_string());
    assert_eq!(ef["allocation"], cf["allocation"], "same id: {el}");
    assert_eq!(ef["user"], "alice", "{el}");
    assert!(ef["duration_ms"].as_u64().is_some(), "{el}");
    for k in ["packets_to_peer", "packets_to_client"] {
        assert_eq!(ef[k].as_u64(), Some(10), "{k}: {el}");
    }
    for k in ["bytes_to_peer", "bytes_to_client"] {
        assert_eq!(ef[k].as_u64(), Some(1000), "{k}: {el}");
    }
    assert!(e["level"] == "INFO" && e["timestamp"].is_string(), "{el}");
    eprintln!("json created: {cl}\njson ended: {el}");
}

#[test]
fn text_logs() {
    let log = allocation_logs("text");
    let plain = strip_ansi(&log);
    let created = plain
        .lines()
        .find(|l| l.contains("allocation created"))
        .expect("an 'allocation created' line");
    let ended = plain
        .lines()
        .find(|l| l.contains("allocation ended"))
        .expect("an 'allocation ended' line");
    assert!(created.contains(" user=alice"), "{created}");
    assert!(created.contains(" allocation="), "{created}");
    for f in [
        " user=alice",
        " duration_ms=",
        " packets_to_peer=10",
        " bytes_to_peer=1000",
        " packets_to_client=10",
        " bytes_to_client=1000",
    ] {
        assert!(ended.contains(f), "no {f:?} in {ended}");
    }
    eprintln!("text created: {created}\ntext ended: {ended}");
}

/// Text logs go to stderr, which under systemd is the journal, not a terminal: they
/// should carry no ANSI colour codes.
#[test]
fn text_logs_have_no_ansi_escapes_off_a_terminal() {
    let log = allocation_logs("text");
    assert!(!log.contains('\u{1b}'), "ANSI escapes in: {log}");
}
