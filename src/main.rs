//! The `keybroker` binary: clap parses, `main` dispatches and maps outcomes to exit codes. The
//! tokio runtime is built only for `serve` and `sweep`: the client commands never start one.

#![forbid(unsafe_code)]

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use keybroker::broker::StopReport;
use keybroker::cli::{Cli, Command};
use keybroker::clock::Clock;
use keybroker::config::{self, Config};
use keybroker::{client, daemon, logging, paths};

/// Bad usage or configuration (sysexits EX_USAGE).
const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return refused(&e),
    };
    match cli.command {
        Command::Serve {
            config,
            dev,
            log_format,
        } => serve(config.as_deref(), dev, log_format),
        Command::CheckConfig { config } => check_config(config.as_deref()),
        Command::Sweep { config } => sweep(config.as_deref()),
        Command::CredentialProcess {
            profile,
            socket,
            timeout,
        } => credential_process(&profile, socket.as_deref(), &timeout),
        Command::Status {
            profiles,
            socket,
            json,
        } => status(socket.as_deref(), json, &profiles),
        Command::Probe { check, socket } => {
            let socket = paths::resolve_client_socket(socket.as_deref());
            match client::probe(&socket, check == keybroker::cli::ProbeCheck::Ready) {
                Ok(()) => ExitCode::SUCCESS,
                Err(line) => fail(&line),
            }
        }
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
        } => revoke_principal(socket.as_deref(), &profile, principal, yes),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "keybroker", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Man { dir } => man(dir.as_deref()),
        Command::InstallNode { dir, daemon_user } => install_node(&dir, &daemon_user),
        Command::AwsConfig {
            profiles,
            prefix,
            write,
            file,
            socket,
        } => {
            let socket = paths::resolve_client_socket(socket.as_deref());
            let write = write.then_some(file.as_deref());
            match client::aws_config::run(&socket, &profiles, &prefix, write) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(line) => fail(&line),
            }
        }
        Command::Exec {
            profile,
            socket,
            command,
        } => {
            let socket = paths::resolve_client_socket(socket.as_deref());
            let (code, line) = client::exec::run(&socket, &profile, &command);
            eprintln!("keybroker exec: {line}");
            ExitCode::from(code)
        }
    }
}

/// clap printed help or the version (0), or refused the command line: 1 for the client
/// commands, whose contract is 1 for every failure (aws-cli only needs non-zero), else 64.
fn refused(e: &clap::Error) -> ExitCode {
    let _ = e.print();
    match e.kind() {
        clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
            ExitCode::SUCCESS
        }
        _ if matches!(
            keybroker::cli::named_subcommand(std::env::args_os()).as_deref(),
            Some("credential-process" | "status" | "probe")
        ) =>
        {
            ExitCode::FAILURE
        }
        _ => ExitCode::from(EXIT_USAGE),
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

/// Reads and validates the config file `--config` (or its default) names; an invalid one is
/// bad usage.
fn load_config(flag: Option<&Path>) -> Result<Config, ExitCode> {
    let path = paths::resolve_config_path(flag);
    config::load(&path).map_err(|e| fail_usage(&format!("config {e}")))
}

/// The daemon's wiring of `config` (`None`: dev mode); a provider that cannot be set up is a
/// configuration error.
fn setup(config: Option<Config>, clock: &Clock) -> Result<daemon::Setup, ExitCode> {
    let Some(config) = config else {
        return daemon::Setup::dev(clock).map_err(|e| fail_usage(&format!("config <dev>: {e}")));
    };
    let path = config.path.clone();
    daemon::Setup::new(config, clock)
        .map_err(|e| fail_usage(&format!("config {}: {e}", path.display())))
}

fn runtime(mut builder: tokio::runtime::Builder) -> Result<tokio::runtime::Runtime, ExitCode> {
    builder
        .enable_all()
        .build()
        .map_err(|e| fail(&format!("cannot start the async runtime: {e}")))
}

/// `keybroker check-config`.
fn check_config(flag: Option<&Path>) -> ExitCode {
    let config = match load_config(flag) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let names: Vec<&str> = config.profiles.keys().map(String::as_str).collect();
    println!(
        "{}: ok ({} profiles: {})",
        config.path.display(),
        names.len(),
        names.join(", ")
    );
    ExitCode::SUCCESS
}

/// `keybroker serve`: configuration errors exit 64 before anything is bound or minted.
fn serve(
    config_flag: Option<&Path>,
    dev: bool,
    log_format: Option<logging::LogFormat>,
) -> ExitCode {
    // Defence in depth: every file and directory the daemon makes is given its mode explicitly
    // (README, "Files the daemon creates"), but nothing it makes is for others unless it says
    // so; the unit sets UMask=0077 too.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let config = match (!dev).then(|| load_config(config_flag)).transpose() {
        Ok(c) => c,
        Err(code) => return code,
    };
    logging::init(log_format);
    daemon::raise_fd_limit();
    // Socket activation: taken before the runtime's threads exist (it clears LISTEN_*).
    let activated = match keybroker::systemd::activated_socket() {
        Ok(listener) => listener,
        Err(e) => return fail(&format!("socket passed by systemd: {e}")),
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // TOKIO_WORKER_THREADS still overrides.
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        builder.worker_threads(daemon::threads());
    }
    let runtime = match runtime(builder) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    runtime.block_on(async {
        let mut setup = match setup(config, &Clock::System) {
            Ok(s) => s,
            Err(code) => return code,
        };
        setup.activated = activated;
        if dev {
            print_dev_banner(&setup.socket);
        }
        match daemon::run(setup, daemon::stop_signal()).await {
            Err(e) => fail(&e.to_string()),
            Ok(report) => stopped(&report),
        }
    })
}

/// 0 for a clean stop, else 1 and one line naming what was left for the next start.
fn stopped(report: &StopReport) -> ExitCode {
    if report.is_clean() {
        return ExitCode::SUCCESS;
    }
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

fn print_dev_banner(socket: &Path) {
    let exe = std::env::current_exe().unwrap_or_else(|_| "keybroker".into());
    let helper = client::aws_config::Helper::new(&exe, socket);
    let dev = keybroker::api::ClientProfile {
        name: "dev".into(),
        provider: "dev".into(),
        s3: keybroker::api::S3Settings::default(),
        container: None,
    };
    println!(
        "keybroker dev mode: profile \"dev\" on {}",
        socket.display()
    );
    println!("Keys are made in process (no cloud); they expire and are revoked like real ones.");
    println!("Add this to ~/.aws/config (or run keybroker aws-config --write{}), then run: aws configure list --profile keybroker-dev\n", helper.socket.map(|s| format!(" --socket {}", s.display())).unwrap_or_default());
    println!(
        "{}",
        client::aws_config::block(&dev, "keybroker-dev", &helper)
    );
    println!("Stop with Ctrl-C: every key is revoked before exit.");
    let _ = std::io::stdout().flush();
}

/// `keybroker sweep`: the start-up recovery of `serve`, offline: revoke every key an earlier
/// run left.
fn sweep(config_flag: Option<&Path>) -> ExitCode {
    let config = match load_config(config_flag) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let runtime = match runtime(tokio::runtime::Builder::new_current_thread()) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    runtime.block_on(async {
        let clock = Clock::System;
        let setup = match setup(Some(config), &clock) {
            Ok(s) => s,
            Err(code) => return code,
        };
        let dir = &setup.state_dir;
        match daemon::recover_state(dir, &setup.profiles, &clock, false).await {
            Err(e) => fail(&e.to_string()),
            Ok((_lock, done)) => {
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

/// `credential-process`: a bad `--timeout` is bad usage (64), whatever the daemon would say.
fn credential_process(profile: &str, socket: Option<&Path>, timeout: &str) -> ExitCode {
    let timeout = match client::parse_timeout(timeout) {
        Ok(t) => t,
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

/// `keybroker status`: 0 when every profile is healthy.
fn status(socket: Option<&Path>, json: bool, profiles: &[String]) -> ExitCode {
    let socket = paths::resolve_client_socket(socket);
    match client::status(&socket, json, profiles) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(line) => fail(&line),
    }
}

/// `rotate`, `revoke`, `revoke-principal`: one call to the daemon, its outcome on stdout.
fn admin(socket: Option<&Path>, profile: &str, call: &client::AdminCall) -> ExitCode {
    let socket = paths::resolve_client_socket(socket);
    match client::admin(&socket, profile, call) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(line) => fail(&line),
    }
}

/// `revoke-principal`: refused without `--yes`.
fn revoke_principal(
    socket: Option<&Path>,
    profile: &str,
    principal: String,
    yes: bool,
) -> ExitCode {
    if !yes {
        return fail_usage(&format!(
            "revoke-principal revokes EVERY key of {principal}: all keys minted with profile {profile}'s API token, on every node, and any other key of that principal. Nothing was done; add --yes to go ahead"
        ));
    }
    admin(
        socket,
        profile,
        &client::AdminCall::RevokePrincipal(principal),
    )
}

/// `keybroker man [--dir DIR]`.
fn man(dir: Option<&Path>) -> ExitCode {
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

/// `keybroker install-node DIR --daemon-user UID:GID`.
fn install_node(dir: &Path, daemon_user: &str) -> ExitCode {
    let user = match keybroker::node::parse_user(daemon_user) {
        Ok(u) => u,
        Err(line) => return fail_usage(&line),
    };
    match keybroker::node::install(dir, user) {
        Ok(lines) => {
            for line in lines {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(line) => fail(&line),
    }
}
