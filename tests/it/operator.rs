//! What an operator sees: the admin commands (rotate, revoke, revoke-principal) through the
//! real binary, their authorization, `/metrics` read by a real Prometheus parser, journald
//! output under systemd, completions and the man page.

use std::os::unix::process::CommandExt;
use std::sync::Arc;
use std::time::Duration;

use keybroker::clock::Clock;

use crate::fake_cloud::{FakeCloud, COREWEAVE_PRINCIPAL};
use crate::harness::{get, key_id, Daemon, Env, BIN};

async fn wait_until(what: &str, ok: impl FnMut() -> bool) {
    crate::harness::wait_until(what, Duration::from_secs(15), ok).await
}

/// Runs the binary without blocking the runtime that serves the fake.
fn run(env: &Env, args: &[&str]) -> (i32, String, String) {
    tokio::task::block_in_place(|| env.run(args))
}

/// A daemon with a CoreWeave profile `cw` and a GleSYS profile `gl` against the fake.
async fn setup() -> (Env, Arc<FakeCloud>, Daemon) {
    let fake = FakeCloud::new(Clock::System);
    let url = fake.serve().await;
    let env = Env::new();
    let cw = fake.profile_toml("coreweave", "cw", &url, &env, "");
    let gl = fake.profile_toml("glesys", "gl", &url, &env, "");
    let config = env.config(&format!("[server]\nsocket_mode = \"0666\"\n\n{cw}\n{gl}"));
    let daemon = tokio::task::block_in_place(|| env.serve(&config, "info"));
    wait_until("both prewarmed keys", || fake.live().len() == 2).await;
    (env, fake, daemon)
}

fn live_ids(fake: &FakeCloud, provider: &str) -> Vec<String> {
    let mut ids: Vec<String> = fake
        .live()
        .into_iter()
        .filter(|k| k.provider == provider)
        .map(|k| k.id)
        .collect();
    ids.sort();
    ids
}

fn served(env: &Env, profile: &str) -> String {
    let (code, stdout, stderr) = run(env, &["credential-process", "--profile", profile]);
    assert_eq!(code, 0, "{stderr}");
    key_id(stdout.as_bytes())
}

fn status_json(env: &Env) -> (i32, serde_json::Value) {
    let (code, stdout, stderr) = run(env, &["status", "--json"]);
    let v = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout} {stderr}"));
    (code, v)
}

fn profile_status<'a>(v: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    v["profiles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap()
}

/// rotate: a new key now, the old one retired but alive; revoke: every key gone, 503 until
/// the next rotate; each with its output and exit code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_and_revoke_change_keys_as_they_say() {
    let (env, fake, mut daemon) = setup().await;
    let old = served(&env, "cw");

    let (code, stdout, stderr) = run(&env, &["rotate", "cw"]);
    assert_eq!(code, 0, "{stderr}");
    let new = served(&env, "cw");
    assert_ne!(new, old);
    assert_eq!(
        stdout.lines().next().unwrap().split(", ").next().unwrap(),
        format!("profile cw: new key {new}"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("the old key {old} is retired")),
        "{stdout}"
    );
    let mut both = vec![old.clone(), new.clone()];
    both.sort();
    assert_eq!(
        live_ids(&fake, "coreweave"),
        both,
        "the retired key lives on"
    );
    let (code, v) = status_json(&env);
    assert_eq!(code, 0);
    let cw = profile_status(&v, "cw");
    assert_eq!(
        (cw["state"].as_str(), cw["retired_keys"].as_u64()),
        (Some("ready"), Some(1))
    );

    let (code, stdout, stderr) = run(&env, &["revoke", "cw"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.starts_with("profile cw: revoked ")
            && stdout.contains(&old)
            && stdout.contains(&new)
            && stdout.contains("until keybroker rotate cw"),
        "{stdout}"
    );
    assert!(
        live_ids(&fake, "coreweave").is_empty(),
        "every cw key revoked"
    );
    assert_eq!(
        live_ids(&fake, "glesys").len(),
        1,
        "other profiles untouched"
    );
    let creates = fake.calls("create");
    let (code, stdout, stderr) = run(&env, &["credential-process", "--profile", "cw"]);
    assert_eq!((code, stdout.as_str()), (1, ""));
    assert!(
        stderr.contains("an operator revoked its keys") && stderr.contains("keybroker rotate cw"),
        "{stderr}"
    );
    let (code, v) = status_json(&env);
    assert_eq!(code, 1, "a revoked profile is not healthy");
    assert_eq!(profile_status(&v, "cw")["state"], "revoked");
    let (code, table, _) = run(&env, &["status"]);
    assert_eq!(code, 1);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("cw ") && l.ends_with("revoked")),
        "{table}"
    );
    assert_eq!(fake.calls("create"), creates, "no mint while revoked");

    let (code, stdout, stderr) = run(&env, &["rotate", "cw"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stdout.contains("retired"), "nothing to retire: {stdout}");
    let back = served(&env, "cw");
    assert!(back != old && back != new);
    assert_eq!(live_ids(&fake, "coreweave"), vec![back]);

    let (code, stdout, stderr) = run(&env, &["rotate", "nope"]);
    assert_eq!((code, stdout.as_str()), (1, ""));
    assert!(
        stderr.contains("rotate nope: no profile named \"nope\""),
        "{stderr}"
    );
    let (code, _, stderr) = run(&env, &["rotate"]);
    assert_eq!(code, 64, "usage: {stderr}");

    assert!(daemon.stop(Duration::from_secs(25)).0.success());
    assert!(fake.live().is_empty(), "{:?}", fake.live());
}

/// revoke-principal: refused without --yes (nothing called), CoreWeave only, and with --yes
/// every key of the principal is gone and the profile holds until a rotate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_principal_needs_yes_and_coreweave() {
    let (env, fake, mut daemon) = setup().await;
    let args = ["revoke-principal", "--profile", "cw", COREWEAVE_PRINCIPAL];
    let (code, stdout, stderr) = run(&env, &args);
    assert_eq!((code, stdout.as_str()), (64, ""));
    assert!(
        stderr.contains("revokes EVERY key of coreweave/fake-token-id")
            && stderr.contains("Nothing was done; add --yes"),
        "{stderr}"
    );
    assert_eq!(fake.calls("revoke_principal"), 0);
    assert_eq!(live_ids(&fake, "coreweave").len(), 1);

    let (code, _, stderr) = run(
        &env,
        &["revoke-principal", "--profile", "gl", "someone", "--yes"],
    );
    assert_eq!(code, 1);
    assert!(
        stderr.contains("uses glesys, which has no call that revokes a principal's keys"),
        "{stderr}"
    );

    let (code, _, stderr) = run(
        &env,
        &[
            "revoke-principal",
            "--profile",
            "cw",
            "coreweave/unknown",
            "--yes",
        ],
    );
    assert_eq!(code, 1);
    assert!(
        stderr.contains("revoking the keys of principal coreweave/unknown failed")
            && stderr.contains("principal not found"),
        "{stderr}"
    );
    assert_eq!(
        live_ids(&fake, "coreweave").len(),
        1,
        "a failed call changes nothing"
    );
    served(&env, "cw");

    let mut yes = args.to_vec();
    yes.push("--yes");
    let (code, stdout, stderr) = run(&env, &yes);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.starts_with("principal coreweave/fake-token-id: every key revoked")
            && stdout.contains("until keybroker rotate cw"),
        "{stdout}"
    );
    assert_eq!(fake.calls("revoke_principal"), 2);
    assert!(live_ids(&fake, "coreweave").is_empty());
    assert_eq!(
        run(&env, &["credential-process", "--profile", "cw"]).0,
        1,
        "held until a rotate"
    );
    assert_eq!(run(&env, &["rotate", "cw"]).0, 0);
    assert_eq!(live_ids(&fake, "coreweave").len(), 1);

    assert!(daemon.stop(Duration::from_secs(25)).0.success());
    assert!(fake.live().is_empty(), "{:?}", fake.live());
}

/// Admin calls, status and metrics are for root and the daemon's user: another uid gets 403
/// and nothing changes. Needs root to run a client as `nobody`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_from_another_uid_get_403_and_change_nothing() {
    use std::os::unix::fs::PermissionsExt;
    assert!(
        rustix::process::getuid().is_root(),
        "this test runs clients as uid 65534 and needs root (CI runs as root)"
    );
    let (env, fake, mut daemon) = setup().await;
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = |args: &[&str]| tokio::task::block_in_place(|| env.run_as(65534, args));
    let before = live_ids(&fake, "coreweave");
    let calls = fake.total_calls();
    for args in [
        &["rotate", "cw"][..],
        &["revoke", "cw"],
        &[
            "revoke-principal",
            "--profile",
            "cw",
            COREWEAVE_PRINCIPAL,
            "--yes",
        ],
    ] {
        let (code, stdout, stderr) = as_nobody(args);
        assert_eq!((code, stdout.as_str()), (1, ""), "{args:?}");
        assert!(
            stderr.contains("access denied: uid 65534 (gid 65534) is not allowed: admin calls are for root and the daemon's user"),
            "{args:?}: {stderr}"
        );
    }
    // /metrics, over a raw socket as nobody.
    let script = "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\ns.sendall(b'GET /metrics HTTP/1.0\\r\\nHost: k\\r\\n\\r\\n')\nd=b''\nwhile True:\n  c=s.recv(65536)\n  if not c: break\n  d+=c\nprint(d.decode())";
    let out = tokio::task::block_in_place(|| {
        std::process::Command::new("python3")
            .args(["-c", script, daemon.socket.to_str().unwrap()])
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    });
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("HTTP/1.0 403") && text.contains("metrics are for root"),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(live_ids(&fake, "coreweave"), before);
    assert_eq!(fake.total_calls(), calls, "no upstream call was made");
    assert!(daemon.stop(Duration::from_secs(25)).0.success());
    assert!(fake.live().is_empty());
}

/// `/metrics` parses as Prometheus text and counts what happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_count_what_happened() {
    use prometheus_parse::Value;
    let (env, fake, mut daemon) = setup().await;
    served(&env, "cw");
    assert_eq!(run(&env, &["credential-process", "--profile", "nope"]).0, 1);
    assert_eq!(run(&env, &["rotate", "cw"]).0, 0);

    let (status, headers, body) = get(&daemon.socket, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = String::from_utf8(body.to_vec()).unwrap();
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("parses");
    let sample = |name: &str, labels: &[(&str, &str)]| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}"))
            .value
            .clone()
    };
    let number = |name: &str, labels: &[(&str, &str)]| match sample(name, labels) {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
        other => panic!("{name}: {other:?}"),
    };
    let cw = [("profile", "cw"), ("provider", "coreweave")];
    assert_eq!(number("keybroker_mints_total", &cw), 2.0);
    assert_eq!(number("keybroker_renewals_total", &cw), 1.0);
    assert_eq!(number("keybroker_retired_keys", &cw), 1.0);
    assert_eq!(
        number(
            "keybroker_mints_total",
            &[("profile", "gl"), ("provider", "glesys")]
        ),
        1.0
    );
    let left = number("keybroker_key_remaining_seconds", &cw);
    assert!(left > 3000.0 && left <= 3600.0, "{left}");
    let state = |s: &str| {
        number(
            "keybroker_profile_state",
            &[("profile", "cw"), ("state", s)],
        )
    };
    assert_eq!((state("ready"), state("revoked")), (1.0, 0.0));
    assert!(number("keybroker_http_responses_total", &[("code", "200")]) >= 2.0);
    assert_eq!(
        number("keybroker_http_responses_total", &[("code", "404")]),
        1.0
    );
    assert_eq!(
        number("keybroker_ledger_backlog", &[]),
        3.0,
        "two cw keys and one gl key open"
    );
    match sample(
        "keybroker_upstream_request_duration_seconds",
        &[("profile", "cw"), ("operation", "mint")],
    ) {
        Value::Histogram(h) => {
            let inf = h.iter().find(|b| b.less_than.is_infinite()).unwrap();
            assert_eq!(inf.count, 2.0, "{h:?}");
            assert!(
                h.windows(2).all(|w| w[0].count <= w[1].count),
                "cumulative: {h:?}"
            );
        }
        other => panic!("not a histogram: {other:?}"),
    }
    // Every family has HELP and TYPE; no key id or secret appears.
    for family in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let name = family.split(' ').next().unwrap();
        assert!(text.contains(&format!("# HELP {name} ")), "{name}");
    }
    for secret in fake.secrets() {
        assert!(!text.contains(&secret));
    }
    for key in fake.keys() {
        assert!(!text.contains(&key.id), "metrics name no key ids");
    }

    assert!(daemon.stop(Duration::from_secs(25)).0.success());
    assert!(fake.live().is_empty());
}

/// One journald native-protocol entry: `KEY=value` lines, or `KEY\n<u64 le length><value>\n`.
fn journal_fields(datagram: &[u8]) -> std::collections::BTreeMap<String, String> {
    let mut fields = std::collections::BTreeMap::new();
    let mut rest = datagram;
    while !rest.is_empty() {
        let nl = rest.iter().position(|&b| b == b'\n').expect("a newline");
        let line = &rest[..nl];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            fields.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
            rest = &rest[nl + 1..];
        } else {
            let len = u64::from_le_bytes(rest[nl + 1..nl + 9].try_into().unwrap()) as usize;
            let value = &rest[nl + 9..nl + 9 + len];
            fields.insert(
                String::from_utf8_lossy(line).into_owned(),
                String::from_utf8_lossy(value).into_owned(),
            );
            rest = &rest[nl + 9 + len + 1..];
        }
    }
    fields
}

/// Under systemd ($JOURNAL_STREAM naming its stderr) the daemon logs to journald natively:
/// one entry per lifecycle step with PROFILE and KEY_ID fields and the level as PRIORITY,
/// never a secret, and nothing on stderr. The journal socket is the test's own, bound into a
/// private mount namespace over /run (needs root, or an unprivileged user namespace).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_systemd_logs_go_to_journald_with_fields() {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::net::UnixDatagram;
    let fake = FakeCloud::new(Clock::System);
    let url = fake.serve().await;
    let env = Env::new();
    let cw = fake.profile_toml("coreweave", "cw", &url, &env, "");
    let config = env.config(&cw);
    let run_dir = env.path("run");
    std::fs::create_dir_all(run_dir.join("systemd/journal")).unwrap();
    let journal = UnixDatagram::bind(run_dir.join("systemd/journal/socket")).unwrap();
    journal
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let log = env.path("daemon.log");
    let stderr = std::fs::File::create(&log).unwrap();
    let meta = stderr.metadata().unwrap();
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    let mut daemon = serve_with_run_dir(
        &env,
        &run_dir,
        &config,
        &[],
        &[("JOURNAL_STREAM", &stream)],
        stderr,
    );
    wait_until("the prewarmed key", || fake.live().len() == 1).await;
    let key = fake.live()[0].id.clone();
    assert!(daemon.stop(Duration::from_secs(25)).0.success());

    let mut entries = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    while let Ok(n) = journal.recv(&mut buf) {
        if n > 0 {
            entries.push((buf[..n].to_vec(), journal_fields(&buf[..n])));
        }
    }
    let find = |message: &str| {
        entries
            .iter()
            .map(|(_, f)| f)
            .find(|f| f.get("MESSAGE").map(String::as_str) == Some(message))
            .unwrap_or_else(|| panic!("no {message:?} entry in {entries:?}"))
    };
    let minted = find("minted key");
    assert_eq!(minted["KEY_ID"], key);
    assert_eq!(minted["PROFILE"], "cw");
    assert_eq!(minted["PROVIDER"], "coreweave");
    assert_eq!(minted["PRIORITY"], "6");
    assert_eq!(minted["SYSLOG_IDENTIFIER"], "keybroker");
    let revoked = find("revoked key");
    assert_eq!(
        (revoked["KEY_ID"].as_str(), revoked["WHY"].as_str()),
        (key.as_str(), "stop")
    );
    assert!(entries.len() >= 5, "{entries:?}");
    for (raw, _) in &entries {
        for secret in fake.secrets().iter().chain([&fake.token().to_string()]) {
            assert!(
                !raw.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "a secret reached the journal"
            );
        }
    }
    assert_eq!(
        daemon.logs(),
        "",
        "nothing on stderr when journald takes the logs"
    );
    assert!(fake.live().is_empty());
}

/// Starts `serve --config` in a private mount namespace whose /run is `run_dir`, so that the
/// daemon's /run/systemd/journal/socket is whatever the test put there (needs root, or an
/// unprivileged user namespace).
fn serve_with_run_dir(
    env: &Env,
    run_dir: &std::path::Path,
    config: &std::path::Path,
    extra_args: &[&str],
    vars: &[(&str, &str)],
    stderr: std::fs::File,
) -> Daemon {
    let mut args = vec!["--mount", "--propagation", "private"];
    if !rustix::process::getuid().is_root() {
        args.push("--map-root-user");
    }
    let script = "mount --bind \"$1\" /run && shift && exec \"$@\"";
    args.extend([
        "sh",
        "-c",
        script,
        "sh",
        run_dir.to_str().unwrap(),
        BIN,
        "serve",
        "--config",
    ]);
    args.push(config.to_str().unwrap());
    args.extend(extra_args);
    let child = env
        .program("unshare", &args)
        .envs(vars.iter().copied())
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut daemon = Daemon {
        child: Some(child),
        log: env.path("daemon.log"),
        socket: env.socket(),
    };
    tokio::task::block_in_place(|| daemon.wait_ready());
    daemon
}

/// `--log-format journald` with no journald: one warning on stderr, then text logs there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journald_unreachable_falls_back_to_stderr() {
    let env = Env::new();
    let config = env.config("[profiles.d]\nprovider = \"dev\"\n");
    let run_dir = env.path("run-without-journald");
    std::fs::create_dir_all(&run_dir).unwrap();
    let stderr = std::fs::File::create(env.path("daemon.log")).unwrap();
    let mut daemon = serve_with_run_dir(
        &env,
        &run_dir,
        &config,
        &["--log-format", "journald"],
        &[],
        stderr,
    );
    // The prewarm's mint is logged before the stop, not revoked mid-flight by it.
    wait_until("the prewarmed key", || daemon.logs().contains("minted key")).await;
    assert!(daemon.stop(Duration::from_secs(25)).0.success());
    let logs = daemon.logs();
    assert!(
        logs.lines().next().unwrap().contains(
            "journald is not reachable at /run/systemd/journal/socket; logging to stderr"
        ),
        "{logs}"
    );
    assert!(logs.contains("minted key"), "{logs}");
}

/// Completions for bash name every command; the man pages render with every command, exit
/// codes, environment and files.
#[test]
fn completions_and_man_pages_come_from_the_command_line_definition() {
    let env = Env::new();
    let (code, script, stderr) = env.run(&["completions", "bash"]);
    assert_eq!(code, 0, "{stderr}");
    for command in [
        "serve",
        "credential-process",
        "status",
        "rotate",
        "revoke",
        "revoke-principal",
        "check-config",
        "sweep",
        "probe",
    ] {
        assert!(script.contains(command), "{command}");
    }
    // bash accepts the script and registers the completion.
    let path = env.path("keybroker.bash");
    std::fs::write(&path, &script).unwrap();
    let out = std::process::Command::new("bash")
        .args([
            "-c",
            &format!("source {} && complete -p keybroker", path.display()),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("keybroker"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for shell in ["zsh", "fish"] {
        let (code, script, _) = env.run(&["completions", shell]);
        assert_eq!(code, 0);
        assert!(script.contains("revoke-principal"), "{shell}");
    }
    assert_eq!(env.run(&["completions", "tcsh"]).0, 64);

    let (code, page, _) = env.run(&["man"]);
    assert_eq!(code, 0);
    assert!(page.contains(".TH keybroker 1"), "{page}");
    for section in [
        ".SH SYNOPSIS",
        ".SH SUBCOMMANDS",
        ".SH \"EXIT STATUS\"",
        ".SH ENVIRONMENT",
        ".SH FILES",
    ] {
        assert!(page.contains(section), "{section}");
    }
    assert!(page.contains("keybroker\\-revoke\\-principal(1)"));
    let dir = env.path("man1");
    std::fs::create_dir(&dir).unwrap();
    let (code, listed, _) = env.run(&["man", "--dir", dir.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert_eq!(listed.lines().count(), 15, "{listed}");
    assert!(listed.contains("/keybroker-install-node.1\n"), "{listed}");
    let sub = std::fs::read_to_string(dir.join("keybroker-revoke-principal.1")).unwrap();
    assert!(
        sub.contains(".TH keybroker-revoke-principal 1") && sub.contains("\\-\\-yes"),
        "{sub}"
    );
}

/// When the provider fails: a failed rotation says why and leaves the served key alone; a
/// revoke that fails is reported, stays with the daemon and is retried until it succeeds; a
/// revoke whose client gives up is carried out all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_under_provider_failures_leave_no_key_behind() {
    use crate::fake_cloud::Faults;
    let (env, fake, mut daemon) = setup().await;
    let old = served(&env, "cw");

    fake.set_faults(Faults {
        create_status: Some((500, "control plane down".into())),
        ..Faults::default()
    });
    let (code, stdout, stderr) = run(&env, &["rotate", "cw"]);
    assert_eq!((code, stdout.as_str()), (1, ""));
    assert!(
        stderr.contains("rotate cw: profile cw: minting the new key failed")
            && stderr.contains("control plane down"),
        "{stderr}"
    );
    assert_eq!(served(&env, "cw"), old, "the old key is still served");

    fake.set_faults(Faults {
        fail_revokes: true,
        ..Faults::default()
    });
    let (code, stdout, stderr) = run(&env, &["revoke", "cw"]);
    assert_eq!((code, stdout.as_str()), (1, ""));
    assert!(
        stderr.contains(&format!("could not revoke {old}"))
            && stderr.contains("revoke failed (injected); retrying"),
        "{stderr}"
    );
    assert_eq!(live_ids(&fake, "coreweave"), vec![old.clone()]);
    assert_eq!(
        run(&env, &["credential-process", "--profile", "cw"]).0,
        1,
        "held, even though the key is not revoked yet"
    );
    fake.set_faults(Faults::default());
    wait_until("the failed revoke retried", || {
        live_ids(&fake, "coreweave").is_empty()
    })
    .await;

    // A client that gives up before the (slow) revoke is done: the daemon finishes it.
    assert_eq!(run(&env, &["rotate", "gl"]).0, 0);
    fake.set_faults(Faults {
        revoke_latency: Duration::from_secs(2),
        ..Faults::default()
    });
    let gave_up = tokio::task::block_in_place(|| {
        keybroker::client::request(
            &daemon.socket,
            "POST",
            "/v1/admin/revoke/gl",
            None,
            Duration::from_millis(300),
        )
    });
    assert!(gave_up.unwrap_err().contains("did not answer within"));
    wait_until("both gl keys revoked after the client left", || {
        live_ids(&fake, "glesys").is_empty()
    })
    .await;

    assert!(daemon.stop(Duration::from_secs(25)).0.success());
    assert!(fake.live().is_empty(), "{:?}", fake.live());
}

/// `keybroker probe`, for Kubernetes exec probes: `live` passes once the daemon answers;
/// `ready` fails (exit 1, naming the profile and why) while the prewarmed key is being minted
/// and passes once it is served; both fail with no daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_live_and_ready_follow_the_daemon() {
    let env = Env::new();
    let (code, _, err) = run(&env, &["probe", "live"]);
    assert_eq!(code, 1, "no daemon: {err}");
    assert!(err.contains("no keybroker socket at"), "{err}");
    let config = env.config("[profiles.slow]\nprovider = \"dev\"\nmint_delay = \"4s\"\n");
    let mut daemon = tokio::task::block_in_place(|| env.serve(&config, "info"));
    let (code, _, err) = run(&env, &["probe", "live"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(&env, &["probe", "ready"]);
    assert_eq!(code, 1, "before the prewarmed key: {err}");
    assert!(err.contains("not ready: slow (minting:"), "{err}");
    wait_until("the prewarmed key", || daemon.logs().contains("minted key")).await;
    let (code, out, err) = run(&env, &["probe", "ready"]);
    assert_eq!((code, out.as_str()), (0, ""), "{err}");
    let (code, _, err) = run(&env, &["probe", "sideways"]);
    assert_eq!(
        code, 1,
        "a refused probe line exits 1 like every client failure: {err}"
    );
    assert!(
        tokio::task::block_in_place(|| daemon.stop(Duration::from_secs(25)))
            .0
            .success()
    );
}

/// `status` has no size cap: 4,000 profiles make an answer of several MiB, listed whole by
/// `status --json`; `status PROFILE...` asks for those only, and an unknown name is refused.
#[test]
fn status_lists_thousands_of_profiles_and_filters_by_name() {
    let env = Env::new();
    let mut toml = String::new();
    for i in 0..4000 {
        toml += &format!("[profiles.p{i}]\nprovider = \"dev\"\nprewarm = false\n");
    }
    let config = env.config(&toml);
    let mut daemon = env.serve(&config, "warn");
    // The daemon answers while it is still setting profiles up: wait for all of them.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (out, listed) = loop {
        let (code, out, err) = env.run(&["status", "--json"]);
        assert_eq!(code, 0, "{err}");
        let all: serde_json::Value = serde_json::from_str(&out).unwrap();
        let listed = all["profiles"].as_array().unwrap().len();
        if listed == 4000 || std::time::Instant::now() > deadline {
            break (out, listed);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(listed, 4000);
    assert!(out.len() > 1 << 20, "only {} bytes", out.len());

    let (code, out, err) = env.run(&["status", "--json", "p7", "p3999"]);
    assert_eq!(code, 0, "{err}");
    let some: serde_json::Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = some["profiles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    let mut names = names;
    names.sort_unstable();
    assert_eq!(names, ["p3999", "p7"]);
    let (code, _, err) = env.run(&["status", "p7", "nope", "p8"]);
    assert_eq!(code, 1);
    assert!(err.contains("no such profile: nope"), "{err}");
    let (status, _) = daemon.stop(Duration::from_secs(20));
    assert!(status.success(), "{}", daemon.logs());
}
