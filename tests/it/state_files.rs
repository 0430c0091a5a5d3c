//! The files the daemon touches hold against a hostile local user: a state directory someone
//! else controls is refused, a symlink planted in it is never followed, every file and
//! directory the daemon makes has the mode the README states even under `umask 000`, and a
//! secret file another user owns is refused. Needs root (CI runs as root).

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::harness::{Env, BIN};

/// A config with one dev profile: serve needs no cloud.
const DEV: &str = "[profiles.p]\nprovider = \"dev\"\n";

fn assert_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test chowns files to other users and needs root (CI runs as root)"
    );
}

/// `uid 65534 (nobody)`, as /etc/passwd names it.
fn nobody() -> String {
    match keybroker::users::user_name(65534) {
        Some(name) => format!("uid 65534 ({name})"),
        None => "uid 65534".into(),
    }
}

/// Runs `serve --config config`, which must exit within 20 s (a serve that keeps running
/// fails the test): (exit code, stderr).
fn serve_exits(env: &Env, config: &Path) -> (i32, String) {
    let log = env.path("serve.log");
    let mut child = env
        .command(&["serve", "--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "serve kept running: {}",
                std::fs::read_to_string(&log).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        status.code().unwrap_or(-1),
        std::fs::read_to_string(&log).unwrap(),
    )
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// A state directory owned by another user, one others may write, and a symlink to a good
/// one: each refused with its own message, before anything is made in it or bound.
#[test]
fn serve_refuses_a_state_dir_it_does_not_control() {
    assert_root();
    type Setup = fn(&Env) -> PathBuf;
    let cases: [(&str, Setup, String); 3] = [
        (
            "owned by nobody",
            |env| {
                let dir = env.state_dir();
                std::fs::create_dir(&dir).unwrap();
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
                std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
                dir
            },
            format!(
                "is owned by {}, not by the daemon's uid 0 (root), so that user could replace its files; if it is a service's state directory, run keybroker as its user (sudo -u nobody keybroker ...), else chown it to root or point state_dir at a directory of root's",
                nobody()
            ),
        ),
        (
            "mode 0777",
            |env| {
                let dir = env.state_dir();
                std::fs::create_dir(&dir).unwrap();
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
                dir
            },
            "has mode 0777, which lets other users replace its files; chmod 700 it".into(),
        ),
        (
            "a symlink",
            |env| {
                let real = env.path("real-state");
                std::fs::create_dir(&real).unwrap();
                std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).unwrap();
                std::os::unix::fs::symlink(&real, env.state_dir()).unwrap();
                real
            },
            "is a symlink to {real}; point state_dir at the real directory".into(),
        ),
    ];
    for (what, setup, why) in cases {
        let env = Env::new();
        let inside = setup(&env);
        let why = why.replace("{real}", &inside.display().to_string());
        let (code, stderr) = serve_exits(&env, &env.config(DEV));
        assert_eq!(code, 1, "{what}: {stderr}");
        let line = format!(
            "keybroker: state directory {} {why}",
            env.state_dir().display()
        );
        assert!(
            stderr.lines().any(|l| l == line),
            "{what}: expected {line:?} in {stderr}"
        );
        assert!(
            entries(&inside).is_empty(),
            "{what}: made {:?}",
            entries(&inside)
        );
        assert!(!env.socket().exists(), "{what}: the socket was bound");
    }
}

/// A symlink planted as `lock`, `ledger.jsonl` or `instance` in a good state directory, aimed
/// at a root-only file: serve fails naming it, and the file is left as it was (a root daemon
/// used to truncate it through the lock).
#[test]
fn a_symlink_planted_in_the_state_dir_is_never_followed() {
    assert_root();
    for name in ["lock", "ledger.jsonl", "instance"] {
        let env = Env::new();
        let dir = env.state_dir();
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let target = env.path("root-only");
        std::fs::write(&target, "precious: not a keybroker file\n").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o400)).unwrap();
        std::os::unix::fs::symlink(&target, dir.join(name)).unwrap();

        let (code, stderr) = serve_exits(&env, &env.config(DEV));
        assert_eq!(code, 1, "{name}: {stderr}");
        let line = format!(
            "keybroker: {} is a symlink to {}, which keybroker never makes; remove it, and find out who put it there",
            dir.join(name).display(),
            target.display()
        );
        assert!(
            stderr.lines().any(|l| l == line),
            "{name}: expected {line:?} in {stderr}"
        );
        assert_eq!(
            std::fs::read_to_string(&target).unwrap(),
            "precious: not a keybroker file\n",
            "{name}: the target was written"
        );
        assert_eq!(mode(&target), 0o400, "{name}: the target's mode changed");
        assert!(
            std::fs::symlink_metadata(dir.join(name))
                .unwrap()
                .file_type()
                .is_symlink(),
            "{name}: the symlink was replaced"
        );
        assert!(!env.socket().exists(), "{name}: the socket was bound");
    }
}

/// What is at each path under `root`, with its mode: `d 0700` a directory, `s` a socket, `f` a
/// file.
fn tree(root: &Path, skip: &[&str]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            if skip.contains(&rel.as_str()) {
                continue;
            }
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let kind = if meta.is_dir() {
                todo.push(path.clone());
                'd'
            } else if meta.file_type().is_socket() {
                's'
            } else {
                'f'
            };
            out.insert(rel, format!("{kind} {:04o}", meta.mode() & 0o7777));
        }
    }
    out
}

/// Under `umask 000`, a daemon with a state directory and the container endpoint makes every
/// file and directory with the mode of the README's table, missing parents included: once with
/// everything private (socket 0600, no shared profile), once with a group-readable socket and
/// a token shared with a group.
#[test]
fn every_file_has_its_stated_mode_under_umask_000() {
    assert_root();
    let shared = "socket_mode = \"0660\"\n";
    let shared_profile = "[profiles.shared]\nprovider = \"dev\"\nallow_groups = [65534]\n";
    for (server, profiles, socket_dir, socket, container, tokens) in [
        ("", "", "d 0700", "s 0600", "d 0700", &[("p", "f 0600")][..]),
        (
            shared,
            shared_profile,
            "d 0755",
            "s 0660",
            "d 0755",
            &[("p", "f 0600"), ("shared", "f 0640")][..],
        ),
    ] {
        let mut expected: BTreeMap<String, String> = [
            ("var", "d 0755"),
            ("var/lib", "d 0755"),
            ("var/lib/keybroker", "d 0700"),
            ("var/lib/keybroker/lock", "f 0600"),
            ("var/lib/keybroker/ledger.jsonl", "f 0600"),
            ("var/lib/keybroker/instance", "f 0600"),
            ("run", "d 0755"),
            ("run/user", "d 0755"),
            ("run/user/keybroker", socket_dir),
            ("run/user/keybroker/container", container),
        ]
        .into_iter()
        .map(|(p, m)| (p.to_string(), m.to_string()))
        .collect();
        let stopped = expected.clone();
        expected.insert("run/user/keybroker/keybroker.sock".into(), socket.into());
        for (profile, mode) in tokens {
            expected.insert(
                format!("run/user/keybroker/container/{profile}.token"),
                mode.to_string(),
            );
        }
        let (running, after) = modes_under_umask_000(server, profiles);
        assert_eq!(running, expected, "while running, with {server:?}");
        assert_eq!(after, stopped, "after the stop, with {server:?}");
    }
}

/// Starts a daemon under `umask 000` with `server` and `profiles` added to its config (state
/// and socket directories missing, with missing parents; the container endpoint on), then
/// stops it: what it made while running and what is left after.
fn modes_under_umask_000(
    server: &str,
    profiles: &str,
) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let env = Env::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let state = env.path("var/lib/keybroker");
    let socket = env.path("run/user/keybroker/keybroker.sock");
    let config = env.config(&format!(
        "[server]\n{server}state_dir = \"{}\"\n[server.container]\nlisten = \"127.0.0.1:{port}\"\n{DEV}{profiles}",
        state.display()
    ));
    let mut command = env.program(
        "sh",
        &[
            "-c",
            "umask 000; exec \"$0\" \"$@\"",
            BIN,
            "serve",
            "--config",
            config.to_str().unwrap(),
        ],
    );
    command.env("KEYBROKER_SOCKET", &socket);
    let mut daemon = env.start_daemon(command, socket);
    let skip = ["keybroker.toml", "daemon.log"];
    let running = tree(env.dir.path(), &skip);
    if !profiles.is_empty() {
        let token = env.path("run/user/keybroker/container/shared.token");
        assert_eq!(
            std::fs::metadata(token).unwrap().gid(),
            65534,
            "the shared token's group"
        );
    }
    let (status, _) = daemon.stop(Duration::from_secs(20));
    assert!(status.success(), "{}", daemon.logs());
    (running, tree(env.dir.path(), &skip))
}

/// A private secret file owned by another user is refused by check-config and serve, naming
/// its owner; owned by root it is accepted, and so is one owned by the uid running the command.
#[test]
fn a_secret_file_another_user_owns_is_refused() {
    assert_root();
    let env = Env::new();
    let token = env.secret_file("token", "secret-token\n");
    let config = env.config(&format!(
        "[profiles.a]\nprovider = \"coreweave\"\nendpoint = \"http://127.0.0.1:1\"\nprewarm = false\ntoken_file = \"{}\"\n",
        token.display()
    ));
    let cfg = config.to_str().unwrap();
    std::os::unix::fs::chown(&token, Some(65534), Some(65534)).unwrap();
    let why = format!(
        "token_file {}: owned by {}, who could swap the secret; a secret file must belong to root: chown root {}",
        token.display(),
        nobody(),
        token.display()
    );
    let (code, _, stderr) = env.run(&["check-config", "--config", cfg]);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains(&why), "expected {why:?} in {stderr}");
    assert!(!stderr.contains("secret-token"));
    let (code, stderr) = serve_exits(&env, &config);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains(&why), "expected {why:?} in {stderr}");
    assert!(!env.socket().exists() && !env.state_dir().exists());

    // The same file, owned by the uid running check-config.
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (code, _, stderr) = env.run_as(65534, &["check-config", "--config", cfg]);
    assert_eq!(code, 0, "as its owner: {stderr}");

    std::os::unix::fs::chown(&token, Some(0), Some(0)).unwrap();
    let (code, _, stderr) = env.run(&["check-config", "--config", cfg]);
    assert_eq!(code, 0, "owned by root: {stderr}");
    let mut daemon = env.serve(&config, "info");
    let (status, _) = daemon.stop(Duration::from_secs(20));
    assert!(status.success(), "{}", daemon.logs());
}

/// A systemd credential that systemd handed to the service's user through an ACL (root's file,
/// mode 0440, group root) is read; the same file named by a path, outside
/// `$CREDENTIALS_DIRECTORY`, is read only while keybroker (root here) is in its group.
#[test]
fn a_systemd_credential_shared_by_acl_is_read() {
    assert_root();
    let env = Env::new();
    let creds = env.path("credentials");
    std::fs::create_dir(&creds).unwrap();
    let token = creds.join("coreweave-token");
    std::fs::write(&token, "secret-token\n").unwrap();
    std::os::unix::fs::chown(&token, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o440)).unwrap();
    let profile = |token_file: &str| {
        format!("[profiles.a]\nprovider = \"coreweave\"\nendpoint = \"http://127.0.0.1:1\"\nprewarm = false\ntoken_file = \"{token_file}\"\n")
    };
    let config = env.config(&profile("coreweave-token"));
    let out = env
        .command(&["check-config", "--config", config.to_str().unwrap()])
        .env("CREDENTIALS_DIRECTORY", &creds)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let config = env.config(&profile(token.to_str().unwrap()));
    let (code, _, stderr) = env.run(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    // A group root is not in.
    std::os::unix::fs::chown(&token, Some(0), Some(4242)).unwrap();
    let (code, _, stderr) = env.run(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("readable by group 4242, which keybroker is not in")
            && stderr.contains("(mode 0440)"),
        "{stderr}"
    );
}
