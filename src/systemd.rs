//! systemd integration: readiness, status lines, watchdog pings, the stop notice, and socket
//! activation. Each is a no-op outside systemd (no `NOTIFY_SOCKET`, no `LISTEN_FDS`).

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::api::State;
use crate::broker::Broker;

/// How often STATUS= is refreshed when there is no watchdog to piggyback on.
const STATUS_PERIOD: Duration = Duration::from_secs(10);

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "could not notify systemd");
    }
}

/// `STATUS=` line: how many profiles are in which state, and how many keys are held.
pub fn status_line(broker: &Broker) -> String {
    let status = broker.status();
    let count = |state: State| status.iter().filter(|(_, _, s)| s.state == state).count();
    let keys: usize = status
        .iter()
        .map(|(_, _, s)| usize::from(s.key_id.is_some()) + s.retired_keys)
        .sum();
    format!(
        "{} profiles: {} ready, {} degraded, {} unavailable; {keys} keys held",
        status.len(),
        count(State::Ready) + count(State::Renewing),
        count(State::Degraded),
        count(State::Unavailable)
    )
}

/// READY=1 with the first status: sent once recovery and prewarm are done.
pub fn ready(broker: &Broker) {
    notify(&[
        NotifyState::Ready,
        NotifyState::Status(&status_line(broker)),
    ]);
}

/// STOPPING=1: sent first thing at stop.
pub fn stopping() {
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: revoking keys"),
    ]);
}

/// Pings the watchdog at half its interval (WATCHDOG=1) and refreshes STATUS=, until `stop`.
/// Runs only under systemd's notify protocol.
pub fn spawn_heartbeat(broker: Arc<Broker>, stop: CancellationToken) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let watchdog = sd_notify::watchdog_enabled();
    let period = watchdog.map_or(STATUS_PERIOD, |w| w / 2);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
            let status = status_line(&broker);
            if watchdog.is_some() {
                notify(&[NotifyState::Watchdog, NotifyState::Status(&status)]);
            } else {
                notify(&[NotifyState::Status(&status)]);
            }
        }
    });
}

/// The listening socket systemd passed (socket activation), if any. Call before any thread
/// starts: it reads and clears `LISTEN_FDS`/`LISTEN_PID`.
pub fn activated_socket() -> std::io::Result<Option<std::os::unix::net::UnixListener>> {
    listenfd::ListenFd::from_env().take_unix_listener(0)
}
