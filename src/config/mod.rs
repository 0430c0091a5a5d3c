//! Configuration: TOML → `RawConfig` (serde, every value spanned) → [`Config`] (validated,
//! defaults applied once, here). Every error carries `path:line:col`.
//!
//! This module holds the types, the file as a whole and `[server]`; `profile` validates one
//! `[profiles.NAME]` table, and `secret` reads the secret files a profile names.

mod profile;
mod secret;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::broker::RenewPolicy;
use crate::provider::{ProviderCredentials, ProviderKind};

/// Requested key lifetime when the profile sets none.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);
/// The least lifetime a served key may have: boto3 and aws-cli re-run the helper on every call
/// below 15 minutes left (README, "Why keys are served with at least 20 minutes left"), so 20 minutes leaves a margin.
pub const DEFAULT_MIN_REMAINING: Duration = Duration::from_secs(20 * 60);
/// `min_remaining` below this needs `allow_short_keys = true`.
pub const SHORT_KEY_THRESHOLD: Duration = Duration::from_secs(16 * 60);
/// Revoke budget at stop.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);
/// Socket file mode when the config sets none: the daemon's user only.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// `upstream_concurrency` when the file does not set it.
pub const DEFAULT_UPSTREAM_CONCURRENCY: usize = 8;

/// A configuration error, located in the file where possible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The config file.
    pub path: PathBuf,
    /// 1-based line and column of the offending text, when there is one.
    pub location: Option<(usize, usize)>,
    /// What is wrong and what to do, one line, lowercase.
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.location {
            Some((line, col)) => {
                write!(f, "{}:{line}:{col}: {}", self.path.display(), self.message)
            }
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from (`<dev>` for `serve --dev`).
    pub path: PathBuf,
    /// Daemon-wide settings.
    pub server: ServerConfig,
    /// Profiles by name.
    pub profiles: BTreeMap<String, ProfileConfig>,
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The socket path if the file sets one; otherwise [`crate::paths::resolve_socket`] decides.
    pub socket: Option<PathBuf>,
    /// Mode bits of the socket file.
    pub socket_mode: u32,
    /// Group owning the socket file, if set.
    pub socket_group: Option<u32>,
    /// Where the ledger will live (`$STATE_DIRECTORY`, else the XDG state dir).
    pub state_dir: Option<PathBuf>,
    /// Revoke budget at stop.
    pub shutdown_timeout: Duration,
    /// The loopback container-credentials endpoint's address, if enabled.
    pub container_listen: Option<SocketAddr>,
    /// At most this many calls in flight per provider endpoint and credential.
    pub upstream_concurrency: usize,
}

impl Default for ServerConfig {
    /// A config file without `[server]`: every key at its default.
    fn default() -> Self {
        ServerConfig {
            socket: None,
            socket_mode: DEFAULT_SOCKET_MODE,
            socket_group: None,
            state_dir: None,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            container_listen: None,
            upstream_concurrency: DEFAULT_UPSTREAM_CONCURRENCY,
        }
    }
}

/// `[profiles.NAME]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileConfig {
    /// The profile name: `[A-Za-z0-9_.-]+`.
    pub name: String,
    /// Which provider mints its keys.
    pub provider: ProviderKind,
    /// The provider API base URL.
    pub endpoint: String,
    /// Extra trust root for the provider API.
    pub ca_file: Option<PathBuf>,
    /// The secrets the provider needs, read from their files.
    pub credentials: ProviderCredentials,
    /// Lifetime, renewal point and serving floor.
    pub policy: RenewPolicy,
    /// Mint at start-up rather than on the first request.
    pub prewarm: bool,
    /// Revoke this profile's keys at stop.
    pub revoke_on_shutdown: bool,
    /// Peer uids allowed to read the profile (default: the daemon's own uid).
    pub allow_uids: Vec<u32>,
    /// Peer gids allowed to read the profile.
    pub allow_gids: Vec<u32>,
    /// The S3 settings clients get from `aws-config` and `exec` (`s3_*` keys), as written.
    pub s3: S3Config,
}

/// A profile's `s3_endpoint`, `s3_region` and `s3_addressing_style`, checked; the provider's
/// defaults fill the rest when a client asks (`crate::s3`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct S3Config {
    /// The S3 endpoint URL (`"lota"` is already CoreWeave's in-cluster URL here).
    pub endpoint: Option<String>,
    /// The region SDKs sign for.
    pub region: Option<String>,
    /// `virtual` or `path`.
    pub addressing_style: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: Option<RawServer>,
    #[serde(default)]
    profiles: BTreeMap<Spanned<String>, Spanned<RawProfile>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    socket: Option<Spanned<PathBuf>>,
    socket_mode: Option<Spanned<String>>,
    socket_group: Option<Spanned<toml::Value>>,
    state_dir: Option<Spanned<PathBuf>>,
    shutdown_timeout: Option<Spanned<String>>,
    upstream_concurrency: Option<Spanned<i64>>,
    container: Option<RawContainer>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawContainer {
    listen: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    provider: Spanned<ProviderKind>,
    endpoint: Option<Spanned<String>>,
    ca_file: Option<Spanned<PathBuf>>,
    token_file: Option<Spanned<String>>,
    auth: Option<Spanned<String>>,
    oidc_token_file: Option<Spanned<String>>,
    saml_assertion_file: Option<Spanned<String>>,
    wif_config_id: Option<Spanned<String>>,
    access_key_id: Option<Spanned<String>>,
    secret_key_file: Option<Spanned<String>>,
    org_id: Option<Spanned<String>>,
    project: Option<Spanned<String>>,
    api_key_file: Option<Spanned<String>>,
    instance_id: Option<Spanned<String>>,
    lifetime: Option<Spanned<String>>,
    renew_before: Option<Spanned<String>>,
    min_remaining: Option<Spanned<String>>,
    allow_short_keys: Option<bool>,
    prewarm: Option<bool>,
    revoke_on_shutdown: Option<bool>,
    allow_uids: Option<Vec<u32>>,
    allow_groups: Option<Vec<Spanned<toml::Value>>>,
    mint_delay: Option<Spanned<String>>,
    s3_endpoint: Option<Spanned<String>>,
    s3_region: Option<Spanned<String>>,
    s3_addressing_style: Option<Spanned<String>>,
}

/// Turns byte spans into located errors.
struct Located<'a> {
    path: &'a Path,
    src: &'a str,
}

impl Located<'_> {
    fn at(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        let start = span.start.min(self.src.len());
        let before = &self.src[..start];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        ConfigError {
            path: self.path.to_path_buf(),
            location: Some((line, col)),
            message: message.into(),
        }
    }

    fn duration(&self, value: &Spanned<String>, key: &str) -> Result<Duration, ConfigError> {
        humantime::parse_duration(value.get_ref()).map_err(|e| {
            self.at(
                value.span(),
                format!(
                    "{key} {:?} is not a duration ({e}); write it like \"90s\", \"20m\" or \"1h\"",
                    value.get_ref()
                ),
            )
        })
    }

    /// `path` as written, or relative to the config file's directory when it is relative.
    fn beside_config(&self, path: PathBuf) -> PathBuf {
        if path.is_relative() {
            self.path.parent().unwrap_or(Path::new(".")).join(path)
        } else {
            path
        }
    }
}

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let src = std::fs::read_to_string(path).map_err(|e| ConfigError {
        path: path.to_path_buf(),
        location: None,
        message: format!("cannot read the config file: {e}"),
    })?;
    parse(&src, path)
}

/// Validates config text; `path` names it in errors and anchors relative secret-file paths.
pub fn parse(src: &str, path: &Path) -> Result<Config, ConfigError> {
    let loc = Located { path, src };
    let raw: RawConfig = toml::from_str(src).map_err(|e| {
        let message = e
            .message()
            .replace("unknown field", "unknown key")
            .replace("expected one of", "expected one of the keys");
        match e.span() {
            Some(span) => loc.at(span, message),
            None => ConfigError {
                path: path.to_path_buf(),
                location: None,
                message,
            },
        }
    })?;
    let server = server_config(&loc, raw.server)?;
    if raw.profiles.is_empty() {
        return Err(ConfigError {
            path: path.to_path_buf(),
            location: None,
            message: "no [profiles.NAME] table: add one profile so keybroker has keys to serve"
                .into(),
        });
    }
    let mut profiles = BTreeMap::new();
    let mut crusoe_keys = Vec::new();
    for (name, profile) in raw.profiles {
        let key_span = profile.get_ref().access_key_id.as_ref().map(Spanned::span);
        let config = profile::profile_config(&loc, &name, profile)?;
        if let (ProviderCredentials::Crusoe { access_key_id, .. }, Some(span)) =
            (&config.credentials, key_span)
        {
            crusoe_keys.push((span, config.name.clone(), access_key_id.clone()));
        }
        profiles.insert(config.name.clone(), config);
    }
    one_profile_per_crusoe_user(&loc, crusoe_keys)?;
    Ok(Config {
        path: path.to_path_buf(),
        server,
        profiles,
    })
}

/// Refuses two Crusoe profiles on one API key. Its user holds at most two keys, but the broker
/// counts and makes room per profile: together the profiles would fill the budget, and one
/// making room could revoke the key the other is serving. The error points at the later
/// profile in the file. `keys` holds (where `access_key_id` is set, profile, access_key_id).
fn one_profile_per_crusoe_user(
    loc: &Located<'_>,
    mut keys: Vec<(Range<usize>, String, String)>,
) -> Result<(), ConfigError> {
    keys.sort_by_key(|(span, _, _)| span.start);
    for (i, (span, profile, key)) in keys.iter().enumerate() {
        if let Some((_, first, _)) = keys[..i].iter().find(|(_, _, k)| k == key) {
            return Err(loc.at(
                span.clone(),
                format!(
                    "profile {profile}: access_key_id {key:?} is also used by profile {first}: one Crusoe API user holds at most two keys, so the two profiles would use up and revoke each other's keys; give each profile its own Crusoe API key"
                ),
            ));
        }
    }
    Ok(())
}

fn server_config(loc: &Located<'_>, raw: Option<RawServer>) -> Result<ServerConfig, ConfigError> {
    let mut server = ServerConfig::default();
    let Some(raw) = raw else { return Ok(server) };
    if let Some(socket) = raw.socket {
        if !socket.get_ref().is_absolute() {
            return Err(loc.at(socket.span(), "socket must be an absolute path"));
        }
        server.socket = Some(socket.into_inner());
    }
    if let Some(mode) = raw.socket_mode {
        server.socket_mode = u32::from_str_radix(mode.get_ref(), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                loc.at(
                    mode.span(),
                    format!(
                        "socket_mode {:?} is not an octal file mode like \"0660\"",
                        mode.get_ref()
                    ),
                )
            })?;
    }
    if let Some(group) = raw.socket_group {
        server.socket_group = Some(group_id(loc, &group, "socket_group")?);
    }
    if let Some(dir) = raw.state_dir {
        if !dir.get_ref().is_absolute() {
            return Err(loc.at(dir.span(), "state_dir must be an absolute path"));
        }
        server.state_dir = Some(dir.into_inner());
    }
    if let Some(timeout) = raw.shutdown_timeout {
        server.shutdown_timeout = loc.duration(&timeout, "shutdown_timeout")?;
        if server.shutdown_timeout.is_zero() {
            return Err(loc.at(
                timeout.span(),
                "shutdown_timeout must be greater than zero: keys need time to be revoked",
            ));
        }
    }
    if let Some(n) = raw.upstream_concurrency {
        server.upstream_concurrency = usize::try_from(*n.get_ref())
            .ok()
            .filter(|n| (1..=1024).contains(n))
            .ok_or_else(|| {
                loc.at(
                    n.span(),
                    format!(
                        "upstream_concurrency {} must be 1 to 1024: the calls in flight at once to one provider endpoint",
                        n.get_ref()
                    ),
                )
            })?;
    }
    if let Some(container) = raw.container {
        let listen = &container.listen;
        let addr: SocketAddr = listen.get_ref().parse().map_err(|_| {
            loc.at(
                listen.span(),
                format!(
                    "listen {:?} is not an address like \"127.0.0.1:9911\"",
                    listen.get_ref()
                ),
            )
        })?;
        if !addr.ip().is_loopback() {
            return Err(loc.at(
                listen.span(),
                format!("listen {addr} is not a loopback address: the container endpoint serves keys to local SDKs only; use 127.0.0.1 or [::1]"),
            ));
        }
        server.container_listen = Some(addr);
    }
    Ok(server)
}

fn group_id(
    loc: &Located<'_>,
    value: &Spanned<toml::Value>,
    key: &str,
) -> Result<u32, ConfigError> {
    match value.get_ref() {
        toml::Value::Integer(n) => u32::try_from(*n)
            .map_err(|_| loc.at(value.span(), format!("{key}: {n} is not a group id"))),
        toml::Value::String(name) => {
            if let Ok(n) = name.parse::<u32>() {
                return Ok(n);
            }
            crate::users::group_by_name(name).ok_or_else(|| {
                loc.at(
                    value.span(),
                    format!("{key}: no group named {name:?} in /etc/group"),
                )
            })
        }
        other => Err(loc.at(
            value.span(),
            format!(
                "{key}: expected a group name or id, found {}",
                other.type_str()
            ),
        )),
    }
}

/// The configuration `serve --dev` uses: one `dev` profile, default socket, no files.
pub fn dev() -> Config {
    let profile = ProfileConfig {
        name: "dev".into(),
        provider: ProviderKind::Dev,
        endpoint: String::new(),
        ca_file: None,
        credentials: ProviderCredentials::Dev {
            mint_delay: Duration::ZERO,
        },
        policy: RenewPolicy {
            lifetime: DEFAULT_LIFETIME,
            renew_before: DEFAULT_LIFETIME / 2,
            min_remaining: DEFAULT_MIN_REMAINING,
        },
        prewarm: true,
        revoke_on_shutdown: true,
        allow_uids: vec![rustix::process::getuid().as_raw()],
        allow_gids: Vec::new(),
        s3: S3Config::default(),
    };
    Config {
        path: PathBuf::from("<dev>"),
        server: ServerConfig::default(),
        profiles: BTreeMap::from([("dev".to_string(), profile)]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(src: &str) -> ConfigError {
        parse(src, Path::new("k.toml")).unwrap_err()
    }

    #[test]
    fn dev_profile_parses_with_defaults() {
        let c = parse("[profiles.d]\nprovider = \"dev\"\n", Path::new("k.toml")).unwrap();
        let p = &c.profiles["d"];
        assert_eq!(p.policy.lifetime, DEFAULT_LIFETIME);
        assert_eq!(p.policy.renew_before, DEFAULT_LIFETIME / 2);
        assert_eq!(p.policy.min_remaining, DEFAULT_MIN_REMAINING);
        assert!(p.prewarm && p.revoke_on_shutdown);
        assert_eq!(c.server.socket_mode, 0o600);
    }

    #[test]
    fn errors_carry_line_and_column() {
        let e = err("[profiles.d]\nprovider = \"dev\"\nlifetime = \"1h\"\nrenew_before = \"2h\"\n");
        assert_eq!(e.location, Some((4, 16)));
        assert!(
            e.message
                .contains("renew_before (2h) must be less than lifetime (1h)"),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "k.toml:4:16: profile d: renew_before (2h) must be less than lifetime (1h)"
        );
    }
}
