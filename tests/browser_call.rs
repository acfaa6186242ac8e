//! Real calls in headless Chromium (Debian package `chromium`) through turnstone.
//!
//! The page `tests/browser/call.html` (opened by the runner, `tests/common/browser.rs`)
//! takes Chromium's fake camera and microphone (`--use-fake-device-for-media-stream`,
//! 320x240 @ 15 fps) and calls between RTCPeerConnections in the same page, relay-only
//! (`iceTransportPolicy: 'relay'`) through the test server, with a data channel on
//! every pair. After every pair is connected it reads `getStats()` of every PC a few
//! times and POSTs the samples back; the checks are made here:
//!
//! * two-party calls over `turn:` UDP, `turn:` TCP and `turns:` (TLS): inbound video
//!   bytes and decoded frames and inbound audio bytes grow on both sides, both ends
//!   of the selected pair are relay candidates of this server on both PCs, the local
//!   candidate's `relayProtocol` is udp/tcp/tls, data-channel messages flow both ways;
//! * the same call with TURN REST credentials minted by `turnstone credentials`;
//! * wrong credentials make `onicecandidateerror` report 401 (and no relay candidate);
//! * a three-party call (full mesh, 3 pairs = 6 PCs) for 20 s: every inbound video
//!   stream decodes frames in every 5 s window; the relayed bitrate is printed.
//!
//! The calls run one at a time (video encoding is CPU-heavy on small CI machines).

mod common;

use common::browser::{self, percent_encode, PageResult, CALL_FLAGS};
use common::{parse_credentials, run_turnstone, ServerOptions, TestServer, PASSWORD, USER};
use serde_json::{json, Value};
use std::sync::Mutex;
use std::time::Duration;

const MESSAGES: usize = 20;

/// One Chromium call at a time in this process.
static BROWSER: Mutex<()> = Mutex::new(());

/// What the page should do (query parameters of call.html).
struct PageRun {
    ice: Value,
    mode: &'static str,
    peers: usize,
    warmup_ms: u64,
    interval_ms: u64,
    samples: usize,
    chromium_args: Vec<&'static str>,
}

impl PageRun {
    /// A two-party call sampled twice, 3 s apart, after 1 s.
    fn call(ice: Value) -> PageRun {
        PageRun {
            ice,
            mode: "call",
            peers: 2,
            warmup_ms: 1000,
            interval_ms: 3000,
            samples: 2,
            chromium_args: CALL_FLAGS.to_vec(),
        }
    }

    fn args(mut self, args: &[&'static str]) -> PageRun {
        self.chromium_args.extend_from_slice(args);
        self
    }

    fn timeout(&self) -> Duration {
        // getUserMedia + connecting (the page gives up after 15 s) + messages + sampling.
        Duration::from_millis(
            25_000 + self.warmup_ms + self.interval_ms * self.samples.saturating_sub(1) as u64,
        )
    }

    /// The page with its query.
    fn page(&self) -> String {
        format!(
            "/call.html?ice={}&mode={}&peers={}&messages={MESSAGES}&warmup={}&interval={}&samples={}",
            percent_encode(&self.ice.to_string()),
            self.mode,
            self.peers,
            self.warmup_ms,
            self.interval_ms,
            self.samples
        )
    }
}

/// Opens the page in headless Chromium (one at a time) and returns what it reports,
/// which must be `ok`.
fn run_page(run: &PageRun) -> PageResult {
    let _one_at_a_time = BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    let r = browser::run_page(&run.page(), &run.chromium_args, run.timeout());
    println!(
        "page ({} mode, {} peers) reported after {:.1} s",
        run.mode,
        run.peers,
        r.elapsed.as_secs_f64()
    );
    assert_eq!(
        r.v["ok"].as_bool(),
        Some(true),
        "the page failed\n{}",
        r.context()
    );
    r
}

/// A one-entry iceServers list.
fn ice(url: &str, username: &str, credential: &str) -> Value {
    json!([{ "urls": [url], "username": username, "credential": credential }])
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

/// The PCs of a call result, by name ("AB" = A's PC towards B), with their samples.
fn samples(r: &PageResult) -> Vec<(String, Vec<Value>)> {
    let Some(m) = r.v["samples"].as_object() else {
        panic!("no samples\n{}", r.context());
    };
    m.iter()
        .map(|(k, v)| (k.clone(), v.as_array().cloned().unwrap_or_default()))
        .collect()
}

/// Relay-only and working: data channels delivered everything in order, the
/// selected pair of every PC is relay on both ends with ports of this server (and
/// the local one allocated over `relay_protocol`), and between consecutive samples
/// every PC's inbound video bytes and decoded frames and inbound audio bytes grew.
fn assert_call(server: &TestServer, r: &PageResult, relay_protocol: &str) {
    let pcs = samples(r);
    let peers = r.v["samples"].as_object().map_or(0, |m| m.len());
    assert!(peers >= 2, "expected at least 2 PCs\n{}", r.context());
    for (pc, ss) in &pcs {
        let m = &r.v["messages"][pc];
        assert_eq!(
            m["received"].as_u64(),
            Some(MESSAGES as u64),
            "{pc}: data-channel messages received\n{}",
            r.context()
        );
        assert_eq!(
            m["inOrder"].as_bool(),
            Some(true),
            "{pc}: data-channel messages in order\n{}",
            r.context()
        );
        assert!(ss.len() >= 2, "{pc}: fewer than 2 samples\n{}", r.context());
        let last = &ss[ss.len() - 1];
        for end in ["local", "remote"] {
            let c = &last["pair"][end];
            assert_eq!(
                c["candidateType"].as_str(),
                Some("relay"),
                "{pc}'s selected pair {end} candidate must be relay\n{}",
                r.context()
            );
            let port = c["port"].as_u64().unwrap_or(0);
            assert!(
                server.is_relay_port(u16::try_from(port).unwrap_or(0)),
                "{pc}'s {end} relay candidate port {port} is outside {:?}\n{}",
                server.relay_ports,
                r.context()
            );
        }
        assert_eq!(
            last["pair"]["local"]["relayProtocol"].as_str(),
            Some(relay_protocol),
            "{pc}'s selected local candidate must have been allocated over {relay_protocol}\n{}",
            r.context()
        );
        for w in ss.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            for (kind, field) in [
                ("video", "bytesReceived"),
                ("video", "framesDecoded"),
                ("audio", "bytesReceived"),
            ] {
                let (x, y) = (
                    num(&a["inbound"][kind][field]),
                    num(&b["inbound"][kind][field]),
                );
                assert!(
                    y > x,
                    "{pc}: inbound {kind} {field} did not grow between samples ({x} -> {y})\n{}",
                    r.context()
                );
            }
        }
    }
}

/// Prints per-PC figures and returns the relayed bitrate: the sum over all PCs of
/// the inbound RTP bytes (audio + video) received between the first and the last
/// sample, in bits per second, and the same from the selected pairs' bytesReceived
/// (all traffic through the relay: RTP, RTCP, data channel, STUN).
fn report_bitrate(label: &str, r: &PageResult) -> (f64, f64) {
    let mut rtp_bytes = 0.0;
    let mut pair_bytes = 0.0;
    let mut span = 0.0f64;
    for (pc, ss) in samples(r) {
        let (Some(first), Some(last)) = (ss.first(), ss.last()) else {
            continue;
        };
        let secs = (num(&last["t"]) - num(&first["t"])) / 1000.0;
        span = span.max(secs);
        let d = |kind: &str, field: &str| {
            num(&last["inbound"][kind][field]) - num(&first["inbound"][kind][field])
        };
        let (video, audio, frames) = (
            d("video", "bytesReceived"),
            d("audio", "bytesReceived"),
            d("video", "framesDecoded"),
        );
        rtp_bytes += video + audio;
        pair_bytes += num(&last["pair"]["bytesReceived"]) - num(&first["pair"]["bytesReceived"]);
        let v = &last["inbound"]["video"];
        println!(
            "{label} {pc}: video {:.0} kbit/s {:.1} fps ({}x{} {}), audio {:.0} kbit/s, total video {} B / {} frames, audio {} B, rtt {} s via {}",
            video * 8.0 / secs.max(0.001) / 1000.0,
            frames / secs.max(0.001),
            v["frameWidth"],
            v["frameHeight"],
            v["codec"].as_str().unwrap_or("?"),
            audio * 8.0 / secs.max(0.001) / 1000.0,
            v["bytesReceived"],
            v["framesDecoded"],
            last["inbound"]["audio"]["bytesReceived"],
            last["pair"]["currentRoundTripTime"],
            last["pair"]["local"]["relayProtocol"].as_str().unwrap_or("?"),
        );
    }
    let secs = span.max(0.001);
    let (rtp, pair) = (rtp_bytes * 8.0 / secs, pair_bytes * 8.0 / secs);
    println!(
        "{label}: relayed bitrate {:.0} kbit/s of inbound RTP ({:.0} kbit/s on the selected pairs) over {secs:.1} s, connected in {} ms",
        rtp / 1000.0,
        pair / 1000.0,
        r.v["connectMs"]
    );
    (rtp, pair)
}

fn two_party_call(server: &TestServer, label: &str, run: PageRun, relay_protocol: &str) {
    let r = run_page(&run);
    report_bitrate(label, &r);
    assert_call(server, &r, relay_protocol);
}

#[test]
fn chromium_call_over_turn_udp() {
    let server = TestServer::start_default();
    let url = format!("turn:127.0.0.1:{}?transport=udp", server.port());
    let run = PageRun::call(ice(&url, USER, PASSWORD));
    two_party_call(&server, "udp", run, "udp");
}

#[test]
fn chromium_call_over_turn_tcp() {
    let server = TestServer::start(ServerOptions::default().tcp());
    let url = format!("turn:127.0.0.1:{}?transport=tcp", server.port());
    let run = PageRun::call(ice(&url, USER, PASSWORD));
    two_party_call(&server, "tcp", run, "tcp");
}

#[test]
fn chromium_call_over_turns_tls() {
    let server = TestServer::start(ServerOptions::default().tls());
    // The certificate is self-signed (for localhost and 127.0.0.1).
    let url = format!("turns:localhost:{}?transport=tcp", server.tls_port());
    let run = PageRun::call(ice(&url, USER, PASSWORD)).args(&["--ignore-certificate-errors"]);
    two_party_call(&server, "tls", run, "tls");
}

/// TURN REST credentials from `turnstone credentials`, both printed forms: the
/// username/password lines (used over UDP) and the `--url` iceServers entry, passed
/// to the page as is (over TCP). The server knows only the secret, no static users.
#[test]
fn chromium_call_with_rest_credentials() {
    const REST_SECRET: &str = "browser-call-secret";
    let server = TestServer::start(
        ServerOptions::default()
            .users(&[])
            .secrets(&[REST_SECRET])
            .tcp(),
    );

    let out = run_turnstone(&[
        "credentials",
        "--secret",
        REST_SECRET,
        "--user",
        "browser",
        "--ttl",
        "1h",
    ]);
    assert!(out.status.success(), "credentials: {}", out.combined());
    let (user, pass) = parse_credentials(&out.stdout)
        .unwrap_or_else(|| panic!("no username/password in: {}", out.stdout));
    assert!(user.ends_with(":browser"), "REST username {user:?}");
    let url = format!("turn:127.0.0.1:{}?transport=udp", server.port());
    two_party_call(
        &server,
        "rest udp",
        PageRun::call(ice(&url, &user, &pass)),
        "udp",
    );

    let url = format!("turn:127.0.0.1:{}?transport=tcp", server.port());
    let out = run_turnstone(&[
        "credentials",
        "--secret",
        REST_SECRET,
        "--user",
        "browser",
        "--ttl",
        "1h",
        "--url",
        &url,
    ]);
    assert!(
        out.status.success(),
        "credentials --url: {}",
        out.combined()
    );
    let entry: Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("credentials --url printed no JSON ({e}): {}", out.stdout));
    two_party_call(
        &server,
        "rest tcp",
        PageRun::call(Value::Array(vec![entry])),
        "tcp",
    );
}

/// Wrong credentials: a wrong static password (over UDP) and a REST credential
/// minted with a secret the server does not have (over TCP) each make
/// `onicecandidateerror` report 401 for their URL, and no relay candidate appears.
#[test]
fn chromium_wrong_credential_reports_401() {
    let server = TestServer::start(ServerOptions::default().tcp());
    let out = run_turnstone(&[
        "credentials",
        "--secret",
        "not-the-servers-secret",
        "--user",
        "mallory",
        "--ttl",
        "1h",
    ]);
    assert!(out.status.success(), "credentials: {}", out.combined());
    let (rest_user, rest_pass) =
        parse_credentials(&out.stdout).unwrap_or_else(|| panic!("credentials: {}", out.stdout));
    let udp = format!("turn:127.0.0.1:{}?transport=udp", server.port());
    let tcp = format!("turn:127.0.0.1:{}?transport=tcp", server.port());
    let ice = json!([
        { "urls": [udp], "username": USER, "credential": "not-wonderland" },
        { "urls": [tcp], "username": rest_user, "credential": rest_pass },
    ]);
    let run = PageRun {
        mode: "gather",
        ..PageRun::call(ice)
    };
    let r = run_page(&run);
    println!("candidate errors: {}", r.v["errors"]);
    let errors = r.v["errors"].as_array().cloned().unwrap_or_default();
    for (what, url) in [("wrong password, udp", &udp), ("wrong secret, tcp", &tcp)] {
        let codes: Vec<u64> = errors
            .iter()
            .filter(|e| e["url"].as_str() == Some(url.as_str()))
            .filter_map(|e| e["errorCode"].as_u64())
            .collect();
        assert!(
            codes.contains(&401),
            "{what}: expected errorCode 401 for {url}, got {codes:?}\n{}",
            r.context()
        );
    }
    let relays: Vec<&Value> = r.v["candidates"]
        .as_array()
        .map(|c| {
            c.iter()
                .filter(|c| c.to_string().contains(" relay "))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        relays.is_empty(),
        "relay candidates with wrong credentials: {relays:?}"
    );
}

/// Three participants, each pair connected through the relay (3 pairs, 6 PCs, 6
/// inbound video and 6 inbound audio streams), for 20 s: every inbound video stream
/// decodes frames in every 5 s window.
#[test]
fn chromium_three_party_call_for_20_seconds() {
    let server = TestServer::start_default();
    let url = format!("turn:127.0.0.1:{}?transport=udp", server.port());
    let run = PageRun {
        peers: 3,
        warmup_ms: 1000,
        interval_ms: 5000,
        samples: 5,
        ..PageRun::call(ice(&url, USER, PASSWORD))
    };
    let r = run_page(&run);
    let (rtp, _) = report_bitrate("three-party", &r);
    let pcs = samples(&r);
    assert_eq!(pcs.len(), 6, "6 PCs\n{}", r.context());
    for (pc, ss) in &pcs {
        assert_eq!(ss.len(), 5, "{pc}: 5 samples\n{}", r.context());
        let frames: Vec<f64> = ss
            .iter()
            .map(|s| num(&s["inbound"]["video"]["framesDecoded"]))
            .collect();
        println!("three-party {pc}: framesDecoded at 0/5/10/15/20 s: {frames:?}");
    }
    assert_call(&server, &r, "udp");
    assert!(rtp > 0.0, "no relayed media");
}
