//! The `turnstone` command: run the server, check a configuration, mint TURN REST
//! credentials.

#![deny(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Parser;

use turnstone::auth;
use turnstone::cli::{Cli, Command, SecretsAction, SessionsAction, StoreUrl, UsersAction};
use turnstone::config::{Config, ListenTransport, LogFormat};
use turnstone::net::{self, Launch};
use turnstone::probe;

/// Runs a fleet-store command: exit 0, or print the error and exit 1 (2 without --store).
fn store_command(
    store: StoreUrl,
    f: impl FnOnce(&turnstone::store::Target) -> anyhow::Result<()>,
) -> ExitCode {
    let Some(url) = store.store else {
        eprintln!("turnstone: --store URL is required");
        return ExitCode::from(2);
    };
    match f(&turnstone::store::Target::command(
        &url,
        store.store_ca.as_deref(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("turnstone: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn main() -> ExitCode {
    // Before anything opens a descriptor: an upgrade's hand-over socket, if any.
    let inherited = net::handover::Channel::inherited();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig { file }) => check_config(&file),
        Some(Command::Upgrade { socket }) => {
            let path = socket.unwrap_or_else(net::control::default_client_path);
            match net::control::request_upgrade(&path, &mut std::io::stdout().lock()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("turnstone upgrade: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Credentials {
            secret,
            user,
            ttl,
            url,
        }) => {
            let username = auth::rest_username(unix_now() + ttl.as_secs(), &user);
            let password = auth::rest_password(&secret, &username);
            match url {
                Some(url) => println!("{}", ice_server_json(&[url], &username, &password)),
                None => {
                    println!("username: {username}");
                    println!("password: {password}");
                }
            }
            ExitCode::SUCCESS
        }
        Some(Command::Probe {
            url,
            user,
            password,
            secret,
            user_id,
            peer,
            timeout,
            insecure,
            ca,
        }) => {
            let credentials = match (user, password, secret) {
                (Some(user), Some(password), _) => probe::Credentials::Password { user, password },
                (_, _, Some(secret)) => probe::Credentials::Secret { secret, user_id },
                _ => {
                    eprintln!("turnstone probe: give --user and --password, or --secret");
                    return ExitCode::from(2);
                }
            };
            let options = probe::Options {
                url,
                credentials,
                peer,
                timeout,
                insecure,
                ca,
            };
            ExitCode::from(probe::main(&options, &mut std::io::stdout().lock()))
        }
        Some(Command::Users { action, store }) => store_command(store, |url| match action {
            UsersAction::Add {
                name,
                password,
                realm,
            } => turnstone::store::users_add(url, &name, &realm, password),
            UsersAction::Remove { name } => turnstone::store::users_remove(url, &name),
            UsersAction::List => turnstone::store::users_list(url),
            UsersAction::Revoke { id } => turnstone::store::users_revoke(url, &id, true),
            UsersAction::Unrevoke { id } => turnstone::store::users_revoke(url, &id, false),
        }),
        Some(Command::Secrets { action, store }) => store_command(store, |url| match action {
            SecretsAction::Add { secret } => turnstone::store::secrets_change(url, &secret, true),
            SecretsAction::Remove { secret } => {
                turnstone::store::secrets_change(url, &secret, false)
            }
            SecretsAction::List => turnstone::store::secrets_list(url),
        }),
        Some(Command::Sessions { action, store }) => store_command(store, |url| match action {
            None => turnstone::store::sessions_list(url),
            Some(SessionsAction::Kill { user }) => turnstone::store::sessions_kill(url, &user),
        }),
        None => serve(cli.config, inherited),
    }
}

fn check_config(file: &std::path::Path) -> ExitCode {
    match Config::load(file) {
        Ok(config) => {
            for w in config.warnings() {
                eprintln!("{}: warning: {w}", file.display());
            }
            for line in net::fastpath::check_config_lines(&config) {
                println!("{}: {line}", file.display());
            }
            println!("{}: OK", file.display());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors {
                eprintln!("{}: {e}", file.display());
            }
            eprintln!("{}: {} problem(s)", file.display(), errors.len());
            ExitCode::FAILURE
        }
    }
}

fn serve(
    path: Option<PathBuf>,
    inherited: Option<Result<net::handover::Channel, String>>,
) -> ExitCode {
    let (config, dev_credential) = match &path {
        Some(p) => match Config::load(p) {
            Ok(c) => (c, None),
            Err(errors) => {
                for e in &errors {
                    eprintln!("{}: {e}", p.display());
                }
                return ExitCode::FAILURE;
            }
        },
        None => {
            // Development server: one fresh REST secret, one credential minted from it.
            let mut c = Config::development();
            let secret = hex(&rand::random::<[u8; 16]>());
            c.auth.secrets = vec![secret.clone()];
            let username = auth::rest_username(unix_now() + 24 * 3600, "dev");
            let password = auth::rest_password(&secret, &username);
            (c, Some((username, password)))
        }
    };
    // The container image sets TURNSTONE_LOG_FORMAT=json: JSON lines whatever the mounted
    // configuration says.
    let mut config = config;
    match std::env::var("TURNSTONE_LOG_FORMAT").as_deref() {
        Ok("json") => config.log.format = LogFormat::Json,
        Ok("text") => config.log.format = LogFormat::Text,
        Ok(other) => {
            eprintln!("turnstone: TURNSTONE_LOG_FORMAT={other:?} is neither \"json\" nor \"text\"");
            return ExitCode::FAILURE;
        }
        Err(_) => {}
    }
    let log_level = init_logging(&config);
    turnstone::selftest::set_enabled(config.metrics.selftest);
    if let Some((username, password)) = dev_credential {
        let urls: Vec<String> = config
            .listen
            .iter()
            .map(|l| match l.transport {
                ListenTransport::Udp => format!("turn:{}?transport=udp", l.address),
                ListenTransport::Tcp => format!("turn:{}?transport=tcp", l.address),
                ListenTransport::Tls => format!("turns:{}?transport=tcp", l.address),
            })
            .collect();
        eprintln!("turnstone development server (credential valid for 24 hours); paste into new RTCPeerConnection({{iceServers: [...]}}):");
        println!("{}", ice_server_json(&urls, &username, &password));
    }
    match net::run(Launch {
        config,
        path,
        inherited,
        log_level: Some(log_level),
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("turnstone: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Sets up `tracing` (text or JSON on stderr, `[log] level` unless `RUST_LOG` is set)
/// with a filter that a reload can change.
fn init_logging(config: &Config) -> net::LogLevelSetter {
    use tracing_subscriber::{layer::SubscriberExt, reload, util::SubscriberInitExt, EnvFilter};
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    match config.log.format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .init(),
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
    Box::new(move |level: &str| {
        let f = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        handle.reload(f).map_err(|e| e.to_string())
    })
}

fn ice_server_json(urls: &[String], username: &str, credential: &str) -> String {
    let urls: Vec<String> = urls.iter().map(|u| json_string(u)).collect();
    format!(
        "{{\"urls\": [{}], \"username\": {}, \"credential\": {}}}",
        urls.join(", "),
        json_string(username),
        json_string(credential)
    )
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
