//! `keybroker exec --profile P -- COMMAND [ARGS...]`: replaces itself with COMMAND, whose
//! environment gives it the profile's keys and S3 settings, with no AWS config file needed.
//!
//! The keys come through the container endpoint when the daemon serves one for the profile and
//! the caller can read its token file: the SDK then fetches fresh keys as they renew, so a
//! command may run for days. Otherwise the current key is put in the environment with its
//! expiry, and a warning says when it ends.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use crate::api::ClientProfile;
use crate::credentials::ProcessJson;

/// Set in COMMAND's environment to the profile's name: a `keybroker exec` inside refuses.
pub const MARK: &str = "KEYBROKER_EXEC";

/// Exit status when keybroker fails before COMMAND runs, as `env` and `timeout` do.
pub const EXIT_FAILED: u8 = 125;
/// COMMAND was found but could not be run.
pub const EXIT_CANNOT_RUN: u8 = 126;
/// COMMAND was not found.
pub const EXIT_NOT_FOUND: u8 = 127;

/// Variables through which COMMAND's SDK would take other credentials or another profile.
const CLEARED: &[&str] = &[
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_CREDENTIAL_EXPIRATION",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
];

/// Runs `command` with `profile`'s keys. Returns only if it could not: the exit status and the
/// line to print.
pub fn run(socket: &Path, profile: &str, command: &[OsString]) -> (u8, String) {
    let failed = |line: String| (EXIT_FAILED, line);
    if let Some(outer) = std::env::var_os(MARK).filter(|v| !v.is_empty()) {
        return failed(format!(
            "refusing to nest: this shell already runs inside keybroker exec --profile {}, whose keys are in the environment; run the command directly, or unset {MARK} first",
            outer.to_string_lossy()
        ));
    }
    let Some((program, args)) = command.split_first() else {
        return failed("exec needs a command to run".into());
    };
    let profiles = match super::profiles(socket) {
        Ok(p) => p,
        Err(line) => return failed(line),
    };
    let Some(found) = profiles.iter().find(|p| p.name == profile) else {
        return failed(format!(
            "profile {profile}: unknown, or not readable by you (uid {})",
            rustix::process::getuid().as_raw()
        ));
    };
    let mut cmd = Command::new(program);
    cmd.args(args);
    for name in CLEARED {
        cmd.env_remove(name);
    }
    cmd.env(MARK, profile);
    if let Some(endpoint) = &found.s3.endpoint {
        cmd.env("AWS_ENDPOINT_URL_S3", endpoint);
    }
    if let Some(region) = &found.s3.region {
        cmd.env("AWS_REGION", region)
            .env("AWS_DEFAULT_REGION", region);
    }
    let shadow = default_profile_credentials();
    let container = found
        .container
        .as_ref()
        .filter(|c| std::fs::File::open(&c.token_file).is_ok());
    match (container, &shadow) {
        (Some(c), None) => {
            cmd.env("AWS_CONTAINER_CREDENTIALS_FULL_URI", &c.url)
                .env("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", &c.token_file);
        }
        _ => {
            if let Err(line) = key_in_environment(&mut cmd, socket, found, shadow.as_deref()) {
                return failed(line);
            }
        }
    }
    let e = cmd.exec();
    let shown = program.to_string_lossy();
    match e.kind() {
        std::io::ErrorKind::NotFound => (EXIT_NOT_FOUND, format!("{shown}: command not found")),
        _ => (EXIT_CANNOT_RUN, format!("{shown}: cannot run it: {e}")),
    }
}

/// Puts the current key in `cmd`'s environment, and warns that it ends.
fn key_in_environment(
    cmd: &mut Command,
    socket: &Path,
    profile: &ClientProfile,
    shadow: Option<&str>,
) -> Result<(), String> {
    let json = super::credential_process(socket, &profile.name, super::CREDENTIALS_TIMEOUT)?;
    // The parser's words are left out: they could quote the secret.
    let key = ProcessJson::read(&json).map_err(|_| {
        format!(
            "profile {}: the daemon's answer is not credential_process JSON",
            profile.name
        )
    })?;
    cmd.env("AWS_ACCESS_KEY_ID", key.access_key_id)
        .env("AWS_SECRET_ACCESS_KEY", key.secret_access_key)
        .env("AWS_CREDENTIAL_EXPIRATION", key.expiration);
    if let Some(token) = key.session_token.filter(|t| !t.is_empty()) {
        cmd.env("AWS_SESSION_TOKEN", token);
    }
    let why = match (&profile.container, shadow) {
        (Some(_), Some(files)) => format!(
            "the container endpoint is not used because {files} has credentials, which SDKs would take first"
        ),
        (Some(c), None) => format!(
            "the container endpoint's token file {} is not readable by you",
            c.token_file.display()
        ),
        (None, _) => {
            "with the container endpoint ([server.container]) it would get fresh keys".to_string()
        }
    };
    eprintln!(
        "keybroker exec: profile {}'s key is in the environment until {}; a command still running then loses access ({why})",
        profile.name, key.expiration
    );
    Ok(())
}

/// Where the AWS files give the default profile credentials of its own (`~/.aws/credentials
/// [default]`, or a `[default]` in the config file with keys, a `credential_process`, a role
/// or SSO), which the SDKs use before the container endpoint.
fn default_profile_credentials() -> Option<String> {
    let file = super::aws_config::aws_file;
    const KEYS: &[&str] = &[
        "aws_access_key_id",
        "credential_process",
        "role_arn",
        "sso_session",
        "sso_start_url",
        "web_identity_token_file",
    ];
    for (path, sections) in [
        (
            file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials"),
            &["default"][..],
        ),
        (
            file("AWS_CONFIG_FILE", ".aws/config"),
            &["default", "profile default"][..],
        ),
    ] {
        let Some(path) = path else { continue };
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        if section_has_key(&text, sections, KEYS) {
            return Some(format!("{} [default]", path.display()));
        }
    }
    None
}

/// Whether one of `sections` in the INI `text` sets one of `keys` (at the start of a line).
fn section_has_key(text: &str, sections: &[&str], keys: &[&str]) -> bool {
    let mut inside = false;
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some(name) = trimmed.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name: Vec<&str> = name.split_whitespace().collect();
            inside = sections.contains(&name.join(" ").as_str());
        } else if inside && !line.starts_with([' ', '\t']) {
            let key = trimmed.split('=').next().unwrap_or("").trim();
            if keys.contains(&key) {
                return true;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::section_has_key;

    #[test]
    fn the_default_profile_is_found_with_its_credentials() {
        let keys = ["aws_access_key_id", "credential_process"];
        let text = "[profile work]\naws_access_key_id = A\n[default]\nregion = x\n";
        assert!(!section_has_key(text, &["default"], &keys));
        let text = "[default]\nregion = x\n  credential_process = nested\naws_access_key_id=A\n";
        assert!(section_has_key(text, &["default"], &keys));
        let text = "[ profile  default ]\ncredential_process = kb\n";
        assert!(section_has_key(text, &["profile default"], &keys));
    }
}
