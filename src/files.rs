//! Making the daemon's directories with the mode asked for, whatever the umask, and without
//! following a symlink someone planted in the way; replacing a file whole.
//!
//! `mkdir(2)` applies the umask to the mode it is given, so under `umask 000` a plain
//! `create_dir_all` makes world-writable directories, and under `umask 077` a directory meant
//! for group members is closed to them. Each directory made here is therefore set to its mode
//! by `fchmod` afterwards, through a descriptor opened with `O_NOFOLLOW`.

use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::{Mode, OFlags};

/// The mode of the missing parents [`create_dir`] makes: what `mkdir -p` makes under the usual
/// umask 022, now whatever the umask.
pub const PARENT_MODE: u32 = 0o755;

/// Creates `dir` with exactly `mode`, and its missing parents with [`PARENT_MODE`]. Does
/// nothing if something is at `dir` already: the caller checks what it finds there. A parent
/// made meanwhile by someone else is used as it is.
pub fn create_dir(dir: &Path, mode: u32) -> io::Result<()> {
    let mut missing = Vec::new();
    for p in dir.ancestors().filter(|p| !p.as_os_str().is_empty()) {
        match std::fs::symlink_metadata(p) {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(p),
            Err(e) => return Err(e),
        }
    }
    for p in missing.into_iter().rev() {
        let m = if p == dir { mode } else { PARENT_MODE };
        match rustix::fs::mkdir(p, Mode::from_raw_mode(m)) {
            Ok(()) => chmod_dir(p, m)?,
            Err(rustix::io::Errno::EXIST) if p != dir => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Opens the directory `dir` itself: fails (`ENOTDIR`) if it is a symlink or not a directory.
pub fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Sets the mode of the directory `dir`, never of what a symlink there points at.
pub fn chmod_dir(dir: &Path, mode: u32) -> io::Result<()> {
    Ok(rustix::fs::fchmod(
        open_dir(dir)?,
        Mode::from_raw_mode(mode),
    )?)
}

/// Replaces the file `dest` with `bytes`, mode `mode`: written to a private temporary file
/// beside it, synced, and renamed over it, so a reader sees the old file or the new one,
/// whole, and a process running the old one keeps it. The temporary file is removed if a
/// step fails.
pub fn replace(dest: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let name = dest
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dest.with_file_name(format!(".{name}.keybroker-{}", std::process::id()));
    let write = || -> io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        std::fs::rename(&tmp, dest)
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// `O_NOFOLLOW`, for `OpenOptionsExt::custom_flags`: opening a symlink fails with `ELOOP`.
pub fn nofollow() -> i32 {
    OFlags::NOFOLLOW.bits() as i32
}

/// `uid 65534 (nobody)`, or `uid 4242` for a uid /etc/passwd does not name.
pub fn describe_uid(uid: u32) -> String {
    match crate::users::user_name(uid) {
        Some(name) => format!("uid {uid} ({name})"),
        None => format!("uid {uid}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn missing_parents_are_made_0755() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/c");
        create_dir(&dir, 0o700).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&tmp.path().join("a")), PARENT_MODE);
        assert_eq!(mode(&tmp.path().join("a/b")), PARENT_MODE);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        create_dir(&dir, 0o700).unwrap();
        assert_eq!(
            mode(&dir),
            0o777,
            "an existing dir is the caller's to check"
        );
    }

    #[test]
    fn a_symlink_is_never_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(chmod_dir(&link, 0o755).is_err());
        assert_eq!(mode(&real), 0o700);
    }
}
