//! `[server]`: realm, SOFTWARE, nonce lifetime, workers, alternate servers and drain timeout.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use toml::{Table, Value};

use super::errors::{index, section, shape, Errors};
use super::units::{duration_or, parse_socket_addr, string_elements, DurationText};

/// Default SOFTWARE attribute value.
pub const DEFAULT_SOFTWARE: &str = "turnstone";
/// Default nonce lifetime (coturn and eturnal use 10 minutes too).
pub const DEFAULT_NONCE_LIFETIME: Duration = Duration::from_secs(600);
/// Default `server.drain_timeout`: how long SIGTERM waits for allocations to end.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest `server.drain_timeout` accepted.
const MAX_DRAIN_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// REALM and SOFTWARE: fewer than 128 characters (RFC 8489 14.9, 14.14).
const MAX_REALM_CHARS: usize = 127;
const MAX_SOFTWARE_CHARS: usize = 127;
const MAX_WORKERS: usize = 1024;

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
    /// The control socket `turnstone upgrade` talks to (an absolute path; its directory
    /// must be the server user's own, mode 0700). `None`: `$RUNTIME_DIRECTORY/control.sock`
    /// under systemd (`RuntimeDirectory=`), else none.
    pub control_socket: Option<std::path::PathBuf>,
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
            control_socket: None,
        }
    }
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
    control_socket: Option<String>,
    /// Moved to `[relay]`: only named to say so.
    kernel_fast_path: Option<Value>,
}

impl ServerSection {
    /// Reads `[server]` (required) from the top-level table.
    pub(super) fn load(top: &Table, errors: &mut Errors) -> Self {
        let mut server = ServerSection::default();
        let Some(t) = section(top, "server", errors) else {
            errors.push(
                "server",
                "missing section [server] (it needs at least realm)",
            );
            return server;
        };
        let raw: RawServer = shape(t, "server", errors);
        match raw.realm {
            Some(realm) => server.realm = realm,
            None if t.contains_key("realm") => {}
            None => errors.push(
                "server.realm",
                "missing; set the authentication realm, such as \"turn.example.com\"",
            ),
        }
        if let Some(software) = raw.software {
            server.software = (!software.is_empty()).then_some(software);
        }
        server.nonce_lifetime = duration_or(
            raw.nonce_lifetime,
            DEFAULT_NONCE_LIFETIME,
            "server.nonce_lifetime",
            errors,
        );
        server.workers = raw.workers.unwrap_or(0);
        server.adaptive_workers = raw.adaptive_workers.unwrap_or(true);
        let alternates = raw.alternate_servers.unwrap_or_default();
        for (key, text) in string_elements(
            &alternates,
            "server.alternate_servers",
            "an IP:PORT",
            errors,
        ) {
            match parse_socket_addr(text) {
                Ok(a) => server.alternate_servers.push(a),
                Err(e) => errors.push(&key, e),
            }
        }
        server.drain_timeout = duration_or(
            raw.drain_timeout,
            DEFAULT_DRAIN_TIMEOUT,
            "server.drain_timeout",
            errors,
        );
        if let Some(path) = raw.control_socket {
            let p = std::path::PathBuf::from(&path);
            if !p.is_absolute() || p.file_name().is_none() {
                errors.push(
                    "server.control_socket",
                    format!("{path:?} is not an absolute path to a socket file"),
                );
            } else {
                server.control_socket = Some(p);
            }
        }
        if raw.kernel_fast_path.is_some() {
            errors.push(
                "server.kernel_fast_path",
                "moved to relay.kernel_fast_path; write it under [relay]",
            );
        }
        server
    }

    pub(super) fn check(&self, errors: &mut Errors) {
        let realm = &self.realm;
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
        if let Some(software) = &self.software {
            if software.chars().count() > MAX_SOFTWARE_CHARS {
                errors.push(
                    "server.software",
                    format!("longer than {MAX_SOFTWARE_CHARS} characters (RFC 8489 14.14)"),
                );
            }
        }
        let nonce = self.nonce_lifetime;
        if nonce < Duration::from_secs(1) || nonce.as_secs() > u64::from(u32::MAX / 2) {
            errors.push(
                "server.nonce_lifetime",
                format!(
                    "{} is out of range; use at least 1s (10m is usual)",
                    humantime::format_duration(nonce)
                ),
            );
        }
        if self.workers > MAX_WORKERS {
            errors.push(
                "server.workers",
                format!(
                    "{} is more than {MAX_WORKERS}; use 0 for one per core",
                    self.workers
                ),
            );
        }

        for (i, a) in self.alternate_servers.iter().enumerate() {
            let key = index("server.alternate_servers", i);
            if a.ip().is_unspecified() || a.ip().is_multicast() || a.port() == 0 {
                errors.push(
                    &key,
                    format!("{a} is not a reachable server address; give the IP:PORT clients should use instead"),
                );
            } else if let Some(j) = self
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
        if self.drain_timeout > MAX_DRAIN_TIMEOUT {
            errors.push(
                "server.drain_timeout",
                format!(
                    "{} is longer than {}; 0s exits at once, 30s is usual",
                    humantime::format_duration(self.drain_timeout),
                    humantime::format_duration(MAX_DRAIN_TIMEOUT)
                ),
            );
        }
    }
}
