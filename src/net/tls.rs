//! TLS server configuration for `tls` listeners (RFC 8656 section 3.1, RFC 7443 ALPN):
//! loading the certificate chain and private key from PEM files, checking they belong
//! together, and building the rustls `ServerConfig` (ring provider, TLS 1.2 and 1.3 only).
//!
//! The per-connection TLS state machine lives in [`super::stream`].

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::ring;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// ALPN protocol names a TURN/STUN server over TLS answers to (RFC 7443 section 6).
/// Clients that send no ALPN extension are accepted too; a client that offers only other
/// protocols gets a `no_application_protocol` alert (RFC 7301 section 3.2).
pub const ALPN: [&[u8]; 2] = [b"stun.turn", b"stun.nat-discovery"];

/// Loads the PEM certificate chain at `cert` (end-entity certificate first) and the PEM
/// private key at `key` (PKCS#8, PKCS#1 or SEC1), checks that the key belongs to the
/// certificate, and builds the server configuration: TLS 1.2 and 1.3 only, ring
/// provider, no client authentication, ALPN `stun.turn` / `stun.nat-discovery`.
///
/// Errors name the file and the reason (unreadable, no certificate, no key, unusable
/// key, key does not match the certificate).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    server_config_and_leaf(cert, key).map(|(config, _)| config)
}

/// [`server_config`], and the end-entity certificate it presents (DER), for log lines
/// and the expiry gauge.
pub fn server_config_and_leaf(
    cert: &Path,
    key: &Path,
) -> Result<(Arc<rustls::ServerConfig>, CertificateDer<'static>), String> {
    let certs = load_certs(cert)?;
    let leaf = certs[0].clone();
    let key_der = load_key(key)?;
    let provider = Arc::new(ring::default_provider());

    let signing_key = provider
        .key_provider
        .load_private_key(key_der.clone_key())
        .map_err(|e| format!("{}: unusable private key: {e}", key.display()))?;
    let certified = CertifiedKey::new(certs.clone(), signing_key);
    match certified.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(format!(
                "{}: private key does not match the certificate in {}",
                key.display(),
                cert.display()
            ))
        }
        // ring keys always expose their public key; an unknown answer is not a mismatch.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(e) => return Err(format!("{}: unusable certificate: {e}", cert.display())),
    }

    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS configuration: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| format!("{}: {e} (key {})", cert.display(), key.display()))?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    // A TURN client keeps one long connection; resumption tickets only cost bytes.
    config.send_tls13_tickets = 0;
    Ok((Arc::new(config), leaf))
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: cannot read {what}: {e}", path.display()))
}

fn pem_reason(e: &pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { .. } => "PEM section has no END line".into(),
        pem::Error::IllegalSectionStart { .. } => "malformed PEM BEGIN line".into(),
        pem::Error::Base64Decode(m) => format!("bad base64 in PEM: {m}"),
        pem::Error::SectionTooLarge => "PEM section too large".into(),
        other => format!("{other:?}"),
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read_file(path, "certificate chain")?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            format!(
                "{}: invalid certificate chain: {}",
                path.display(),
                pem_reason(&e)
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no certificate found (expected PEM \"-----BEGIN CERTIFICATE-----\")",
            path.display()
        ));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = read_file(path, "private key")?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => format!(
            "{}: no private key found (expected PEM \"-----BEGIN PRIVATE KEY-----\", RSA or EC)",
            path.display()
        ),
        e => format!(
            "{}: invalid private key: {}",
            path.display(),
            pem_reason(&e)
        ),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A self-signed certificate for `localhost` / 127.0.0.1 written to `dir`:
    /// (cert path, key path, cert DER).
    pub(crate) fn self_signed(dir: &Path) -> (PathBuf, PathBuf, CertificateDer<'static>) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
            .expect("rcgen");
        let cert_path = dir.join("cert.pem");
        let key_path = dir.join("key.pem");
        std::fs::write(&cert_path, ck.cert.pem()).expect("write cert");
        std::fs::write(&key_path, ck.signing_key.serialize_pem()).expect("write key");
        (cert_path, key_path, ck.cert.der().clone())
    }

    #[test]
    fn loads_matching_pair_with_alpn() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k, _) = self_signed(dir.path());
        let cfg = server_config(&c, &k).expect("config");
        assert_eq!(
            cfg.alpn_protocols,
            vec![b"stun.turn".to_vec(), b"stun.nat-discovery".to_vec()]
        );
        // Only TLS 1.2 and 1.3 are enabled (rustls has no 1.0/1.1 at all).
        let dbg = format!("{cfg:?}");
        assert!(dbg.contains("TLSv1_3"), "{dbg}");
        assert!(dbg.contains("TLSv1_2"), "{dbg}");
        assert!(
            !dbg.contains("TLSv1_1") && !dbg.contains("TLSv1_0"),
            "{dbg}"
        );
    }

    #[test]
    fn missing_file_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let (_, k, _) = self_signed(dir.path());
        let missing = dir.path().join("nope.pem");
        let e = server_config(&missing, &k).unwrap_err();
        assert!(e.contains("nope.pem") && e.contains("cannot read"), "{e}");
        let (c, _, _) = self_signed(dir.path());
        let e = server_config(&c, &missing).unwrap_err();
        assert!(e.contains("nope.pem") && e.contains("private key"), "{e}");
    }

    #[test]
    fn garbage_pem_names_file() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k, _) = self_signed(dir.path());
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, b"hello, this is not PEM\n").unwrap();
        let e = server_config(&junk, &k).unwrap_err();
        assert!(
            e.contains("junk.pem") && e.contains("no certificate"),
            "{e}"
        );
        let e = server_config(&c, &junk).unwrap_err();
        assert!(
            e.contains("junk.pem") && e.contains("no private key"),
            "{e}"
        );

        let broken = dir.path().join("broken.pem");
        std::fs::write(
            &broken,
            b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = server_config(&broken, &k).unwrap_err();
        assert!(e.contains("broken.pem"), "{e}");

        // A certificate file given as the key: PEM, but no key inside.
        let e = server_config(&c, &c).unwrap_err();
        assert!(
            e.contains("cert.pem") && e.contains("no private key"),
            "{e}"
        );
    }

    #[test]
    fn key_not_matching_cert_names_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let (ca, _, _) = self_signed(&a);
        let (_, kb, _) = self_signed(&b);
        let e = server_config(&ca, &kb).unwrap_err();
        assert!(e.contains("does not match"), "{e}");
        assert!(e.contains(&kb.display().to_string()), "{e}");
        assert!(e.contains(&ca.display().to_string()), "{e}");
    }
}
