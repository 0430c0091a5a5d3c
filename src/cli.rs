//! The command line (README, "Commands"): clap's definition, the one parser of it.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::logging::LogFormat;

/// keybroker: short-lived object-storage keys for aws-cli and the AWS SDKs.
#[derive(Debug, Parser)]
#[command(
    name = "keybroker",
    version,
    propagate_version = true,
    about,
    max_term_width = 100
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands. Each one's flags are built only when it is the one run (`defer`): aws-cli
/// starts `credential-process` for every command, and building the others cost it about
/// 50 µs of its 1 ms.
#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum Command {
    /// Run the daemon in the foreground: mint, renew, serve and, at stop, revoke keys.
    Serve {
        /// Config file [default: $KEYBROKER_CONFIG, else /etc/keybroker/keybroker.toml].
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// Development mode: one profile `dev` with in-process keys, no config, no cloud account.
        #[arg(long, conflicts_with = "config")]
        dev: bool,
        /// Log output [default: journald when systemd's $JOURNAL_STREAM is our stderr, else
        /// text].
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
    },
    // Each flag takes the next word as its value even when it starts with `-`: a profile may
    // be named `-x`, and `--timeout -5s` gets the message about durations.
    /// Print a profile's credentials as credential_process JSON (for ~/.aws/config).
    CredentialProcess {
        /// The keybroker profile.
        #[arg(long, allow_hyphen_values = true)]
        profile: String,
        /// Daemon socket [default: $KEYBROKER_SOCKET, else the per-user default].
        #[arg(long, value_name = "PATH", allow_hyphen_values = true)]
        socket: Option<PathBuf>,
        /// How long to wait for the daemon's answer, e.g. 30s or 2m. The default is as long as
        /// the daemon waits for a cold profile's first key, plus a margin.
        #[arg(
            long,
            value_name = "DURATION",
            default_value_t = default_timeout(),
            allow_hyphen_values = true
        )]
        timeout: String,
    },
    /// Show every profile's key, expiry, next renewal, state and last error (or those of the
    /// profiles named).
    Status {
        /// Only these profiles [default: every one].
        profiles: Vec<String>,
        /// Daemon socket [default: $KEYBROKER_SOCKET, else the per-user default].
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Print the daemon's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print an AWS config block per profile you may read (credential_process, S3 endpoint,
    /// region, addressing style), or merge them into your AWS config file with --write.
    AwsConfig {
        /// The keybroker profiles [default: every one you may read].
        profiles: Vec<String>,
        /// Put before each profile's name to make the AWS profile's name.
        #[arg(long, default_value = "keybroker-")]
        prefix: String,
        /// Merge into the AWS config file: replace the blocks keybroker wrote before, add the
        /// others, leave everything else as it is.
        #[arg(long)]
        write: bool,
        /// The file --write merges into [default: $AWS_CONFIG_FILE, else ~/.aws/config].
        #[arg(long, value_name = "PATH", requires = "write")]
        file: Option<PathBuf>,
        /// Daemon socket [default: $KEYBROKER_SOCKET, else the per-user default].
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
    /// Run COMMAND with a profile's keys and S3 settings in its environment (no AWS config
    /// needed); keybroker replaces itself with COMMAND.
    ///
    /// Exit status: COMMAND's; 125 when keybroker fails first, 126 when COMMAND cannot be run,
    /// 127 when it is not found.
    Exec {
        /// The keybroker profile.
        #[arg(long)]
        profile: String,
        /// Daemon socket [default: $KEYBROKER_SOCKET, else the per-user default].
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// The command and its arguments.
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "COMMAND"
        )]
        command: Vec<std::ffi::OsString>,
    },
    /// Check the daemon for a Kubernetes exec probe or a health check: `live` (it answers)
    /// or `ready` (every prewarmed profile has a key it would serve). Exit 0 or 1.
    Probe {
        /// What to check.
        #[arg(value_enum)]
        check: ProbeCheck,
        /// Daemon socket [default: $KEYBROKER_SOCKET, else the per-user default].
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
    /// Revoke every key an earlier run left behind (the ledger's open leases, and keys with this
    /// broker's tag it no longer tracks), without serving. Refused while a daemon runs.
    Sweep {
        /// Config file [default: $KEYBROKER_CONFIG, else /etc/keybroker/keybroker.toml].
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
    },
    /// Mint a new key for PROFILE now and retire the current one (root or the daemon's user).
    ///
    /// The retired key stays valid for the clients that fetched it and is revoked when it
    /// expires. Also ends the hold of `keybroker revoke`.
    Rotate {
        /// The profile.
        profile: String,
        /// Daemon socket [default: $KEYBROKER_SOCKET, else the per-user default].
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
    /// Revoke every key of PROFILE now (root or the daemon's user).
    ///
    /// The profile then serves no key: requests get HTTP 503 until `keybroker rotate PROFILE`.
    Revoke {
        /// The profile.
        profile: String,
        /// Daemon socket [default: $KEYBROKER_SOCKET, else the per-user default].
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
    /// Panic button: revoke EVERY key of a CoreWeave principal (root or the daemon's user).
    ///
    /// Calls CoreWeave's revoke-access-key/principal with the profile's API token. Every key
    /// minted with that token shares the principal `coreweave/<token id>`, so this kills all of
    /// them, on every node, and any other key of that principal. The profile's own keys are
    /// then revoked too, and it serves no key until `keybroker rotate`. Refused without --yes.
    RevokePrincipal {
        /// The profile whose CoreWeave API token makes the call.
        #[arg(long)]
        profile: String,
        /// The principal, e.g. coreweave/ueqXfgRCYGqptEXAMPLE1.
        principal: String,
        /// Confirm: every key of the principal stops working at once.
        #[arg(long)]
        yes: bool,
        /// Daemon socket [default: $KEYBROKER_SOCKET, else the per-user default].
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
    /// Print a shell completion script: bash, zsh, fish, elvish or powershell.
    ///
    /// For bash: keybroker completions bash > /etc/bash_completion.d/keybroker
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout (keybroker man | man -l -), or write every page.
    Man {
        /// Write keybroker.1 and a keybroker-COMMAND.1 per command into this directory, e.g.
        /// /usr/local/share/man/man1, instead of printing keybroker.1.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Lay out DIR for a daemon and the workloads on its node to share (run as root, e.g. by
    /// a Kubernetes init container): DIR/bin/keybroker, a copy of this binary for
    /// credential_process, and DIR/socket/, the daemon's socket directory, given to its user.
    InstallNode {
        /// The shared directory, e.g. /run/keybroker (a hostPath volume); made if missing.
        dir: PathBuf,
        /// The user the daemon runs as, in numbers, e.g. 65532:65532.
        #[arg(long, value_name = "UID:GID")]
        daemon_user: String,
    },
    /// Validate a config file without starting.
    CheckConfig {
        /// Config file [default: $KEYBROKER_CONFIG, else /etc/keybroker/keybroker.toml].
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
    },
}

/// What `keybroker probe` checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProbeCheck {
    /// The daemon answers (`GET /healthz`).
    Live,
    /// Every prewarmed profile has a key it would serve (`GET /readyz`).
    Ready,
}

/// `credential-process --timeout`'s default as written on the command line (main parses it
/// like a given value).
fn default_timeout() -> String {
    humantime::format_duration(crate::client::CREDENTIALS_TIMEOUT).to_string()
}

/// The subcommand `args` name (the program's name first), also when clap refuses the rest of
/// the line: a refused `credential-process` or `status` exits 1 like any client failure, other
/// refused lines 64.
pub fn named_subcommand<I, T>(args: I) -> Option<String>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let matches = <Cli as clap::CommandFactory>::command()
        .ignore_errors(true)
        .try_get_matches_from(args)
        .ok()?;
    matches.subcommand_name().map(str::to_owned)
}

/// Sections of keybroker(1) that clap does not describe: exit codes, environment and files.
const MAN_EXTRA: &str = r#".SH "EXIT STATUS"
.TP
0
Success. For \fBserve\fR: a clean stop with every key revoked. For \fBstatus\fR: every profile is healthy.
.TP
1
A failure, said in one line on stderr: the daemon is unreachable, refused, did not answer in time, or answered with an error; \fBstatus\fR found a profile degraded, unavailable or revoked; \fBprobe ready\fR found a prewarmed profile without a key; \fBserve\fR left keys unrevoked (named in its last log line).
.TP
64
Bad usage or an invalid config file (\fIpath:line:col: message\fR).
.SH ENVIRONMENT
.TP
KEYBROKER_CONFIG
The config file when \fB\-\-config\fR is not given.
.TP
KEYBROKER_SOCKET
The daemon's socket when \fB\-\-socket\fR is not given.
.TP
RUST_LOG
The daemon's log filter; default \fIinfo\fR.
.TP
XDG_RUNTIME_DIR
A non-root user's socket lives in \fI$XDG_RUNTIME_DIR/keybroker/\fR.
.TP
JOURNAL_STREAM
Set by systemd: when it names the daemon's stderr, logs go to journald with their fields.
.SH FILES
.TP
/etc/keybroker/keybroker.toml
The config file.
.TP
/run/keybroker/keybroker.sock
The system daemon's socket (root's default; other users fall back to it).
.TP
/var/lib/keybroker/ledger.jsonl
The ledger of every key minted and not yet revoked (root's state directory; \fI$STATE_DIRECTORY\fR under systemd).
"#;

/// The man pages: `keybroker.1`, then `keybroker-COMMAND.1` for each command, as
/// `(file name, roff)`.
pub fn man_pages() -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let mut cmd = <Cli as clap::CommandFactory>::command().disable_help_subcommand(true);
    cmd.build();
    let mut pages = Vec::new();
    let mut main = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut main)?;
    main.extend_from_slice(MAN_EXTRA.as_bytes());
    pages.push(("keybroker.1".to_string(), main));
    for sub in cmd.get_subcommands() {
        let man = clap_mangen::Man::new(sub.clone());
        let mut page = Vec::new();
        man.render(&mut page)?;
        pages.push((man.get_filename(), page));
    }
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(line: &str) -> Option<String> {
        named_subcommand(std::iter::once("keybroker").chain(line.split_whitespace()))
    }

    /// `credential-process`'s flags in any order, `--flag value` or `--flag=value`, and values
    /// that start with `-`: every form an `~/.aws/config` line may use.
    #[test]
    fn credential_process_reads_its_flags_in_every_form() {
        let default = default_timeout();
        assert_eq!(
            crate::client::parse_timeout(&default),
            Ok(crate::client::CREDENTIALS_TIMEOUT)
        );
        for (line, want) in [
            ("--profile p", ("p", None, default.as_str())),
            ("--profile=p", ("p", None, default.as_str())),
            (
                "--socket /s --profile p",
                ("p", Some("/s"), default.as_str()),
            ),
            (
                "--timeout=5s --socket=/s --profile=p",
                ("p", Some("/s"), "5s"),
            ),
            ("--profile -p --timeout -5s", ("-p", None, "-5s")),
            (
                "--profile p --socket -s",
                ("p", Some("-s"), default.as_str()),
            ),
        ] {
            let args = ["keybroker", "credential-process"]
                .into_iter()
                .chain(line.split_whitespace());
            let Command::CredentialProcess {
                profile,
                socket,
                timeout,
            } = Cli::try_parse_from(args).expect(line).command
            else {
                panic!("{line}: not credential-process");
            };
            let socket = socket.as_deref().map(|s| s.to_str().unwrap());
            assert_eq!((profile.as_str(), socket, timeout.as_str()), want, "{line}");
        }
        for refused in [
            "",
            "--profile",
            "--profile p --profile q",
            "--profile p extra",
        ] {
            let args = ["keybroker", "credential-process"]
                .into_iter()
                .chain(refused.split_whitespace());
            assert!(Cli::try_parse_from(args).is_err(), "{refused:?}");
        }
    }

    #[test]
    fn a_refused_line_still_names_its_subcommand() {
        for (line, name) in [
            ("credential-process", Some("credential-process")),
            ("credential-process --profile", Some("credential-process")),
            ("credential-process --bogus", Some("credential-process")),
            (
                "credential-process --profile p --profile q",
                Some("credential-process"),
            ),
            (
                "credential-process --profile p extra",
                Some("credential-process"),
            ),
            ("status --bogus", Some("status")),
            ("status --json --json", Some("status")),
            ("serve --bogus-flag", Some("serve")),
            ("completions tcsh", Some("completions")),
            ("bogus", None),
            ("", None),
            ("--bogus status", None),
        ] {
            assert_eq!(named(line).as_deref(), name, "{line:?}");
        }
    }
}
