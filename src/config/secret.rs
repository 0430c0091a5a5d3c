//! Secret files named by a profile (`token_file`, `secret_key_file`, `api_key_file`): where they
//! are, who may own them, and reading them.

use std::fs::Metadata;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use toml::Spanned;

use super::{ConfigError, Located};
use crate::credentials::Secret;

/// Reads a secret file: `name` without '/' is looked up in `$CREDENTIALS_DIRECTORY` (systemd
/// `LoadCredential=`), a relative path is relative to the config file. The file must not be
/// open to others, may be read (never written) by its group only when keybroker is in that
/// group, and must belong to root or to the uid running keybroker.
pub(super) fn read_secret(
    loc: &Located<'_>,
    value: &Spanned<String>,
    key: &str,
) -> Result<Secret, ConfigError> {
    let path = secret_path(loc, value, key)?;
    let credential = !value.get_ref().contains('/');
    let err = |what: String| loc.at(value.span(), format!("{key} {}: {what}", path.display()));
    // Checked and read through one descriptor, so the file checked is the file read.
    let mut file = std::fs::File::open(&path).map_err(|e| err(e.to_string()))?;
    let meta = file.metadata().map_err(|e| err(e.to_string()))?;
    check_private(&meta, credential, &path).map_err(err)?;
    check_owner(&meta, &path).map_err(err)?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut file, &mut text).map_err(|e| err(e.to_string()))?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(err("the file is empty".into()));
    }
    Ok(Secret::new(secret))
}

/// Where a file named by `key` is: `name` without '/' in `$CREDENTIALS_DIRECTORY`, a relative
/// path beside the config file.
pub(super) fn secret_path(
    loc: &Located<'_>,
    value: &Spanned<String>,
    key: &str,
) -> Result<PathBuf, ConfigError> {
    let raw = value.get_ref();
    if raw.contains('/') {
        return Ok(loc.beside_config(PathBuf::from(raw)));
    }
    match std::env::var_os("CREDENTIALS_DIRECTORY") {
        Some(dir) => Ok(PathBuf::from(dir).join(raw)),
        None => Err(loc.at(
            value.span(),
            format!("{key} {raw:?} has no '/', so it names a systemd credential, but $CREDENTIALS_DIRECTORY is not set; give a path such as \"/etc/keybroker/{raw}\""),
        )),
    }
}

/// Private enough: nothing for others, and for the file's group at most read access, and then
/// only when keybroker is in that group (`credential`: the file came from
/// `$CREDENTIALS_DIRECTORY`).
fn check_private(meta: &Metadata, credential: bool, path: &Path) -> Result<(), String> {
    let mut groups = rustix::process::getgroups().unwrap_or_default();
    groups.push(rustix::process::getegid());
    let groups: Vec<u32> = groups.iter().map(|g| g.as_raw()).collect();
    let mode = meta.permissions().mode() & 0o777;
    privacy(mode, meta.uid(), meta.gid(), credential, &groups).map_err(|why| {
        format!(
            "{why} (mode {mode:04o}); a secret file must be private (chmod 600 {}), or readable only by a group keybroker runs in (mode 0440)",
            path.display()
        )
    })
}

/// The rule behind [`check_private`], on a file's `mode`, owner `uid` and group `gid`, with
/// `groups` the groups keybroker runs with. A group may read the file when keybroker is in it:
/// Kubernetes gives a Secret to a non-root pod as root-owned, mode 0440, with the pod's
/// `fsGroup`, and an operator may do the same with `chown root:keybroker`. Nobody in the group
/// may write it: they could swap the secret.
fn privacy(mode: u32, uid: u32, gid: u32, credential: bool, groups: &[u32]) -> Result<(), String> {
    // systemd may give the service's user a root-owned credential through an ACL, which `ls`
    // shows as group bits (0440, group root); nobody else can read it or write in that
    // directory.
    let systemd_acl = credential && uid == 0 && gid == 0 && mode & 0o037 == 0;
    if mode & 0o007 != 0 {
        return Err("open to others".into());
    }
    if mode & 0o070 == 0 || systemd_acl {
        return Ok(());
    }
    if mode & 0o030 != 0 {
        return Err("writable by its group".into());
    }
    if !groups.contains(&gid) {
        return Err(format!(
            "readable by group {gid}, which keybroker is not in"
        ));
    }
    Ok(())
}

/// Owned by root or by the user running keybroker. As sshd requires of its host keys: a file
/// another user owns is one that user can swap for a token of their own, and the daemon would
/// then act with it on their behalf. systemd's `$CREDENTIALS_DIRECTORY` files belong to root,
/// or to the service's user.
fn check_owner(meta: &Metadata, path: &Path) -> Result<(), String> {
    let runner = rustix::process::geteuid().as_raw();
    if meta.uid() == 0 || meta.uid() == runner {
        return Ok(());
    }
    let who = if runner == 0 {
        "root".to_string()
    } else {
        format!(
            "root or to {}, which runs keybroker",
            crate::files::describe_uid(runner)
        )
    };
    Err(format!(
        "owned by {}, who could swap the secret; a secret file must belong to {who}: chown root {}",
        crate::files::describe_uid(meta.uid()),
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::privacy;

    #[test]
    fn a_group_keybroker_is_in_may_read_and_nobody_else_may() {
        let ours = [65532, 0];
        // Owner only: always.
        assert_eq!(privacy(0o600, 0, 0, false, &ours), Ok(()));
        assert_eq!(privacy(0o400, 65532, 7, false, &ours), Ok(()));
        // A Kubernetes Secret given to a non-root pod through its fsGroup.
        assert_eq!(privacy(0o440, 0, 65532, false, &ours), Ok(()));
        assert_eq!(privacy(0o640, 0, 65532, false, &ours), Ok(()));
        // Another group, group write, or anything for others: refused.
        assert!(privacy(0o440, 0, 100, false, &ours)
            .unwrap_err()
            .starts_with("readable by group 100, which keybroker is not in"));
        assert_eq!(
            privacy(0o460, 0, 65532, false, &ours),
            Err("writable by its group".into())
        );
        assert_eq!(
            privacy(0o604, 0, 65532, false, &ours),
            Err("open to others".into())
        );
        assert_eq!(
            privacy(0o444, 0, 65532, false, &ours),
            Err("open to others".into())
        );
        // systemd's credential ACL shows as root:root 0440 to a service user not in group root.
        assert_eq!(privacy(0o440, 0, 0, true, &[998]), Ok(()));
        assert!(privacy(0o440, 0, 0, false, &[998]).is_err());
    }
}
