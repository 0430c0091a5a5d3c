//! The loopback container-credentials endpoint: `GET /v1/container-credentials/{profile}` with
//! `Authorization: <token>`, for SDKs configured with `AWS_CONTAINER_CREDENTIALS_FULL_URI` and
//! `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`.
//!
//! A TCP peer has no SO_PEERCRED, so the token is the authorization: one random token per
//! profile, written at start to `<socket dir>/container/<profile>.token`, readable only by the
//! daemon's user, or by the profile's first `allow_groups` group where one is configured.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use rand::RngCore;

use super::{json_body, json_response, App};
use crate::api::ErrorBody;
use crate::credentials::Secret;

/// One profile's token and where it was written.
#[derive(Debug)]
struct Token {
    value: Secret,
    file: PathBuf,
}

/// The per-profile tokens of the container endpoint.
#[derive(Debug)]
pub struct ContainerTokens {
    dir: PathBuf,
    tokens: std::sync::RwLock<HashMap<String, Token>>,
}

/// Why the token files could not be written.
#[derive(Debug, thiserror::Error)]
#[error("container token {path}: {what}: {source}")]
pub struct TokenError {
    path: PathBuf,
    what: &'static str,
    source: std::io::Error,
}

impl ContainerTokens {
    /// Makes a fresh random token for each `(profile, group)` and writes it to
    /// `dir/<profile>.token`: mode 0600, or 0640 owned by `group` when one is given.
    pub fn create(dir: &Path, profiles: &[(String, Option<u32>)]) -> Result<Self, TokenError> {
        let err = |path: &Path, what| {
            let path = path.to_path_buf();
            move |source| TokenError { path, what, source }
        };
        let shared = profiles.iter().any(|(_, g)| g.is_some());
        let dir_mode = if shared { 0o755 } else { 0o700 };
        // Explicit modes whatever the umask, and never through a symlink at `dir`.
        match std::fs::symlink_metadata(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                crate::files::create_dir(dir, dir_mode)
                    .map_err(err(dir, "creating the directory"))?;
            }
            Err(e) => return Err(err(dir, "inspecting the directory")(e)),
            Ok(_) => crate::files::chmod_dir(dir, dir_mode)
                .map_err(err(dir, "setting the directory's mode"))?,
        }
        let tokens = ContainerTokens {
            dir: dir.to_path_buf(),
            tokens: std::sync::RwLock::new(HashMap::new()),
        };
        for (profile, group) in profiles {
            tokens.add(profile, *group)?;
        }
        Ok(tokens)
    }

    /// Makes and writes a fresh token for `profile` (at start, or added by a reload).
    pub fn add(&self, profile: &str, group: Option<u32>) -> Result<(), TokenError> {
        let err = |path: &Path, what| {
            let path = path.to_path_buf();
            move |source| TokenError { path, what, source }
        };
        if group.is_some() {
            // Group members must be able to enter the directory to reach their token.
            crate::files::chmod_dir(&self.dir, 0o755)
                .map_err(err(&self.dir, "setting the directory's mode"))?;
        }
        let mut raw = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        let value = Secret::new(raw.iter().map(|b| format!("{b:02x}")).collect::<String>());
        let file = self.dir.join(format!("{profile}.token"));
        let tmp = self.dir.join(format!(".{profile}.token.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(crate::files::nofollow())
            .mode(0o600)
            .open(&tmp)
            .map_err(err(&tmp, "creating"))?;
        // Mode and group are set on the open file, not by path: explicit whatever the umask.
        let mode = if group.is_some() { 0o640 } else { 0o600 };
        if let Some(gid) = group {
            std::os::unix::fs::fchown(&f, None, Some(gid)).map_err(err(
                &tmp,
                "giving it to the profile's group (is the daemon a member?)",
            ))?;
        }
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(err(&tmp, "setting its mode"))?;
        f.write_all(value.expose().as_bytes())
            .map_err(err(&tmp, "writing"))?;
        std::fs::rename(&tmp, &file).map_err(err(&file, "moving it into place"))?;
        self.tokens
            .write()
            .expect("token lock")
            .insert(profile.to_string(), Token { value, file });
        Ok(())
    }

    /// Forgets `profile`'s token and deletes its file (a reload removed the profile).
    pub fn remove_profile(&self, profile: &str) {
        if let Some(token) = self.tokens.write().expect("token lock").remove(profile) {
            let _ = std::fs::remove_file(&token.file);
        }
    }

    /// The token file of `profile`.
    pub fn file(&self, profile: &str) -> Option<PathBuf> {
        self.tokens
            .read()
            .expect("token lock")
            .get(profile)
            .map(|t| t.file.clone())
    }

    /// Whether `presented` is `profile`'s token, compared in constant time.
    fn accepts(&self, profile: &str, presented: Option<&HeaderValue>) -> bool {
        match (
            self.tokens.read().expect("token lock").get(profile),
            presented,
        ) {
            (Some(token), Some(presented)) => {
                constant_time_eq(token.value.expose().as_bytes(), presented.as_bytes())
            }
            _ => false,
        }
    }

    /// Deletes the token files (at stop): the tokens die with the daemon.
    pub fn remove(&self) {
        for token in self.tokens.read().expect("token lock").values() {
            let _ = std::fs::remove_file(&token.file);
        }
    }
}

use std::os::unix::fs::OpenOptionsExt;

/// Equality whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An error in the shape the SDKs read from a container endpoint: `{"code", "message"}`, the
/// inside of the socket API's error answer.
pub(super) fn sdk_error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = ErrorBody {
        code: code.to_string(),
        message: message.to_string(),
    };
    json_response(status, json_body(&body))
}

/// The answer to every request without the right token, whatever its path, method or profile:
/// a peer without a token learns nothing, not even which profiles exist. The connection is
/// closed after it.
fn unauthorized() -> Response<Full<Bytes>> {
    let mut resp = sdk_error(
        StatusCode::UNAUTHORIZED,
        "Unauthorized",
        "missing or wrong Authorization token: the endpoint is /v1/container-credentials/PROFILE, with the token keybroker wrote to container/PROFILE.token beside its socket; set AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE to that file",
    );
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Answers one container-endpoint request: the token first, for every path; then only `GET`
/// and `HEAD` of the profile's key.
pub async fn handle<B>(
    app: &App,
    tokens: &ContainerTokens,
    req: &Request<B>,
) -> Response<Full<Bytes>> {
    let Some(profile) = req.uri().path().strip_prefix("/v1/container-credentials/") else {
        return unauthorized();
    };
    if !tokens.accepts(profile, req.headers().get(header::AUTHORIZATION)) {
        return unauthorized();
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = sdk_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            &format!("{} is not supported here; use GET", req.method()),
        );
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    // A token exists only for a configured profile; a reload may have removed it since.
    let Some(slot) = app.broker.slot(profile) else {
        return unauthorized();
    };
    super::key_answer(&slot, super::Shape::Container).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn token_files_are_private_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let tokens =
            ContainerTokens::create(&dir.path().join("container"), &[("p".into(), None)]).unwrap();
        let file = tokens.file("p").unwrap();
        let meta = std::fs::metadata(&file).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(&file).unwrap();
        assert_eq!(text.len(), 64);
        let header = HeaderValue::from_str(&text).unwrap();
        assert!(tokens.accepts("p", Some(&header)));
        assert!(!tokens.accepts("p", Some(&HeaderValue::from_static("nope"))));
        assert!(!tokens.accepts("p", None));
        assert!(!tokens.accepts("q", Some(&header)));
        tokens.remove();
        assert!(!file.exists());
    }

    #[test]
    fn a_profile_group_may_read_its_token() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let gid = rustix::process::getgid().as_raw();
        let tokens = ContainerTokens::create(
            &dir.path().join("container"),
            &[("shared".into(), Some(gid)), ("private".into(), None)],
        )
        .unwrap();
        let shared = std::fs::metadata(tokens.file("shared").unwrap()).unwrap();
        assert_eq!(
            (shared.permissions().mode() & 0o777, shared.gid()),
            (0o640, gid)
        );
        let private = std::fs::metadata(tokens.file("private").unwrap()).unwrap();
        assert_eq!(private.permissions().mode() & 0o777, 0o600);
        let dir_mode = std::fs::metadata(dir.path().join("container"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            dir_mode & 0o777,
            0o755,
            "group members can reach their token"
        );
    }
}
