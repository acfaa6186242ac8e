//! `[metrics]`: the address of the Prometheus endpoint and the browser self-test page.

use std::net::SocketAddr;

use serde::Deserialize;
use toml::Table;

use super::errors::{read_section, Errors};
use super::units::parse_socket_addr;

/// Default `[metrics] listen` suggested in the example (the metrics endpoint is off by default).
pub const EXAMPLE_METRICS_LISTEN: &str = "127.0.0.1:9641";

/// `[metrics]`: the Prometheus endpoint (`/metrics`, `/health`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetricsSection {
    /// Address of the HTTP endpoint; `None` (the default): no endpoint.
    pub listen: Option<SocketAddr>,
    /// Also serve the browser self-test page at `/selftest` (default false).
    pub selftest: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawMetrics {
    listen: Option<String>,
    selftest: bool,
}

impl MetricsSection {
    /// Reads `[metrics]` from the top-level table.
    pub(super) fn load(top: &Table, errors: &mut Errors) -> Self {
        let mut metrics = MetricsSection::default();
        if let Some(raw) = read_section::<RawMetrics>(top, "metrics", errors) {
            if let Some(listen) = raw.listen {
                match parse_socket_addr(&listen) {
                    Ok(a) => metrics.listen = Some(a),
                    Err(e) => errors.push("metrics.listen", e),
                }
            }
            metrics.selftest = raw.selftest;
        }
        metrics
    }

    pub(super) fn check(&self, errors: &mut Errors) {
        if let Some(a) = self.listen {
            if a.ip().is_multicast() {
                errors.push("metrics.listen", format!("{a} is not a unicast address"));
            }
        }
        if self.selftest && self.listen.is_none() {
            errors.push(
                "metrics.selftest",
                "the self-test page is served on metrics.listen, which is not set",
            );
        }
    }
}
