//! `turnstone upgrade` under a real call: headless Chromium (Debian package `chromium`)
//! runs a relay-only call over `turn:` UDP between two RTCPeerConnections of the page
//! `tests/browser/upgrade_call.html` (fake camera and microphone both ways, and two data
//! channels carrying a numbered message each way every 20 ms: one ordered and reliable,
//! one unordered with `maxRetransmits: 0`), and the server is upgraded three times
//! while it runs. At the end:
//!
//! * every message on the reliable channels arrived, in order, none twice; none was lost
//!   on the unreliable ones either (the hand-over queues datagrams, it drops none);
//! * neither PC's ICE connection state left "connected"/"completed" (every
//!   `iceconnectionstatechange` is recorded), nor its connection state "connected"; no
//!   candidate was gathered and no negotiation needed after connecting, the ICE ufrags
//!   of both descriptions are those of the start (no ICE restart), and the selected
//!   candidate pair never changed: the same relay candidates of this server from the
//!   first getStats() sample to the last;
//! * no data channel went without a message for more than 1 s across an upgrade;
//! * inbound-rtp audio and video `packetsReceived` never stood still for more than 1 s,
//!   grew across every upgrade and in every second after the last one;
//! * every upgrade moved the call's allocations (`allocations` >= 1, as many as the
//!   call made), a new process served after each and the old ones exited, and the
//!   call made no new allocation.
//!
//! The longest silence of each data channel around each upgrade is printed.

mod common;

use common::browser::{percent_encode, Chromium, PageResult, PageServer, CALL_FLAGS};
use common::upgrade::Upgraded;
use common::{ServerOptions, TestServer, PASSWORD, USER};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// How long the page sends messages once the call is connected.
const RUN: Duration = Duration::from_secs(17);
/// When the upgrades start, from the page's "call connected".
const UPGRADE_AT: [Duration; 3] = [
    Duration::from_secs(3),
    Duration::from_secs(7),
    Duration::from_secs(11),
];
/// One message each way on each channel this often.
const EVERY_MS: u64 = 20;
/// A getStats() sample of both PCs this often.
const SAMPLE_MS: u64 = 500;
/// The longest silence allowed on a data channel across an upgrade, and of inbound
/// audio or video packets (between samples) during the whole call. Chromium keeps ICE
/// "connected" through a 4 s outage of the server (tried with SIGSTOP), so these bound
/// what the ICE state cannot; an upgrade pauses UDP for milliseconds.
const MAX_SILENCE_MS: f64 = 1000.0;

/// An upgrade and when it ran, in page time (ms).
struct Done {
    up: Upgraded,
    start: f64,
    end: f64,
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn count(log: &str, what: &str) -> usize {
    log.lines().filter(|l| l.contains(what)).count()
}

/// "relay 127.0.0.1:50123 udp" for a candidate of `selectedPair()`.
fn candidate(c: &Value) -> String {
    format!(
        "{} {}:{} {}",
        c["candidateType"].as_str().unwrap_or("?"),
        c["address"].as_str().unwrap_or("?"),
        c["port"],
        c["relayProtocol"].as_str().unwrap_or("-")
    )
}

#[test]
fn chromium_call_through_three_upgrades() {
    let server = TestServer::start(ServerOptions {
        upgradable: true,
        ..ServerOptions::default()
    });
    let turn = format!("turn:127.0.0.1:{}?transport=udp", server.port());
    let ice = json!([{ "urls": [turn], "username": USER, "credential": PASSWORD }]);
    let pages = PageServer::start();
    let url = pages.url(&format!(
        "/upgrade_call.html?ice={}&run={}&every={EVERY_MS}&sample={SAMPLE_MS}",
        percent_encode(&ice.to_string()),
        RUN.as_millis()
    ));
    let mut chromium = Chromium::launch(pages, &url, CALL_FLAGS);
    chromium.wait_log("call connected", Duration::from_secs(45));
    let connected = Instant::now();
    let created = count(&server.stderr(), "allocation created");

    let mut done = Vec::new();
    let mut pid = server.pid().expect("server pid");
    let mut old = Vec::new();
    for at in UPGRADE_AT {
        if let Some(wait) = (connected + at).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let start = connected.elapsed();
        let up = server.must_upgrade();
        let end = connected.elapsed();
        println!(
            "upgrade at {:.2} s took {:.0} ms: pid {pid} -> {}, {} allocations, {} sockets, UDP paused {:.1} ms",
            start.as_secs_f64(),
            (end - start).as_secs_f64() * 1000.0,
            up.pid,
            up.allocations,
            up.sockets,
            up.pause_ms
        );
        assert_ne!(up.pid, pid, "a new process serves: {}", up.output);
        old.push(pid);
        pid = up.pid;
        done.push((start, end, up));
    }
    assert!(
        connected.elapsed() + Duration::from_secs(3) < RUN,
        "the upgrades took too long for the call to go on 3 s after the last one ({:?})",
        connected.elapsed()
    );
    let r = chromium.wait_result(Duration::from_secs(45) + RUN + Duration::from_secs(40));
    let log = server.stderr();
    assert_eq!(
        r.v["ok"].as_bool(),
        Some(true),
        "the page failed\n{}",
        r.context()
    );
    // Upgrade times in page time: the page logged "call connected" at connectedAt.
    let t0 = num(&r.v["connectedAt"]);
    let done: Vec<Done> = done
        .into_iter()
        .map(|(start, end, up)| Done {
            up,
            start: t0 + start.as_secs_f64() * 1000.0,
            end: t0 + end.as_secs_f64() * 1000.0,
        })
        .collect();

    check_upgrades(&server, &done, created, &log);
    // The old processes are gone (or zombies nobody has reaped yet).
    for p in old {
        let state = std::fs::read_to_string(format!("/proc/{p}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim().to_string()))
            .and_then(|r| r.split(' ').next().map(String::from));
        assert!(
            state.as_deref().is_none_or(|s| s == "Z" || s == "X"),
            "the old process {p} still runs ({state:?})"
        );
    }
    check_messages(&r, &done);
    for pc in ["A", "B"] {
        check_ice(&server, &r, pc);
        check_media(&r, pc, &done);
    }
    let notable: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    println!(
        "server warnings/errors: {}",
        if notable.is_empty() {
            "none".to_string()
        } else {
            notable.join("\n")
        }
    );
    println!("page reported after {:.1} s", r.elapsed.as_secs_f64());
}

/// Every upgrade moved the call's allocations; the call made no new one.
fn check_upgrades(server: &TestServer, done: &[Done], created: usize, log: &str) {
    assert!(
        created >= 1,
        "no allocation before the upgrades\n{}",
        server.logs()
    );
    for (i, d) in done.iter().enumerate() {
        assert!(
            d.up.allocations >= 1,
            "upgrade {}: no allocation moved: {}",
            i + 1,
            d.up.output
        );
        assert_eq!(
            d.up.allocations,
            created,
            "upgrade {}: moved as many allocations as the call made: {}",
            i + 1,
            d.up.output
        );
    }
    assert_eq!(
        count(log, "allocation created"),
        created,
        "the call allocated again during the upgrades\n{}",
        server.logs()
    );
}

/// Reliable channels: everything, in order, once; unreliable ones: nothing lost either;
/// no silence longer than [`MAX_SILENCE_MS`] across an upgrade. Prints every stream's
/// figures and its longest silence across each upgrade.
fn check_messages(r: &PageResult, done: &[Done]) {
    let Some(streams) = r.v["streams"].as_object() else {
        panic!("no streams\n{}", r.context());
    };
    assert_eq!(streams.len(), 4, "4 streams\n{}", r.context());
    let min_sent = (RUN.as_millis() as u64 / EVERY_MS / 2) as f64;
    for (name, s) in streams {
        let (sent, received, missing) = (
            num(&s["sent"]),
            num(&s["received"]),
            num(&s["missingCount"]),
        );
        let gaps = s["gaps"].as_array().cloned().unwrap_or_default();
        // The longest silence overlapping each upgrade (the page lists those longer
        // than two sending intervals).
        let around_ms: Vec<f64> = done
            .iter()
            .map(|d| {
                gaps.iter()
                    .filter(|g| {
                        let (at, ms) = (num(&g["at"]), num(&g["ms"]));
                        at <= d.end && at + ms >= d.start
                    })
                    .map(|g| num(&g["ms"]))
                    .fold(0.0, f64::max)
            })
            .collect();
        let around: Vec<String> = around_ms
            .iter()
            .map(|&gap| {
                if gap > 0.0 {
                    format!("{gap:.0} ms")
                } else {
                    format!("<= {} ms", 2 * EVERY_MS)
                }
            })
            .collect();
        println!(
            "{name}: sent {sent}, received {received}, missing {missing}; longest gap {} ms (at {} ms), \
             {} gaps over {} ms; across the upgrades: {}",
            s["longestGap"],
            s["longestGapAt"],
            gaps.len(),
            2 * EVERY_MS,
            around.join(", ")
        );
        for (d, gap) in done.iter().zip(&around_ms) {
            assert!(
                *gap <= MAX_SILENCE_MS,
                "{name}: {gap:.0} ms without a message across the upgrade at {:.0} ms\n{}",
                d.start,
                r.context()
            );
        }
        assert!(
            sent >= min_sent,
            "{name}: only {sent} messages sent\n{}",
            r.context()
        );
        assert_eq!(
            s["errors"].as_array().map(Vec::len),
            Some(0),
            "{name}: {}\n{}",
            s["errors"],
            r.context()
        );
        assert_eq!(
            missing,
            0.0,
            "{name}: messages missing: {}\n{}",
            s["missing"],
            r.context()
        );
        assert_eq!(received, sent, "{name}: received\n{}", r.context());
    }
}

/// ICE never left connected/completed, no restart, the same relay pair throughout.
fn check_ice(server: &TestServer, r: &PageResult, pc: &str) {
    let p = &r.v["pcs"][pc];
    let states = |key: &str| -> Vec<String> {
        p[key]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["state"].as_str().map(String::from))
            .collect()
    };
    let ice = states("iceStates");
    let conn = states("connectionStates");
    println!("{pc}: ICE states {ice:?}, connection states {conn:?}");
    let up = |s: &str| s == "connected" || s == "completed";
    let first = ice.iter().position(|s| up(s));
    assert!(
        first.is_some_and(|i| ice[i..].iter().all(|s| up(s))),
        "{pc}: the ICE connection state left connected/completed: {ice:?}\n{}",
        r.context()
    );
    assert!(
        up(p["finalIce"].as_str().unwrap_or("")),
        "{pc}: final ICE state {}",
        p["finalIce"]
    );
    let first = conn.iter().position(|s| s == "connected");
    assert!(
        first.is_some_and(|i| conn[i..].iter().all(|s| s == "connected")),
        "{pc}: the connection state left connected: {conn:?}\n{}",
        r.context()
    );
    assert_eq!(
        p["ufragsAtEnd"],
        p["ufragsAtConnect"],
        "{pc}: the ICE ufrags changed (an ICE restart)\n{}",
        r.context()
    );
    assert!(
        p["ufragsAtConnect"]["local"]
            .as_array()
            .is_some_and(|u| !u.is_empty()),
        "{pc}: no local ufrag\n{}",
        r.context()
    );
    let late: Vec<&Value> = p["lateCandidates"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| !c["candidate"].is_null() && c["candidate"] != "")
        .collect();
    assert!(
        late.is_empty(),
        "{pc}: candidates gathered after connecting: {late:?}\n{}",
        r.context()
    );
    for key in ["negotiationNeeded", "pairChanges", "candidateErrors"] {
        assert_eq!(
            p[key].as_array().map(Vec::len),
            Some(0),
            "{pc}: {key}: {}\n{}",
            p[key],
            r.context()
        );
    }
    assert_eq!(p["iceTransport"], true, "{pc}: no RTCIceTransport to watch");
    let samples = p["samples"].as_array().cloned().unwrap_or_default();
    assert!(samples.len() >= 10, "{pc}: few samples\n{}", r.context());
    let first = &samples[0];
    for end in ["local", "remote"] {
        let c = &first["pair"][end];
        assert_eq!(
            c["candidateType"].as_str(),
            Some("relay"),
            "{pc}'s selected {end} candidate must be relay\n{}",
            r.context()
        );
        let port = c["port"].as_u64().unwrap_or(0);
        assert!(
            server.is_relay_port(u16::try_from(port).unwrap_or(0)),
            "{pc}'s {end} relay candidate port {port} is outside {:?}",
            server.relay_ports
        );
    }
    println!(
        "{pc}: selected pair {} -> {} ({} samples)",
        candidate(&first["pair"]["local"]),
        candidate(&first["pair"]["remote"]),
        samples.len()
    );
    for s in &samples {
        assert_eq!(
            (&s["pairId"], &s["pair"]["local"], &s["pair"]["remote"]),
            (
                &first["pairId"],
                &first["pair"]["local"],
                &first["pair"]["remote"]
            ),
            "{pc}: the selected pair changed at {} ms\n{}",
            s["t"],
            r.context()
        );
        assert!(
            up(s["ice"].as_str().unwrap_or("")),
            "{pc}: ICE {} at {} ms",
            s["ice"],
            s["t"]
        );
    }
}

/// Inbound audio and video packets never stood still longer than [`MAX_SILENCE_MS`],
/// grew across every upgrade (from the last sample before it to the first one 1 s after
/// it ended) and in every second after the last.
fn check_media(r: &PageResult, pc: &str, done: &[Done]) {
    let samples = r.v["pcs"][pc]["samples"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let t = |s: &Value| num(&s["t"]);
    for kind in ["audio", "video"] {
        let packets = |s: &Value| num(&s["inbound"][kind]["packetsReceived"]);
        // The longest time packetsReceived stood still (samples at least 200 ms apart,
        // from the first with this kind).
        let mut still = 0.0f64;
        let mut since: Option<f64> = None;
        let mut prev: Option<&Value> = None;
        for s in samples.iter().filter(|s| s["inbound"][kind].is_object()) {
            match prev {
                Some(p) if t(s) - t(p) < 200.0 => continue,
                Some(p) if packets(s) <= packets(p) => {
                    let from = *since.get_or_insert(t(p));
                    still = still.max(t(s) - from);
                }
                _ => since = None,
            }
            prev = Some(s);
        }
        let last = &samples.last().expect("samples")["inbound"][kind];
        let frames = last["framesDecoded"]
            .as_u64()
            .map_or(String::new(), |f| format!(", {f} frames decoded"));
        println!(
            "{pc} inbound {kind}: {} packets, {} lost{frames}; longest stand-still {still:.0} ms (samples every {SAMPLE_MS} ms)",
            last["packetsReceived"], last["packetsLost"],
        );
        assert!(
            still <= MAX_SILENCE_MS,
            "{pc}: inbound {kind} packets stood still for {still:.0} ms\n{}",
            r.context()
        );
        for (i, d) in done.iter().enumerate() {
            let before = samples.iter().rev().find(|s| t(s) <= d.start);
            let after = samples.iter().find(|s| t(s) >= d.end + 1000.0);
            let (Some(before), Some(after)) = (before, after) else {
                panic!("{pc}: no samples around upgrade {}\n{}", i + 1, r.context());
            };
            assert!(
                packets(after) > packets(before),
                "{pc}: inbound {kind} packets did not grow across upgrade {} ({} at {} ms -> {} at {} ms)\n{}",
                i + 1,
                packets(before),
                t(before),
                packets(after),
                t(after),
                r.context()
            );
        }
        let last_end = done.last().expect("upgrades").end;
        let after: Vec<&Value> = samples.iter().filter(|s| t(s) >= last_end).collect();
        assert!(
            after.len() >= 6,
            "{pc}: {} samples after the last upgrade\n{}",
            after.len(),
            r.context()
        );
        // Every second (two samples on) after the last upgrade.
        let step = (1000 / SAMPLE_MS) as usize;
        for w in after.windows(step + 1) {
            let (a, b) = (w[0], w[step]);
            assert!(
                packets(b) > packets(a),
                "{pc}: inbound {kind} packets stood still after the last upgrade ({} at {} ms -> {} at {} ms)\n{}",
                packets(a),
                t(a),
                packets(b),
                t(b),
                r.context()
            );
        }
    }
}
