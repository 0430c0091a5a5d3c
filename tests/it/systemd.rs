//! systemd integration: the notify protocol on a real datagram socket, socket activation with
//! LISTEN_FDS, and the unit files judged by systemd-analyze.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keybroker::clock::Clock;

use crate::fake_cloud::{FakeCloud, Faults};
use crate::harness::{Daemon, Env, BIN};

/// One datagram from the daemon, and what the fake had seen when it arrived.
#[derive(Debug, Clone)]
struct Note {
    text: String,
    live_keys: usize,
    revokes: u64,
}

/// READY=1 only once prewarm has minted every profile's key; WATCHDOG=1 at half the
/// interval; STATUS= lines with key counts; STOPPING=1 before any revoke.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_socket_sees_ready_after_prewarm_watchdog_and_stopping_before_revokes() {
    let fake = FakeCloud::new(Clock::System);
    fake.set_faults(Faults {
        create_latency: Duration::from_millis(300),
        ..Faults::default()
    });
    let url = fake.serve().await;
    let env = Env::new();
    let mut text = fake.profile_toml("coreweave", "a", &url, &env, "");
    text.push_str(&fake.profile_toml("glesys", "b", &url, &env, ""));
    let config = env.config(&text);

    let notify_path = env.path("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let notes = Arc::new(Mutex::new(Vec::<Note>::new()));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (notes, done, fake) = (Arc::clone(&notes), Arc::clone(&done), Arc::clone(&fake));
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(n) = notify.recv(&mut buf) {
                    let note = Note {
                        text: String::from_utf8_lossy(&buf[..n]).into_owned(),
                        live_keys: fake.live().len(),
                        revokes: fake.calls("revoke"),
                    };
                    notes.lock().unwrap().push(note);
                }
            }
        })
    };
    let notify_path = notify_path.display().to_string();
    let vars = [
        ("NOTIFY_SOCKET", notify_path.as_str()),
        ("WATCHDOG_USEC", "300000"),
    ];
    let mut daemon: Daemon = tokio::task::block_in_place(|| env.serve_with(&config, "info", &vars));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, _) = tokio::task::block_in_place(|| daemon.stop(Duration::from_secs(25)));
    assert!(status.success());
    tokio::time::sleep(Duration::from_millis(200)).await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.join().unwrap();

    let notes = notes.lock().unwrap().clone();
    let first = |needle: &str| {
        notes
            .iter()
            .position(|n| n.text.lines().any(|l| l == needle))
    };
    let ready = first("READY=1").unwrap_or_else(|| panic!("no READY=1 in {notes:?}"));
    let stopping = first("STOPPING=1").unwrap_or_else(|| panic!("no STOPPING=1 in {notes:?}"));
    assert!(ready < stopping);
    assert_eq!(
        notes[ready].live_keys, 2,
        "READY=1 came before prewarm minted both keys: {notes:?}"
    );
    assert!(
        notes[ready].text.contains("STATUS=2 profiles: 2 ready"),
        "{:?}",
        notes[ready]
    );
    let pings = notes
        .iter()
        .filter(|n| n.text.lines().any(|l| l == "WATCHDOG=1"))
        .count();
    assert!(
        pings >= 4,
        "{pings} watchdog pings in 1.5 s at a 300 ms watchdog: {notes:?}"
    );
    assert_eq!(
        notes[stopping].revokes, 0,
        "STOPPING=1 after a revoke: {notes:?}"
    );
    assert_eq!(fake.calls("revoke"), 2);
    assert!(fake.live().is_empty());
}

/// Socket activation: the daemon serves on the socket passed as fd 3 with LISTEN_FDS=1 and
/// LISTEN_PID, and leaves the socket file to systemd at stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_passed_by_listen_fds_is_served_and_left_in_place() {
    let env = Env::new();
    let config = env.config("[profiles.d]\nprovider = \"dev\"\n");
    let path = env.path("activated.sock");
    let listener = UnixListener::bind(&path).unwrap();
    // The shell moves the socket from stdin to fd 3 and names itself (then the daemon) in
    // LISTEN_PID, as systemd would.
    let script = format!(
        "exec 3<&0 0</dev/null; LISTEN_FDS=1 LISTEN_PID=$$ exec {BIN} serve --config {}",
        config.display()
    );
    let mut child = env
        .program("sh", &["-c", &script])
        .env("KEYBROKER_SOCKET", env.path("not-used.sock"))
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(listener)))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        match keybroker::client::get(&path, "/v1/credentials/d", Duration::from_secs(2)) {
            Ok(a) if a.status == 200 => break a.body,
            _ => {
                assert!(
                    Instant::now() < deadline,
                    "the activated socket was never served"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert!(String::from_utf8_lossy(&body).contains("\"AccessKeyId\""));
    assert!(
        !env.path("not-used.sock").exists(),
        "the daemon bound no socket of its own"
    );
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    assert!(tokio::task::block_in_place(|| child.wait())
        .unwrap()
        .success());
    assert!(
        path.exists(),
        "the socket file belongs to systemd and stays"
    );
}

/// `systemd-analyze verify` is clean for both units and `systemd-analyze security --offline=yes`
/// rates the service 2.0 or lower; the unit's stop timeout leaves room for shutdown_timeout.
#[test]
fn unit_files_pass_systemd_analyze() {
    let dir = tempfile::tempdir().unwrap();
    let units = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd");
    let service = std::fs::read_to_string(format!("{units}/keybroker.service")).unwrap();
    // verify checks that ExecStart exists: point it at the binary under test.
    std::fs::write(
        dir.path().join("keybroker.service"),
        service.replace("/usr/local/bin/keybroker", BIN),
    )
    .unwrap();
    std::fs::copy(
        format!("{units}/keybroker.socket"),
        dir.path().join("keybroker.socket"),
    )
    .unwrap();
    let analyze = |args: &[&str]| {
        std::process::Command::new("systemd-analyze")
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("systemd-analyze (package systemd) is needed; ./scripts/test.sh installs it")
    };
    let verify = analyze(&["verify", "keybroker.service", "keybroker.socket"]);
    let said = String::from_utf8_lossy(&verify.stderr).into_owned()
        + &String::from_utf8_lossy(&verify.stdout);
    assert!(
        verify.status.success() && said.trim().is_empty(),
        "verify: {said}"
    );

    let security = analyze(&["security", "--offline=yes", "keybroker.service"]);
    let out = String::from_utf8_lossy(&security.stdout);
    let exposure: f64 = out
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for keybroker.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {out}"));
    assert!(exposure <= 2.0, "exposure {exposure}:\n{out}");

    for line in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "WatchdogSec=30",
        "StateDirectory=keybroker",
    ] {
        assert!(
            service.lines().any(|l| l == line),
            "{line} missing from the unit"
        );
    }
    let stop: u64 = service
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(
        stop > keybroker::config::DEFAULT_SHUTDOWN_TIMEOUT.as_secs(),
        "TimeoutStopSec={stop}"
    );
}

/// The bare name each provider's secret has in the README and the example config, under the
/// profile key that names it.
const SECRET_NAMES: [(&str, &str, &str); 3] = [
    ("glesys", "api_key_file", "glesys-key"),
    ("coreweave", "token_file", "coreweave-token"),
    ("crusoe", "secret_key_file", "crusoe-secret"),
];

/// An install that uses one provider (GleSYS, then each other one) has only that provider's
/// secret in /etc/keybroker. The shipped unit, its paths moved under a temp root, passes
/// `systemd-analyze verify`; systemd would start it without the other providers' files; and the
/// daemon, started by the unit's ExecStart= with the credentials directory systemd would make,
/// serves the profile from the fake cloud.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_provider_install_starts_without_the_other_providers_secrets() {
    let fake = FakeCloud::new(Clock::System);
    let url = fake.serve().await;
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/keybroker.service"
    ))
    .unwrap();
    for (provider, key, name) in SECRET_NAMES {
        let env = Env::new();
        let root = env.path("root");
        let etc = root.join("etc/keybroker");
        std::fs::create_dir_all(&etc).unwrap();
        let unit = shipped
            .replace("/usr/local/bin/keybroker", BIN)
            .replace("/etc/keybroker", etc.to_str().unwrap());
        std::fs::write(root.join("keybroker.service"), &unit).unwrap();
        let verify = std::process::Command::new("systemd-analyze")
            .args(["verify", "keybroker.service"])
            .current_dir(&root)
            .output()
            .expect("systemd-analyze (package systemd) is needed; ./scripts/test.sh installs it");
        let said = String::from_utf8_lossy(&verify.stderr).into_owned()
            + &String::from_utf8_lossy(&verify.stdout);
        assert!(
            verify.status.success() && said.trim().is_empty(),
            "verify: {said}"
        );

        // The fake's profile, its secret moved to /etc/keybroker under the bare name.
        let profile = fake.profile_toml(provider, "p", &url, &env, "");
        let prefix = format!("{key} = ");
        let config: String = profile
            .lines()
            .map(|line| match line.strip_prefix(&prefix) {
                Some(path) => {
                    std::fs::rename(path.trim_matches('"'), etc.join(name)).unwrap();
                    format!("{key} = \"{name}\"\n")
                }
                None => format!("{line}\n"),
            })
            .collect();
        std::fs::write(etc.join("keybroker.toml"), config).unwrap();
        let mut present: Vec<_> = std::fs::read_dir(&etc)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        present.sort();
        assert_eq!(present, [name, "keybroker.toml"]);

        let credentials = root.join("run/credentials/keybroker.service");
        if let Err(why) = load_credentials(&unit, &credentials) {
            panic!("systemd would not start the unit with only {name}: {why}");
        }
        let exec = unit
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .unwrap();
        let argv: Vec<&str> = exec.split_whitespace().collect();
        let mut command = env.program(argv[0], &argv[1..]);
        command.env("CREDENTIALS_DIRECTORY", &credentials);
        let mut daemon = tokio::task::block_in_place(|| env.start_daemon(command, env.socket()));
        let (code, stdout, stderr) =
            tokio::task::block_in_place(|| env.run(&["credential-process", "--profile", "p"]));
        assert_eq!(code, 0, "{provider}: {stderr}\n{}", daemon.logs());
        let live = fake.live();
        assert!(
            live.len() == 1
                && live[0].provider == provider
                && stdout.contains(&format!("\"AccessKeyId\":\"{}\"", live[0].id)),
            "{provider}: served {stdout}, the fake holds {live:?}"
        );
        let (status, _) = tokio::task::block_in_place(|| daemon.stop(Duration::from_secs(25)));
        assert!(status.success(), "{provider}: {}", daemon.logs());
        assert!(
            fake.live().is_empty(),
            "{provider}: a key outlived the stop"
        );
        // systemd made the directory read-only; make it removable again.
        std::fs::set_permissions(&credentials, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
}

/// Fills `dir` as systemd fills `$CREDENTIALS_DIRECTORY` from the unit's credential settings,
/// per systemd.exec(5) (systemd 252, "Credentials"): LoadCredential=ID:PATH copies the file
/// PATH to ID; if PATH is missing, that is fatal to the unit (status 243/CREDENTIALS) unless a
/// SetCredential= of the same ID exists, whose VALUE (C escapes allowed) then becomes ID. Files
/// and directory end up read-only for the service's user. Settings it does not model (directory
/// or credstore sources, encrypted or imported credentials) fail the test rather than pass by
/// accident.
fn load_credentials(unit: &str, dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).unwrap();
    let settings: Vec<(&str, &str)> = unit
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with(';'))
        .filter_map(|l| l.split_once('='))
        .collect();
    let defaults: Vec<(&str, &str)> = settings
        .iter()
        .filter(|(k, _)| *k == "SetCredential")
        .map(|(_, v)| v.split_once(':').expect("SetCredential=ID:VALUE"))
        .collect();
    let write = |id: &str, data: &[u8]| {
        let path = dir.join(id);
        std::fs::write(&path, data).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
    };
    for (key, value) in &settings {
        match *key {
            "LoadCredential" => {
                let (id, source) = value.split_once(':').expect("LoadCredential=ID:PATH");
                let source = Path::new(source);
                assert!(
                    source.is_absolute() && !source.is_dir(),
                    "not modelled: {key}={value}"
                );
                match std::fs::read(source) {
                    Ok(data) => write(id, &data),
                    Err(e)
                        if e.kind() == std::io::ErrorKind::NotFound
                            && defaults.iter().any(|(d, _)| *d == id) => {}
                    Err(e) => return Err(format!("{key}={value}: {e}")),
                }
            }
            "LoadCredentialEncrypted" | "SetCredentialEncrypted" | "ImportCredential" => {
                panic!("not modelled: {key}={value}")
            }
            _ => {}
        }
    }
    for (id, value) in defaults {
        let value = value.replace("\\n", "\n");
        assert!(
            !value.contains('\\'),
            "not modelled: SetCredential={id}:{value}"
        );
        if !dir.join(id).exists() {
            write(id, value.as_bytes());
        }
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o500)).unwrap();
    Ok(())
}

/// SIGHUP with a profile added, one removed and one unchanged: the removed profile is served no
/// more but its key stays valid until the Expiration it was served with (then, or at stop, it
/// is revoked), the unchanged one keeps its key (no new mint), the added one mints, and a
/// connection opened before the reload keeps working. An invalid file keeps the old config
/// and the log says why, with the file position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_removes_and_keeps_profiles_without_dropping_connections() {
    use http_body_util::{BodyExt, Empty};
    let fake = FakeCloud::new(Clock::System);
    let url = fake.serve().await;
    let env = Env::new();
    let keep = fake.profile_toml("coreweave", "keep", &url, &env, "");
    let gone = fake.profile_toml("glesys", "gone", &url, &env, "");
    let added = fake.profile_toml("crusoe", "added", &url, &env, "");
    let config = env.config(&format!("{keep}\n{gone}"));
    let mut daemon = tokio::task::block_in_place(|| env.serve(&config, "info"));
    let wait = |what: &str, ok: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ok() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    tokio::task::block_in_place(|| wait("two prewarmed keys", &|| fake.live().len() == 2));
    let key_of = |provider: &str| {
        fake.live()
            .into_iter()
            .find(|k| k.provider == provider)
            .map(|k| k.id)
    };
    let (keep_key, gone_key) = (key_of("coreweave").unwrap(), key_of("glesys").unwrap());

    // A keep-alive connection from before the reload.
    let stream = tokio::net::UnixStream::connect(&daemon.socket)
        .await
        .unwrap();
    let (mut conn, driver) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(driver);
    let ask = async |conn: &mut hyper::client::conn::http1::SendRequest<Empty<bytes::Bytes>>| {
        let req = http::Request::get("/v1/credentials/keep")
            .header("host", "kb")
            .body(Empty::new())
            .unwrap();
        let resp = conn
            .send_request(req)
            .await
            .expect("the connection survives");
        assert_eq!(resp.status(), 200);
        crate::harness::key_id(&resp.into_body().collect().await.unwrap().to_bytes())
    };
    assert_eq!(ask(&mut conn).await, keep_key);

    std::fs::write(&config, format!("{keep}\n{added}")).unwrap();
    daemon.signal(rustix::process::Signal::HUP);
    tokio::task::block_in_place(|| {
        wait("the added profile's key", &|| key_of("crusoe").is_some());
    });
    assert!(
        fake.key(&gone_key).unwrap().revoked_at.is_none(),
        "the removed profile's key was revoked before its Expiration"
    );
    assert_eq!(
        ask(&mut conn).await,
        keep_key,
        "the unchanged profile kept its key"
    );
    assert_eq!(
        fake.calls("create"),
        3,
        "no re-mint of the unchanged profile"
    );
    let (code, _, stderr) = env.run(&["credential-process", "--profile", "gone"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("no profile named \"gone\""), "{stderr}");
    assert_eq!(env.run(&["credential-process", "--profile", "added"]).0, 0);

    std::fs::write(&config, format!("{keep}\n{added}lifetime = \"0s\"\n")).unwrap();
    daemon.signal(rustix::process::Signal::HUP);
    tokio::task::block_in_place(|| {
        wait("the reload error in the log", &|| {
            daemon.logs().contains("keeping the running config")
        })
    });
    let logs = daemon.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("keeping the running config"))
        .unwrap();
    assert!(
        line.contains(&format!("{}:", config.display()))
            && line.contains("lifetime must be greater than zero"),
        "{line}"
    );
    assert_eq!(ask(&mut conn).await, keep_key);
    assert_eq!(
        env.run(&["credential-process", "--profile", "added"]).0,
        0,
        "the old config still serves"
    );
    assert_eq!(fake.calls("create"), 3);

    let (status, _) = tokio::task::block_in_place(|| daemon.stop(Duration::from_secs(25)));
    assert!(status.success(), "{}", daemon.logs());
    assert!(fake.key(&gone_key).unwrap().revoked_at.is_some());
    assert!(fake.live().is_empty());
}

/// Signals that come while the daemon is still starting (here: its prewarm mint takes 3 s)
/// are not fatal: SIGHUP is a reload once start-up is done, SIGTERM the usual ordered stop.
/// Without handlers installed first thing, both would end the process by default action.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_during_start_up_are_handled_not_fatal() {
    let fake = FakeCloud::new(Clock::System);
    fake.set_faults(Faults {
        create_latency: Duration::from_secs(3),
        ..Faults::default()
    });
    let url = fake.serve().await;
    let env = Env::new();
    let config = env.config(&fake.profile_toml("coreweave", "cw", &url, &env, ""));
    let mut daemon = tokio::task::block_in_place(|| env.serve(&config, "info"));
    let (_, status, _) = tokio::task::block_in_place(|| env.run(&["status", "--json"]));
    assert!(status.contains("\"minting\""), "still starting: {status}");
    daemon.signal(rustix::process::Signal::HUP);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        daemon.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "SIGHUP during start-up killed the daemon: {}",
        daemon.logs()
    );
    let (status, _) = tokio::task::block_in_place(|| daemon.stop(Duration::from_secs(25)));
    assert!(status.success(), "{status}: {}", daemon.logs());
    assert!(
        fake.live().is_empty(),
        "the key minted meanwhile was revoked"
    );
    assert!(daemon.logs().contains("SIGTERM received"));
}
