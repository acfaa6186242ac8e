//! A `redis-server` (Debian package `redis-server`) on 127.0.0.1 for the fleet store
//! tests: plain, or TLS only (`--port 0 --tls-port P`) with a test CA, optionally with a
//! Redis ACL user as its only user (the `default` user off).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use super::process::wait_for;

/// A test CA and a server certificate it signed for `localhost` and 127.0.0.1 (PEM
/// files in a directory kept while any clone lives).
#[derive(Clone, Debug)]
pub struct RedisTls {
    pub ca_pem: PathBuf,
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
    _dir: Arc<tempfile::TempDir>,
}

impl RedisTls {
    /// A new CA (`CN=name`) and a server certificate signed by it.
    pub fn generate(name: &str) -> RedisTls {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
        let dir = tempfile::Builder::new()
            .prefix("turnstone-redis-tls-")
            .tempdir()
            .expect("temp dir");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, name);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
            .expect("CA certificate");
        let key = KeyPair::generate().expect("server key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "redis test server");
        let cert = params.signed_by(&key, &ca).expect("server certificate");
        let ca_pem = dir.path().join("ca.pem");
        let cert_pem = dir.path().join("redis.pem");
        let key_pem = dir.path().join("redis.key");
        std::fs::write(&ca_pem, ca.pem()).expect("write ca.pem");
        std::fs::write(&cert_pem, cert.pem()).expect("write redis.pem");
        std::fs::write(&key_pem, key.serialize_pem()).expect("write redis.key");
        RedisTls {
            ca_pem,
            cert_pem,
            key_pem,
            _dir: Arc::new(dir),
        }
    }
}

/// How a `redis-server` is started: TLS or not, and with an ACL user or not.
#[derive(Clone, Debug, Default)]
pub struct RedisFlavor {
    pub tls: Option<RedisTls>,
    /// The only user (name, password); `default` is off.
    pub acl_user: Option<(String, String)>,
}

impl RedisFlavor {
    /// Plain TCP, no password (the `default` user).
    pub fn plain() -> RedisFlavor {
        RedisFlavor::default()
    }

    /// TLS only, with a new test CA, and the ACL user `turnstone` (password
    /// `redis-acl-pw`) as the only user.
    pub fn tls_acl() -> RedisFlavor {
        RedisFlavor {
            tls: Some(RedisTls::generate("turnstone test CA")),
            acl_user: Some(("turnstone".to_string(), "redis-acl-pw".to_string())),
        }
    }

    /// TLS only, with a new test CA, no password.
    pub fn tls() -> RedisFlavor {
        RedisFlavor {
            tls: Some(RedisTls::generate("turnstone test CA")),
            acl_user: None,
        }
    }
}

/// A `redis-server` on 127.0.0.1 without automatic persistence; `dir` holds the
/// dump.rdb that an explicit SAVE writes and a restart in the same dir loads. Killed on
/// drop.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    pub flavor: RedisFlavor,
}

impl Redis {
    /// A plain `redis-server` on `port`.
    pub fn start(port: u16, dir: &Path) -> Redis {
        Redis::start_as(&RedisFlavor::plain(), port, dir)
    }

    /// A `redis-server` of `flavor` on `port` (the TLS port when TLS: no plain port).
    pub fn start_as(flavor: &RedisFlavor, port: u16, dir: &Path) -> Redis {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .args(["--dbfilename", "dump.rdb"]);
        match &flavor.tls {
            None => {
                cmd.args(["--port", &port.to_string()]);
            }
            Some(t) => {
                cmd.args(["--port", "0", "--tls-port", &port.to_string()])
                    .arg("--tls-cert-file")
                    .arg(&t.cert_pem)
                    .arg("--tls-key-file")
                    .arg(&t.key_pem)
                    .arg("--tls-ca-cert-file")
                    .arg(&t.ca_pem)
                    .args(["--tls-auth-clients", "no"]);
            }
        }
        if let Some((user, password)) = &flavor.acl_user {
            let acl = dir.join("users.acl");
            std::fs::write(
                &acl,
                format!("user default off\nuser {user} on >{password} ~* &* +@all\n"),
            )
            .expect("write users.acl");
            cmd.arg("--aclfile").arg(&acl);
        }
        let log = std::fs::File::create(dir.join(format!("redis-{port}.log"))).expect("log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run redis-server ({e}); the fleet tests need it: \
                     sudo apt-get install -y redis-server"
                )
            });
        let mut r = Redis {
            child: Some(child),
            port,
            flavor: flavor.clone(),
        };
        let log = dir.join(format!("redis-{port}.log"));
        wait_for("redis-server answers PING", Duration::from_secs(10), || {
            if let Some(st) = r.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "redis-server exited at start: {st}\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            let mut con = r.try_con()?;
            redis::cmd("PING").query::<String>(&mut con).ok()
        });
        r
    }

    /// The store URL: `redis://127.0.0.1:PORT/`, or `rediss://[USER:PASSWORD@]127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        let scheme = if self.flavor.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        let auth = self
            .flavor
            .acl_user
            .as_ref()
            .map(|(u, p)| format!("{u}:{p}@"))
            .unwrap_or_default();
        format!("{scheme}://{auth}127.0.0.1:{}/", self.port)
    }

    /// The CA file a client must trust (TLS only).
    pub fn ca_file(&self) -> Option<&Path> {
        self.flavor.tls.as_ref().map(|t| t.ca_pem.as_path())
    }

    /// `--store URL` (and `--store-ca FILE`) for the `turnstone` store commands.
    pub fn store_args(&self) -> Vec<String> {
        let mut v = vec!["--store".to_string(), self.url()];
        if let Some(ca) = self.ca_file() {
            v.push("--store-ca".to_string());
            v.push(ca.display().to_string());
        }
        v
    }

    /// A client of this server (trusting its CA when TLS).
    pub fn client(&self) -> redis::Client {
        match self.ca_file() {
            None => redis::Client::open(self.url()).expect("redis URL"),
            Some(ca) => {
                // Tests build with other crates that enable other rustls providers.
                let _ = rustls::crypto::ring::default_provider().install_default();
                redis::Client::build_with_tls(
                    self.url(),
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(std::fs::read(ca).expect("read CA")),
                    },
                )
                .expect("redis TLS client")
            }
        }
    }

    pub fn try_con(&self) -> Option<redis::Connection> {
        let con = self
            .client()
            .get_connection_with_timeout(Duration::from_millis(500))
            .ok()?;
        con.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        Some(con)
    }

    pub fn con(&self) -> redis::Connection {
        self.try_con().expect("connect to redis")
    }

    pub fn save(&self) {
        let _: String = redis::cmd("SAVE").query(&mut self.con()).expect("SAVE");
    }

    /// SIGKILL: no goodbye to the clients, no save.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
