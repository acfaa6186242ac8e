//! Values written as text: sizes, bandwidths, durations, addresses, CIDRs and port ranges.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Value;

use super::errors::{index, Errors};

/// A humantime duration string ("10m", "1h 30m"), kept as text until converted.
pub(super) struct DurationText(String);

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
pub(super) struct BandwidthText(pub(super) String);

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
pub(super) enum StringOrList {
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

/// A byte size: a number with an optional unit (B, KiB, MiB, GiB, KB, MB, GB).
pub(super) fn parse_size(text: &str) -> Result<usize, String> {
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

pub(super) fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
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

pub(super) fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.trim().parse().map_err(|_| {
        format!("{text:?} is not an address IP:PORT (such as \"203.0.113.10:3478\" or \"[2001:db8::1]:3478\")")
    })
}

pub(super) fn string_elements<'a>(
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

pub(super) fn ip_list(raw: Option<StringOrList>, path: &str, errors: &mut Errors) -> Vec<IpAddr> {
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

pub(super) fn net_list(raw: Option<Vec<Value>>, path: &str, errors: &mut Errors) -> Vec<IpNet> {
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

pub(super) fn duration_or(
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
