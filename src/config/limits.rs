//! `[limits]`: allocation counts, lifetimes, bandwidth, the unauthenticated answer rate,
//! and the stream (TCP/TLS) connection caps and timeouts.

use std::time::Duration;

use serde::Deserialize;
use toml::Table;

use super::errors::{read_section, Errors};
use super::units::{duration_or, parse_bandwidth, BandwidthText, DurationText};

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
/// Default `limits.unauthenticated_rate`: answers per second per source IP.
pub const DEFAULT_UNAUTHENTICATED_RATE: u32 = 500;
/// Largest `limits.unauthenticated_rate` accepted.
const MAX_UNAUTHENTICATED_RATE: u32 = 1_000_000;
/// Default `limits.max_connections_per_source`: established TCP/TLS connections from one
/// source address. Thousands of users of an enterprise or campus network reach TURN over
/// TLS on 443 from one NAT address; 5,000 of them fit.
pub const DEFAULT_MAX_CONNECTIONS_PER_SOURCE: usize = 5_000;
/// Default `limits.max_unauthenticated_per_source`: TCP/TLS connections from one source
/// address that have not yet sent a complete first message (TCP) or finished the TLS
/// handshake. Users behind one NAT address arrive together (coturn's `turnutils_uclient
/// -t -S -m 50` opens 100 at once), while 256 silent connections held for the handshake
/// timeout cost one address little more than 256 file descriptors for ten seconds.
pub const DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE: usize = 256;
/// Default `limits.max_connections`: TCP/TLS client connections in total.
pub const DEFAULT_MAX_CONNECTIONS: usize = 20_000;
/// Default `limits.stream_handshake_timeout`: how long a new connection has to send its
/// first complete message (TCP) or finish the TLS handshake, and an incomplete message to
/// complete.
pub const DEFAULT_STREAM_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `limits.stream_idle_timeout`: an established connection that delivers no
/// complete message for this long is closed.
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Smallest `limits.stream_handshake_timeout` / `limits.stream_idle_timeout`.
const MIN_STREAM_TIMEOUT: Duration = Duration::from_millis(100);
/// Smallest non-zero bandwidth limit: one full-size (1500-byte) packet per second.
const MIN_BANDWIDTH: u64 = 1500;
/// Channel numbers 0x4000..=0x4FFF (RFC 8656 12.): at most this many channels per allocation.
pub const MAX_CHANNEL_NUMBERS: usize = 0x1000;

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
    /// Established TCP/TLS connections per source IP address (a complete first message
    /// received (TCP), or the TLS handshake finished).
    pub max_connections_per_source: usize,
    /// TCP/TLS connections per source IP address not yet established.
    pub max_unauthenticated_per_source: usize,
    /// TCP/TLS client connections in total.
    pub max_connections: usize,
    /// The short deadline: a first message (TCP), the TLS handshake, an incomplete
    /// message, a PROXY protocol header.
    pub stream_handshake_timeout: Duration,
    /// An established connection without a complete message for this long is closed.
    pub stream_idle_timeout: Duration,
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
            max_connections_per_source: DEFAULT_MAX_CONNECTIONS_PER_SOURCE,
            max_unauthenticated_per_source: DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            stream_handshake_timeout: DEFAULT_STREAM_HANDSHAKE_TIMEOUT,
            stream_idle_timeout: DEFAULT_STREAM_IDLE_TIMEOUT,
        }
    }
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
    max_connections_per_source: Option<usize>,
    max_unauthenticated_per_source: Option<usize>,
    max_connections: Option<usize>,
    stream_handshake_timeout: Option<DurationText>,
    stream_idle_timeout: Option<DurationText>,
}

impl LimitsSection {
    /// Reads `[limits]` from the top-level table.
    pub(super) fn load(top: &Table, errors: &mut Errors) -> Self {
        let mut l = LimitsSection::default();
        if let Some(raw) = read_section::<RawLimits>(top, "limits", errors) {
            let d = LimitsSection::default();
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
                errors,
            );
            l.default_lifetime = duration_or(
                raw.default_lifetime,
                d.default_lifetime,
                "limits.default_lifetime",
                errors,
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
            l.max_connections_per_source = raw
                .max_connections_per_source
                .unwrap_or(d.max_connections_per_source);
            l.max_unauthenticated_per_source = raw
                .max_unauthenticated_per_source
                .unwrap_or(d.max_unauthenticated_per_source);
            l.max_connections = raw.max_connections.unwrap_or(d.max_connections);
            l.stream_handshake_timeout = duration_or(
                raw.stream_handshake_timeout,
                d.stream_handshake_timeout,
                "limits.stream_handshake_timeout",
                errors,
            );
            l.stream_idle_timeout = duration_or(
                raw.stream_idle_timeout,
                d.stream_idle_timeout,
                "limits.stream_idle_timeout",
                errors,
            );
        }
        l
    }

    pub(super) fn check(&self, errors: &mut Errors) {
        for (key, v) in [
            ("limits.max_allocations", self.max_allocations),
            (
                "limits.max_allocations_per_user",
                self.max_allocations_per_user.unwrap_or(1),
            ),
            (
                "limits.max_allocations_per_rest_user",
                self.max_allocations_per_rest_user,
            ),
            (
                "limits.max_permissions_per_allocation",
                self.max_permissions_per_allocation,
            ),
            (
                "limits.max_channels_per_allocation",
                self.max_channels_per_allocation,
            ),
            (
                "limits.max_connections_per_source",
                self.max_connections_per_source,
            ),
            (
                "limits.max_unauthenticated_per_source",
                self.max_unauthenticated_per_source,
            ),
            ("limits.max_connections", self.max_connections),
        ] {
            if v == 0 {
                errors.push(key, "must be at least 1");
            }
        }
        if self.max_channels_per_allocation > MAX_CHANNEL_NUMBERS {
            errors.push(
                "limits.max_channels_per_allocation",
                format!("{} is more than the {MAX_CHANNEL_NUMBERS} channel numbers that exist (RFC 8656 12.)", self.max_channels_per_allocation),
            );
        }
        if self.default_lifetime < Duration::from_secs(1) {
            errors.push(
                "limits.default_lifetime",
                "must be at least 1s (10m is usual)",
            );
        }
        if self.max_lifetime.as_secs() > u64::from(u32::MAX) {
            errors.push(
                "limits.max_lifetime",
                "too long: LIFETIME is a 32-bit number of seconds",
            );
        } else if self.max_lifetime < self.default_lifetime {
            errors.push(
                "limits.max_lifetime",
                format!(
                    "{} is shorter than limits.default_lifetime ({})",
                    humantime::format_duration(self.max_lifetime),
                    humantime::format_duration(self.default_lifetime)
                ),
            );
        }

        for (key, v) in [
            (
                "limits.stream_handshake_timeout",
                self.stream_handshake_timeout,
            ),
            ("limits.stream_idle_timeout", self.stream_idle_timeout),
        ] {
            if v < MIN_STREAM_TIMEOUT {
                errors.push(
                    key,
                    "must be at least 100ms (10s is usual for the handshake, 10m for idle)",
                );
            }
        }
        if self.stream_idle_timeout >= MIN_STREAM_TIMEOUT
            && self.stream_idle_timeout < self.stream_handshake_timeout
        {
            errors.push(
                "limits.stream_idle_timeout",
                format!(
                    "{} is shorter than limits.stream_handshake_timeout ({})",
                    humantime::format_duration(self.stream_idle_timeout),
                    humantime::format_duration(self.stream_handshake_timeout)
                ),
            );
        }

        for (key, v) in [
            (
                "limits.max_bandwidth_per_allocation",
                self.max_bandwidth_per_allocation,
            ),
            ("limits.max_total_bandwidth", self.max_total_bandwidth),
        ] {
            if v != 0 && v < MIN_BANDWIDTH {
                errors.push(
                    key,
                    format!("{v} bytes/s is less than one full-size packet per second ({MIN_BANDWIDTH} bytes/s, \"12kbit\"); use 0 for unlimited"),
                );
            }
        }
        if self.unauthenticated_rate > MAX_UNAUTHENTICATED_RATE {
            errors.push(
                "limits.unauthenticated_rate",
                format!(
                    "{} is more than {MAX_UNAUTHENTICATED_RATE}; use 0 for unlimited",
                    self.unauthenticated_rate
                ),
            );
        }
    }
}
