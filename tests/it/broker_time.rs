//! The broker over simulated time: paused tokio clock, the real CoreWeave provider code talking
//! to the fake's HTTP handler in process (no socket, so no real I/O races the paused clock).

use std::sync::Arc;
use std::time::Duration;

use keybroker::broker::{Broker, ProfileSpec, RenewPolicy, ServeError, DEFAULT_MINT_WAIT};
use keybroker::clock::{positive, Clock};
use keybroker::credentials::Secret;
use keybroker::provider::coreweave::CoreWeave;
use keybroker::provider::http::HttpClient;

use crate::fake_cloud::{FakeCloud, Faults};

const MIN: Duration = Duration::from_secs(60);

fn hour_policy() -> RenewPolicy {
    RenewPolicy {
        lifetime: 60 * MIN,
        renew_before: 30 * MIN,
        min_remaining: 20 * MIN,
    }
}

fn broker_for(
    fake: &Arc<FakeCloud>,
    token: &str,
    clock: &Clock,
    policy: RenewPolicy,
    prewarm: bool,
    seed: u64,
) -> Broker {
    let http = HttpClient::in_process(fake.handler(), Duration::from_secs(10));
    let provider = CoreWeave::new(
        http,
        "http://fake.invalid",
        Secret::new(token),
        clock.clone(),
    );
    Broker::start(
        vec![ProfileSpec {
            name: "p".into(),
            provider: Arc::new(provider),
            policy,
            prewarm,
            revoke_on_shutdown: true,
        }],
        clock.clone(),
        Some(seed),
        DEFAULT_MINT_WAIT,
    )
}

/// 24 simulated hours, a request every simulated minute: renewals come before `renew_before`,
/// no served key has less than `min_remaining`, every retired key is revoked by its expiry, and
/// the profile never holds more than 3 live keys. Stop leaves no key alive.
#[tokio::test(start_paused = true)]
async fn a_day_of_renewals_keeps_every_promise() {
    let clock = Clock::tokio();
    let fake = FakeCloud::new(clock.clone());
    fake.set_faults(Faults {
        create_latency: Duration::from_secs(2),
        ..Faults::default()
    });
    let policy = hour_policy();
    let broker = broker_for(&fake, fake.token(), &clock, policy, true, 7);

    let mut served_ids = Vec::new();
    let mut max_live = 0;
    for _ in 0..(24 * 60) {
        let key = broker.get("p").await.expect("a key every minute");
        let left = positive(key.expires_at - clock.now());
        assert!(
            left >= policy.min_remaining,
            "served {} with only {left:?} left",
            key.handle.access_key_id
        );
        let at_fake = fake
            .key(&key.handle.access_key_id)
            .expect("served key exists at the fake");
        assert!(
            at_fake.revoked_at.is_none() && at_fake.expires_at > clock.now(),
            "served key is live at the fake"
        );
        // The served Expiration is never later than the fake's real expiry.
        assert!(key.expires_at <= at_fake.expires_at);
        if served_ids.last() != Some(&key.handle.access_key_id) {
            served_ids.push(key.handle.access_key_id.clone());
        }
        max_live = max_live.max(fake.live().len());
        tokio::time::sleep(MIN).await;
    }
    assert!(
        max_live <= 3 && fake.peak_live() <= 3,
        "live keys peaked at {max_live}/{}",
        fake.peak_live()
    );

    let end = clock.now();
    let report = broker
        .stop(tokio::time::Instant::now() + Duration::from_secs(20))
        .await;
    assert!(report.unrevoked.is_empty(), "{report:?}");
    assert!(
        fake.live().is_empty(),
        "keys alive after stop: {:?}",
        fake.live()
    );

    let keys = fake.keys();
    // A renewal about every 27-30 minutes: roughly 48-54 keys in a day.
    assert!(
        (48..=56).contains(&keys.len()),
        "{} keys minted in 24h",
        keys.len()
    );
    assert_eq!(
        fake.calls("create") as usize,
        keys.len(),
        "no failed or duplicate creates"
    );
    assert!(
        served_ids.len() >= keys.len() - 1,
        "requests saw the renewed keys"
    );
    for pair in keys.windows(2) {
        let (old, new) = (&pair[0], &pair[1]);
        // The successor was requested before the old key got down to renew_before (the fake's
        // create latency is inside the window: the request went out earlier still).
        assert!(
            new.created <= old.expires_at - policy.renew_before,
            "key {} renewed at {} with less than renew_before left (expires {})",
            old.id,
            new.created,
            old.expires_at
        );
        // Every retired key is revoked: no later than its expiry (tokio timers fire on the
        // next millisecond tick, hence the millisecond of slack), or at stop if still valid then.
        let revoked = old
            .revoked_at
            .unwrap_or_else(|| panic!("retired key {} never revoked", old.id));
        if old.expires_at <= end {
            assert!(
                revoked <= old.expires_at + Duration::from_millis(1),
                "key {} revoked at {revoked}, after its expiry {}",
                old.id,
                old.expires_at
            );
        } else {
            assert!(revoked >= end, "key {} revoked early, at {revoked}", old.id);
        }
    }
}

/// When renewal fails, the last key is served (degraded) until the floor before its expiry,
/// then requests get 503 with Retry-After; a recovered provider is used at once.
#[tokio::test(start_paused = true)]
async fn degraded_then_unavailable_then_recovered() {
    let clock = Clock::tokio();
    let fake = FakeCloud::new(clock.clone());
    let policy = hour_policy();
    let broker = broker_for(&fake, fake.token(), &clock, policy, true, 11);
    let first = broker.get("p").await.unwrap();
    fake.set_faults(Faults {
        create_status: Some((503, "backend unavailable".into())),
        ..Faults::default()
    });

    // Past min_remaining: still the first key, served degraded.
    tokio::time::sleep(positive(first.expires_at - clock.now()) - policy.min_remaining + MIN).await;
    let degraded = broker.get("p").await.expect("degraded serving");
    assert_eq!(degraded.handle, first.handle);
    let status = &broker.status()[0].2;
    assert_eq!(status.state, "degraded");
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap()
            .contains("backend unavailable"),
        "{status:?}"
    );

    // Inside the last five minutes: 503, never the nearly expired key.
    tokio::time::sleep(positive(first.expires_at - clock.now()) - Duration::from_secs(4 * 60))
        .await;
    match broker.get("p").await {
        Err(ServeError::Unavailable(u)) => {
            assert!(u.message.contains("backend unavailable"), "{u:?}");
            assert!(u.retry_after >= Duration::from_secs(1));
        }
        other => panic!("expected 503, got {other:?}"),
    }
    // Failed attempts are spaced by backoff, not one per request: no retry storm.
    let creates = fake.calls("create");
    for _ in 0..50 {
        let _ = broker.get("p").await;
    }
    assert!(
        fake.calls("create") <= creates + 1,
        "requests hammered the provider"
    );

    fake.set_faults(Faults::default());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fresh = broker.get("p").await.expect("recovered");
    assert_ne!(fresh.handle, first.handle);
    assert!(positive(fresh.expires_at - clock.now()) >= policy.min_remaining);

    broker
        .stop(tokio::time::Instant::now() + Duration::from_secs(20))
        .await;
    assert!(fake.live().is_empty());
}

/// A 429 with Retry-After: the broker waits at least that long before the next create.
#[tokio::test(start_paused = true)]
async fn rate_limit_retry_after_is_honoured() {
    let clock = Clock::tokio();
    let fake = FakeCloud::new(clock.clone());
    fake.set_faults(Faults {
        create_status: Some((429, "slow down".into())),
        retry_after: Some(30),
        ..Faults::default()
    });
    let broker = broker_for(&fake, fake.token(), &clock, hour_policy(), true, 3);
    match broker.get("p").await {
        Err(ServeError::Unavailable(u)) => {
            assert!(u.retry_after >= Duration::from_secs(29), "{u:?}")
        }
        other => panic!("expected 503, got {other:?}"),
    }
    let after_first = fake.calls("create");
    tokio::time::sleep(Duration::from_secs(29)).await;
    let _ = broker.get("p").await;
    assert_eq!(
        fake.calls("create"),
        after_first,
        "retried inside Retry-After"
    );
    fake.set_faults(Faults::default());
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.get("p").await.expect("a key after Retry-After");
    broker
        .stop(tokio::time::Instant::now() + Duration::from_secs(20))
        .await;
    assert!(fake.live().is_empty());
}

/// A key the provider says never expires is revoked at once and never served.
#[tokio::test(start_paused = true)]
async fn unserveable_answers_are_errors_not_keys() {
    let clock = Clock::tokio();
    let fake = FakeCloud::new(clock.clone());
    fake.set_faults(Faults {
        malformed_create: true,
        ..Faults::default()
    });
    let broker = broker_for(&fake, fake.token(), &clock, hour_policy(), false, 5);
    match broker.get("p").await {
        Err(ServeError::Unavailable(u)) => {
            assert!(u.message.contains("unreadable answer"), "{u:?}")
        }
        other => panic!("expected 503, got {other:?}"),
    }
    for sentinel in ["1970-01-01T00:00:00Z", "0001-01-01T00:00:00Z"] {
        fake.set_faults(Faults {
            expiry_override: Some(sentinel.into()),
            ..Faults::default()
        });
        tokio::time::sleep(Duration::from_secs(61)).await;
        match broker.get("p").await {
            Err(ServeError::Unavailable(u)) => {
                assert!(u.message.contains("without an expiry"), "{sentinel}: {u:?}")
            }
            other => panic!("{sentinel}: expected 503, got {other:?}"),
        }
        assert!(
            fake.live().is_empty(),
            "the permanent key was not revoked: {:?}",
            fake.live()
        );
    }
    broker
        .stop(tokio::time::Instant::now() + Duration::from_secs(20))
        .await;
    assert!(fake.live().is_empty());
}

/// A wrong API token: a 401 is not retried in a loop, and the error names the profile and
/// carries the provider's own message.
#[tokio::test(start_paused = true)]
async fn a_rejected_token_is_reported_without_a_retry_storm() {
    let clock = Clock::tokio();
    let fake = FakeCloud::new(clock.clone());
    let broker = broker_for(&fake, "wrong-token", &clock, hour_policy(), true, 1);
    for _ in 0..100 {
        match broker.get("p").await {
            Err(ServeError::Unavailable(u)) => {
                assert!(
                    u.message.starts_with("profile p has no valid key: "),
                    "{u:?}"
                );
                assert!(
                    u.message.contains("HTTP 401")
                        && u.message.contains("invalid API access token"),
                    "{u:?}"
                );
            }
            other => panic!("expected 503, got {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Ten simulated seconds of requests every 100 ms: a handful of attempts, not a hundred.
    let attempts = fake.calls("unauthorized");
    assert!((1..=3).contains(&attempts), "{attempts} attempts");
    broker
        .stop(tokio::time::Instant::now() + Duration::from_secs(20))
        .await;
    assert!(fake.live().is_empty());
}
