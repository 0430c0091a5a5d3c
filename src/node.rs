//! `keybroker install-node DIR --daemon-user UID:GID`: lays out a directory that a daemon and
//! the workloads on its node share (README, "On Kubernetes"), run as root before the daemon
//! starts, typically by an init container from the keybroker image itself, which has no shell:
//!
//! - `DIR/bin/keybroker`: a copy of this binary for workloads to run as `credential_process`,
//!   root's, mode 0755, replaced atomically (a client running the old one keeps its file);
//! - `DIR/socket/`: the daemon's socket directory, given to the daemon's user, mode 0755.
//!
//! DIR itself must be root's and closed to writes by group and others. Clients then trust a
//! daemon serving `DIR/socket/keybroker.sock` as another user: root gave it that directory
//! (see `client::trust`). The binary is kept out of the daemon's directory, so the daemon's
//! user cannot swap what the workloads run.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use rustix::fs::Mode;
use rustix::process::{Gid, Uid};

use crate::files;

/// The mode of DIR, `bin`, the binary and `socket`.
const MODE: u32 = 0o755;

/// Parses `--daemon-user`: `UID:GID`, both numbers.
pub fn parse_user(text: &str) -> Result<(u32, u32), String> {
    text.split_once(':')
        .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)))
        .ok_or_else(|| {
            format!("--daemon-user {text:?} is not UID:GID in numbers, e.g. 65532:65532")
        })
}

/// Lays out `dir` for a daemon run as `user` (uid, gid); the lines say what was done.
pub fn install(dir: &Path, user: (u32, u32)) -> Result<Vec<String>, String> {
    if !rustix::process::geteuid().is_root() {
        return Err(
            "install-node runs as root: it gives the socket directory to the daemon's user".into(),
        );
    }
    let at = |path: &Path| {
        let path = path.display().to_string();
        move |e: io::Error| format!("{path}: {e}")
    };
    files::create_dir(dir, MODE).map_err(at(dir))?;
    check_roots(dir)?;
    let bin = dir.join("bin");
    files::create_dir(&bin, MODE).map_err(at(&bin))?;
    check_roots(&bin)?;
    let mut lines = vec![copy_self(&bin.join("keybroker"))?];

    let socket = dir.join("socket");
    files::create_dir(&socket, MODE).map_err(at(&socket))?;
    // Through one descriptor, never through a symlink planted at `socket`.
    let fd = files::open_dir(&socket).map_err(at(&socket))?;
    let (uid, gid) = user;
    rustix::fs::fchown(&fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
        .map_err(|e| at(&socket)(e.into()))?;
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(MODE)).map_err(|e| at(&socket)(e.into()))?;
    lines.push(format!(
        "{}: the daemon's socket directory, for uid {uid} gid {gid}, mode 0755",
        socket.display()
    ));
    Ok(lines)
}

/// `path` is a directory of root's that group and others cannot write in: what a client needs
/// of the parent of the daemon's directory, and what keeps the binary root's to change.
fn check_roots(path: &Path) -> Result<(), String> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let why = if !meta.is_dir() {
        "is not a directory".to_string()
    } else if meta.uid() != 0 {
        format!("belongs to uid {}, not root", meta.uid())
    } else if meta.mode() & 0o022 != 0 {
        format!(
            "is writable by group or others (mode {:04o})",
            meta.mode() & 0o7777
        )
    } else {
        return Ok(());
    };
    Err(format!(
        "{} {why}; clients would not trust a daemon under it: chown root {0} && chmod 0755 {0}",
        path.display()
    ))
}

/// Copies the running binary to `dest`: written beside it, then renamed over it, so a process
/// running the old file is unaffected. Left as it is when it holds the same bytes.
fn copy_self(dest: &Path) -> Result<String, String> {
    let exe = std::env::current_exe().map_err(|e| format!("finding this binary: {e}"))?;
    let bytes = std::fs::read(&exe).map_err(|e| format!("reading {}: {e}", exe.display()))?;
    if std::fs::read(dest).is_ok_and(|old| old == bytes) {
        return Ok(format!("{}: unchanged", dest.display()));
    }
    files::replace(dest, &bytes, MODE).map_err(|e| format!("writing {}: {e}", dest.display()))?;
    Ok(format!(
        "{}: installed ({} bytes, mode 0755)",
        dest.display(),
        bytes.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::parse_user;

    #[test]
    fn the_daemon_user_is_two_numbers() {
        assert_eq!(parse_user("65532:65532"), Ok((65532, 65532)));
        assert_eq!(parse_user("0:5"), Ok((0, 5)));
        for bad in ["keybroker", "65532", "a:1", "1:", ":1", "1:2:3", "-1:0"] {
            assert!(
                parse_user(bad).unwrap_err().contains("is not UID:GID"),
                "{bad}"
            );
        }
    }
}
