//! Configuration: TOML → [`RawConfig`] (serde, every value spanned) → [`Config`] (validated,
//! defaults applied once, here). Every error carries `path:line:col`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::broker::RenewPolicy;
use crate::credentials::Secret;
use crate::paths::valid_profile_name;
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
    /// The socket path if the file sets one; otherwise [`resolve_socket`] decides.
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
}

fn show(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(d)
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
        let config = profile_config(&loc, &name, profile)?;
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
    let mut server = ServerConfig {
        socket: None,
        socket_mode: DEFAULT_SOCKET_MODE,
        socket_group: None,
        state_dir: None,
        shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
        container_listen: None,
    };
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

/// A provider-specific key: its name, where it was set, and the providers it belongs to.
type ForeignKey = (&'static str, Option<Range<usize>>, &'static [ProviderKind]);

fn profile_config(
    loc: &Located<'_>,
    name: &Spanned<String>,
    profile: Spanned<RawProfile>,
) -> Result<ProfileConfig, ConfigError> {
    if !valid_profile_name(name.get_ref()) {
        return Err(loc.at(
            name.span(),
            format!(
                "profile name {:?} may contain only letters, digits, '_', '.' and '-'",
                name.get_ref()
            ),
        ));
    }
    let table_span = profile.span();
    let raw = profile.into_inner();
    let name = name.get_ref().clone();
    let provider = *raw.provider.get_ref();
    let in_profile = |what: String| format!("profile {name}: {what}");

    // Keys that belong to other providers are mistakes, not silently ignored settings.
    let foreign: [ForeignKey; 7] = [
        (
            "token_file",
            raw.token_file.as_ref().map(Spanned::span),
            &[ProviderKind::Coreweave],
        ),
        (
            "access_key_id",
            raw.access_key_id.as_ref().map(Spanned::span),
            &[ProviderKind::Crusoe],
        ),
        (
            "secret_key_file",
            raw.secret_key_file.as_ref().map(Spanned::span),
            &[ProviderKind::Crusoe],
        ),
        (
            "org_id",
            raw.org_id.as_ref().map(Spanned::span),
            &[ProviderKind::Crusoe],
        ),
        (
            "project",
            raw.project.as_ref().map(Spanned::span),
            &[ProviderKind::Glesys],
        ),
        (
            "api_key_file",
            raw.api_key_file.as_ref().map(Spanned::span),
            &[ProviderKind::Glesys],
        ),
        (
            "instance_id",
            raw.instance_id.as_ref().map(Spanned::span),
            &[ProviderKind::Glesys],
        ),
    ];
    for (key, span, owners) in foreign {
        if let Some(span) = span {
            if !owners.contains(&provider) {
                return Err(loc.at(
                    span,
                    in_profile(format!("{key} does not apply to provider {provider}")),
                ));
            }
        }
    }
    if let (Some(v), false) = (&raw.mint_delay, provider == ProviderKind::Dev) {
        return Err(loc.at(
            v.span(),
            in_profile(format!(
                "mint_delay applies only to provider dev, not {provider}"
            )),
        ));
    }
    if provider == ProviderKind::Dev {
        for (key, span) in [
            ("endpoint", raw.endpoint.as_ref().map(Spanned::span)),
            ("ca_file", raw.ca_file.as_ref().map(Spanned::span)),
        ] {
            if let Some(span) = span {
                return Err(loc.at(
                    span,
                    in_profile(format!("{key} does not apply to provider dev")),
                ));
            }
        }
    }

    let credentials = match provider {
        ProviderKind::Coreweave => {
            let Some(file) = &raw.token_file else {
                return Err(loc.at(
                    table_span,
                    in_profile(
                        "provider coreweave needs token_file (the CoreWeave API access token)"
                            .into(),
                    ),
                ));
            };
            ProviderCredentials::Coreweave {
                token: read_secret(loc, file, "token_file")?,
            }
        }
        ProviderKind::Dev => ProviderCredentials::Dev {
            mint_delay: match &raw.mint_delay {
                Some(v) => loc.duration(v, "mint_delay")?,
                None => Duration::ZERO,
            },
        },
        ProviderKind::Crusoe => {
            let need = |key: &str| {
                loc.at(
                    table_span.clone(),
                    in_profile(format!("provider crusoe needs {key}")),
                )
            };
            let access_key_id = raw
                .access_key_id
                .as_ref()
                .ok_or_else(|| need("access_key_id (the Crusoe API key id)"))?;
            let file = raw
                .secret_key_file
                .as_ref()
                .ok_or_else(|| need("secret_key_file (the Crusoe API secret)"))?;
            let secret = read_secret(loc, file, "secret_key_file")?;
            crate::provider::crusoe::check_secret(&secret)
                .map_err(|e| loc.at(file.span(), in_profile(format!("secret_key_file: {e}"))))?;
            ProviderCredentials::Crusoe {
                access_key_id: access_key_id.get_ref().clone(),
                secret,
                org_id: raw.org_id.as_ref().map(|o| o.get_ref().clone()),
            }
        }
        ProviderKind::Glesys => {
            let need = |key: &str| {
                loc.at(
                    table_span.clone(),
                    in_profile(format!("provider glesys needs {key}")),
                )
            };
            let project = raw
                .project
                .as_ref()
                .ok_or_else(|| need("project (the project id, like \"CL12345\")"))?;
            let file = raw
                .api_key_file
                .as_ref()
                .ok_or_else(|| need("api_key_file (the project's API key)"))?;
            let instance_id = raw.instance_id.as_ref().ok_or_else(|| {
                need("instance_id (the object storage instance, like \"os-ab123\")")
            })?;
            ProviderCredentials::Glesys {
                project: project.get_ref().clone(),
                api_key: read_secret(loc, file, "api_key_file")?,
                instance_id: instance_id.get_ref().clone(),
            }
        }
    };

    let endpoint = match &raw.endpoint {
        Some(endpoint) => {
            check_endpoint(endpoint.get_ref())
                .map_err(|why| loc.at(endpoint.span(), in_profile(why)))?;
            endpoint.get_ref().clone()
        }
        None => match provider {
            ProviderKind::Coreweave => crate::provider::coreweave::DEFAULT_ENDPOINT.to_string(),
            ProviderKind::Crusoe => crate::provider::crusoe::DEFAULT_ENDPOINT.to_string(),
            ProviderKind::Glesys => crate::provider::glesys::DEFAULT_ENDPOINT.to_string(),
            ProviderKind::Dev => String::new(),
        },
    };
    let ca_file = raw.ca_file.as_ref().map(|f| {
        let p = f.get_ref().clone();
        if p.is_relative() {
            loc.path.parent().unwrap_or(Path::new(".")).join(p)
        } else {
            p
        }
    });

    let policy = renew_policy(loc, &raw, provider, table_span.clone(), &in_profile)?;

    let mut allow_gids = Vec::new();
    for group in raw.allow_groups.iter().flatten() {
        allow_gids.push(group_id(loc, group, "allow_groups")?);
    }
    // Neither key set: the daemon's own user only (README, "Who may read a profile"). Set: exactly what they say,
    // so `allow_uids = []` allows no one.
    let allow_uids = match (&raw.allow_uids, &raw.allow_groups) {
        (None, None) => vec![rustix::process::getuid().as_raw()],
        (uids, _) => uids.clone().unwrap_or_default(),
    };
    Ok(ProfileConfig {
        name,
        provider,
        endpoint,
        ca_file,
        credentials,
        policy,
        prewarm: raw.prewarm.unwrap_or(true),
        revoke_on_shutdown: raw.revoke_on_shutdown.unwrap_or(true),
        allow_uids,
        allow_gids,
    })
}

fn renew_policy(
    loc: &Located<'_>,
    raw: &RawProfile,
    provider: ProviderKind,
    table_span: Range<usize>,
    in_profile: &dyn Fn(String) -> String,
) -> Result<RenewPolicy, ConfigError> {
    let span_of =
        |v: &Option<Spanned<String>>| v.as_ref().map_or(table_span.clone(), Spanned::span);
    let lifetime = match &raw.lifetime {
        Some(v) => loc.duration(v, "lifetime")?,
        None => DEFAULT_LIFETIME,
    };
    let lifetime_span = span_of(&raw.lifetime);
    if lifetime.is_zero() {
        return Err(loc.at(
            lifetime_span,
            in_profile(
                "lifetime must be greater than zero: keybroker never mints permanent keys".into(),
            ),
        ));
    }
    if let Some(max) = provider.max_lifetime() {
        if lifetime > max {
            return Err(loc.at(
                lifetime_span,
                in_profile(format!(
                    "lifetime ({}) exceeds {provider}'s maximum of {}",
                    show(lifetime),
                    show(max)
                )),
            ));
        }
    }
    let renew_before = match &raw.renew_before {
        Some(v) => loc.duration(v, "renew_before")?,
        None => lifetime / 2,
    };
    let min_remaining = match &raw.min_remaining {
        Some(v) => loc.duration(v, "min_remaining")?,
        None => DEFAULT_MIN_REMAINING,
    };
    let defaulted = |key: &str, v: &Option<Spanned<String>>| {
        if v.is_some() {
            String::new()
        } else {
            format!(" (the default for {key})")
        }
    };
    if renew_before >= lifetime {
        return Err(loc.at(
            span_of(&raw.renew_before),
            in_profile(format!(
                "renew_before ({}) must be less than lifetime ({})",
                show(renew_before),
                show(lifetime)
            )),
        ));
    }
    if min_remaining >= renew_before {
        let span = if raw.min_remaining.is_some() {
            span_of(&raw.min_remaining)
        } else {
            span_of(&raw.renew_before)
        };
        return Err(loc.at(
            if raw.renew_before.is_none() && raw.min_remaining.is_none() { lifetime_span } else { span },
            in_profile(format!(
                "min_remaining ({}{}) must be less than renew_before ({}{}): a key is renewed before it gets too short to serve",
                show(min_remaining),
                defaulted("min_remaining", &raw.min_remaining),
                show(renew_before),
                if raw.renew_before.is_some() { String::new() } else { " = lifetime/2, the default".to_string() },
            )),
        ));
    }
    if provider == ProviderKind::Crusoe && renew_before > lifetime / 2 {
        return Err(loc.at(
            span_of(&raw.renew_before),
            in_profile(format!(
                "renew_before ({}) is more than half of lifetime ({}): Crusoe allows two keys, so each renewal revokes the previous retired key, which must be at the end of its life by then",
                show(renew_before),
                show(lifetime)
            )),
        ));
    }
    if min_remaining < SHORT_KEY_THRESHOLD && raw.allow_short_keys != Some(true) {
        return Err(loc.at(
            span_of(&raw.min_remaining),
            in_profile(format!(
                "min_remaining ({}) is under 16m: boto3 and aws-cli re-run credential_process on every call when a key has under 15 minutes left; raise it, or set allow_short_keys = true",
                show(min_remaining)
            )),
        ));
    }
    Ok(RenewPolicy {
        lifetime,
        renew_before,
        min_remaining,
    })
}

/// Checks a provider endpoint URL: http(s), and plain http only to a loopback host.
fn check_endpoint(url: &str) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| format!("endpoint {url:?} is not a URL like \"https://api.example.com\""))?;
    let host = uri
        .host()
        .ok_or_else(|| format!("endpoint {url:?} has no host"))?;
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") => {
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            let loopback = bare == "localhost"
                || bare
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if loopback {
                Ok(())
            } else {
                Err(format!(
                    "endpoint {url:?} uses plain http to a host that is not loopback: tokens would cross the network in the clear; use https"
                ))
            }
        }
        _ => Err(format!("endpoint {url:?} must start with https://")),
    }
}

/// Reads a secret file: `name` without '/' is looked up in `$CREDENTIALS_DIRECTORY` (systemd
/// `LoadCredential=`), a relative path is relative to the config file. The file must not be
/// readable or writable by group or others, and must belong to root or to the uid running
/// keybroker.
fn read_secret(
    loc: &Located<'_>,
    value: &Spanned<String>,
    key: &str,
) -> Result<Secret, ConfigError> {
    let raw = value.get_ref();
    let credential = !raw.contains('/');
    let path = if !credential {
        let p = PathBuf::from(raw);
        if p.is_relative() {
            loc.path.parent().unwrap_or(Path::new(".")).join(p)
        } else {
            p
        }
    } else {
        match std::env::var_os("CREDENTIALS_DIRECTORY") {
            Some(dir) => PathBuf::from(dir).join(raw),
            None => {
                return Err(loc.at(
                    value.span(),
                    format!("{key} {raw:?} has no '/', so it names a systemd credential, but $CREDENTIALS_DIRECTORY is not set; give a path such as \"/etc/keybroker/{raw}\""),
                ))
            }
        }
    };
    let err = |what: String| loc.at(value.span(), format!("{key} {}: {what}", path.display()));
    // Checked and read through one descriptor, so the file checked is the file read.
    let mut file = std::fs::File::open(&path).map_err(|e| err(e.to_string()))?;
    let meta = file.metadata().map_err(|e| err(e.to_string()))?;
    let mode = meta.permissions().mode() & 0o777;
    // systemd may give the service's user a root-owned credential through an ACL, which `ls`
    // shows as group bits (0440, group root); nobody else can read it or write in that
    // directory.
    let systemd_acl = credential && meta.uid() == 0 && meta.gid() == 0 && mode & 0o037 == 0;
    if mode & 0o077 != 0 && !systemd_acl {
        return Err(err(format!(
            "readable by group or others (mode {mode:04o}); a secret file must be private: chmod 600 {}",
            path.display()
        )));
    }
    // As sshd requires of its host keys: a file another user owns is one that user can swap
    // for a token of their own, and the daemon would then act with it on their behalf.
    // systemd's $CREDENTIALS_DIRECTORY files belong to root, or to the service's user.
    let runner = rustix::process::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != runner {
        let who = if runner == 0 {
            "root".to_string()
        } else {
            format!(
                "root or to {}, which runs keybroker",
                crate::files::describe_uid(runner)
            )
        };
        return Err(err(format!(
            "owned by {}, who could swap the secret; a secret file must belong to {who}: chown root {}",
            crate::files::describe_uid(meta.uid()),
            path.display()
        )));
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut file, &mut text).map_err(|e| err(e.to_string()))?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(err("the file is empty".into()));
    }
    Ok(Secret::new(secret))
}

/// A group given by number or by name (looked up in /etc/group).
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
    };
    Config {
        path: PathBuf::from("<dev>"),
        server: ServerConfig {
            socket: None,
            socket_mode: DEFAULT_SOCKET_MODE,
            socket_group: None,
            state_dir: None,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            container_listen: None,
        },
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

    #[test]
    fn endpoint_rules() {
        assert!(check_endpoint("https://api.coreweave.com").is_ok());
        assert!(check_endpoint("http://127.0.0.1:8080").is_ok());
        assert!(check_endpoint("http://[::1]:8080").is_ok());
        assert!(check_endpoint("http://localhost:1").is_ok());
        assert!(check_endpoint("http://api.coreweave.com").is_err());
        assert!(check_endpoint("ftp://x").is_err());
    }
}
