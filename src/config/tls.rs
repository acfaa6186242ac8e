//! `[tls]`: the certificate chain and private key (PEM files) that `tls` listeners need.

use std::path::PathBuf;

use serde::Deserialize;
use toml::Table;

use super::errors::{read_section, Errors};

/// `[tls]`: certificate chain and private key (PEM) for `tls` listeners.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsSection {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawTls {
    certificate: Option<PathBuf>,
    private_key: Option<PathBuf>,
}

impl TlsSection {
    /// Reads `[tls]` from the top-level table.
    pub(super) fn load(top: &Table, errors: &mut Errors) -> Self {
        let mut tls = TlsSection::default();
        if let Some(raw) = read_section::<RawTls>(top, "tls", errors) {
            tls.cert_file = raw.certificate;
            tls.key_file = raw.private_key;
        }
        tls
    }

    /// Both files are set, as a `tls` listener needs them.
    pub(super) fn check_for_listener(&self, errors: &mut Errors) {
        if self.cert_file.is_none() {
            errors.push(
                "tls.certificate",
                "missing; a tls listener needs a certificate chain (PEM file)",
            );
        }
        if self.key_file.is_none() {
            errors.push(
                "tls.private_key",
                "missing; a tls listener needs a private key (PEM file)",
            );
        }
    }

    pub(super) fn check(&self, errors: &mut Errors) {
        for (key, p) in [
            ("tls.certificate", &self.cert_file),
            ("tls.private_key", &self.key_file),
        ] {
            if p.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                errors.push(key, "empty path");
            }
        }
    }
}
