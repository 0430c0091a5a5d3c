//! One `[profiles.NAME]` table → [`ProfileConfig`]: keys that belong to other providers, the
//! provider's credentials, its endpoint, the renewal policy and who may read it. Checks run in
//! that order, and the first failing one is the error reported.

use std::ops::Range;
use std::time::Duration;

use toml::Spanned;

use super::secret::{read_secret, secret_path};
use super::{
    group_id, ConfigError, Located, ProfileConfig, RawProfile, S3Config, DEFAULT_LIFETIME,
    DEFAULT_MIN_REMAINING, SHORT_KEY_THRESHOLD,
};
use crate::broker::RenewPolicy;
use crate::paths::valid_profile_name;
use crate::provider::{ProviderCredentials, ProviderKind};

/// The profile being validated: where its errors point and how they read.
struct Profile<'a> {
    loc: &'a Located<'a>,
    name: &'a str,
    /// The whole `[profiles.NAME]` table, for errors about a key that is missing.
    table: Range<usize>,
    provider: ProviderKind,
}

impl Profile<'_> {
    /// An error at `span`, prefixed with the profile's name.
    fn at(&self, span: Range<usize>, what: impl std::fmt::Display) -> ConfigError {
        self.loc.at(span, format!("profile {}: {what}", self.name))
    }

    /// An error about a key the provider needs and the table lacks.
    fn needs(&self, key: &str) -> ConfigError {
        self.at(
            self.table.clone(),
            format!("provider {} needs {key}", self.provider),
        )
    }
}

/// Validates one profile table and applies its defaults.
pub(super) fn profile_config(
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
    let table = profile.span();
    let raw = profile.into_inner();
    let p = Profile {
        loc,
        name: name.get_ref(),
        table,
        provider: *raw.provider.get_ref(),
    };
    refuse_foreign_keys(&p, &raw)?;
    let credentials = credentials(&p, &raw)?;
    if let (ProviderCredentials::Coreweave { token: None, .. }, Some(true)) =
        (&credentials, raw.revoke_on_shutdown)
    {
        return Err(p.at(
            p.table.clone(),
            "revoke_on_shutdown = true needs token_file: without it keybroker cannot revoke keys",
        ));
    }
    let endpoint = endpoint(&p, &raw)?;
    let ca_file = raw
        .ca_file
        .as_ref()
        .map(|f| loc.beside_config(f.get_ref().clone()));
    let policy = renew_policy(&p, &raw)?;
    let (allow_uids, allow_gids) = access_lists(loc, &raw)?;
    let s3 = s3_config(&p, &raw)?;
    Ok(ProfileConfig {
        name: name.get_ref().clone(),
        provider: p.provider,
        endpoint,
        ca_file,
        credentials,
        policy,
        prewarm: raw.prewarm.unwrap_or(true),
        revoke_on_shutdown: raw.revoke_on_shutdown.unwrap_or(true),
        allow_uids,
        allow_gids,
        s3,
    })
}

/// CoreWeave's S3 endpoint inside its clusters (LOTA), which `s3_endpoint = "lota"` names.
pub const COREWEAVE_LOTA: &str = "http://cwlota.com";

/// The `s3_*` keys: an http(s) URL with a host (or `"lota"` on CoreWeave), a region of
/// printable characters without spaces, and `virtual` or `path`.
fn s3_config(p: &Profile<'_>, raw: &RawProfile) -> Result<S3Config, ConfigError> {
    let endpoint = match &raw.s3_endpoint {
        None => None,
        Some(v) if v.get_ref() == "lota" => {
            if p.provider != ProviderKind::Coreweave {
                return Err(p.at(
                    v.span(),
                    format!("s3_endpoint \"lota\" is CoreWeave's in-cluster endpoint, not provider {}'s; give a URL", p.provider),
                ));
            }
            Some(COREWEAVE_LOTA.to_string())
        }
        Some(v) => {
            let url = v.get_ref();
            let ok = url.parse::<http::Uri>().is_ok_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https"))
                    && u.host().is_some_and(|h| !h.is_empty())
            });
            if !ok {
                return Err(p.at(
                    v.span(),
                    format!(
                        "s3_endpoint {url:?} is not a URL like \"https://s3.example.com\"{}",
                        if p.provider == ProviderKind::Coreweave {
                            " (or \"lota\")"
                        } else {
                            ""
                        }
                    ),
                ));
            }
            Some(url.trim_end_matches('/').to_string())
        }
    };
    let region = match &raw.s3_region {
        None => None,
        Some(v) => {
            let region = v.get_ref();
            if region.is_empty() || !region.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(p.at(
                    v.span(),
                    format!("s3_region {region:?} must be one word of printable characters, like \"US-EAST-04A\""),
                ));
            }
            Some(region.clone())
        }
    };
    let addressing_style = match &raw.s3_addressing_style {
        None => None,
        Some(v) => match v.get_ref().as_str() {
            style @ ("virtual" | "path") => Some(style.to_string()),
            other => {
                return Err(p.at(
                    v.span(),
                    format!("s3_addressing_style {other:?} is not \"virtual\" or \"path\""),
                ))
            }
        },
    };
    Ok(S3Config {
        endpoint,
        region,
        addressing_style,
    })
}

/// Keys that belong to other providers are mistakes, not silently ignored settings.
fn refuse_foreign_keys(p: &Profile<'_>, raw: &RawProfile) -> Result<(), ConfigError> {
    use ProviderKind::{Coreweave, Crusoe, Glesys};
    let provider = p.provider;
    let span = |v: &Option<Spanned<String>>| v.as_ref().map(Spanned::span);
    let foreign: [(&str, Option<Range<usize>>, ProviderKind); 10] = [
        ("token_file", span(&raw.token_file), Coreweave),
        ("auth", span(&raw.auth), Coreweave),
        ("oidc_token_file", span(&raw.oidc_token_file), Coreweave),
        (
            "saml_assertion_file",
            span(&raw.saml_assertion_file),
            Coreweave,
        ),
        ("wif_config_id", span(&raw.wif_config_id), Coreweave),
        ("access_key_id", span(&raw.access_key_id), Crusoe),
        ("secret_key_file", span(&raw.secret_key_file), Crusoe),
        ("project", span(&raw.project), Glesys),
        ("api_key_file", span(&raw.api_key_file), Glesys),
        ("instance_id", span(&raw.instance_id), Glesys),
    ];
    for (key, span, owner) in foreign {
        if let Some(span) = span {
            if owner != provider {
                return Err(p.at(span, format!("{key} does not apply to provider {provider}")));
            }
        }
    }
    if let (Some(org), false) = (&raw.org_id, matches!(provider, Crusoe | Coreweave)) {
        return Err(p.at(
            org.span(),
            format!("org_id does not apply to provider {provider}"),
        ));
    }
    if let (Some(v), false) = (&raw.mint_delay, provider == ProviderKind::Dev) {
        return Err(p.at(
            v.span(),
            format!("mint_delay applies only to provider dev, not {provider}"),
        ));
    }
    if provider == ProviderKind::Dev {
        for (key, span) in [
            ("endpoint", raw.endpoint.as_ref().map(Spanned::span)),
            ("ca_file", raw.ca_file.as_ref().map(Spanned::span)),
        ] {
            if let Some(span) = span {
                return Err(p.at(span, format!("{key} does not apply to provider dev")));
            }
        }
    }
    Ok(())
}

/// The secrets (and, for dev, the settings) the profile's provider needs.
fn credentials(p: &Profile<'_>, raw: &RawProfile) -> Result<ProviderCredentials, ConfigError> {
    match p.provider {
        ProviderKind::Coreweave => coreweave_credentials(p, raw),
        ProviderKind::Crusoe => crusoe_credentials(p, raw),
        ProviderKind::Glesys => glesys_credentials(p, raw),
        ProviderKind::Dev => Ok(ProviderCredentials::Dev {
            mint_delay: match &raw.mint_delay {
                Some(v) => p.loc.duration(v, "mint_delay")?,
                None => Duration::ZERO,
            },
        }),
    }
}

/// CoreWeave's `auth` mode and what it needs: `api-token` (the default) mints with the API
/// access token; `oidc` and `saml` exchange an identity read from a file at each mint, and use
/// the token only to revoke and list.
fn coreweave_credentials(
    p: &Profile<'_>,
    raw: &RawProfile,
) -> Result<ProviderCredentials, ConfigError> {
    let mode = raw
        .auth
        .as_ref()
        .map_or("api-token", |a| a.get_ref().as_str());
    let only_with = |value: &Option<Spanned<String>>, key: &str, modes: &str| match value {
        Some(v) => Err(p.at(
            v.span(),
            format!(
                "{key} applies only with auth = {modes}, and this profile has auth = \"{mode}\""
            ),
        )),
        None => Ok(()),
    };
    let exchange = match mode {
        "api-token" => {
            only_with(&raw.org_id, "org_id", "\"oidc\" or \"saml\"")?;
            None
        }
        "oidc" | "saml" => {
            let org_id = raw.org_id.as_ref().ok_or_else(|| {
                p.needs(&format!("org_id with auth = \"{mode}\" (the organization id, on the Cloud Console's Settings page)"))
            })?;
            let org_id = non_empty(p, org_id, "org_id")?;
            Some(if mode == "oidc" {
                let file = raw.oidc_token_file.as_ref().ok_or_else(|| {
                    p.needs("oidc_token_file with auth = \"oidc\" (the file your identity provider writes the token to)")
                })?;
                non_empty(p, file, "oidc_token_file")?;
                crate::provider::coreweave::wif::Exchange::Oidc {
                    org_id,
                    token_file: secret_path(p.loc, file, "oidc_token_file")?,
                }
            } else {
                let file = raw.saml_assertion_file.as_ref().ok_or_else(|| {
                    p.needs("saml_assertion_file with auth = \"saml\" (the file holding the base64 SAML response)")
                })?;
                let config_id = raw.wif_config_id.as_ref().ok_or_else(|| {
                    p.needs("wif_config_id with auth = \"saml\" (the WIF configuration's id)")
                })?;
                non_empty(p, file, "saml_assertion_file")?;
                crate::provider::coreweave::wif::Exchange::Saml {
                    org_id,
                    assertion_file: secret_path(p.loc, file, "saml_assertion_file")?,
                    config_id: non_empty(p, config_id, "wif_config_id")?,
                }
            })
        }
        other => {
            let span = raw.auth.as_ref().map_or(p.table.clone(), Spanned::span);
            return Err(p.at(
                span,
                format!("auth {other:?} is not one of \"api-token\", \"oidc\", \"saml\""),
            ));
        }
    };
    if mode != "oidc" {
        only_with(&raw.oidc_token_file, "oidc_token_file", "\"oidc\"")?;
    }
    if mode != "saml" {
        only_with(&raw.saml_assertion_file, "saml_assertion_file", "\"saml\"")?;
        only_with(&raw.wif_config_id, "wif_config_id", "\"saml\"")?;
    }
    // Optional with an exchange: without it keys cannot be revoked, only left to expire.
    let token = match &raw.token_file {
        Some(file) => Some(read_secret(p.loc, file, "token_file")?),
        None if exchange.is_some() => None,
        None => return Err(p.needs("token_file (the CoreWeave API access token)")),
    };
    Ok(ProviderCredentials::Coreweave { token, exchange })
}

/// The value of `key`, refused when empty.
fn non_empty(p: &Profile<'_>, value: &Spanned<String>, key: &str) -> Result<String, ConfigError> {
    match value.get_ref().trim() {
        "" => Err(p.at(value.span(), format!("{key} is empty"))),
        v => Ok(v.to_string()),
    }
}

fn crusoe_credentials(
    p: &Profile<'_>,
    raw: &RawProfile,
) -> Result<ProviderCredentials, ConfigError> {
    let access_key_id = raw
        .access_key_id
        .as_ref()
        .ok_or_else(|| p.needs("access_key_id (the Crusoe API key id)"))?;
    let file = raw
        .secret_key_file
        .as_ref()
        .ok_or_else(|| p.needs("secret_key_file (the Crusoe API secret)"))?;
    let secret = read_secret(p.loc, file, "secret_key_file")?;
    crate::provider::crusoe::check_secret(&secret)
        .map_err(|e| p.at(file.span(), format!("secret_key_file: {e}")))?;
    Ok(ProviderCredentials::Crusoe {
        access_key_id: access_key_id.get_ref().clone(),
        secret,
        org_id: raw.org_id.as_ref().map(|o| o.get_ref().clone()),
    })
}

fn glesys_credentials(
    p: &Profile<'_>,
    raw: &RawProfile,
) -> Result<ProviderCredentials, ConfigError> {
    let project = raw
        .project
        .as_ref()
        .ok_or_else(|| p.needs("project (the project id, like \"CL12345\")"))?;
    let file = raw
        .api_key_file
        .as_ref()
        .ok_or_else(|| p.needs("api_key_file (the project's API key)"))?;
    let instance_id = raw
        .instance_id
        .as_ref()
        .ok_or_else(|| p.needs("instance_id (the object storage instance, like \"os-ab123\")"))?;
    Ok(ProviderCredentials::Glesys {
        project: project.get_ref().clone(),
        api_key: read_secret(p.loc, file, "api_key_file")?,
        instance_id: instance_id.get_ref().clone(),
    })
}

/// The provider API base URL: the one set, checked, or the provider's own.
fn endpoint(p: &Profile<'_>, raw: &RawProfile) -> Result<String, ConfigError> {
    if let Some(endpoint) = &raw.endpoint {
        check_endpoint(endpoint.get_ref()).map_err(|why| p.at(endpoint.span(), why))?;
        return Ok(endpoint.get_ref().clone());
    }
    Ok(match p.provider {
        ProviderKind::Coreweave => crate::provider::coreweave::DEFAULT_ENDPOINT.to_string(),
        ProviderKind::Crusoe => crate::provider::crusoe::DEFAULT_ENDPOINT.to_string(),
        ProviderKind::Glesys => crate::provider::glesys::DEFAULT_ENDPOINT.to_string(),
        ProviderKind::Dev => String::new(),
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

/// Who may read the profile: (uids, gids). Neither key set: the daemon's own user only (README,
/// "Who may read a profile"). Set: exactly what they say, so `allow_uids = []` allows no one.
fn access_lists(loc: &Located<'_>, raw: &RawProfile) -> Result<(Vec<u32>, Vec<u32>), ConfigError> {
    let mut allow_gids = Vec::new();
    for group in raw.allow_groups.iter().flatten() {
        allow_gids.push(group_id(loc, group, "allow_groups")?);
    }
    let allow_uids = match (&raw.allow_uids, &raw.allow_groups) {
        (None, None) => vec![rustix::process::getuid().as_raw()],
        (uids, _) => uids.clone().unwrap_or_default(),
    };
    Ok((allow_uids, allow_gids))
}

/// Lifetime, renewal point and serving floor, with their defaults, in an order that works:
/// `min_remaining < renew_before < lifetime <= the provider's maximum`.
fn renew_policy(p: &Profile<'_>, raw: &RawProfile) -> Result<RenewPolicy, ConfigError> {
    let lifetime = lifetime(p, raw)?;
    let renew_before = match &raw.renew_before {
        Some(v) => p.loc.duration(v, "renew_before")?,
        None => lifetime / 2,
    };
    let min_remaining = match &raw.min_remaining {
        Some(v) => p.loc.duration(v, "min_remaining")?,
        None => DEFAULT_MIN_REMAINING,
    };
    let policy = RenewPolicy {
        lifetime,
        renew_before,
        min_remaining,
    };
    check_order(p, raw, &policy)?;
    check_crusoe_renewal(p, raw, &policy)?;
    check_short_keys(p, raw, &policy)?;
    Ok(policy)
}

/// Where an error about `value` points: the value, or the table when it is not set.
fn span_or_table(p: &Profile<'_>, value: &Option<Spanned<String>>) -> Range<usize> {
    value.as_ref().map_or(p.table.clone(), Spanned::span)
}

/// The requested lifetime: more than zero, and within the provider's maximum.
fn lifetime(p: &Profile<'_>, raw: &RawProfile) -> Result<Duration, ConfigError> {
    let lifetime = match &raw.lifetime {
        Some(v) => p.loc.duration(v, "lifetime")?,
        None => DEFAULT_LIFETIME,
    };
    let span = span_or_table(p, &raw.lifetime);
    if lifetime.is_zero() {
        return Err(p.at(
            span,
            "lifetime must be greater than zero: keybroker never mints permanent keys",
        ));
    }
    if let Some(max) = p.provider.max_lifetime() {
        if lifetime > max {
            return Err(p.at(
                span,
                format!(
                    "lifetime ({}) exceeds {}'s maximum of {}",
                    show(lifetime),
                    p.provider,
                    show(max)
                ),
            ));
        }
    }
    Ok(lifetime)
}

/// `min_remaining < renew_before < lifetime`: a key is renewed before it expires, and before it
/// gets too short to serve.
fn check_order(p: &Profile<'_>, raw: &RawProfile, policy: &RenewPolicy) -> Result<(), ConfigError> {
    let RenewPolicy {
        lifetime,
        renew_before,
        min_remaining,
    } = *policy;
    if renew_before >= lifetime {
        return Err(p.at(
            span_or_table(p, &raw.renew_before),
            format!(
                "renew_before ({}) must be less than lifetime ({})",
                show(renew_before),
                show(lifetime)
            ),
        ));
    }
    if min_remaining >= renew_before {
        // The later of the two keys set, or the lifetime both default from.
        let span = match raw.min_remaining.as_ref().or(raw.renew_before.as_ref()) {
            Some(v) => v.span(),
            None => span_or_table(p, &raw.lifetime),
        };
        let min_default = match raw.min_remaining {
            Some(_) => "",
            None => " (the default for min_remaining)",
        };
        let renew_default = match raw.renew_before {
            Some(_) => "",
            None => " = lifetime/2, the default",
        };
        return Err(p.at(
            span,
            format!(
                "min_remaining ({}{min_default}) must be less than renew_before ({}{renew_default}): a key is renewed before it gets too short to serve",
                show(min_remaining),
                show(renew_before),
            ),
        ));
    }
    Ok(())
}

/// Crusoe allows two keys, so renewal must wait until the previous key has lived its life.
fn check_crusoe_renewal(
    p: &Profile<'_>,
    raw: &RawProfile,
    policy: &RenewPolicy,
) -> Result<(), ConfigError> {
    if p.provider == ProviderKind::Crusoe && policy.renew_before > policy.lifetime / 2 {
        return Err(p.at(
            span_or_table(p, &raw.renew_before),
            format!(
                "renew_before ({}) is more than half of lifetime ({}): Crusoe allows two keys, so each renewal revokes the previous retired key, which must be at the end of its life by then",
                show(policy.renew_before),
                show(policy.lifetime)
            ),
        ));
    }
    Ok(())
}

/// Keys served with under 16 minutes left need `allow_short_keys = true`.
fn check_short_keys(
    p: &Profile<'_>,
    raw: &RawProfile,
    policy: &RenewPolicy,
) -> Result<(), ConfigError> {
    if policy.min_remaining < SHORT_KEY_THRESHOLD && raw.allow_short_keys != Some(true) {
        return Err(p.at(
            span_or_table(p, &raw.min_remaining),
            format!(
                "min_remaining ({}) is under 16m: boto3 and aws-cli re-run credential_process on every call when a key has under 15 minutes left; raise it, or set allow_short_keys = true",
                show(policy.min_remaining)
            ),
        ));
    }
    Ok(())
}

fn show(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(d)
}

#[cfg(test)]
mod tests {
    use super::*;

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
