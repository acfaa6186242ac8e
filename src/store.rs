//! The fleet store: a Redis server that every node of a fleet shares (`[store] url`).
//! It holds the users, REST secrets and revocations of the fleet, the per-user
//! allocation counts behind the fleet-wide quota, the registry of live sessions and each
//! node's load (for 300 Try Alternate redirects). This module owns the node side (a
//! background thread that keeps [`Shared::store`] in step with Redis) and the
//! administration side (the `turnstone users|secrets|sessions` commands).
//!
//! Authentication never waits on Redis: workers read the cached [`StoreView`]; only this
//! module's threads talk to Redis.
//!
//! # Key schema (version 1)
//!
//! | key | type | contents |
//! | --- | --- | --- |
//! | `turnstone:version` | STRING | `"1"`; written by every `turnstone users` and `turnstone secrets` change. A store without it is *uninitialised*: nodes keep their cached users rather than dropping them (a Redis restarted without persistence) |
//! | `turnstone:users` | HASH | user name → hex MD5 long-term key `MD5(user:realm:password)` (RFC 8489 9.2.2); never the password |
//! | `turnstone:secrets` | SET | TURN REST API shared secrets |
//! | `turnstone:revoked` | SET | revoked user names and REST user ids (the part after `:` of `<expiry>:<id>`) |
//! | `turnstone:node:<id>` | HASH, EXPIRE 5 s | `addr` (where clients reach the node), `allocations`, `updated` (Unix ms); absent while the node drains |
//! | `turnstone:usercount:<id>` | HASH, EXPIRE 5 s | user → allocations on node `<id>` (a lease: a dead node's counts vanish) |
//! | `turnstone:sessions:<id>` | HASH, EXPIRE 5 s | allocation id → JSON `{user, transport, client, relay, started, bytes_to_peer, bytes_to_client}` |
//! | `turnstone:events` | pub/sub channel | `users`, `secrets`, `revoked` (resynchronise), `kill <user>` (end that user's allocations) |
//!
//! Each node rewrites its three leased keys every second (one MULTI/EXEC) and reads the
//! other nodes' `node` and `usercount` keys. On any event, and after every (re)connection,
//! it reads `users`, `secrets` and `revoked` whole; users that disappeared and names newly
//! revoked have their allocations ended on this node.
//!
//! # Failure behaviour
//!
//! If Redis is unreachable the node logs one warning, sets `turnstone_store_up` to 0 and
//! keeps its cached users, secrets and revocations (so it keeps authenticating); after a
//! lease period (5 s) it forgets the other nodes' counts and loads, as Redis would. It
//! reconnects with backoff (100 ms doubling to 5 s) and resynchronises on reconnection.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::BufRead;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::auth::Key;
use crate::config::{Config, ListenTransport};
use crate::metrics::Metrics;
use crate::server::{NodeLoad, Shared, StoreView};

/// Schema marker key (see the module documentation).
pub const VERSION_KEY: &str = "turnstone:version";
/// Schema version written to [`VERSION_KEY`].
pub const SCHEMA_VERSION: &str = "1";
/// HASH user → hex long-term key.
pub const USERS_KEY: &str = "turnstone:users";
/// SET of REST API secrets.
pub const SECRETS_KEY: &str = "turnstone:secrets";
/// SET of revoked user names / REST user ids.
pub const REVOKED_KEY: &str = "turnstone:revoked";
/// Pub/sub channel of change events.
pub const EVENTS_CHANNEL: &str = "turnstone:events";
/// `turnstone:node:<id>`: a node's address and load.
pub const NODE_PREFIX: &str = "turnstone:node:";
/// `turnstone:usercount:<id>`: a node's allocations per user.
pub const USERCOUNT_PREFIX: &str = "turnstone:usercount:";
/// `turnstone:sessions:<id>`: a node's live allocations.
pub const SESSIONS_PREFIX: &str = "turnstone:sessions:";
/// Lifetime of the leased per-node keys.
pub const LEASE: Duration = Duration::from_secs(5);

/// How often a node publishes its keys and reads the other nodes'.
const HEARTBEAT: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Read and write timeout of ordinary commands.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Read timeout of the subscriber connection (how often it looks up).
const SUBSCRIBE_POLL: Duration = Duration::from_millis(200);
/// The subscriber pings this often to notice a dead connection.
const SUBSCRIBE_PING: Duration = Duration::from_secs(2);
/// Kill every removed/revoked name unconditionally up to this many; beyond, only the
/// names this node has allocations for.
const KILL_ALL_BELOW: usize = 256;

/// One session in `turnstone:sessions:<id>` (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub user: String,
    pub transport: String,
    pub client: String,
    pub relay: String,
    /// Unix seconds.
    pub started: u64,
    pub bytes_to_peer: u64,
    pub bytes_to_client: u64,
}

/// A message on [`EVENTS_CHANNEL`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Users, secrets or revocations changed (or we just (re)subscribed): read them again.
    Resync,
    /// End this user's allocations.
    Kill(String),
}

impl Event {
    /// Parses an event message; unknown messages resynchronise (harmless).
    pub fn parse(payload: &str) -> Event {
        match payload.split_once(' ') {
            Some(("kill", user)) if !user.is_empty() => Event::Kill(user.to_string()),
            _ => Event::Resync,
        }
    }
}

/// Hex encoding of a long-term key, as stored in [`USERS_KEY`].
pub fn key_to_hex(key: &Key) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// The key of a [`USERS_KEY`] value; None unless exactly 32 hex digits.
pub fn key_from_hex(s: &str) -> Option<Key> {
    let s = s.trim();
    if s.len() != 32 || !s.is_ascii() {
        return None;
    }
    let mut key = [0u8; 16];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(key)
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    crate::config::redact_url(url)
}

// ---------------------------------------------------------------------------------------------
// Where the store is, and TLS
// ---------------------------------------------------------------------------------------------

/// Where the fleet store is: a `redis://` or `rediss://` (TLS) URL, with an optional
/// Redis ACL user and password (`rediss://USER:PASSWORD@HOST:PORT/DB`), and for TLS an
/// optional PEM file of CA certificates to trust instead of the system roots. Messages
/// name the settings as the operator wrote them: `store.url` / `store.ca_file` on a
/// node, `--store` / `--store-ca` for the commands.
#[derive(Clone)]
pub struct Target {
    url: String,
    ca_file: Option<PathBuf>,
    url_key: &'static str,
    ca_key: &'static str,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("url", &redact(&self.url))
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl Target {
    /// A node's store: `[store] url` and `ca_file`.
    pub fn node(url: &str, ca_file: Option<&Path>) -> Target {
        Target {
            url: url.to_string(),
            ca_file: ca_file.map(Path::to_path_buf),
            url_key: "store.url",
            ca_key: "store.ca_file",
        }
    }

    /// The store of `turnstone users|secrets|sessions`: `--store` and `--store-ca`.
    pub fn command(url: &str, ca_file: Option<&Path>) -> Target {
        Target {
            url: url.to_string(),
            ca_file: ca_file.map(Path::to_path_buf),
            url_key: "--store",
            ca_key: "--store-ca",
        }
    }

    fn is_tls(&self) -> bool {
        self.url.starts_with("rediss://")
    }

    /// The redis client: plain, or TLS with the system roots or the CA file. Errors name
    /// the setting (a URL that does not parse, a CA file that cannot be read or holds no
    /// certificate, a CA file with a plain URL).
    fn client(&self) -> anyhow::Result<redis::Client> {
        // The redis crate builds its rustls client with the process-wide provider:
        // make it ring, as for our TLS listeners (no second crypto library).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let url = redact(&self.url);
        let Some(ca) = &self.ca_file else {
            return redis::Client::open(self.url.as_str())
                .map_err(|e| anyhow::anyhow!("{}: cannot use {url}: {e}", self.url_key));
        };
        anyhow::ensure!(
            self.is_tls(),
            "{}: a CA file is for TLS; {} must start with rediss://",
            self.ca_key,
            self.url_key
        );
        let pem = std::fs::read(ca)
            .map_err(|e| anyhow::anyhow!("{}: cannot read {}: {e}", self.ca_key, ca.display()))?;
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                anyhow::anyhow!("{}: {}: invalid PEM: {e:?}", self.ca_key, ca.display())
            })?;
        anyhow::ensure!(
            !certs.is_empty(),
            "{}: {}: no certificate found (expected PEM \"-----BEGIN CERTIFICATE-----\")",
            self.ca_key,
            ca.display()
        );
        redis::Client::build_with_tls(
            self.url.as_str(),
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            },
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "{} / {}: cannot use {url} with {}: {e}",
                self.url_key,
                self.ca_key,
                ca.display()
            )
        })
    }

    /// Why a connection failed, in the operator's terms: a TLS certificate that is not
    /// trusted names the CA setting, a server that drops a plain connection at once
    /// suggests rediss://, a TLS handshake a plain server does not answer suggests
    /// redis://.
    pub fn explain(&self, e: &redis::RedisError) -> String {
        let text = e.to_string();
        let lower = text.to_ascii_lowercase();
        let hint = if lower.contains("invalid peer certificate") {
            if lower.contains("notvalidforname") {
                format!(
                    "the server's TLS certificate does not name the host in {}",
                    self.url_key
                )
            } else if lower.contains("expired") || lower.contains("notvalidyet") {
                "the server's TLS certificate is expired or not yet valid".to_string()
            } else {
                match &self.ca_file {
                    Some(ca) => format!(
                        "the server's TLS certificate is not trusted: it does not chain to the CA in {} ({})",
                        self.ca_key,
                        ca.display()
                    ),
                    None => format!(
                        "the server's TLS certificate is not trusted by the system roots; for a private CA set {}",
                        self.ca_key
                    ),
                }
            }
        } else if !self.is_tls() && is_dropped(e) {
            format!(
                "the server closed the connection without answering; if it accepts only TLS, {} must start with rediss://",
                self.url_key
            )
        } else if self.is_tls()
            && (e.is_timeout()
                || [
                    "handshake",
                    "corrupt message",
                    "invalid content type",
                    "invalidmessage",
                    "temporarily unavailable",
                    "timed out",
                ]
                .iter()
                .any(|w| lower.contains(w)))
        {
            format!(
                "the TLS handshake failed or got no answer; if the server does not speak TLS on this port, {} must start with redis://",
                self.url_key
            )
        } else if ["wrongpass", "noauth", "authentication"]
            .iter()
            .any(|w| lower.contains(w))
        {
            format!(
                "the server refused the user or password in {} (rediss://USER:PASSWORD@HOST:PORT/DB for a Redis ACL user)",
                self.url_key
            )
        } else {
            return format!("{}: {text}", self.url_key);
        };
        format!("{}: {hint} ({text})", self.url_key)
    }
}

/// A connection the server closed or reset before any answer (not one refused).
fn is_dropped(e: &redis::RedisError) -> bool {
    let lower = e.to_string().to_ascii_lowercase();
    if lower.contains("refused") {
        return false;
    }
    e.is_connection_dropped()
        || [
            "reset by peer",
            "broken pipe",
            "end of file",
            "connection closed",
        ]
        .iter()
        .any(|w| lower.contains(w))
}

// ---------------------------------------------------------------------------------------------
// Node identity
// ---------------------------------------------------------------------------------------------

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "turnstone".to_string())
}

/// This node's id: `[store] node_id`, or hostname ":" first listen port.
pub fn node_id(config: &Config) -> String {
    if let Some(id) = &config.store.node_id {
        return id.clone();
    }
    let port = config.listen.first().map_or(3478, |l| l.address.port());
    let mut host = hostname();
    host.truncate(56);
    format!("{host}:{port}")
}

/// Where clients reach this node: `[store] advertise`, or the first UDP listen address
/// (with an unspecified IP replaced by the relay's external, else relay, address of the
/// same family).
pub fn advertise(config: &Config) -> SocketAddr {
    if let Some(a) = config.store.advertise {
        return a;
    }
    let listen = config
        .listen
        .iter()
        .find(|l| matches!(l.transport, ListenTransport::Udp))
        .or_else(|| config.listen.first())
        .map_or(SocketAddr::from(([127, 0, 0, 1], 3478)), |l| l.address);
    if !listen.ip().is_unspecified() {
        return listen;
    }
    let same = |ip: &&IpAddr| ip.is_ipv4() == listen.is_ipv4();
    let ip = config
        .relay
        .external_addresses
        .iter()
        .find(same)
        .or_else(|| config.relay.addresses.iter().find(same))
        .copied()
        .unwrap_or(listen.ip());
    SocketAddr::new(ip, listen.port())
}

// ---------------------------------------------------------------------------------------------
// The node side
// ---------------------------------------------------------------------------------------------

/// Starts the store threads of this node (a syncing thread and a pub/sub subscriber) and
/// waits at most a second for the first synchronisation, so that store users can
/// authenticate from the first request when Redis is up. Errors only on a bad URL.
pub fn start(
    store: &Target,
    node_id: String,
    advertise: SocketAddr,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let client = store.client()?;
    shared.publish_sessions.store(true, Ordering::Relaxed);
    metrics.set_store_up(false);
    let (tx, rx) = mpsc::channel();
    let sub = client.clone();
    let sub_target = store.clone();
    std::thread::Builder::new()
        .name("turnstone-store-sub".into())
        .spawn(move || subscriber(&sub, &sub_target, &tx))?;
    let (ready_tx, ready_rx) = mpsc::channel();
    let target = redact(&store.url);
    tracing::info!(store = %target, node = %node_id, %advertise, "fleet store");
    let mut node = Node {
        client,
        store: store.clone(),
        target,
        id: node_id,
        advertise,
        shared,
        metrics,
        con: None,
        backoff: BACKOFF_MIN,
        next_attempt: Instant::now(),
        down_since: Some(Instant::now()),
        warned: false,
        known_users: None,
        known_revoked: HashSet::new(),
    };
    std::thread::Builder::new()
        .name("turnstone-store".into())
        .spawn(move || node.run(&rx, ready_tx))?;
    let _ = ready_rx.recv_timeout(Duration::from_secs(1));
    Ok(())
}

/// The subscriber thread: (re)subscribes with backoff and forwards events; every
/// successful subscription is followed by a `Resync` so nothing published while it was
/// away is missed.
fn subscriber(client: &redis::Client, store: &Target, tx: &mpsc::Sender<Event>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        match subscribe_once(client, tx, &mut backoff) {
            Ok(()) => return, // the node thread is gone
            Err(e) => tracing::debug!(error = %store.explain(&e), "fleet store subscription lost"),
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn subscribe_once(
    client: &redis::Client,
    tx: &mpsc::Sender<Event>,
    backoff: &mut Duration,
) -> redis::RedisResult<()> {
    let mut con = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    con.set_write_timeout(Some(IO_TIMEOUT))?;
    con.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut ps = con.as_pubsub();
    ps.subscribe(EVENTS_CHANNEL)?;
    ps.set_read_timeout(Some(SUBSCRIBE_POLL))?;
    *backoff = BACKOFF_MIN;
    if tx.send(Event::Resync).is_err() {
        return Ok(());
    }
    let mut last_ping = Instant::now();
    loop {
        match ps.get_message() {
            Ok(msg) => {
                let payload = String::from_utf8_lossy(msg.get_payload_bytes());
                if tx.send(Event::parse(&payload)).is_err() {
                    return Ok(());
                }
            }
            Err(e) if e.is_timeout() => {}
            Err(e) => return Err(e),
        }
        if last_ping.elapsed() >= SUBSCRIBE_PING {
            ps.set_read_timeout(Some(IO_TIMEOUT))?;
            let _: redis::Value = ps.ping()?;
            ps.set_read_timeout(Some(SUBSCRIBE_POLL))?;
            last_ping = Instant::now();
        }
    }
}

/// What a full synchronisation read.
struct Snapshot {
    initialised: bool,
    users: HashMap<String, Key>,
    secrets: Vec<String>,
    revoked: HashSet<String>,
}

/// The syncing thread's state.
struct Node {
    client: redis::Client,
    store: Target,
    /// The URL without password, for logs.
    target: String,
    id: String,
    advertise: SocketAddr,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    con: Option<redis::Connection>,
    backoff: Duration,
    next_attempt: Instant,
    /// Since when Redis has been unreachable (None while up).
    down_since: Option<Instant>,
    /// Logged the outage already.
    warned: bool,
    /// Users of the last synchronisation (None before the first).
    known_users: Option<HashSet<String>>,
    known_revoked: HashSet<String>,
}

/// A copy of `v` for the next [`StoreView`] (it is not `Clone`).
fn copy_view(v: &StoreView) -> StoreView {
    StoreView {
        up: v.up,
        users: v.users.clone(),
        secrets: v.secrets.clone(),
        revoked: v.revoked.clone(),
        remote_user_counts: v.remote_user_counts.clone(),
        nodes: v.nodes.clone(),
    }
}

impl Node {
    fn run(&mut self, events: &mpsc::Receiver<Event>, ready: mpsc::Sender<()>) {
        let mut ready = Some(ready);
        let mut next_beat = Instant::now();
        loop {
            if self.shared.is_retired() {
                // Upgraded: the new process publishes this node from now on.
                tracing::info!("fleet store: handed to the new process");
                return;
            }
            if self.con.is_none() && Instant::now() >= self.next_attempt {
                self.connect();
                if self.con.is_some() {
                    next_beat = Instant::now();
                }
            }
            if self.con.is_some() && Instant::now() >= next_beat {
                if let Err(e) = self.heartbeat() {
                    self.lost(&e);
                }
                next_beat = Instant::now() + HEARTBEAT;
            }
            if self.down_since.is_some_and(|t| t.elapsed() >= LEASE) {
                self.forget_remote();
            }
            if let Some(r) = ready.take_if(|_| self.con.is_some() || self.warned) {
                let _ = r.send(());
            }
            let wake = if self.con.is_some() {
                next_beat
            } else {
                self.next_attempt.min(Instant::now() + HEARTBEAT)
            };
            let wait = wake.saturating_duration_since(Instant::now());
            match events.recv_timeout(wait) {
                Ok(ev) => {
                    let mut resync = false;
                    for ev in std::iter::once(ev).chain(events.try_iter()) {
                        match ev {
                            Event::Resync => resync = true,
                            Event::Kill(user) => {
                                tracing::info!(user = %user, "fleet store: ending the user's allocations");
                                self.shared.kill_user(&user);
                            }
                        }
                    }
                    if resync && self.con.is_some() {
                        if let Err(e) = self.sync() {
                            self.lost(&e);
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                // The subscriber never stops while we hold the receiver; if it did,
                // keep syncing every heartbeat anyway.
                Err(mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(wait),
            }
        }
    }

    fn connect(&mut self) {
        let result = self
            .client
            .get_connection_with_timeout(CONNECT_TIMEOUT)
            .and_then(|con| {
                con.set_read_timeout(Some(IO_TIMEOUT))?;
                con.set_write_timeout(Some(IO_TIMEOUT))?;
                Ok(con)
            });
        match result {
            Ok(con) => {
                self.con = Some(con);
                match self.sync() {
                    Ok(()) => {
                        if let Some(t) = self.down_since.take() {
                            if self.warned {
                                tracing::info!(
                                    store = %self.target,
                                    after_ms = t.elapsed().as_millis() as u64,
                                    "fleet store reachable again; resynchronised"
                                );
                            } else {
                                tracing::info!(store = %self.target, "fleet store connected");
                            }
                        }
                        self.warned = false;
                        self.backoff = BACKOFF_MIN;
                        self.metrics.set_store_up(true);
                    }
                    Err(e) => self.lost(&e),
                }
            }
            Err(e) => self.lost(&e),
        }
    }

    /// Redis is unreachable: drop the connection, mark the view down (keeping the
    /// cache), warn once, schedule the next attempt.
    fn lost(&mut self, e: &redis::RedisError) {
        self.con = None;
        if self.down_since.is_none() {
            self.down_since = Some(Instant::now());
        }
        if !self.warned {
            tracing::warn!(
                store = %self.target,
                error = %self.store.explain(e),
                "fleet store unreachable; authenticating from the cached users and secrets, reconnecting"
            );
            self.warned = true;
        } else {
            tracing::debug!(error = %self.store.explain(e), "fleet store still unreachable");
        }
        self.metrics.set_store_up(false);
        let cur = self.shared.store.load();
        if cur.up {
            let mut v = copy_view(&cur);
            v.up = false;
            self.shared.store.store(Arc::new(v));
        }
        self.next_attempt = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    /// The lease of the other nodes' entries has run out while Redis was away.
    fn forget_remote(&self) {
        let cur = self.shared.store.load();
        if cur.remote_user_counts.is_empty() && cur.nodes.is_empty() {
            return;
        }
        let mut v = copy_view(&cur);
        v.remote_user_counts.clear();
        v.nodes.clear();
        self.shared.store.store(Arc::new(v));
    }

    /// Reads users, secrets and revocations whole and swaps them in; ends the
    /// allocations of users that disappeared and of names newly revoked.
    fn sync(&mut self) -> redis::RedisResult<()> {
        let Some(con) = self.con.as_mut() else {
            return Ok(());
        };
        let snap = read_snapshot(con)?;
        let cur = self.shared.store.load();
        if !snap.initialised && (!cur.users.is_empty() || !cur.secrets.is_empty()) {
            tracing::warn!(
                store = %self.target,
                "fleet store has no {VERSION_KEY} (emptied, or restarted without persistence): keeping the cached users and secrets"
            );
            let mut v = copy_view(&cur);
            v.up = true;
            self.shared.store.store(Arc::new(v));
            return Ok(());
        }
        let mut v = copy_view(&cur);
        v.up = true;
        let names: HashSet<String> = snap.users.keys().cloned().collect();
        let mut doomed: Vec<String> = match &self.known_users {
            Some(before) => before.difference(&names).cloned().collect(),
            None => Vec::new(),
        };
        doomed.extend(snap.revoked.difference(&self.known_revoked).cloned());
        v.users = snap.users;
        v.secrets = snap.secrets;
        v.revoked = snap.revoked.clone();
        self.shared.store.store(Arc::new(v));
        self.known_users = Some(names);
        self.known_revoked = snap.revoked;
        if !doomed.is_empty() {
            let counted: Vec<(String, usize)> = if doomed.len() > KILL_ALL_BELOW {
                self.shared.user_counts()
            } else {
                Vec::new()
            };
            let has = |name: &str| {
                counted
                    .iter()
                    .any(|(u, _)| u == name || u.split_once(':').is_some_and(|(_, id)| id == name))
            };
            for name in &doomed {
                if doomed.len() <= KILL_ALL_BELOW || has(name) {
                    tracing::info!(user = %name, "fleet store: user removed or revoked; ending its allocations");
                    self.shared.kill_user(name);
                }
            }
        }
        Ok(())
    }

    /// Publishes this node's load, counts and sessions; reads the other nodes'.
    fn heartbeat(&mut self) -> redis::RedisResult<()> {
        let Some(con) = self.con.as_mut() else {
            return Ok(());
        };
        let lease = LEASE.as_secs();
        let node_key = format!("{NODE_PREFIX}{}", self.id);
        let count_key = format!("{USERCOUNT_PREFIX}{}", self.id);
        let sessions_key = format!("{SESSIONS_PREFIX}{}", self.id);
        let counts = self.shared.user_counts();
        let sessions = self.shared.sessions();
        let mut p = redis::pipe();
        p.atomic();
        if self.shared.is_draining() {
            // Not a redirect target while draining.
            p.cmd("DEL").arg(&node_key).ignore();
        } else {
            p.cmd("HSET")
                .arg(&node_key)
                .arg("addr")
                .arg(self.advertise.to_string())
                .arg("allocations")
                .arg(self.shared.total_allocations())
                .arg("updated")
                .arg(unix_now().as_millis() as u64)
                .ignore();
            p.cmd("EXPIRE").arg(&node_key).arg(lease).ignore();
        }
        p.cmd("DEL").arg(&count_key).ignore();
        if !counts.is_empty() {
            let mut c = redis::cmd("HSET");
            c.arg(&count_key);
            for (user, n) in &counts {
                c.arg(user).arg(*n);
            }
            p.add_command(c).ignore();
            p.cmd("EXPIRE").arg(&count_key).arg(lease).ignore();
        }
        p.cmd("DEL").arg(&sessions_key).ignore();
        if !sessions.is_empty() {
            let mut c = redis::cmd("HSET");
            c.arg(&sessions_key);
            for s in &sessions {
                let rec = SessionRecord {
                    user: s.user.clone(),
                    transport: s.transport.to_string(),
                    client: s.client.to_string(),
                    relay: s.relay.to_string(),
                    started: s.started,
                    bytes_to_peer: s.bytes_to_peer,
                    bytes_to_client: s.bytes_to_client,
                };
                let json = serde_json::to_string(&rec).unwrap_or_default();
                c.arg(s.id).arg(json);
            }
            p.add_command(c).ignore();
            p.cmd("EXPIRE").arg(&sessions_key).arg(lease).ignore();
        }
        p.exec(con)?;

        // The other nodes.
        let ids = scan_ids(con, NODE_PREFIX)?
            .into_iter()
            .chain(scan_ids(con, USERCOUNT_PREFIX)?)
            .filter(|id| *id != self.id)
            .collect::<HashSet<String>>();
        let mut ids: Vec<String> = ids.into_iter().collect();
        ids.sort();
        let mut p = redis::pipe();
        for id in &ids {
            p.cmd("HGETALL").arg(format!("{NODE_PREFIX}{id}"));
            p.cmd("HGETALL").arg(format!("{USERCOUNT_PREFIX}{id}"));
        }
        let replies: Vec<HashMap<String, String>> = if ids.is_empty() {
            Vec::new()
        } else {
            p.query(con)?
        };
        let mut nodes = Vec::new();
        let mut remote: HashMap<String, usize> = HashMap::new();
        for (id, pair) in ids.iter().zip(replies.chunks(2)) {
            let [node, counts] = pair else { continue };
            if let (Some(addr), Some(allocations)) = (
                node.get("addr").and_then(|a| a.parse::<SocketAddr>().ok()),
                node.get("allocations")
                    .and_then(|a| a.parse::<usize>().ok()),
            ) {
                nodes.push(NodeLoad {
                    id: id.clone(),
                    addr,
                    allocations,
                });
            }
            for (user, n) in counts {
                if let Ok(n) = n.parse::<usize>() {
                    *remote.entry(user.clone()).or_default() += n;
                }
            }
        }
        let cur = self.shared.store.load();
        let same_nodes =
            cur.nodes.len() == nodes.len()
                && cur.nodes.iter().zip(&nodes).all(|(a, b)| {
                    a.id == b.id && a.addr == b.addr && a.allocations == b.allocations
                });
        if !cur.up || !same_nodes || cur.remote_user_counts != remote {
            let mut v = copy_view(&cur);
            v.up = true;
            v.nodes = nodes;
            v.remote_user_counts = remote;
            self.shared.store.store(Arc::new(v));
        }
        Ok(())
    }
}

fn read_snapshot(con: &mut redis::Connection) -> redis::RedisResult<Snapshot> {
    let (version, users, secrets, revoked): (
        Option<String>,
        HashMap<String, String>,
        Vec<String>,
        HashSet<String>,
    ) = redis::pipe()
        .cmd("GET")
        .arg(VERSION_KEY)
        .cmd("HGETALL")
        .arg(USERS_KEY)
        .cmd("SMEMBERS")
        .arg(SECRETS_KEY)
        .cmd("SMEMBERS")
        .arg(REVOKED_KEY)
        .query(con)?;
    let mut keys = HashMap::with_capacity(users.len());
    for (user, hex) in users {
        match key_from_hex(&hex) {
            Some(k) => {
                keys.insert(user, k);
            }
            None => {
                tracing::warn!(user = %user, "fleet store: {USERS_KEY} value is not a 32-hex-digit key; ignored")
            }
        }
    }
    let mut secrets = secrets;
    secrets.sort();
    Ok(Snapshot {
        initialised: version.is_some(),
        users: keys,
        secrets,
        revoked,
    })
}

/// The `<id>` of every key `<prefix><id>` (SCAN; a fleet has few nodes).
fn scan_ids(con: &mut redis::Connection, prefix: &str) -> redis::RedisResult<Vec<String>> {
    let mut cursor = 0u64;
    let mut ids = Vec::new();
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query(con)?;
        ids.extend(
            keys.iter()
                .filter_map(|k| k.strip_prefix(prefix))
                .map(str::to_string),
        );
        if next == 0 || ids.len() > 100_000 {
            return Ok(ids);
        }
        cursor = next;
    }
}

// ---------------------------------------------------------------------------------------------
// Administration (the `turnstone users|secrets|sessions` commands)
// ---------------------------------------------------------------------------------------------

fn admin_connect(store: &Target) -> anyhow::Result<redis::Connection> {
    let client = store.client()?;
    let con = client
        .get_connection_with_timeout(CONNECT_TIMEOUT)
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the fleet store at {}: {}",
                redact(&store.url),
                store.explain(&e)
            )
        })?;
    con.set_read_timeout(Some(IO_TIMEOUT))?;
    con.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(con)
}

/// Runs `change` and the schema marker in one MULTI/EXEC, then publishes `event`.
fn admin_change(store: &Target, change: &mut redis::Pipeline, event: &str) -> anyhow::Result<()> {
    let mut con = admin_connect(store)?;
    change
        .atomic()
        .cmd("SET")
        .arg(VERSION_KEY)
        .arg(SCHEMA_VERSION)
        .ignore()
        .cmd("PUBLISH")
        .arg(EVENTS_CHANNEL)
        .arg(event)
        .ignore();
    change.exec(&mut con).context("fleet store")?;
    Ok(())
}

/// Reads the password: the given one, or the first line of standard input.
fn password_or_stdin(password: Option<String>) -> anyhow::Result<String> {
    if let Some(p) = password {
        return Ok(p);
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the password from standard input")?;
    let p = line.trim_end_matches(['\r', '\n']).to_string();
    anyhow::ensure!(
        !p.is_empty(),
        "no password: give --password or one line on standard input"
    );
    Ok(p)
}

/// `turnstone users add NAME --realm R [--password P]`: stores the long-term key.
pub fn users_add(
    store: &Target,
    name: &str,
    realm: &str,
    password: Option<String>,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        !name.is_empty() && name.len() <= 513,
        "user name: 1 to 513 bytes"
    );
    let password = password_or_stdin(password)?;
    let key = crate::auth::long_term_key(name, realm, &password);
    admin_change(
        store,
        redis::pipe()
            .cmd("HSET")
            .arg(USERS_KEY)
            .arg(name)
            .arg(key_to_hex(&key))
            .ignore(),
        "users",
    )?;
    println!("user {name} added (realm {realm})");
    Ok(())
}

/// `turnstone users remove NAME`: every node ends the user's allocations.
pub fn users_remove(store: &Target, name: &str) -> anyhow::Result<()> {
    let mut con = admin_connect(store)?;
    let removed: i64 = redis::cmd("HDEL")
        .arg(USERS_KEY)
        .arg(name)
        .query(&mut con)?;
    redis::pipe()
        .cmd("SET")
        .arg(VERSION_KEY)
        .arg(SCHEMA_VERSION)
        .ignore()
        .cmd("PUBLISH")
        .arg(EVENTS_CHANNEL)
        .arg("users")
        .ignore()
        .exec(&mut con)?;
    anyhow::ensure!(removed > 0, "no user {name} in the fleet store");
    println!("user {name} removed");
    Ok(())
}

/// `turnstone users list`: the user names, sorted.
pub fn users_list(store: &Target) -> anyhow::Result<()> {
    let mut con = admin_connect(store)?;
    let mut names: Vec<String> = redis::cmd("HKEYS").arg(USERS_KEY).query(&mut con)?;
    let revoked: HashSet<String> = redis::cmd("SMEMBERS").arg(REVOKED_KEY).query(&mut con)?;
    names.sort();
    for n in &names {
        if revoked.contains(n) {
            println!("{n}\t(revoked)");
        } else {
            println!("{n}");
        }
    }
    let mut only_revoked: Vec<&String> = revoked.iter().filter(|r| !names.contains(r)).collect();
    only_revoked.sort();
    for r in only_revoked {
        println!("{r}\t(revoked id)");
    }
    Ok(())
}

/// `turnstone users revoke ID` / `unrevoke ID`.
pub fn users_revoke(store: &Target, id: &str, revoke: bool) -> anyhow::Result<()> {
    let op = if revoke { "SADD" } else { "SREM" };
    admin_change(
        store,
        redis::pipe().cmd(op).arg(REVOKED_KEY).arg(id).ignore(),
        "revoked",
    )?;
    println!("{id} {}", if revoke { "revoked" } else { "unrevoked" });
    Ok(())
}

/// `turnstone secrets add|remove SECRET`.
pub fn secrets_change(store: &Target, secret: &str, add: bool) -> anyhow::Result<()> {
    anyhow::ensure!(!secret.is_empty(), "empty secret");
    let op = if add { "SADD" } else { "SREM" };
    admin_change(
        store,
        redis::pipe().cmd(op).arg(SECRETS_KEY).arg(secret).ignore(),
        "secrets",
    )?;
    println!("secret {}", if add { "added" } else { "removed" });
    Ok(())
}

/// `turnstone secrets list`.
pub fn secrets_list(store: &Target) -> anyhow::Result<()> {
    let mut con = admin_connect(store)?;
    let mut s: Vec<String> = redis::cmd("SMEMBERS").arg(SECRETS_KEY).query(&mut con)?;
    s.sort();
    for secret in s {
        println!("{secret}");
    }
    Ok(())
}

/// Every node's published sessions: (node, allocation id, record).
pub fn fleet_sessions(store: &Target) -> anyhow::Result<Vec<(String, u64, SessionRecord)>> {
    let mut con = admin_connect(store)?;
    let mut out = Vec::new();
    let mut nodes = scan_ids(&mut con, SESSIONS_PREFIX)?;
    nodes.sort();
    for node in nodes {
        let map: BTreeMap<String, String> = redis::cmd("HGETALL")
            .arg(format!("{SESSIONS_PREFIX}{node}"))
            .query(&mut con)?;
        for (id, json) in map {
            let (Ok(id), Ok(rec)) = (id.parse::<u64>(), serde_json::from_str(&json)) else {
                continue;
            };
            out.push((node.clone(), id, rec));
        }
    }
    out.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    Ok(out)
}

/// `turnstone sessions`: a table of every node's live allocations.
pub fn sessions_list(store: &Target) -> anyhow::Result<()> {
    let sessions = fleet_sessions(store)?;
    let now = unix_now().as_secs();
    let rows: Vec<[String; 8]> = sessions
        .into_iter()
        .map(|(node, id, r)| {
            [
                node,
                id.to_string(),
                r.user,
                r.transport,
                r.client,
                r.relay,
                humantime::format_duration(Duration::from_secs(now.saturating_sub(r.started)))
                    .to_string(),
                format!("{}/{}", r.bytes_to_peer, r.bytes_to_client),
            ]
        })
        .collect();
    let header = [
        "NODE",
        "ID",
        "USER",
        "TRANSPORT",
        "CLIENT",
        "RELAY",
        "AGE",
        "BYTES(to peer/to client)",
    ];
    let mut width = header.map(str::len);
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: &[&str]| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(width).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        println!("{}", s.trim_end());
    };
    line(&header);
    for r in &rows {
        let cells: Vec<&str> = r.iter().map(String::as_str).collect();
        line(&cells);
    }
    println!("{} session(s)", rows.len());
    Ok(())
}

/// `turnstone sessions kill --user U`: every node ends U's allocations.
pub fn sessions_kill(store: &Target, user: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !user.is_empty() && !user.contains(char::is_whitespace),
        "bad user name"
    );
    let mut con = admin_connect(store)?;
    let receivers: i64 = redis::cmd("PUBLISH")
        .arg(EVENTS_CHANNEL)
        .arg(format!("kill {user}"))
        .query(&mut con)?;
    println!("asked {receivers} node(s) to end the allocations of {user}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_keys_round_trip() {
        let k = crate::auth::long_term_key("alice", "example.org", "pw");
        let h = key_to_hex(&k);
        assert_eq!(h.len(), 32);
        assert_eq!(key_from_hex(&h), Some(k));
        assert_eq!(key_from_hex(&h.to_uppercase()), Some(k));
        assert_eq!(key_from_hex("xyz"), None);
        assert_eq!(key_from_hex(&"g".repeat(32)), None);
        assert_eq!(key_from_hex(&"é".repeat(16)), None);
    }

    #[test]
    fn events_parse() {
        assert_eq!(Event::parse("users"), Event::Resync);
        assert_eq!(Event::parse("revoked"), Event::Resync);
        assert_eq!(Event::parse("kill bob"), Event::Kill("bob".into()));
        assert_eq!(Event::parse("kill "), Event::Resync);
        assert_eq!(Event::parse("whatever"), Event::Resync);
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact("redis://:pw@host:6379/0"),
            "redis://:***@host:6379/0"
        );
        assert_eq!(redact("redis://host:6379"), "redis://host:6379");
        // A Redis ACL user name is kept; the password goes, '@' in it included.
        assert_eq!(
            redact("rediss://turn:p@ss@redis.example:6380/1"),
            "rediss://turn:***@redis.example:6380/1"
        );
        assert_eq!(redact("rediss://tok@host:6380"), "rediss://***@host:6380");
        assert_eq!(
            redact("rediss://u:a/b@c@host:6380/2"),
            "rediss://u:***@host:6380/2"
        );
        assert_eq!(redact("not a url"), "not a url");
        let t = Target::node("rediss://turn:hunter2@h:1/0", None);
        assert!(!format!("{t:?}").contains("hunter2"));
    }

    #[test]
    fn default_identity() {
        let mut c = Config::development();
        let id = node_id(&c);
        assert!(id.ends_with(":3478"), "{id}");
        assert_eq!(advertise(&c), "127.0.0.1:3478".parse().unwrap());
        c.store.node_id = Some("n1".into());
        assert_eq!(node_id(&c), "n1");
        c.listen[0].address = "0.0.0.0:3478".parse().unwrap();
        c.relay.external_addresses = vec!["203.0.113.9".parse().unwrap()];
        assert_eq!(advertise(&c), "203.0.113.9:3478".parse().unwrap());
    }
}
