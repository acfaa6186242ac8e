//! State shared by all workers: the read-mostly runtime configuration (swapped whole on
//! reload), the set of live relay addresses, and the allocation quotas. None of it is
//! touched on the relay hot path except the live-relay set, and only for peers that the
//! policy denies but that are relays of this server.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::auth::{Credentials, Key, NonceMaker};
use crate::config::Config;
use crate::policy::PeerPolicy;

/// Limits the core enforces (from `[limits]`).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Bytes per second each allocation may relay, each way (0: unlimited).
    pub max_bandwidth_per_allocation: u64,
    /// Bytes per second the whole server may relay (0: unlimited).
    pub max_total_bandwidth: u64,
    /// Answers per second to unauthenticated requests from one source IP (0: unlimited).
    pub unauthenticated_rate: u32,
    pub max_allocations: usize,
    /// Allocations per USERNAME, whatever its kind (`usize::MAX`: no such limit).
    pub max_allocations_per_user: usize,
    /// Allocations per TURN REST username (one credential handed to a page): a leaked
    /// credential cannot take the whole server. Static users are not bound by it.
    pub max_allocations_per_rest_user: usize,
    pub max_permissions_per_allocation: usize,
    pub max_channels_per_allocation: usize,
    /// RFC 8656 section 7.2: default 600 s.
    pub default_lifetime: Duration,
    /// RFC 8656 section 7.2: at most 3600 s recommended.
    pub max_lifetime: Duration,
    /// `relay.permission_lifetime`: RFC 8656 section 9 fixes 300 s (the maximum).
    pub permission_lifetime: Duration,
    /// `relay.channel_lifetime`: RFC 8656 section 12 fixes 600 s (the maximum).
    pub channel_lifetime: Duration,
}

/// Relay addresses, at most one per family, and what to advertise for each.
#[derive(Debug, Clone, Default)]
pub struct RelayAddrs {
    pub v4: Option<IpAddr>,
    pub v6: Option<IpAddr>,
    pub external_v4: Option<IpAddr>,
    pub external_v6: Option<IpAddr>,
}

impl RelayAddrs {
    pub fn for_family(&self, v6: bool) -> Option<IpAddr> {
        if v6 {
            self.v6
        } else {
            self.v4
        }
    }
    pub fn advertised(&self, bound: SocketAddr) -> SocketAddr {
        let ext = if bound.is_ipv6() {
            self.external_v6
        } else {
            self.external_v4
        };
        match ext {
            Some(ip) => SocketAddr::new(ip, bound.port()),
            None => bound,
        }
    }
}

/// Everything a reload may change, swapped as one piece.
pub struct Runtime {
    pub realm: String,
    pub software: Option<String>,
    pub credentials: Credentials,
    pub nonces: NonceMaker,
    pub policy: PeerPolicy,
    pub limits: Limits,
    pub relay: RelayAddrs,
    /// Where new Allocates are sent while draining (300 Try Alternate).
    pub alternate_servers: Vec<SocketAddr>,
    /// Above this many active allocations on this node, new Allocates are redirected to
    /// the least-loaded node of the fleet (0: never).
    pub redirect_above: usize,
    /// Queue kernel fast-path commands ([`super::Server::drain_fast_path`]) for the UDP
    /// allocations. Not a configuration key: the shell sets it on every `Runtime` it
    /// stores (at start and on reload) once it has a kernel data plane to apply the
    /// commands to; [`Runtime::from_config`] leaves it off, so nothing is queued.
    pub kernel_fast_path: bool,
    /// `[log] usage_interval`: every this often each allocation emits
    /// [`super::Event::AllocationUsage`] with what it relayed since its last record
    /// (`None`: only [`super::Event::AllocationEnded`]).
    pub usage_interval: Option<Duration>,
}

impl Runtime {
    /// Builds the runtime view of a validated configuration. `nonce_secret` survives
    /// reloads so outstanding nonces stay valid.
    pub fn from_config(config: &Config, nonce_secret: [u8; 32]) -> Runtime {
        let mut relay = RelayAddrs::default();
        for ip in &config.relay.addresses {
            if ip.is_ipv4() {
                relay.v4.get_or_insert(*ip);
            } else {
                relay.v6.get_or_insert(*ip);
            }
        }
        for ip in &config.relay.external_addresses {
            if ip.is_ipv4() {
                relay.external_v4.get_or_insert(*ip);
            } else {
                relay.external_v6.get_or_insert(*ip);
            }
        }
        let l = &config.limits;
        Runtime {
            realm: config.server.realm.clone(),
            software: config.server.software.clone().filter(|s| !s.is_empty()),
            credentials: Credentials::new(
                &config.server.realm,
                &config.auth.users,
                &config.auth.secrets,
            ),
            nonces: NonceMaker::new(nonce_secret, config.server.nonce_lifetime.as_secs()),
            policy: PeerPolicy::new(&config.policy.allow_peers, &config.policy.deny_peers),
            limits: Limits {
                max_bandwidth_per_allocation: l.max_bandwidth_per_allocation,
                max_total_bandwidth: l.max_total_bandwidth,
                unauthenticated_rate: l.unauthenticated_rate,
                max_allocations: l.max_allocations,
                max_allocations_per_user: l.max_allocations_per_user.unwrap_or(usize::MAX),
                max_allocations_per_rest_user: l.max_allocations_per_rest_user,
                max_permissions_per_allocation: l.max_permissions_per_allocation,
                max_channels_per_allocation: l.max_channels_per_allocation,
                default_lifetime: l.default_lifetime,
                max_lifetime: l.max_lifetime,
                permission_lifetime: config.relay.permission_lifetime,
                channel_lifetime: config.relay.channel_lifetime,
            },
            relay,
            alternate_servers: config.server.alternate_servers.clone(),
            redirect_above: config.limits.redirect_above,
            kernel_fast_path: false,
            usage_interval: config.log.usage_interval,
        }
    }
}

/// What a fleet store (Redis, `[store]`) says, cached so that authentication never
/// waits on it; replaced whole by the store thread.
#[derive(Debug, Default)]
pub struct StoreView {
    /// Is the store reachable right now?
    pub up: bool,
    /// Users managed in the store: long-term keys (never passwords).
    pub users: HashMap<String, Key>,
    /// TURN REST API secrets managed in the store.
    pub secrets: Vec<String>,
    /// Revoked usernames and REST user ids.
    pub revoked: HashSet<String>,
    /// Allocations per user on the other live nodes (fleet-wide quota).
    pub remote_user_counts: HashMap<String, usize>,
    /// The other live nodes and their load, for redirects.
    pub nodes: Vec<NodeLoad>,
}

/// Another node of the fleet, as its last registry entry says.
#[derive(Debug, Clone)]
pub struct NodeLoad {
    pub id: String,
    /// Where clients reach it (ALTERNATE-SERVER).
    pub addr: SocketAddr,
    pub allocations: usize,
}

impl StoreView {
    /// Is this username (or the user id of a REST username) revoked?
    pub fn is_revoked(&self, username: &str) -> bool {
        if self.revoked.is_empty() {
            return false;
        }
        if self.revoked.contains(username) {
            return true;
        }
        username
            .split_once(':')
            .is_some_and(|(_, id)| self.revoked.contains(id))
    }
}

/// One live allocation as the session registry shows it.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub id: u64,
    pub user: String,
    pub transport: &'static str,
    pub client: SocketAddr,
    pub relay: SocketAddr,
    /// Unix seconds when it started.
    pub started: u64,
    pub bytes_to_peer: u64,
    pub bytes_to_client: u64,
}

/// State shared by every worker of one server process.
pub struct Shared {
    /// The fleet store's view (empty without `[store]`).
    pub store: ArcSwap<StoreView>,
    /// Users whose allocations must end (removed, revoked, killed), with a sequence
    /// number so each worker acts on each entry once.
    kills: Mutex<Vec<(u64, String)>>,
    kill_seq: AtomicU64,
    pub runtime: ArcSwap<Runtime>,
    live_relays: RwLock<HashSet<SocketAddr>>,
    per_user: Mutex<HashMap<Box<str>, usize>>,
    total: AtomicUsize,
    next_id: AtomicU64,
    changes: AtomicU64,
    retired: AtomicBool,
    /// SIGTERM received: new Allocates are turned away.
    draining: AtomicBool,
    /// How many workers share the total bandwidth.
    workers: AtomicUsize,
    /// With a fleet store: each worker's live allocations, refreshed every second.
    pub publish_sessions: AtomicBool,
    sessions: Mutex<HashMap<usize, Vec<SessionInfo>>>,
    /// Per-source limit on unauthenticated answers, shared by the workers so a source
    /// cannot multiply it by using several ports.
    unauth: Mutex<super::UnauthLimiter>,
}

/// Why a quota refused an allocation.
#[derive(Debug, PartialEq, Eq)]
pub enum QuotaError {
    /// 486 Allocation Quota Reached.
    User,
    /// 508 Insufficient Capacity.
    Total,
}

impl Shared {
    pub fn new(runtime: Runtime) -> Arc<Shared> {
        Arc::new(Shared {
            store: ArcSwap::from_pointee(StoreView::default()),
            kills: Mutex::new(Vec::new()),
            kill_seq: AtomicU64::new(0),
            runtime: ArcSwap::from_pointee(runtime),
            live_relays: RwLock::new(HashSet::new()),
            per_user: Mutex::new(HashMap::new()),
            total: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            changes: AtomicU64::new(0),
            retired: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            workers: AtomicUsize::new(1),
            publish_sessions: AtomicBool::new(false),
            sessions: Mutex::new(HashMap::new()),
            unauth: Mutex::new(super::UnauthLimiter::new(std::time::Instant::now())),
        })
    }

    /// Ends every allocation of `user` on every worker of this node (soon: at the
    /// workers' next tick).
    pub fn kill_user(&self, user: &str) {
        let seq = self.kill_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let mut k = self.kills.lock().unwrap_or_else(|e| e.into_inner());
        k.push((seq, user.to_string()));
        // Keep the list short: workers look at it every second.
        if k.len() > 1024 {
            let drop = k.len() - 1024;
            k.drain(..drop);
        }
    }

    /// Kill entries after `seen`, and the newest sequence number.
    pub fn kills_since(&self, seen: u64) -> (Vec<String>, u64) {
        let latest = self.kill_seq.load(Ordering::Relaxed);
        if latest == seen {
            return (Vec::new(), seen);
        }
        let k = self.kills.lock().unwrap_or_else(|e| e.into_inner());
        let users = k
            .iter()
            .filter(|(s, _)| *s > seen)
            .map(|(_, u)| u.clone())
            .collect();
        (users, latest)
    }

    /// Per-user allocation counts of this node (published for the fleet quota).
    pub fn user_counts(&self) -> Vec<(String, usize)> {
        let per_user = self.per_user.lock().unwrap_or_else(|e| e.into_inner());
        per_user.iter().map(|(u, n)| (u.to_string(), *n)).collect()
    }

    /// A worker's current allocations (for the session registry).
    pub fn set_sessions(&self, worker: usize, list: Vec<SessionInfo>) {
        let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        s.insert(worker, list);
    }

    /// Every live allocation of this node, as last published by the workers.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        let s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        s.values().flatten().cloned().collect()
    }

    /// May `ip` get one more answer to an unauthenticated request now?
    pub fn unauthenticated_allowed(&self, ip: IpAddr, rate: u32, now: std::time::Instant) -> bool {
        if rate == 0 {
            return true;
        }
        self.unauth
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allow(ip, rate, now)
    }

    /// A request may have changed an allocation (counted for the fd store's journal).
    pub fn changed(&self) {
        self.changes.fetch_add(1, Ordering::Relaxed);
    }

    /// How many times [`Shared::changed`] was called.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    /// This process handed its allocations to a new one (an upgrade): it no longer
    /// speaks for the node in the fleet store.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    pub fn set_draining(&self, on: bool) {
        self.draining.store(on, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn set_workers(&self, n: usize) {
        self.workers.store(n.max(1), Ordering::Relaxed);
    }

    pub fn workers(&self) -> usize {
        self.workers.load(Ordering::Relaxed).max(1)
    }

    pub fn next_allocation_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Takes one allocation slot for `user` (authenticated by a TURN REST secret if
    /// `rest`), or says which quota is full.
    pub fn acquire(&self, user: &str, rest: bool, limits: &Limits) -> Result<(), QuotaError> {
        let cap = if rest {
            limits
                .max_allocations_per_user
                .min(limits.max_allocations_per_rest_user)
        } else {
            limits.max_allocations_per_user
        };
        // Fleet-wide: the other nodes' counts (leased in the store) count too.
        let remote = self
            .store
            .load()
            .remote_user_counts
            .get(user)
            .copied()
            .unwrap_or(0);
        let mut per_user = self.per_user.lock().unwrap_or_else(|e| e.into_inner());
        let n = per_user.get(user).copied().unwrap_or(0);
        if n.saturating_add(remote) >= cap {
            return Err(QuotaError::User);
        }
        if self.total.load(Ordering::Relaxed) >= limits.max_allocations {
            return Err(QuotaError::Total);
        }
        self.total.fetch_add(1, Ordering::Relaxed);
        per_user.insert(user.into(), n + 1);
        Ok(())
    }

    /// Counts an allocation taken over from another process (an upgrade): it exists
    /// already, so no quota refuses it.
    pub fn adopt(&self, user: &str) {
        let mut per_user = self.per_user.lock().unwrap_or_else(|e| e.into_inner());
        *per_user.entry(user.into()).or_insert(0) += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
    }

    /// New allocation ids start above `id` (ids taken over from another process).
    pub fn ids_above(&self, id: u64) {
        self.next_id
            .fetch_max(id.saturating_add(1), Ordering::Relaxed);
    }

    pub fn release(&self, user: &str) {
        let mut per_user = self.per_user.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per_user.get_mut(user) {
            *n -= 1;
            if *n == 0 {
                per_user.remove(user);
            }
            self.total.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub fn total_allocations(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    pub fn add_relay(&self, addr: SocketAddr) {
        self.live_relays
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(addr);
    }

    pub fn remove_relay(&self, addr: SocketAddr) {
        let mut set = self.live_relays.write().unwrap_or_else(|e| e.into_inner());
        set.remove(&addr);
        // Give the table of a past wave of allocations back.
        if set.capacity() > 64 && set.len() < set.capacity() / 4 {
            set.shrink_to_fit();
        }
    }

    /// Is `addr` the relayed transport address of a live allocation of this server?
    pub fn is_live_relay(&self, addr: SocketAddr) -> bool {
        self.live_relays
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&addr)
    }
}
