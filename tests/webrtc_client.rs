//! An independent TURN client against turnstone: the webrtc-rs `turn` 0.17 client
//! (UDP), plus raw `stun`-crate requests for Refresh, with a UDP echo peer on
//! 127.0.0.1. The client talks to the server through a small in-test UDP tap that
//! classifies every datagram, so the tests can check which paths were used
//! (Send indication, ChannelBind + ChannelData, Refresh).

mod common;

use common::{ServerOptions, TestServer, PASSWORD, REALM, SECRET, USER};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::UdpSocket;
use tokio::time::timeout;
use turn::client::{Client, ClientConfig};
use webrtc_util::Conn;

const STEP: Duration = Duration::from_secs(10);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

// ---------------------------------------------------------------------------
// UDP echo peer and the classifying tap
// ---------------------------------------------------------------------------

/// A UDP echo peer on 127.0.0.1; returns its address.
async fn start_echo_peer() -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = sock.local_addr().expect("echo addr");
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let _ = sock.send_to(&buf[..n], from).await;
        }
    });
    addr
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// A STUN message of this type (method and class bits).
    Stun(u16),
    ChannelData,
    Other,
}

const ALLOCATE_SUCCESS: u16 = 0x0103;
const ALLOCATE_ERROR: u16 = 0x0113;
const REFRESH_SUCCESS: u16 = 0x0104;
const SEND_INDICATION: u16 = 0x0016;
const CREATE_PERMISSION_SUCCESS: u16 = 0x0108;
const CHANNEL_BIND_REQUEST: u16 = 0x0009;
const CHANNEL_BIND_SUCCESS: u16 = 0x0109;

fn classify(buf: &[u8]) -> Kind {
    match buf.first() {
        Some(0x40..=0x7F) => Kind::ChannelData,
        Some(0..=3) if buf.len() >= 20 => Kind::Stun(u16::from_be_bytes([buf[0], buf[1]])),
        _ => Kind::Other,
    }
}

/// Counts of datagrams seen by the tap: (client->server?, kind) -> count.
#[derive(Clone, Default)]
struct TapLog(Arc<Mutex<BTreeMap<(bool, Kind), usize>>>);

impl TapLog {
    fn add(&self, c2s: bool, kind: Kind) {
        if let Ok(mut m) = self.0.lock() {
            *m.entry((c2s, kind)).or_default() += 1;
        }
    }
    fn c2s(&self, kind: Kind) -> usize {
        self.0
            .lock()
            .map(|m| *m.get(&(true, kind)).unwrap_or(&0))
            .unwrap_or(0)
    }
    fn s2c(&self, kind: Kind) -> usize {
        self.0
            .lock()
            .map(|m| *m.get(&(false, kind)).unwrap_or(&0))
            .unwrap_or(0)
    }
    fn dump(&self) -> String {
        let m = self.0.lock().map(|m| m.clone()).unwrap_or_default();
        m.iter()
            .map(|((c2s, k), n)| {
                let dir = if *c2s {
                    "client->server"
                } else {
                    "server->client"
                };
                match k {
                    Kind::Stun(t) => format!("{dir} STUN 0x{t:04x}: {n}"),
                    other => format!("{dir} {other:?}: {n}"),
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A UDP relay between one client and the server that records what passes.
/// Returns the address the client should use as its TURN server.
async fn start_tap(server: SocketAddr, log: TapLog) -> SocketAddr {
    let front = UdpSocket::bind("127.0.0.1:0").await.expect("bind tap");
    let back = UdpSocket::bind("127.0.0.1:0").await.expect("bind tap");
    back.connect(server).await.expect("connect tap");
    let addr = front.local_addr().expect("tap addr");
    tokio::spawn(async move {
        let mut client: Option<SocketAddr> = None;
        let mut a = vec![0u8; 65536];
        let mut b = vec![0u8; 65536];
        loop {
            tokio::select! {
                r = front.recv_from(&mut a) => {
                    if let Ok((n, from)) = r {
                        client = Some(from);
                        log.add(true, classify(&a[..n]));
                        let _ = back.send(&a[..n]).await;
                    }
                }
                r = back.recv(&mut b) => {
                    // Errors here are ICMP unreachable reports: keep going.
                    if let Ok(n) = r {
                        log.add(false, classify(&b[..n]));
                        if let Some(c) = client {
                            let _ = front.send_to(&b[..n], c).await;
                        }
                    }
                }
            }
        }
    });
    addr
}

// ---------------------------------------------------------------------------
// webrtc-rs turn client helpers
// ---------------------------------------------------------------------------

async fn new_client(turn_addr: SocketAddr, username: &str, password: &str) -> Client {
    let conn = UdpSocket::bind("127.0.0.1:0").await.expect("bind client");
    let cfg = ClientConfig {
        stun_serv_addr: turn_addr.to_string(),
        turn_serv_addr: turn_addr.to_string(),
        username: username.to_string(),
        password: password.to_string(),
        realm: REALM.to_string(),
        software: String::new(),
        rto_in_ms: 0,
        conn: Arc::new(conn),
        vnet: None,
    };
    let client = Client::new(cfg).await.expect("turn client");
    client.listen().await.expect("client listen");
    client
}

/// Sends `payload` through the relay to `peer` and waits for the echo.
async fn round_trip(relay: &impl Conn, peer: SocketAddr, payload: &[u8]) -> Result<(), String> {
    timeout(STEP, relay.send_to(payload, peer))
        .await
        .map_err(|_| "send_to timed out".to_string())?
        .map_err(|e| format!("send_to failed: {e}"))?;
    let mut buf = vec![0u8; 2048];
    let (n, from) = timeout(Duration::from_secs(3), relay.recv_from(&mut buf))
        .await
        .map_err(|_| {
            format!(
                "no echo of {:?} within 3 s",
                String::from_utf8_lossy(payload)
            )
        })?
        .map_err(|e| format!("recv_from failed: {e}"))?;
    if from != peer {
        return Err(format!("echo came from {from}, expected {peer}"));
    }
    if &buf[..n] != payload {
        return Err(format!(
            "echo {:?} != sent {:?}",
            String::from_utf8_lossy(&buf[..n]),
            String::from_utf8_lossy(payload)
        ));
    }
    Ok(())
}

/// Allocates with `username`/`password` and checks one echo round trip.
async fn allocate_and_echo(server: &TestServer, username: &str, password: &str) {
    let peer = start_echo_peer().await;
    let client = new_client(server.addr, username, password).await;
    let relay = timeout(STEP, client.allocate())
        .await
        .expect("allocate timed out")
        .unwrap_or_else(|e| panic!("allocate as {username:?} failed: {e}"));
    round_trip(&relay, peer, b"hello through the relay")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = relay.close().await;
    let _ = client.close().await;
}

/// TURN REST credentials made here: ("<expiry>:<id>", base64(HMAC-SHA1(secret, username))).
fn rest_credentials(secret: &str, id: &str, ttl_secs: u64) -> (String, String) {
    let expiry = now_unix() + ttl_secs;
    let username = format!("{expiry}:{id}");
    let password = hmac_sha1_base64(secret, &username);
    (username, password)
}

/// base64(HMAC-SHA1(secret, text)), computed here with ring (not turnstone's code).
fn hmac_sha1_base64(secret: &str, text: &str) -> String {
    use base64::Engine as _;
    use ring::hmac;
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(hmac::sign(&key, text.as_bytes()))
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// Allocate, first packets by Send indication (after CreatePermission), then over
/// a bound channel; at least 20 echoed round trips; then close (Refresh 0).
#[test]
fn turn_client_send_indication_then_channel() {
    let server = TestServer::start_default();
    runtime().block_on(async {
        let log = TapLog::default();
        let tap = start_tap(server.addr, log.clone()).await;
        let peer = start_echo_peer().await;
        let client = new_client(tap, USER, PASSWORD).await;

        let relay = timeout(STEP, client.allocate())
            .await
            .expect("allocate timed out")
            .unwrap_or_else(|e| panic!("allocate failed: {e}\n{}", log.dump()));
        let relayed = relay.local_addr().expect("relayed address");
        assert_eq!(relayed.ip().to_string(), "127.0.0.1", "relayed address");
        assert!(
            server.is_relay_port(relayed.port()),
            "relayed port {} outside {:?}",
            relayed.port(),
            server.relay_ports
        );
        assert!(
            log.s2c(Kind::Stun(ALLOCATE_ERROR)) >= 1,
            "first Allocate must be challenged (401)\n{}",
            log.dump()
        );
        assert_eq!(log.s2c(Kind::Stun(ALLOCATE_SUCCESS)), 1, "{}", log.dump());

        let mapped = timeout(STEP, client.send_binding_request())
            .await
            .expect("binding timed out")
            .expect("binding request");
        assert_eq!(mapped.ip().to_string(), "127.0.0.1");

        // 20 round trips at least; keep going (bounded) until the channel carries
        // data both ways, since the client binds it in the background.
        let mut rounds = 0;
        while rounds < 20
            || (rounds < 100
                && (log.c2s(Kind::ChannelData) == 0 || log.s2c(Kind::ChannelData) == 0))
        {
            let payload = format!("round trip {rounds}");
            round_trip(&relay, peer, payload.as_bytes())
                .await
                .unwrap_or_else(|e| panic!("round {rounds}: {e}\n{}", log.dump()));
            rounds += 1;
            if rounds >= 20 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }

        let d = log.dump();
        for (what, seen) in [
            ("Send indication", log.c2s(Kind::Stun(SEND_INDICATION))),
            (
                "CreatePermission success",
                log.s2c(Kind::Stun(CREATE_PERMISSION_SUCCESS)),
            ),
            (
                "ChannelBind request",
                log.c2s(Kind::Stun(CHANNEL_BIND_REQUEST)),
            ),
            (
                "ChannelBind success",
                log.s2c(Kind::Stun(CHANNEL_BIND_SUCCESS)),
            ),
            ("ChannelData client->server", log.c2s(Kind::ChannelData)),
            ("ChannelData server->client", log.s2c(Kind::ChannelData)),
        ] {
            assert!(seen >= 1, "no {what}\n{d}");
        }

        // Close: Refresh with LIFETIME 0 (the client does not wait for the answer).
        relay.close().await.expect("close relay");
        let mut waited = 0;
        while log.s2c(Kind::Stun(REFRESH_SUCCESS)) == 0 && waited < 100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            waited += 1;
        }
        assert!(
            log.s2c(Kind::Stun(REFRESH_SUCCESS)) >= 1,
            "no Refresh success after close\n{}",
            log.dump()
        );
        client.close().await.expect("close client");
    });
}

#[test]
fn turn_client_rest_credentials() {
    let server = TestServer::start(ServerOptions::default().users(&[]).secrets(&[SECRET]));
    let (username, password) = rest_credentials(SECRET, "bob", 3600);
    runtime().block_on(allocate_and_echo(&server, &username, &password));
}

#[test]
fn turn_client_rest_credentials_from_cli() {
    let out = common::run_turnstone(&[
        "credentials",
        "--secret",
        SECRET,
        "--user",
        "bob",
        "--ttl",
        "1h",
    ]);
    let text = out.combined();
    assert!(
        out.status.success(),
        "`turnstone credentials` failed ({})\n{text}",
        out.status
    );
    let (username, password) = common::parse_credentials(&out.stdout).unwrap_or_else(|| {
        panic!("no username/password in `turnstone credentials` output\n{text}")
    });
    let (expiry, id) = username
        .split_once(':')
        .unwrap_or_else(|| panic!("username {username:?} is not <expiry>:<id>"));
    assert_eq!(id, "bob");
    let expiry: u64 = expiry
        .parse()
        .unwrap_or_else(|e| panic!("expiry {expiry:?}: {e}"));
    let want = now_unix() + 3600;
    assert!(
        expiry.abs_diff(want) <= 120,
        "expiry {expiry} not about now+1h ({want})"
    );
    assert_eq!(
        password,
        hmac_sha1_base64(SECRET, &username),
        "password must be base64(HMAC-SHA1(secret, username))"
    );
    let server = TestServer::start(ServerOptions::default().secrets(&[SECRET]));
    runtime().block_on(allocate_and_echo(&server, &username, &password));
}

#[test]
fn turn_client_wrong_password_is_refused() {
    let server = TestServer::start_default();
    runtime().block_on(async {
        let client = new_client(server.addr, USER, "not-the-password").await;
        let r = timeout(STEP, client.allocate())
            .await
            .expect("allocate timed out");
        match r {
            Ok(_) => panic!("allocation with a wrong password succeeded"),
            Err(e) => assert!(e.to_string().contains("401"), "expected 401, got: {e}"),
        }
        let _ = client.close().await;
    });
}

/// Loopback peers are refused (403) unless an allow rule names them; deny wins.
#[test]
fn turn_client_peer_policy() {
    for opts in [
        ServerOptions::default().allow_peers(&[]),
        ServerOptions::default()
            .allow_peers(&["127.0.0.0/8"])
            .deny_peers(&["127.0.0.1/32"]),
    ] {
        let server = TestServer::start(opts.clone());
        runtime().block_on(async {
            let peer = start_echo_peer().await;
            let client = new_client(server.addr, USER, PASSWORD).await;
            let relay = timeout(STEP, client.allocate())
                .await
                .expect("allocate timed out")
                .unwrap_or_else(|e| panic!("allocate failed: {e}"));
            let r = timeout(STEP, relay.send_to(b"must not pass", peer))
                .await
                .expect("send_to timed out");
            match r {
                Ok(_) => panic!(
                    "CreatePermission to {peer} succeeded with allow {:?} deny {:?}",
                    opts.allow_peers, opts.deny_peers
                ),
                Err(e) => assert!(e.to_string().contains("403"), "expected 403, got: {e}"),
            }
            let _ = relay.close().await;
            let _ = client.close().await;
        });
    }
}

/// max_allocations_per_user = 1: a second allocation by the same user gets 486.
#[test]
fn turn_client_user_quota() {
    let server = TestServer::start(ServerOptions::default().max_allocations_per_user(1));
    runtime().block_on(async {
        let first = new_client(server.addr, USER, PASSWORD).await;
        let relay = timeout(STEP, first.allocate())
            .await
            .expect("allocate timed out")
            .unwrap_or_else(|e| panic!("first allocate failed: {e}"));
        let second = new_client(server.addr, USER, PASSWORD).await;
        match timeout(STEP, second.allocate())
            .await
            .expect("allocate timed out")
        {
            Ok(_) => panic!("second allocation beyond max_allocations_per_user = 1 succeeded"),
            Err(e) => assert!(e.to_string().contains("486"), "expected 486, got: {e}"),
        }
        let _ = relay.close().await;
        let _ = first.close().await;
        let _ = second.close().await;
    });
}

// ---------------------------------------------------------------------------
// Raw Refresh checks with the `stun` crate (the turn client has no Refresh API)
// ---------------------------------------------------------------------------

mod raw {
    use super::*;
    use stun::agent::TransactionId;
    use stun::error_code::ErrorCodeAttribute;
    use stun::fingerprint::FINGERPRINT;
    use stun::integrity::MessageIntegrity;
    use stun::message::{
        Getter, Message, MessageType, Setter, CLASS_ERROR_RESPONSE, CLASS_REQUEST,
        CLASS_SUCCESS_RESPONSE, METHOD_ALLOCATE, METHOD_REFRESH,
    };
    use stun::textattrs::{Nonce, Realm, Username};
    use turn::proto::lifetime::Lifetime;
    use turn::proto::relayaddr::RelayedAddress;
    use turn::proto::reqtrans::RequestedTransport;
    use turn::proto::PROTO_UDP;

    pub struct RawClient {
        sock: std::net::UdpSocket,
        server: SocketAddr,
        pub nonce: Option<Nonce>,
        pub realm: Option<Realm>,
        pub integrity: Option<MessageIntegrity>,
    }

    impl RawClient {
        pub fn new(server: SocketAddr) -> RawClient {
            let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
            sock.set_read_timeout(Some(Duration::from_millis(500)))
                .expect("timeout");
            RawClient {
                sock,
                server,
                nonce: None,
                realm: None,
                integrity: None,
            }
        }

        /// Sends a request (retransmitting up to 6 times) and returns the response.
        pub fn transact(&self, mut setters: Vec<Box<dyn Setter>>, auth: bool) -> Message {
            if auth {
                setters.push(Box::new(Username::new(
                    stun::attributes::ATTR_USERNAME,
                    USER.to_string(),
                )));
                setters.push(Box::new(self.realm.clone().expect("realm")));
                setters.push(Box::new(self.nonce.clone().expect("nonce")));
                setters.push(Box::new(self.integrity.clone().expect("integrity")));
            }
            setters.push(Box::new(FINGERPRINT));
            let mut msg = Message::new();
            msg.build(&setters).expect("build");
            let mut buf = [0u8; 1500];
            for _ in 0..6 {
                self.sock.send_to(&msg.raw, self.server).expect("send");
                while let Ok((n, _)) = self.sock.recv_from(&mut buf) {
                    let mut res = Message::new();
                    if res.unmarshal_binary(&buf[..n]).is_ok()
                        && res.transaction_id == msg.transaction_id
                    {
                        return res;
                    }
                }
            }
            panic!("no response to {}", msg.typ);
        }

        pub fn allocate(&mut self) -> Message {
            let req = || -> Vec<Box<dyn Setter>> {
                vec![
                    Box::new(TransactionId::new()),
                    Box::new(MessageType::new(METHOD_ALLOCATE, CLASS_REQUEST)),
                    Box::new(RequestedTransport {
                        protocol: PROTO_UDP,
                    }),
                ]
            };
            let res = self.transact(req(), false);
            assert_eq!(
                res.typ.class, CLASS_ERROR_RESPONSE,
                "unauthenticated Allocate"
            );
            assert_eq!(error_code(&res), Some(401));
            self.nonce =
                Some(Nonce::get_from_as(&res, stun::attributes::ATTR_NONCE).expect("NONCE in 401"));
            let realm =
                Realm::get_from_as(&res, stun::attributes::ATTR_REALM).expect("REALM in 401");
            assert_eq!(realm.text, REALM);
            self.integrity = Some(MessageIntegrity::new_long_term_integrity(
                USER.to_string(),
                realm.text.clone(),
                PASSWORD.to_string(),
            ));
            self.realm = Some(realm);
            self.transact(req(), true)
        }

        pub fn refresh(&self, lifetime_secs: u64) -> Message {
            self.transact(
                vec![
                    Box::new(TransactionId::new()),
                    Box::new(MessageType::new(METHOD_REFRESH, CLASS_REQUEST)),
                    Box::new(Lifetime(Duration::from_secs(lifetime_secs))),
                ],
                true,
            )
        }

        /// Verifies the response's MESSAGE-INTEGRITY with the long-term key.
        pub fn check_integrity(&self, res: &Message) {
            let mut m = res.clone();
            self.integrity
                .as_ref()
                .expect("integrity")
                .check(&mut m)
                .unwrap_or_else(|e| panic!("bad MESSAGE-INTEGRITY on {}: {e}", res.typ));
        }
    }

    pub fn error_code(res: &Message) -> Option<u16> {
        let mut code = ErrorCodeAttribute::default();
        code.get_from(res).ok().map(|_| code.code.0)
    }

    pub fn lifetime(res: &Message) -> Option<u64> {
        let mut l = Lifetime::default();
        l.get_from(res).ok().map(|_| l.0.as_secs())
    }

    #[test]
    fn refresh_extends_then_deletes_allocation() {
        let server = TestServer::start_default();
        let mut c = RawClient::new(server.addr);
        let res = c.allocate();
        assert_eq!(
            res.typ.class,
            CLASS_SUCCESS_RESPONSE,
            "authenticated Allocate: error {:?}",
            error_code(&res)
        );
        c.check_integrity(&res);
        let mut relayed = RelayedAddress::default();
        relayed.get_from(&res).expect("XOR-RELAYED-ADDRESS");
        assert!(
            server.is_relay_port(relayed.port),
            "relay port {}",
            relayed.port
        );
        assert!(lifetime(&res).unwrap_or(0) > 0, "Allocate LIFETIME");

        let res = c.refresh(300);
        assert_eq!(
            res.typ.class,
            CLASS_SUCCESS_RESPONSE,
            "Refresh 300: {:?}",
            error_code(&res)
        );
        c.check_integrity(&res);
        let l = lifetime(&res).expect("LIFETIME in Refresh success");
        assert!((1..=3600).contains(&l), "granted lifetime {l}");

        let res = c.refresh(0);
        assert_eq!(
            res.typ.class,
            CLASS_SUCCESS_RESPONSE,
            "Refresh 0: {:?}",
            error_code(&res)
        );

        // RFC 8656 7.3: LIFETIME 0 deletes the allocation at once, and a Refresh
        // for a missing allocation gets 437. (coturn 4.6.1 differs: it answers the
        // next Refresh with success and LIFETIME 600, and 438 a few seconds later.)
        if server.backend == common::Backend::Coturn {
            return;
        }
        let res = c.refresh(300);
        assert_eq!(res.typ.class, CLASS_ERROR_RESPONSE, "Refresh after delete");
        assert_eq!(
            error_code(&res),
            Some(437),
            "Refresh after delete: allocation mismatch"
        );
    }
}

/// The harness's lenient parser for `turnstone credentials` output.
#[test]
fn parse_credentials_output_forms() {
    let want = Some(("1700000000:bob".to_string(), "abc+/=".to_string()));
    let lines = "username: 1700000000:bob\npassword: abc+/=\n";
    assert_eq!(common::parse_credentials(lines), want);
    let json = "{\"username\":\"1700000000:bob\",\"password\":\"abc+/=\"}";
    assert_eq!(common::parse_credentials(json), want);
    let ice = "{\"urls\":[\"turn:127.0.0.1:3478\"],\"username\":\"1700000000:bob\",\"credential\":\"abc+/=\"}";
    assert_eq!(common::parse_credentials(ice), want);
    let both = format!("{lines}{json}\n");
    assert_eq!(common::parse_credentials(&both), want);
}
