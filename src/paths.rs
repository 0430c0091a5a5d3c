//! Where keybroker's files are, and which names a profile may have: what the daemon and its
//! clients must agree on, without the config parser.

use std::path::{Path, PathBuf};

/// The config file when neither `--config` nor `$KEYBROKER_CONFIG` names one.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/keybroker/keybroker.toml";

/// Whether `name` can name a profile: `[A-Za-z0-9_.-]+`, so that it goes into a URL path and
/// a request line as it is.
pub fn valid_profile_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The config file to use: `--config`, else `$KEYBROKER_CONFIG`, else the system default.
pub fn resolve_config_path(flag: Option<&Path>) -> PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(|| std::env::var_os("KEYBROKER_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH))
}

/// The state directory (ledger, lock, instance id): the config's `state_dir`, else
/// `$STATE_DIRECTORY` (systemd `StateDirectory=`), else `/var/lib/keybroker` for root, else
/// `$XDG_STATE_HOME/keybroker`, else `~/.local/state/keybroker`.
pub fn resolve_state_dir(configured: Option<&Path>) -> PathBuf {
    if let Some(p) = configured {
        return p.to_path_buf();
    }
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = std::env::var("STATE_DIRECTORY")
        .ok()
        .and_then(|v| v.split(':').next().map(PathBuf::from))
        .filter(|p| !p.as_os_str().is_empty())
    {
        return dir;
    }
    if rustix::process::getuid().is_root() {
        return PathBuf::from("/var/lib/keybroker");
    }
    if let Some(dir) = env("XDG_STATE_HOME") {
        return dir.join("keybroker");
    }
    match env("HOME") {
        Some(home) => home.join(".local/state/keybroker"),
        None => PathBuf::from(format!(
            "/tmp/keybroker-state-{}",
            rustix::process::getuid().as_raw()
        )),
    }
}

/// The system daemon's socket, the default for root.
pub const SYSTEM_SOCKET: &str = "/run/keybroker/keybroker.sock";

/// The socket `serve` binds: `$KEYBROKER_SOCKET`, else the config file's
/// `socket`, else the per-user default ([`default_socket`]).
pub fn resolve_socket(flag: Option<&Path>, configured: Option<&Path>) -> PathBuf {
    explicit_socket(flag)
        .or_else(|| configured.map(Path::to_path_buf))
        .unwrap_or_else(default_socket)
}

/// The socket clients connect to: `--socket`, else `$KEYBROKER_SOCKET`, else the per-user
/// default, except that a non-root user with no daemon of their own reaches the system
/// daemon at [`SYSTEM_SOCKET`] without flags.
pub fn resolve_client_socket(flag: Option<&Path>) -> PathBuf {
    explicit_socket(flag).unwrap_or_else(implicit_client_socket)
}

/// The socket a client finds with neither `--socket` nor `$KEYBROKER_SOCKET`: the per-user
/// default, or [`SYSTEM_SOCKET`] for a non-root user with no daemon of their own.
pub fn implicit_client_socket() -> PathBuf {
    let own = default_socket();
    let system = Path::new(SYSTEM_SOCKET);
    if !own.exists() && system.exists() {
        return system.to_path_buf();
    }
    own
}

fn explicit_socket(flag: Option<&Path>) -> Option<PathBuf> {
    flag.map(Path::to_path_buf).or_else(|| {
        std::env::var_os("KEYBROKER_SOCKET")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    })
}

/// `/run/keybroker/keybroker.sock` for root, else `$XDG_RUNTIME_DIR/keybroker/keybroker.sock`,
/// else `/tmp/keybroker-$UID/keybroker.sock`.
pub fn default_socket() -> PathBuf {
    let uid = rustix::process::getuid().as_raw();
    if uid == 0 {
        return PathBuf::from(SYSTEM_SOCKET);
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir).join("keybroker/keybroker.sock");
    }
    PathBuf::from(format!("/tmp/keybroker-{uid}/keybroker.sock"))
}
