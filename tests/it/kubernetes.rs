//! deploy/kubernetes: the manifests validate against the Kubernetes schemas and agree with
//! the config they carry (`tests/e2e/kubernetes_manifests.py`), and the node directory
//! `install-node` lays out works as the DaemonSet uses it: a daemon run as another user serves
//! keys from it to a workload's uid through a read-only mount of it, with the copied binary.

use crate::harness::{in_private_namespace, python, Env, BIN};

#[test]
fn the_manifests_validate_and_agree_with_their_config() {
    let env = Env::new();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/e2e/kubernetes_manifests.py"
    );
    let work = env.path("work");
    std::fs::create_dir(&work).unwrap();
    let out = env
        .program(
            python().to_str().unwrap(),
            &[script, BIN, work.to_str().unwrap()],
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    // Base (namespace, account, config, DaemonSet), the Workload Identity variant of the same
    // four, and the example's ConfigMap and Job.
    assert_eq!(summary["objects"], 10, "{stdout}");
    let version = summary["kubernetes"].as_str().unwrap();
    assert!(
        version.starts_with("1.3"),
        "validated for Kubernetes {version}"
    );
}

/// In a private mount and pid namespace, with a fresh tmpfs on /tmp: `install-node` as root
/// (twice: the second run changes nothing), its refusals, then the DaemonSet's arrangement:
/// the daemon as uid 65532 on DIR/socket, `probe ready` as the kubelet runs it, and a
/// workload's uid 1000 running DIR/bin/keybroker through a read-only bind mount of DIR. The
/// daemon's clean stop (exit 0) means its key was revoked. Lines starting "check:" are what
/// the test asserts on.
const SCRIPT: &str = r#"
set -eu
mount -t tmpfs -o mode=1777 keybroker-test /tmp
mkdir -m 0755 /tmp/image
cp ./keybroker /tmp/image/keybroker
chmod 0755 /tmp/image/keybroker
kb=/tmp/image/keybroker

$kb install-node /tmp/node --daemon-user 65532:65532
$kb install-node /tmp/node --daemon-user=65532:65532
echo "check: layout $(stat -c '%u:%g:%a' /tmp/node /tmp/node/bin /tmp/node/bin/keybroker /tmp/node/socket | tr '\n' ' ')"
cmp -s $kb /tmp/node/bin/keybroker && echo "check: the copy is the binary"
setpriv --reuid=65532 --regid=65532 --clear-groups sh -c 'mv /tmp/node/bin /tmp/node/b 2>/dev/null || touch /tmp/node/bin/x 2>/dev/null' \
    || echo "check: the daemon user cannot change the binary"

set +e
setpriv --reuid=1000 --regid=1000 --clear-groups $kb install-node /tmp/other --daemon-user 65532:65532 2>&1
echo "check: as uid 1000 exit $?"
$kb install-node /tmp/node --daemon-user keybroker 2>&1
echo "check: bad user exit $?"
mkdir -m 0777 /tmp/open
$kb install-node /tmp/open --daemon-user 65532:65532 2>&1
echo "check: open dir exit $?"
set -e

printf '[server]\nsocket = "/tmp/node/socket/keybroker.sock"\nsocket_mode = "0666"\nstate_dir = "/tmp/state"\n\n[profiles.dev]\nprovider = "dev"\nprewarm = true\nallow_uids = [1000]\n' >/tmp/keybroker.toml
chmod 0644 /tmp/keybroker.toml
mkdir -m 0700 /tmp/state /tmp/home
chown 65532:65532 /tmp/state
chown 1000:1000 /tmp/home
setpriv --reuid=65532 --regid=65532 --clear-groups env -i PATH="$PATH" \
    $kb serve --config /tmp/keybroker.toml >/dev/null 2>/tmp/daemon.log &
daemon=$!
trap 'kill -KILL "$daemon" 2>/dev/null || true; cat /tmp/daemon.log >&2' EXIT
probe() {
    setpriv --reuid=65532 --regid=65532 --clear-groups env -i \
        $kb probe "$1" --socket=/tmp/node/socket/keybroker.sock 2>/dev/null
}
n=0
until probe ready; do
    if ! kill -0 "$daemon" 2>/dev/null || [ "$n" -ge 400 ]; then
        echo "the daemon never became ready" >&2
        exit 98
    fi
    n=$((n + 1))
    sleep 0.05
done
echo "check: ready"

# The workload pod's view: the hostPath mounted read-only elsewhere.
mkdir -p /tmp/pod/run/keybroker
mount --bind /tmp/node /tmp/pod/run/keybroker
mount -o remount,bind,ro /tmp/pod/run/keybroker
setpriv --reuid=1000 --regid=1000 --clear-groups env -i HOME=/tmp/home \
    /tmp/pod/run/keybroker/bin/keybroker credential-process --profile dev \
    --socket /tmp/pod/run/keybroker/socket/keybroker.sock >/tmp/key.json
echo "check: key $(grep -o '"AccessKeyId"' /tmp/key.json)"

kill -TERM "$daemon"
set +e
wait "$daemon"
echo "check: daemon exit $?"
"#;

#[test]
fn install_node_lays_out_the_directory_the_daemonset_shares() {
    let env = Env::new();
    let out = in_private_namespace(&env, SCRIPT, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let checks: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("check: "))
        .collect();
    let installed = stdout
        .lines()
        .filter(|l| l.starts_with("/tmp/node/bin/keybroker: installed ("))
        .count();
    assert_eq!(installed, 1, "{stdout}");
    assert!(
        stdout.contains("/tmp/node/bin/keybroker: unchanged\n")
            && stdout.contains(
                "/tmp/node/socket: the daemon's socket directory, for uid 65532 gid 65532, mode 0755\n"
            ),
        "{stdout}"
    );
    let want = [
        "layout 0:0:755 0:0:755 0:0:755 65532:65532:755 ",
        "the copy is the binary",
        "the daemon user cannot change the binary",
    ];
    assert_eq!(checks[..3], want, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("keybroker: install-node runs as root")
            && checks.contains(&"as uid 1000 exit 1"),
        "{stdout}"
    );
    assert!(
        stdout.contains("--daemon-user \"keybroker\" is not UID:GID in numbers")
            && checks.contains(&"bad user exit 64"),
        "{stdout}"
    );
    assert!(
        stdout.contains("keybroker: /tmp/open is writable by group or others (mode 0777); clients would not trust a daemon under it")
            && checks.contains(&"open dir exit 1"),
        "{stdout}"
    );
    let tail = &checks[checks.len() - 3..];
    assert_eq!(tail[0], "ready", "{stdout}\n{stderr}");
    assert!(tail[1] == "key \"AccessKeyId\"", "{stdout}");
    assert_eq!(tail[2], "daemon exit 0", "{stderr}");
    assert!(stderr.contains("revoked"), "{stderr}");
}
