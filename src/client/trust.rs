//! Whether the client may talk to the daemon it reached. Anyone may create
//! `/tmp/keybroker-$UID` before its user does and serve keys of their choosing there, so once
//! connected, and before sending anything, the client asks the kernel who serves the socket
//! (`SO_PEERCRED`: the uid of the process that called `listen`, root for a socket systemd
//! activates) and accepts only
//! - the caller's own uid, or root;
//! - the uid root gave the socket's directory to: the directory belongs to that uid and is not
//!   writable by group or others, and its parent belongs to root and is not writable by group or
//!   others (`/run/keybroker` made by systemd's `RuntimeDirectory=` for the `keybroker` user). A
//!   directory in the sticky, world-writable /tmp does not qualify: anyone may make one there.

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Component, Path, PathBuf};

/// Symbolic links followed before giving up, as Linux does (`ELOOP`).
const MAX_LINKS: usize = 40;

/// A directory's owner and mode bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Owned {
    uid: u32,
    mode: u32,
}

/// Why root did not give the socket's directory to the uid serving it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Distrust {
    /// The directory belongs to another uid (this one).
    DirOwner(u32),
    /// Group or others may write in the directory (its mode).
    DirWritable(u32),
    /// The directory is `/`, which nobody is given.
    NoParent,
    /// The directory's parent belongs to this uid, not root.
    ParentOwner(u32),
    /// Group or others may write in the parent (its mode): they could make the directory.
    ParentWritable(u32),
}

/// The rule: may a client running as `caller` talk to a server running as `peer`, given the
/// socket's directory `dir` and that directory's `parent` (`None` for `/`), symbolic links
/// resolved?
fn judge(peer: u32, caller: u32, dir: Owned, parent: Option<Owned>) -> Result<(), Distrust> {
    if peer == caller || peer == 0 {
        return Ok(());
    }
    if dir.uid != peer {
        return Err(Distrust::DirOwner(dir.uid));
    }
    if dir.mode & 0o022 != 0 {
        return Err(Distrust::DirWritable(dir.mode));
    }
    let parent = parent.ok_or(Distrust::NoParent)?;
    if parent.uid != 0 {
        return Err(Distrust::ParentOwner(parent.uid));
    }
    if parent.mode & 0o022 != 0 {
        return Err(Distrust::ParentWritable(parent.mode));
    }
    Ok(())
}

/// Checks the server at the other end of `stream`, connected to `socket`; the error is the one
/// line to print, naming the socket, who serves it, why that is not trusted and what to do.
pub(super) fn check(stream: &UnixStream, socket: &Path) -> Result<(), String> {
    let caller = rustix::process::getuid().as_raw();
    let peer = rustix::net::sockopt::socket_peercred(stream)
        .map_err(|e| {
            format!(
                "cannot tell who serves the keybroker socket at {} (SO_PEERCRED: {e})",
                socket.display()
            )
        })?
        .uid
        .as_raw();
    // The common cases, with no look at the file system.
    if peer == caller || peer == 0 {
        return Ok(());
    }
    let why = match inspect(socket, caller) {
        Ok(place) => {
            let parent = place.parent.as_ref();
            match judge(peer, caller, place.owned, parent.map(|p| p.1)) {
                Ok(()) => return Ok(()),
                Err(d) => describe(d, peer, &place.dir, parent.map(|p| p.0.as_path())),
            }
        }
        Err(why) => why,
    };
    let who = match crate::users::user_name(peer) {
        Some(name) => format!("uid {peer} ({name})"),
        None => format!("uid {peer}"),
    };
    Err(format!(
        "refusing the keybroker socket at {}: it is served by {who}, which is neither you (uid {caller}) nor root, and {why}; someone else may have planted it: remove it, or point --socket or KEYBROKER_SOCKET at your daemon",
        socket.display()
    ))
}

/// The second half of the refusal line.
fn describe(d: Distrust, peer: u32, dir: &Path, parent: Option<&Path>) -> String {
    let dir = dir.display();
    let parent = parent.unwrap_or(Path::new("/")).display();
    match d {
        Distrust::DirOwner(uid) => format!("its directory {dir} belongs to uid {uid}, not {peer}"),
        Distrust::DirWritable(mode) => format!(
            "its directory {dir} is writable by group or others (mode {:04o})",
            mode & 0o7777
        ),
        Distrust::NoParent => "its directory is /".to_string(),
        Distrust::ParentOwner(uid) => format!(
            "{parent}, the parent of its directory {dir}, belongs to uid {uid}, not root"
        ),
        Distrust::ParentWritable(mode) => format!(
            "{parent}, the parent of its directory {dir}, is writable by group or others (mode {:04o}), so anyone may make a directory there",
            mode & 0o7777
        ),
    }
}

/// Where the socket is: its directory, links resolved by [`resolve`], and that directory's
/// parent.
struct Place {
    dir: PathBuf,
    owned: Owned,
    /// `None` for `/`.
    parent: Option<(PathBuf, Owned)>,
}

/// Finds the socket's [`Place`]. The socket file itself is not followed: its directory's owner
/// chose what it names.
fn inspect(socket: &Path, caller: u32) -> Result<Place, String> {
    let named = socket
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let dir = resolve(named, caller)?;
    let parent = match dir.parent() {
        Some(p) => Some((p.to_path_buf(), owned(p)?)),
        None => None,
    };
    Ok(Place {
        owned: owned(&dir)?,
        dir,
        parent,
    })
}

fn owned(path: &Path) -> Result<Owned, String> {
    std::fs::symlink_metadata(path)
        .map(|m| Owned {
            uid: m.uid(),
            mode: m.mode(),
        })
        .map_err(|e| format!("{} cannot be inspected ({e})", path.display()))
}

/// One step of a path still to walk.
enum Step {
    Up,
    Name(OsString),
}

fn steps(path: &Path) -> impl DoubleEndedIterator<Item = Step> + '_ {
    path.components().filter_map(|c| match c {
        Component::ParentDir => Some(Step::Up),
        Component::Normal(name) => Some(Step::Name(name.to_os_string())),
        Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
    })
}

/// `dir` with its symbolic links resolved, as `realpath` would, provided each link belongs to
/// root or the caller. A link someone else made could lead anywhere, such as a directory root
/// gave them (`/run/user/UID` is one for every logged-in user): following it would make their
/// socket look delegated.
fn resolve(dir: &Path, caller: u32) -> Result<PathBuf, String> {
    let mut resolved = if dir.is_absolute() {
        PathBuf::from("/")
    } else {
        std::env::current_dir().map_err(|e| format!("the current directory is unreadable ({e})"))?
    };
    // Still to walk, last step first.
    let mut todo: Vec<Step> = steps(dir).rev().collect();
    let mut links = 0;
    while let Some(step) = todo.pop() {
        let name = match step {
            Step::Up => {
                resolved.pop();
                continue;
            }
            Step::Name(name) => name,
        };
        let next = resolved.join(&name);
        let meta = std::fs::symlink_metadata(&next)
            .map_err(|e| format!("{} cannot be inspected ({e})", next.display()))?;
        if !meta.file_type().is_symlink() {
            resolved = next;
            continue;
        }
        if meta.uid() != 0 && meta.uid() != caller {
            return Err(format!(
                "the path to it goes through the symbolic link {}, which belongs to uid {}",
                next.display(),
                meta.uid()
            ));
        }
        links += 1;
        if links > MAX_LINKS {
            return Err(format!(
                "the path to it has too many symbolic links (at {})",
                next.display()
            ));
        }
        let target = std::fs::read_link(&next)
            .map_err(|e| format!("{} cannot be read ({e})", next.display()))?;
        if target.is_absolute() {
            resolved = PathBuf::from("/");
        }
        todo.extend(steps(&target).rev());
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT_RUN: Owned = Owned {
        uid: 0,
        mode: 0o40755,
    };
    const TMP: Owned = Owned {
        uid: 0,
        mode: 0o41777,
    };

    fn dir(uid: u32, mode: u32) -> Owned {
        Owned {
            uid,
            mode: 0o40000 | mode,
        }
    }

    #[test]
    fn the_callers_own_server_and_roots_are_trusted_anywhere() {
        let planted = dir(65534, 0o755);
        assert_eq!(judge(1000, 1000, planted, Some(TMP)), Ok(()));
        assert_eq!(judge(0, 1000, planted, Some(TMP)), Ok(()));
        assert_eq!(judge(0, 0, dir(0, 0o777), None), Ok(()));
    }

    #[test]
    fn a_directory_root_gave_to_the_server_is_trusted() {
        // /run/keybroker from RuntimeDirectory= for the keybroker user (uid 998).
        assert_eq!(judge(998, 1000, dir(998, 0o755), Some(ROOT_RUN)), Ok(()));
        assert_eq!(judge(998, 0, dir(998, 0o700), Some(ROOT_RUN)), Ok(()));
    }

    #[test]
    fn a_directory_anyone_could_have_made_is_not() {
        // /tmp/keybroker-1000 made first by nobody.
        assert_eq!(
            judge(65534, 1000, dir(65534, 0o755), Some(TMP)),
            Err(Distrust::ParentWritable(0o41777))
        );
        // In a directory of another user's.
        assert_eq!(
            judge(65534, 1000, dir(65534, 0o700), Some(dir(1001, 0o755))),
            Err(Distrust::ParentOwner(1001))
        );
        assert_eq!(
            judge(65534, 1000, dir(65534, 0o755), Some(dir(0, 0o775))),
            Err(Distrust::ParentWritable(0o40775))
        );
    }

    #[test]
    fn the_directory_must_be_the_servers_and_closed() {
        assert_eq!(
            judge(65534, 1000, dir(998, 0o755), Some(ROOT_RUN)),
            Err(Distrust::DirOwner(998))
        );
        assert_eq!(
            judge(65534, 1000, dir(0, 0o1777), Some(ROOT_RUN)),
            Err(Distrust::DirOwner(0))
        );
        assert_eq!(
            judge(998, 1000, dir(998, 0o775), Some(ROOT_RUN)),
            Err(Distrust::DirWritable(0o40775))
        );
        assert_eq!(
            judge(998, 1000, dir(998, 0o757), Some(ROOT_RUN)),
            Err(Distrust::DirWritable(0o40757))
        );
        assert_eq!(
            judge(998, 1000, dir(998, 0o755), None),
            Err(Distrust::NoParent)
        );
    }

    #[test]
    fn links_are_resolved_when_root_or_the_caller_made_them() {
        use std::os::unix::fs::symlink;
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().canonicalize().unwrap();
        std::fs::create_dir_all(base.join("real/run")).unwrap();
        symlink(base.join("real"), base.join("abs")).unwrap();
        symlink("real/run/..", base.join("rel")).unwrap();
        let me = rustix::process::getuid().as_raw();
        assert_eq!(
            resolve(&base.join("abs/run"), me).unwrap(),
            base.join("real/run")
        );
        assert_eq!(
            resolve(&base.join("rel/run/../run"), me).unwrap(),
            base.join("real/run")
        );
        if me == 0 {
            // A link root made, seen by a client of uid 1000: followed.
            assert!(resolve(&base.join("abs/run"), 1000).is_ok());
        }
        symlink("loop", base.join("loop")).unwrap();
        let e = resolve(&base.join("loop/x"), me).unwrap_err();
        assert!(e.contains("too many symbolic links"), "{e}");
        let e = resolve(&base.join("missing/x"), me).unwrap_err();
        assert!(e.contains("cannot be inspected"), "{e}");
    }

    #[test]
    fn links_someone_else_made_are_not_followed() {
        if !rustix::process::getuid().is_root() {
            return; // needs root to make a link that belongs to another uid
        }
        use std::os::unix::fs::symlink;
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().canonicalize().unwrap();
        std::fs::create_dir(base.join("theirs")).unwrap();
        let link = base.join("planted");
        symlink(base.join("theirs"), &link).unwrap();
        std::os::unix::fs::lchown(&link, Some(65534), Some(65534)).unwrap();
        let e = resolve(&link, 1000).unwrap_err();
        assert!(
            e.contains(&format!(
                "goes through the symbolic link {}, which belongs to uid 65534",
                link.display()
            )),
            "{e}"
        );
    }
}
