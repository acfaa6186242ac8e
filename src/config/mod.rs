//! Configuration: the TOML schema, its defaults, and validation whose every message names the
//! key it is about (`relay.ports: "9-5" is not a range LOW-HIGH with LOW <= HIGH`).
//!
//! Loading happens in three steps, and all problems of all steps are reported together:
//! 1. TOML syntax (one error with line and column; nothing else can be checked after it);
//! 2. shape: every key is checked on its own against `#[serde(deny_unknown_fields)]` structs,
//!    so every unknown key and every wrongly typed value is reported with its path;
//! 3. values: addresses, CIDRs, durations, port ranges are parsed, then [`Config::validate`]
//!    checks the whole (required keys, duplicates, families, limits, log level).
//!
//! Every key and its default is documented in `conf/turnstone.toml` ([`Config::example_toml`]).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use toml::{Table, Value};

/// Default SOFTWARE attribute value.
pub const DEFAULT_SOFTWARE: &str = "turnstone";
/// Default nonce lifetime (coturn and eturnal use 10 minutes too).
pub const DEFAULT_NONCE_LIFETIME: Duration = Duration::from_secs(600);
/// Default relay port range (RFC 8656 3.: the range 49152-65535 is recommended).
pub const DEFAULT_PORT_MIN: u16 = 49152;
/// Upper end of the default relay port range.
pub const DEFAULT_PORT_MAX: u16 = 65535;
/// Default `limits.max_allocations`.
pub const DEFAULT_MAX_ALLOCATIONS: usize = 100_000;
/// Default `limits.max_allocations_per_rest_user`: allocations per TURN REST username
/// (one credential). A page that leaks its credential lets at most this many allocations
/// be made with it. Static users have no per-user limit unless
/// `limits.max_allocations_per_user` is set: applications commonly give every client
/// the same static user (coturn and eturnal have no per-user limit by default).
pub const DEFAULT_MAX_ALLOCATIONS_PER_REST_USER: usize = 100;
/// Default `limits.max_permissions_per_allocation`.
pub const DEFAULT_MAX_PERMISSIONS: usize = 64;
/// Default `limits.max_channels_per_allocation`.
pub const DEFAULT_MAX_CHANNELS: usize = 64;
/// Default `limits.max_lifetime` (RFC 8656 7.2: 3600 s recommended maximum).
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(3600);
/// Default `limits.default_lifetime` (RFC 8656 2.2: 10 minutes).
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(600);
/// Default `server.drain_timeout`: how long SIGTERM waits for allocations to end.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest `server.drain_timeout` accepted.
const MAX_DRAIN_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Default `limits.unauthenticated_rate`: answers per second per source IP.
pub const DEFAULT_UNAUTHENTICATED_RATE: u32 = 500;
/// Largest `limits.unauthenticated_rate` accepted.
const MAX_UNAUTHENTICATED_RATE: u32 = 1_000_000;
/// Smallest non-zero bandwidth limit: one full-size (1500-byte) packet per second.
const MIN_BANDWIDTH: u64 = 1500;
/// Default `[metrics] listen` suggested in the example (the metrics endpoint is off by default).
pub const EXAMPLE_METRICS_LISTEN: &str = "127.0.0.1:9641";
/// Channel numbers 0x4000..=0x4FFF (RFC 8656 12.): at most this many channels per allocation.
pub const MAX_CHANNEL_NUMBERS: usize = 0x1000;
/// REALM and SOFTWARE: fewer than 128 characters (RFC 8489 14.9, 14.14).
const MAX_REALM_CHARS: usize = 127;
const MAX_SOFTWARE_CHARS: usize = 127;
/// USERNAME: at most 513 bytes (RFC 8489 14.3).
const MAX_USERNAME_BYTES: usize = 513;
const MAX_WORKERS: usize = 1024;

// ---------------------------------------------------------------------------------------------
// The validated configuration
// ---------------------------------------------------------------------------------------------

/// The whole configuration, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub server: ServerSection,
    pub listen: Vec<Listen>,
    pub relay: RelaySection,
    pub auth: AuthSection,
    pub policy: PolicySection,
    pub limits: LimitsSection,
    pub log: LogSection,
    /// Certificate for `tls` listeners (addition to the contract; empty when no TLS listener).
    pub tls: TlsSection,
    /// The Prometheus endpoint (`[metrics]`); off unless `listen` is set.
    pub metrics: MetricsSection,
    /// The fleet store (`[store]`); off unless `url` is set.
    pub store: StoreSection,
}

/// `[server]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerSection {
    /// REALM of every long-term credential (required).
    pub realm: String,
    /// SOFTWARE attribute value; `None` (configured as `""`) omits the attribute.
    pub software: Option<String>,
    /// How long a nonce stays valid before 438 Stale Nonce.
    pub nonce_lifetime: Duration,
    /// Worker shards; 0 = one per core.
    pub workers: usize,
    /// Gather the shards on one thread under light load (fewer wake-ups), spread them
    /// over their own threads under heavy load.
    pub adaptive_workers: bool,
    /// Servers named in ALTERNATE-SERVER (300 Try Alternate) while draining; empty: 508.
    pub alternate_servers: Vec<SocketAddr>,
    /// How long SIGTERM lets existing allocations run before the process exits.
    pub drain_timeout: Duration,
}

impl Default for ServerSection {
    /// Defaults of the optional keys; `realm` is empty and must be set.
    fn default() -> Self {
        ServerSection {
            realm: String::new(),
            software: Some(DEFAULT_SOFTWARE.to_owned()),
            nonce_lifetime: DEFAULT_NONCE_LIFETIME,
            workers: 0,
            adaptive_workers: true,
            alternate_servers: Vec::new(),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
        }
    }
}

/// Transport of a `[[listen]]` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenTransport {
    Udp,
    Tcp,
    Tls,
}

impl ListenTransport {
    /// The configuration spelling: "udp", "tcp", "tls".
    pub fn as_str(self) -> &'static str {
        match self {
            ListenTransport::Udp => "udp",
            ListenTransport::Tcp => "tcp",
            ListenTransport::Tls => "tls",
        }
    }

    /// TCP and TLS listeners both use a TCP socket.
    pub fn is_stream(self) -> bool {
        !matches!(self, ListenTransport::Udp)
    }
}

impl fmt::Display for ListenTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `[[listen]]` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Listen {
    pub transport: ListenTransport,
    pub address: SocketAddr,
}

/// `[relay]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelaySection {
    /// Addresses relay sockets bind to: at most one IPv4 and one IPv6 (`address`).
    pub addresses: Vec<IpAddr>,
    /// Addresses advertised in XOR-RELAYED-ADDRESS instead, at most one per family, each of a
    /// family that `addresses` has (`external_address`, for 1:1 NAT such as cloud instances).
    pub external_addresses: Vec<IpAddr>,
    pub port_min: u16,
    pub port_max: u16,
    /// Receive and send buffer asked for on every UDP socket (`socket_buffer`, e.g.
    /// "4MiB"); the kernel caps it at net.core.rmem_max / wmem_max.
    pub socket_buffer: usize,
}

/// Default `[relay] socket_buffer`: 4 MiB.
pub const DEFAULT_SOCKET_BUFFER: usize = 4 << 20;

impl Default for RelaySection {
    /// Defaults of the optional keys; `addresses` is empty and must be set.
    fn default() -> Self {
        RelaySection {
            addresses: Vec::new(),
            external_addresses: Vec::new(),
            port_min: DEFAULT_PORT_MIN,
            port_max: DEFAULT_PORT_MAX,
            socket_buffer: DEFAULT_SOCKET_BUFFER,
        }
    }
}

impl RelaySection {
    /// The relay address of the given family (`ipv6 == true`: IPv6), if configured.
    pub fn address_for_family(&self, ipv6: bool) -> Option<IpAddr> {
        self.addresses.iter().copied().find(|a| a.is_ipv6() == ipv6)
    }

    /// The address to advertise for a relay socket bound to `relay`: the external address of
    /// the same family if configured, else `relay` itself.
    pub fn advertised(&self, relay: IpAddr) -> IpAddr {
        self.external_addresses
            .iter()
            .copied()
            .find(|a| a.is_ipv6() == relay.is_ipv6())
            .unwrap_or(relay)
    }

    /// Number of ports in the relay range.
    pub fn port_count(&self) -> usize {
        usize::from(self.port_max.saturating_sub(self.port_min)) + 1
    }
}

/// `[auth]`. Its `Debug` shows user names only, never passwords or secrets.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AuthSection {
    /// Static long-term users: name -> password.
    pub users: BTreeMap<String, String>,
    /// TURN REST API shared secrets; every one verifies (rotation).
    pub secrets: Vec<String>,
}

impl fmt::Debug for AuthSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthSection")
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .field(
                "secrets",
                &format_args!("<{} redacted>", self.secrets.len()),
            )
            .finish()
    }
}

/// `[policy]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicySection {
    /// Opens ranges of the built-in default-deny list.
    pub allow_peers: Vec<IpNet>,
    /// Always refused, wins over `allow_peers`.
    pub deny_peers: Vec<IpNet>,
}

/// `[limits]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitsSection {
    pub max_allocations: usize,
    /// Allocations per USERNAME of any kind; `None` (default): no per-user limit beyond
    /// `max_allocations_per_rest_user` for TURN REST usernames.
    pub max_allocations_per_user: Option<usize>,
    /// Allocations per TURN REST username (`<expiry>:<id>`, one credential).
    pub max_allocations_per_rest_user: usize,
    pub max_permissions_per_allocation: usize,
    pub max_channels_per_allocation: usize,
    pub max_lifetime: Duration,
    pub default_lifetime: Duration,
    /// Relayed application bytes per second per allocation, both directions together
    /// (a token bucket; excess is dropped); 0 = unlimited.
    pub max_bandwidth_per_allocation: u64,
    /// Relayed bytes per second for the whole server; 0 = unlimited.
    pub max_total_bandwidth: u64,
    /// Answers to unauthenticated requests per second per source IP address; 0 = unlimited.
    pub unauthenticated_rate: u32,
    /// With a fleet store: above this many active allocations, new Allocates are sent
    /// to the least-loaded node (300 Try Alternate). 0 (default): never.
    pub redirect_above: usize,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            max_allocations: DEFAULT_MAX_ALLOCATIONS,
            max_allocations_per_user: None,
            max_allocations_per_rest_user: DEFAULT_MAX_ALLOCATIONS_PER_REST_USER,
            max_permissions_per_allocation: DEFAULT_MAX_PERMISSIONS,
            max_channels_per_allocation: DEFAULT_MAX_CHANNELS,
            max_lifetime: DEFAULT_MAX_LIFETIME,
            default_lifetime: DEFAULT_LIFETIME,
            max_bandwidth_per_allocation: 0,
            max_total_bandwidth: 0,
            unauthenticated_rate: DEFAULT_UNAUTHENTICATED_RATE,
            redirect_above: 0,
        }
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[log]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogSection {
    /// A `tracing` filter: a level (`info`) or `LEVEL,TARGET=LEVEL,...`.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            level: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

/// `[tls]`: certificate chain and private key (PEM) for `tls` listeners.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsSection {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// `[store]`: a Redis server shared by a fleet of nodes (users, secrets, revocations,
/// quotas, sessions). A single node needs none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreSection {
    /// `redis://host:port/db`; `None` (the default): no store.
    pub url: Option<String>,
    /// This node's name in the fleet (default: hostname and first listen port).
    pub node_id: Option<String>,
    /// Where clients reach this node, named in ALTERNATE-SERVER when another node
    /// redirects to it (default: the first UDP listen address).
    pub advertise: Option<SocketAddr>,
}

/// `[metrics]`: the Prometheus endpoint (`/metrics`, `/health`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetricsSection {
    /// Address of the HTTP endpoint; `None` (the default): no endpoint.
    pub listen: Option<SocketAddr>,
    /// Also serve the browser self-test page at `/selftest` (default false).
    pub selftest: bool,
}

/// One configuration problem: the key it is about (`relay.ports`, `listen[1].address`,
/// `auth.users.bob`; empty for the file as a whole) and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------------------------------------
// Raw (serde) shape. Every field optional so each key can be checked on its own.
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
#[allow(dead_code)] // fields are only used to name the allowed keys
struct RawTop {
    server: Option<Value>,
    listen: Option<Value>,
    relay: Option<Value>,
    auth: Option<Value>,
    policy: Option<Value>,
    limits: Option<Value>,
    log: Option<Value>,
    tls: Option<Value>,
    metrics: Option<Value>,
    store: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    realm: Option<String>,
    software: Option<String>,
    nonce_lifetime: Option<DurationText>,
    workers: Option<usize>,
    adaptive_workers: Option<bool>,
    alternate_servers: Option<Vec<Value>>,
    drain_timeout: Option<DurationText>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawListen {
    transport: Option<ListenTransport>,
    address: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawRelay {
    address: Option<StringOrList>,
    external_address: Option<StringOrList>,
    ports: Option<String>,
    socket_buffer: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawAuth {
    users: Option<Table>,
    secrets: Option<Vec<Value>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawPolicy {
    allow_peers: Option<Vec<Value>>,
    deny_peers: Option<Vec<Value>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    max_allocations: Option<usize>,
    max_allocations_per_user: Option<usize>,
    max_allocations_per_rest_user: Option<usize>,
    max_permissions_per_allocation: Option<usize>,
    max_channels_per_allocation: Option<usize>,
    max_lifetime: Option<DurationText>,
    default_lifetime: Option<DurationText>,
    max_bandwidth_per_allocation: Option<BandwidthText>,
    max_total_bandwidth: Option<BandwidthText>,
    unauthenticated_rate: Option<u32>,
    redirect_above: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    level: Option<String>,
    format: Option<LogFormat>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawStore {
    url: Option<String>,
    node_id: Option<String>,
    advertise: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawMetrics {
    listen: Option<String>,
    selftest: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawTls {
    certificate: Option<PathBuf>,
    private_key: Option<PathBuf>,
}

/// A humantime duration string ("10m", "1h 30m"), kept as text until converted.
struct DurationText(String);

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = DurationText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"10m\", \"90s\" or \"1h 30m\"")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<DurationText, E> {
                Ok(DurationText(s.to_owned()))
            }
        }
        d.deserialize_str(V)
    }
}

/// A bandwidth: a string with a unit ("2Mbit", "250KB") or a bare integer (bytes per
/// second), kept as text until converted.
struct BandwidthText(String);

impl<'de> Deserialize<'de> for BandwidthText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = BandwidthText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a bandwidth such as \"2Mbit\", \"250KB\" or \"0\" (unlimited)")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<BandwidthText, E> {
                Ok(BandwidthText(s.to_owned()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<BandwidthText, E> {
                Ok(BandwidthText(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<BandwidthText, E> {
                Ok(BandwidthText(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A string or an array of strings (`relay.address`, `relay.external_address`); the elements
/// are type-checked later so that each gets its own path.
enum StringOrList {
    One(String),
    Many(Vec<Value>),
}

impl<'de> Deserialize<'de> for StringOrList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = StringOrList;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an IP address string or an array of IP address strings")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<StringOrList, E> {
                Ok(StringOrList::One(s.to_owned()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<StringOrList, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = seq.next_element::<Value>()? {
                    out.push(v);
                }
                Ok(StringOrList::Many(out))
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------------------------
// Error collection
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Errors {
    list: Vec<ConfigError>,
    /// Number of errors found while parsing, once [`Config::check`] has started.
    parsed: Option<usize>,
}

impl Errors {
    /// Records a problem unless `key` or one of its parents already failed to parse (so a
    /// value that failed to parse is not also reported as missing or empty). While checking,
    /// several problems of the same key are all kept.
    fn push(&mut self, key: &str, message: impl Into<String>) {
        let earlier = match self.parsed {
            Some(n) => self.list.get(..n).unwrap_or(&self.list),
            None => &self.list,
        };
        if earlier.iter().any(|e| is_same_or_parent(&e.key, key)) {
            return;
        }
        self.list.push(ConfigError::new(key, message));
    }

    /// Has `key` or anything under it a problem already?
    fn has_at_or_under(&self, key: &str) -> bool {
        self.list.iter().any(|e| is_same_or_parent(key, &e.key))
    }

    fn start_checking(&mut self) {
        self.parsed = Some(self.list.len());
    }
}

/// Is `parent` equal to `key` or a parent path of it (`a` of `a.b` / `a[0]`)?
fn is_same_or_parent(parent: &str, key: &str) -> bool {
    if parent.is_empty() {
        return false;
    }
    match key.strip_prefix(parent) {
        Some("") => true,
        Some(rest) => rest.starts_with('.') || rest.starts_with('['),
        None => false,
    }
}

/// `parent.key`, quoting `key` when it is not a bare TOML key.
fn join(parent: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    let segment = if bare {
        key.to_owned()
    } else {
        format!("{key:?}")
    };
    if parent.is_empty() {
        segment
    } else {
        format!("{parent}.{segment}")
    }
}

fn index(parent: &str, i: usize) -> String {
    format!("{parent}[{i}]")
}

/// Checks every key of `table` on its own against `T` (reporting each unknown key and each
/// wrongly typed value at its path), then deserializes the well-formed keys.
fn shape<T: DeserializeOwned + Default>(table: &Table, path: &str, errors: &mut Errors) -> T {
    let mut good = Table::new();
    for (key, value) in table {
        let mut single = Table::new();
        single.insert(key.clone(), value.clone());
        match T::deserialize(Value::Table(single)) {
            Ok(_) => {
                good.insert(key.clone(), value.clone());
            }
            Err(e) => {
                let mut message = e
                    .message()
                    .replacen("unknown field", "unknown key", 1)
                    .replace("expected usize", "expected a non-negative integer")
                    .replace("expected a map", "expected a table")
                    .replace("expected a sequence", "expected an array");
                // serde quotes the offending value; under [auth] that may be a secret.
                if path.starts_with("auth") && !message.starts_with("unknown key") {
                    let expected = message
                        .rsplit_once(", expected ")
                        .map(|(_, tail)| tail.to_owned())
                        .unwrap_or_default();
                    message = format!("expected {expected}, found {}", value.type_str());
                }
                errors.push(&join(path, key), message);
            }
        }
    }
    match T::deserialize(Value::Table(good)) {
        Ok(t) => t,
        Err(e) => {
            errors.push(path, e.message().to_owned());
            T::default()
        }
    }
}

/// The table at `key` of the top level, or None (absent or reported as not a table).
fn section<'a>(top: &'a Table, key: &str, errors: &mut Errors) -> Option<&'a Table> {
    match top.get(key)? {
        Value::Table(t) => Some(t),
        other => {
            errors.push(
                key,
                format!("expected a table [{key}], found {}", other.type_str()),
            );
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Value parsers
// ---------------------------------------------------------------------------------------------

/// A byte size: a number with an optional unit (B, KiB, MiB, GiB, KB, MB, GB).
fn parse_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as \"4MiB\""))?;
    let mult: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        u => {
            return Err(format!(
                "{text:?}: unknown unit {u:?} (use B, KiB, MiB or GiB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// A bandwidth in bytes per second: a number (decimals allowed) with an optional unit and
/// an optional "/s". Bytes: B, kB/KB, MB, GB (powers of 1000), KiB, MiB, GiB; bits: bit,
/// kbit/Kbit, Mbit, Gbit (and bps, kbps, Mbps, Gbps). No unit: bytes. "0": unlimited.
pub fn parse_bandwidth(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let t = t.strip_suffix("/s").unwrap_or(t).trim_end();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let hint = "write for example \"2Mbit\", \"250KB\", \"1.5MiB\" or \"0\" (unlimited)";
    let n: f64 = match num.parse() {
        Ok(n) if !num.starts_with('.') && !num.ends_with('.') => n,
        _ => return Err(format!("{text:?} is not a bandwidth; {hint}")),
    };
    // (multiplier in bits or bytes, is it bits?)
    let (mult, bits): (f64, bool) = match unit.trim() {
        "" | "B" => (1.0, false),
        "kB" | "KB" => (1e3, false),
        "MB" => (1e6, false),
        "GB" => (1e9, false),
        "KiB" => (1024.0, false),
        "MiB" => (1024.0 * 1024.0, false),
        "GiB" => (1024.0 * 1024.0 * 1024.0, false),
        "bit" | "bps" => (1.0, true),
        "kbit" | "Kbit" | "kbps" | "Kbps" => (1e3, true),
        "Mbit" | "Mbps" => (1e6, true),
        "Gbit" | "Gbps" => (1e9, true),
        u => {
            return Err(format!(
                "{text:?}: unknown unit {u:?}; bytes per second: B, KB, MB, GB, KiB, MiB, GiB; bits per second: bit, kbit, Mbit, Gbit"
            ))
        }
    };
    let bytes = n * mult / if bits { 8.0 } else { 1.0 };
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("{text:?} is too large"));
    }
    Ok(bytes.round() as u64)
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        format!(
            "{text:?} is not a duration ({e}); write for example \"10m\", \"90s\" or \"1h 30m\""
        )
    })
}

fn parse_ip(text: &str) -> Result<IpAddr, String> {
    text.trim()
        .parse()
        .map_err(|_| format!("{text:?} is not an IP address"))
}

/// A CIDR (`10.0.0.0/8`) or a bare IP address (one host).
fn parse_net(text: &str) -> Result<IpNet, String> {
    let t = text.trim();
    if let Ok(net) = t.parse::<IpNet>() {
        return Ok(net);
    }
    if let Ok(ip) = t.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    Err(format!(
        "{text:?} is not a CIDR (such as \"10.0.0.0/8\" or \"2001:db8::/32\") or an IP address"
    ))
}

fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
    let err = || {
        format!("{text:?} is not a range LOW-HIGH with LOW <= HIGH (ports 1-65535, such as \"49152-65535\")")
    };
    let (low, high) = text.split_once('-').ok_or_else(err)?;
    let low: u16 = low.trim().parse().map_err(|_| err())?;
    let high: u16 = high.trim().parse().map_err(|_| err())?;
    if low == 0 || low > high {
        return Err(err());
    }
    Ok((low, high))
}

fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.trim().parse().map_err(|_| {
        format!("{text:?} is not an address IP:PORT (such as \"203.0.113.10:3478\" or \"[2001:db8::1]:3478\")")
    })
}

fn string_elements<'a>(
    values: &'a [Value],
    path: &str,
    what: &str,
    errors: &mut Errors,
) -> Vec<(String, &'a str)> {
    let mut out = Vec::new();
    for (i, v) in values.iter().enumerate() {
        let key = index(path, i);
        match v.as_str() {
            Some(s) => out.push((key, s)),
            None => errors.push(
                &key,
                format!("expected {what} string, found {}", v.type_str()),
            ),
        }
    }
    out
}

fn ip_list(raw: Option<StringOrList>, path: &str, errors: &mut Errors) -> Vec<IpAddr> {
    let items: Vec<(String, String)> = match raw {
        None => return Vec::new(),
        Some(StringOrList::One(s)) => vec![(path.to_owned(), s)],
        Some(StringOrList::Many(values)) => string_elements(&values, path, "an IP address", errors)
            .into_iter()
            .map(|(k, s)| (k, s.to_owned()))
            .collect(),
    };
    let mut out = Vec::new();
    for (key, text) in items {
        match parse_ip(&text) {
            Ok(ip) => out.push(ip),
            Err(e) => errors.push(&key, e),
        }
    }
    out
}

fn net_list(raw: Option<Vec<Value>>, path: &str, errors: &mut Errors) -> Vec<IpNet> {
    let values = raw.unwrap_or_default();
    let mut out = Vec::new();
    for (key, text) in string_elements(&values, path, "a CIDR", errors) {
        match parse_net(text) {
            Ok(net) => out.push(net),
            Err(e) => errors.push(&key, e),
        }
    }
    out
}

fn duration_or(
    raw: Option<DurationText>,
    default: Duration,
    path: &str,
    errors: &mut Errors,
) -> Duration {
    match raw {
        None => default,
        Some(DurationText(text)) => parse_duration(&text).unwrap_or_else(|e| {
            errors.push(path, e);
            default
        }),
    }
}

const LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];

fn is_level(s: &str) -> bool {
    LEVELS.iter().any(|l| l.eq_ignore_ascii_case(s.trim()))
}

/// A `tracing` filter made of `LEVEL` and `TARGET=LEVEL` directives. Bare words that are not
/// levels are refused (a typo such as "inof" would otherwise silently mean "target inof").
fn check_log_level(level: &str) -> Result<(), String> {
    let hint = "write a level (trace, debug, info, warn, error, off), optionally followed by TARGET=LEVEL directives, such as \"info,turnstone::server=debug\"";
    if level.trim().is_empty() {
        return Err(format!("empty; {hint}"));
    }
    // tracing-subscriber's directive parser panics on some non-ASCII input (found by the
    // `config` fuzz target): only module paths, levels and filter punctuation pass.
    if let Some(c) = level.chars().find(|c| {
        !(c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '=' | ',' | '-' | '.' | ' '))
    }) {
        return Err(format!("{c:?} is not allowed; {hint}"));
    }
    for directive in level.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let lvl = match directive.rsplit_once('=') {
            Some((_target, lvl)) => lvl,
            None => directive,
        };
        if !is_level(lvl) {
            return Err(if directive == level.trim() && lvl == directive {
                format!("{lvl:?} is not a level; {hint}")
            } else {
                format!("{lvl:?} in {directive:?} is not a level; {hint}")
            });
        }
    }
    tracing_subscriber::EnvFilter::try_new(level)
        .map(|_| ())
        .map_err(|e| format!("{level:?} is not a valid filter ({e}); {hint}"))
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// 1-based line and column (in characters) of byte offset `at` in `text`.
fn line_col(text: &str, at: usize) -> (usize, usize) {
    let at = at.min(text.len());
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let col = before
        .get(line_start..)
        .map(|s| s.chars().count())
        .unwrap_or(0)
        + 1;
    (line, col)
}

fn syntax_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let what = e.message().trim().replace('\n', "; ");
    let what = if what.is_empty() {
        "invalid TOML syntax".to_owned()
    } else {
        what
    };
    let message = match e.span() {
        Some(span) => {
            let (line, col) = line_col(text, span.start);
            format!("TOML syntax error at line {line}, column {col}: {what}")
        }
        None => format!("TOML syntax error: {what}"),
    };
    ConfigError::new("", message)
}

impl Config {
    /// Parses and validates a configuration. Returns every problem found, each naming its key;
    /// unknown keys are errors.
    pub fn from_toml(text: &str) -> Result<Config, Vec<ConfigError>> {
        let top: Table = match text.parse() {
            Ok(t) => t,
            Err(e) => return Err(vec![syntax_error(text, &e)]),
        };
        let mut errors = Errors::default();
        let _: RawTop = shape(&top, "", &mut errors);
        let mut config = Config {
            server: ServerSection::default(),
            listen: Vec::new(),
            relay: RelaySection::default(),
            auth: AuthSection::default(),
            policy: PolicySection::default(),
            limits: LimitsSection::default(),
            log: LogSection::default(),
            tls: TlsSection::default(),
            metrics: MetricsSection::default(),
            store: StoreSection::default(),
        };

        // [server]
        match section(&top, "server", &mut errors) {
            None => errors.push(
                "server",
                "missing section [server] (it needs at least realm)",
            ),
            Some(t) => {
                let raw: RawServer = shape(t, "server", &mut errors);
                match raw.realm {
                    Some(realm) => config.server.realm = realm,
                    None if t.contains_key("realm") => {}
                    None => errors.push(
                        "server.realm",
                        "missing; set the authentication realm, such as \"turn.example.com\"",
                    ),
                }
                if let Some(software) = raw.software {
                    config.server.software = (!software.is_empty()).then_some(software);
                }
                config.server.nonce_lifetime = duration_or(
                    raw.nonce_lifetime,
                    DEFAULT_NONCE_LIFETIME,
                    "server.nonce_lifetime",
                    &mut errors,
                );
                config.server.workers = raw.workers.unwrap_or(0);
                config.server.adaptive_workers = raw.adaptive_workers.unwrap_or(true);
                let alternates = raw.alternate_servers.unwrap_or_default();
                for (key, text) in string_elements(
                    &alternates,
                    "server.alternate_servers",
                    "an IP:PORT",
                    &mut errors,
                ) {
                    match parse_socket_addr(text) {
                        Ok(a) => config.server.alternate_servers.push(a),
                        Err(e) => errors.push(&key, e),
                    }
                }
                config.server.drain_timeout = duration_or(
                    raw.drain_timeout,
                    DEFAULT_DRAIN_TIMEOUT,
                    "server.drain_timeout",
                    &mut errors,
                );
            }
        }

        // [[listen]]
        match top.get("listen") {
            None => {}
            Some(Value::Array(entries)) => {
                for (i, entry) in entries.iter().enumerate() {
                    let path = index("listen", i);
                    let Some(t) = entry.as_table() else {
                        errors.push(
                            &path,
                            format!("expected a table, found {}", entry.type_str()),
                        );
                        continue;
                    };
                    let raw: RawListen = shape(t, &path, &mut errors);
                    let transport = match raw.transport {
                        Some(tr) => Some(tr),
                        None => {
                            errors.push(
                                &join(&path, "transport"),
                                "missing; one of \"udp\", \"tcp\", \"tls\"",
                            );
                            None
                        }
                    };
                    let address = match raw.address {
                        Some(a) => match parse_socket_addr(&a) {
                            Ok(a) => Some(a),
                            Err(e) => {
                                errors.push(&join(&path, "address"), e);
                                None
                            }
                        },
                        None => {
                            errors
                                .push(&join(&path, "address"), "missing; such as \"0.0.0.0:3478\"");
                            None
                        }
                    };
                    if let (Some(transport), Some(address)) = (transport, address) {
                        config.listen.push(Listen { transport, address });
                    }
                }
            }
            Some(other) => errors.push(
                "listen",
                format!(
                    "expected an array of tables written [[listen]], found {}",
                    other.type_str()
                ),
            ),
        }

        // [relay]
        match section(&top, "relay", &mut errors) {
            None => errors.push(
                "relay",
                "missing section [relay] (it needs at least address)",
            ),
            Some(t) => {
                let raw: RawRelay = shape(t, "relay", &mut errors);
                config.relay.addresses = ip_list(raw.address, "relay.address", &mut errors);
                config.relay.external_addresses =
                    ip_list(raw.external_address, "relay.external_address", &mut errors);
                if let Some(ports) = raw.ports {
                    match parse_port_range(&ports) {
                        Ok((lo, hi)) => {
                            config.relay.port_min = lo;
                            config.relay.port_max = hi;
                        }
                        Err(e) => errors.push("relay.ports", e),
                    }
                }
                if let Some(size) = raw.socket_buffer {
                    match parse_size(&size) {
                        Ok(n) if (4096..=1 << 30).contains(&n) => config.relay.socket_buffer = n,
                        Ok(_) => errors.push(
                            "relay.socket_buffer",
                            format!("{size:?} is out of range (4KiB to 1GiB)"),
                        ),
                        Err(e) => errors.push("relay.socket_buffer", e),
                    }
                }
            }
        }

        // [auth]
        if let Some(t) = section(&top, "auth", &mut errors) {
            let raw: RawAuth = shape(t, "auth", &mut errors);
            for (user, value) in raw.users.unwrap_or_default() {
                match value {
                    Value::String(pass) => {
                        config.auth.users.insert(user, pass);
                    }
                    other => errors.push(
                        &join("auth.users", &user),
                        format!("expected a password string, found {}", other.type_str()),
                    ),
                }
            }
            let secrets = raw.secrets.unwrap_or_default();
            for (_, s) in string_elements(&secrets, "auth.secrets", "a secret", &mut errors) {
                config.auth.secrets.push(s.to_owned());
            }
        }

        // [policy]
        if let Some(t) = section(&top, "policy", &mut errors) {
            let raw: RawPolicy = shape(t, "policy", &mut errors);
            config.policy.allow_peers =
                net_list(raw.allow_peers, "policy.allow_peers", &mut errors);
            config.policy.deny_peers = net_list(raw.deny_peers, "policy.deny_peers", &mut errors);
        }

        // [limits]
        if let Some(t) = section(&top, "limits", &mut errors) {
            let raw: RawLimits = shape(t, "limits", &mut errors);
            let d = LimitsSection::default();
            let l = &mut config.limits;
            l.max_allocations = raw.max_allocations.unwrap_or(d.max_allocations);
            l.max_allocations_per_user = raw.max_allocations_per_user;
            l.max_allocations_per_rest_user = raw
                .max_allocations_per_rest_user
                .unwrap_or(d.max_allocations_per_rest_user);
            l.max_permissions_per_allocation = raw
                .max_permissions_per_allocation
                .unwrap_or(d.max_permissions_per_allocation);
            l.max_channels_per_allocation = raw
                .max_channels_per_allocation
                .unwrap_or(d.max_channels_per_allocation);
            l.max_lifetime = duration_or(
                raw.max_lifetime,
                d.max_lifetime,
                "limits.max_lifetime",
                &mut errors,
            );
            l.default_lifetime = duration_or(
                raw.default_lifetime,
                d.default_lifetime,
                "limits.default_lifetime",
                &mut errors,
            );
            for (raw, key, field) in [
                (
                    raw.max_bandwidth_per_allocation,
                    "limits.max_bandwidth_per_allocation",
                    &mut l.max_bandwidth_per_allocation,
                ),
                (
                    raw.max_total_bandwidth,
                    "limits.max_total_bandwidth",
                    &mut l.max_total_bandwidth,
                ),
            ] {
                if let Some(BandwidthText(text)) = raw {
                    match parse_bandwidth(&text) {
                        Ok(n) => *field = n,
                        Err(e) => errors.push(key, e),
                    }
                }
            }
            l.unauthenticated_rate = raw.unauthenticated_rate.unwrap_or(d.unauthenticated_rate);
            l.redirect_above = raw.redirect_above.unwrap_or(d.redirect_above);
        }

        // [log]
        if let Some(t) = section(&top, "log", &mut errors) {
            let raw: RawLog = shape(t, "log", &mut errors);
            if let Some(level) = raw.level {
                config.log.level = level;
            }
            if let Some(format) = raw.format {
                config.log.format = format;
            }
        }

        // [tls]
        if let Some(t) = section(&top, "tls", &mut errors) {
            let raw: RawTls = shape(t, "tls", &mut errors);
            config.tls.cert_file = raw.certificate;
            config.tls.key_file = raw.private_key;
        }

        // [metrics]
        if let Some(t) = section(&top, "metrics", &mut errors) {
            let raw: RawMetrics = shape(t, "metrics", &mut errors);
            if let Some(listen) = raw.listen {
                match parse_socket_addr(&listen) {
                    Ok(a) => config.metrics.listen = Some(a),
                    Err(e) => errors.push("metrics.listen", e),
                }
            }
            config.metrics.selftest = raw.selftest;
        }

        // [store]
        if let Some(t) = section(&top, "store", &mut errors) {
            let raw: RawStore = shape(t, "store", &mut errors);
            if let Some(url) = raw.url {
                if url.starts_with("redis://") || url.starts_with("rediss://") {
                    config.store.url = Some(url);
                } else {
                    errors.push("store.url", "must start with redis:// (or rediss://)");
                }
            }
            if let Some(id) = raw.node_id {
                if id.is_empty() || id.len() > 64 || id.contains(char::is_whitespace) {
                    errors.push("store.node_id", "1 to 64 characters, no spaces");
                } else {
                    config.store.node_id = Some(id);
                }
            }
            if let Some(a) = raw.advertise {
                match parse_socket_addr(&a) {
                    Ok(a) => config.store.advertise = Some(a),
                    Err(e) => errors.push("store.advertise", e),
                }
            }
        }

        config.check(&mut errors);
        if errors.list.is_empty() {
            Ok(config)
        } else {
            Err(errors.list)
        }
    }

    /// Reads and validates the file at `path`. An unreadable file is one error naming the path.
    pub fn load(path: &Path) -> Result<Config, Vec<ConfigError>> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            vec![ConfigError::new(
                "",
                format!("cannot read configuration file {}: {e}", path.display()),
            )]
        })?;
        Config::from_toml(&text)
    }

    /// The annotated example configuration shipped as `conf/turnstone.toml`.
    pub fn example_toml() -> &'static str {
        include_str!("../../conf/turnstone.toml")
    }

    /// The development configuration used when `turnstone` runs without `--config`: realm
    /// "turnstone.local", UDP on 127.0.0.1:3478, relay on 127.0.0.1 ports 49152-65535, peers
    /// on loopback allowed (127.0.0.0/8, ::1/128), and one freshly generated random REST API
    /// secret in `auth.secrets` (so the configuration validates and the caller can mint a
    /// credential from it with [`crate::auth::rest_username`]/[`crate::auth::rest_password`]).
    pub fn development() -> Config {
        let secret: [u8; 16] = rand::random();
        let secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        Config {
            server: ServerSection {
                realm: "turnstone.local".to_owned(),
                ..ServerSection::default()
            },
            listen: vec![Listen {
                transport: ListenTransport::Udp,
                address: SocketAddr::from((Ipv4Addr::LOCALHOST, 3478)),
            }],
            relay: RelaySection {
                addresses: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
                ..RelaySection::default()
            },
            auth: AuthSection {
                users: BTreeMap::new(),
                secrets: vec![secret],
            },
            policy: PolicySection {
                allow_peers: ipnet::Ipv4Net::new(Ipv4Addr::new(127, 0, 0, 0), 8)
                    .ok()
                    .map(IpNet::V4)
                    .into_iter()
                    .chain([IpNet::from(IpAddr::V6(Ipv6Addr::LOCALHOST))])
                    .collect(),
                deny_peers: Vec::new(),
            },
            limits: LimitsSection::default(),
            log: LogSection::default(),
            tls: TlsSection::default(),
            metrics: MetricsSection::default(),
            store: StoreSection::default(),
        }
    }

    /// Checks a configuration built in code (`from_toml` runs the same checks).
    pub fn validate(&self) -> Result<(), Vec<ConfigError>> {
        let mut errors = Errors::default();
        self.check(&mut errors);
        if errors.list.is_empty() {
            Ok(())
        } else {
            Err(errors.list)
        }
    }

    fn check(&self, errors: &mut Errors) {
        errors.start_checking();
        // server
        let realm = &self.server.realm;
        if realm.is_empty() {
            errors.push(
                "server.realm",
                "empty; set the authentication realm, such as \"turn.example.com\"",
            );
        } else if realm.chars().count() > MAX_REALM_CHARS {
            errors.push(
                "server.realm",
                format!("longer than {MAX_REALM_CHARS} characters (RFC 8489 14.9)"),
            );
        } else if realm
            .chars()
            .any(|c| c.is_control() || c == '"' || c == '\\')
        {
            errors.push(
                "server.realm",
                "contains a control character, quote or backslash",
            );
        }
        if let Some(software) = &self.server.software {
            if software.chars().count() > MAX_SOFTWARE_CHARS {
                errors.push(
                    "server.software",
                    format!("longer than {MAX_SOFTWARE_CHARS} characters (RFC 8489 14.14)"),
                );
            }
        }
        let nonce = self.server.nonce_lifetime;
        if nonce < Duration::from_secs(1) || nonce.as_secs() > u64::from(u32::MAX / 2) {
            errors.push(
                "server.nonce_lifetime",
                format!(
                    "{} is out of range; use at least 1s (10m is usual)",
                    humantime::format_duration(nonce)
                ),
            );
        }
        if self.server.workers > MAX_WORKERS {
            errors.push(
                "server.workers",
                format!(
                    "{} is more than {MAX_WORKERS}; use 0 for one per core",
                    self.server.workers
                ),
            );
        }

        for (i, a) in self.server.alternate_servers.iter().enumerate() {
            let key = index("server.alternate_servers", i);
            if a.ip().is_unspecified() || a.ip().is_multicast() || a.port() == 0 {
                errors.push(
                    &key,
                    format!("{a} is not a reachable server address; give the IP:PORT clients should use instead"),
                );
            } else if let Some(j) = self
                .server
                .alternate_servers
                .get(..i)
                .unwrap_or_default()
                .iter()
                .position(|b| b == a)
            {
                errors.push(
                    &key,
                    format!("{a} is a duplicate of server.alternate_servers[{j}]"),
                );
            }
        }
        if self.server.drain_timeout > MAX_DRAIN_TIMEOUT {
            errors.push(
                "server.drain_timeout",
                format!(
                    "{} is longer than {}; 0s exits at once, 30s is usual",
                    humantime::format_duration(self.server.drain_timeout),
                    humantime::format_duration(MAX_DRAIN_TIMEOUT)
                ),
            );
        }

        // listen
        if self.listen.is_empty() && !errors.has_at_or_under("listen") {
            errors.push(
                "listen",
                "no listener; add at least one [[listen]] with transport and address",
            );
        }
        let mut seen: HashMap<(bool, SocketAddr), (usize, ListenTransport)> = HashMap::new();
        for (i, l) in self.listen.iter().enumerate() {
            let key = (l.transport.is_stream(), l.address);
            if let Some((j, other)) = seen.get(&key) {
                let what = if *other == l.transport {
                    "duplicate of".to_owned()
                } else {
                    format!(
                        "{} and {} cannot share a TCP port; conflicts with",
                        l.transport, other
                    )
                };
                errors.push(
                    &format!("listen[{i}].address"),
                    format!("{} ({}) {what} listen[{j}]", l.address, l.transport),
                );
            } else {
                seen.insert(key, (i, l.transport));
            }
        }
        let has_tls = self
            .listen
            .iter()
            .any(|l| l.transport == ListenTransport::Tls);
        if has_tls {
            if self.tls.cert_file.is_none() {
                errors.push(
                    "tls.certificate",
                    "missing; a tls listener needs a certificate chain (PEM file)",
                );
            }
            if self.tls.key_file.is_none() {
                errors.push(
                    "tls.private_key",
                    "missing; a tls listener needs a private key (PEM file)",
                );
            }
        }

        // relay
        let relay = &self.relay;
        if relay.addresses.is_empty() && !errors.has_at_or_under("relay") {
            errors.push(
                "relay.address",
                "missing; name the interface address relay sockets bind to, such as \"203.0.113.10\" or [\"203.0.113.10\", \"2001:db8::10\"]",
            );
        }
        for family_v6 in [false, true] {
            let n = relay
                .addresses
                .iter()
                .filter(|a| a.is_ipv6() == family_v6)
                .count();
            if n > 1 {
                errors.push(
                    "relay.address",
                    format!(
                        "more than one {} address; give at most one IPv4 and one IPv6 address",
                        if family_v6 { "IPv6" } else { "IPv4" }
                    ),
                );
            }
            let n = relay
                .external_addresses
                .iter()
                .filter(|a| a.is_ipv6() == family_v6)
                .count();
            if n > 1 {
                errors.push(
                    "relay.external_address",
                    format!(
                        "more than one {} address; give at most one per family",
                        if family_v6 { "IPv6" } else { "IPv4" }
                    ),
                );
            }
        }
        for a in &relay.addresses {
            if a.is_unspecified() {
                errors.push(
                    "relay.address",
                    format!("{a} is unspecified; name the interface address relay sockets bind to (it is also what clients are told, unless external_address is set)"),
                );
            } else if a.is_multicast() || *a == IpAddr::V4(Ipv4Addr::BROADCAST) {
                errors.push("relay.address", format!("{a} is not a unicast address"));
            }
        }
        for a in &relay.external_addresses {
            if a.is_unspecified() || a.is_multicast() || *a == IpAddr::V4(Ipv4Addr::BROADCAST) {
                errors.push(
                    "relay.external_address",
                    format!("{a} is not a unicast address"),
                );
            } else if !relay.addresses.iter().any(|r| r.is_ipv6() == a.is_ipv6()) {
                errors.push(
                    "relay.external_address",
                    format!("{a} has no relay address of the same family in relay.address"),
                );
            }
        }
        if relay.port_min == 0 || relay.port_min > relay.port_max {
            errors.push(
                "relay.ports",
                format!(
                    "\"{}-{}\" is not a range LOW-HIGH with LOW <= HIGH (ports 1-65535)",
                    relay.port_min, relay.port_max
                ),
            );
        }

        // auth
        for (user, pass) in &self.auth.users {
            let key = join("auth.users", user);
            if user.is_empty() {
                errors.push(&key, "empty user name");
            } else if user.len() > MAX_USERNAME_BYTES {
                errors.push(
                    &key,
                    format!("user name longer than {MAX_USERNAME_BYTES} bytes"),
                );
            } else if pass.is_empty() {
                errors.push(&key, "empty password");
            }
        }
        for (i, s) in self.auth.secrets.iter().enumerate() {
            if s.is_empty() {
                errors.push(&index("auth.secrets", i), "empty secret");
            }
        }
        // With a fleet store, users and secrets may all live there.
        if self.auth.users.is_empty()
            && self.auth.secrets.is_empty()
            && self.store.url.is_none()
            && !errors.has_at_or_under("auth")
        {
            errors.push(
                "auth",
                "no credentials; set auth.users (static users) and/or auth.secrets (TURN REST API shared secrets), or store.url",
            );
        }

        // limits
        let l = &self.limits;
        for (key, v) in [
            ("limits.max_allocations", l.max_allocations),
            (
                "limits.max_allocations_per_user",
                l.max_allocations_per_user.unwrap_or(1),
            ),
            (
                "limits.max_allocations_per_rest_user",
                l.max_allocations_per_rest_user,
            ),
            (
                "limits.max_permissions_per_allocation",
                l.max_permissions_per_allocation,
            ),
            (
                "limits.max_channels_per_allocation",
                l.max_channels_per_allocation,
            ),
        ] {
            if v == 0 {
                errors.push(key, "must be at least 1");
            }
        }
        if l.max_channels_per_allocation > MAX_CHANNEL_NUMBERS {
            errors.push(
                "limits.max_channels_per_allocation",
                format!("{} is more than the {MAX_CHANNEL_NUMBERS} channel numbers that exist (RFC 8656 12.)", l.max_channels_per_allocation),
            );
        }
        if l.default_lifetime < Duration::from_secs(1) {
            errors.push(
                "limits.default_lifetime",
                "must be at least 1s (10m is usual)",
            );
        }
        if l.max_lifetime.as_secs() > u64::from(u32::MAX) {
            errors.push(
                "limits.max_lifetime",
                "too long: LIFETIME is a 32-bit number of seconds",
            );
        } else if l.max_lifetime < l.default_lifetime {
            errors.push(
                "limits.max_lifetime",
                format!(
                    "{} is shorter than limits.default_lifetime ({})",
                    humantime::format_duration(l.max_lifetime),
                    humantime::format_duration(l.default_lifetime)
                ),
            );
        }

        for (key, v) in [
            (
                "limits.max_bandwidth_per_allocation",
                l.max_bandwidth_per_allocation,
            ),
            ("limits.max_total_bandwidth", l.max_total_bandwidth),
        ] {
            if v != 0 && v < MIN_BANDWIDTH {
                errors.push(
                    key,
                    format!("{v} bytes/s is less than one full-size packet per second ({MIN_BANDWIDTH} bytes/s, \"12kbit\"); use 0 for unlimited"),
                );
            }
        }
        if l.unauthenticated_rate > MAX_UNAUTHENTICATED_RATE {
            errors.push(
                "limits.unauthenticated_rate",
                format!(
                    "{} is more than {MAX_UNAUTHENTICATED_RATE}; use 0 for unlimited",
                    l.unauthenticated_rate
                ),
            );
        }

        // metrics
        if let Some(a) = self.metrics.listen {
            if a.ip().is_multicast() {
                errors.push("metrics.listen", format!("{a} is not a unicast address"));
            }
        }
        if self.metrics.selftest && self.metrics.listen.is_none() {
            errors.push(
                "metrics.selftest",
                "the self-test page is served on metrics.listen, which is not set",
            );
        }

        // log
        if let Err(e) = check_log_level(&self.log.level) {
            errors.push("log.level", e);
        }

        // tls
        for (key, p) in [
            ("tls.certificate", &self.tls.cert_file),
            ("tls.private_key", &self.tls.key_file),
        ] {
            if p.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                errors.push(key, "empty path");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[server]
realm = "turnstone.test"

[[listen]]
transport = "udp"
address = "127.0.0.1:3478"

[relay]
address = "127.0.0.1"

[auth]
users = { alice = "wonderland" }
secrets = ["s3cret"]

[policy]
allow_peers = ["127.0.0.0/8"]
deny_peers = []

[limits]
max_allocations = 100000
max_allocations_per_rest_user = 100

[log]
level = "info"
format = "text"
"#;

    fn errs(text: &str) -> Vec<ConfigError> {
        match Config::from_toml(text) {
            Ok(_) => panic!("expected errors for:\n{text}"),
            Err(e) => e,
        }
    }

    /// The errors for GOOD with `replace` substituted for `find`.
    fn errs_with(find: &str, replace: &str) -> Vec<ConfigError> {
        assert!(GOOD.contains(find), "{find}");
        errs(&GOOD.replacen(find, replace, 1))
    }

    fn keys(errors: &[ConfigError]) -> Vec<&str> {
        errors.iter().map(|e| e.key.as_str()).collect()
    }

    fn one(errors: &[ConfigError], key: &str) -> ConfigError {
        assert_eq!(keys(errors), vec![key], "{errors:#?}");
        errors[0].clone()
    }

    #[test]
    fn good_config_and_defaults() {
        let c = Config::from_toml(GOOD).unwrap();
        assert_eq!(c.server.realm, "turnstone.test");
        assert_eq!(c.server.software.as_deref(), Some("turnstone"));
        assert_eq!(c.server.nonce_lifetime, Duration::from_secs(600));
        assert_eq!(c.server.workers, 0);
        assert_eq!(
            c.listen,
            vec![Listen {
                transport: ListenTransport::Udp,
                address: "127.0.0.1:3478".parse().unwrap()
            }]
        );
        assert_eq!(c.relay.addresses, vec![ip("127.0.0.1")]);
        assert!(c.relay.external_addresses.is_empty());
        assert_eq!((c.relay.port_min, c.relay.port_max), (49152, 65535));
        assert_eq!(
            c.auth.users.get("alice").map(String::as_str),
            Some("wonderland")
        );
        assert_eq!(c.auth.secrets, vec!["s3cret".to_owned()]);
        assert_eq!(
            c.policy.allow_peers,
            vec!["127.0.0.0/8".parse::<IpNet>().unwrap()]
        );
        assert!(c.policy.deny_peers.is_empty());
        assert_eq!(c.limits, LimitsSection::default());
        assert_eq!(c.log, LogSection::default());
        assert_eq!(c.tls, TlsSection::default());
        assert!(c.server.alternate_servers.is_empty());
        assert_eq!(c.server.drain_timeout, Duration::from_secs(30));
        assert_eq!(c.limits.max_bandwidth_per_allocation, 0);
        assert_eq!(c.limits.max_total_bandwidth, 0);
        assert_eq!(c.limits.unauthenticated_rate, 500);
        assert_eq!(c.metrics.listen, None);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn bandwidth_units() {
        for (text, want) in [
            ("0", 0),
            ("1500", 1500),
            ("250KB", 250_000),
            ("250 kB/s", 250_000),
            ("2Mbit", 250_000),
            ("2 Mbps", 250_000),
            ("1.5MiB", 1_572_864),
            ("100Kbit/s", 12_500),
            ("1Gbit", 125_000_000),
            ("3GB", 3_000_000_000),
            ("12kbit", 1500),
        ] {
            assert_eq!(parse_bandwidth(text), Ok(want), "{text}");
        }
        for text in [
            "",
            "fast",
            "2Mb",
            "2 mbit",
            "-1",
            ".5MB",
            "5.MB",
            "1e3",
            "99999999999GB",
        ] {
            assert!(parse_bandwidth(text).is_err(), "{text}");
        }
    }

    #[test]
    fn drain_metrics_and_limit_problems() {
        for (find, replace, key, needle) in [
            (
                "realm = \"turnstone.test\"",
                "realm = \"turnstone.test\"\nalternate_servers = [\"203.0.113.20\"]",
                "server.alternate_servers[0]",
                "IP:PORT",
            ),
            (
                "realm = \"turnstone.test\"",
                "realm = \"turnstone.test\"\nalternate_servers = \"203.0.113.20:3478\"",
                "server.alternate_servers",
                "expected",
            ),
            (
                "realm = \"turnstone.test\"",
                "realm = \"turnstone.test\"\nalternate_servers = [\"0.0.0.0:3478\"]",
                "server.alternate_servers[0]",
                "not a reachable",
            ),
            (
                "realm = \"turnstone.test\"",
                "realm = \"turnstone.test\"\nalternate_servers = [\"203.0.113.20:3478\", \"203.0.113.20:3478\"]",
                "server.alternate_servers[1]",
                "duplicate of server.alternate_servers[0]",
            ),
            (
                "realm = \"turnstone.test\"",
                "realm = \"turnstone.test\"\ndrain_timeout = \"soon\"",
                "server.drain_timeout",
                "not a duration",
            ),
            (
                "realm = \"turnstone.test\"",
                "realm = \"turnstone.test\"\ndrain_timeout = \"2days\"",
                "server.drain_timeout",
                "longer than",
            ),
            (
                "max_allocations_per_rest_user = 100",
                "max_allocations_per_rest_user = 100\nmax_bandwidth_per_allocation = \"2Mb\"",
                "limits.max_bandwidth_per_allocation",
                "unknown unit",
            ),
            (
                "max_allocations_per_rest_user = 100",
                "max_allocations_per_rest_user = 100\nmax_total_bandwidth = 100",
                "limits.max_total_bandwidth",
                "one full-size packet",
            ),
            (
                "max_allocations_per_rest_user = 100",
                "max_allocations_per_rest_user = 100\nmax_total_bandwidth = true",
                "limits.max_total_bandwidth",
                "bandwidth",
            ),
            (
                "max_allocations_per_rest_user = 100",
                "max_allocations_per_rest_user = 100\nunauthenticated_rate = -1",
                "limits.unauthenticated_rate",
                "",
            ),
            (
                "max_allocations_per_rest_user = 100",
                "max_allocations_per_rest_user = 100\nunauthenticated_rate = 2000000",
                "limits.unauthenticated_rate",
                "use 0 for unlimited",
            ),
            (
                "[log]",
                "[metrics]\nlisten = \"127.0.0.1\"\n[log]",
                "metrics.listen",
                "IP:PORT",
            ),
            (
                "[log]",
                "[metrics]\nlisten = \"224.0.0.1:9641\"\n[log]",
                "metrics.listen",
                "unicast",
            ),
            ("[log]", "metrics = 1\n[log]", "limits.metrics", "unknown key"),
        ] {
            let e = errs_with(find, replace);
            let e = one(&e, key);
            assert!(
                e.message.contains(needle),
                "{key}: message {:?} should contain {needle:?}",
                e.message
            );
        }
        let c = Config::from_toml(&GOOD.replacen(
            "max_allocations_per_rest_user = 100",
            "max_allocations_per_rest_user = 100\nmax_bandwidth_per_allocation = 250000\nunauthenticated_rate = 10",
            1,
        ))
        .unwrap();
        assert_eq!(c.limits.max_bandwidth_per_allocation, 250_000);
        assert_eq!(c.limits.unauthenticated_rate, 10);
        let mut c = Config::development();
        assert_eq!(c.metrics, MetricsSection::default());
        c.server.drain_timeout = Duration::from_secs(100_000);
        c.limits.max_bandwidth_per_allocation = 10;
        let e = c.validate().unwrap_err();
        assert_eq!(
            keys(&e),
            vec![
                "server.drain_timeout",
                "limits.max_bandwidth_per_allocation"
            ],
            "{e:#?}"
        );
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn example_parses_and_validates() {
        let c = Config::from_toml(Config::example_toml()).unwrap_or_else(|e| {
            panic!(
                "{}",
                e.iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
        assert!(c.validate().is_ok());
        assert!(!c.listen.is_empty());
    }

    #[test]
    fn example_documents_every_key() {
        let example = Config::example_toml();
        for key in [
            "realm",
            "software",
            "nonce_lifetime",
            "workers",
            "adaptive_workers",
            "[[listen]]",
            "transport",
            "address",
            "external_address",
            "ports",
            "socket_buffer",
            "users",
            "secrets",
            "allow_peers",
            "deny_peers",
            "max_allocations",
            "max_allocations_per_user",
            "max_allocations_per_rest_user",
            "max_permissions_per_allocation",
            "max_channels_per_allocation",
            "max_lifetime",
            "default_lifetime",
            "level",
            "format",
            "[tls]",
            "certificate",
            "private_key",
            "alternate_servers",
            "drain_timeout",
            "max_bandwidth_per_allocation",
            "max_total_bandwidth",
            "unauthenticated_rate",
            "redirect_above",
            "[store]",
            "node_id",
            "advertise",
            "[metrics]",
            "listen = \"127.0.0.1:9641\"",
            "selftest",
        ] {
            assert!(
                example.contains(key),
                "conf/turnstone.toml does not mention {key}"
            );
        }
    }

    #[test]
    fn full_config_every_key() {
        let c = Config::from_toml(
            r#"
[server]
realm = "turn.example.com"
software = ""
nonce_lifetime = "1h 30m"
workers = 4
alternate_servers = ["203.0.113.20:3478", "[2001:db8::20]:3478"]
drain_timeout = "2m"
[[listen]]
transport = "udp"
address = "0.0.0.0:3478"
[[listen]]
transport = "tcp"
address = "0.0.0.0:3478"
[[listen]]
transport = "tls"
address = "[::]:5349"
[relay]
address = ["10.0.0.5", "2001:db8::5"]
external_address = ["203.0.113.10"]
ports = "50000 - 50100"
[auth]
secrets = ["a", "b"]
[policy]
allow_peers = ["10.0.0.0/8", "fd00::1"]
deny_peers = ["10.0.0.1"]
[limits]
max_allocations = 5
max_allocations_per_user = 2
max_allocations_per_rest_user = 3
max_permissions_per_allocation = 3
max_channels_per_allocation = 4
max_lifetime = "2h"
default_lifetime = "5m"
max_bandwidth_per_allocation = "2Mbit"
max_total_bandwidth = "1GB"
unauthenticated_rate = 0
[metrics]
listen = "[::1]:9641"
[log]
level = "info,turnstone::server=debug"
format = "json"
[tls]
certificate = "/etc/turnstone/cert.pem"
private_key = "/etc/turnstone/key.pem"
"#,
        )
        .unwrap();
        assert_eq!(c.server.software, None);
        assert_eq!(c.server.nonce_lifetime, Duration::from_secs(5400));
        assert_eq!(c.server.workers, 4);
        assert_eq!(
            c.server.alternate_servers,
            vec![
                "203.0.113.20:3478".parse::<SocketAddr>().unwrap(),
                "[2001:db8::20]:3478".parse().unwrap()
            ]
        );
        assert_eq!(c.server.drain_timeout, Duration::from_secs(120));
        assert_eq!(c.limits.max_bandwidth_per_allocation, 250_000);
        assert_eq!(c.limits.max_total_bandwidth, 1_000_000_000);
        assert_eq!(c.limits.unauthenticated_rate, 0);
        assert_eq!(c.metrics.listen, Some("[::1]:9641".parse().unwrap()));
        assert_eq!(c.listen.len(), 3);
        assert_eq!(c.listen[2].transport, ListenTransport::Tls);
        assert_eq!(c.relay.addresses, vec![ip("10.0.0.5"), ip("2001:db8::5")]);
        assert_eq!(c.relay.advertised(ip("10.0.0.5")), ip("203.0.113.10"));
        assert_eq!(c.relay.advertised(ip("2001:db8::5")), ip("2001:db8::5"));
        assert_eq!(c.relay.address_for_family(true), Some(ip("2001:db8::5")));
        assert_eq!((c.relay.port_min, c.relay.port_max), (50000, 50100));
        assert_eq!(c.relay.port_count(), 101);
        assert_eq!(
            c.policy.allow_peers[1],
            "fd00::1/128".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            c.policy.deny_peers[0],
            "10.0.0.1/32".parse::<IpNet>().unwrap()
        );
        assert_eq!(c.limits.max_channels_per_allocation, 4);
        assert_eq!(c.limits.max_allocations_per_user, Some(2));
        assert_eq!(c.limits.max_allocations_per_rest_user, 3);
        assert_eq!(c.limits.max_lifetime, Duration::from_secs(7200));
        assert_eq!(c.limits.default_lifetime, Duration::from_secs(300));
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(
            c.tls.key_file.as_deref(),
            Some(Path::new("/etc/turnstone/key.pem"))
        );
    }

    #[test]
    fn development_is_valid() {
        let c = Config::development();
        assert!(c.validate().is_ok(), "{:?}", c.validate());
        assert_eq!(c.server.realm, "turnstone.local");
        assert_eq!(c.listen[0].address, "127.0.0.1:3478".parse().unwrap());
        assert_eq!(
            c.policy.allow_peers[0],
            "127.0.0.0/8".parse::<IpNet>().unwrap()
        );
        assert_eq!(c.policy.allow_peers[1], "::1/128".parse::<IpNet>().unwrap());
        assert_eq!(c.auth.secrets.len(), 1);
        assert_ne!(c.auth.secrets, Config::development().auth.secrets);
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases: &[(&str, &str, &str, &str)] = &[
            ("realm = \"turnstone.test\"", "realm = \"\"", "server.realm", "empty"),
            ("realm = \"turnstone.test\"", "realm = 5", "server.realm", "expected a string"),
            ("realm = \"turnstone.test\"", "", "server.realm", "missing"),
            ("realm = \"turnstone.test\"", "realm = \"t\"\nnonce_lifetime = \"ten\"", "server.nonce_lifetime", "\"ten\" is not a duration"),
            ("realm = \"turnstone.test\"", "realm = \"t\"\nnonce_lifetime = 600", "server.nonce_lifetime", "duration string"),
            ("realm = \"turnstone.test\"", "realm = \"t\"\nnonce_lifetime = \"0s\"", "server.nonce_lifetime", "at least 1s"),
            ("realm = \"turnstone.test\"", "realm = \"t\"\nworkers = -1", "server.workers", "-1"),
            ("realm = \"turnstone.test\"", "realm = \"t\"\nsoftware = 1", "server.software", "string"),
            ("transport = \"udp\"", "transport = \"quic\"", "listen[0].transport", "unknown variant `quic`"),
            ("transport = \"udp\"\n", "", "listen[0].transport", "missing"),
            ("address = \"127.0.0.1:3478\"", "address = \"127.0.0.1\"", "listen[0].address", "not an address IP:PORT"),
            ("[relay]\naddress = \"127.0.0.1\"\n", "[relay]\naddress = \"0.0.0.0\"\n", "relay.address", "unspecified"),
            ("[relay]\naddress = \"127.0.0.1\"\n", "[relay]\naddress = \"::\"\n", "relay.address", "unspecified"),
            ("[relay]\naddress = \"127.0.0.1\"\n", "[relay]\naddress = \"localhost\"\n", "relay.address", "\"localhost\" is not an IP address"),
            ("[relay]\naddress = \"127.0.0.1\"\n", "[relay]\naddress = [\"127.0.0.1\", 7]\n", "relay.address[1]", "expected an IP address string"),
            ("[relay]\naddress = \"127.0.0.1\"\n", "[relay]\naddress = [\"127.0.0.1\", \"127.0.0.2\"]\n", "relay.address", "more than one IPv4"),
            ("[relay]\naddress = \"127.0.0.1\"\n", "[relay]\naddress = []\n", "relay.address", "missing"),
            ("[relay]\naddress = \"127.0.0.1\"\n", "[relay]\naddress = 1\n", "relay.address", "an IP address string or an array"),
            ("[relay]\naddress = \"127.0.0.1\"\n", "[relay]\naddress = \"127.0.0.1\"\nports = \"9-5\"\n", "relay.ports", "\"9-5\" is not a range LOW-HIGH with LOW <= HIGH"),
            ("[relay]\naddress = \"127.0.0.1\"\n", "[relay]\naddress = \"127.0.0.1\"\nports = \"0-5\"\n", "relay.ports", "not a range"),
            ("[relay]\naddress = \"127.0.0.1\"\n", "[relay]\naddress = \"127.0.0.1\"\nports = \"1-70000\"\n", "relay.ports", "not a range"),
            ("[relay]\naddress = \"127.0.0.1\"\n", "[relay]\naddress = \"127.0.0.1\"\nports = \"5000\"\n", "relay.ports", "not a range"),
            ("[relay]\naddress = \"127.0.0.1\"\n", "[relay]\naddress = \"127.0.0.1\"\nexternal_address = \"2001:db8::1\"\n", "relay.external_address", "no relay address of the same family"),
            ("[relay]\naddress = \"127.0.0.1\"\n", "[relay]\naddress = \"127.0.0.1\"\nexternal_address = [\"203.0.113.1\", \"203.0.113.2\"]\n", "relay.external_address", "more than one IPv4"),
            ("users = { alice = \"wonderland\" }", "users = { alice = \"wonderland\", bob = \"\" }", "auth.users.bob", "empty password"),
            ("users = { alice = \"wonderland\" }", "users = { alice = 5 }", "auth.users.alice", "expected a password string"),
            ("users = { alice = \"wonderland\" }", "users = { \"b b\" = \"\" }", "auth.users.\"b b\"", "empty password"),
            ("users = { alice = \"wonderland\" }", "users = [\"alice\"]", "auth.users", "expected a table, found array"),
            ("secrets = [\"s3cret\"]", "secrets = [\"s3cret\", \"\"]", "auth.secrets[1]", "empty secret"),
            ("secrets = [\"s3cret\"]", "secrets = \"s3cret\"", "auth.secrets", "expected an array, found string"),
            ("allow_peers = [\"127.0.0.0/8\"]", "allow_peers = [\"x\"]", "policy.allow_peers[0]", "\"x\" is not a CIDR"),
            ("allow_peers = [\"127.0.0.0/8\"]", "allow_peers = [\"127.0.0.0/33\"]", "policy.allow_peers[0]", "is not a CIDR"),
            ("deny_peers = []", "deny_peers = [\"10.0.0.0/8\", 3]", "policy.deny_peers[1]", "expected a CIDR string"),
            ("max_allocations = 100000", "max_allocations = 0", "limits.max_allocations", "at least 1"),
            ("max_allocations_per_rest_user = 100", "max_allocations_per_user = 0", "limits.max_allocations_per_user", "at least 1"),
            ("max_allocations_per_rest_user = 100", "max_allocations_per_rest_user = 0", "limits.max_allocations_per_rest_user", "at least 1"),
            ("max_allocations = 100000", "max_allocations = 1\nmax_channels_per_allocation = 5000", "limits.max_channels_per_allocation", "channel numbers"),
            ("max_allocations = 100000", "max_allocations = 1\nmax_permissions_per_allocation = 0", "limits.max_permissions_per_allocation", "at least 1"),
            ("max_allocations = 100000", "max_allocations = 1\nmax_lifetime = \"5m\"", "limits.max_lifetime", "shorter than limits.default_lifetime"),
            ("max_allocations = 100000", "max_allocations = 1\ndefault_lifetime = \"0s\"", "limits.default_lifetime", "at least 1s"),
            ("max_allocations = 100000", "max_allocations = 1\ndefault_lifetime = \"soon\"", "limits.default_lifetime", "not a duration"),
            ("level = \"info\"", "level = \"inof\"", "log.level", "\"inof\""),
            ("level = \"info\"", "level = \"\"", "log.level", "empty"),
            ("level = \"info\"", "level = \"info,turnstone=loud\"", "log.level", "\"loud\""),
            ("format = \"text\"", "format = \"xml\"", "log.format", "unknown variant `xml`, expected `text` or `json`"),
        ];
        for (find, replace, key, needle) in cases {
            let errors = errs_with(find, replace);
            let e = one(&errors, key);
            assert!(
                e.message.contains(needle),
                "{key}: message {:?} should contain {needle:?}",
                e.message
            );
            assert_eq!(e.to_string(), format!("{key}: {}", e.message));
        }
    }

    #[test]
    fn listen_problems() {
        let dup = GOOD.replacen(
            "[relay]",
            "[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:3478\"\n[[listen]]\ntransport = \"tcp\"\naddress = \"127.0.0.1:3478\"\n[[listen]]\ntransport = \"tls\"\naddress = \"127.0.0.1:3478\"\n[relay]",
            1,
        );
        let e = errs(&dup);
        assert_eq!(
            keys(&e),
            vec![
                "listen[1].address",
                "listen[3].address",
                "tls.certificate",
                "tls.private_key"
            ],
            "{e:#?}"
        );
        assert!(e[0].message.contains("duplicate of listen[0]"));
        assert!(e[1].message.contains("cannot share a TCP port"));

        let none = GOOD.replacen(
            "[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:3478\"\n",
            "",
            1,
        );
        let e = one(&errs(&none), "listen");
        assert!(e.message.contains("at least one [[listen]]"));

        let table = GOOD.replacen("[[listen]]", "[listen]", 1);
        let e = one(&errs(&table), "listen");
        assert!(e.message.contains("[[listen]]"), "{e}");

        let ok_tls = GOOD.replacen(
            "[relay]",
            "[[listen]]\ntransport = \"tls\"\naddress = \"127.0.0.1:5349\"\n[tls]\ncertificate = \"c.pem\"\nprivate_key = \"k.pem\"\n[relay]",
            1,
        );
        assert!(Config::from_toml(&ok_tls).is_ok());
    }

    #[test]
    fn unknown_keys_are_reported_with_path() {
        let e = errs(&format!("colour = \"blue\"\n{GOOD}"));
        let e = one(&e, "colour");
        assert!(e.message.contains("unknown key `colour`"), "{e}");
        assert!(
            e.message.contains("`server`") && e.message.contains("`limits`"),
            "{e}"
        );

        let e = errs_with(
            "realm = \"turnstone.test\"",
            "realm = \"turnstone.test\"\nrelam = \"x\"",
        );
        let e = one(&e, "server.relam");
        assert!(e.message.contains("unknown key `relam`"), "{e}");
        assert!(
            e.message.contains("`realm`") && e.message.contains("`nonce_lifetime`"),
            "{e}"
        );

        let e = errs_with("transport = \"udp\"", "transport = \"udp\"\nport = 1");
        one(&e, "listen[0].port");

        let e = errs_with("deny_peers = []", "deny_peers = []\nallow = []\nblock = []");
        assert_eq!(keys(&e), vec!["policy.allow", "policy.block"]);

        let e = errs(&format!("{GOOD}\n[metrics]\nport = 9000\n"));
        let e = one(&e, "metrics.port");
        assert!(e.message.contains("`listen`"), "{e}");
        let e = errs(&format!("{GOOD}\n[stats]\nport = 9000\n"));
        one(&e, "stats");
    }

    #[test]
    fn every_problem_at_once() {
        let text = r#"
bogus = 1
[server]
realm = ""
nonce_lifetime = "forever"
[[listen]]
transport = "udp"
address = "nope"
[relay]
address = "0.0.0.0"
ports = "9-5"
[auth]
users = { bob = "" }
[policy]
allow_peers = ["x", "10.0.0.0/8", "y"]
[limits]
max_allocations = 0
[log]
level = "loud"
"#;
        let e = errs(text);
        let mut k = keys(&e);
        k.sort_unstable();
        assert_eq!(
            k,
            vec![
                "auth.users.bob",
                "bogus",
                "limits.max_allocations",
                "listen[0].address",
                "log.level",
                "policy.allow_peers[0]",
                "policy.allow_peers[2]",
                "relay.address",
                "relay.ports",
                "server.nonce_lifetime",
                "server.realm",
            ],
            "{e:#?}"
        );
    }

    #[test]
    fn several_problems_of_one_key() {
        let e = errs_with(
            "[relay]\naddress = \"127.0.0.1\"\n",
            "[relay]\naddress = [\"0.0.0.0\", \"::\", \"127.0.0.1\"]\n",
        );
        assert_eq!(
            keys(&e),
            vec!["relay.address", "relay.address", "relay.address"],
            "{e:#?}"
        );
    }

    #[test]
    fn missing_sections() {
        let e = errs("");
        let k = keys(&e);
        assert!(
            k.contains(&"server")
                && k.contains(&"listen")
                && k.contains(&"relay")
                && k.contains(&"auth"),
            "{e:#?}"
        );
        let e = errs(&GOOD.replacen(
            "[auth]\nusers = { alice = \"wonderland\" }\nsecrets = [\"s3cret\"]\n",
            "",
            1,
        ));
        let e = one(&e, "auth");
        assert!(e.message.contains("no credentials"));
        let e = errs(&GOOD.replacen("[server]\n", "server = 1\n[serverx]\n", 1));
        assert!(keys(&e).contains(&"server"), "{e:#?}");
    }

    #[test]
    fn syntax_error_has_line_and_column() {
        let e = errs("[server]\nrealm = \"x\nfoo");
        let e = one(&e, "");
        assert!(e.message.contains("line 2, column"), "{e}");
        let e = errs("[server]\nrealm = \"x\"\nrealm = \"y\"\n");
        let e = one(&e, "");
        assert!(
            e.message.contains("line 3") && e.message.contains("duplicate key"),
            "{e}"
        );
        let e = errs("a = ");
        let e = one(&e, "");
        assert!(e.message.contains("line 1, column 5"), "{e}");
        assert_eq!(e.to_string(), e.message);
    }

    #[test]
    fn load_names_the_path() {
        let e = Config::load(Path::new("/nonexistent/turnstone.toml")).unwrap_err();
        let e = one(&e, "");
        assert!(e.message.contains("/nonexistent/turnstone.toml"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.toml");
        std::fs::write(&p, GOOD).unwrap();
        assert!(Config::load(&p).is_ok());
    }

    #[test]
    fn debug_redacts_secrets() {
        let c = Config::from_toml(GOOD).unwrap();
        let s = format!("{c:?}");
        assert!(!s.contains("wonderland") && !s.contains("s3cret"), "{s}");
        assert!(s.contains("alice"));
    }

    #[test]
    fn auth_errors_do_not_echo_secrets() {
        for (find, replace, key) in [
            (
                "secrets = [\"s3cret\"]",
                "secrets = \"topsecret\"",
                "auth.secrets",
            ),
            (
                "users = { alice = \"wonderland\" }",
                "users = \"topsecret\"",
                "auth.users",
            ),
            (
                "users = { alice = \"wonderland\" }",
                "users = { alice = [\"topsecret\"] }",
                "auth.users.alice",
            ),
        ] {
            let e = errs_with(find, replace);
            let e = one(&e, key);
            assert!(!e.message.contains("topsecret"), "{e}");
            assert!(e.message.starts_with("expected "), "{e}");
        }
    }

    #[test]
    fn validate_catches_programmatic_mistakes() {
        let mut c = Config::development();
        c.relay.port_min = 10;
        c.relay.port_max = 5;
        c.limits.default_lifetime = Duration::from_secs(7200);
        c.auth.secrets.clear();
        let e = c.validate().unwrap_err();
        assert_eq!(
            keys(&e),
            vec!["relay.ports", "auth", "limits.max_lifetime"],
            "{e:#?}"
        );
    }

    #[test]
    fn no_panic_on_odd_input() {
        for text in [
            "\u{0}",
            "[[server]]\nrealm = 1",
            "listen = [1, \"x\", {}]",
            "[relay]\naddress = [[]]",
            "[auth]\nusers = { \"\" = \"x\" }",
            "[limits]\nmax_lifetime = \"99999999999999999999h\"",
            "[server]\nrealm = \"é\u{7f}\"",
            "[log]\nlevel = \"=,=\"",
        ] {
            let _ = Config::from_toml(text);
        }
        let e = errs("[auth]\nusers = { \"\" = \"x\" }");
        assert!(keys(&e).contains(&"auth.users.\"\""), "{e:#?}");
    }
}
