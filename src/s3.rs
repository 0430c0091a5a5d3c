//! What SDKs need to reach a profile's S3 service (README, "Client setup"): the profile's
//! `s3_*` settings over its provider's defaults, and, where no default can be known, the
//! setting to add.
//!
//! - CoreWeave: `https://cwobject.com`, virtual-hosted bucket names (it refuses path style,
//!   which SDKs pick for a custom endpoint); the region is an availability zone.
//! - Crusoe: the endpoint and region name a location; no default.
//! - GleSYS: the endpoint names a data centre; any region signs (it is ignored), path style
//!   works, and checksums only when required (assumed: a third-party configuration turns the
//!   default checksums off).
//! - dev: what the profile says, nothing else.

use crate::api::{MissingSetting, S3Settings};
use crate::config::S3Config;
use crate::provider::ProviderKind;

/// CoreWeave's S3 endpoint outside its clusters.
pub const COREWEAVE_ENDPOINT: &str = "https://cwobject.com";

/// The settings a client gets for a `provider` profile whose `s3_*` keys are `config`.
pub fn settings(provider: ProviderKind, config: &S3Config) -> S3Settings {
    let (endpoint, region, style, checksums) = match provider {
        ProviderKind::Coreweave => (Some(COREWEAVE_ENDPOINT), None, Some("virtual"), false),
        ProviderKind::Glesys => (None, Some("us-east-1"), Some("path"), true),
        ProviderKind::Crusoe | ProviderKind::Dev => (None, None, None, false),
    };
    let mut s3 = S3Settings {
        endpoint: config.endpoint.clone().or(endpoint.map(String::from)),
        region: config.region.clone().or(region.map(String::from)),
        addressing_style: config.addressing_style.clone().or(style.map(String::from)),
        checksums_when_required: checksums,
        missing: Vec::new(),
    };
    let (endpoint_hint, region_hint) = match provider {
        ProviderKind::Coreweave => (
            None,
            Some("s3_region = \"US-EAST-04A\" (your availability zone)"),
        ),
        ProviderKind::Crusoe => (
            Some("s3_endpoint = \"https://object.us-east1-a.crusoecloudcompute.com\" (your location)"),
            Some("s3_region = \"us-east1-a\" (your location)"),
        ),
        ProviderKind::Glesys => (
            Some("s3_endpoint = \"https://objects.dc-sto1.glesys.net\" (your data centre)"),
            None,
        ),
        ProviderKind::Dev => (None, None),
    };
    for (setting, known, hint) in [
        ("endpoint_url", s3.endpoint.is_some(), endpoint_hint),
        ("region", s3.region.is_some(), region_hint),
    ] {
        if let (false, Some(hint)) = (known, hint) {
            s3.missing.push(MissingSetting {
                setting: setting.into(),
                add: hint.into(),
            });
        }
    }
    s3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_defaults_fill_what_the_profile_leaves_out() {
        let none = S3Config::default();
        let cw = settings(ProviderKind::Coreweave, &none);
        assert_eq!(cw.endpoint.as_deref(), Some("https://cwobject.com"));
        assert_eq!(cw.addressing_style.as_deref(), Some("virtual"));
        assert_eq!(cw.region, None);
        assert_eq!(cw.missing.len(), 1);
        assert_eq!(cw.missing[0].setting, "region");

        let crusoe = settings(ProviderKind::Crusoe, &none);
        let missing: Vec<&str> = crusoe.missing.iter().map(|m| m.setting.as_str()).collect();
        assert_eq!(missing, ["endpoint_url", "region"]);

        let glesys = settings(ProviderKind::Glesys, &none);
        assert!(glesys.checksums_when_required);
        assert_eq!(glesys.region.as_deref(), Some("us-east-1"));
        assert!(glesys.missing[0].add.starts_with("s3_endpoint = "));

        let set = S3Config {
            endpoint: Some("http://cwlota.com".into()),
            region: Some("US-EAST-04A".into()),
            addressing_style: Some("path".into()),
        };
        let cw = settings(ProviderKind::Coreweave, &set);
        assert_eq!(cw.endpoint.as_deref(), Some("http://cwlota.com"));
        assert_eq!(cw.addressing_style.as_deref(), Some("path"));
        assert!(cw.missing.is_empty());
        assert_eq!(settings(ProviderKind::Dev, &none), S3Settings::default());
    }
}
