//! `[store]`: the Redis server a fleet of nodes shares, this node's name and address.

use std::net::SocketAddr;

use serde::Deserialize;
use toml::Table;

use super::errors::{read_section, Errors};
use super::units::parse_socket_addr;

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

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawStore {
    url: Option<String>,
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
