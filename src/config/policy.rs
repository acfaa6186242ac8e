//! `[policy]`: peer address ranges opened in, or closed over, the built-in default-deny list.

use ipnet::IpNet;
use serde::Deserialize;
use toml::{Table, Value};

use super::errors::{read_section, Errors};
use super::units::net_list;

/// `[policy]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicySection {
    /// Opens ranges of the built-in default-deny list.
    pub allow_peers: Vec<IpNet>,
    /// Always refused, wins over `allow_peers`.
    pub deny_peers: Vec<IpNet>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawPolicy {
    allow_peers: Option<Vec<Value>>,
    deny_peers: Option<Vec<Value>>,
}

impl PolicySection {
    /// Reads `[policy]` from the top-level table.
    pub(super) fn load(top: &Table, errors: &mut Errors) -> Self {
        let mut policy = PolicySection::default();
        if let Some(raw) = read_section::<RawPolicy>(top, "policy", errors) {
            policy.allow_peers = net_list(raw.allow_peers, "policy.allow_peers", errors);
            policy.deny_peers = net_list(raw.deny_peers, "policy.deny_peers", errors);
        }
        policy
    }
}
