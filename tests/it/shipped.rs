//! The shipped build needs nothing from the machine it runs on: in a directory that holds only
//! the binary, its config and a CA bundle at the standard path (what `Containerfile` puts in a
//! `FROM scratch` image), `chroot`ed into, it mints over HTTPS trusting that bundle, serves the
//! key to `credential-process`, and revokes it at stop.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;

use keybroker::clock::Clock;

use crate::fake_cloud::{stop_leaving_no_key, FakeCloud};
use crate::harness::Env;

/// The shipped (static) binary: `$KEYBROKER_SHIPPED_BIN` (scripts/test.sh builds it first),
/// else built now by scripts/build-release.sh.
fn shipped_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("KEYBROKER_SHIPPED_BIN") {
        return bin.into();
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/build-release.sh");
    let out = Command::new(script).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn write(path: PathBuf, text: &str, mode: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_binary_serves_keys_from_an_otherwise_empty_root() {
    assert!(
        rustix::process::getuid().is_root(),
        "this test chroots and needs root (CI runs as root)"
    );
    let bin = tokio::task::block_in_place(shipped_binary);
    let fake = FakeCloud::new(Clock::System);
    let (url, ca_pem) = fake.serve_tls().await;
    let env = Env::new();
    let root = env.path("root");
    for dir in ["run", "state"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::copy(&bin, root.join("keybroker")).unwrap();
    // Where a scratch image keeps its roots, and where keybroker looks for the system's.
    write(
        root.join("etc/ssl/certs/ca-certificates.crt"),
        &ca_pem,
        0o644,
    );
    write(root.join("etc/hosts"), "127.0.0.1 localhost\n", 0o644);
    write(root.join("etc/cw-token"), fake.token(), 0o600);
    write(
        root.join("etc/keybroker.toml"),
        &format!(
            "[server]\nsocket = \"/run/kb.sock\"\nstate_dir = \"/state\"\n\n[profiles.p]\nprovider = \"coreweave\"\nendpoint = \"{url}\"\ntoken_file = \"/etc/cw-token\"\n"
        ),
        0o644,
    );
    let mut serve = Command::new("/usr/sbin/chroot");
    serve
        .arg(&root)
        .args(["/keybroker", "serve", "--config", "/etc/keybroker.toml"]);
    serve.env_clear();
    let mut daemon =
        tokio::task::block_in_place(|| env.start_daemon(serve, root.join("run/kb.sock")));

    let out = tokio::task::block_in_place(|| {
        Command::new("/usr/sbin/chroot")
            .arg(&root)
            .args([
                "/keybroker",
                "credential-process",
                "--profile",
                "p",
                "--socket",
                "/run/kb.sock",
            ])
            .env_clear()
            .output()
            .unwrap()
    });
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        daemon.logs()
    );
    let served: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let live = fake.live();
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(served["AccessKeyId"], live[0].id.as_str());

    stop_leaving_no_key(&mut daemon, &fake);
}
