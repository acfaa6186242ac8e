//! Problems collected at their key paths: key-by-key table checks, TOML syntax error location.

use std::fmt;

use serde::de::DeserializeOwned;
use toml::{Table, Value};

/// One configuration problem: the key it is about (`relay.ports`, `listen[1].address`,
/// `auth.users.bob`; empty for the file as a whole) and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub(super) fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
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

#[derive(Default)]
pub(super) struct Errors {
    list: Vec<ConfigError>,
    /// Number of errors found while parsing, once checking (`Config::check`) has started.
    parsed: Option<usize>,
}

impl Errors {
    /// Records a problem unless `key` or one of its parents already failed to parse (so a
    /// value that failed to parse is not also reported as missing or empty). While checking,
    /// several problems of the same key are all kept.
    pub(super) fn push(&mut self, key: &str, message: impl Into<String>) {
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
    pub(super) fn has_at_or_under(&self, key: &str) -> bool {
        self.list.iter().any(|e| is_same_or_parent(key, &e.key))
    }

    pub(super) fn start_checking(&mut self) {
        self.parsed = Some(self.list.len());
    }

    /// Every problem recorded, in the order found; `Ok` when there is none.
    pub(super) fn into_result(self) -> Result<(), Vec<ConfigError>> {
        if self.list.is_empty() {
            Ok(())
        } else {
            Err(self.list)
        }
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
pub(super) fn join(parent: &str, key: &str) -> String {
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

pub(super) fn index(parent: &str, i: usize) -> String {
    format!("{parent}[{i}]")
}

/// Checks every key of `table` on its own against `T` (reporting each unknown key and each
/// wrongly typed value at its path), then deserializes the well-formed keys.
pub(super) fn shape<T: DeserializeOwned + Default>(
    table: &Table,
    path: &str,
    errors: &mut Errors,
) -> T {
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
pub(super) fn section<'a>(top: &'a Table, key: &str, errors: &mut Errors) -> Option<&'a Table> {
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

/// The table at `key` of the top level with each of its keys checked against `T` (see
/// [`shape`]), or None (absent or reported as not a table).
pub(super) fn read_section<T: DeserializeOwned + Default>(
    top: &Table,
    key: &str,
    errors: &mut Errors,
) -> Option<T> {
    let table = section(top, key, errors)?;
    Some(shape(table, key, errors))
}

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

pub(super) fn syntax_error(text: &str, e: &toml::de::Error) -> ConfigError {
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
