//! Running turnstone like production (issue 5), against the real binary:
//!
//! - SIGHUP reloads while an allocation relays (nothing lost), removes users (they can
//!   neither allocate nor refresh, their running allocation keeps relaying), adds
//!   secrets (usable at once), and a reload that fails validation changes nothing and
//!   logs each problem with its key;
//! - SIGTERM drains: 300 Try Alternate with ALTERNATE-SERVER (or 508), live allocations
//!   keep relaying, exit 0 when the last one ends or `drain_timeout` passes;
//! - the Prometheus endpoint (`/metrics`, `/health`);
//! - `max_bandwidth_per_allocation` and `unauthenticated_rate` (the reflection factor);
//! - text and JSON logs with the allocation usage record, and no password in them.
//!
//! Self-contained (its own spawn helper, since the test harness is shared): each test
//! writes a config file into a temp dir, starts the binary, talks to it on 127.0.0.1
//! with a minimal raw TURN client, rewrites the file and sends signals with `kill`.

mod common;

use common::{free_tcp_port, free_udp_port};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use turnstone::auth::{long_term_key, rest_password, rest_username};
use turnstone::proto::{self, attr, method, Class, Message, MessageWriter, TransactionId};

const REALM: &str = "ops.test";
const CHANNEL: u16 = 0x4000;
/// Relay port ranges for this file: above the kernel's ephemeral range (32768-60999)
/// and away from the shared harness (20000-32499).
const RELAY_BASE: u32 = 61_000;
const RELAY_WIDTH: u32 = 100;
const RELAY_SLOTS: u32 = 40;

static INSTANCE: AtomicU32 = AtomicU32::new(0);
static TID: AtomicU32 = AtomicU32::new(1);

// ---------------------------------------------------------------------------------------------
// Spawning and controlling the server
// ---------------------------------------------------------------------------------------------

/// What goes into the config file; rewritten whole for every reload.
#[derive(Clone)]
struct Conf {
    realm: String,
    users: Vec<(String, String)>,
    secrets: Vec<String>,
    /// Extra lines of `[server]`.
    server: String,
    /// Extra lines of `[limits]`.
    limits: String,
    log_format: &'static str,
    metrics: bool,
}

impl Conf {
    fn new(users: &[(&str, &str)]) -> Conf {
        Conf {
            realm: REALM.into(),
            users: users
                .iter()
                .map(|(u, p)| (u.to_string(), p.to_string()))
                .collect(),
            secrets: Vec::new(),
            server: String::new(),
            limits: String::new(),
            log_format: "text",
            metrics: false,
        }
    }
}

fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A turnstone process with its config file and logs in a temp dir. Dropping it kills
/// the process; if the test is failing, its logs are printed.
struct Turnstone {
    child: Option<Child>,
    dir: tempfile::TempDir,
    addr: SocketAddr,
    metrics: Option<SocketAddr>,
    relay: (u16, u16),
}

impl Turnstone {
    fn start(conf: &Conf) -> Turnstone {
        let dir = tempfile::Builder::new()
            .prefix("turnstone-ops-")
            .tempdir()
            .expect("temp dir");
        let n = INSTANCE.fetch_add(1, Ordering::Relaxed);
        let slot = std::process::id().wrapping_mul(7).wrapping_add(n) % RELAY_SLOTS;
        let low = RELAY_BASE + slot * RELAY_WIDTH;
        let mut srv = Turnstone {
            child: None,
            dir,
            addr: SocketAddr::from(([127, 0, 0, 1], free_udp_port())),
            metrics: conf
                .metrics
                .then(|| SocketAddr::from(([127, 0, 0, 1], free_tcp_port()))),
            relay: (low as u16, (low + RELAY_WIDTH - 1) as u16),
        };
        srv.write_config(conf);
        let stdout = std::fs::File::create(srv.dir.path().join("stdout.log")).expect("stdout");
        let stderr = std::fs::File::create(srv.dir.path().join("stderr.log")).expect("stderr");
        let child = Command::new(env!("CARGO_BIN_EXE_turnstone"))
            .arg("--config")
            .arg(srv.config_path())
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("start turnstone");
        srv.child = Some(child);
        srv.wait_ready();
        srv
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("turnstone.toml")
    }

    fn toml(&self, c: &Conf) -> String {
        let users: Vec<String> = c
            .users
            .iter()
            .map(|(u, p)| format!("{} = {}", toml_str(u), toml_str(p)))
            .collect();
        let secrets: Vec<String> = c.secrets.iter().map(|s| toml_str(s)).collect();
        let mut t = format!(
            "[server]\nrealm = {}\n{}\n\n\
             [[listen]]\ntransport = \"udp\"\naddress = \"{}\"\n\n\
             [relay]\naddress = \"127.0.0.1\"\nports = \"{}-{}\"\n\n\
             [auth]\nusers = {{ {} }}\nsecrets = [{}]\n\n\
             [policy]\nallow_peers = [\"127.0.0.0/8\"]\n\n\
             [limits]\n{}\n\n\
             [log]\nlevel = \"info\"\nformat = \"{}\"\n",
            toml_str(&c.realm),
            c.server,
            self.addr,
            self.relay.0,
            self.relay.1,
            users.join(", "),
            secrets.join(", "),
            c.limits,
            c.log_format,
        );
        if let Some(m) = self.metrics {
            t.push_str(&format!("\n[metrics]\nlisten = \"{m}\"\n"));
        }
        t
    }

    fn write_config(&self, c: &Conf) {
        self.write_raw(&self.toml(c));
    }

    fn write_raw(&self, text: &str) {
        // Write then rename, as an editor or config management would.
        let tmp = self.dir.path().join("turnstone.toml.new");
        std::fs::write(&tmp, text).expect("write config");
        std::fs::rename(&tmp, self.config_path()).expect("rename config");
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends a signal with kill(1) (the crate's nix has no `signal` feature).
    fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -{sig} failed");
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout.log")).unwrap_or_default()
    }

    /// Polls the stderr log until `pred` holds (panics after `timeout`).
    fn wait_log(&self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.stderr();
            if pred(&log) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "log never showed {what} within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Rewrites the config file, sends SIGHUP and waits until the server logged that it
    /// reloaded (`ok`) or refused the file.
    fn reload_raw(&self, text: &str, ok: bool) {
        let marker = if ok {
            "configuration reloaded"
        } else {
            "reload refused"
        };
        let before = self.stderr().matches(marker).count();
        self.write_raw(text);
        self.signal("HUP");
        self.wait_log(marker, Duration::from_secs(3), |l| {
            l.matches(marker).count() > before
        });
    }

    fn reload(&self, c: &Conf) {
        self.reload_raw(&self.toml(c), true);
    }

    /// Waits for the process to exit; None if it still runs after `timeout`.
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait_ready(&mut self) {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 1500];
        loop {
            if let Some(st) = self.wait_exit(Duration::ZERO) {
                panic!("turnstone exited before it was ready: {st}");
            }
            let tid = next_tid();
            let mut req = Vec::new();
            MessageWriter::new(&mut req, method::BINDING, Class::Request, tid).finish();
            let _ = sock.send_to(&req, self.addr);
            if let Ok((n, _)) = sock.recv_from(&mut buf) {
                if Message::parse(&buf[..n]).is_ok_and(|m| m.transaction_id() == tid) {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "turnstone not ready in 10 s");
        }
        // turnstone installs its SIGHUP/SIGTERM handlers only after it answers (and
        // after READY=1): a signal sent in between kills it. Wait until /proc shows
        // both caught (SigCgt bit 0 = SIGHUP, bit 14 = SIGTERM).
        let status = format!("/proc/{}/status", self.pid());
        loop {
            let caught = std::fs::read_to_string(&status)
                .ok()
                .and_then(|s| {
                    let line = s.lines().find(|l| l.starts_with("SigCgt:"))?;
                    u64::from_str_radix(line.trim_start_matches("SigCgt:").trim(), 16).ok()
                })
                .unwrap_or(0);
            if caught & (1 << 0) != 0 && caught & (1 << 14) != 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "SIGHUP/SIGTERM handlers not installed"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(m) = self.metrics {
            while TcpStream::connect_timeout(&m, Duration::from_millis(100)).is_err() {
                assert!(Instant::now() < deadline, "metrics endpoint not ready");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// GET `path` on the metrics endpoint: (status, body).
    fn http_get(&self, path: &str) -> (u16, String) {
        let addr = self.metrics.expect("started with metrics");
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read HTTP response");
        let status = out
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("bad HTTP response: {out:?}"));
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    fn metrics_text(&self) -> String {
        let (status, body) = self.http_get("/metrics");
        assert_eq!(status, 200, "/metrics: {body}");
        body
    }

    /// Polls /metrics until the sample `name{labels}` is at least `min` (≤ 3 s);
    /// returns its value.
    fn wait_metric(&self, name: &str, labels: &[(&str, &str)], min: f64) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let text = self.metrics_text();
            let v = sample(&text, name, labels).unwrap_or(-1.0);
            if v >= min {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{name}{labels:?} = {v}, want >= {min} within 3 s\n{text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Turnstone {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "----- turnstone {} config -----\n{}\n----- stderr -----\n{}\n----- end -----",
                self.addr,
                std::fs::read_to_string(self.config_path()).unwrap_or_default(),
                self.stderr()
            );
        }
    }
}

/// The value of the Prometheus sample `name{labels...}` (labels matched as a subset).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (n, rest) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if n != name {
            return None;
        }
        let all = labels
            .iter()
            .all(|(k, v)| rest.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
        if all {
            value.parse().ok()
        } else {
            None
        }
    })
}

// ---------------------------------------------------------------------------------------------
// A minimal TURN client over UDP
// ---------------------------------------------------------------------------------------------

fn next_tid() -> TransactionId {
    let n = TID.fetch_add(1, Ordering::Relaxed);
    let mut t = [0x5Au8; 12];
    t[..4].copy_from_slice(&std::process::id().to_be_bytes());
    t[8..].copy_from_slice(&n.to_be_bytes());
    TransactionId(t)
}

fn udp_socket() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let r = socket2::SockRef::from(&s);
    let _ = r.set_recv_buffer_size(4 << 20);
    let _ = r.set_send_buffer_size(4 << 20);
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    s
}

fn error_code(resp: &[u8]) -> Option<u16> {
    Message::parse(resp)
        .ok()?
        .error_code()
        .ok()?
        .map(|(c, _)| c)
}

struct Client {
    sock: UdpSocket,
    server: SocketAddr,
    user: String,
    key: [u8; 16],
    nonce: String,
}

impl Client {
    fn new(server: SocketAddr, user: &str, password: &str) -> Client {
        Client {
            sock: udp_socket(),
            server,
            user: user.into(),
            key: long_term_key(user, REALM, password),
            nonce: String::new(),
        }
    }

    /// One request (with credentials once a nonce is known); the response, skipping
    /// relayed data and stray answers. Resent every 500 ms, for at most 3 s.
    fn request(&mut self, m: u16, attrs: &dyn Fn(&mut MessageWriter<'_>)) -> Vec<u8> {
        let tid = next_tid();
        let mut req = Vec::new();
        let mut w = MessageWriter::new(&mut req, m, Class::Request, tid);
        attrs(&mut w);
        if !self.nonce.is_empty() {
            w.attr(attr::USERNAME, self.user.as_bytes());
            w.attr(attr::REALM, REALM.as_bytes());
            w.attr(attr::NONCE, self.nonce.as_bytes());
            w.message_integrity(&self.key);
        }
        w.finish();
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut buf = vec![0u8; 2048];
        while Instant::now() < deadline {
            self.sock.send_to(&req, self.server).expect("send");
            let resend = Instant::now() + Duration::from_millis(500);
            while Instant::now() < resend {
                let Ok((n, from)) = self.sock.recv_from(&mut buf) else {
                    continue;
                };
                if from != self.server || proto::is_channel_data(buf[0]) {
                    continue;
                }
                if Message::parse(&buf[..n]).is_ok_and(|r| r.transaction_id() == tid) {
                    return buf[..n].to_vec();
                }
            }
        }
        panic!(
            "no answer in 3 s to method {m:#x} from {} (user {}, client {:?}, nonce {:?})",
            self.server,
            self.user,
            self.sock.local_addr(),
            self.nonce
        );
    }

    /// A request, retried once after a challenge (401 while we had no nonce) or a
    /// 438; returns the final response, success or not.
    fn transact(&mut self, m: u16, attrs: &dyn Fn(&mut MessageWriter<'_>)) -> Vec<u8> {
        let had_nonce = !self.nonce.is_empty();
        let resp = self.request(m, attrs);
        let code = error_code(&resp);
        if code == Some(438) || (code == Some(401) && !had_nonce) {
            let msg = Message::parse(&resp).unwrap();
            self.nonce = msg.nonce().unwrap().expect("NONCE in challenge").into();
            return self.request(m, attrs);
        }
        resp
    }

    fn ok(&mut self, m: u16, attrs: &dyn Fn(&mut MessageWriter<'_>)) -> Vec<u8> {
        let resp = self.transact(m, attrs);
        let msg = Message::parse(&resp).unwrap();
        assert_eq!(
            msg.class(),
            Class::Success,
            "{} method {m:#x}: {:?}",
            self.user,
            msg.error_code()
        );
        resp
    }

    fn try_allocate(&mut self) -> Vec<u8> {
        self.transact(method::ALLOCATE, &|w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        })
    }

    fn allocate(&mut self) -> SocketAddr {
        let resp = self.ok(method::ALLOCATE, &|w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        });
        Message::parse(&resp)
            .unwrap()
            .xor_address(attr::XOR_RELAYED_ADDRESS)
            .unwrap()
            .expect("XOR-RELAYED-ADDRESS")
    }

    fn bind(&mut self, channel: u16, peer: SocketAddr) {
        self.ok(method::CHANNEL_BIND, &|w| {
            w.attr(
                attr::CHANNEL_NUMBER,
                &[(channel >> 8) as u8, channel as u8, 0, 0],
            );
            w.xor_address(attr::XOR_PEER_ADDRESS, peer);
        });
    }

    fn refresh(&mut self, lifetime: u32) -> Vec<u8> {
        self.transact(method::REFRESH, &|w| {
            w.u32_attr(attr::LIFETIME, lifetime);
        })
    }
}

fn channel_data(channel: u16, seq: u32, len: usize) -> Vec<u8> {
    let mut v = vec![
        (channel >> 8) as u8,
        channel as u8,
        (len >> 8) as u8,
        len as u8,
    ];
    v.extend_from_slice(&seq.to_be_bytes());
    v.resize(4 + len, 0x5A);
    v
}

/// A UDP peer on 127.0.0.1 that echoes (or just counts) what it receives, until dropped.
struct Peer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    bytes: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Peer {
    fn start(echo: bool) -> Peer {
        let sock = udp_socket();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let bytes = Arc::new(AtomicU64::new(0));
        let (s, b) = (stop.clone(), bytes.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    b.fetch_add(n as u64, Ordering::Relaxed);
                    if echo {
                        let _ = sock.send_to(&buf[..n], from);
                    }
                }
            }
        });
        Peer {
            addr,
            stop,
            bytes,
            thread: Some(thread),
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends `count` ChannelData packets (sequence numbers `first..first+count`, 100-byte
/// payload) at `per_ms` packets per millisecond through the client's channel to an
/// echo peer; returns how many distinct sequence numbers came back (waiting up to 2 s
/// after the last send). `during` runs on another thread while the stream flows.
fn echo_stream(
    c: &Client,
    first: u32,
    count: u32,
    per_ms: u32,
    during: impl FnOnce() + Send,
) -> u32 {
    let rx = c.sock.try_clone().unwrap();
    let server = c.server;
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
                let Some(seq) = payload
                    .get(..4)
                    .map(|b| u32::from_be_bytes(b.try_into().unwrap()))
                else {
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
        let start = Instant::now();
        let mut tick = 0u64;
        let mut seq = first;
        while seq < first + count {
            for _ in 0..per_ms {
                if seq == first + count {
                    break;
                }
                c.sock
                    .send_to(&channel_data(CHANNEL, seq, 100), server)
                    .unwrap();
                seq += 1;
            }
            tick += 1;
            if let Some(wait) =
                (start + Duration::from_millis(tick)).checked_duration_since(Instant::now())
            {
                std::thread::sleep(wait);
            }
        }
        side.join().expect("side thread");
        receiver.join().expect("receiver")
    })
}

/// A client of `srv` with an allocation and channel `CHANNEL` bound to `peer`.
fn relaying_client(srv: &Turnstone, user: &str, password: &str, peer: &Peer) -> Client {
    let mut c = Client::new(srv.addr, user, password);
    c.allocate();
    c.bind(CHANNEL, peer.addr);
    c
}

// ---------------------------------------------------------------------------------------------
// SIGHUP: reload
// ---------------------------------------------------------------------------------------------

#[test]
fn reload_while_relaying_loses_nothing() {
    let mut conf = Conf::new(&[("alice", "alice-pw-1")]);
    let srv = Turnstone::start(&conf);
    let peer = Peer::start(true);
    let mut c = relaying_client(&srv, "alice", "alice-pw-1", &peer);

    // 3,000 packets at 1,000/s, echoed back; three reloads at 0.6, 1.4 and 2.2 s, each
    // adding a user (so that each one really changes the running configuration).
    const N: u32 = 3000;
    let confs: Vec<Conf> = (1..=3)
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
    c.ok(method::REFRESH, &|w| {
        w.u32_attr(attr::LIFETIME, 600);
    });
    Client::new(srv.addr, "user3", "user3-pw").allocate();
}

#[test]
fn reload_removing_a_user() {
    let mut conf = Conf::new(&[("alice", "alice-pw-2"), ("bob", "bob-pw-2")]);
    let srv = Turnstone::start(&conf);
    let peer = Peer::start(true);
    let mut bob = relaying_client(&srv, "bob", "bob-pw-2", &peer);
    assert_eq!(echo_stream(&bob, 0, 50, 1, || {}), 50);

    conf.users.retain(|(u, _)| u != "bob");
    srv.reload(&conf);

    // A new allocation for bob: 401 (even with the right password).
    let mut bob2 = Client::new(srv.addr, "bob", "bob-pw-2");
    let resp = bob2.try_allocate();
    assert_eq!(error_code(&resp), Some(401), "bob allocates after removal");
    assert!(!bob2.nonce.is_empty(), "the retry carried credentials");
    // Bob's running allocation: its Refresh fails authentication...
    assert_eq!(error_code(&bob.refresh(600)), Some(401), "bob refreshes");
    // ...but it keeps relaying until it expires.
    assert_eq!(echo_stream(&bob, 50, 200, 1, || {}), 200);
    // Alice is unaffected.
    Client::new(srv.addr, "alice", "alice-pw-2").allocate();
}

#[test]
fn reload_adding_a_secret_works_at_once() {
    let mut conf = Conf::new(&[]);
    conf.secrets = vec!["old-secret-0123456789".into()];
    let srv = Turnstone::start(&conf);
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
    Client::new(srv.addr, &user, &old_pass).allocate();
    let resp = Client::new(srv.addr, &user, &pass).try_allocate();
    assert_eq!(error_code(&resp), Some(401), "new secret before reload");

    conf.secrets.push(new_secret.into());
    let written = srv.toml(&conf);
    srv.write_raw(&written);
    srv.signal("HUP");
    let sent = Instant::now();
    loop {
        let mut c = Client::new(srv.addr, &user, &pass);
        if Message::parse(&c.try_allocate()).unwrap().class() == Class::Success {
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
    let conf = Conf::new(&[("alice", "alice-pw-4")]);
    let srv = Turnstone::start(&conf);
    let peer = Peer::start(true);
    let c = relaying_client(&srv, "alice", "alice-pw-4", &peer);

    // Bad file 1: empty realm, and alice replaced by carol.
    let mut bad = conf.clone();
    bad.realm = String::new();
    bad.users = vec![("carol".into(), "carol-pw-4".into())];
    srv.reload_raw(&srv.toml(&bad), false);
    // Bad file 2: a valid realm but an unknown key, and carol again.
    let mut bad2 = conf.clone();
    bad2.users = vec![("carol".into(), "carol-pw-4".into())];
    bad2.limits = "frobnicate = 2".into();
    srv.reload_raw(&srv.toml(&bad2), false);

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
    let mut a = Client::new(srv.addr, "alice", "alice-pw-4");
    a.allocate();
    let resp = Client::new(srv.addr, "carol", "carol-pw-4").try_allocate();
    assert_eq!(error_code(&resp), Some(401), "carol from the refused file");
    let challenge = Client::new(srv.addr, "x", "y").request(method::ALLOCATE, &|w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    });
    assert_eq!(
        Message::parse(&challenge).unwrap().realm().unwrap(),
        Some(REALM)
    );
    assert_eq!(echo_stream(&c, 0, 100, 1, || {}), 100);
}

// ---------------------------------------------------------------------------------------------
// SIGTERM: drain
// ---------------------------------------------------------------------------------------------

#[test]
fn drain_with_alternate_server() {
    let mut conf = Conf::new(&[("alice", "alice-pw-5")]);
    conf.server = "alternate_servers = [\"127.0.0.1:3999\"]".into();
    conf.metrics = true;
    let mut srv = Turnstone::start(&conf);
    assert_eq!(srv.http_get("/health").0, 200);
    let peer = Peer::start(true);
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
    let mut other = Client::new(srv.addr, "alice", "alice-pw-5");
    let resp = other.try_allocate();
    let msg = Message::parse(&resp).unwrap();
    assert_eq!(error_code(&resp), Some(300), "{:?}", msg.error_code());
    let alt =
        proto::decode_address(msg.get(attr::ALTERNATE_SERVER).expect("ALTERNATE-SERVER")).unwrap();
    assert_eq!(alt, "127.0.0.1:3999".parse().unwrap());
    assert!(
        msg.verify_integrity(&other.key),
        "300 carries MESSAGE-INTEGRITY"
    );

    // The live allocation keeps relaying, and refreshing.
    assert_eq!(echo_stream(&c, 0, 200, 1, || {}), 200);
    c.ok(method::REFRESH, &|w| {
        w.u32_attr(attr::LIFETIME, 600);
    });
    assert!(srv.wait_exit(Duration::ZERO).is_none(), "exited too early");

    // Its end ends the drain.
    let deleted = Instant::now();
    let resp = c.refresh(0);
    assert_eq!(Message::parse(&resp).unwrap().class(), Class::Success);
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
    let mut conf = Conf::new(&[("alice", "alice-pw-6")]);
    conf.server = "drain_timeout = \"2s\"".into();
    let mut srv = Turnstone::start(&conf);
    let peer = Peer::start(true);
    let c = relaying_client(&srv, "alice", "alice-pw-6", &peer);

    srv.signal("TERM");
    let term = Instant::now();
    srv.wait_log("draining", Duration::from_secs(2), |l| {
        l.contains("draining")
    });
    let resp = Client::new(srv.addr, "alice", "alice-pw-6").try_allocate();
    assert_eq!(error_code(&resp), Some(508));
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
    let mut conf = Conf::new(&[(user, "metrics-pw-7")]);
    conf.metrics = true;
    let srv = Turnstone::start(&conf);
    let (status, body) = srv.http_get("/health");
    assert_eq!((status, body.trim()), (200, "ok"));
    let text = srv.metrics_text();
    for f in FAMILIES {
        assert!(
            text.lines().any(|l| l.starts_with(f)),
            "/metrics lacks {f}:\n{text}"
        );
    }

    let peer = Peer::start(true);
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
    let mut conf = Conf::new(&[("alice", "alice-pw-8")]);
    conf.limits = "max_bandwidth_per_allocation = \"20KB\"".into();
    conf.metrics = true;
    let srv = Turnstone::start(&conf);
    let peer = Peer::start(false);
    let c = relaying_client(&srv, "alice", "alice-pw-8", &peer);

    // 1,000 packets of 100 bytes in 1 s: 100 KB offered at 100 KB/s.
    let start = Instant::now();
    for seq in 0..1000u32 {
        c.sock
            .send_to(&channel_data(CHANNEL, seq, 100), srv.addr)
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
    let socks: Vec<UdpSocket> = (0..sockets).map(|_| udp_socket()).collect();
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
            let mut w = MessageWriter::new(&mut req, method::ALLOCATE, Class::Request, next_tid());
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
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
        let mut conf = Conf::new(&[("alice", "alice-pw-9")]);
        if let Some(r) = rate {
            conf.limits = format!("unauthenticated_rate = {r}");
        }
        conf.metrics = rate == Some(50);
        let srv = Turnstone::start(&conf);
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
    let mut conf = Conf::new(&[("alice", LOG_PASSWORD)]);
    conf.log_format = format;
    conf.secrets = vec!["log-secret-abcdef".into()];
    let srv = Turnstone::start(&conf);
    let peer = Peer::start(true);
    let mut c = relaying_client(&srv, "alice", LOG_PASSWORD, &peer);
    assert_eq!(echo_stream(&c, 0, 10, 1, || {}), 10);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        Message::parse(&c.refresh(0)).unwrap().class(),
        Class::Success
    );
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
