//! `serve`: wire the config into providers, recover the state directory, bind the socket,
//! start the broker, serve, and on a stop signal shut down in a fixed, logged order within
//! `shutdown_timeout` (README, "Behaviour over time"). `keybroker sweep` reuses the wiring and
//! the recovery.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, BrokerOptions, ProfileSpec, StopReport};
use crate::clock::Clock;
use crate::config::Config;
use crate::ledger::Ledger;
use crate::provider::Upstreams;
use crate::recovery::{recover, Recovery, Target};
use crate::server::container::ContainerTokens;
use crate::server::{self, Access, App, BoundSocket, Listener};

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A profile's provider could not be set up (bad `ca_file`): a configuration problem.
    #[error("profile {profile}: {source}")]
    Provider {
        /// The profile.
        profile: String,
        /// What failed.
        source: crate::provider::http::TlsSetupError,
    },
    /// The socket could not be bound.
    #[error(transparent)]
    Bind(#[from] server::BindError),
    /// The socket could not be served (made non-blocking, registered with the runtime).
    #[error("socket: {0}")]
    Listener(std::io::Error),
    /// The container endpoint could not listen.
    #[error("container endpoint {addr}: {source}")]
    Container {
        /// The configured address.
        addr: SocketAddr,
        /// What failed.
        source: std::io::Error,
    },
    /// The state directory's lock or ledger.
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
    /// The container endpoint's token files could not be written.
    #[error(transparent)]
    ContainerTokens(#[from] server::container::TokenError),
}

/// A started daemon: the broker's drivers and the servers are running.
pub struct Running {
    broker: Arc<Broker>,
    app: Arc<App>,
    socket: BoundSocket,
    servers: Vec<tokio::task::JoinHandle<()>>,
    stop_server: CancellationToken,
    shutdown_timeout: Duration,
    upstreams: Arc<Upstreams>,
}

/// How to run, beyond the profiles and the socket.
#[derive(Debug, Clone)]
pub struct Options {
    /// Who may read what.
    pub access: Access,
    /// How the broker runs (clock, seed, ledger, tag prefix).
    pub broker: BrokerOptions,
    /// Revoke budget at stop.
    pub shutdown_timeout: Duration,
    /// The container endpoint's address, if enabled.
    pub container_listen: Option<SocketAddr>,
    /// The provider connections and pacers, for profiles a reload adds.
    pub upstreams: Arc<Upstreams>,
}

/// Starts serving `profiles` on `socket` (and the container endpoint, if configured). Must run
/// inside a tokio runtime.
pub fn start(
    profiles: Vec<ProfileSpec>,
    socket: BoundSocket,
    options: Options,
) -> Result<Running, DaemonError> {
    let listener = socket.listener.try_clone().map_err(DaemonError::Listener)?;
    let mut listeners = vec![Listener::Socket(listener)];
    let mut container = None;
    if let Some(addr) = options.container_listen {
        let tcp = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(tokio::net::TcpListener::from_std)
            .map_err(|source| DaemonError::Container { addr, source })?;
        let dir = socket
            .path
            .parent()
            .unwrap_or(std::path::Path::new("/"))
            .join("container");
        let groups: Vec<(String, Option<u32>)> = profiles
            .iter()
            .map(|p| {
                let gid = options
                    .access
                    .profiles
                    .get(&p.name)
                    .and_then(|(_, gids)| gids.first().copied());
                (p.name.clone(), gid)
            })
            .collect();
        container = Some(ContainerTokens::create(&dir, &groups)?);
        tracing::info!(listen = %addr, tokens = %dir.display(), "container endpoint");
        listeners.push(Listener::Container(tcp));
    }
    let broker = Arc::new(Broker::start(Vec::new(), options.broker));
    let app = Arc::new(App {
        broker: Arc::clone(&broker),
        access: arc_swap::ArcSwap::from_pointee(options.access),
        container,
        requests: Default::default(),
        limits: Arc::new(server::Limits::from_process()),
        stopping: Default::default(),
    });
    let stop_server = CancellationToken::new();
    let drain = server::DRAIN_TIMEOUT.min(options.shutdown_timeout / 4);
    // Every server is set up before any profile starts: if one cannot be, nothing has been
    // minted. They answer once every profile is in service, so that no request meets a
    // configured profile as unknown and /readyz never counts only some of them, and they start
    // before the profiles' drivers, whose prewarm would otherwise run ahead of them.
    let mut ready = Vec::with_capacity(listeners.len());
    for l in listeners {
        let server = server::serve(l, Arc::clone(&app), stop_server.clone(), drain)
            .map_err(DaemonError::Listener)?;
        ready.push(server);
    }
    let slots = broker.insert(profiles);
    let servers = ready.into_iter().map(tokio::spawn).collect();
    broker.drive(slots);
    Ok(Running {
        broker,
        app,
        socket,
        servers,
        stop_server,
        shutdown_timeout: options.shutdown_timeout,
        upstreams: options.upstreams,
    })
}

impl Running {
    /// SIGHUP: reads the config at `path` again and applies it without dropping a connection.
    /// Added profiles start; removed ones leave service and their keys are revoked; changed
    /// ones are both; unchanged ones keep their keys. An invalid file changes nothing.
    pub async fn reload(&mut self, current: &mut Config, path: &Path) {
        let next = match crate::config::load(path) {
            Ok(next) => next,
            Err(e) => {
                tracing::error!("reload: config {e}; keeping the running config");
                return;
            }
        };
        let mut needs_restart = Vec::new();
        let (old, new) = (&current.server, &next.server);
        if old.socket != new.socket
            || old.socket_mode != new.socket_mode
            || old.socket_group != new.socket_group
        {
            needs_restart.push("the socket settings");
        }
        if old.state_dir != new.state_dir {
            needs_restart.push("state_dir");
        }
        if old.container_listen != new.container_listen {
            needs_restart.push("the container endpoint");
        }
        for what in needs_restart {
            tracing::warn!("reload: a change to {what} takes effect at the next restart");
        }
        let gone: Vec<String> = current
            .profiles
            .iter()
            .filter(|(name, p)| next.profiles.get(*name) != Some(*p))
            .map(|(name, _)| name.clone())
            .collect();
        let coming: Vec<&crate::config::ProfileConfig> = next
            .profiles
            .iter()
            .filter(|(name, p)| current.profiles.get(*name) != Some(*p))
            .map(|(_, p)| p)
            .collect();
        // Build every new provider first: a failure leaves everything as it was.
        let mut specs = Vec::new();
        for p in &coming {
            match spec_from(p, &Clock::System, &self.upstreams) {
                Ok(spec) => specs.push(spec),
                Err(e) => {
                    tracing::error!(
                        "reload: profile {}: {e}; keeping the running config",
                        p.name
                    );
                    return;
                }
            }
        }
        for name in &gone {
            if let Some(tokens) = &self.app.container {
                tokens.remove_profile(name);
            }
            // Its keys stay valid until the Expiration they were served with, and are revoked
            // then, or at stop.
            if self.broker.detach(name) {
                tracing::info!(profile = %name, "reload: profile out of service; its keys are revoked when they expire, or at stop");
            }
        }
        // The new rules first, so that an added profile is never briefly refused.
        let access = access_from(&next);
        self.app.access.store(Arc::new(access.clone()));
        for spec in &specs {
            if let Some(tokens) = &self.app.container {
                let group = access
                    .profiles
                    .get(&spec.name)
                    .and_then(|(_, g)| g.first().copied());
                if let Err(e) = tokens.add(&spec.name, group) {
                    tracing::error!(profile = %spec.name, "reload: {e}");
                }
            }
            tracing::info!(profile = %spec.name, "reload: profile added");
        }
        self.broker.add(specs);
        self.shutdown_timeout = next.server.shutdown_timeout;
        let kept = next.profiles.len() - coming.len();
        tracing::info!(
            added = coming.len(),
            removed = gone.len(),
            unchanged = kept,
            "reloaded {}",
            path.display()
        );
        *current = next;
    }

    /// The broker, for tests and status.
    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    /// Stops in order: stop accepting and drain requests, stop renewals, revoke every key
    /// concurrently, remove the socket. All within `shutdown_timeout`.
    pub async fn stop(self) -> StopReport {
        crate::systemd::stopping();
        let deadline = Instant::now() + self.shutdown_timeout;
        tracing::info!(
            timeout_seconds = self.shutdown_timeout.as_secs_f64(),
            "stopping: no new connections, draining requests"
        );
        self.stop_server.cancel();
        for server in self.servers {
            let _ = tokio::time::timeout_at(deadline, server).await;
        }
        tracing::info!("stopping: revoking keys");
        let report = self.broker.stop(deadline).await;
        if let Some(tokens) = &self.app.container {
            tokens.remove();
        }
        self.socket.remove();
        tracing::info!(
            revoked = report.revoked.len(),
            unrevoked = report.unrevoked.len(),
            kept = report.kept.len(),
            unsettled = ?report.unsettled,
            "stopped"
        );
        report
    }
}

/// What the daemon runs, wired from a config: each profile's provider, the socket and the
/// state directory. `serve` runs it; `keybroker sweep` recovers its state directory.
pub struct Setup {
    /// The config it came from; the running config that a reload compares against.
    pub config: Config,
    /// Each profile's provider and policy, built before anything is touched: a configuration
    /// error changes nothing.
    pub profiles: Vec<ProfileSpec>,
    /// The socket to bind, unless systemd passed one in `activated`.
    pub socket: PathBuf,
    /// The socket systemd passed (socket activation), taken before the runtime started.
    pub activated: Option<UnixListener>,
    /// The state directory: its lock, the ledger and the instance id.
    pub state_dir: PathBuf,
    /// `serve --dev`: keys live in memory only (the state directory is not touched) and
    /// there is no config file for SIGHUP to read again.
    pub dev: bool,
    /// The provider connections and pacers the profiles share; profiles a reload adds join them.
    pub upstreams: Arc<Upstreams>,
}

impl Setup {
    /// Wires `config`: builds each profile's provider (a bad `ca_file` fails here), resolves the
    /// socket and the state directory. Must run inside a tokio runtime.
    pub fn new(config: Config, clock: &Clock) -> Result<Self, DaemonError> {
        let upstreams = Arc::new(Upstreams::new(config.server.upstream_concurrency));
        let profiles = config
            .profiles
            .values()
            .map(|p| spec_from(p, clock, &upstreams))
            .collect::<Result<_, _>>()?;
        Ok(Setup {
            profiles,
            upstreams,
            socket: crate::paths::resolve_socket(None, config.server.socket.as_deref()),
            activated: None,
            state_dir: crate::paths::resolve_state_dir(config.server.state_dir.as_deref()),
            dev: false,
            config,
        })
    }

    /// `serve --dev`: the built-in `dev` profile, keys in memory only, nothing to reload.
    pub fn dev(clock: &Clock) -> Result<Self, DaemonError> {
        Ok(Setup {
            dev: true,
            ..Setup::new(crate::config::dev(), clock)?
        })
    }
}

/// One profile's provider and policy, ready for the broker.
fn spec_from(
    p: &crate::config::ProfileConfig,
    clock: &Clock,
    upstreams: &Upstreams,
) -> Result<ProfileSpec, DaemonError> {
    let provider = crate::provider::build(
        &p.credentials,
        &p.endpoint,
        p.ca_file.as_deref(),
        clock,
        upstreams,
    )
    .map_err(|source| DaemonError::Provider {
        profile: p.name.clone(),
        source,
    })?;
    Ok(ProfileSpec {
        name: p.name.clone(),
        provider,
        policy: p.policy,
        prewarm: p.prewarm,
        revoke_on_shutdown: p.revoke_on_shutdown,
        adopted: Vec::new(),
        unsettled: Vec::new(),
    })
}

/// Who may read each profile, and what its clients need, from the config.
pub fn access_from(config: &Config) -> Access {
    Access {
        daemon_uid: rustix::process::getuid().as_raw(),
        profiles: config
            .profiles
            .values()
            .map(|p| (p.name.clone(), (p.allow_uids.clone(), p.allow_gids.clone())))
            .collect(),
        clients: config
            .profiles
            .values()
            .map(|p| {
                let client = crate::api::ClientProfile {
                    name: p.name.clone(),
                    provider: p.provider.as_str().to_string(),
                    s3: crate::s3::settings(p.provider, &p.s3),
                    container: None,
                };
                (p.name.clone(), client)
            })
            .collect(),
        container_url: config
            .server
            .container_listen
            .map(|addr| format!("http://{addr}/v1/container-credentials/")),
    }
}

/// Longest start-up waits for prewarm before telling systemd it is ready.
const PREWARM_WAIT: Duration = Duration::from_secs(30);

/// The ledger and this broker's tag prefix, from the state directory.
pub struct State {
    /// The open ledger (holding the state directory's lock).
    pub ledger: Arc<Ledger>,
    /// `keybroker-<host>-<instance>-`.
    pub tag_prefix: String,
}

/// Opens the state directory at `dir` and revokes what an earlier run left: the start-up
/// recovery of `serve` (`daemon`: a daemon keeps running and adopts the keys it may keep) and
/// the whole of `keybroker sweep`. The returned state holds the directory's lock.
pub async fn recover_state(
    dir: &Path,
    profiles: &[ProfileSpec],
    clock: &Clock,
    daemon: bool,
) -> Result<(State, Recovery), DaemonError> {
    let state = open_state(dir)?;
    let targets = targets(profiles);
    let recovery = recover(&state.ledger, &targets, &state.tag_prefix, clock, daemon).await?;
    Ok((state, recovery))
}

/// Opens the state directory: takes its lock, opens the ledger, and reads (or makes) the
/// instance id that names this broker's keys.
fn open_state(dir: &Path) -> Result<State, DaemonError> {
    let ledger = Ledger::open(dir)?;
    let found = ledger
        .state_dir()
        .read(INSTANCE)?
        .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_string());
    let instance = match found {
        Some(id) if id.len() == 8 && id.bytes().all(|b| b.is_ascii_hexdigit()) => id,
        _ => {
            let id = format!("{:08x}", rand::random::<u32>());
            ledger
                .state_dir()
                .write(INSTANCE, format!("{id}\n").as_bytes())?;
            id
        }
    };
    Ok(State {
        ledger: Arc::new(ledger),
        tag_prefix: crate::broker::tag_prefix(&instance),
    })
}

/// The file in the state directory that holds the instance id.
const INSTANCE: &str = "instance";

/// The recovery targets: each profile's provider and stop policy.
fn targets(profiles: &[ProfileSpec]) -> BTreeMap<String, Target> {
    profiles
        .iter()
        .map(|p| {
            let target = Target {
                provider: Arc::clone(&p.provider),
                revoke_on_shutdown: p.revoke_on_shutdown,
            };
            (p.name.clone(), target)
        })
        .collect()
}

/// Runs the daemon `setup` describes until `stop` resolves, then shuts down. Outside dev mode,
/// the state directory's lock is taken and what an earlier run left is recovered before
/// serving.
pub async fn run(setup: Setup, stop: impl Future<Output = ()>) -> Result<StopReport, DaemonError> {
    // Before anything else: SIGHUP's default action ends the process, and a reload may come
    // while the daemon is still starting (it is then carried out once start-up is done).
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(DaemonError::Listener)?;
    let Setup {
        config,
        mut profiles,
        socket,
        activated,
        state_dir,
        dev,
        upstreams,
    } = setup;
    let mut broker = BrokerOptions::new(Clock::System);
    if !dev {
        let (state, recovery) = recover_state(&state_dir, &profiles, &broker.clock, true).await?;
        for line in &recovery.lines {
            tracing::warn!(state_dir = %state_dir.display(), "recovery: {line}");
        }
        tracing::info!(revoked = recovery.revoked, unfinished = recovery.unfinished, ledger = %state.ledger.path().display(), "recovery done");
        let (mut adopted, mut unsettled) = (recovery.adopted, recovery.unsettled);
        for p in &mut profiles {
            p.adopted = adopted.remove(&p.name).unwrap_or_default();
            p.unsettled = unsettled.remove(&p.name).unwrap_or_default();
        }
        broker.ledger = Some(state.ledger);
        broker.tag_prefix = state.tag_prefix;
    }
    let socket = match activated {
        Some(listener) => BoundSocket::activated(listener).map_err(DaemonError::Listener)?,
        None => server::bind_socket(
            &socket,
            config.server.socket_mode,
            config.server.socket_group,
        )?,
    };
    let socket_path = socket.path.clone();
    let names: Vec<String> = profiles.iter().map(|p| p.name.clone()).collect();
    let options = Options {
        access: access_from(&config),
        broker,
        shutdown_timeout: config.server.shutdown_timeout,
        container_listen: config.server.container_listen,
        upstreams,
    };
    let running = start(profiles, socket, options)?;
    tracing::info!(socket = %socket_path.display(), profiles = ?names, "serving");
    let reload_from = (!dev).then(|| config.path.clone());
    Ok(serve_until(running, config, reload_from, hangup, stop).await)
}

/// Serves until `stop` resolves, reloading the config from `reload_from` on each SIGHUP, then
/// stops `running`.
async fn serve_until(
    mut running: Running,
    mut config: Config,
    reload_from: Option<PathBuf>,
    mut hangup: tokio::signal::unix::Signal,
    stop: impl Future<Output = ()>,
) -> StopReport {
    let heartbeat = CancellationToken::new();
    let mut stop = std::pin::pin!(stop);
    // READY=1 once every prewarmed profile has a key (or has failed once); a stop signal
    // meanwhile goes straight to stop.
    let stopped_early = tokio::select! {
        _ = running.broker().prewarmed(Instant::now() + PREWARM_WAIT) => false,
        _ = &mut stop => true,
    };
    if !stopped_early {
        crate::systemd::ready(running.broker());
        crate::systemd::spawn_heartbeat(Arc::clone(running.broker()), heartbeat.clone());
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = hangup.recv() => match &reload_from {
                    Some(path) => running.reload(&mut config, path).await,
                    None => tracing::info!("SIGHUP: nothing to reload in dev mode"),
                },
            }
        }
    }
    heartbeat.cancel();
    running.stop().await
}

/// The most runtime worker threads the daemon runs.
const MAX_THREADS: usize = 4;

/// Runtime worker threads: one per core, at most [`MAX_THREADS`]. Serving pre-rendered bytes
/// needs few: without a cap, a 128-core GPU node would get 128, and their stacks, for a few
/// requests a second.
pub fn threads() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, MAX_THREADS)
}

/// Resolves when SIGTERM or SIGINT arrives.
///
/// The handlers are installed when this is called, not when the future is first polled: a
/// signal that arrives while the daemon starts (recovery, binding, the first requests) is then
/// held for the stop sequence instead of killing the process by its default action.
pub fn stop_signal() -> impl Future<Output = ()> + Send {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing the SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    }
}

/// Raises the soft open-file limit to the hard one: each waiting client holds a descriptor.
pub fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        let _ = setrlimit(Resource::Nofile, limit);
    }
}
