//! Creating the listening socket: private directory, stale-socket takeover, mode and group set
//! before the socket appears at its path (bound under a temporary name, then renamed).

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

/// Pending connections the kernel queues before `accept` (capped by `net.core.somaxconn`):
/// a node starting hundreds of workers connects all at once.
const BACKLOG: i32 = 4096;

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// A live daemon answers on the path.
    #[error(
        "another keybroker is already serving on {0}; stop it first, or pick another socket path"
    )]
    InUse(PathBuf),
    /// Something that is not a socket sits at the path.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// The directory is not safe to put a socket in.
    #[error("socket directory {path}: {why}")]
    UnsafeDir {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// A system call failed.
    #[error("socket {path}: {what}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The step that failed.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
}

/// A listening socket and the file that names it.
#[derive(Debug)]
pub struct BoundSocket {
    /// The listener (non-blocking, ready for tokio).
    pub listener: std::os::unix::net::UnixListener,
    /// The socket's path.
    pub path: PathBuf,
    inode: (u64, u64),
    /// Whether the file is ours to remove (not when systemd passed the socket).
    owned: bool,
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        self.remove();
    }
}

impl BoundSocket {
    /// A socket systemd bound and passed in (socket activation): served, never removed.
    pub fn activated(listener: std::os::unix::net::UnixListener) -> std::io::Result<BoundSocket> {
        let path = listener
            .local_addr()?
            .as_pathname()
            .map(Path::to_path_buf)
            .ok_or_else(|| std::io::Error::other("the passed socket has no path"))?;
        Ok(BoundSocket {
            listener,
            path,
            inode: (0, 0),
            owned: false,
        })
    }

    /// Removes the socket file, unless it is systemd's or something else has replaced it since.
    pub fn remove(&self) {
        if !self.owned {
            return;
        }
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.inode {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

fn io_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> BindError + 'a {
    move |source| BindError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

/// Binds the socket at `path` with `mode` and optional `group`. A socket file left by a dead
/// daemon is replaced; a live daemon's is not.
pub fn bind_socket(path: &Path, mode: u32, group: Option<u32>) -> Result<BoundSocket, BindError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    prepare_dir(dir, mode)?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(BindError::InUse(path.to_path_buf())),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::info!(path = %path.display(), "replacing a stale socket left by a stopped daemon");
                    std::fs::remove_file(path)
                        .map_err(io_err(path, "removing the stale socket"))?;
                }
                Err(e) => return Err(io_err(path, "checking the existing socket")(e)),
            }
        }
        Ok(_) => return Err(BindError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(path, "inspecting the path")(e)),
    }

    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("keybroker.sock"),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .map_err(|e| io_err(path, "creating the socket")(e.into()))?;
    let addr =
        SocketAddrUnix::new(&tmp).map_err(|e| io_err(path, "socket path too long")(e.into()))?;
    let result = (|| {
        rustix::net::bind(&fd, &addr).map_err(|e| io_err(path, "binding")(e.into()))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
            .map_err(io_err(path, "setting socket_mode"))?;
        if let Some(gid) = group {
            std::os::unix::fs::chown(&tmp, None, Some(gid))
                .map_err(io_err(path, "setting socket_group"))?;
        }
        rustix::net::listen(&fd, BACKLOG).map_err(|e| io_err(path, "listening")(e.into()))?;
        std::fs::rename(&tmp, path).map_err(io_err(path, "moving the socket into place"))?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let meta =
        std::fs::symlink_metadata(path).map_err(io_err(path, "inspecting the new socket"))?;
    Ok(BoundSocket {
        listener: std::os::unix::net::UnixListener::from(fd),
        path: path.to_path_buf(),
        inode: (meta.dev(), meta.ino()),
        owned: true,
    })
}

/// Creates the socket's directory if needed. A directory we create is private unless the
/// socket mode lets group or others in. In a shared directory such as /tmp the socket's
/// directory must be ours and not writable by others, or someone could plant a fake daemon.
fn prepare_dir(dir: &Path, socket_mode: u32) -> Result<(), BindError> {
    let uid = rustix::process::getuid().as_raw();
    match std::fs::metadata(dir) {
        Ok(meta) => {
            if !meta.is_dir() {
                return Err(BindError::UnsafeDir {
                    path: dir.to_path_buf(),
                    why: "not a directory".into(),
                });
            }
            let world_writable_sticky = meta.mode() & 0o1002 == 0o1002;
            if !world_writable_sticky && meta.mode() & 0o022 != 0 && meta.uid() != 0 {
                return Err(BindError::UnsafeDir {
                    path: dir.to_path_buf(),
                    why: format!(
                        "writable by group or others (mode {:04o}); chmod go-w it",
                        meta.mode() & 0o7777
                    ),
                });
            }
            if dir.starts_with("/tmp") && dir != Path::new("/tmp") && meta.uid() != uid {
                return Err(BindError::UnsafeDir {
                    path: dir.to_path_buf(),
                    why: format!("owned by uid {}, not by us (uid {uid})", meta.uid()),
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let dir_mode = if socket_mode & 0o077 == 0 {
                0o700
            } else {
                0o755
            };
            // Explicit modes, for the directory and any missing parent: under `umask 000` a
            // plain create_dir_all would leave them world-writable.
            crate::files::create_dir(dir, dir_mode)
                .map_err(io_err(dir, "creating the socket directory"))?;
            Ok(())
        }
        Err(e) => Err(io_err(dir, "inspecting the socket directory")(e)),
    }
}
