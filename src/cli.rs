//! The command line (DESIGN.md §2).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::logging::LogFormat;

/// keybroker: short-lived object-storage keys for aws-cli and the AWS SDKs.
#[derive(Debug, Parser)]
#[command(name = "keybroker", version, about, max_term_width = 100)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground: mint, renew, serve and, at stop, revoke keys.
    Serve {
        /// Config file [default: $KEYBROKER_CONFIG, else /etc/keybroker/keybroker.toml].
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// Development mode: one profile `dev` with in-process keys, no config, no cloud account.
        #[arg(long, conflicts_with = "config")]
        dev: bool,
        /// Log line format.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Print a profile's credentials as credential_process JSON (for ~/.aws/config).
    CredentialProcess {
        /// The keybroker profile.
        #[arg(long)]
        profile: String,
        /// Daemon socket [default: $KEYBROKER_SOCKET, else the per-user default].
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
    /// Show every profile's key, expiry, next renewal, state and last error.
    Status {
        /// Daemon socket [default: $KEYBROKER_SOCKET, else the per-user default].
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Print the daemon's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke every key an earlier run left behind (the ledger's open leases, and keys with this
    /// broker's tag it no longer tracks), without serving. Refused while a daemon runs.
    Sweep {
        /// Config file [default: $KEYBROKER_CONFIG, else /etc/keybroker/keybroker.toml].
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
    },
    /// Validate a config file without starting.
    CheckConfig {
        /// Config file [default: $KEYBROKER_CONFIG, else /etc/keybroker/keybroker.toml].
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
    },
}
