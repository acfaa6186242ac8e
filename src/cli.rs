//! The command line of `turnstone` (clap): its subcommands and options, in the library so
//! that tests can check that every command the documentation quotes parses.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "turnstone", version, about = "A STUN/TURN server for WebRTC")]
pub struct Cli {
    /// Run from this TOML configuration file (without it: a development server on
    /// 127.0.0.1:3478 with a freshly minted credential).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Validate a configuration file: exit 0, or print every problem with its key.
    CheckConfig { file: PathBuf },
    /// Upgrade the running server to the binary now installed at its path without
    /// dropping a call: the new process takes the listening sockets, every UDP
    /// allocation and its relay socket; TCP/TLS clients stay with the old process until
    /// they end or its drain timeout passes. Exit 0 once the new process serves (its pid
    /// and what it took over are printed); otherwise the old process goes on serving
    /// and the reason is printed. `kill -USR2 <pid>` does the same without an answer.
    Upgrade {
        /// The server's control socket (default: $RUNTIME_DIRECTORY/control.sock, else
        /// /run/turnstone/control.sock; `[server] control_socket` in its configuration).
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
    /// Print a TURN REST API username and password for a shared secret.
    Credentials {
        /// The shared secret (one of `[auth] secrets`).
        #[arg(long)]
        secret: String,
        /// The user id to embed in the username.
        #[arg(long)]
        user: String,
        /// How long the credential is valid, e.g. 1h, 30m, 1d.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Print as a JSON iceServers entry for this TURN URL instead.
        #[arg(long, value_name = "URL")]
        url: Option<String>,
    },
    /// Check a TURN server end to end: Binding, Allocate, permission, channel, a round
    /// trip through the relay to a peer the probe listens on, Refresh 0. Prints each step
    /// and a verdict line; exit status 0 when it relays (3 unreachable, 4 timeout, 5 TLS
    /// error, 6 401 bad credentials, 7 403 peer refused, 1 other failure).
    Probe {
        /// turn:HOST[:PORT][?transport=udp|tcp] or turns:HOST[:PORT] (TLS over TCP).
        url: String,
        /// Long-term credential: user name.
        #[arg(long, short = 'u', requires = "password", conflicts_with = "secret")]
        user: Option<String>,
        /// Long-term credential: password.
        #[arg(long, short = 'p', requires = "user")]
        password: Option<String>,
        /// TURN REST API shared secret: the probe mints a credential valid for an hour.
        #[arg(long, required_unless_present = "user")]
        secret: Option<String>,
        /// User id in the REST API username ("<expiry>:<id>").
        #[arg(long, default_value = "probe", requires = "secret")]
        user_id: String,
        /// HOST:PORT the relay should send to; it must reach this machine's UDP port PORT,
        /// where the probe listens (default: the local address used to reach the server).
        #[arg(long, value_name = "HOST:PORT")]
        peer: Option<String>,
        /// Limit for each step.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// turns: accept any certificate.
        #[arg(long, conflicts_with = "ca")]
        insecure: bool,
        /// turns: trust the PEM certificate(s) in FILE instead of the system roots.
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
    },
    /// Manage the users of a fleet store (like coturn's turnadmin): stored as long-term
    /// keys, never passwords; changes reach every node within a second.
    Users {
        #[command(subcommand)]
        action: UsersAction,
        #[command(flatten)]
        store: StoreUrl,
    },
    /// Manage the TURN REST API secrets of a fleet store.
    Secrets {
        #[command(subcommand)]
        action: SecretsAction,
        #[command(flatten)]
        store: StoreUrl,
    },
    /// List every node's live allocations from a fleet store; `sessions kill --user U`
    /// ends U's allocations on every node.
    Sessions {
        #[command(subcommand)]
        action: Option<SessionsAction>,
        #[command(flatten)]
        store: StoreUrl,
    },
}

#[derive(clap::Args)]
pub struct StoreUrl {
    /// The fleet store: redis://[[USER]:PASSWORD@]HOST[:PORT][/DB], or rediss://... for
    /// TLS (required).
    #[arg(long, value_name = "URL", global = true)]
    pub store: Option<String>,
    /// rediss://: trust the PEM CA certificate(s) in FILE instead of the system roots
    /// (the nodes' `[store] ca_file`).
    #[arg(long, value_name = "FILE", global = true)]
    pub store_ca: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum UsersAction {
    /// Add or replace a user (password from --password or one line of standard input).
    Add {
        name: String,
        #[arg(long)]
        password: Option<String>,
        /// Must be the nodes' `[server] realm`: it is part of the stored key.
        #[arg(long)]
        realm: String,
    },
    /// Remove a user; every node ends its allocations.
    Remove { name: String },
    /// List the users (and revoked names).
    List,
    /// Revoke a user name or REST user id; every node ends its allocations.
    Revoke { id: String },
    /// Lift a revocation.
    Unrevoke { id: String },
}

#[derive(Subcommand)]
pub enum SecretsAction {
    /// Add a REST API shared secret.
    Add { secret: String },
    /// Remove a REST API shared secret.
    Remove { secret: String },
    /// List the REST API shared secrets.
    List,
}

#[derive(Subcommand)]
pub enum SessionsAction {
    /// End a user's allocations on every node.
    Kill {
        #[arg(long)]
        user: String,
    },
}
