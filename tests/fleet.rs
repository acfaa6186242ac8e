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
//! Each scenario runs twice: against a plain `redis://` store, and against a TLS-only
//! `rediss://` store (a test CA in `[store] ca_file` and `--store-ca`) whose only user is
//! a Redis ACL user named in the URL (`rediss://USER:PASSWORD@...`).
//!
//! Timings are printed (`cargo test --test fleet -- --nocapture`). The tests run one at a
//! time (a lock): each starts a Redis and three nodes.

mod common;

use common::redis_server::{Redis, RedisFlavor};
use common::traffic::{relay_closed, udp_socket};
use common::{
    free_tcp_port, turnstone_cli, wait_for, Backend, ServerOptions, TestServer, TurnClient,
};
use std::net::{SocketAddr, UdpSocket};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use turnstone::proto::{self, attr, Class};

const REALM: &str = "fleet.test";

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------
// turnstone nodes
// ---------------------------------------------------------------------------------------------

/// A node's options: one worker, no drain, a local user only, metrics, and the store.
fn node(id: &str) -> ServerOptions {
    ServerOptions::default()
        .realm(REALM)
        .workers(1)
        .server_toml("drain_timeout = \"0s\"")
        .users(&[("local", "node-local-only")])
        .secrets(&[])
        .metrics()
        .store("", id)
}

fn three_nodes(redis: &Redis, confs: [ServerOptions; 3]) -> [TestServer; 3] {
    confs.map(|mut c| {
        c.store.as_mut().expect("a fleet node").0 = redis.url();
        c.store_ca = redis.ca_file().map(|p| p.to_path_buf());
        TestServer::start_with(Backend::Turnstone, c)
    })
}

fn id(node: &TestServer) -> &str {
    &node.options.store.as_ref().expect("a fleet node").1
}

/// `turnstone ARGS --store URL [--store-ca FILE]` against `redis`: its output.
fn cli(redis: &Redis, args: &[&str]) -> String {
    let store = redis.store_args();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(store.iter().map(String::as_str));
    turnstone_cli(&all)
}

fn add_user(redis: &Redis, name: &str, password: &str) {
    cli(
        redis,
        &[
            "users",
            "add",
            name,
            "--password",
            password,
            "--realm",
            REALM,
        ],
    );
}

fn client(node: &TestServer, user: &str, password: &str) -> TurnClient {
    TurnClient::udp(node.addr, user, password).with_realm(REALM)
}

/// A peer socket: relays data to a client, and tells when a relay port has closed.
struct Peer {
    sock: UdpSocket,
}

impl Peer {
    fn new() -> Peer {
        Peer {
            sock: udp_socket(Duration::from_millis(20)),
        }
    }

    fn addr(&self) -> SocketAddr {
        self.sock.local_addr().expect("local_addr")
    }

    /// Sends `payload` from this peer to `relay`; the client must receive it.
    fn relays_to(&self, relay: SocketAddr, client: &mut TurnClient, payload: &[u8]) -> bool {
        (0..3).any(|_| {
            let _ = self.sock.send_to(payload, relay);
            client.receives_data_indication(payload, Duration::from_millis(300))
        })
    }
}

/// A client of `node` for `user` with an allocation that relays from `peer`.
fn relaying(
    node: &TestServer,
    user: &str,
    password: &str,
    peer: &Peer,
) -> (TurnClient, SocketAddr) {
    let mut c = client(node, user, password);
    let relay = c.must_allocate();
    c.permit(peer.addr());
    assert!(
        peer.relays_to(relay, &mut c, b"hello through the relay"),
        "{} does not relay for {user}",
        id(node)
    );
    (c, relay)
}

/// Waits until every relay port is closed; how long that took for each.
fn wait_closed(relays: &[SocketAddr], timeout: Duration) -> Vec<Duration> {
    let t0 = Instant::now();
    let mut when = vec![None; relays.len()];
    wait_for("allocations ended", timeout, || {
        for (w, r) in when.iter_mut().zip(relays) {
            if w.is_none() && relay_closed(*r) {
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
    users_added_and_removed_reach_every_node_on(&RedisFlavor::plain());
}

#[test]
fn users_added_and_removed_reach_every_node_over_tls_with_acl_user() {
    users_added_and_removed_reach_every_node_on(&RedisFlavor::tls_acl());
}

fn users_added_and_removed_reach_every_node_on(flavor: &RedisFlavor) {
    let _serial = serial();
    let rdir = tempfile::tempdir().unwrap();
    let redis = Redis::start_as(flavor, free_tcp_port(), rdir.path());
    let nodes = three_nodes(&redis, [node("a"), node("b"), node("c")]);

    // Unknown before it is added.
    let mut probe = client(&nodes[0], "bob", "bob-pw");
    assert_eq!(probe.allocate().code(), Some(401));

    add_user(&redis, "bob", "bob-pw");
    let t0 = Instant::now();
    let mut clients: Vec<TurnClient> = nodes.iter().map(|n| client(n, "bob", "bob-pw")).collect();
    let mut relays = Vec::new();
    let mut latency = Vec::new();
    for c in &mut clients {
        let relay = wait_for("bob allocates", Duration::from_secs(3), || {
            c.allocate().relayed()
        });
        latency.push(t0.elapsed());
        relays.push(relay);
    }
    eprintln!("fleet: users add -> first allocation on a, b, c after {latency:?}");
    assert!(
        latency.iter().all(|l| *l < Duration::from_secs(1)),
        "not every node within a second: {latency:?}"
    );
    assert!(cli(&redis, &["users", "list"]).lines().any(|l| l == "bob"));

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
            let t = cli(&redis, &["sessions"]);
            nodes
                .iter()
                .zip(&relays)
                .all(|(n, r)| {
                    t.lines().any(|l| {
                        let cols: Vec<&str> = l.split_whitespace().collect();
                        cols.first() == Some(&id(n))
                            && cols.get(2) == Some(&"bob")
                            && cols.get(5) == Some(&r.to_string().as_str())
                    })
                })
                .then_some(t)
        },
    );
    eprintln!("fleet: turnstone sessions:\n{table}");
    assert!(table.contains("3 session(s)"), "{table}");

    cli(&redis, &["users", "remove", "bob"]);
    let closed = wait_closed(&relays, Duration::from_secs(3));
    eprintln!("fleet: users remove -> relay closed on a, b, c after {closed:?}");
    assert!(
        closed.iter().all(|d| *d < Duration::from_millis(2500)),
        "{closed:?}"
    );
    for n in &nodes {
        let mut c = client(n, "bob", "bob-pw");
        assert_eq!(c.allocate().code(), Some(401), "node {}", id(n));
    }
    // Back with the same password: the old allocations are gone (437 on Refresh).
    add_user(&redis, "bob", "bob-pw");
    for (c, n) in clients.iter_mut().zip(&nodes) {
        let code = wait_for(
            "bob authenticates again",
            Duration::from_secs(2),
            || match c.refresh(600).code() {
                Some(401) => None,
                other => Some(other),
            },
        );
        assert_eq!(
            code,
            Some(437),
            "Refresh of a removed allocation on {}",
            id(n)
        );
    }
}

#[test]
fn fleet_quota_and_revocation() {
    fleet_quota_and_revocation_on(&RedisFlavor::plain());
}

#[test]
fn fleet_quota_and_revocation_over_tls_with_acl_user() {
    fleet_quota_and_revocation_on(&RedisFlavor::tls_acl());
}

fn fleet_quota_and_revocation_on(flavor: &RedisFlavor) {
    let _serial = serial();
    let rdir = tempfile::tempdir().unwrap();
    let redis = Redis::start_as(flavor, free_tcp_port(), rdir.path());
    let q = |id| node(id).max_allocations_per_user(2);
    let [a, b, c] = three_nodes(&redis, [q("a"), q("b"), q("c")]);
    add_user(&redis, "carol", "carol-pw");

    // The new user reaches each node through the store's pub/sub, within milliseconds
    // but not at once: a 401 before that is expected, so allocate when known.
    let known = |c: &mut TurnClient| {
        wait_for("carol known to the node", Duration::from_secs(3), || {
            c.allocate().relayed()
        })
    };
    let mut on_a = client(&a, "carol", "carol-pw");
    known(&mut on_a);
    let t0 = Instant::now();
    let mut on_b = client(&b, "carol", "carol-pw");
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
    let mut on_c = client(&c, "carol", "carol-pw");
    assert_eq!(
        on_c.allocate().code(),
        Some(486),
        "third allocation of carol in the fleet (quota 2)"
    );

    // a's allocation ends: c may allocate once the count has gone.
    assert_eq!(on_a.refresh(0).class(), Class::Success);
    let t0 = Instant::now();
    wait_for(
        "c allocates after a's ended",
        Duration::from_secs(4),
        || on_c.allocate().relayed(),
    );
    eprintln!(
        "fleet: quota slot freed on a usable on c after {:?}",
        t0.elapsed()
    );

    // Revocation ends carol's allocations everywhere and refuses new ones.
    let peer = Peer::new();
    on_b.permit(peer.addr());
    assert!(peer.relays_to(relay_b, &mut on_b, b"before revocation"));
    cli(&redis, &["users", "revoke", "carol"]);
    let closed = wait_closed(&[relay_b], Duration::from_secs(3));
    eprintln!("fleet: users revoke -> relay closed after {closed:?}");
    let mut again = client(&a, "carol", "carol-pw");
    assert_eq!(again.allocate().code(), Some(401));
    assert!(cli(&redis, &["users", "list"]).contains("carol\t(revoked)"));
    cli(&redis, &["users", "unrevoke", "carol"]);
    wait_for(
        "carol allocates after unrevoke",
        Duration::from_secs(2),
        || again.allocate().relayed(),
    );
}

#[test]
fn redis_outage_keeps_nodes_serving_and_resyncs() {
    redis_outage_keeps_nodes_serving_and_resyncs_on(&RedisFlavor::plain());
}

#[test]
fn redis_outage_keeps_nodes_serving_and_resyncs_over_tls_with_acl_user() {
    redis_outage_keeps_nodes_serving_and_resyncs_on(&RedisFlavor::tls_acl());
}

fn redis_outage_keeps_nodes_serving_and_resyncs_on(flavor: &RedisFlavor) {
    let _serial = serial();
    let rdir = tempfile::tempdir().unwrap();
    let port = free_tcp_port();
    let mut redis = Redis::start_as(flavor, port, rdir.path());
    let [a, b, _c] = three_nodes(&redis, [node("a"), node("b"), node("c")]);
    add_user(&redis, "dave", "dave-pw");
    add_user(&redis, "erin", "erin-pw");
    let peer = Peer::new();
    let (mut dave, relay) = wait_for("dave relays on a", Duration::from_secs(2), || {
        let mut c = client(&a, "dave", "dave-pw");
        let r = c.allocate().relayed()?;
        c.permit(peer.addr());
        Some((c, r))
    });
    assert!(peer.relays_to(relay, &mut dave, b"before the outage"));
    assert_eq!(a.metric("turnstone_store_up", &[]), Some(1.0));

    // Redis dies (SIGKILL).
    redis.save();
    redis.kill();
    let t0 = Instant::now();
    wait_for("a reports the store down", Duration::from_secs(3), || {
        (a.metric("turnstone_store_up", &[]) == Some(0.0)).then_some(())
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
            peer.relays_to(
                relay,
                &mut dave,
                format!("during the outage {i}").as_bytes()
            ),
            "a stopped relaying without redis"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(dave.refresh(600).class(), Class::Success);
    relaying(&b, "erin", "erin-pw", &peer);

    // Redis comes back empty (no persistence): the nodes keep their cached users.
    let empty = tempfile::tempdir().unwrap();
    let redis_empty = Redis::start_as(flavor, port, empty.path());
    let t0 = Instant::now();
    wait_for("a reconnects", Duration::from_secs(8), || {
        (a.metric("turnstone_store_up", &[]) == Some(1.0)).then_some(())
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
        let side = Redis::start_as(flavor, free_tcp_port(), rdir.path());
        add_user(&side, "frank", "frank-pw");
        side.save();
    }
    let mut frank_a = client(&a, "frank", "frank-pw");
    assert_eq!(frank_a.allocate().code(), Some(401));
    let back = Redis::start_as(flavor, port, rdir.path());
    let t0 = Instant::now();
    for n in [&a, &b] {
        let mut f = client(n, "frank", "frank-pw");
        wait_for(
            "frank arrives after the restart",
            Duration::from_secs(10),
            || f.allocate().relayed(),
        );
    }
    eprintln!(
        "fleet: change made meanwhile usable on a and b {:?} after redis came back",
        t0.elapsed()
    );
    assert!(a.stderr().contains("fleet store reachable again"));
    // The allocation made before the outage relayed throughout.
    assert!(peer.relays_to(relay, &mut dave, b"after the outage"));
    drop(back);
}

#[test]
fn redirect_names_least_loaded_node_and_kill_ends_sessions() {
    redirect_names_least_loaded_node_and_kill_ends_sessions_on(&RedisFlavor::plain());
}

#[test]
fn redirect_names_least_loaded_node_and_kill_ends_sessions_over_tls_with_acl_user() {
    redirect_names_least_loaded_node_and_kill_ends_sessions_on(&RedisFlavor::tls_acl());
}

fn redirect_names_least_loaded_node_and_kill_ends_sessions_on(flavor: &RedisFlavor) {
    let _serial = serial();
    let rdir = tempfile::tempdir().unwrap();
    let redis = Redis::start_as(flavor, free_tcp_port(), rdir.path());
    let [a, b, c] = three_nodes(
        &redis,
        [
            node("a").limits_toml("redirect_above = 1"),
            node("b"),
            node("c"),
        ],
    );
    add_user(&redis, "gina", "gina-pw");
    let peer = Peer::new();
    let (_ga, relay_a) = wait_for("gina relays on a", Duration::from_secs(2), || {
        let mut cl = client(&a, "gina", "gina-pw");
        let r = cl.allocate().relayed()?;
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
    let mut next = client(&a, "gina", "gina-pw");
    let resp = next.allocate();
    assert_eq!(resp.code(), Some(300), "a above redirect_above");
    let msg = resp.msg();
    let alt =
        proto::decode_address(msg.get(attr::ALTERNATE_SERVER).expect("ALTERNATE-SERVER")).unwrap();
    assert_eq!(alt, c.addr, "the least-loaded node is c");
    // b is not redirecting: it allocates.
    relaying(&b, "gina", "gina-pw", &peer);

    cli(&redis, &["sessions", "kill", "--user", "gina"]);
    let closed = wait_closed(&[relay_a, relay_b1, relay_b2], Duration::from_secs(3));
    eprintln!("fleet: sessions kill -> relays closed after {closed:?}");
    let t = wait_for("registry empty", Duration::from_secs(4), || {
        let t = cli(&redis, &["sessions"]);
        t.contains("\n0 session(s)").then_some(t)
    });
    assert!(!t.contains("gina"), "{t}");
}
