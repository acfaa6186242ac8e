//! Replays the real client messages of `tests/corpus` (Chromium, Firefox, aioice and
//! coturn's tools, captured against coturn 4.6.1; see its README.md) through the
//! sans-I/O core, and checks that every request parses and that our answers are the
//! ones RFC 8489 / RFC 8656 ask for.
//!
//! One `Server` (realm `bars.test`, user `bench`/`bench`, peers in 127.0.0.0/8 allowed,
//! a mock relay binder) per capture folder, one client 5-tuple per folder (the client
//! address coturn reported in the folder's XOR-MAPPED-ADDRESS / MAPPED-ADDRESS).
//! Expectations come from the messages themselves and from a small model of the state
//! our replay built (allocation, permissions, channels), not from file counts:
//!
//! - unauthenticated requests get 401 with REALM and a NONCE, and no state is kept;
//! - authenticated requests carry coturn's nonce: 438 with a new NONCE and REALM
//!   (RFC 8489 9.2.4); the same request re-signed with our nonce then gets the RFC
//!   8656 answer (Allocate / Refresh / CreatePermission / ChannelBind);
//! - Binding requests (RFC 5389 and RFC 3489) and CHANGE-REQUEST;
//! - Send indications and ChannelData from the client come out towards the peer;
//!   coturn's Data indications and ChannelData towards the client are compared with our
//!   own framing of the same payload (`handle_peer`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use md5::{Digest, Md5};

mod common;
use common::corpus::{corpus_dir, index_rows};
use common::unknown_attributes;
use turnstone::auth::{Credentials, NonceMaker};
use turnstone::policy::PeerPolicy;
use turnstone::proto::{self, attr, method, Class, Message, MessageWriter};
use turnstone::server::{
    BindError, BindResult, Clock, FiveTuple, Limits, Output, RelayAddrs, RelayBinder, RelayHandle,
    Runtime, Server, Shared, Transport, PEER_HEADROOM, PEER_TAILROOM,
};

const REALM: &str = "bars.test";
const USER: &str = "bench";
const PASSWORD: &str = "bench";
const SOFTWARE: &str = "turnstone-corpus-replay";
/// The coturn server of the captures listened on 127.0.0.1:3578.
const SERVER_ADDR: ([u8; 4], u16) = ([127, 0, 0, 1], 3578);
const T0_UNIX: u64 = 1_800_000_000;
const DEFAULT_LIFETIME: u32 = 600;
const MAX_LIFETIME: u32 = 3600;
const RELAY_PORT_MIN: u16 = 50_000;

// ---------------------------------------------------------------------------
// Corpus files
// ---------------------------------------------------------------------------

/// `index.tsv`: file -> transport ("udp" / "tcp").
fn load_transports() -> BTreeMap<String, String> {
    index_rows()
        .into_iter()
        .filter_map(|f| Some((f.first()?.clone(), f.get(1)?.clone())))
        .collect()
}

struct CorpusFile {
    /// "folder/NNN-dir-kind.bin"
    name: String,
    c2s: bool,
    kind: String,
    bytes: Vec<u8>,
}

/// The capture folders in name order, each with its `.bin` files in capture order.
fn folders(dir: &Path) -> Vec<(String, Vec<CorpusFile>)> {
    let mut out = Vec::new();
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .expect("read corpus dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.is_dir())
        .collect();
    entries.sort();
    for folder in entries {
        let fname = folder.file_name().unwrap().to_string_lossy().into_owned();
        let mut files: Vec<PathBuf> = fs::read_dir(&folder)
            .expect("read folder")
            .map(|e| e.expect("dir entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "bin"))
            .collect();
        if files.is_empty() {
            continue; // pcap/, tools/
        }
        files.sort();
        let files = files
            .into_iter()
            .map(|p| {
                let base = p.file_name().unwrap().to_string_lossy().into_owned();
                // NNN-<c2s|s2c>-<kind>.bin
                let stem = base.trim_end_matches(".bin");
                let mut parts = stem.splitn(3, '-');
                let _nnn = parts.next();
                let dir = parts.next().unwrap_or_default();
                let kind = parts.next().unwrap_or_default().to_string();
                assert!(
                    dir == "c2s" || dir == "s2c",
                    "{fname}/{base}: file name is not NNN-<c2s|s2c>-<kind>.bin"
                );
                CorpusFile {
                    name: format!("{fname}/{base}"),
                    c2s: dir == "c2s",
                    kind,
                    bytes: fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display())),
                }
            })
            .collect();
        out.push((fname, files));
    }
    out
}

fn is_rfc3489(bytes: &[u8]) -> bool {
    bytes.get(4..8) != Some(&proto::MAGIC_COOKIE.to_be_bytes()[..])
}

/// The client address coturn saw: XOR-MAPPED-ADDRESS of a success response, or the
/// MAPPED-ADDRESS of an RFC 3489 Binding success.
fn folder_client(files: &[CorpusFile]) -> Option<SocketAddr> {
    files
        .iter()
        .filter(|f| !f.c2s && !f.kind.starts_with("inner-") && f.kind != "channeldata")
        .find_map(|f| {
            if is_rfc3489(&f.bytes) {
                let m = Message::parse_rfc3489(&f.bytes).ok()?;
                (m.class() == Class::Success)
                    .then(|| m.address(attr::MAPPED_ADDRESS).ok().flatten())
                    .flatten()
            } else {
                let m = Message::parse(&f.bytes).ok()?;
                (m.class() == Class::Success)
                    .then(|| m.xor_address(attr::XOR_MAPPED_ADDRESS).ok().flatten())
                    .flatten()
            }
        })
}

fn bench_key() -> [u8; 16] {
    Md5::digest(format!("{USER}:{REALM}:{PASSWORD}").as_bytes()).into()
}

// ---------------------------------------------------------------------------
// The server under test
// ---------------------------------------------------------------------------

#[derive(Default)]
struct MockBinder {
    next_port: u16,
    next_handle: u32,
    live: Vec<(RelayHandle, SocketAddr)>,
    released: Vec<RelayHandle>,
}

impl MockBinder {
    fn one(&mut self, ip: IpAddr, even: bool) -> (RelayHandle, SocketAddr) {
        if self.next_port < RELAY_PORT_MIN {
            self.next_port = RELAY_PORT_MIN;
        }
        if even && self.next_port % 2 == 1 {
            self.next_port += 1;
        }
        let h = RelayHandle(self.next_handle);
        self.next_handle += 1;
        let addr = SocketAddr::new(ip, self.next_port);
        self.next_port += 1;
        self.live.push((h, addr));
        (h, addr)
    }
}

impl RelayBinder for MockBinder {
    fn bind(&mut self, ip: IpAddr, even_port: bool, reserve_next: bool) -> BindResult {
        if self.live.len() >= 1000 {
            return Err(BindError::Exhausted);
        }
        let (h, a) = self.one(ip, even_port);
        let next = reserve_next.then(|| self.one(ip, false));
        Ok((h, a, next))
    }
    fn release(&mut self, relay: RelayHandle) {
        self.live.retain(|(h, _)| *h != relay);
        self.released.push(relay);
    }
}

fn runtime() -> Runtime {
    let mut users = BTreeMap::new();
    users.insert(USER.to_string(), PASSWORD.to_string());
    let allow: Vec<ipnet::IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
    Runtime {
        realm: REALM.into(),
        software: Some(SOFTWARE.into()),
        credentials: Credentials::new(REALM, &users, &[]),
        nonces: NonceMaker::new([0x5a; 32], 600),
        policy: PeerPolicy::new(&allow, &[]),
        limits: Limits {
            max_bandwidth_per_allocation: 0,
            max_total_bandwidth: 0,
            unauthenticated_rate: 0,
            max_allocations: 1000,
            max_allocations_per_user: 1000,
            max_allocations_per_rest_user: 1000,
            max_permissions_per_allocation: 64,
            max_channels_per_allocation: 64,
            default_lifetime: Duration::from_secs(u64::from(DEFAULT_LIFETIME)),
            max_lifetime: Duration::from_secs(u64::from(MAX_LIFETIME)),
            permission_lifetime: turnstone::server::PERMISSION_LIFETIME,
            channel_lifetime: turnstone::server::CHANNEL_LIFETIME,
        },
        alternate_servers: Vec::new(),
        redirect_above: 0,
        usage_interval: None,
        kernel_fast_path: false,
        relay: RelayAddrs {
            v4: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            ..Default::default()
        },
    }
}

/// An owned copy of an [`Output`].
#[derive(Debug, PartialEq, Eq)]
enum Out {
    Nothing,
    ToClient(Vec<u8>),
    ToPeer {
        relay: RelayHandle,
        peer: SocketAddr,
        data: Vec<u8>,
    },
}

/// What our replay has built so far on the folder's 5-tuple.
#[derive(Default)]
struct Model {
    relay: Option<RelayHandle>,
    perms: HashSet<IpAddr>,
    channels: HashMap<u16, SocketAddr>,
}

impl Model {
    fn clear(&mut self) {
        *self = Model::default();
    }
    fn channel_of_peer(&self, peer: SocketAddr) -> Option<u16> {
        self.channels
            .iter()
            .find(|(_, p)| **p == peer)
            .map(|(n, _)| *n)
    }
}

#[derive(Default, Debug)]
struct Stats {
    requests_parsed: usize,
    challenges_401: usize,
    stale_438: usize,
    allocate_ok: usize,
    allocate_437: usize,
    refresh_ok: usize,
    refresh_delete: usize,
    create_permission_ok: usize,
    channel_bind_ok: usize,
    channel_bind_above_4fff: usize,
    binding_ok: usize,
    binding_420: usize,
    rfc3489_ok: usize,
    rfc3489_dropped: usize,
    send_to_peer: usize,
    channel_data_to_peer: usize,
    channel_data_unbound_dropped: usize,
    data_indication_framed: usize,
    channel_data_framed: usize,
    s2c_channel_data_unbound_skipped: usize,
}

struct Replay {
    server: Server,
    binder: MockBinder,
    t0: Instant,
    step: u64,
    ft: FiveTuple,
    model: Model,
    key: [u8; 16],
    stats: Stats,
    /// Extra 5-tuples used for a second Allocate while the first allocation lives.
    extra_tuples: u16,
}

impl Replay {
    fn new(ft: FiveTuple) -> Replay {
        let mut server = Server::new(Shared::new(runtime()));
        server.set_collect_events(false);
        Replay {
            server,
            binder: MockBinder::default(),
            t0: Instant::now(),
            step: 0,
            ft,
            model: Model::default(),
            key: bench_key(),
            stats: Stats::default(),
            extra_tuples: 0,
        }
    }

    fn clock(&self) -> Clock {
        Clock {
            now: self.t0 + Duration::from_secs(self.step),
            unix: T0_UNIX + self.step,
        }
    }

    fn feed(&mut self, ft: FiveTuple, bytes: &[u8]) -> Out {
        let clock = self.clock();
        match self
            .server
            .handle_client(ft, bytes, clock, &mut self.binder)
        {
            Output::Nothing => Out::Nothing,
            Output::ToClient(d) => Out::ToClient(d.to_vec()),
            Output::ToPeer { relay, peer, data } => Out::ToPeer {
                relay,
                peer,
                data: data.to_vec(),
            },
        }
    }

    /// Feeds a request and returns the answer, which must be a STUN response to it.
    fn ask(&mut self, ft: FiveTuple, bytes: &[u8], what: &str) -> Vec<u8> {
        match self.feed(ft, bytes) {
            Out::ToClient(r) => r,
            other => panic!("{what}: expected a response to the client, got {other:?}"),
        }
    }

    fn allocation_count(&self) -> usize {
        self.server.allocation_count()
    }

    fn replay_folder(&mut self, folder: &str, files: &[CorpusFile]) {
        for f in files {
            self.step += 1;
            if f.kind.starts_with("inner-") {
                continue;
            }
            match (f.c2s, f.kind == "channeldata") {
                (true, true) => self.client_channel_data(f),
                (true, false) => self.client_stun(f),
                (false, true) => self.peer_channel_data(folder, f),
                (false, false) => {
                    if f.kind == "data-indication" {
                        self.peer_data_indication(f);
                    }
                }
            }
        }
    }

    // ----------------------------------------------------------- client -> server

    fn client_stun(&mut self, f: &CorpusFile) {
        if is_rfc3489(&f.bytes) {
            return self.rfc3489_binding(f);
        }
        let msg = Message::parse(&f.bytes)
            .unwrap_or_else(|e| panic!("{}: captured request does not parse: {e}", f.name));
        self.stats.requests_parsed += 1;
        if msg.has_fingerprint() {
            assert_eq!(
                msg.verify_fingerprint(),
                Some(true),
                "{}: captured FINGERPRINT",
                f.name
            );
        }
        match msg.class() {
            Class::Indication => {
                assert_eq!(msg.method(), method::SEND, "{}: c2s indication", f.name);
                self.send_indication(f, &msg);
            }
            Class::Request => match msg.method() {
                method::BINDING => self.binding(f, &msg),
                method::ALLOCATE
                | method::REFRESH
                | method::CREATE_PERMISSION
                | method::CHANNEL_BIND => self.turn_request(f, &msg),
                m => panic!("{}: unexpected request method {m:#05x}", f.name),
            },
            c => panic!("{}: c2s message of class {c:?}", f.name),
        }
    }

    fn rfc3489_binding(&mut self, f: &CorpusFile) {
        let msg = Message::parse_rfc3489(&f.bytes).unwrap_or_else(|e| {
            panic!("{}: captured RFC 3489 request does not parse: {e}", f.name)
        });
        self.stats.requests_parsed += 1;
        assert_eq!(msg.method(), method::BINDING, "{}", f.name);
        assert_eq!(msg.class(), Class::Request, "{}", f.name);
        let change = msg
            .get(attr::CHANGE_REQUEST)
            .is_some_and(|v| v.iter().any(|b| *b != 0));
        let out = self.feed(self.ft, &f.bytes);
        if change {
            // We have one address: a classic client asking to change IP or port gets no
            // answer (what the core does; RFC 3489 has no 420 for it, and the client
            // treats silence as "no such response", the right conclusion here).
            assert_eq!(
                out,
                Out::Nothing,
                "{}: RFC 3489 Binding with CHANGE-REQUEST flags set",
                f.name
            );
            self.stats.rfc3489_dropped += 1;
            return;
        }
        let Out::ToClient(resp) = out else {
            panic!(
                "{}: RFC 3489 Binding got {out:?}, expected a response",
                f.name
            );
        };
        assert!(
            is_rfc3489(&resp),
            "{}: answer to an RFC 3489 request must echo its 16-byte transaction ID",
            f.name
        );
        let r = Message::parse_rfc3489(&resp)
            .unwrap_or_else(|e| panic!("{}: our RFC 3489 answer does not parse: {e}", f.name));
        assert_eq!(r.method(), method::BINDING, "{}", f.name);
        assert_eq!(r.class(), Class::Success, "{}", f.name);
        assert_eq!(
            r.transaction_id_rfc3489(),
            msg.transaction_id_rfc3489(),
            "{}: transaction ID",
            f.name
        );
        assert_eq!(
            r.address(attr::MAPPED_ADDRESS).expect("MAPPED-ADDRESS"),
            Some(self.ft.client),
            "{}: MAPPED-ADDRESS must be the client's address (RFC 3489 11.2.1)",
            f.name
        );
        assert!(
            !r.has(attr::XOR_MAPPED_ADDRESS),
            "{}: XOR-MAPPED-ADDRESS needs the magic cookie; an RFC 3489 client cannot use it",
            f.name
        );
        self.stats.rfc3489_ok += 1;
    }

    fn binding(&mut self, f: &CorpusFile, msg: &Message<'_>) {
        let resp = self.ask(self.ft, &f.bytes, &f.name);
        let r = parse_response(&resp, msg, &f.name);
        let change = msg
            .get(attr::CHANGE_REQUEST)
            .is_some_and(|v| v.iter().any(|b| *b != 0));
        if change {
            // RFC 5780 7.2: a server without an alternate address answers 420 to a
            // CHANGE-REQUEST asking to change IP or port, listing CHANGE-REQUEST in
            // UNKNOWN-ATTRIBUTES (RFC 8489 14.9 requires the attribute with 420).
            assert_error(&r, 420, &f.name);
            let unknown = unknown_attributes(&r);
            assert!(
                unknown.contains(&attr::CHANGE_REQUEST),
                "{}: 420 must list CHANGE-REQUEST 0x0003 in UNKNOWN-ATTRIBUTES, got {unknown:04x?}",
                f.name
            );
            self.stats.binding_420 += 1;
        } else {
            assert_eq!(r.class(), Class::Success, "{}: Binding answer", f.name);
            assert_eq!(
                r.xor_address(attr::XOR_MAPPED_ADDRESS)
                    .expect("XOR-MAPPED-ADDRESS decodes"),
                Some(self.ft.client),
                "{}: XOR-MAPPED-ADDRESS must be the client's address (RFC 8489 7.3.1)",
                f.name
            );
            if let Some(a) = r.address(attr::MAPPED_ADDRESS).expect("MAPPED-ADDRESS") {
                assert_eq!(a, self.ft.client, "{}: MAPPED-ADDRESS", f.name);
            }
            self.stats.binding_ok += 1;
        }
        assert_no_integrity(&r, &f.name);
    }

    /// Allocate, Refresh, CreatePermission, ChannelBind.
    fn turn_request(&mut self, f: &CorpusFile, msg: &Message<'_>) {
        let before = self.allocation_count();
        let resp = self.ask(self.ft, &f.bytes, &f.name);
        let r = parse_response(&resp, msg, &f.name);
        if !msg.has_message_integrity() {
            // RFC 8489 9.2.4: no MESSAGE-INTEGRITY -> 401 with REALM and NONCE.
            let nonce = assert_challenge(&r, 401, &f.name);
            assert!(!nonce.is_empty(), "{}", f.name);
            assert_eq!(
                self.allocation_count(),
                before,
                "{}: a 401 must not create state",
                f.name
            );
            self.stats.challenges_401 += 1;
            return;
        }
        assert!(
            msg.verify_integrity(&self.key),
            "{}: captured MESSAGE-INTEGRITY does not verify with MD5(\"bench:bars.test:bench\")",
            f.name
        );
        // coturn's nonce is not one of ours: 438 Stale Nonce with a new NONCE and REALM
        // (RFC 8489 9.2.4 says 438 for a nonce that is no longer valid).
        let coturn_nonce = msg.nonce().expect("NONCE").unwrap_or_default().to_string();
        let nonce = assert_challenge(&r, 438, &f.name);
        assert_ne!(
            nonce, coturn_nonce,
            "{}: 438 must carry a new nonce",
            f.name
        );
        assert_eq!(
            self.allocation_count(),
            before,
            "{}: a 438 must not change state",
            f.name
        );
        self.stats.stale_438 += 1;

        let signed = resign(msg, &nonce, &self.key);
        let what = format!("{} (re-signed with our nonce)", f.name);
        let s = Message::parse(&signed).expect("re-signed request parses");
        assert!(s.verify_integrity(&self.key), "{what}: our own signature");
        let orig: Vec<u16> = msg.attributes().map(|(t, _)| t).collect();
        let ours: Vec<u16> = s.attributes().map(|(t, _)| t).collect();
        assert_eq!(orig, ours, "{what}: attribute order kept");

        match msg.method() {
            method::ALLOCATE => self.allocate(&s, &what),
            method::REFRESH => self.refresh(&s, &what),
            method::CREATE_PERMISSION => self.create_permission(&s, &what),
            _ => self.channel_bind(&s, &what),
        }
    }

    fn allocate(&mut self, s: &Message<'_>, what: &str) {
        if self.model.relay.is_some() {
            // RFC 8656 7.2 step 2: the 5-tuple is in use -> 437 Allocation Mismatch.
            // (The capture's second Allocate came from another client socket.)
            let resp = self.ask(self.ft, s.raw(), what);
            let r = parse_response(&resp, s, what);
            assert_error(&r, 437, what);
            assert!(
                r.verify_integrity(&self.key),
                "{what}: 437 to an authenticated request must carry MESSAGE-INTEGRITY \
                 (RFC 8489 9.2.4)"
            );
            self.stats.allocate_437 += 1;
            // ...and replay it on a 5-tuple of its own, as the client did.
            self.extra_tuples += 1;
            let mut ft = self.ft;
            ft.client
                .set_port(ft.client.port().wrapping_add(self.extra_tuples));
            // Our nonces are bound to the client's address, not its port, so the
            // same signed request is valid from the new socket.
            let (relay, _) = self.allocate_on(ft, s, what);
            // Leave no trace of it for the rest of the replay.
            self.delete_allocation(ft, relay);
            return;
        }
        let (relay, _) = self.allocate_on(self.ft, s, what);
        self.model.relay = Some(relay);
    }

    /// A fresh Allocate on `ft`: checks the success response (RFC 8656 7.2).
    fn allocate_on(
        &mut self,
        ft: FiveTuple,
        s: &Message<'_>,
        what: &str,
    ) -> (RelayHandle, SocketAddr) {
        let before = self.allocation_count();
        let resp = self.ask(ft, s.raw(), what);
        let r = parse_response(&resp, s, what);
        assert_eq!(
            r.class(),
            Class::Success,
            "{what}: Allocate failed: {:?}",
            r.error_code()
        );
        let relayed = r
            .xor_address(attr::XOR_RELAYED_ADDRESS)
            .expect("XOR-RELAYED-ADDRESS decodes")
            .unwrap_or_else(|| panic!("{what}: no XOR-RELAYED-ADDRESS"));
        assert_eq!(
            relayed.ip(),
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            "{what}: relay IP"
        );
        assert_eq!(
            r.xor_address(attr::XOR_MAPPED_ADDRESS)
                .expect("XOR-MAPPED-ADDRESS decodes"),
            Some(ft.client),
            "{what}: XOR-MAPPED-ADDRESS must be the client's address (RFC 8656 7.2)"
        );
        let requested = s.lifetime().expect("LIFETIME");
        assert_eq!(
            r.lifetime().expect("LIFETIME decodes"),
            Some(granted_lifetime(requested)),
            "{what}: LIFETIME granted for a request of {requested:?} (RFC 8656 7.2)"
        );
        match s.even_port().expect("EVEN-PORT") {
            Some(reserve) => {
                assert_eq!(
                    relayed.port() % 2,
                    0,
                    "{what}: EVEN-PORT asks for an even relay port (RFC 8656 7.2)"
                );
                assert_eq!(
                    r.has(attr::RESERVATION_TOKEN),
                    reserve,
                    "{what}: RESERVATION-TOKEN iff the R bit was set"
                );
            }
            None => assert!(!r.has(attr::RESERVATION_TOKEN), "{what}"),
        }
        assert!(
            r.verify_integrity(&self.key),
            "{what}: success must carry MESSAGE-INTEGRITY with the long-term key"
        );
        assert_eq!(self.allocation_count(), before + 1, "{what}");
        let a = self
            .server
            .allocation_by_five_tuple(&ft)
            .unwrap_or_else(|| panic!("{what}: no allocation kept for the 5-tuple"));
        assert_eq!(a.advertised, relayed, "{what}: advertised relay address");
        assert!(
            self.binder.live.iter().any(|(h, _)| *h == a.relay),
            "{what}: relay handle not bound by the binder"
        );
        self.stats.allocate_ok += 1;
        (a.relay, relayed)
    }

    /// Deletes the allocation on `ft` with a Refresh LIFETIME=0 we build ourselves.
    fn delete_allocation(&mut self, ft: FiveTuple, relay: RelayHandle) {
        let nonce = self
            .server
            .shared()
            .runtime
            .load()
            .nonces
            .make(ft.client, self.clock().unix);
        let mut buf = Vec::new();
        let mut w = MessageWriter::new(
            &mut buf,
            method::REFRESH,
            Class::Request,
            proto::TransactionId([0xd0; 12]),
        );
        w.u32_attr(attr::LIFETIME, 0)
            .attr(attr::USERNAME, USER.as_bytes())
            .attr(attr::REALM, REALM.as_bytes())
            .attr(attr::NONCE, nonce.as_bytes())
            .message_integrity(&self.key);
        w.finish();
        let resp = self.ask(ft, &buf, "Refresh LIFETIME=0 of the extra allocation");
        let m = Message::parse(&buf).unwrap();
        let r = parse_response(&resp, &m, "extra Refresh");
        assert_eq!(r.class(), Class::Success);
        assert!(self.server.allocation_by_five_tuple(&ft).is_none());
        assert!(self.binder.released.contains(&relay));
    }

    fn refresh(&mut self, s: &Message<'_>, what: &str) {
        let resp = self.ask(self.ft, s.raw(), what);
        let r = parse_response(&resp, s, what);
        let Some(relay) = self.model.relay else {
            // RFC 8656 7.3: no allocation on this 5-tuple -> 437.
            assert_error(&r, 437, what);
            assert!(r.verify_integrity(&self.key), "{what}: 437 signed");
            return;
        };
        assert_eq!(
            r.class(),
            Class::Success,
            "{what}: Refresh failed: {:?}",
            r.error_code()
        );
        let requested = s.lifetime().expect("LIFETIME");
        let expected = match requested {
            Some(0) => 0,
            other => granted_lifetime(other),
        };
        assert_eq!(
            r.lifetime().expect("LIFETIME decodes"),
            Some(expected),
            "{what}: LIFETIME for a Refresh asking {requested:?} (RFC 8656 7.3)"
        );
        assert!(r.verify_integrity(&self.key), "{what}: MESSAGE-INTEGRITY");
        if expected == 0 {
            assert!(
                self.server.allocation_by_five_tuple(&self.ft).is_none(),
                "{what}: LIFETIME 0 must delete the allocation (RFC 8656 7.3)"
            );
            assert!(
                self.binder.released.contains(&relay),
                "{what}: the relay socket of a deleted allocation must be released"
            );
            self.model.clear();
            self.stats.refresh_delete += 1;
        } else {
            let a = self
                .server
                .allocation_by_five_tuple(&self.ft)
                .unwrap_or_else(|| panic!("{what}: allocation gone after a Refresh"));
            let left = a.expires.saturating_duration_since(self.clock().now);
            assert_eq!(
                left,
                Duration::from_secs(u64::from(expected)),
                "{what}: allocation expiry after Refresh"
            );
        }
        self.stats.refresh_ok += 1;
    }

    fn create_permission(&mut self, s: &Message<'_>, what: &str) {
        let resp = self.ask(self.ft, s.raw(), what);
        let r = parse_response(&resp, s, what);
        if self.model.relay.is_none() {
            assert_error(&r, 437, what);
            return;
        }
        let peers = s.xor_peer_addresses().expect("XOR-PEER-ADDRESS");
        assert!(!peers.is_empty(), "{what}: no XOR-PEER-ADDRESS");
        assert_eq!(
            r.class(),
            Class::Success,
            "{what}: CreatePermission for {peers:?} failed: {:?}",
            r.error_code()
        );
        assert!(r.verify_integrity(&self.key), "{what}: MESSAGE-INTEGRITY");
        let a = self.server.allocation_by_five_tuple(&self.ft).unwrap();
        for p in &peers {
            assert!(
                a.permission(p.ip(), self.t0 + Duration::from_secs(self.step))
                    .is_some(),
                "{what}: no permission installed for {p}"
            );
            self.model.perms.insert(p.ip());
        }
        self.stats.create_permission_ok += 1;
    }

    fn channel_bind(&mut self, s: &Message<'_>, what: &str) {
        let resp = self.ask(self.ft, s.raw(), what);
        let r = parse_response(&resp, s, what);
        if self.model.relay.is_none() {
            assert_error(&r, 437, what);
            return;
        }
        let number = s
            .channel_number()
            .expect("CHANNEL-NUMBER")
            .unwrap_or_else(|| panic!("{what}: no CHANNEL-NUMBER"));
        let peer = s
            .xor_peer_address()
            .expect("XOR-PEER-ADDRESS")
            .unwrap_or_else(|| panic!("{what}: no XOR-PEER-ADDRESS"));
        // RFC 8656 11.2 (RFC 5766 11.2 allowed up to 0x7FFF, as uclient uses): a number
        // bound to another peer, or a peer bound to another number, is a 400.
        let conflict = self.model.channels.get(&number).is_some_and(|p| *p != peer)
            || self
                .model
                .channel_of_peer(peer)
                .is_some_and(|n| n != number);
        if !(0x4000..=0x7FFF).contains(&number) || conflict {
            assert_error(&r, 400, what);
            return;
        }
        assert_eq!(
            r.class(),
            Class::Success,
            "{what}: ChannelBind {number:#06x} -> {peer} failed: {:?}",
            r.error_code()
        );
        assert!(r.verify_integrity(&self.key), "{what}: MESSAGE-INTEGRITY");
        self.model.channels.insert(number, peer);
        // RFC 8656 11.2: a ChannelBind also installs or refreshes the permission.
        self.model.perms.insert(peer.ip());
        if number > 0x4FFF {
            self.stats.channel_bind_above_4fff += 1;
        }
        self.stats.channel_bind_ok += 1;
    }

    fn send_indication(&mut self, f: &CorpusFile, msg: &Message<'_>) {
        let peer = msg
            .xor_peer_address()
            .expect("XOR-PEER-ADDRESS decodes")
            .unwrap_or_else(|| panic!("{}: Send indication without XOR-PEER-ADDRESS", f.name));
        let data = msg
            .data()
            .unwrap_or_else(|| panic!("{}: Send indication without DATA", f.name));
        let out = self.feed(self.ft, &f.bytes);
        match self.model.relay {
            Some(relay) if self.model.perms.contains(&peer.ip()) => {
                assert_eq!(
                    out,
                    Out::ToPeer {
                        relay,
                        peer,
                        data: data.to_vec()
                    },
                    "{}: Send indication with a permission for {peer} (RFC 8656 11.2)",
                    f.name
                );
                self.stats.send_to_peer += 1;
            }
            _ => assert_eq!(
                out,
                Out::Nothing,
                "{}: Send indication without allocation/permission must be dropped",
                f.name
            ),
        }
    }

    fn client_channel_data(&mut self, f: &CorpusFile) {
        let (number, payload) = proto::parse_channel_data(&f.bytes)
            .unwrap_or_else(|| panic!("{}: captured ChannelData does not parse", f.name));
        let payload = payload.to_vec();
        let out = self.feed(self.ft, &f.bytes);
        match (self.model.relay, self.model.channels.get(&number)) {
            (Some(relay), Some(&peer)) => {
                assert_eq!(
                    out,
                    Out::ToPeer {
                        relay,
                        peer,
                        data: payload
                    },
                    "{}: ChannelData on bound channel {number:#06x} (RFC 8656 12.6)",
                    f.name
                );
                self.stats.channel_data_to_peer += 1;
            }
            _ => {
                // The capture's binding of this number came from another client or
                // was dropped as a duplicate: on our 5-tuple it is unbound, and RFC
                // 8656 12.6 says to discard it.
                assert_eq!(
                    out,
                    Out::Nothing,
                    "{}: ChannelData on unbound channel {number:#06x} must be dropped",
                    f.name
                );
                self.stats.channel_data_unbound_dropped += 1;
            }
        }
    }

    // ------------------------------------------------------------- peer -> client

    /// Frames `payload` from `peer` with `handle_peer`; returns the bytes for the client.
    fn frame_from_peer(&mut self, peer: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
        let relay = self.model.relay?;
        let mut buf = vec![0xEEu8; PEER_HEADROOM + payload.len() + PEER_TAILROOM];
        let range = PEER_HEADROOM..PEER_HEADROOM + payload.len();
        buf[range.clone()].copy_from_slice(payload);
        let now = self.t0 + Duration::from_secs(self.step);
        let (ft, out) = self.server.handle_peer(relay, peer, &mut buf, range, now)?;
        assert_eq!(ft, self.ft, "handle_peer: 5-tuple of the allocation");
        Some(buf[out].to_vec())
    }

    fn peer_data_indication(&mut self, f: &CorpusFile) {
        let msg = Message::parse(&f.bytes)
            .unwrap_or_else(|e| panic!("{}: captured Data indication: {e}", f.name));
        let peer = msg
            .xor_peer_address()
            .expect("XOR-PEER-ADDRESS")
            .unwrap_or_else(|| panic!("{}: Data indication without peer", f.name));
        let data = msg.data().expect("DATA").to_vec();
        let permitted = self.model.relay.is_some() && self.model.perms.contains(&peer.ip());
        let framed = self.frame_from_peer(peer, &data);
        if !permitted {
            assert_eq!(
                framed, None,
                "{}: data from {peer} without permission must be dropped",
                f.name
            );
            return;
        }
        let framed =
            framed.unwrap_or_else(|| panic!("{}: data from permitted {peer} was dropped", f.name));
        if let Some(number) = self.model.channel_of_peer(peer) {
            // A channel is bound to this peer in our state: RFC 8656 12.7 says ChannelData.
            let (n, p) = proto::parse_channel_data(&framed)
                .unwrap_or_else(|| panic!("{}: our ChannelData does not parse", f.name));
            assert_eq!((n, p), (number, &data[..]), "{}", f.name);
            self.stats.channel_data_framed += 1;
            return;
        }
        let ours = Message::parse(&framed)
            .unwrap_or_else(|e| panic!("{}: our Data indication does not parse: {e}", f.name));
        assert_eq!(ours.method(), method::DATA, "{}", f.name);
        assert_eq!(ours.class(), Class::Indication, "{}", f.name);
        assert_eq!(
            ours.xor_peer_address().expect("our XOR-PEER-ADDRESS"),
            Some(peer),
            "{}: XOR-PEER-ADDRESS of our Data indication",
            f.name
        );
        assert_eq!(
            ours.data(),
            Some(&data[..]),
            "{}: DATA of our Data indication",
            f.name
        );
        assert_eq!(framed.len() % 4, 0, "{}: padded to 4", f.name);
        self.stats.data_indication_framed += 1;
    }

    fn peer_channel_data(&mut self, folder: &str, f: &CorpusFile) {
        let (number, payload) = proto::parse_channel_data(&f.bytes)
            .unwrap_or_else(|| panic!("{}: captured ChannelData does not parse", f.name));
        let payload = payload.to_vec();
        let Some(&peer) = self.model.channels.get(&number) else {
            self.stats.s2c_channel_data_unbound_skipped += 1;
            return;
        };
        let framed = self
            .frame_from_peer(peer, &payload)
            .unwrap_or_else(|| panic!("{}: data from bound peer {peer} dropped", f.name));
        // Same channel, same length, same payload: byte for byte what coturn sent...
        let len = proto::CHANNEL_DATA_HEADER + payload.len();
        assert_eq!(
            framed.get(..len),
            f.bytes.get(..len),
            "{folder}: {}: our ChannelData differs from coturn's ({} transport)",
            f.name,
            self.ft.transport.as_str()
        );
        // ...and the same padding: to 4 bytes on TCP (RFC 8656 12.5), none on UDP. The
        // padding's content is not specified (coturn leaves old buffer bytes there,
        // we write zeros), only its length.
        assert_eq!(
            framed.len(),
            f.bytes.len(),
            "{}: ChannelData padding ({} transport)",
            f.name,
            self.ft.transport.as_str()
        );
        let expected_len = if self.ft.transport.is_stream() {
            len.div_ceil(4) * 4
        } else {
            len
        };
        assert_eq!(framed.len(), expected_len, "{}: padding", f.name);
        assert!(framed[len..].iter().all(|b| *b == 0), "{}", f.name);
        self.stats.channel_data_framed += 1;
    }
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// RFC 8656 7.2 / 7.3: min(requested, max), but never below the default.
fn granted_lifetime(requested: Option<u32>) -> u32 {
    match requested {
        None => DEFAULT_LIFETIME,
        Some(r) => r.clamp(DEFAULT_LIFETIME, MAX_LIFETIME),
    }
}

/// Rebuilds `msg` with every attribute in its original order, NONCE replaced by
/// `nonce`, and MESSAGE-INTEGRITY (and FINGERPRINT if it had one) recomputed.
fn resign(msg: &Message<'_>, nonce: &str, key: &[u8]) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut w = MessageWriter::new(&mut buf, msg.method(), msg.class(), msg.transaction_id());
    for (t, v) in msg.attributes() {
        match t {
            attr::NONCE => {
                w.attr(t, nonce.as_bytes());
            }
            attr::MESSAGE_INTEGRITY | attr::MESSAGE_INTEGRITY_SHA256 | attr::FINGERPRINT => {}
            _ => {
                w.attr(t, v);
            }
        }
    }
    w.message_integrity(key);
    if msg.has_fingerprint() {
        w.fingerprint();
    }
    w.finish();
    buf
}

/// Parses our response and checks what every response must have: same method and
/// transaction ID, SOFTWARE, and a valid FINGERPRINT exactly when the request had one.
fn parse_response<'a>(resp: &'a [u8], req: &Message<'_>, what: &str) -> Message<'a> {
    let r = Message::parse(resp).unwrap_or_else(|e| panic!("{what}: our answer: {e}"));
    assert_eq!(r.method(), req.method(), "{what}: response method");
    assert!(
        matches!(r.class(), Class::Success | Class::Error),
        "{what}: response class {:?}",
        r.class()
    );
    assert_eq!(
        r.transaction_id(),
        req.transaction_id(),
        "{what}: transaction ID"
    );
    assert_eq!(
        r.software().expect("SOFTWARE decodes"),
        Some(SOFTWARE),
        "{what}: SOFTWARE"
    );
    if req.has_fingerprint() {
        assert_eq!(
            r.verify_fingerprint(),
            Some(true),
            "{what}: the request had FINGERPRINT, so must our answer (RFC 8489 7.3)"
        );
    } else {
        assert!(
            !r.has_fingerprint(),
            "{what}: FINGERPRINT only when the request had one"
        );
    }
    r
}

fn assert_error(r: &Message<'_>, code: u16, what: &str) {
    assert_eq!(r.class(), Class::Error, "{what}: expected error {code}");
    let got = r.error_code().expect("ERROR-CODE decodes").map(|(c, _)| c);
    assert_eq!(got, Some(code), "{what}: ERROR-CODE");
}

fn assert_no_integrity(r: &Message<'_>, what: &str) {
    assert!(
        !r.has_message_integrity(),
        "{what}: unauthenticated answer must not carry MESSAGE-INTEGRITY"
    );
}

/// A 401 or 438 challenge (RFC 8489 9.2.4): REALM, NONCE, no USERNAME nor integrity.
/// Returns the nonce.
fn assert_challenge(r: &Message<'_>, code: u16, what: &str) -> String {
    assert_error(r, code, what);
    assert_eq!(
        r.realm().expect("REALM decodes"),
        Some(REALM),
        "{what}: REALM"
    );
    let nonce = r
        .nonce()
        .expect("NONCE decodes")
        .unwrap_or_else(|| panic!("{what}: {code} without NONCE"));
    assert!(!nonce.is_empty(), "{what}: empty NONCE");
    assert!(!r.has(attr::USERNAME), "{what}: USERNAME in a challenge");
    assert_no_integrity(r, what);
    nonce.to_string()
}

// ---------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------

#[test]
fn corpus_requests_parse_and_get_rfc_answers() {
    let dir = corpus_dir();
    let transports = load_transports();
    let folders = folders(&dir);
    assert!(
        folders.len() >= 8,
        "expected the capture folders of {} (found {})",
        dir.display(),
        folders.len()
    );
    let mut total = Stats::default();
    let mut seen_lifetimes = Vec::new();
    for (i, (folder, files)) in folders.iter().enumerate() {
        let transport = files
            .first()
            .and_then(|f| transports.get(&f.name))
            .map(String::as_str)
            .unwrap_or(if folder.ends_with("-tcp") {
                "tcp"
            } else {
                "udp"
            });
        let transport = match transport {
            "tcp" => Transport::Tcp,
            "udp" => Transport::Udp,
            t => panic!("{folder}: unknown transport {t:?} in index.tsv"),
        };
        let client = folder_client(files)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 40_000 + i as u16)));
        let ft = FiveTuple {
            transport,
            client,
            server: SocketAddr::from(SERVER_ADDR),
        };
        let mut replay = Replay::new(ft);
        replay.replay_folder(folder, files);
        for f in files
            .iter()
            .filter(|f| f.c2s && f.kind.starts_with("allocate"))
        {
            if let Ok(m) = Message::parse(&f.bytes) {
                if m.has_message_integrity() {
                    seen_lifetimes.push((folder.clone(), m.lifetime().ok().flatten()));
                }
            }
        }
        let s = &replay.stats;
        eprintln!("{folder} ({}, client {client}): {s:?}", transport.as_str());
        macro_rules! add {
            ($($f:ident),*) => { $( total.$f += s.$f; )* };
        }
        add!(
            requests_parsed,
            challenges_401,
            stale_438,
            allocate_ok,
            allocate_437,
            refresh_ok,
            refresh_delete,
            create_permission_ok,
            channel_bind_ok,
            channel_bind_above_4fff,
            binding_ok,
            binding_420,
            rfc3489_ok,
            rfc3489_dropped,
            send_to_peer,
            channel_data_to_peer,
            channel_data_unbound_dropped,
            data_indication_framed,
            channel_data_framed,
            s2c_channel_data_unbound_skipped
        );
    }
    eprintln!("total: {total:#?}");
    eprintln!("authenticated Allocate LIFETIMEs asked: {seen_lifetimes:?}");
    // Sanity minimum: the corpus exercises every path at least once.
    assert!(total.requests_parsed >= 40, "{total:?}");
    assert!(total.challenges_401 >= 8, "{total:?}");
    assert!(total.stale_438 >= 20, "{total:?}");
    assert!(total.allocate_ok >= 8, "{total:?}");
    assert!(
        total.refresh_ok >= 3 && total.refresh_delete >= 2,
        "{total:?}"
    );
    assert!(total.create_permission_ok >= 3, "{total:?}");
    assert!(total.channel_bind_ok >= 3, "{total:?}");
    assert!(total.channel_bind_above_4fff >= 1, "{total:?}");
    assert!(total.binding_ok >= 2 && total.binding_420 >= 1, "{total:?}");
    assert!(
        total.rfc3489_ok >= 1 && total.rfc3489_dropped >= 1,
        "{total:?}"
    );
    assert!(total.send_to_peer >= 3, "{total:?}");
    assert!(total.channel_data_to_peer >= 3, "{total:?}");
    assert!(total.data_indication_framed >= 3, "{total:?}");
    assert!(total.channel_data_framed >= 3, "{total:?}");
}

/// RFC 8656 7.3 (as RFC 5766 7.2): the "desired lifetime" of a Refresh is
/// min(requested, max), and the default lifetime if that is not greater than the
/// default. The core (src/server/mod.rs, `Server::refresh`) grants min(requested, max)
/// only, so a Refresh asking for 60 s gets 60 s instead of 600 s. The corpus has no such
/// Refresh (uclient asks 777, 600 or 0): this replays uclient's Refresh with LIFETIME 60.
#[test]
fn refresh_below_default_lifetime_gets_default() {
    let dir = corpus_dir();
    let folders = folders(&dir);
    let (_, files) = folders
        .iter()
        .find(|(name, _)| name == "uclient-udp")
        .expect("uclient-udp folder");
    let client = folder_client(files).expect("client address");
    let ft = FiveTuple {
        transport: Transport::Udp,
        client,
        server: SocketAddr::from(SERVER_ADDR),
    };
    let mut replay = Replay::new(ft);
    // Allocate as uclient did.
    let alloc = files
        .iter()
        .find(|f| {
            f.c2s && f.kind == "allocate-request" && {
                Message::parse(&f.bytes).is_ok_and(|m| m.has_message_integrity())
            }
        })
        .expect("authenticated Allocate");
    replay.replay_folder("uclient-udp", std::slice::from_ref(alloc));
    assert!(replay.model.relay.is_some());
    // uclient's Refresh, LIFETIME patched to 60, re-signed with our nonce.
    let refresh = files
        .iter()
        .find(|f| f.c2s && f.kind == "refresh-request")
        .expect("Refresh");
    let m = Message::parse(&refresh.bytes).unwrap();
    let nonce = replay
        .server
        .shared()
        .runtime
        .load()
        .nonces
        .make(client, replay.clock().unix);
    let mut buf = Vec::new();
    let mut w = MessageWriter::new(&mut buf, m.method(), m.class(), m.transaction_id());
    for (t, v) in m.attributes() {
        match t {
            attr::LIFETIME => {
                w.u32_attr(t, 60);
            }
            attr::NONCE => {
                w.attr(t, nonce.as_bytes());
            }
            _ => {
                w.attr(t, v);
            }
        }
    }
    w.message_integrity(&replay.key).fingerprint();
    w.finish();
    let resp = replay.ask(ft, &buf, "Refresh LIFETIME=60");
    let s = Message::parse(&buf).unwrap();
    let r = parse_response(&resp, &s, "Refresh LIFETIME=60");
    assert_eq!(r.class(), Class::Success);
    assert_eq!(
        r.lifetime().unwrap(),
        Some(DEFAULT_LIFETIME),
        "RFC 8656 7.3: a Refresh asking less than the default gets the default"
    );
}
