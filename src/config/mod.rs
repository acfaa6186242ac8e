//! Configuration: `Config`, loaded from TOML and validated, every problem naming its key.
//!
//! Every message names the key it is about
//! (`relay.ports: "9-5" is not a range LOW-HIGH with LOW <= HIGH`).
//!
//! Loading happens in three steps, and all problems of all steps are reported together:
//! 1. TOML syntax (one error with line and column; nothing else can be checked after it);
//! 2. shape: every key is checked on its own against `#[serde(deny_unknown_fields)]` structs,
//!    so every unknown key and every wrongly typed value is reported with its path;
//! 3. values: addresses, CIDRs, durations, port ranges are parsed, then [`Config::validate`]
//!    checks the whole (required keys, duplicates, families, limits, log level).
//!
//! Every key and its default is documented in `conf/turnstone.toml` ([`Config::example_toml`]).
//!
//! Each section has its own file (`server`, `listen`, `relay`, `auth`, `policy`, `limits`,
//! `log`, `tls`, `metrics`, `store`) with its struct, defaults, raw serde shape, reading and
//! checks; they share `errors` (problems at key paths) and `units` (values written as text).
//! This file reads and checks the sections in order, which is the order of the errors.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use ipnet::IpNet;
use serde::Deserialize;
use toml::{Table, Value};

mod auth;
mod errors;
mod limits;
mod listen;
mod log;
mod metrics;
mod policy;
mod relay;
mod server;
mod store;
mod tls;
mod units;

pub use auth::AuthSection;
pub use errors::ConfigError;
pub use limits::{
    LimitsSection, DEFAULT_LIFETIME, DEFAULT_MAX_ALLOCATIONS,
    DEFAULT_MAX_ALLOCATIONS_PER_REST_USER, DEFAULT_MAX_CHANNELS, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_SOURCE, DEFAULT_MAX_LIFETIME, DEFAULT_MAX_PERMISSIONS,
    DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE, DEFAULT_STREAM_HANDSHAKE_TIMEOUT,
    DEFAULT_STREAM_IDLE_TIMEOUT, DEFAULT_UNAUTHENTICATED_RATE, MAX_CHANNEL_NUMBERS,
};
pub use listen::{Listen, ListenTransport};
pub use log::{LogFormat, LogSection};
pub use metrics::{MetricsSection, EXAMPLE_METRICS_LISTEN};
pub use policy::PolicySection;
pub use relay::{
    unreachable_from_outside, KernelFastPath, RelaySection, DEFAULT_PORT_MAX, DEFAULT_PORT_MIN,
    DEFAULT_SOCKET_BUFFER,
};
pub use server::{ServerSection, DEFAULT_DRAIN_TIMEOUT, DEFAULT_NONCE_LIFETIME, DEFAULT_SOFTWARE};
pub use store::{redact_url, StoreSection};
pub use tls::TlsSection;
pub use units::parse_bandwidth;

use errors::{shape, syntax_error, Errors};

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

/// The top-level keys: every one is a section of its own file.
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
        // The sections are read in the order written here, which is the order of their errors.
        let config = Config {
            server: ServerSection::load(&top, &mut errors),
            listen: listen::load(&top, &mut errors),
            relay: RelaySection::load(&top, &mut errors),
            auth: AuthSection::load(&top, &mut errors),
            policy: PolicySection::load(&top, &mut errors),
            limits: LimitsSection::load(&top, &mut errors),
            log: LogSection::load(&top, &mut errors),
            tls: TlsSection::load(&top, &mut errors),
            metrics: MetricsSection::load(&top, &mut errors),
            store: StoreSection::load(&top, &mut errors),
        };
        config.check(&mut errors);
        errors.into_result().map(|()| config)
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
            listen: vec![Listen::new(
                ListenTransport::Udp,
                SocketAddr::from((Ipv4Addr::LOCALHOST, 3478)),
            )],
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
        errors.into_result()
    }

    /// Problems that do not stop the server but that the operator should hear of (at
    /// start, on reload and in `turnstone check-config`), each naming its key.
    pub fn warnings(&self) -> Vec<ConfigError> {
        let mut out = Vec::new();
        self.relay.warnings(&mut out);
        listen::warnings(&self.listen, &mut out);
        out
    }

    /// Every section's checks, in the order of their errors.
    fn check(&self, errors: &mut Errors) {
        errors.start_checking();
        self.server.check(errors);
        listen::check(&self.listen, errors);
        if self
            .listen
            .iter()
            .any(|l| l.transport == ListenTransport::Tls)
        {
            self.tls.check_for_listener(errors);
        }
        self.relay.check(errors);
        // With a fleet store, users and secrets may all live there.
        self.auth.check(self.store.url.is_some(), errors);
        self.limits.check(errors);
        self.metrics.check(errors);
        self.log.check(errors);
        self.tls.check(errors);
    }
}

#[cfg(test)]
mod tests;
