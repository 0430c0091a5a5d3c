//! Connections a hostile local user opens: they cannot starve the daemon of descriptors or
//! memory, every one of them ends within the documented bound, and the container endpoint
//! tells a peer without a token nothing.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use keybroker::clock::Clock;

use crate::fake_cloud::{stop_leaving_no_key, FakeCloud};
use crate::harness::{wait_until, Daemon, Env, BIN};

/// The descriptor limit the daemon runs under in these tests.
const FD_LIMIT: u32 = 1024;

/// The bound the README documents for a connection whose answers are not read, and more.
const CLOSED_WITHIN: Duration = Duration::from_secs(30);

/// The most memory the daemon may use while it is flooded.
const MAX_RSS_KIB: u64 = 40 * 1024;

/// A daemon serving one CoreWeave profile of `fake` to anyone on the machine, under a
/// descriptor limit of [`FD_LIMIT`], with `server` added to its `[server]` table.
async fn flooded_daemon(server: &str) -> (Env, Arc<FakeCloud>, Daemon) {
    let fake = FakeCloud::new(Clock::System);
    let url = fake.serve().await;
    let env = Env::new();
    // Other users must reach the socket inside the test's directory.
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = env.config(&format!(
        "[server]\nsocket_mode = \"0666\"\n{server}\n{}",
        fake.profile_toml("coreweave", "p", &url, &env, "allow_uids = [0]\n")
    ));
    let limit = format!("--nofile={FD_LIMIT}:{FD_LIMIT}");
    let command = env.program(
        "prlimit",
        &[
            &limit,
            "--",
            BIN,
            "serve",
            "--config",
            config.to_str().unwrap(),
        ],
    );
    let daemon = tokio::task::block_in_place(|| env.start_daemon(command, env.socket()));
    (env, fake, daemon)
}

/// The daemon's open descriptors.
fn fds(daemon: &Daemon) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", daemon.pid()))
        .unwrap()
        .count()
}

/// The daemon's resident memory, in KiB.
fn rss_kib(daemon: &Daemon) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// `tests/e2e/never_read.py` against `target` as `uid`, once it has opened its `n`
/// connections: the child (which holds them until its stdin closes) and its report.
fn never_read(env: &Env, uid: u32, target: &str, n: usize, path: &str) -> (Child, Value) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/never_read.py");
    let mut child = env
        .program("python3", &[script, target, &n.to_string(), path])
        .uid(uid)
        .gid(uid)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let report =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("never_read.py: {e}: {line:?}"));
    (child, report)
}

/// Closes the flooding client's stdin and waits for it to exit.
fn release(mut child: Child) {
    drop(child.stdin.take());
    child.wait().unwrap();
}

/// `credential-process` as root: (exit code, stdout, how long it took).
fn credential_process(env: &Env) -> (i32, String, Duration) {
    let start = Instant::now();
    let (code, out, err) = env.run(&["credential-process", "--profile", "p"]);
    let took = start.elapsed();
    assert!(code == 0, "credential-process failed: {err}");
    (code, out, took)
}

/// uid 65534 opens 1,100 connections that pipeline requests and never read, on a daemon whose
/// descriptor limit is 1,024: root is still answered at once, the flood's connections are
/// closed within the bound, the descriptors come back and memory stays small. The refusals are
/// logged once, not per connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uid_that_never_reads_cannot_starve_the_socket() {
    let (env, fake, mut daemon) = flooded_daemon("").await;
    let (_, out, _) = credential_process(&env);
    assert!(out.contains("AccessKeyId"), "{out}");
    let baseline = fds(&daemon);

    let socket = daemon.socket.display().to_string();
    let (flood, report) =
        tokio::task::block_in_place(|| never_read(&env, 65534, &socket, 1100, "/healthz"));
    let flooded_at = Instant::now();
    assert_eq!(report["failed"], 0, "every connect succeeded: {report}");
    let mut peak_rss = rss_kib(&daemon);
    let mut peak_fds = fds(&daemon);

    for _ in 0..3 {
        let (_, out, took) = tokio::task::block_in_place(|| credential_process(&env));
        assert!(out.contains("AccessKeyId"), "{out}");
        assert!(
            took < Duration::from_secs(1),
            "root waited {took:?} during the flood"
        );
        peak_rss = peak_rss.max(rss_kib(&daemon));
        peak_fds = peak_fds.max(fds(&daemon));
    }
    let metrics = keybroker::client::get(&daemon.socket, "/metrics", Duration::from_secs(5))
        .expect("root reads /metrics during the flood");
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("keybroker_connections_refused_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(refused > 0, "{metrics}");
    // The flooding uid's own next client is told why it gets nothing.
    let (code, out, err) = env.run_as(65534, &["credential-process", "--profile", "p"]);
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert!(
        err.contains("closed the connection without an answer")
            && err.contains("as many connections as it allows"),
        "{err}"
    );

    wait_until("the flood's connections to close", CLOSED_WITHIN, || {
        peak_rss = peak_rss.max(rss_kib(&daemon));
        let now = fds(&daemon);
        peak_fds = peak_fds.max(now);
        now <= baseline
    })
    .await;
    assert!(flooded_at.elapsed() < CLOSED_WITHIN);
    assert!(
        peak_fds - baseline <= FD_LIMIT as usize / 4,
        "one uid holds at most a quarter of the descriptors: {peak_fds} open at the peak, {baseline} before ({report})"
    );
    assert!(
        peak_rss < MAX_RSS_KIB,
        "RSS reached {peak_rss} KiB during the flood"
    );
    let logs = daemon.logs();
    assert_eq!(
        logs.matches("closing new connections").count(),
        1,
        "refusals are reported once per burst: {logs}"
    );
    assert!(logs.contains("uid 65534 holds"), "{logs}");

    release(flood);
    let (_, out, _) = credential_process(&env);
    assert!(out.contains("AccessKeyId"));
    stop_leaving_no_key(&mut daemon, &fake);
}

/// 1,000 connections to the container endpoint without a token, pipelining and never reading:
/// memory stays small and every one is closed within the bound; a client with the token is
/// served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_endpoint_flood_without_a_token_is_bounded() {
    let port = free_port();
    let (env, fake, mut daemon) = flooded_daemon(&format!(
        "[server.container]\nlisten = \"127.0.0.1:{port}\"\n"
    ))
    .await;
    let token = token(&env);
    let (status, _) = container_get(port, "GET", "/v1/container-credentials/p", Some(&token));
    assert_eq!(status, 200);
    let baseline = fds(&daemon);

    let (flood, report) = tokio::task::block_in_place(|| {
        never_read(
            &env,
            65534,
            &port.to_string(),
            1000,
            "/v1/container-credentials/p",
        )
    });
    let flooded_at = Instant::now();
    let mut peak_rss = rss_kib(&daemon);
    let (status, body) = container_get(port, "GET", "/v1/container-credentials/p", Some(&token));
    assert_eq!(status, 200, "{body}");
    wait_until("the flood's connections to close", CLOSED_WITHIN, || {
        peak_rss = peak_rss.max(rss_kib(&daemon));
        fds(&daemon) <= baseline
    })
    .await;
    assert!(flooded_at.elapsed() < CLOSED_WITHIN);
    assert!(
        peak_rss < MAX_RSS_KIB,
        "RSS reached {peak_rss} KiB during the flood ({report})"
    );
    release(flood);
    stop_leaving_no_key(&mut daemon, &fake);
}

/// Without the right token the container endpoint answers every path and profile alike: the
/// same 401 and the same body for a real profile, an unknown one and no profile at all. With
/// the token, a method other than GET is 405.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_container_endpoint_tells_nothing_without_a_token() {
    let port = free_port();
    let (env, fake, mut daemon) = flooded_daemon(&format!(
        "[server.container]\nlisten = \"127.0.0.1:{port}\"\n"
    ))
    .await;
    let token = token(&env);
    let answers: Vec<(u16, String)> = [
        ("GET", "/v1/container-credentials/p", None),
        ("GET", "/v1/container-credentials/nope", None),
        ("GET", "/v1/container-credentials/p", Some("not-the-token")),
        (
            "GET",
            "/v1/container-credentials/nope",
            Some(token.as_str()),
        ),
        ("POST", "/v1/container-credentials/nope", None),
        ("GET", "/metrics", None),
        ("GET", "/", Some(token.as_str())),
    ]
    .into_iter()
    .map(|(method, path, token)| container_get(port, method, path, token))
    .collect();
    for answer in &answers {
        assert_eq!(answer, &answers[0], "every answer without a valid token");
    }
    assert_eq!(answers[0].0, 401);
    assert!(!answers[0].1.contains("p.token"), "{}", answers[0].1);

    let (status, body) = container_get(port, "POST", "/v1/container-credentials/p", Some(&token));
    assert_eq!(status, 405, "{body}");
    let (status, body) = container_get(port, "GET", "/v1/container-credentials/p", Some(&token));
    assert_eq!(status, 200, "{body}");
    stop_leaving_no_key(&mut daemon, &fake);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The container token of profile `p`.
fn token(env: &Env) -> String {
    let file: PathBuf = env.socket().parent().unwrap().join("container/p.token");
    std::fs::read_to_string(Path::new(&file)).unwrap()
}

/// One request to the container endpoint: (status, body).
fn container_get(port: u16, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let auth = token
        .map(|t| format!("Authorization: {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A client that connected just before the daemon was told to stop still gets its answer, the
/// last one on that connection; keys are revoked after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_sent_as_the_daemon_stops_is_answered() {
    let (_env, fake, mut daemon) = flooded_daemon("").await;
    let mut conn = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // Time for the idle daemon to accept it (microseconds); nothing is asked yet.
    tokio::time::sleep(Duration::from_millis(200)).await;
    daemon.signal(rustix::process::Signal::TERM);
    tokio::time::sleep(Duration::from_millis(100)).await;
    conn.write_all(b"GET /v1/credentials/p HTTP/1.1\r\nHost: keybroker\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("AccessKeyId"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    let mut child = daemon.child.take().unwrap();
    let status = tokio::task::block_in_place(|| child.wait()).unwrap();
    assert!(status.success(), "{}", daemon.logs());
    assert!(
        fake.live().is_empty(),
        "alive after stop: {:?}",
        fake.live()
    );
}
