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
    let mut daemon = tokio::task::block_in_place(|| env.serve(&config, "info"));
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
    let (code, out, _) = run(&env, &["status"]);
    assert_eq!(code, 1, "a failing profile is not healthy");
    assert!(
        out.contains("auth oidc: the current key belongs to")
            && out.contains(":system:serviceaccount:ml:evaluator"),
        "{out}"
    );

    let token = std::fs::read_to_string(&token_file).unwrap();
    let (status, _) = tokio::task::block_in_place(|| daemon.stop(Duration::from_secs(25)));
    assert!(status.success(), "{}", daemon.logs());
    assert!(
        !daemon.logs().contains(token.trim()),
        "the log shows no token"
    );
    assert_eq!(fake.calls("exchange_with_authorization"), 0);
    assert!(
        fake.live().is_empty(),
        "alive after stop: {:?}",
        fake.live()
    );
}
