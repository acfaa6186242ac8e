//! Certificate rotation: the `[tls]` certificate and key files are watched, and a pair
//! that changed on disk is loaded without SIGHUP (certbot renewing, cert-manager or a
//! Kubernetes Secret update swapping the mounted directory's `..data` symlink).
//!
//! A thread polls the files' metadata once a second. Polling rather than inotify (the
//! `notify` crate): a Kubernetes Secret update replaces the `..data` symlink of the
//! mounted directory, and certbot re-points the symlinks in `live/` to new files in
//! `archive/`; neither touches the file the configuration names, so a watch on that file
//! sees nothing, and watching every directory along every symlink chain is more code
//! than the two `stat(2)` calls a second that notice every case. `stat` follows
//! symlinks, so a changed target (device, inode), size, mtime or ctime is a change.
//!
//! A change is acted on once the files have stayed the same for one poll (a writer
//! still at work, or certbot between the certificate and the key, is waited for). The
//! new pair is then built exactly as at start (see [`super::tls::server_config`]) and
//! swapped into [`super::Common::tls`] as a reload does: new handshakes use it, and
//! connections already open keep the configuration they started with. A pair that
//! does not load (unparsable PEM, a key that does not match the certificate, a file
//! missing) is refused with an error log line naming the file; the last good
//! certificate stays, and the pair is tried again when the files change again.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use rustls::pki_types::CertificateDer;

use crate::metrics::Metrics;

/// How often the files are looked at. A change is loaded one to two polls after it.
pub const POLL: Duration = Duration::from_secs(1);

/// What identifies one file's contents without reading it (after following symlinks).
#[derive(Clone, Debug, PartialEq, Eq)]
enum FileStamp {
    Present {
        dev: u64,
        ino: u64,
        size: u64,
        mtime: (i64, i64),
        ctime: (i64, i64),
    },
    /// `stat` failed (missing file, dangling symlink, no permission).
    Unreadable(std::io::ErrorKind),
}

fn stamp(path: &Path) -> FileStamp {
    match std::fs::metadata(path) {
        Ok(m) => FileStamp::Present {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        },
        Err(e) => FileStamp::Unreadable(e.kind()),
    }
}

/// The certificate's and the key's stamps.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamps([FileStamp; 2]);

impl Stamps {
    fn of(cert: &Path, key: &Path) -> Stamps {
        Stamps([stamp(cert), stamp(key)])
    }
}

/// A certificate pair loaded from its files, with what the files looked like just
/// before they were read.
pub(crate) struct Loaded {
    pub config: Arc<rustls::ServerConfig>,
    leaf: CertificateDer<'static>,
    files: Watched,
}

impl Loaded {
    /// Loads `cert` and `key` (errors name the file, as [`super::tls::server_config`]).
    pub fn load(cert: &Path, key: &Path) -> Result<Loaded, String> {
        // Stamped before reading: a change while reading is seen at the next poll.
        let stamps = Stamps::of(cert, key);
        let (config, leaf) = super::tls::server_config_and_leaf(cert, key)?;
        Ok(Loaded {
            config,
            leaf,
            files: Watched {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
                loaded: stamps,
                pending: None,
                refused: None,
            },
        })
    }
}

struct Watched {
    cert: PathBuf,
    key: PathBuf,
    /// The stamps of the files the running configuration was read from.
    loaded: Stamps,
    /// Different stamps seen at the last poll: a change, loaded if they hold.
    pending: Option<Stamps>,
    /// Stamps of a pair that was refused (logged once; tried when the files change).
    refused: Option<Stamps>,
}

/// What one poll did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Poll {
    /// Nothing to watch, or the files are as loaded.
    Unchanged,
    /// The files changed since the last poll; waiting for them to hold still.
    Settling,
    /// The new pair was loaded and swapped in.
    Reloaded,
    /// The new pair was refused (and logged); the last good one stays.
    Refused,
    /// The files are still the refused pair (not logged again).
    StillRefused,
}

/// The watched files of the running TLS configuration. Loading at start, SIGHUP reload
/// and the watcher's polls take the same lock, so a poll never swaps in a pair from
/// files a reload has just stopped using.
pub(crate) struct CertWatch {
    state: Mutex<Option<Watched>>,
}

impl CertWatch {
    /// Watches nothing until [`Self::install`].
    pub fn new() -> CertWatch {
        CertWatch {
            state: Mutex::new(None),
        }
    }

    /// Puts `loaded` in `slot` (start, SIGHUP reload) and watches its files from now on.
    pub fn install(
        &self,
        slot: &ArcSwapOption<rustls::ServerConfig>,
        metrics: &Metrics,
        loaded: Loaded,
        why: &'static str,
    ) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        slot.store(Some(loaded.config));
        log_loaded(&loaded.files, &loaded.leaf, metrics, why);
        *state = Some(loaded.files);
    }

    /// Looks at the files once, and swaps a changed pair into `slot` once it holds still.
    pub fn poll(&self, slot: &ArcSwapOption<rustls::ServerConfig>, metrics: &Metrics) -> Poll {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(w) = state.as_mut() else {
            return Poll::Unchanged;
        };
        let now = Stamps::of(&w.cert, &w.key);
        if now == w.loaded {
            // Changed and changed back (or never changed): nothing to load.
            w.pending = None;
            w.refused = None;
            return Poll::Unchanged;
        }
        if w.pending.as_ref() != Some(&now) {
            w.pending = Some(now);
            return Poll::Settling;
        }
        if w.refused.as_ref() == Some(&now) {
            return Poll::StillRefused;
        }
        match super::tls::server_config_and_leaf(&w.cert, &w.key) {
            Ok((config, leaf)) => {
                slot.store(Some(config));
                w.loaded = now;
                w.pending = None;
                w.refused = None;
                metrics.tls_certificate_reload(true);
                log_loaded(w, &leaf, metrics, "files changed");
                Poll::Reloaded
            }
            Err(problem) => {
                w.refused = Some(now);
                metrics.tls_certificate_reload(false);
                tracing::error!(
                    %problem,
                    "tls certificate not reloaded; keeping the last good one (tried again when the files change)"
                );
                Poll::Refused
            }
        }
    }
}

/// Starts the thread that polls `watch` every [`POLL`] for the life of the process.
pub(crate) fn spawn(common: Arc<super::Common>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("turnstone-certs".into())
        .spawn(move || loop {
            std::thread::sleep(POLL);
            common.cert_watch.poll(&common.tls, &common.metrics);
        })
        .map(drop)
}

/// Logs which certificate now serves new handshakes (paths, SHA-256 fingerprint of the
/// end-entity certificate, its expiry; nothing secret) and sets the expiry gauge.
fn log_loaded(w: &Watched, leaf: &CertificateDer<'_>, metrics: &Metrics, why: &'static str) {
    let digest = ring::digest::digest(&ring::digest::SHA256, leaf.as_ref());
    let sha256: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    // Seconds since 1970 (x509-parser: a well-kept parser already in the tree through
    // rcgen; rustls does not expose the validity period).
    let not_after = x509_parser::parse_x509_certificate(leaf.as_ref())
        .ok()
        .and_then(|(_, c)| u64::try_from(c.validity().not_after.timestamp()).ok());
    metrics.set_tls_certificate_expiry(not_after.unwrap_or(0));
    let expiry = not_after.map(|t| UNIX_EPOCH + Duration::from_secs(t));
    let not_after = expiry.map_or_else(
        || "unknown".to_string(),
        |t| humantime::format_rfc3339_seconds(t).to_string(),
    );
    if expiry.is_some_and(|t| t < SystemTime::now()) {
        tracing::warn!(
            certificate = %w.cert.display(),
            %not_after,
            "tls certificate has expired; clients will refuse it"
        );
    }
    tracing::info!(
        certificate = %w.cert.display(),
        private_key = %w.key.display(),
        %sha256,
        %not_after,
        reason = why,
        "tls certificate loaded"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &Path, name: &str) -> (PathBuf, PathBuf, Vec<u8>) {
        let sub = dir.join(name);
        std::fs::create_dir_all(&sub).unwrap();
        let (c, k, der) = super::super::tls::tests::self_signed(&sub);
        (c, k, der.to_vec())
    }

    fn copy_over(from: &Path, to: &Path) {
        let tmp = to.with_extension("tmp");
        std::fs::copy(from, &tmp).unwrap();
        std::fs::rename(&tmp, to).unwrap();
    }

    #[test]
    fn change_is_loaded_after_it_holds_still_and_bad_pairs_are_refused_once() {
        let dir = tempfile::tempdir().unwrap();
        let (c1, k1, _) = pair(dir.path(), "one");
        let (c2, k2, _) = pair(dir.path(), "two");
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        copy_over(&c1, &cert);
        copy_over(&k1, &key);

        let metrics = Metrics::new(1);
        let slot = ArcSwapOption::empty();
        let watch = CertWatch::new();
        assert_eq!(
            watch.poll(&slot, &metrics),
            Poll::Unchanged,
            "nothing installed"
        );
        watch.install(&slot, &metrics, Loaded::load(&cert, &key).unwrap(), "start");
        let first = slot.load_full().unwrap();
        assert_eq!(watch.poll(&slot, &metrics), Poll::Unchanged);

        // A new pair: seen, then loaded at the next poll.
        copy_over(&k2, &key);
        copy_over(&c2, &cert);
        assert_eq!(watch.poll(&slot, &metrics), Poll::Settling);
        assert!(
            Arc::ptr_eq(&first, &slot.load_full().unwrap()),
            "not before it holds"
        );
        assert_eq!(watch.poll(&slot, &metrics), Poll::Reloaded);
        let second = slot.load_full().unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(watch.poll(&slot, &metrics), Poll::Unchanged);

        // A mismatched pair (the old key): refused once, not again while it stays.
        copy_over(&k1, &key);
        assert_eq!(watch.poll(&slot, &metrics), Poll::Settling);
        assert_eq!(watch.poll(&slot, &metrics), Poll::Refused);
        assert_eq!(watch.poll(&slot, &metrics), Poll::StillRefused);
        assert!(
            Arc::ptr_eq(&second, &slot.load_full().unwrap()),
            "last good stays"
        );

        // A half-written certificate (the key now matches the first one): refused.
        let pem = std::fs::read_to_string(&c1).unwrap();
        let tmp = dir.path().join("half.pem");
        std::fs::write(&tmp, &pem[..pem.len() / 2]).unwrap();
        std::fs::rename(&tmp, &cert).unwrap();
        assert_eq!(watch.poll(&slot, &metrics), Poll::Settling);
        assert_eq!(watch.poll(&slot, &metrics), Poll::Refused);
        assert!(Arc::ptr_eq(&second, &slot.load_full().unwrap()));

        // The certificate finished: the pair (one) loads.
        copy_over(&c1, &cert);
        assert_eq!(watch.poll(&slot, &metrics), Poll::Settling);
        assert_eq!(watch.poll(&slot, &metrics), Poll::Reloaded);
        assert!(!Arc::ptr_eq(&second, &slot.load_full().unwrap()));

        // A missing file is refused too, and a pair put back as it was is no change.
        let (c3, _, _) = pair(dir.path(), "three");
        std::fs::remove_file(&key).unwrap();
        assert_eq!(watch.poll(&slot, &metrics), Poll::Settling);
        assert_eq!(watch.poll(&slot, &metrics), Poll::Refused);
        copy_over(&k1, &key);
        copy_over(&c3, &cert);
        assert_eq!(watch.poll(&slot, &metrics), Poll::Settling);
        assert_eq!(watch.poll(&slot, &metrics), Poll::Refused);
        let m = metrics.encode();
        assert!(
            m.contains("turnstone_tls_certificate_reloads_total{result=\"ok\"} 2"),
            "{m}"
        );
        assert!(
            m.contains("turnstone_tls_certificate_reloads_total{result=\"refused\"} 4"),
            "{m}"
        );
    }

    #[test]
    fn symlink_swap_is_a_change() {
        // The Kubernetes layout: tls.crt -> ..data/tls.crt, ..data -> ..<timestamp>.
        let dir = tempfile::tempdir().unwrap();
        let (c1, k1, _) = pair(dir.path(), "..v1");
        let (c2, k2, _) = pair(dir.path(), "..v2");
        std::fs::rename(&c1, dir.path().join("..v1/tls.crt")).unwrap();
        std::fs::rename(&k1, dir.path().join("..v1/tls.key")).unwrap();
        std::fs::rename(&c2, dir.path().join("..v2/tls.crt")).unwrap();
        std::fs::rename(&k2, dir.path().join("..v2/tls.key")).unwrap();
        std::os::unix::fs::symlink("..v1", dir.path().join("..data")).unwrap();
        let cert = dir.path().join("tls.crt");
        let key = dir.path().join("tls.key");
        std::os::unix::fs::symlink("..data/tls.crt", &cert).unwrap();
        std::os::unix::fs::symlink("..data/tls.key", &key).unwrap();

        let metrics = Metrics::new(1);
        let slot = ArcSwapOption::empty();
        let watch = CertWatch::new();
        watch.install(&slot, &metrics, Loaded::load(&cert, &key).unwrap(), "start");
        let first = slot.load_full().unwrap();
        assert_eq!(watch.poll(&slot, &metrics), Poll::Unchanged);
        std::os::unix::fs::symlink("..v2", dir.path().join("..data_tmp")).unwrap();
        std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
        assert_eq!(watch.poll(&slot, &metrics), Poll::Settling);
        assert_eq!(watch.poll(&slot, &metrics), Poll::Reloaded);
        assert!(!Arc::ptr_eq(&first, &slot.load_full().unwrap()));
    }
}
