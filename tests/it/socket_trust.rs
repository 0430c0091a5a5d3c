//! A client trusts only the daemon it should: one run by itself, by root, or by the user root
//! gave the socket's directory to. Each case runs in a private mount namespace with a fresh
//! tmpfs on /tmp (and /run), so the host's /tmp/keybroker-1000 is never touched; the daemon and
//! the client run as other users through setpriv. Needs root (CI runs as root).

use crate::harness::{in_private_namespace, Env};

/// Between the client's stderr and the daemon's log on the script's stderr.
const LOG_MARK: &str = "--- daemon log\n";

/// In the namespace: a daemon as `$1` on `$2/keybroker.sock` (a dev profile uid 1000 may
/// read, socket mode 0666); once its socket is there, `credential-process --profile dev` as uid
/// 1000 with neither XDG_RUNTIME_DIR nor KEYBROKER_SOCKET set, so it picks its default path;
/// then SIGTERM to the daemon, which revokes its key (and the end of the pid namespace kills
/// whatever is left). The script's exit code, stdout and stderr
/// are the client's, followed on stderr by the daemon's log. The current directory holds the
/// binary, reachable only as `.` once the tmpfs hides the host's /tmp (it may be under /tmp).
const SCRIPT: &str = r#"
set -eu
uid=$1 dir=$2
mount -t tmpfs -o mode=1777 keybroker-test /tmp
cp ./keybroker /tmp/keybroker
chmod 0755 /tmp/keybroker
if [ "$dir" = /run/keybroker ]; then
    mount -t tmpfs -o mode=0755 keybroker-test /run
    mkdir -m 0755 /run/keybroker
    chown "$uid:$uid" /run/keybroker
fi
printf '[server]\nsocket_mode = "0666"\n\n[profiles.dev]\nprovider = "dev"\nallow_uids = [1000]\n' >/tmp/keybroker.toml
chmod 0644 /tmp/keybroker.toml
mkdir -m 0700 /tmp/state /tmp/home
chown "$uid:$uid" /tmp/state
chown 1000:1000 /tmp/home
setpriv --reuid="$uid" --regid="$uid" --clear-groups env -i PATH="$PATH" \
    KEYBROKER_SOCKET="$dir/keybroker.sock" STATE_DIRECTORY=/tmp/state RUST_LOG=debug \
    /tmp/keybroker serve --config /tmp/keybroker.toml >/dev/null 2>/tmp/daemon.log &
daemon=$!
trap 'kill -KILL "$daemon" 2>/dev/null || true' EXIT
n=0
until [ -S "$dir/keybroker.sock" ]; do
    if ! kill -0 "$daemon" 2>/dev/null || [ "$n" -ge 400 ]; then
        echo "no daemon socket at $dir/keybroker.sock" >&2
        cat /tmp/daemon.log >&2
        exit 98
    fi
    n=$((n + 1))
    sleep 0.05
done
set +e
setpriv --reuid=1000 --regid=1000 --clear-groups env -i PATH="$PATH" HOME=/tmp/home \
    /tmp/keybroker credential-process --profile dev
code=$?
kill -TERM "$daemon"
wait "$daemon"
stopped=$?
set -e
trap - EXIT
printf '%s' "--- daemon log
" >&2
cat /tmp/daemon.log >&2
[ "$stopped" -eq 0 ] || { echo "the daemon exited $stopped" >&2; exit 97; }
exit "$code"
"#;

/// What a uid-1000 client did against a daemon run as `server_uid` in `dir`: (exit code,
/// stdout, its stderr, the daemon's log).
fn client_against(server_uid: u32, dir: &str) -> (i32, String, String, String) {
    let env = Env::new();
    let uid = server_uid.to_string();
    let out = in_private_namespace(&env, SCRIPT, &[&uid, dir]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let code = out.status.code().unwrap_or(-1);
    let Some((client, log)) = stderr.split_once(LOG_MARK) else {
        panic!("the script failed ({code}): {stderr}");
    };
    (code, stdout, client.to_string(), log.to_string())
}

/// A socket planted by uid 65534 at the path a uid-1000 client would pick makes
/// `credential-process` exit 1 naming the socket's owner; no key is printed, no request sent.
#[test]
fn a_socket_another_user_planted_in_tmp_is_refused() {
    let (code, stdout, stderr, log) = client_against(65534, "/tmp/keybroker-1000");
    assert!(
        stdout.is_empty(),
        "a key was printed ({} bytes)",
        stdout.len()
    );
    assert_eq!(code, 1, "{stderr}\n{log}");
    assert!(
        stderr.starts_with(
            "keybroker: refusing the keybroker socket at /tmp/keybroker-1000/keybroker.sock: it is served by uid 65534 (nobody), which is neither you (uid 1000) nor root"
        ) && stderr.contains("/tmp, the parent of its directory /tmp/keybroker-1000, is writable by group or others (mode 1777)")
            && stderr.contains("remove it, or point --socket or KEYBROKER_SOCKET at your daemon"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(log.contains("minted key"), "{log}");
    assert!(
        !log.contains("/v1/credentials"),
        "a request was sent: {log}"
    );
}

/// The same path served by the client's own daemon, or by root's, is used: the check is
/// selective.
#[test]
fn the_callers_own_daemon_and_roots_are_trusted() {
    for server in [1000, 0] {
        let (code, stdout, stderr, log) = client_against(server, "/tmp/keybroker-1000");
        assert_eq!(code, 0, "daemon uid {server}: {stderr}\n{log}");
        assert!(stdout.contains("\"AccessKeyId\""), "{stdout}");
        assert!(log.contains("/v1/credentials/dev"), "{log}");
    }
}

/// A daemon run as a service user in a directory root made for it (`/run/keybroker`, as
/// systemd's RuntimeDirectory= does) is trusted; a uid-1000 client with no daemon of its own
/// finds it with no flags.
#[test]
fn a_daemon_in_the_directory_root_gave_it_is_trusted() {
    let (code, stdout, stderr, log) = client_against(65534, "/run/keybroker");
    assert_eq!(code, 0, "{stderr}\n{log}");
    assert!(stdout.contains("\"AccessKeyId\""), "{stdout}");
}
