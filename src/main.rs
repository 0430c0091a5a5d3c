//! The `keybroker` binary: parse, dispatch, map outcomes to exit codes.

#![forbid(unsafe_code)]

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use keybroker::cli::{Cli, Command};
use keybroker::{client, config, daemon, logging, paths};

/// Bad usage or configuration (sysexits EX_USAGE).
const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    // aws-cli spawns `credential-process` for every command: its usual forms skip clap's
    // set-up; anything else (help, a typo) goes through clap for the proper message.
    if let Some(args) = fast_credential_process_args() {
        return credential_process(
            &args.profile,
            args.socket.as_deref(),
            args.timeout.as_deref(),
        );
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                // aws-cli only needs non-zero; the contract says 1 for every client failure.
                _ if matches!(
                    std::env::args().nth(1).as_deref(),
                    Some("credential-process" | "status")
                ) =>
                {
                    ExitCode::FAILURE
                }
                _ => ExitCode::from(EXIT_USAGE),
            };
        }
    };
    match cli.command {
        Command::Serve {
            config,
            dev,
            log_format,
        } => serve(config, dev, log_format),
        Command::CheckConfig { config } => {
            let path = paths::resolve_config_path(config.as_deref());
            match config::load(&path) {
                Ok(c) => {
                    println!(
                        "{}: ok ({} profiles: {})",
                        path.display(),
                        c.profiles.len(),
                        c.profiles.keys().cloned().collect::<Vec<_>>().join(", ")
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail_usage(&format!("config {e}")),
            }
        }
        Command::Sweep { config } => sweep(config),
        Command::CredentialProcess {
            profile,
            socket,
            timeout,
        } => credential_process(&profile, socket.as_deref(), Some(&timeout)),
        Command::Rotate { profile, socket } => {
            admin(socket.as_deref(), &profile, &client::AdminCall::Rotate)
        }
        Command::Revoke { profile, socket } => {
            admin(socket.as_deref(), &profile, &client::AdminCall::Revoke)
        }
        Command::RevokePrincipal {
            profile,
            principal,
            yes,
            socket,
        } => {
            if !yes {
                return fail_usage(&format!(
                    "revoke-principal revokes EVERY key of {principal}: all keys minted with profile {profile}'s API token, on every node, and any other key of that principal. Nothing was done; add --yes to go ahead"
                ));
            }
            admin(
                socket.as_deref(),
                &profile,
                &client::AdminCall::RevokePrincipal(principal),
            )
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "keybroker", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Man { dir } => man(dir.as_deref()),
        Command::Status { socket, json } => {
            let socket = paths::resolve_client_socket(socket.as_deref());
            match client::status(&socket, json) {
                Ok(healthy) => {
                    if healthy {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(line) => fail(&line),
            }
        }
    }
}

/// The flags of `credential-process`, as the fast path reads them.
struct CredentialProcessArgs {
    profile: String,
    socket: Option<std::path::PathBuf>,
    /// `--timeout` as written; checked by [`credential_process`].
    timeout: Option<String>,
}

/// `credential-process --profile P [--socket S] [--timeout T]` (any order, `--x=v` too), else
/// `None`.
fn fast_credential_process_args() -> Option<CredentialProcessArgs> {
    let mut args = std::env::args_os().skip(1);
    if args.next()? != "credential-process" {
        return None;
    }
    let (mut profile, mut socket, mut timeout) = (None, None, None);
    while let Some(arg) = args.next() {
        let arg = arg.into_string().ok()?;
        let (key, value) = match arg.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (arg, args.next()?.into_string().ok()?),
        };
        match key.as_str() {
            "--profile" if profile.is_none() && !value.is_empty() => profile = Some(value),
            "--socket" if socket.is_none() && !value.is_empty() => socket = Some(value.into()),
            "--timeout" if timeout.is_none() && !value.is_empty() => timeout = Some(value),
            _ => return None,
        }
    }
    Some(CredentialProcessArgs {
        profile: profile?,
        socket,
        timeout,
    })
}

/// `credential-process`: a bad `--timeout` is bad usage (64), whatever the daemon would say.
fn credential_process(
    profile: &str,
    socket: Option<&std::path::Path>,
    timeout: Option<&str>,
) -> ExitCode {
    let timeout = match timeout.map(client::parse_timeout).transpose() {
        Ok(t) => t.unwrap_or(client::CREDENTIALS_TIMEOUT),
        Err(line) => return fail_usage(&line),
    };
    let socket = paths::resolve_client_socket(socket);
    match client::credential_process(&socket, profile, timeout) {
        Ok(json) => {
            let mut out = std::io::stdout().lock();
            if out.write_all(&json).and_then(|()| out.flush()).is_err() {
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(line) => fail(&line),
    }
}

/// `keybroker man [--dir DIR]`.
fn man(dir: Option<&std::path::Path>) -> ExitCode {
    let pages = match keybroker::cli::man_pages() {
        Ok(p) => p,
        Err(e) => return fail(&format!("rendering the man pages: {e}")),
    };
    let Some(dir) = dir else {
        let mut out = std::io::stdout().lock();
        return match out.write_all(&pages[0].1).and_then(|()| out.flush()) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                fail(&format!("writing the man page: {e}"))
            }
            _ => ExitCode::SUCCESS,
        };
    };
    for (name, roff) in &pages {
        let path = dir.join(name);
        if let Err(e) = std::fs::write(&path, roff) {
            return fail(&format!("writing {}: {e}", path.display()));
        }
        println!("{}", path.display());
    }
    ExitCode::SUCCESS
}

/// `rotate`, `revoke`, `revoke-principal`: one call to the daemon, its outcome on stdout.
fn admin(socket: Option<&std::path::Path>, profile: &str, call: &client::AdminCall) -> ExitCode {
    let socket = paths::resolve_client_socket(socket);
    match client::admin(&socket, profile, call) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(line) => fail(&line),
    }
}

fn fail(line: &str) -> ExitCode {
    eprintln!("keybroker: {line}");
    ExitCode::FAILURE
}

fn fail_usage(line: &str) -> ExitCode {
    eprintln!("keybroker: {line}");
    ExitCode::from(EXIT_USAGE)
}

fn serve(
    config_flag: Option<std::path::PathBuf>,
    dev: bool,
    log_format: Option<logging::LogFormat>,
) -> ExitCode {
    // Defence in depth: every file and directory the daemon makes is given its mode explicitly
    // (README, "Files the daemon creates"), but nothing it makes is for others unless it says
    // so; the unit sets UMask=0077 too.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let config = if dev {
        config::dev()
    } else {
        let path = paths::resolve_config_path(config_flag.as_deref());
        match config::load(&path) {
            Ok(c) => c,
            Err(e) => return fail_usage(&format!("config {e}")),
        }
    };
    logging::init(log_format);
    daemon::raise_fd_limit();
    // Socket activation: taken before the runtime's threads exist (it clears LISTEN_*).
    let activated = match keybroker::systemd::activated_socket() {
        Ok(listener) => listener,
        Err(e) => return fail(&format!("socket passed by systemd: {e}")),
    };
    let socket = paths::resolve_socket(None, config.server.socket.as_deref());
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // TOKIO_WORKER_THREADS still overrides.
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        builder.worker_threads(daemon::threads());
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}")),
    };
    runtime.block_on(async {
        let clock = keybroker::clock::Clock::System;
        let profiles = match daemon::profiles_from(&config, &clock) {
            Ok(p) => p,
            Err(e) => return fail_usage(&format!("config {}: {e}", config.path.display())),
        };
        if dev {
            print_dev_banner(&socket);
        }
        let state_dir =
            (!dev).then(|| paths::resolve_state_dir(config.server.state_dir.as_deref()));
        let config_path = (!dev).then(|| config.path.clone());
        match daemon::run(
            &config,
            config_path.as_deref(),
            profiles,
            &socket,
            activated,
            state_dir.as_deref(),
            daemon::stop_signal(),
        )
        .await
        {
            Err(e) => fail(&e.to_string()),
            Ok(report) if report.is_clean() => ExitCode::SUCCESS,
            Ok(report) => {
                let mut left = Vec::new();
                if !report.unrevoked.is_empty() {
                    let ids: Vec<String> = report
                        .unrevoked
                        .iter()
                        .map(|(id, why)| format!("{id} ({why})"))
                        .collect();
                    left.push(format!(
                        "{} keys left unrevoked; they stay valid until they expire: {}",
                        report.unrevoked.len(),
                        ids.join(", ")
                    ));
                }
                if !report.unsettled.is_empty() {
                    left.push(format!(
                        "{} creates whose key may exist or still land are unsettled (tags {}); the next start or keybroker sweep finds and revokes them",
                        report.unsettled.len(),
                        report.unsettled.join(", ")
                    ));
                }
                fail(&left.join("; "))
            }
        }
    })
}

fn print_dev_banner(socket: &std::path::Path) {
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "keybroker".into());
    let socket_arg = if paths::resolve_client_socket(None) == socket {
        String::new()
    } else {
        format!(" --socket {}", socket.display())
    };
    println!(
        "keybroker dev mode: profile \"dev\" on {}",
        socket.display()
    );
    println!("Keys are made in process (no cloud); they expire and are revoked like real ones.");
    println!("Add this to ~/.aws/config, then run: aws configure list --profile keybroker-dev\n");
    println!("[profile keybroker-dev]");
    println!("credential_process = {exe} credential-process --profile dev{socket_arg}\n");
    println!("Stop with Ctrl-C: every key is revoked before exit.");
    let _ = std::io::stdout().flush();
}

/// `keybroker sweep`: the start-up recovery, offline: revoke every key an earlier run left.
fn sweep(config_flag: Option<std::path::PathBuf>) -> ExitCode {
    let path = paths::resolve_config_path(config_flag.as_deref());
    let config = match config::load(&path) {
        Ok(c) => c,
        Err(e) => return fail_usage(&format!("config {e}")),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}")),
    };
    runtime.block_on(async {
        let clock = keybroker::clock::Clock::System;
        let profiles = match daemon::profiles_from(&config, &clock) {
            Ok(p) => p,
            Err(e) => return fail_usage(&format!("config {}: {e}", config.path.display())),
        };
        let dir = paths::resolve_state_dir(config.server.state_dir.as_deref());
        let state = match daemon::open_state(&dir) {
            Ok(s) => s,
            Err(e) => return fail(&e.to_string()),
        };
        let targets = daemon::targets(&profiles);
        match keybroker::recovery::recover(
            &state.ledger,
            &targets,
            &state.tag_prefix,
            &clock,
            false,
        )
        .await
        {
            Err(e) => fail(&e.to_string()),
            Ok(done) => {
                for line in &done.lines {
                    println!("{line}");
                }
                println!(
                    "sweep: {} keys revoked, {} left to finish (state {})",
                    done.revoked,
                    done.unfinished,
                    dir.display()
                );
                if done.unfinished == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
        }
    })
}
