//! CoreWeave Workload Identity through the real binary: the token file is read at every mint,
//! an expired token never leaves the machine, and a refused one is explained.

use std::time::Duration;

use keybroker::clock::Clock;

use crate::fake_cloud::{FakeCloud, WIF_ISSUER};
use crate::harness::{get, key_id, Env};

fn run(env: &Env, args: &[&str]) -> (i32, String, String) {
    tokio::task::block_in_place(|| env.run(args))
}

/// The key's principal at the fake.
fn principal(fake: &FakeCloud, id: &str) -> String {
    fake.key(id).and_then(|k| k.principal).unwrap_or_default()
}

/// The token file rewritten for another subject: `keybroker rotate` mints from the new token.
/// Then an expired token: nothing reaches the provider, rotate exits 1 naming the file and
/// the expiry, and the current key is still served. Then a subject no policy allows: the
/// provider's words and what to fix. Stop revokes every key with the API token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oidc_token_file_is_read_at_every_mint() {
    let fake = FakeCloud::new(Clock::System);
    let url = fake.serve().await;
    let env = Env::new();
    let config = env.config(&fake.profile_toml("coreweave-oidc", "p", &url, &env, ""));
    // At debug level, where the exchange logs the claims it may show.
    let mut daemon = tokio::task::block_in_place(|| env.serve(&config, "keybroker=debug"));
    let token_file = env.path("p-oidc-token");
    let serve = || async {
        let (status, _, body) = get(&daemon.socket, "/v1/credentials/p").await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        key_id(&body)
    };
    let first = serve().await;
    assert_eq!(
        principal(&fake, &first),
        format!("role/{WIF_ISSUER}:system:serviceaccount:ml:trainer")
    );

    let hour = time::Duration::hours(1);
    let now = time::OffsetDateTime::now_utc();
    std::fs::write(
        &token_file,
        fake.oidc_token("system:serviceaccount:ml:evaluator", now + hour),
    )
    .unwrap();
    let (code, _, err) = run(&env, &["rotate", "p"]);
    assert_eq!(code, 0, "{err}");
    let second = serve().await;
    assert_ne!(second, first);
    assert_eq!(
        principal(&fake, &second),
        format!("role/{WIF_ISSUER}:system:serviceaccount:ml:evaluator")
    );

    let exchanges = fake.calls("exchange");
    let expired = now - time::Duration::minutes(5);
    std::fs::write(
        &token_file,
        fake.oidc_token("system:serviceaccount:ml:evaluator", expired),
    )
    .unwrap();
    let (code, _, err) = run(&env, &["rotate", "p"]);
    assert_eq!(code, 1, "{err}");
    let when = keybroker::credentials::format_expiration(
        time::OffsetDateTime::from_unix_timestamp(expired.unix_timestamp()).unwrap(),
    );
    assert!(
        err.contains(&token_file.display().to_string())
            && err.contains(&format!("expired at {when}")),
        "{err}"
    );
    assert_eq!(
        fake.calls("exchange"),
        exchanges,
        "an expired token is not sent"
    );
    assert_eq!(serve().await, second, "the current key is still served");

    fake.deny_subject("system:serviceaccount:ml:intruder");
    std::fs::write(
        &token_file,
        fake.oidc_token("system:serviceaccount:ml:intruder", now + hour),
    )
    .unwrap();
    let (code, _, err) = run(&env, &["rotate", "p"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("HTTP 403") && err.contains("permission denied")
            && err.contains(&format!("no org access policy lets principal role/{WIF_ISSUER}:system:serviceaccount:ml:intruder")),
        "{err}"
    );
    assert_eq!(serve().await, second);

    // An audience the WIF configuration does not have: CoreWeave's words, and what to check.
    let claims = serde_json::json!({"iss": WIF_ISSUER, "aud": "sts.amazonaws.com", "sub": "x", "exp": (now + hour).unix_timestamp()});
    std::fs::write(&token_file, FakeCloud::jwt(claims)).unwrap();
    let (code, _, err) = run(&env, &["rotate", "p"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("Invalid token")
            && err.contains("token rejected")
            && err.contains("aud \"sts.amazonaws.com\""),
        "{err}"
    );
    assert_eq!(serve().await, second);

    let (code, out, _) = run(&env, &["status"]);
    assert_eq!(code, 1, "a failing profile is not healthy");
    assert!(
        out.contains("auth oidc: the current key belongs to")
            && out.contains(":system:serviceaccount:ml:evaluator"),
        "{out}"
    );

    let (status, _) = tokio::task::block_in_place(|| daemon.stop(Duration::from_secs(25)));
    let logs = daemon.logs();
    assert!(status.success(), "{logs}");
    // Every token written here is a JWT, and every JWT starts `eyJ` (`{"` in base64url).
    assert!(!logs.contains("eyJ"), "a token reached the log: {logs}");
    assert!(
        logs.contains("exchanging an OIDC token for a key"),
        "the debug line ran: {logs}"
    );
    assert_eq!(fake.calls("exchange_with_authorization"), 0);
    assert!(
        fake.live().is_empty(),
        "alive after stop: {:?}",
        fake.live()
    );
}

/// Without `token_file` a federated profile still mints and serves, but cannot revoke: status
/// and metrics say so, an operator's revoke is refused with what to do instead, and SIGTERM
/// exits 0 with every key left to expire named in the log, without a single revoke or list
/// call. The next start tracks those keys until they expire instead of revoking them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_token_file_keys_are_left_to_expire() {
    let fake = FakeCloud::new(Clock::System);
    let url = fake.serve().await;
    let env = Env::new();
    let toml: String = fake
        .profile_toml("coreweave-oidc", "p", &url, &env, "")
        .lines()
        .filter(|l| !l.starts_with("token_file"))
        .map(|l| format!("{l}\n"))
        .collect();
    let config = env.config(&toml);
    let mut daemon = tokio::task::block_in_place(|| env.serve(&config, "info"));
    let (status, _, body) = get(&daemon.socket, "/v1/credentials/p").await;
    assert_eq!(status, 200);
    let first = key_id(&body);
    let (code, _, err) = run(&env, &["rotate", "p"]);
    assert_eq!(code, 0, "{err}");
    let (_, _, body) = get(&daemon.socket, "/v1/credentials/p").await;
    let second = key_id(&body);
    assert_ne!(first, second);

    let (code, out, err) = run(&env, &["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let answer: keybroker::api::StatusAnswer = serde_json::from_str(&out).unwrap();
    assert!(!answer.profiles[0].revocable, "{out}");
    let (_, out, _) = run(&env, &["status"]);
    assert!(out.contains("not revocable (no token_file)"), "{out}");
    let (_, _, metrics) = get(&daemon.socket, "/metrics").await;
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains("keybroker_profile_revocable{profile=\"p\",provider=\"coreweave\"} 0"),
        "{metrics}"
    );
    let (code, _, err) = run(&env, &["revoke", "p"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("has no token_file") && err.contains("Cloud Console"),
        "{err}"
    );

    let (status, _) = tokio::task::block_in_place(|| daemon.stop(Duration::from_secs(25)));
    let logs = daemon.logs();
    assert!(status.success(), "{logs}");
    for id in [&first, &second] {
        assert!(
            logs.lines()
                .any(|l| l.contains("left to expire at stop") && l.contains(id.as_str())),
            "{id} not named: {logs}"
        );
    }
    for call in ["revoke", "list", "unauthorized"] {
        assert_eq!(fake.calls(call), 0, "{call} calls");
    }
    let now = time::OffsetDateTime::now_utc();
    let live = fake.live();
    assert_eq!(live.len(), 2, "{live:?}");
    assert!(
        live.iter().all(|k| k
            .expires_at
            .is_some_and(|e| e <= now + time::Duration::hours(1))),
        "each expires by itself within the lifetime: {live:?}"
    );

    let mut again = tokio::task::block_in_place(|| env.serve(&config, "info"));
    let (status, _) = tokio::task::block_in_place(|| again.stop(Duration::from_secs(25)));
    let logs = again.logs();
    assert!(status.success(), "{logs}");
    assert!(
        [&first, &second]
            .iter()
            .all(|id| logs.contains(&format!("tracking {id} (profile p) until it expires at")))
            && logs.contains("the profile cannot revoke keys (no token_file)"),
        "{logs}"
    );
    assert_eq!(fake.calls("revoke"), 0);
}
