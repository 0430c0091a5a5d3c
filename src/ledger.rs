//! The ledger: a crash-safe journal of every key the broker ever asked for, so that no key
//! outlives the process that minted it (README, "Never leak a key").
//!
//! `state_dir/ledger.jsonl`, mode 0600, one JSON record per line, appended and fsynced before
//! the step it records is trusted: `intent` before a create (lease, profile, provider, tag),
//! `minted` after it (key id, revoke handle, expiry), `revoked` once the key is gone. Never a
//! secret. A lease with no `revoked` record is open: start-up (and `keybroker sweep`) revokes
//! it, by its handle or, when only the intent was written, by finding its tag in the
//! provider's listing; then the file is compacted to the leases still open.
//!
//! One daemon per state dir: `state_dir/lock` is held with an exclusive `flock` and names the
//! holder's pid.
//!
//! The state dir must be the daemon's own: not a symlink, owned by its uid, not writable by
//! group or others ([`StateDir::open`]); its files are never opened through a symlink.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rustix::fs::{AtFlags, FlockOperation, Mode, OFlags};
use serde::{Deserialize, Serialize};

use crate::provider::ProviderKind;

/// One line of the ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Record {
    /// Written before a create: if the answer is lost, the tag finds the key.
    Intent {
        /// The lease id.
        lease: String,
        /// The profile.
        profile: String,
        /// The provider.
        provider: ProviderKind,
        /// The tag the key is created with.
        tag: String,
        /// When (RFC 3339).
        at: String,
    },
    /// Written after a create answered.
    Minted {
        /// The lease id.
        lease: String,
        /// The access key id.
        key_id: String,
        /// What revokes it.
        handle: String,
        /// Its expiry (RFC 3339).
        expires_at: String,
    },
    /// Written once the key is revoked, or known never to have been made.
    Revoked {
        /// The lease id.
        lease: String,
        /// When (RFC 3339).
        at: String,
    },
}

/// A lease not yet closed by a `revoked` record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenLease {
    /// The lease id.
    pub lease: String,
    /// The profile that minted it.
    pub profile: String,
    /// The provider.
    pub provider: ProviderKind,
    /// The key's tag.
    pub tag: String,
    /// When the intent was written.
    pub at: String,
    /// `(key id, revoke handle, expiry)` once the create answered.
    pub minted: Option<(String, String, String)>,
}

/// What reading the ledger found.
#[derive(Debug, Default)]
pub struct Replay {
    /// Leases to finish, oldest first.
    pub open: Vec<OpenLease>,
    /// Lines that could not be read: (line number, why). Skipped, reported.
    pub bad_lines: Vec<(usize, String)>,
    /// The last line had no newline: a write cut short by power loss. Skipped, reported.
    pub torn_tail: bool,
}

/// Why the ledger could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// Another daemon holds the state dir.
    #[error("another keybroker (pid {pid}) is using the state directory {dir}; stop it first, or give this one another state_dir")]
    Locked {
        /// The state dir.
        dir: PathBuf,
        /// The holder's pid, as it wrote it.
        pid: String,
    },
    /// The state directory is not one only the daemon's user controls.
    #[error("state directory {path} {why}")]
    UnsafeDir {
        /// The state dir.
        path: PathBuf,
        /// What is wrong and what to do.
        why: String,
    },
    /// A symlink sits where a file of the state directory belongs.
    #[error("{path} is a symlink to {target}, which keybroker never makes; remove it, and find out who put it there")]
    Symlink {
        /// The file.
        path: PathBuf,
        /// Where it points.
        target: String,
    },
    /// A file operation failed.
    #[error("{path}: {what}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The step.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
}

fn io_err(path: &Path, what: &'static str) -> impl FnOnce(io::Error) -> LedgerError {
    let path = path.to_path_buf();
    move |source| LedgerError::Io { path, what, source }
}

/// The ledger's file name in the state directory.
const LEDGER: &str = "ledger.jsonl";
/// Where compaction writes the new ledger before renaming it over the old one.
const LEDGER_TMP: &str = "ledger.jsonl.tmp";
/// The lock file's name.
const LOCK: &str = "lock";

/// The state directory, checked and held open. Its files are opened relative to this
/// descriptor with `O_NOFOLLOW` and created with mode 0600: a symlink planted in it (say
/// `lock` pointing at a root-only file) makes the open fail instead of truncating its target.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
    fd: OwnedFd,
}

impl StateDir {
    /// Opens `path`, creating it with mode 0700 (missing parents 0755) whatever the umask.
    /// Refused, as sshd refuses such a home for its keys: a symlink, anything not a directory,
    /// a directory owned by another uid than the daemon's (effective) one, or one that group or
    /// others may write. Whoever can change its entries could otherwise swap the ledger (and
    /// with it, which keys the next start revokes) or aim the daemon's writes elsewhere.
    pub fn open(path: &Path) -> Result<StateDir, LedgerError> {
        let refuse = |why: String| LedgerError::UnsafeDir {
            path: path.to_path_buf(),
            why,
        };
        match std::fs::symlink_metadata(path) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                crate::files::create_dir(path, 0o700)
                    .map_err(io_err(path, "creating the state directory"))?;
            }
            Err(e) => return Err(io_err(path, "inspecting the state directory")(e)),
        }
        let fd = match crate::files::open_dir(path) {
            Ok(fd) => fd,
            Err(e) => return Err(match std::fs::symlink_metadata(path) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    let target = std::fs::read_link(path)
                        .map_or_else(|_| "?".into(), |t| t.display().to_string());
                    refuse(format!(
                        "is a symlink to {target}; point state_dir at the real directory"
                    ))
                }
                Ok(meta) if !meta.is_dir() => refuse(
                    "is not a directory; point state_dir at a directory, or remove what is there"
                        .into(),
                ),
                _ => io_err(path, "opening the state directory")(e),
            }),
        };
        let stat = rustix::fs::fstat(&fd)
            .map_err(|e| io_err(path, "inspecting the state directory")(e.into()))?;
        let daemon = rustix::process::geteuid().as_raw();
        if stat.st_uid != daemon && daemon == 0 {
            // Root meeting the service user's directory: `sweep` run by hand, most likely.
            return Err(refuse(format!(
                "is owned by {}, not by the daemon's uid 0 (root), so that user could replace its files; if it is a service's state directory, run keybroker as its user (sudo -u {} keybroker ...), else chown it to root or point state_dir at a directory of root's",
                crate::files::describe_uid(stat.st_uid),
                crate::users::user_name(stat.st_uid).unwrap_or_else(|| format!("#{}", stat.st_uid)),
            )));
        }
        if stat.st_uid != daemon {
            return Err(refuse(format!(
                "is owned by {}, not by the daemon's {}, so that user could replace its files; chown it to the daemon's user, or point state_dir at a directory of its own",
                crate::files::describe_uid(stat.st_uid),
                crate::files::describe_uid(daemon),
            )));
        }
        let mode = stat.st_mode & 0o7777;
        if mode & 0o022 != 0 {
            return Err(refuse(format!(
                "has mode {mode:04o}, which lets other users replace its files; chmod 700 it"
            )));
        }
        Ok(StateDir {
            path: path.to_path_buf(),
            fd,
        })
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens `name` in the directory with `flags`, never through a symlink; a file it creates
    /// is 0600.
    fn open_file(
        &self,
        name: &str,
        flags: OFlags,
        what: &'static str,
    ) -> Result<File, LedgerError> {
        let path = self.path.join(name);
        let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        match rustix::fs::openat(&self.fd, name, flags, Mode::from_raw_mode(0o600)) {
            Ok(fd) => Ok(File::from(fd)),
            Err(rustix::io::Errno::LOOP) => {
                let target = rustix::fs::readlinkat(&self.fd, name, Vec::new())
                    .map_or_else(|_| "?".into(), |t| t.to_string_lossy().into_owned());
                Err(LedgerError::Symlink { path, target })
            }
            Err(e) => Err(io_err(&path, what)(e.into())),
        }
    }

    /// Opens (creating if needed) `name` for writing with `flags`, and makes it 0600 even if it
    /// was there with another mode.
    fn open_private(
        &self,
        name: &str,
        flags: OFlags,
        what: &'static str,
    ) -> Result<File, LedgerError> {
        let file = self.open_file(name, flags | OFlags::CREATE, what)?;
        rustix::fs::fchmod(&file, Mode::from_raw_mode(0o600))
            .map_err(|e| io_err(&self.path.join(name), what)(e.into()))?;
        Ok(file)
    }

    /// The content of `name`, or `None` if there is no such file.
    pub fn read(&self, name: &str) -> Result<Option<Vec<u8>>, LedgerError> {
        let mut file = match self.open_file(name, OFlags::RDONLY, "reading") {
            Ok(f) => f,
            Err(LedgerError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        let mut content = Vec::new();
        file.read_to_end(&mut content)
            .map_err(io_err(&self.path.join(name), "reading"))?;
        Ok(Some(content))
    }

    /// Replaces the content of `name` (mode 0600) with `content`, synced.
    pub fn write(&self, name: &str, content: &[u8]) -> Result<(), LedgerError> {
        let path = self.path.join(name);
        let mut file = self.open_private(name, OFlags::WRONLY | OFlags::TRUNC, "writing")?;
        file.write_all(content)
            .and_then(|()| file.sync_all())
            .map_err(io_err(&path, "writing"))
    }
}

/// The open ledger, holding the state dir's lock.
#[derive(Debug)]
pub struct Ledger {
    dir: StateDir,
    path: PathBuf,
    file: Mutex<File>,
    _lock: File,
    /// Leases with no `revoked` record yet (as of the last replay or compaction and the
    /// appends since): the metrics' ledger backlog.
    open: Mutex<std::collections::HashSet<String>>,
    /// Records waiting for the next write, and how far the writes have come.
    queue: Mutex<Queue>,
    /// Signalled when a write ends.
    written: std::sync::Condvar,
}

/// Group commit: an append queues its line, and whichever caller finds no write under way
/// writes every queued line and syncs them with one `fdatasync`, while the others wait for it.
/// So many profiles minting at once pay for a few syncs, not one each.
#[derive(Debug, Default)]
struct Queue {
    pending: Vec<u8>,
    /// Records queued so far, numbered from 1.
    queued: u64,
    /// Records written and synced.
    synced: u64,
    /// A caller is writing.
    writing: bool,
    /// Writes that failed: the records each held (numbers after the first, up to the second)
    /// and why. Kept for the callers still to see it; a disk that fails is rare.
    failed: Vec<(u64, u64, &'static str, io::ErrorKind, String)>,
}

impl Ledger {
    /// Opens (creating if needed, see [`StateDir::open`]) the ledger in `state_dir` and takes
    /// the state dir's lock.
    pub fn open(state_dir: &Path) -> Result<Ledger, LedgerError> {
        let dir = StateDir::open(state_dir)?;
        let lock_path = state_dir.join(LOCK);
        let mut lock = dir.open_private(LOCK, OFlags::RDWR, "opening the lock file")?;
        if rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive).is_err() {
            let mut pid = String::new();
            let _ = lock.read_to_string(&mut pid);
            return Err(LedgerError::Locked {
                dir: state_dir.to_path_buf(),
                pid: pid.trim().to_string(),
            });
        }
        lock.set_len(0)
            .map_err(io_err(&lock_path, "writing the lock file"))?;
        writeln!(lock, "{}", std::process::id())
            .map_err(io_err(&lock_path, "writing the lock file"))?;
        let file = open_append(&dir)?;
        Ok(Ledger {
            path: state_dir.join(LEDGER),
            dir,
            file: Mutex::new(file),
            _lock: lock,
            open: Mutex::default(),
            queue: Mutex::default(),
            written: std::sync::Condvar::new(),
        })
    }

    /// The state directory (for its other files, such as the instance id).
    pub fn state_dir(&self) -> &StateDir {
        &self.dir
    }

    /// The ledger file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `record` and waits until it is on disk, written and synced with the records
    /// other callers appended meanwhile.
    pub fn append(&self, record: &Record) -> Result<(), LedgerError> {
        let mut line = serde_json::to_vec(record).expect("records serialize");
        line.push(b'\n');
        let mut queue = self.queue.lock().expect("ledger lock poisoned");
        queue.pending.extend_from_slice(&line);
        queue.queued += 1;
        let mine = queue.queued;
        loop {
            let failed = queue
                .failed
                .iter()
                .find(|(after, upto, ..)| (*after + 1..=*upto).contains(&mine));
            if let Some((_, _, what, kind, message)) = failed {
                let source = io::Error::new(*kind, message.clone());
                return Err(io_err(&self.path, what)(source));
            }
            if queue.synced >= mine {
                break;
            }
            if queue.writing {
                queue = self.written.wait(queue).expect("ledger lock poisoned");
                continue;
            }
            // No write under way: this caller writes every queued line, its own included.
            queue.writing = true;
            let batch = std::mem::take(&mut queue.pending);
            let (after, upto) = (queue.synced, queue.queued);
            drop(queue);
            let outcome = self.write_batch(&batch);
            queue = self.queue.lock().expect("ledger lock poisoned");
            queue.writing = false;
            // The next batch starts after this one, whether it was written or not.
            queue.synced = upto;
            if let Err((what, e)) = outcome {
                queue
                    .failed
                    .push((after, upto, what, e.kind(), e.to_string()));
            }
            self.written.notify_all();
        }
        drop(queue);
        let mut open = self.open.lock().expect("ledger lock poisoned");
        match record {
            Record::Intent { lease, .. } => open.insert(lease.clone()),
            Record::Revoked { lease, .. } => open.remove(lease),
            Record::Minted { .. } => false,
        };
        Ok(())
    }

    /// Writes and syncs `batch`; the error names the step that failed.
    fn write_batch(&self, batch: &[u8]) -> Result<(), (&'static str, io::Error)> {
        let mut file = self.file.lock().expect("ledger lock poisoned");
        file.write_all(batch)
            .map_err(|e| ("appending to the ledger", e))?;
        file.sync_data().map_err(|e| ("syncing the ledger", e))
    }

    /// How many leases are open: keys alive and creates whose outcome is unknown.
    pub fn backlog(&self) -> usize {
        self.open.lock().expect("ledger lock poisoned").len()
    }

    fn set_open(&self, open: &[OpenLease]) {
        *self.open.lock().expect("ledger lock poisoned") =
            open.iter().map(|l| l.lease.clone()).collect();
    }

    /// Reads every record and works out which leases are still open.
    pub fn replay(&self) -> Result<Replay, LedgerError> {
        let file = self
            .dir
            .open_file(LEDGER, OFlags::RDONLY, "reading the ledger")?;
        let mut reader = BufReader::new(file);
        let mut replay = Replay::default();
        let mut leases: BTreeMap<String, (usize, OpenLease)> = BTreeMap::new();
        let mut buf = Vec::new();
        let mut number = 0;
        loop {
            buf.clear();
            let n = reader
                .read_until(b'\n', &mut buf)
                .map_err(io_err(&self.path, "reading the ledger"))?;
            if n == 0 {
                break;
            }
            number += 1;
            if buf.last() != Some(&b'\n') {
                replay.torn_tail = true;
                break;
            }
            let text = String::from_utf8_lossy(&buf);
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            match serde_json::from_str::<Record>(text) {
                Ok(Record::Intent {
                    lease,
                    profile,
                    provider,
                    tag,
                    at,
                }) => {
                    let open = OpenLease {
                        lease: lease.clone(),
                        profile,
                        provider,
                        tag,
                        at,
                        minted: None,
                    };
                    leases.insert(lease, (number, open));
                }
                Ok(Record::Minted {
                    lease,
                    key_id,
                    handle,
                    expires_at,
                }) => match leases.get_mut(&lease) {
                    Some((_, open)) => open.minted = Some((key_id, handle, expires_at)),
                    None => replay
                        .bad_lines
                        .push((number, format!("minted record for unknown lease {lease}"))),
                },
                Ok(Record::Revoked { lease, .. }) => {
                    leases.remove(&lease);
                }
                Err(e) => replay.bad_lines.push((number, e.to_string())),
            }
        }
        let mut open: Vec<(usize, OpenLease)> = leases.into_values().collect();
        open.sort_by_key(|(n, _)| *n);
        replay.open = open.into_iter().map(|(_, l)| l).collect();
        self.set_open(&replay.open);
        Ok(replay)
    }

    /// Rewrites the ledger to hold only `open` (written to a new file, synced, renamed over
    /// the old one), so that it does not grow without bound.
    pub fn compact(&self, open: &[OpenLease]) -> Result<(), LedgerError> {
        let tmp = self.dir.path.join(LEDGER_TMP);
        // A copy a crash left behind is stale; O_EXCL then makes the file anew, private.
        match rustix::fs::unlinkat(&self.dir.fd, LEDGER_TMP, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(io_err(&tmp, "removing a stale compacted ledger")(e.into())),
        }
        let mut out = self.dir.open_file(
            LEDGER_TMP,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
            "creating the compacted ledger",
        )?;
        for lease in open {
            let mut lines = vec![Record::Intent {
                lease: lease.lease.clone(),
                profile: lease.profile.clone(),
                provider: lease.provider,
                tag: lease.tag.clone(),
                at: lease.at.clone(),
            }];
            if let Some((key_id, handle, expires_at)) = &lease.minted {
                lines.push(Record::Minted {
                    lease: lease.lease.clone(),
                    key_id: key_id.clone(),
                    handle: handle.clone(),
                    expires_at: expires_at.clone(),
                });
            }
            for record in lines {
                let mut line = serde_json::to_vec(&record).expect("records serialize");
                line.push(b'\n');
                out.write_all(&line)
                    .map_err(io_err(&tmp, "writing the compacted ledger"))?;
            }
        }
        out.sync_all()
            .map_err(io_err(&tmp, "syncing the compacted ledger"))?;
        let mut file = self.file.lock().expect("ledger lock poisoned");
        rustix::fs::renameat(&self.dir.fd, LEDGER_TMP, &self.dir.fd, LEDGER).map_err(|e| {
            io_err(&self.path, "replacing the ledger with its compacted copy")(e.into())
        })?;
        rustix::fs::fsync(&self.dir.fd)
            .map_err(|e| io_err(&self.dir.path, "syncing the state directory")(e.into()))?;
        *file = open_append(&self.dir)?;
        drop(file);
        self.set_open(open);
        Ok(())
    }
}

/// The ledger, open for appending, mode 0600 (an existing file keeps its mode on open: it is
/// made private again).
fn open_append(dir: &StateDir) -> Result<File, LedgerError> {
    dir.open_private(
        LEDGER,
        OFlags::WRONLY | OFlags::APPEND,
        "opening the ledger",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn intent(lease: &str) -> Record {
        Record::Intent {
            lease: lease.into(),
            profile: "p".into(),
            provider: ProviderKind::Coreweave,
            tag: format!("keybroker-h-i-{lease}"),
            at: "2026-11-23T18:00:00Z".into(),
        }
    }

    /// Appends from many threads at once share writes: every record is there, whole, once,
    /// and each append returned only after its own was written.
    #[test]
    fn concurrent_appends_are_written_whole_and_once() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        std::thread::scope(|scope| {
            for t in 0..16 {
                let ledger = &ledger;
                scope.spawn(move || {
                    for i in 0..50 {
                        let lease = format!("{t:02}{i:02}");
                        ledger.append(&intent(&lease)).unwrap();
                        let text = std::fs::read_to_string(ledger.path()).unwrap();
                        assert!(text.contains(&format!("\"lease\":\"{lease}\"")));
                    }
                });
            }
        });
        let replay = ledger.replay().unwrap();
        assert!(replay.bad_lines.is_empty(), "{:?}", replay.bad_lines);
        assert_eq!(replay.open.len(), 800);
        assert_eq!(ledger.backlog(), 800);
    }

    #[test]
    fn open_leases_are_those_without_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        ledger.append(&intent("a")).unwrap();
        ledger
            .append(&Record::Minted {
                lease: "a".into(),
                key_id: "K".into(),
                handle: "K".into(),
                expires_at: "x".into(),
            })
            .unwrap();
        ledger.append(&intent("b")).unwrap();
        ledger.append(&intent("c")).unwrap();
        ledger
            .append(&Record::Revoked {
                lease: "b".into(),
                at: "x".into(),
            })
            .unwrap();
        let replay = ledger.replay().unwrap();
        let ids: Vec<&str> = replay.open.iter().map(|l| l.lease.as_str()).collect();
        assert_eq!(ids, ["a", "c"]);
        assert_eq!(replay.open[0].minted.as_ref().unwrap().0, "K");
        assert!(replay.bad_lines.is_empty() && !replay.torn_tail);
        let mode = std::fs::metadata(ledger.path())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);

        ledger.compact(&replay.open).unwrap();
        let again = ledger.replay().unwrap();
        assert_eq!(again.open, replay.open);
        ledger
            .append(&Record::Revoked {
                lease: "a".into(),
                at: "x".into(),
            })
            .unwrap();
        assert_eq!(
            ledger.replay().unwrap().open.len(),
            1,
            "appends go to the compacted file"
        );
    }

    #[test]
    fn torn_tails_and_garbage_are_skipped_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        ledger.append(&intent("a")).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(ledger.path())
            .unwrap()
            .write_all(b"not json at all\n{\"event\":\"bogus\"}\n{\"event\":\"intent\",\"lea")
            .unwrap();
        let replay = ledger.replay().unwrap();
        assert_eq!(replay.open.len(), 1);
        assert!(replay.torn_tail);
        assert_eq!(
            replay.bad_lines.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            [2, 3]
        );
    }

    #[test]
    fn a_second_opener_is_refused_with_the_holders_pid() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Ledger::open(dir.path()).unwrap();
        match Ledger::open(dir.path()) {
            Err(LedgerError::Locked { pid, .. }) => assert_eq!(pid, std::process::id().to_string()),
            other => panic!("expected Locked, got {other:?}"),
        }
    }
}
