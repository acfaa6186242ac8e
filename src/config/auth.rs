//! `[auth]`: static long-term users and TURN REST API shared secrets.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use toml::{Table, Value};

use super::errors::{index, join, read_section, Errors};
use super::units::string_elements;

/// USERNAME: at most 513 bytes (RFC 8489 14.3).
const MAX_USERNAME_BYTES: usize = 513;

/// `[auth]`. Its `Debug` shows user names only, never passwords or secrets.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AuthSection {
    /// Static long-term users: name -> password.
    pub users: BTreeMap<String, String>,
    /// TURN REST API shared secrets; every one verifies (rotation).
    pub secrets: Vec<String>,
}

impl fmt::Debug for AuthSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthSection")
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .field(
                "secrets",
                &format_args!("<{} redacted>", self.secrets.len()),
            )
            .finish()
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawAuth {
    users: Option<Table>,
    secrets: Option<Vec<Value>>,
}

impl AuthSection {
    /// Reads `[auth]` from the top-level table.
    pub(super) fn load(top: &Table, errors: &mut Errors) -> Self {
        let mut auth = AuthSection::default();
        if let Some(raw) = read_section::<RawAuth>(top, "auth", errors) {
            for (user, value) in raw.users.unwrap_or_default() {
                match value {
                    Value::String(pass) => {
                        auth.users.insert(user, pass);
                    }
                    other => errors.push(
                        &join("auth.users", &user),
                        format!("expected a password string, found {}", other.type_str()),
                    ),
                }
            }
            let secrets = raw.secrets.unwrap_or_default();
            for (_, s) in string_elements(&secrets, "auth.secrets", "a secret", errors) {
                auth.secrets.push(s.to_owned());
            }
        }
        auth
    }

    /// `has_store`: a fleet store is configured, where users and secrets may all live.
    pub(super) fn check(&self, has_store: bool, errors: &mut Errors) {
        for (user, pass) in &self.users {
            let key = join("auth.users", user);
            if user.is_empty() {
                errors.push(&key, "empty user name");
            } else if user.len() > MAX_USERNAME_BYTES {
                errors.push(
                    &key,
                    format!("user name longer than {MAX_USERNAME_BYTES} bytes"),
                );
            } else if pass.is_empty() {
                errors.push(&key, "empty password");
            }
        }
        for (i, s) in self.secrets.iter().enumerate() {
            if s.is_empty() {
                errors.push(&index("auth.secrets", i), "empty secret");
            }
        }
        // With a fleet store, users and secrets may all live there.
        if self.users.is_empty()
            && self.secrets.is_empty()
            && !has_store
            && !errors.has_at_or_under("auth")
        {
            errors.push(
                "auth",
                "no credentials; set auth.users (static users) and/or auth.secrets (TURN REST API shared secrets), or store.url",
            );
        }
    }
}
