//! The real binary against the fake cloud over loopback: what users and operators see.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keybroker::clock::Clock;
use rustix::process::Signal;
use time::OffsetDateTime;

use crate::fake_cloud::{FakeCloud, Faults};
use crate::harness::{coreweave_profile, get, key_id, python, request, wait_until, Daemon, Env};

/// Starts the fake on loopback and a daemon with `profiles` (name, extra TOML) against it.
async fn setup(
    server: &str,
    profiles: &[(&str, &str)],
    rust_log: &str,
) -> (Env, Arc<FakeCloud>, Daemon) {
    let fake = FakeCloud::new(Clock::System);
    let url = fake.serve().await;
    let env = Env::new();
    let token = env.secret_file("cw-token", fake.token());
    let mut text = format!("[server]\n{server}\n");
    for (name, extra) in profiles {
        text.push_str(&coreweave_profile(name, &url, &token, extra));
    }
    let config = env.config(&text);
    let daemon = tokio::task::block_in_place(|| env.serve(&config, rust_log));
    (env, fake, daemon)
}

fn stop(daemon: &mut Daemon, limit: Duration) -> (std::process::ExitStatus, Duration) {
    tokio::task::block_in_place(|| daemon.stop(limit))
}

/// botocore, configured with `credential_process`, accepts what the client prints, and the key
/// it resolves has at least `min_remaining` left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn botocore_accepts_credential_process_output() {
    let (env, fake, mut daemon) = setup("", &[("train", "")], "info").await;

    let (code, stdout, stderr) = env.run(&["credential-process", "--profile", "train"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.is_empty(),
        "nothing on stderr on success: {stderr:?}"
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is only JSON");
    assert_eq!(v["Version"], 1);
    assert!(
        v.get("SessionToken").is_none(),
        "no SessionToken when the provider gives none"
    );
    let expiration = v["Expiration"].as_str().unwrap();
    assert!(
        expiration.ends_with('Z') && expiration.len() == 20,
        "{expiration}"
    );

    let aws_config = env.path("aws-config");
    std::fs::write(
        &aws_config,
        format!(
            "[profile kb]\ncredential_process = {} credential-process --profile train --socket {}\n",
            crate::harness::BIN,
            daemon.socket.display()
        ),
    )
    .unwrap();
    let script = r#"
import botocore.session, datetime, json
s = botocore.session.Session(profile="kb")
c = s.get_credentials()
f = c.get_frozen_credentials()
left = (c._expiry_time - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
print(json.dumps({"method": c.method, "key": f.access_key, "secret_len": len(f.secret_key), "left": left}))
"#;
    let out = std::process::Command::new(python())
        .args(["-c", script])
        .env("AWS_CONFIG_FILE", &aws_config)
        .env("AWS_SHARED_CREDENTIALS_FILE", env.path("no-credentials"))
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "running {}: {e}; run ./scripts/test.sh to create the venv",
                python().display()
            )
        });
    assert!(
        out.status.success(),
        "botocore failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["method"], "custom-process");
    let live = fake.live();
    assert_eq!(live.len(), 1);
    assert_eq!(seen["key"], live[0].id.as_str());
    assert_eq!(seen["secret_len"], live[0].secret.len());
    let left = seen["left"].as_f64().unwrap();
    assert!(left >= 20.0 * 60.0, "botocore sees only {left}s left");

    let (status, _) = stop(&mut daemon, Duration::from_secs(25));
    assert!(status.success());
    assert!(fake.live().is_empty());
}

/// 500 concurrent requests on a cold profile share one mint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_burst_of_500_requests_mints_once() {
    let (_env, fake, mut daemon) = setup("", &[("cold", "prewarm = false")], "info").await;
    fake.set_faults(Faults {
        create_latency: Duration::from_millis(500),
        ..Faults::default()
    });
    assert_eq!(
        fake.calls("create"),
        0,
        "prewarm = false mints nothing at start"
    );
    let socket = daemon.socket.clone();
    let tasks: Vec<_> = (0..500)
        .map(|_| {
            let socket = socket.clone();
            tokio::spawn(async move { get(&socket, "/v1/credentials/cold").await })
        })
        .collect();
    let mut ids = std::collections::HashSet::new();
    let mut waited = None;
    for t in tasks {
        let (status, headers, body) = t.await.unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        assert_eq!(headers["cache-control"], "no-store");
        ids.insert(key_id(&body));
        waited = Some((headers, body));
    }
    assert_eq!(fake.calls("create"), 1, "exactly one mint for the burst");
    assert_eq!(ids.len(), 1);

    // The key is ready now: the answer that needs no wait is the same, headers and bytes, and
    // HEAD gets those headers with no body.
    let (waited_headers, waited_body) = waited.unwrap();
    let (status, headers, body) = get(&socket, "/v1/credentials/cold").await;
    assert_eq!(status, 200);
    assert_eq!(body, waited_body);
    let (status, head_headers, head_body) =
        request(&socket, http::Method::HEAD, "/v1/credentials/cold").await;
    assert_eq!(status, 200);
    assert!(head_body.is_empty());
    for h in [&headers, &head_headers] {
        for name in ["content-type", "cache-control", "content-length"] {
            assert_eq!(h[name], waited_headers[name], "{name}");
        }
    }
    assert_eq!(fake.calls("create"), 1);
    let (status, _) = stop(&mut daemon, Duration::from_secs(25));
    assert!(status.success());
    assert!(fake.live().is_empty());
}

/// Bytes a client writes, after a pause (ms).
type Write<'a> = (u64, &'a str);

/// What the socket answers to `writes` (each after its pause) on one raw connection, read to
/// its end, with the `date` header's value replaced by `X`.
fn raw_exchange(socket: &std::path::Path, writes: &[Write]) -> String {
    use std::io::{Read, Write};
    let mut conn = std::os::unix::net::UnixStream::connect(socket).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    for (pause_ms, bytes) in writes {
        std::thread::sleep(Duration::from_millis(*pause_ms));
        conn.write_all(bytes.as_bytes()).unwrap();
    }
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    let mut out = String::new();
    let mut rest = answer.as_str();
    while let Some(at) = rest.find("\r\ndate: ") {
        let value = at + "\r\ndate: ".len();
        out.push_str(&rest[..value]);
        out.push('X');
        rest = &rest[value + "Tue, 24 Nov 2026 04:36:43 GMT".len()..];
    }
    out.push_str(rest);
    out
}

/// The socket answers a ready key alike whichever way a request arrives: in one write, split
/// across writes, after the client waited, pipelined on a kept-alive connection, as HEAD, as
/// HTTP/1.0 or with a query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_answers_every_request_shape_alike() {
    let (_env, fake, mut daemon) = setup("", &[("p", "")], "info").await;
    let socket = daemon.socket.clone();
    let (status, _, key) = get(&socket, "/v1/credentials/p").await;
    assert_eq!(status, 200);
    let key = String::from_utf8(key.to_vec()).unwrap();
    let head = |version: &str, close: &str| {
        format!(
            "HTTP/{version} 200 OK\r\ncontent-type: application/json\r\ncache-control: no-store\r\n{close}content-length: {}\r\ndate: X\r\n\r\n",
            key.len()
        )
    };
    let closing = head("1.1", "connection: close\r\n") + &key;
    let kept = head("1.1", "") + &key;
    let get_close = "GET /v1/credentials/p HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n";
    let get_kept = "GET /v1/credentials/p HTTP/1.1\r\nHost: k\r\n\r\n";
    let pipelined = format!("{get_kept}{get_kept}");
    let cases: Vec<(&str, Vec<Write>, String)> = vec![
        ("one write", vec![(0, get_close)], closing.clone()),
        (
            "HEAD",
            vec![(0, "HEAD /v1/credentials/p HTTP/1.1\r\nConnection: close\r\n\r\n")],
            head("1.1", "connection: close\r\n"),
        ),
        (
            "split mid-header",
            vec![
                (0, "GET /v1/credentials/p HTTP/1.1\r\nHo"),
                (50, "st: k\r\nConnection: close\r\n\r\n"),
            ],
            closing.clone(),
        ),
        ("sent 50 ms after the connect", vec![(50, get_close)], closing.clone()),
        (
            "kept alive: two pipelined, then one more",
            vec![(0, &pipelined), (50, get_close)],
            format!("{kept}{kept}{closing}"),
        ),
        (
            "kept alive: then another path",
            vec![(0, get_kept), (50, "GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")],
            format!("{kept}HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\ncontent-length: 3\r\ndate: X\r\n\r\nok\n"),
        ),
        (
            "HTTP/1.0",
            vec![(0, "GET /v1/credentials/p HTTP/1.0\r\n\r\n")],
            head("1.0", "") + &key,
        ),
        (
            "a query",
            vec![(0, "GET /v1/credentials/p?x=1 HTTP/1.1\r\nConnection: close\r\n\r\n")],
            closing.clone(),
        ),
    ];
    for (what, writes, want) in cases {
        let got = tokio::task::block_in_place(|| raw_exchange(&socket, &writes));
        assert_eq!(got, want, "{what}");
    }
    // A client that connected and sent nothing holds up no stop: it is closed at once.
    let mut idle = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let (status, took) = stop(&mut daemon, Duration::from_secs(25));
    assert!(status.success());
    assert!(
        took < keybroker::server::DRAIN_TIMEOUT,
        "an idle connection held the stop for {took:?}"
    );
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut idle, &mut rest).unwrap();
    assert!(rest.is_empty(), "closed without an answer");
    assert!(fake.live().is_empty());
}

/// A daemon with three prewarmed profiles, each holding a live key at the fake.
async fn three_prewarmed_profiles(shutdown_timeout: &str) -> (Env, Arc<FakeCloud>, Daemon) {
    let server = format!("shutdown_timeout = \"{shutdown_timeout}\"");
    let (env, fake, daemon) = setup(&server, &[("a", ""), ("b", ""), ("c", "")], "info").await;
    wait_until("three prewarmed keys", Duration::from_secs(10), || {
        fake.live().len() == 3
    })
    .await;
    (env, fake, daemon)
}

/// SIGTERM with keys in three profiles: every key revoked, socket removed, exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_revokes_every_key_and_exits_0() {
    let (env, fake, mut daemon) = three_prewarmed_profiles("10s").await;
    let (status, elapsed) = stop(&mut daemon, Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "{}", daemon.logs());
    assert!(elapsed < Duration::from_secs(10));
    assert!(
        fake.live().is_empty(),
        "alive after stop: {:?}",
        fake.live()
    );
    assert_eq!(fake.calls("revoke"), 3);
    assert!(!env.socket().exists(), "socket removed at stop");
    let logs = daemon.logs();
    assert!(
        logs.contains("revoked key") && logs.contains("why=\"stop\"") && logs.contains("stopped"),
        "{logs}"
    );
}

/// With revokes hanging, stop still ends within shutdown_timeout + 2 s, exits 1 and names
/// every key left alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_hanging_provider_is_bounded_and_exits_1() {
    let (_env, fake, mut daemon) = three_prewarmed_profiles("3s").await;
    fake.set_faults(Faults {
        hang_revokes: true,
        ..Faults::default()
    });
    let (status, elapsed) = stop(&mut daemon, Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{}", daemon.logs());
    assert!(elapsed <= Duration::from_secs(5), "took {elapsed:?}");
    let logs = daemon.logs();
    // The keys stay alive at the (hung) fake; the last log line names each of them.
    let last = logs.lines().last().unwrap();
    assert!(last.contains("3 keys left unrevoked"), "{last}");
    for key in fake.live() {
        assert!(last.contains(&key.id), "{} not named in {last}", key.id);
    }
}

/// Provider down at start: 503 with Retry-After and a clear message; when it comes back the
/// next request succeeds, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_down_at_start_then_back() {
    let fake = FakeCloud::new(Clock::System);
    fake.set_faults(Faults {
        create_status: Some((503, "object storage API unavailable".into())),
        ..Faults::default()
    });
    let url = fake.serve().await;
    let env = Env::new();
    let token = env.secret_file("cw-token", fake.token());
    let config = env.config(&coreweave_profile("train", &url, &token, ""));
    let mut daemon = tokio::task::block_in_place(|| env.serve(&config, "info"));
    wait_until("the prewarm attempt", Duration::from_secs(5), || {
        fake.calls("create") >= 1
    })
    .await;

    let (status, headers, body) = get(&daemon.socket, "/v1/credentials/train").await;
    assert_eq!(status, 503);
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after));
    let err: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(err["error"]["code"], "unavailable");
    let (code, stdout, stderr) =
        tokio::task::block_in_place(|| env.run(&["credential-process", "--profile", "train"]));
    assert_eq!(code, 1);
    assert!(stdout.is_empty());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("keybroker: profile train has no valid key: the coreweave API failed:")
            && stderr.contains("HTTP 503")
            && stderr.contains("object storage API unavailable")
            && stderr.contains("retry in"),
        "{stderr}"
    );

    fake.set_faults(Faults::default());
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let (code, stdout, stderr) =
        tokio::task::block_in_place(|| env.run(&["credential-process", "--profile", "train"]));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(key_id(stdout.as_bytes()), fake.live()[0].id);

    let (status, _) = stop(&mut daemon, Duration::from_secs(25));
    assert!(status.success());
    assert!(fake.live().is_empty());
}

/// Nothing secret in any log line at trace level, in client errors or in status, across mints,
/// renewals, serving and revocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_logs_errors_or_status() {
    let short =
        "lifetime = \"8s\"\nrenew_before = \"5s\"\nmin_remaining = \"3s\"\nallow_short_keys = true";
    let (env, fake, mut daemon) = setup("", &[("a", short), ("b", "")], "trace").await;
    let mut outputs = String::new();
    let deadline = Instant::now() + Duration::from_secs(7);
    while Instant::now() < deadline {
        let (code, stdout, stderr) =
            tokio::task::block_in_place(|| env.run(&["credential-process", "--profile", "a"]));
        assert_eq!(code, 0, "{stderr}");
        outputs.push_str(&stderr);
        let _ = stdout;
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let (_, status_table, e1) = env.run(&["status"]);
    let (_, status_json, e2) = env.run(&["status", "--json"]);
    let (_, _, e3) = env.run(&["credential-process", "--profile", "nope"]);
    outputs.extend([status_table.as_str(), status_json.as_str(), &e1, &e2, &e3]);
    let (status, _) = stop(&mut daemon, Duration::from_secs(25));
    assert!(status.success());
    assert!(fake.live().is_empty());

    let logs = daemon.logs();
    assert!(
        logs.contains("TRACE") && logs.matches("minted key").count() >= 3,
        "trace logs were captured and saw renewals: {logs}"
    );
    assert!(fake.keys().len() >= 3, "renewals happened");
    let ledger = std::fs::read_to_string(env.state_dir().join("ledger.jsonl")).unwrap();
    let lock = std::fs::read_to_string(env.state_dir().join("lock")).unwrap_or_default();
    for secret in fake.secrets() {
        assert!(!logs.contains(&secret), "a secret reached the daemon log");
        assert!(
            !ledger.contains(&secret) && !lock.contains(&secret),
            "a secret reached the state directory"
        );
        assert!(
            !outputs.contains(&secret),
            "a secret reached client output or status"
        );
    }
    assert!(
        status_table.contains("a ") && status_json.contains("\"state\""),
        "{status_table}{status_json}"
    );
}

/// A live daemon's socket is never taken over; a dead one's is. Two daemons never share a
/// state directory: the second names the first's pid.
#[test]
fn a_live_socket_is_refused_and_a_stale_one_replaced() {
    let env = Env::new();
    let config = env.config("[profiles.d]\nprovider = \"dev\"\n");
    let first = env.serve(&config, "info");
    let (code, _, stderr) = env.run(&["serve", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1);
    let holder = format!(
        "another keybroker (pid {}) is using the state directory",
        first.pid()
    );
    assert!(stderr.contains(&holder), "{stderr}");
    let other_state = env
        .command(&["serve", "--config", config.to_str().unwrap()])
        .env("STATE_DIRECTORY", env.path("other-state"))
        .output()
        .unwrap();
    assert_eq!(other_state.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&other_state.stderr);
    assert!(
        stderr.contains("another keybroker is already serving on"),
        "{stderr}"
    );
    assert!(
        env.run(&["credential-process", "--profile", "d"]).0 == 0,
        "the first daemon still serves"
    );

    first.signal(Signal::KILL);
    std::thread::sleep(Duration::from_millis(200));
    assert!(env.socket().exists(), "kill -9 leaves the socket file");
    let mut second = env.serve(&config, "info");
    assert!(second.logs().contains("replacing a stale socket"));
    assert_eq!(env.run(&["credential-process", "--profile", "d"]).0, 0);
    assert!(second.stop(Duration::from_secs(25)).0.success());
}

/// Client failures: exit 1, nothing on stdout, one line on stderr saying what to do.
#[test]
fn client_failures_are_one_actionable_line() {
    let env = Env::new();
    let (code, stdout, stderr) = env.run(&["credential-process", "--profile", "x"]);
    assert_eq!((code, stdout.as_str()), (1, ""));
    assert_eq!(stderr.lines().count(), 1);
    assert!(
        stderr.contains("no keybroker socket at") && stderr.contains("keybroker serve"),
        "{stderr}"
    );
    let (code, _, stderr) = env.run(&["credential-process"]);
    assert_eq!(code, 1, "{stderr}");

    let config = env.config("[profiles.d]\nprovider = \"dev\"\n");
    let mut daemon = env.serve(&config, "info");
    let (code, stdout, stderr) = env.run(&["credential-process", "--profile", "nope"]);
    assert_eq!((code, stdout.as_str()), (1, ""));
    assert!(
        stderr.contains("profile nope: no profile named \"nope\"")
            && stderr.contains("check --profile"),
        "{stderr}"
    );
    // The prewarm may still be minting: the table is looked at once the key is there.
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.run(&["probe", "ready"]).0 != 0 {
        assert!(
            Instant::now() < deadline,
            "the dev profile never became ready"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, stdout, _) = env.run(&["status"]);
    assert_eq!(code, 0);
    assert!(
        stdout.starts_with("PROFILE") && stdout.contains("ready"),
        "{stdout}"
    );
    assert!(
        stdout.lines().all(|l| l.chars().count() <= 80),
        "status fits 80 columns:\n{stdout}"
    );
    assert!(daemon.stop(Duration::from_secs(25)).0.success());

    // A daemon that accepts but never answers: the client gives up once the daemon would
    // have answered a cold mint, and says how to wait longer.
    let listener = std::os::unix::net::UnixListener::bind(env.socket()).unwrap();
    let start = Instant::now();
    let (code, _, stderr) = env.run(&["credential-process", "--profile", "d"]);
    assert_eq!(code, 1);
    let default = keybroker::client::CREDENTIALS_TIMEOUT;
    assert!(
        stderr.contains(&format!("did not answer within {}s", default.as_secs()))
            && stderr.contains("--timeout"),
        "{stderr}"
    );
    assert!(start.elapsed() >= default);
    assert!(start.elapsed() < default + Duration::from_secs(2));
    drop(listener);
}

/// `serve --dev` needs no config: it prints where it listens and what to paste, serves keys
/// with real expiry, and revokes them at stop.
#[test]
fn dev_mode_serves_without_a_config() {
    let env = Env::new();
    let child = env
        .command(&["serve", "--dev"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let out = loop {
        let (code, out, _) = env.run(&["credential-process", "--profile", "dev"]);
        if code == 0 {
            break out;
        }
        assert!(Instant::now() < deadline, "dev daemon never served");
        std::thread::sleep(Duration::from_millis(50));
    };
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let expiration = OffsetDateTime::parse(
        v["Expiration"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!(expiration - OffsetDateTime::now_utc() > time::Duration::minutes(55));
    let (code, block, err) = env.run(&["aws-config"]);
    assert_eq!(code, 0, "{err}");
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        Signal::TERM,
    )
    .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    let banner = String::from_utf8_lossy(&output.stdout);
    assert!(
        banner.contains(&env.socket().display().to_string()),
        "{banner}"
    );
    // The block `keybroker aws-config` prints for the same profile.
    assert!(banner.contains(&block), "{banner}\n{block}");
    assert!(
        banner.contains(
            "# >>> keybroker aws-config: profile keybroker-dev\n[profile keybroker-dev]\n"
        ) && banner.contains("credential_process = ")
            && banner.contains("credential-process --profile dev"),
        "{banner}"
    );
    assert!(!env.socket().exists());
}

/// Upstream HTTPS goes through rustls with `ca_file` as an extra trust root; without it the
/// same self-signed endpoint is refused and the error says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_trusts_ca_file() {
    let fake = FakeCloud::new(Clock::System);
    let (url, ca_pem) = fake.serve_tls().await;
    let env = Env::new();
    let token = env.secret_file("cw-token", fake.token());
    std::fs::write(env.path("ca.pem"), ca_pem).unwrap();
    let config = env.config(&format!(
        "[server]\nsocket_mode = \"0640\"\n{}{}",
        coreweave_profile("tls", &url, &token, "ca_file = \"ca.pem\""),
        coreweave_profile("untrusted", &url, &token, "prewarm = false"),
    ));
    let mut daemon = tokio::task::block_in_place(|| env.serve(&config, "info"));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&daemon.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o640, "socket_mode applied to the socket file");

    let (code, stdout, stderr) =
        tokio::task::block_in_place(|| env.run(&["credential-process", "--profile", "tls"]));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(key_id(stdout.as_bytes()), fake.live()[0].id);
    let (code, _, stderr) =
        tokio::task::block_in_place(|| env.run(&["credential-process", "--profile", "untrusted"]));
    assert_eq!(code, 1);
    assert!(
        stderr.contains("invalid peer certificate") && stderr.contains("set ca_file"),
        "the TLS failure is named: {stderr}"
    );
    assert_eq!(
        fake.calls("create"),
        1,
        "the untrusted profile never reached the API"
    );

    let (status, _) = stop(&mut daemon, Duration::from_secs(25));
    assert!(status.success());
    assert!(fake.live().is_empty());
}

/// Refused credentials, a wrong Crusoe organization, a wrong GleSYS instance: each profile's
/// error is one line naming the profile and carrying the provider's own words, and clients
/// asking again and again do not turn into a storm of upstream calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_refusals_are_one_line_with_the_providers_words() {
    use crate::fake_cloud::{GLESYS_INSTANCE, GLESYS_PROJECT};
    let fake = FakeCloud::new(Clock::System);
    let url = fake.serve().await;
    let env = Env::new();
    let wrong = env.secret_file("wrong-secret", "d3Jvbmctc2VjcmV0");
    let wrong = wrong.display();
    // Each Crusoe profile needs its own API key (config validation): the one with the wrong
    // secret uses a key id the fake does not know.
    let crusoe = |name: &str, key_id: &str, secret: &str, extra: &str| {
        format!(
            "[profiles.{name}]\nprovider = \"crusoe\"\nendpoint = \"{url}/v1alpha5\"\naccess_key_id = \"{key_id}\"\nsecret_key_file = \"{secret}\"\n{extra}\n"
        )
    };
    let glesys = |name: &str, key: &str, instance: &str| {
        format!(
            "[profiles.{name}]\nprovider = \"glesys\"\nendpoint = \"{url}\"\nproject = \"{GLESYS_PROJECT}\"\napi_key_file = \"{key}\"\ninstance_id = \"{instance}\"\n"
        )
    };
    let right_glesys = fake.profile_toml("glesys", "unused", &url, &env, "");
    let glesys_key = env.path("unused-glesys-key");
    let right_crusoe = fake.profile_toml("crusoe", "unused2", &url, &env, "");
    let crusoe_secret = env.path("unused2-crusoe-secret");
    assert!(right_glesys.contains("api_key_file") && right_crusoe.contains("secret_key_file"));
    let config = [
        coreweave_profile(
            "cw-token",
            &url,
            &env.secret_file("bad-token", "not-the-token"),
            "",
        ),
        crusoe(
            "crusoe-secret",
            "CRUSOEUNKNOWNKEYID00",
            &wrong.to_string(),
            "",
        ),
        crusoe(
            "crusoe-org",
            fake.crusoe_key_id(),
            &crusoe_secret.display().to_string(),
            "org_id = \"4f9b1e0c-0000-4000-8000-00000000dead\"",
        ),
        glesys("glesys-key", &wrong.to_string(), GLESYS_INSTANCE),
        glesys(
            "glesys-instance",
            &glesys_key.display().to_string(),
            "os-zz999",
        ),
    ]
    .join("\n");
    let config = env.config(&config);
    let mut daemon = tokio::task::block_in_place(|| env.serve(&config, "info"));
    wait_until(
        "a prewarm attempt per profile",
        Duration::from_secs(10),
        || fake.calls("unauthorized") >= 3 && fake.total_calls() >= 5,
    )
    .await;

    let expected = [
        ("cw-token", "coreweave", "invalid API access token"),
        ("crusoe-secret", "crusoe", "bad_credential"),
        (
            "crusoe-org",
            "crusoe",
            "user is not a member of organization 4f9b1e0c-0000-4000-8000-00000000dead",
        ),
        ("glesys-key", "glesys", "Unauthorized"),
        (
            "glesys-instance",
            "glesys",
            "Object storage instance not found: os-zz999",
        ),
    ];
    for _ in 0..5 {
        for (profile, provider, words) in expected {
            let (code, stdout, stderr) = tokio::task::block_in_place(|| {
                env.run(&["credential-process", "--profile", profile])
            });
            assert_eq!((code, stdout.as_str()), (1, ""), "{profile}");
            assert_eq!(stderr.lines().count(), 1, "{profile}: {stderr}");
            let prefix = format!(
                "keybroker: profile {profile} has no valid key: the {provider} API failed: "
            );
            assert!(
                stderr.starts_with(&prefix) && stderr.contains(words),
                "{profile}: {stderr}"
            );
        }
    }
    // 25 client requests on 5 failing profiles: the prewarm attempts and nothing more (a
    // failed request waits 10 s before it may trigger another attempt).
    let calls = fake.total_calls();
    assert!(calls <= 10, "{calls} upstream calls");
    let (status, _) = stop(&mut daemon, Duration::from_secs(25));
    assert!(status.success());
    assert!(fake.live().is_empty());
}

/// SO_PEERCRED authorization: `allow_uids = []` allows no one, the daemon's own user included;
/// run as root, the test also connects as `nobody` (uid 65534), who may read only the profile
/// that names it, and not status.
#[test]
fn peers_a_profile_does_not_allow_get_403_and_no_key() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let config = env.config(
        "[server]\nsocket_mode = \"0666\"\n\n[profiles.mine]\nprovider = \"dev\"\n\n[profiles.for-nobody]\nprovider = \"dev\"\nallow_uids = [65534]\n\n[profiles.closed]\nprovider = \"dev\"\nallow_uids = []\n",
    );
    let mut daemon = env.serve(&config, "info");
    let (code, stdout, stderr) = env.run(&["credential-process", "--profile", "closed"]);
    assert_eq!((code, stdout.as_str()), (1, ""));
    assert!(
        stderr.contains("profile closed: access denied")
            && stderr.contains("allows it neither by allow_uids nor by allow_groups"),
        "{stderr}"
    );
    assert_eq!(env.run(&["credential-process", "--profile", "mine"]).0, 0);

    if rustix::process::getuid().is_root() {
        std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let as_nobody = |args: &[&str]| env.run_as(65534, args);
        let (code, stdout, stderr) = as_nobody(&["credential-process", "--profile", "mine"]);
        assert_eq!((code, stdout.as_str()), (1, ""), "{stderr}");
        assert!(
            stderr.contains("uid 65534 (gid 65534) is not allowed"),
            "{stderr}"
        );
        let (code, stdout, stderr) = as_nobody(&["credential-process", "--profile", "for-nobody"]);
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.contains("\"AccessKeyId\""));
        let (code, _, stderr) = as_nobody(&["status"]);
        assert_eq!(code, 1);
        assert!(
            stderr.contains("status is for root and the daemon's user"),
            "{stderr}"
        );
    }
    assert!(daemon.stop(Duration::from_secs(25)).0.success());
}

/// `/readyz` answers 503 naming a prewarmed profile whose first mint failed, with the
/// provider's words, and 200 once it has a key; a `prewarm = false` profile without a key does
/// not count. `/healthz` answers 200 throughout. Both answer any peer that can connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_every_prewarmed_profile() {
    let fake = FakeCloud::new(Clock::System);
    let url = fake.serve().await;
    // A 429, not a 5xx: a create answered 5xx may still land, and would leave the stop
    // unclean until the landing grace has passed.
    fake.set_faults(Faults {
        create_status: Some((429, "slow down".into())),
        retry_after: Some(1),
        ..Faults::default()
    });
    let env = Env::new();
    let token = env.secret_file("cw-token", fake.token());
    let config = env.config(&format!(
        "[server]\nsocket_mode = \"0666\"\n{}{}",
        coreweave_profile("train", &url, &token, ""),
        coreweave_profile("lazy", &url, &token, "prewarm = false"),
    ));
    let mut daemon = tokio::task::block_in_place(|| env.serve(&config, "info"));
    let socket = daemon.socket.clone();
    let readyz = || async {
        let (status, headers, body) = get(&socket, "/readyz").await;
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        (status, headers, v)
    };

    // The first mint fails: not ready, and the answer says which profile and why.
    let start = Instant::now();
    let (headers, body) = loop {
        let (status, headers, v) = readyz().await;
        if v["profiles"][0]["state"] == "unavailable" {
            assert_eq!(status, 503, "{v}");
            break (headers, v);
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the failed prewarm never shows: {status} {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(body["ready"], false, "{body}");
    let profiles = body["profiles"].as_array().unwrap();
    assert_eq!(
        profiles.len(),
        1,
        "only the prewarmed profile counts: {body}"
    );
    assert_eq!(profiles[0]["profile"], "train");
    let reason = profiles[0]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("the coreweave API failed: ") && reason.contains("slow down"),
        "{reason}"
    );
    let (status, headers, body) = request(&socket, http::Method::HEAD, "/readyz").await;
    assert_eq!((status, body.len()), (503, 0));
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(
        get(&socket, "/healthz").await.0,
        200,
        "liveness is not readiness"
    );

    if rustix::process::getuid().is_root() {
        // A peer that may read no profile, nor status, may still ask.
        use std::os::unix::fs::PermissionsExt;
        use std::os::unix::process::CommandExt;
        std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let as_nobody = |path: &str| {
            let url = format!("http://kb{path}");
            let socket = socket.to_str().unwrap();
            let out = env
                .program(
                    "curl",
                    &["-s", "-w", "\n%{http_code}", "--unix-socket", socket, &url],
                )
                .uid(65534)
                .gid(65534)
                .output()
                .expect("running curl");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let ready = tokio::task::block_in_place(|| as_nobody("/readyz"));
        assert!(
            ready.ends_with("\n503") && ready.contains("\"profile\":\"train\""),
            "{ready}"
        );
        assert_eq!(
            tokio::task::block_in_place(|| as_nobody("/healthz")),
            "ok\n\n200"
        );
        assert!(tokio::task::block_in_place(|| as_nobody("/v1/status")).ends_with("\n403"));
    }

    // The provider is back: ready once the profile has a key (a request asks for one as soon
    // as the last failure's floor has passed; the driver's backoff would get there too).
    fake.set_faults(Faults::default());
    let start = Instant::now();
    let body = loop {
        let (status, _, v) = readyz().await;
        if status == 200 {
            break v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "still not ready: {status} {v}"
        );
        let _ = get(&socket, "/v1/credentials/train").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(body, serde_json::json!({ "ready": true }));
    assert_eq!(
        fake.live().len(),
        1,
        "one key, train's: lazy minted nothing"
    );
    let (status, _, body) = request(&socket, http::Method::HEAD, "/readyz").await;
    assert_eq!((status, body.len()), (200, 0));

    let (status, _) = stop(&mut daemon, Duration::from_secs(25));
    assert!(status.success(), "{}", daemon.logs());
    assert!(fake.live().is_empty(), "{:?}", fake.live());
}

/// Starts a daemon with one cold CoreWeave profile `slow` (`prewarm = false`) whose creates
/// take `latency` at the fake.
async fn slow_cold_profile(latency: Duration) -> (Env, Arc<FakeCloud>, Daemon) {
    let (env, fake, daemon) = setup("", &[("slow", "prewarm = false")], "info").await;
    fake.set_faults(Faults {
        create_latency: latency,
        ..Faults::default()
    });
    (env, fake, daemon)
}

/// A cold mint that takes 8 s (longer than a short client timeout, shorter than the daemon's
/// wait for it) reaches the helper: it waits as long as the daemon does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_process_waits_out_a_slow_cold_mint() {
    let (env, fake, mut daemon) = slow_cold_profile(Duration::from_secs(8)).await;
    let start = Instant::now();
    let (code, stdout, stderr) =
        tokio::task::block_in_place(|| env.run(&["credential-process", "--profile", "slow"]));
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.is_empty(), "{stderr:?}");
    assert!(
        start.elapsed() >= Duration::from_secs(8),
        "the mint was cold"
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is only JSON");
    assert_eq!(v["Version"], 1);
    let live = fake.live();
    assert_eq!(live.len(), 1);
    assert_eq!(v["AccessKeyId"], live[0].id.as_str());
    assert_eq!(fake.calls("create"), 1);

    let (status, _) = stop(&mut daemon, Duration::from_secs(25));
    assert!(status.success(), "{}", daemon.logs());
    assert!(fake.live().is_empty());
}

/// `--timeout` shortens the wait: the helper gives up with one line naming the timeout and
/// the flag that raises it, while the mint goes on and its key is revoked at stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_process_timeout_flag_bounds_the_wait() {
    let (env, fake, mut daemon) = slow_cold_profile(Duration::from_secs(8)).await;
    let start = Instant::now();
    let (code, stdout, stderr) = tokio::task::block_in_place(|| {
        env.run(&["credential-process", "--profile", "slow", "--timeout", "1s"])
    });
    assert_eq!((code, stdout.as_str()), (1, ""), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("keybroker: ")
            && stderr.contains("did not answer within 1s")
            && stderr.contains("--timeout"),
        "{stderr}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );

    // The daemon carries on with the mint: the next helper (default timeout) gets its key.
    let (code, stdout, stderr) = tokio::task::block_in_place(|| {
        env.run(&["credential-process", "--timeout=30s", "--profile", "slow"])
    });
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(fake.calls("create"), 1, "one mint for both requests");
    let live = fake.live();
    assert_eq!(live.len(), 1);
    assert_eq!(key_id(stdout.as_bytes()), live[0].id);

    let (status, _) = stop(&mut daemon, Duration::from_secs(25));
    assert!(status.success(), "{}", daemon.logs());
    assert!(fake.live().is_empty());
}

/// A `--timeout` that is zero or not a duration is bad usage: exit 64 and one line, before
/// any daemon is asked (there is none here), whichever way the flag is written.
#[test]
fn credential_process_refuses_a_bad_timeout() {
    let env = Env::new();
    for (args, says) in [
        (&["--timeout", "0s"][..], "more than zero"),
        (&["--timeout=0"], "more than zero"),
        (&["--timeout", "banana"], "\"banana\" is not a duration"),
        (&["--timeout="], "\"\" is not a duration"),
        (&["--timeout", "-5s"], "is not a duration"),
    ] {
        let mut all = vec!["credential-process", "--profile", "x"];
        all.extend_from_slice(args);
        let (code, stdout, stderr) = env.run(&all);
        assert_eq!((code, stdout.as_str()), (64, ""), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("keybroker: --timeout") && stderr.contains(says),
            "{args:?}: {stderr}"
        );
    }
}
