//! The `credential_process` client and the other socket callers: std `UnixStream`, no async
//! runtime, one deadline over connect, write and read (aws-cli spawns this on every command).
//! Before sending anything the client checks who serves the socket ([`trust`]).

pub mod aws_config;
pub mod exec;
mod trust;

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::api::{
    ClientProfile, ErrorAnswer, PrincipalRequest, ProfileStatus, ProfilesAnswer, Readiness,
    RevokeAnswer, RotateAnswer, StatusAnswer,
};

/// What the helper adds to the daemon's wait for a cold mint: connect, write the request,
/// read the answer on a local socket.
const EXCHANGE_MARGIN: Duration = Duration::from_secs(2);

/// How long `credential-process` waits for the daemon by default: as long as the daemon waits
/// for a cold mint before it answers 503 ([`crate::broker::DEFAULT_MINT_WAIT`]), plus the
/// exchange, so a slow mint the daemon would serve is not cut short. aws-cli, botocore, the
/// Java SDK and the JavaScript SDK put no timeout on a `credential_process` helper, the Go SDK
/// 60 s; aws-sdk-rust stops waiting after 5 s whatever the helper does.
pub const CREDENTIALS_TIMEOUT: Duration =
    crate::broker::DEFAULT_MINT_WAIT.saturating_add(EXCHANGE_MARGIN);

/// How long `keybroker status` waits: the daemon answers it from memory, with no provider
/// call.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest status line and headers the client reads. The body is read to its
/// `Content-Length`, whatever that is: status grows with the profile count and has no cap.
const MAX_HEAD: usize = 64 << 10;

/// An answer from the daemon.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// `Retry-After` seconds, when sent.
    pub retry_after: Option<u64>,
    /// The body.
    pub body: Vec<u8>,
}

impl Answer {
    /// The `error.message` of a JSON error body, or the body as text.
    pub fn error_message(&self) -> String {
        serde_json::from_slice::<ErrorAnswer>(&self.body)
            .map(|a| a.error.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&self.body).trim().to_string())
    }
}

/// How long an admin command waits for the daemon: its own waits for the provider (a
/// principal's revocation, then the profile's keys: `server::ADMIN_WAIT`, 30 s, each) and a
/// margin.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(75);

/// Reads the `--timeout` of `credential-process`: a humantime duration (`30s`, `2m`, `1m 30s`)
/// above zero. The error is one line naming the flag and the value.
pub fn parse_timeout(text: &str) -> Result<Duration, String> {
    let timeout = humantime::parse_duration(text).map_err(|e| {
        format!("--timeout {text:?} is not a duration ({e}); write it like \"30s\" or \"2m\"")
    })?;
    if timeout.is_zero() {
        return Err(format!(
            "--timeout {text:?} must be more than zero; without it the helper waits {}, as long as the daemon does",
            humantime::format_duration(CREDENTIALS_TIMEOUT)
        ));
    }
    Ok(timeout)
}

/// Sends `GET path` to the daemon at `socket` and reads the answer, all within `timeout`.
/// Errors are one line saying what failed and what to do.
pub fn get(socket: &Path, path: &str, timeout: Duration) -> Result<Answer, String> {
    request(socket, "GET", path, None, timeout)
}

/// Sends `method path` (with a JSON `body`, if any) to the daemon at `socket` and reads the
/// answer, all within `timeout`.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<Answer, String> {
    exchange(socket, method, path, body, timeout).map_err(|e| match e {
        Failure::TimedOut => timed_out(socket, timeout),
        Failure::Other(line) => line,
    })
}

/// Why an exchange with the daemon failed: the caller words a timeout, which it may know how
/// to raise.
enum Failure {
    /// No complete answer within the timeout.
    TimedOut,
    /// Anything else, as the one line to print.
    Other(String),
}

impl From<String> for Failure {
    fn from(line: String) -> Self {
        Failure::Other(line)
    }
}

/// The line for a daemon that did not answer within `timeout`.
fn timed_out(socket: &Path, timeout: Duration) -> String {
    format!(
        "the keybroker daemon at {} did not answer within {}; check its log (journalctl -u keybroker)",
        socket.display(),
        humantime::format_duration(timeout)
    )
}

/// Connects to the daemon at `socket` and checks who serves it: nothing is sent to a server
/// that may have been planted.
fn connect(socket: &Path) -> Result<UnixStream, String> {
    let shown = socket.display();
    let stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => format!(
            "no keybroker socket at {shown}: start the daemon (keybroker serve, or systemctl start keybroker), or point --socket or KEYBROKER_SOCKET at its socket"
        ),
        io::ErrorKind::ConnectionRefused => format!(
            "the keybroker daemon at {shown} is not running (connection refused): start it with keybroker serve or systemctl start keybroker"
        ),
        io::ErrorKind::PermissionDenied => format!(
            "permission denied connecting to {shown}: your user may not use this socket; ask for membership of its socket_group"
        ),
        _ => format!("cannot connect to the keybroker daemon at {shown}: {e}"),
    })?;
    trust::check(&stream, socket)?;
    Ok(stream)
}

/// [`request`], telling a timeout apart.
fn exchange(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<Answer, Failure> {
    // A timeout too long for the clock to add never ends: each wait gets all of it.
    let deadline = Instant::now().checked_add(timeout);
    let shown = socket.display();
    let mut stream = connect(socket)?;
    let remaining = || match deadline {
        Some(deadline) => deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero()),
        None => Some(timeout),
    };
    stream
        .set_write_timeout(remaining())
        .map_err(|e| e.to_string())?;
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: keybroker\r\nConnection: close\r\n")
            .into_bytes();
    match body {
        Some(body) => {
            request.extend_from_slice(
                format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            );
            request.extend_from_slice(body);
        }
        None if method == "POST" => request.extend_from_slice(b"Content-Length: 0\r\n\r\n"),
        None => request.extend_from_slice(b"\r\n"),
    }
    // A daemon closes a connection unanswered when it is stopping, or as soon as it accepts it
    // when the caller's uid holds as many connections as it allows.
    let refused = || {
        Failure::Other(format!(
            "the keybroker daemon at {shown} closed the connection without an answer: it is stopping, or your user already holds as many connections as it allows (its log says which); retry, or end the processes holding connections"
        ))
    };
    stream.write_all(&request).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Failure::TimedOut,
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => refused(),
        _ => Failure::Other(format!("sending to the keybroker daemon at {shown}: {e}")),
    })?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    // The whole answer's length, once its head has been read.
    let mut expected: Option<usize> = None;
    loop {
        let Some(left) = remaining() else {
            return Err(Failure::TimedOut);
        };
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        match stream.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Err(refused()),
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if let Some(answer) = read_so_far(&mut buf, &mut expected, socket)? {
                    return Ok(answer);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // Closed with the request unread.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && buf.is_empty() => {
                return Err(refused())
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(Failure::TimedOut)
            }
            Err(e) => {
                return Err(Failure::Other(format!(
                    "reading from the keybroker daemon at {shown}: {e}"
                )))
            }
        }
    }
    match parse(&buf)? {
        Parsed::Done(answer) => Ok(answer),
        _ => Err(Failure::Other(format!(
            "the keybroker daemon at {shown} closed the connection mid-answer"
        ))),
    }
}

/// The answer in `buf`, once all of it is there. `expected` is its whole length, once the head
/// has told it: until then only the length is checked.
fn read_so_far(
    buf: &mut Vec<u8>,
    expected: &mut Option<usize>,
    socket: &Path,
) -> Result<Option<Answer>, Failure> {
    if expected.is_some_and(|total| buf.len() < total) {
        return Ok(None);
    }
    match parse(buf)? {
        Parsed::Done(answer) => Ok(Some(answer)),
        Parsed::Body(total) => {
            // Reserved up front, within reason: the length is the daemon's word.
            buf.reserve(total.saturating_sub(buf.len()).min(64 << 20));
            *expected = Some(total);
            Ok(None)
        }
        Parsed::Head if buf.len() > MAX_HEAD => Err(Failure::Other(format!(
            "the keybroker daemon at {} sent an oversized answer head",
            socket.display()
        ))),
        Parsed::Head => Ok(None),
    }
}

/// How far an answer has been read.
enum Parsed {
    /// The head is not complete yet.
    Head,
    /// The head is read; the answer is this many bytes in all.
    Body(usize),
    /// All of it.
    Done(Answer),
}

/// Parses the response read so far.
fn parse(buf: &[u8]) -> Result<Parsed, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Head),
        Err(e) => return Err(format!("the keybroker daemon sent a malformed answer: {e}")),
    };
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    let length: usize = match header("content-length") {
        Some(v) => v
            .parse()
            .map_err(|_| "the keybroker daemon sent a bad Content-Length".to_string())?,
        None => return Err("the keybroker daemon sent an answer without Content-Length".into()),
    };
    let body = &buf[head_len..];
    if body.len() < length {
        return Ok(Parsed::Body(head_len.saturating_add(length)));
    }
    Ok(Parsed::Done(Answer {
        status: resp.code.unwrap_or(0),
        retry_after: header("retry-after").and_then(|v| v.parse().ok()),
        body: body[..length].to_vec(),
    }))
}

/// Refuses a profile name that no config can hold (`[A-Za-z0-9_.-]`) before it
/// goes into a request line.
fn check_profile(profile: &str) -> Result<(), String> {
    if crate::paths::valid_profile_name(profile) {
        Ok(())
    } else {
        Err(format!(
            "no profile can be named {profile:?}: profile names are letters, digits, '_', '.' and '-'"
        ))
    }
}

/// The credential_process JSON for `profile`, asked within `timeout` (normally
/// [`CREDENTIALS_TIMEOUT`]), or the one line to print on stderr.
pub fn credential_process(
    socket: &Path,
    profile: &str,
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    check_profile(profile)?;
    let path = format!("/v1/credentials/{profile}");
    let answer = exchange(socket, "GET", &path, None, timeout).map_err(|e| match e {
        Failure::TimedOut => format!(
            "{}, or give it longer with --timeout, e.g. --timeout {}",
            timed_out(socket, timeout),
            humantime::format_duration(timeout.saturating_mul(2))
        ),
        Failure::Other(line) => line,
    })?;
    let message = answer.error_message();
    match answer.status {
        200 => Ok(answer.body),
        403 => Err(format!("profile {profile}: access denied: {message}")),
        404 => Err(format!("profile {profile}: {message}; check --profile against the daemon's config (keybroker status lists profiles)")),
        503 => Err(format!(
            "{message}; retry in {}s (keybroker status shows every profile)",
            answer.retry_after.unwrap_or(1)
        )),
        s => Err(format!("profile {profile}: the daemon answered HTTP {s}: {message}")),
    }
}

/// An operator's action on a profile (`keybroker rotate`, `revoke`, `revoke-principal`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminCall {
    /// Mint a new key now and retire the current one.
    Rotate,
    /// Revoke every key of the profile and serve none until a rotate.
    Revoke,
    /// Revoke every key of a CoreWeave principal, then the profile's own keys.
    RevokePrincipal(String),
}

/// Runs `call` on `profile` and returns what to print, or the one line for stderr.
pub fn admin(socket: &Path, profile: &str, call: &AdminCall) -> Result<String, String> {
    check_profile(profile)?;
    let (action, body) = match call {
        AdminCall::Rotate => ("rotate", None),
        AdminCall::Revoke => ("revoke", None),
        AdminCall::RevokePrincipal(p) => (
            "revoke-principal",
            Some(
                serde_json::to_string(&PrincipalRequest {
                    principal: p.clone(),
                })
                .expect("serializes"),
            ),
        ),
    };
    let answer = request(
        socket,
        "POST",
        &format!("/v1/admin/{action}/{profile}"),
        body.as_deref().map(str::as_bytes),
        ADMIN_TIMEOUT,
    )?;
    if answer.status != 200 {
        let message = answer.error_message();
        return Err(match answer.status {
            403 => format!("{action} {profile}: access denied: {message}; run it as root or as the daemon's user"),
            _ => format!("{action} {profile}: {message}"),
        });
    }
    let unreadable = |e: serde_json::Error| {
        format!("{action} {profile}: unreadable answer from the daemon: {e}")
    };
    if *call == AdminCall::Rotate {
        let answer: RotateAnswer = serde_json::from_slice(&answer.body).map_err(unreadable)?;
        let new = answer.rotated;
        let mut out = format!(
            "profile {profile}: new key {}, expires {}\n",
            new.key_id, new.expires_at
        );
        if let Some(old) = new.retired {
            out.push_str(&format!(
                "the old key {old} is retired: still valid for clients that fetched it, revoked when it expires\n"
            ));
        }
        return Ok(out);
    }
    let answer: RevokeAnswer = serde_json::from_slice(&answer.body).map_err(unreadable)?;
    let revoked = match answer.revoked.as_slice() {
        [] => "none".to_string(),
        ids => ids.join(", "),
    };
    Ok(match call {
        AdminCall::RevokePrincipal(p) => format!(
            "principal {p}: every key revoked by the provider\nprofile {profile}: its own keys dropped and revoked: {revoked}\nit serves no key (HTTP 503) until keybroker rotate {profile}\n"
        ),
        _ => format!(
            "profile {profile}: revoked {revoked}\nit serves no key (HTTP 503) until keybroker rotate {profile}\n"
        ),
    })
}

/// `keybroker probe live|ready`: `Ok` when the daemon answers `/healthz` (`ready`: `/readyz`)
/// with 200; else the line saying why, naming each profile that is not ready.
pub fn probe(socket: &Path, ready: bool) -> Result<(), String> {
    let path = if ready { "/readyz" } else { "/healthz" };
    let answer = get(socket, path, STATUS_TIMEOUT)?;
    if answer.status == 200 {
        return Ok(());
    }
    let readiness = serde_json::from_slice::<Readiness>(&answer.body)
        .ok()
        .filter(|_| ready);
    let Some(readiness) = readiness else {
        return Err(format!(
            "the daemon answered {path} with HTTP {}: {}",
            answer.status,
            answer.error_message()
        ));
    };
    let profiles: Vec<String> = readiness
        .profiles
        .iter()
        .map(|p| format!("{} ({}: {})", p.profile, p.state, p.reason))
        .collect();
    Err(format!("not ready: {}", profiles.join("; ")))
}

/// The profiles the caller may read, with their S3 settings (`GET /v1/profiles`).
pub fn profiles(socket: &Path) -> Result<Vec<ClientProfile>, String> {
    let answer = get(socket, "/v1/profiles", STATUS_TIMEOUT)?;
    if answer.status != 200 {
        return Err(format!(
            "profiles: the daemon answered HTTP {}: {}",
            answer.status,
            answer.error_message()
        ));
    }
    serde_json::from_slice::<ProfilesAnswer>(&answer.body)
        .map(|a| a.profiles)
        .map_err(|e| format!("profiles: unreadable answer from the daemon: {e}"))
}

/// `keybroker status`: prints the table (or the daemon's JSON) and tells whether every
/// profile is healthy (not degraded, unavailable or revoked).
pub fn status(socket: &Path, json: bool, only: &[String]) -> Result<bool, String> {
    let mut path = "/v1/status".to_string();
    if !only.is_empty() {
        for name in only {
            check_profile(name)?;
        }
        path = format!("{path}?profiles={}", only.join(","));
    }
    let answer = get(socket, &path, STATUS_TIMEOUT)?;
    if answer.status != 200 {
        return Err(format!(
            "status: the daemon answered HTTP {}: {}",
            answer.status,
            answer.error_message()
        ));
    }
    let status: StatusAnswer = serde_json::from_slice(&answer.body)
        .map_err(|e| format!("status: unreadable answer from the daemon: {e}"))?;
    let healthy = status.profiles.iter().all(|p| !p.slot.state.unhealthy());
    if json {
        // The daemon's own text, indented: fields this client does not know are kept.
        let value: serde_json::Value = serde_json::from_slice(&answer.body)
            .map_err(|e| format!("status: unreadable answer from the daemon: {e}"))?;
        println!("{value:#}");
    } else {
        print!("{}", status_table(&status.profiles));
    }
    Ok(healthy)
}

/// The status table, readable in 80 columns: one row per profile, and the last error (if
/// any) on indented lines below it.
pub fn status_table(profiles: &[ProfileStatus]) -> String {
    let cell = |s: Option<&str>, width: usize| {
        let s = s.unwrap_or("-");
        if s.chars().count() > width {
            format!("{}…", s.chars().take(width - 1).collect::<String>())
        } else {
            s.to_string()
        }
    };
    let span = |v: Option<i64>| v.map_or("-".to_string(), short_duration);
    let row = |cols: [&str; 6]| {
        format!(
            "{:<14} {:<9} {:<20} {:>7} {:>7}  {}\n",
            cols[0], cols[1], cols[2], cols[3], cols[4], cols[5]
        )
    };
    let mut out = row(["PROFILE", "PROVIDER", "KEY", "EXPIRES", "RENEWS", "STATE"]);
    for p in profiles {
        let s = &p.slot;
        out.push_str(&row([
            &cell(Some(&p.name), 14),
            &cell(Some(&p.provider), 9),
            &cell(s.key_id.as_deref(), 20),
            &span(s.expires_in_seconds),
            &span(s.renews_in_seconds),
            s.state.as_str(),
        ]));
        let mut note = |text: String| out.push_str(&wrap(&text, "  ", 80));
        if let Some(auth) = p.auth.as_deref().filter(|a| *a != "api-token") {
            let principal = s.principal.as_deref().unwrap_or("-");
            note(format!(
                "auth {auth}: the current key belongs to {principal}"
            ));
        }
        if !p.revocable {
            note("not revocable (no token_file): keys are left to expire".to_string());
        }
        if let Some(error) = &s.last_error {
            note(format!("last error: {error}"));
        }
        if let Some(blocked) = &s.blocked {
            note(format!("not minting: {blocked}"));
        }
        for f in &s.failing_revokes {
            note(format!(
                "revoke of {} failed {} times ({}), next try {}: {}",
                f.key_id, f.attempts, f.kind, f.next_attempt, f.error
            ));
        }
        if s.retired_given_up > 0 {
            note(format!("{} retired keys that could not be revoked were given up on after they expired; the ledger keeps them for the next start or keybroker sweep", s.retired_given_up));
        }
        for u in &s.unsettled_creates {
            let error = u.last_error.as_ref().map(|e| format!("; {e}"));
            note(format!(
                "unsettled create since {}: its key, if any, carries tag {}{}",
                u.since,
                u.tag,
                error.unwrap_or_default()
            ));
        }
    }
    out
}

/// Word-wraps `text` to `width` columns: the first line starts with `indent`, the others
/// with two more spaces.
fn wrap(text: &str, indent: &str, width: usize) -> String {
    let mut out = String::new();
    let mut line = indent.to_string();
    let mut empty = true;
    for word in text.split_whitespace() {
        if !empty && line.chars().count() + 1 + word.chars().count() > width {
            out.push_str(&line);
            out.push('\n');
            line = format!("{indent}  ");
            empty = true;
        }
        if !empty {
            line.push(' ');
        }
        line.push_str(word);
        empty = false;
    }
    out.push_str(&line);
    out.push('\n');
    out
}

/// `45s`, `12m`, `1h05m`, `2d03h`.
fn short_duration(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{FailingRevoke, RevokeFailure, SlotStatus, State, UnsettledCreate};

    #[test]
    fn parses_complete_and_partial_answers() {
        let full =
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\nretry-after: 7\r\n\r\n{}";
        assert!(matches!(parse(&full[..20]), Ok(Parsed::Head)));
        assert!(matches!(
            parse(&full[..full.len() - 1]),
            Ok(Parsed::Body(n)) if n == full.len()
        ));
        let Ok(Parsed::Done(a)) = parse(full) else {
            panic!("not parsed");
        };
        assert_eq!(
            (a.status, a.retry_after, a.body.as_slice()),
            (503, Some(7), &b"{}"[..])
        );
    }

    fn profile(name: &str, provider: &str, slot: SlotStatus) -> ProfileStatus {
        ProfileStatus {
            name: name.into(),
            provider: provider.into(),
            auth: None,
            revocable: true,
            container_token_file: None,
            slot,
        }
    }

    #[test]
    fn status_table_names_failing_revokes_and_unsettled_creates() {
        let mut slot = SlotStatus::example(State::Ready);
        slot.key_id = Some("CKIA1".into());
        slot.expires_in_seconds = Some(3000);
        slot.renews_in_seconds = Some(1200);
        slot.blocked =
            Some("profile archive: crusoe allows 2 keys per API user and they are in use".into());
        slot.failing_revokes = vec![FailingRevoke {
            key_id: "CKIA0".into(),
            attempts: 3,
            kind: RevokeFailure::Refused,
            error: "Crusoe delete key: HTTP 403 Forbidden: unauthorized".into(),
            next_attempt: "2026-11-28T06:00:00Z".into(),
        }];
        slot.retired_given_up = 2;
        slot.unsettled_creates = vec![UnsettledCreate {
            tag: "keybroker-h-1-abc".into(),
            since: "2026-11-28T05:00:00Z".into(),
            last_error: None,
        }];
        let table = status_table(&[profile("archive", "crusoe", slot)]);
        for want in [
            "not minting: profile archive",
            "revoke of CKIA0 failed 3 times (refused)",
            "HTTP 403 Forbidden: unauthorized",
            "2 retired keys",
            "keybroker-h-1-abc",
        ] {
            assert!(table.contains(want), "{want:?} not in\n{table}");
        }
        assert!(table.lines().all(|l| l.chars().count() <= 80), "{table}");
    }

    #[test]
    fn status_table_fits_80_columns_with_long_errors() {
        let mut slot = SlotStatus::example(State::Degraded);
        slot.key_id = Some("CWABCDEFGHIJKLMN".into());
        slot.expires_in_seconds = Some(3000);
        slot.renews_in_seconds = Some(1200);
        slot.last_error = Some("CoreWeave create access key: HTTP 503 Service Unavailable: the object storage control plane is unavailable in this region, try again later".into());
        let table = status_table(&[profile("a-rather-long-profile-name", "coreweave", slot)]);
        assert!(table.lines().all(|l| l.chars().count() <= 80), "{table}");
        assert!(
            table.contains("a-rather-long… ") && table.contains("50m") && table.contains("20m"),
            "{table}"
        );
        assert!(
            table.contains("  last error: CoreWeave") && table.contains("later"),
            "{table}"
        );
        assert_eq!(table.lines().count(), 4, "{table}");
    }

    #[test]
    fn profile_names_that_would_break_the_request_line_are_refused() {
        assert!(check_profile("train-1.a_b").is_ok());
        for bad in ["", "a b", "a?b", "a\r\nX-Evil: 1", "a/../status", "ü"] {
            let e = check_profile(bad).unwrap_err();
            assert!(e.starts_with("no profile can be named"), "{e}");
        }
    }

    #[test]
    fn the_helper_outwaits_the_daemons_cold_mint() {
        assert!(CREDENTIALS_TIMEOUT > crate::broker::DEFAULT_MINT_WAIT);
        assert_eq!(parse_timeout("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_timeout("1m 30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_timeout("250ms"), Ok(Duration::from_millis(250)));
        for bad in ["0", "0s", "", "banana", "-1s", "5"] {
            let e = parse_timeout(bad).unwrap_err();
            assert!(e.starts_with("--timeout \""), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn error_message_reads_the_json_error() {
        let a = Answer {
            status: 404,
            retry_after: None,
            body: br#"{"error":{"code":"unknown_profile","message":"no profile named \"x\""}}"#
                .to_vec(),
        };
        assert_eq!(a.error_message(), "no profile named \"x\"");
    }
}
