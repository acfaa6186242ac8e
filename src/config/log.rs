//! `[log]`: the `tracing` filter (checked directive by directive), the output format and
//! how often running allocations write an interim usage record.

use std::time::Duration;

use serde::Deserialize;
use toml::Table;

use super::errors::{read_section, Errors};
use super::units::{duration_or, DurationText};

/// Shortest `log.usage_interval` (other than 0, off).
pub const MIN_USAGE_INTERVAL: Duration = Duration::from_secs(1);
/// Longest `log.usage_interval`: a record at least once a day.
pub const MAX_USAGE_INTERVAL: Duration = Duration::from_secs(24 * 3600);

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
    /// Every this often, each running allocation writes an interim usage record with
    /// what it relayed since its last record; `None` (the default, or `"0s"`): only the
    /// final record when it ends.
    pub usage_interval: Option<Duration>,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            level: "info".to_owned(),
            format: LogFormat::Text,
            usage_interval: None,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    level: Option<String>,
    format: Option<LogFormat>,
    usage_interval: Option<DurationText>,
}

impl LogSection {
    /// Reads `[log]` from the top-level table.
    pub(super) fn load(top: &Table, errors: &mut Errors) -> Self {
        let mut log = LogSection::default();
        if let Some(raw) = read_section::<RawLog>(top, "log", errors) {
            if let Some(level) = raw.level {
                log.level = level;
            }
            if let Some(format) = raw.format {
                log.format = format;
            }
            let interval = duration_or(
                raw.usage_interval,
                Duration::ZERO,
                "log.usage_interval",
                errors,
            );
            log.usage_interval = (!interval.is_zero()).then_some(interval);
        }
        log
    }

    pub(super) fn check(&self, errors: &mut Errors) {
        if let Err(e) = check_log_level(&self.level) {
            errors.push("log.level", e);
        }
        if let Some(i) = self.usage_interval {
            if !(MIN_USAGE_INTERVAL..=MAX_USAGE_INTERVAL).contains(&i) {
                errors.push(
                    "log.usage_interval",
                    format!(
                        "{} is out of range; use 1s to 24h (\"5m\" is usual), or \"0s\" for no interim records",
                        humantime::format_duration(i)
                    ),
                );
            }
        }
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
