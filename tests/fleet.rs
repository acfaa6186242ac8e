//! A fleet of turnstone nodes sharing a Redis store (issue 8), against the real binary
//! and a real `redis-server` (Debian package `redis-server`), all on 127.0.0.1:
//!
//! - a user added with `turnstone users add` allocates on all three nodes within a
//!   second; `turnstone sessions` lists the allocations of every node; removing the user
//!   ends its allocations on all three (relay ports close; after re-adding, a Refresh on
//!   the old allocation gets 437);
//! - `max_allocations_per_user` holds across nodes, counts fall when allocations end,
//!   and revocation ends allocations and refuses new ones;
//! - with Redis killed, nodes keep relaying, authenticate cached users for new
//!   allocations and report `turnstone_store_up 0`; an empty Redis (restarted without
//!   persistence) does not wipe the cache; a change made while the nodes were
//!   disconnected arrives when Redis comes back;
//! - above `redirect_above`, 300 Try Alternate names the least-loaded node;
//!   `turnstone sessions kill --user` ends a user's allocations on every node.
//!
//! Timings are printed (`cargo test --test fleet -- --nocapture`). The tests run one at a
//! time (a lock): each starts a Redis and three nodes.

mod common;

use common::{free_tcp_port, free_udp_port};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use turnstone::auth::long_term_key;
use turnstone::proto::{self, attr, method, Class, Message, MessageWriter, TransactionId};

const REALM: &str = "fleet.test";
/// Relay ports for this file: above the kernel's ephemeral range and the ranges of the
/// other test files (operations.rs uses 61000-64999).
const RELAY_BASE: u32 = 65_000;
const RELAY_WIDTH: u32 = 100;
const RELAY_SLOTS: u32 = 5;

static SERIAL: Mutex<()> = Mutex::new(());
static INSTANCE: AtomicU32 = AtomicU32::new(0);
static TID: AtomicU32 = AtomicU32::new(1);

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Polls `f` every 10 ms until it gives Some (panics with `what` after `timeout`).
fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------
// redis-server
// ---------------------------------------------------------------------------------------------

/// A `redis-server` on 127.0.0.1 without automatic persistence; `dir` holds the
/// dump.rdb that an explicit SAVE writes and a restart in the same dir loads.
struct Redis {
    child: Option<Child>,
    port: u16,
}

impl Redis {
    fn start(port: u16, dir: &Path) -> Redis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .args(["--dbfilename", "dump.rdb"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run redis-server ({e}); the fleet tests need it: \
                     sudo apt-get install -y redis-server"
                )
            });
        let mut r = Redis {
            child: Some(child),
            port,
        };
        wait_for("redis-server answers PING", Duration::from_secs(10), || {
            if let Some(st) = r.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("redis-server exited at start: {st}");
            }
            let mut con = r.try_con()?;
            redis::cmd("PING").query::<String>(&mut con).ok()
        });
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn try_con(&self) -> Option<redis::Connection> {
        let c = redis::Client::open(self.url()).ok()?;
        let con = c
            .get_connection_with_timeout(Duration::from_millis(500))
            .ok()?;
        con.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        Some(con)
    }

    fn con(&self) -> redis::Connection {
        self.try_con().expect("connect to redis")
    }

    fn save(&self) {
        let _: String = redis::cmd("SAVE").query(&mut self.con()).expect("SAVE");
    }

    /// SIGKILL: no goodbye to the clients, no save.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// turnstone nodes
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Default)]
struct NodeConf {
    id: &'static str,
    max_per_user: Option<usize>,
    redirect_above: Option<usize>,
}

struct Node {
    child: Option<Child>,
    dir: tempfile::TempDir,
    id: &'static str,
    addr: SocketAddr,
    metrics: SocketAddr,
}

impl Node {
    fn start(conf: &NodeConf, store_url: &str) -> Node {
        let dir = tempfile::Builder::new()
            .prefix("turnstone-fleet-")
            .tempdir()
            .expect("temp dir");
        let n = INSTANCE.fetch_add(1, Ordering::Relaxed) % RELAY_SLOTS;
        let low = RELAY_BASE + n * RELAY_WIDTH;
        let addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
        let mut limits = String::new();
        if let Some(m) = conf.max_per_user {
            limits.push_str(&format!("max_allocations_per_user = {m}\n"));
        }
        if let Some(r) = conf.redirect_above {
            limits.push_str(&format!("redirect_above = {r}\n"));
        }
        let toml = format!(
            r#"[server]
realm = "{REALM}"
workers = 1
drain_timeout = "0s"

[[listen]]
transport = "udp"
address = "{addr}"

[relay]
address = "127.0.0.1"
ports = "{low}-{high}"

[auth]
users = {{ local = "node-local-only" }}

[policy]
allow_peers = ["127.0.0.0/8"]

[limits]
{limits}
[metrics]
listen = "{metrics}"

[store]
url = "{store_url}"
node_id = "{id}"
advertise = "{addr}"
"#,
            high = low + RELAY_WIDTH - 1,
            id = conf.id,
        );
        let path = dir.path().join("turnstone.toml");
        std::fs::write(&path, toml).expect("write config");
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).expect("stderr");
        let child = Command::new(env!("CARGO_BIN_EXE_turnstone"))
            .arg("--config")
            .arg(&path)
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start turnstone");
        let mut node = Node {
            child: Some(child),
            dir,
            id: conf.id,
            addr,
            metrics,
        };
        node.wait_ready();
        node
    }

    fn wait_ready(&mut self) {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let mut buf = [0u8; 1500];
        let addr = self.addr;
        let child = &mut self.child;
        wait_for("turnstone answers", Duration::from_secs(10), || {
            if let Some(st) = child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("turnstone exited before it was ready: {st}");
            }
            let tid = next_tid();
            let mut req = Vec::new();
            MessageWriter::new(&mut req, method::BINDING, Class::Request, tid).finish();
            let _ = sock.send_to(&req, addr);
            let (n, _) = sock.recv_from(&mut buf).ok()?;
            Message::parse(&buf[..n])
                .is_ok_and(|m| m.transaction_id() == tid)
                .then_some(())
        });
        let m = self.metrics;
        wait_for("metrics endpoint", Duration::from_secs(10), || {
            TcpStream::connect_timeout(&m, Duration::from_millis(100)).ok()
        });
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    fn metric(&self, name: &str) -> Option<f64> {
        let mut s = TcpStream::connect_timeout(&self.metrics, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        text.lines().find_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            (series == name).then(|| value.parse().ok())?
        })
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "----- node {} ({}) stderr -----\n{}\n----- end -----",
                self.id,
                self.addr,
                self.stderr()
            );
        }
    }
}

fn three_nodes(redis: &Redis, confs: [NodeConf; 3]) -> [Node; 3] {
    confs.map(|c| Node::start(&c, &redis.url()))
}

fn conf(id: &'static str) -> NodeConf {
    NodeConf {
        id,
        ..NodeConf::default()
    }
}

/// Runs `turnstone ARGS`; its standard output (panics unless it succeeds).
fn cli(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_turnstone"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run turnstone");
    assert!(
        out.status.success(),
        "turnstone {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn add_user(url: &str, name: &str, password: &str) {
    cli(&[
        "users",
        "add",
        name,
        "--password",
        password,
        "--realm",
        REALM,
        "--store",
        url,
    ]);
}

// ---------------------------------------------------------------------------------------------
// A minimal TURN client over UDP (as in tests/operations.rs)
// ---------------------------------------------------------------------------------------------

fn next_tid() -> TransactionId {
    let n = TID.fetch_add(1, Ordering::Relaxed);
    let mut t = [0x3Cu8; 12];
    t[..4].copy_from_slice(&std::process::id().to_be_bytes());
    t[8..].copy_from_slice(&n.to_be_bytes());
    TransactionId(t)
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
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        Client {
            sock,
            server,
            user: user.into(),
            key: long_term_key(user, REALM, password),
            nonce: String::new(),
        }
    }

    /// One request (with credentials once a nonce is known); the response, skipping
    /// relayed data. Resent every 300 ms, for at most 3 s.
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
            let resend = Instant::now() + Duration::from_millis(300);
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
            "no answer in 3 s to method {m:#x} from {} (user {})",
            self.server, self.user
        );
    }

    /// A request, retried once after a challenge (401 without a nonce) or a 438.
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
            "{} at {}: method {m:#x}: {:?}",
            self.user,
            self.server,
            msg.error_code()
        );
        resp
    }

    fn try_allocate(&mut self) -> Vec<u8> {
        self.transact(method::ALLOCATE, &|w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        })
    }

    fn relayed_address(resp: &[u8]) -> Option<SocketAddr> {
        Message::parse(resp)
            .ok()?
            .xor_address(attr::XOR_RELAYED_ADDRESS)
            .ok()?
    }

    fn allocate(&mut self) -> SocketAddr {
        let resp = self.ok(method::ALLOCATE, &|w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        });
        Client::relayed_address(&resp).expect("XOR-RELAYED-ADDRESS")
    }

    fn permit(&mut self, peer: SocketAddr) {
        self.ok(method::CREATE_PERMISSION, &|w| {
            w.xor_address(attr::XOR_PEER_ADDRESS, peer);
        });
    }

    fn refresh(&mut self, lifetime: u32) -> Vec<u8> {
        self.transact(method::REFRESH, &|w| {
            w.u32_attr(attr::LIFETIME, lifetime);
        })
    }

    /// Did a Data indication carrying `payload` arrive within `within`?
    fn receives(&self, payload: &[u8], within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut buf = vec![0u8; 2048];
        while Instant::now() < deadline {
            let Ok((n, _)) = self.sock.recv_from(&mut buf) else {
                continue;
            };
            let Ok(msg) = Message::parse(&buf[..n]) else {
                continue;
            };
            if msg.method() == method::DATA && msg.data() == Some(payload) {
                return true;
            }
        }
        false
    }
}

/// A peer socket connected to one relay address: relays data to the client, and tells
/// when the relay port has closed (ICMP port unreachable: the next recv is refused).
struct Peer {
    sock: UdpSocket,
}

impl Peer {
    fn new() -> Peer {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .expect("timeout");
        Peer { sock }
    }

    fn addr(&self) -> SocketAddr {
        self.sock.local_addr().expect("local_addr")
    }

    /// Sends `payload` from this peer to `relay`; the client must receive it.
    fn relays_to(&self, relay: SocketAddr, client: &Client, payload: &[u8]) -> bool {
        (0..3).any(|_| {
            let _ = self.sock.send_to(payload, relay);
            client.receives(payload, Duration::from_millis(300))
        })
    }

    /// Is the relay port closed (nothing bound to it any more)?
    fn relay_closed(&self, relay: SocketAddr) -> bool {
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(20)))
            .expect("timeout");
        s.connect(relay).expect("connect");
        let _ = s.send(b"probe");
        let mut buf = [0u8; 64];
        matches!(s.recv(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
    }
}

/// A client of `node` for `user` with an allocation that relays from `peer`.
fn relaying(node: &Node, user: &str, password: &str, peer: &Peer) -> (Client, SocketAddr) {
    let mut c = Client::new(node.addr, user, password);
    let relay = c.allocate();
    c.permit(peer.addr());
    assert!(
        peer.relays_to(relay, &c, b"hello through the relay"),
        "{} does not relay for {user}",
        node.id
    );
    (c, relay)
}

/// Waits until every relay port is closed; how long that took for each.
fn wait_closed(peer: &Peer, relays: &[SocketAddr], timeout: Duration) -> Vec<Duration> {
    let t0 = Instant::now();
    let mut when = vec![None; relays.len()];
    wait_for("allocations ended", timeout, || {
        for (w, r) in when.iter_mut().zip(relays) {
            if w.is_none() && peer.relay_closed(*r) {
                *w = Some(t0.elapsed());
            }
        }
        when.iter().all(Option::is_some).then_some(())
    });
    when.into_iter().map(|w| w.unwrap_or_default()).collect()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn users_added_and_removed_reach_every_node() {
    let _serial = serial();
    let rdir = tempfile::tempdir().unwrap();
    let redis = Redis::start(free_tcp_port(), rdir.path());
    let url = redis.url();
    let nodes = three_nodes(&redis, [conf("a"), conf("b"), conf("c")]);

    // Unknown before it is added.
    let mut probe = Client::new(nodes[0].addr, "bob", "bob-pw");
    assert_eq!(error_code(&probe.try_allocate()), Some(401));

    add_user(&url, "bob", "bob-pw");
    let t0 = Instant::now();
    let mut clients: Vec<Client> = nodes
        .iter()
        .map(|n| Client::new(n.addr, "bob", "bob-pw"))
        .collect();
    let mut relays = Vec::new();
    let mut latency = Vec::new();
    for c in &mut clients {
        let relay = wait_for("bob allocates", Duration::from_secs(3), || {
            Client::relayed_address(&c.try_allocate())
        });
        latency.push(t0.elapsed());
        relays.push(relay);
    }
    eprintln!("fleet: users add -> first allocation on a, b, c after {latency:?}");
    assert!(
        latency.iter().all(|l| *l < Duration::from_secs(1)),
        "not every node within a second: {latency:?}"
    );
    assert!(cli(&["users", "list", "--store", &url])
        .lines()
        .any(|l| l == "bob"));

    let peer = Peer::new();
    for (c, r) in clients.iter_mut().zip(&relays) {
        c.permit(peer.addr());
        assert!(peer.relays_to(*r, c, b"before removal"));
    }

    // The session registry lists bob's allocation on each node.
    let table = wait_for(
        "sessions of all three nodes",
        Duration::from_secs(3),
        || {
            let t = cli(&["sessions", "--store", &url]);
            nodes
                .iter()
                .zip(&relays)
                .all(|(n, r)| {
                    t.lines().any(|l| {
                        let cols: Vec<&str> = l.split_whitespace().collect();
                        cols.first() == Some(&n.id)
                            && cols.get(2) == Some(&"bob")
                            && cols.get(5) == Some(&r.to_string().as_str())
                    })
                })
                .then_some(t)
        },
    );
    eprintln!("fleet: turnstone sessions:\n{table}");
    assert!(table.contains("3 session(s)"), "{table}");

    cli(&["users", "remove", "bob", "--store", &url]);
    let closed = wait_closed(&peer, &relays, Duration::from_secs(3));
    eprintln!("fleet: users remove -> relay closed on a, b, c after {closed:?}");
    assert!(
        closed.iter().all(|d| *d < Duration::from_millis(2500)),
        "{closed:?}"
    );
    for n in &nodes {
        let mut c = Client::new(n.addr, "bob", "bob-pw");
        assert_eq!(error_code(&c.try_allocate()), Some(401), "node {}", n.id);
    }
    // Back with the same password: the old allocations are gone (437 on Refresh).
    add_user(&url, "bob", "bob-pw");
    for (c, n) in clients.iter_mut().zip(&nodes) {
        let code = wait_for(
            "bob authenticates again",
            Duration::from_secs(2),
            || match error_code(&c.refresh(600)) {
                Some(401) => None,
                other => Some(other),
            },
        );
        assert_eq!(
            code,
            Some(437),
            "Refresh of a removed allocation on {}",
            n.id
        );
    }
}

#[test]
fn fleet_quota_and_revocation() {
    let _serial = serial();
    let rdir = tempfile::tempdir().unwrap();
    let redis = Redis::start(free_tcp_port(), rdir.path());
    let url = redis.url();
    let q = |id| NodeConf {
        id,
        max_per_user: Some(2),
        ..NodeConf::default()
    };
    let [a, b, c] = three_nodes(&redis, [q("a"), q("b"), q("c")]);
    add_user(&url, "carol", "carol-pw");

    // The new user reaches each node through the store's pub/sub, within milliseconds
    // but not at once: a 401 before that is expected, so allocate when known.
    let known = |c: &mut Client| {
        wait_for("carol known to the node", Duration::from_secs(3), || {
            Client::relayed_address(&c.try_allocate())
        })
    };
    let mut on_a = Client::new(a.addr, "carol", "carol-pw");
    known(&mut on_a);
    let t0 = Instant::now();
    let mut on_b = Client::new(b.addr, "carol", "carol-pw");
    let relay_b = known(&mut on_b);
    // Both counts in the store, then one more heartbeat for c to read them.
    let mut con = redis.con();
    wait_for(
        "a and b publish carol's counts",
        Duration::from_secs(3),
        || {
            ["a", "b"]
                .iter()
                .all(|id| {
                    redis::cmd("HGET")
                        .arg(format!("turnstone:usercount:{id}"))
                        .arg("carol")
                        .query::<Option<usize>>(&mut con)
                        .ok()
                        .flatten()
                        == Some(1)
                })
                .then_some(())
        },
    );
    eprintln!(
        "fleet: counts of a and b in the store {:?} after b's allocation",
        t0.elapsed()
    );
    std::thread::sleep(Duration::from_millis(1300));
    let mut on_c = Client::new(c.addr, "carol", "carol-pw");
    assert_eq!(
        error_code(&on_c.try_allocate()),
        Some(486),
        "third allocation of carol in the fleet (quota 2)"
    );

    // a's allocation ends: c may allocate once the count has gone.
    assert_eq!(
        Message::parse(&on_a.refresh(0)).unwrap().class(),
        Class::Success
    );
    let t0 = Instant::now();
    wait_for(
        "c allocates after a's ended",
        Duration::from_secs(4),
        || Client::relayed_address(&on_c.try_allocate()),
    );
    eprintln!(
        "fleet: quota slot freed on a usable on c after {:?}",
        t0.elapsed()
    );

    // Revocation ends carol's allocations everywhere and refuses new ones.
    let peer = Peer::new();
    on_b.permit(peer.addr());
    assert!(peer.relays_to(relay_b, &on_b, b"before revocation"));
    cli(&["users", "revoke", "carol", "--store", &url]);
    let closed = wait_closed(&peer, &[relay_b], Duration::from_secs(3));
    eprintln!("fleet: users revoke -> relay closed after {closed:?}");
    let mut again = Client::new(a.addr, "carol", "carol-pw");
    assert_eq!(error_code(&again.try_allocate()), Some(401));
    assert!(cli(&["users", "list", "--store", &url]).contains("carol\t(revoked)"));
    cli(&["users", "unrevoke", "carol", "--store", &url]);
    wait_for(
        "carol allocates after unrevoke",
        Duration::from_secs(2),
        || Client::relayed_address(&again.try_allocate()),
    );
}

#[test]
fn redis_outage_keeps_nodes_serving_and_resyncs() {
    let _serial = serial();
    let rdir = tempfile::tempdir().unwrap();
    let port = free_tcp_port();
    let mut redis = Redis::start(port, rdir.path());
    let url = redis.url();
    let [a, b, _c] = three_nodes(&redis, [conf("a"), conf("b"), conf("c")]);
    add_user(&url, "dave", "dave-pw");
    add_user(&url, "erin", "erin-pw");
    let peer = Peer::new();
    let (mut dave, relay) = wait_for("dave relays on a", Duration::from_secs(2), || {
        let mut c = Client::new(a.addr, "dave", "dave-pw");
        let r = Client::relayed_address(&c.try_allocate())?;
        c.permit(peer.addr());
        Some((c, r))
    });
    assert!(peer.relays_to(relay, &dave, b"before the outage"));
    assert_eq!(a.metric("turnstone_store_up"), Some(1.0));

    // Redis dies (SIGKILL).
    redis.save();
    redis.kill();
    let t0 = Instant::now();
    wait_for("a reports the store down", Duration::from_secs(3), || {
        (a.metric("turnstone_store_up") == Some(0.0)).then_some(())
    });
    eprintln!("fleet: store_up 0 on a {:?} after redis died", t0.elapsed());
    assert!(
        a.stderr().contains("fleet store unreachable"),
        "{}",
        a.stderr()
    );
    assert_eq!(
        a.stderr().matches("fleet store unreachable").count(),
        1,
        "warned once"
    );
    // Keeps relaying, refreshing, and authenticating cached users for new allocations.
    for i in 0..3 {
        assert!(
            peer.relays_to(relay, &dave, format!("during the outage {i}").as_bytes()),
            "a stopped relaying without redis"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        Message::parse(&dave.refresh(600)).unwrap().class(),
        Class::Success
    );
    relaying(&b, "erin", "erin-pw", &peer);

    // Redis comes back empty (no persistence): the nodes keep their cached users.
    let empty = tempfile::tempdir().unwrap();
    let redis_empty = Redis::start(port, empty.path());
    let t0 = Instant::now();
    wait_for("a reconnects", Duration::from_secs(8), || {
        (a.metric("turnstone_store_up") == Some(1.0)).then_some(())
    });
    eprintln!(
        "fleet: a reconnected {:?} after redis restarted",
        t0.elapsed()
    );
    assert!(a.stderr().contains("keeping the cached users"));
    relaying(&a, "dave", "dave-pw", &peer);
    drop(redis_empty);

    // A change made while the nodes are disconnected: frank is added to a copy of the
    // store (a Redis on another port from the saved dump), then Redis is back on the
    // nodes' port with that data; no pub/sub event reached the nodes.
    {
        let side = Redis::start(free_tcp_port(), rdir.path());
        add_user(&side.url(), "frank", "frank-pw");
        side.save();
    }
    let mut frank_a = Client::new(a.addr, "frank", "frank-pw");
    assert_eq!(error_code(&frank_a.try_allocate()), Some(401));
    let back = Redis::start(port, rdir.path());
    let t0 = Instant::now();
    for n in [&a, &b] {
        let mut f = Client::new(n.addr, "frank", "frank-pw");
        wait_for(
            "frank arrives after the restart",
            Duration::from_secs(10),
            || Client::relayed_address(&f.try_allocate()),
        );
    }
    eprintln!(
        "fleet: change made meanwhile usable on a and b {:?} after redis came back",
        t0.elapsed()
    );
    assert!(a.stderr().contains("fleet store reachable again"));
    // The allocation made before the outage relayed throughout.
    assert!(peer.relays_to(relay, &dave, b"after the outage"));
    drop(back);
}

#[test]
fn redirect_names_least_loaded_node_and_kill_ends_sessions() {
    let _serial = serial();
    let rdir = tempfile::tempdir().unwrap();
    let redis = Redis::start(free_tcp_port(), rdir.path());
    let url = redis.url();
    let [a, b, c] = three_nodes(
        &redis,
        [
            NodeConf {
                id: "a",
                redirect_above: Some(1),
                ..NodeConf::default()
            },
            conf("b"),
            conf("c"),
        ],
    );
    add_user(&url, "gina", "gina-pw");
    let peer = Peer::new();
    let (_ga, relay_a) = wait_for("gina relays on a", Duration::from_secs(2), || {
        let mut cl = Client::new(a.addr, "gina", "gina-pw");
        let r = Client::relayed_address(&cl.try_allocate())?;
        cl.permit(peer.addr());
        Some((cl, r))
    });
    let (_gb1, relay_b1) = relaying(&b, "gina", "gina-pw", &peer);
    let (_gb2, relay_b2) = relaying(&b, "gina", "gina-pw", &peer);
    // a (1 allocation) knows b (2) and c (0) from the registry.
    let mut con = redis.con();
    wait_for("b's load in the store", Duration::from_secs(3), || {
        (redis::cmd("HGET")
            .arg("turnstone:node:b")
            .arg("allocations")
            .query::<Option<usize>>(&mut con)
            .ok()
            .flatten()
            == Some(2))
        .then_some(())
    });
    std::thread::sleep(Duration::from_millis(1300));
    let mut next = Client::new(a.addr, "gina", "gina-pw");
    let resp = next.try_allocate();
    assert_eq!(error_code(&resp), Some(300), "a above redirect_above");
    let msg = Message::parse(&resp).unwrap();
    let alt =
        proto::decode_address(msg.get(attr::ALTERNATE_SERVER).expect("ALTERNATE-SERVER")).unwrap();
    assert_eq!(alt, c.addr, "the least-loaded node is c");
    // b is not redirecting: it allocates.
    relaying(&b, "gina", "gina-pw", &peer);

    cli(&["sessions", "kill", "--user", "gina", "--store", &url]);
    let closed = wait_closed(
        &peer,
        &[relay_a, relay_b1, relay_b2],
        Duration::from_secs(3),
    );
    eprintln!("fleet: sessions kill -> relays closed after {closed:?}");
    let t = wait_for("registry empty", Duration::from_secs(4), || {
        let t = cli(&["sessions", "--store", &url]);
        t.contains("\n0 session(s)").then_some(t)
    });
    assert!(!t.contains("gina"), "{t}");
}
