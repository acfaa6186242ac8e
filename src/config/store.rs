//! `[store]`: the Redis server a fleet of nodes shares, this node's name and address.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Table;

use super::errors::{read_section, Errors};
use super::units::parse_socket_addr;

/// `[store]`: a Redis server shared by a fleet of nodes (users, secrets, revocations,
/// quotas, sessions). A single node needs none.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct StoreSection {
    /// `redis://[USER:PASSWORD@]host:port/db`, or `rediss://` for TLS; `None` (the
    /// default): no store.
    pub url: Option<String>,
    /// PEM CA certificate(s) that a `rediss://` server's certificate must chain to,
    /// instead of the system roots (a private CA).
    pub ca_file: Option<PathBuf>,
    /// This node's name in the fleet (default: hostname and first listen port).
    pub node_id: Option<String>,
    /// Where clients reach this node, named in ALTERNATE-SERVER when another node
    /// redirects to it (default: the first UDP listen address).
    pub advertise: Option<SocketAddr>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawStore {
    url: Option<String>,
    ca_file: Option<PathBuf>,
    node_id: Option<String>,
    advertise: Option<String>,
}

impl StoreSection {
    /// Reads `[store]` from the top-level table (its values are checked as they are read).
    pub(super) fn load(top: &Table, errors: &mut Errors) -> Self {
        let mut store = StoreSection::default();
        if let Some(raw) = read_section::<RawStore>(top, "store", errors) {
            if let Some(url) = raw.url {
                if url.starts_with("redis://") || url.starts_with("rediss://") {
                    store.url = Some(url);
                } else {
                    errors.push("store.url", "must start with redis:// (or rediss://)");
                }
            }
            if let Some(ca) = raw.ca_file {
                if ca.as_os_str().is_empty() {
                    errors.push("store.ca_file", "empty path");
                } else if !store
                    .url
                    .as_deref()
                    .is_some_and(|u| u.starts_with("rediss://"))
                {
                    errors.push(
                        "store.ca_file",
                        "needs a TLS store.url (rediss://); plain redis:// does not use it",
                    );
                } else {
                    store.ca_file = Some(ca);
                }
            }
            if let Some(id) = raw.node_id {
                if id.is_empty() || id.len() > 64 || id.contains(char::is_whitespace) {
                    errors.push("store.node_id", "1 to 64 characters, no spaces");
                } else {
                    store.node_id = Some(id);
                }
            }
            if let Some(a) = raw.advertise {
                match parse_socket_addr(&a) {
                    Ok(a) => store.advertise = Some(a),
                    Err(e) => errors.push("store.advertise", e),
                }
            }
        }
        store
    }
}

/// The URL with its password (if any) replaced by `***`, for messages and `Debug`; the
/// user name stays.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    // The last '@' ends the user info (a password may hold '@' or '/'); a URL with an
    // '@' elsewhere is over-redacted, which leaks nothing.
    let Some(at) = rest.rfind('@') else {
        return url.to_string();
    };
    let (userinfo, host) = (&rest[..at], &rest[at..]);
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***{host}"),
        None => format!("{scheme}://***{host}"),
    }
}

impl std::fmt::Debug for StoreSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSection")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("ca_file", &self.ca_file)
            .field("node_id", &self.node_id)
            .field("advertise", &self.advertise)
            .finish()
    }
}
