//! The broker over simulated time: paused tokio clock, the real CoreWeave provider code talking
//! to the fake's HTTP handler in process (no socket, so no real I/O races the paused clock).

use std::sync::Arc;
use std::time::Duration;

use keybroker::api::State;
use keybroker::broker::{Broker, BrokerOptions, ProfileSpec, RenewPolicy, ServeError};
use keybroker::clock::{positive, Clock};
use keybroker::provider::Provider;
use time::OffsetDateTime;

use crate::fake_cloud::{FakeCloud, Faults};

const MIN: Duration = Duration::from_secs(60);

pub(crate) fn hour_policy() -> RenewPolicy {
    RenewPolicy {
        lifetime: 60 * MIN,
        renew_before: 30 * MIN,
        min_remaining: 20 * MIN,
    }
}

fn broker_with(
    provider: Arc<dyn Provider>,
    clock: &Clock,
    policy: RenewPolicy,
    prewarm: bool,
    seed: u64,
) -> Broker {
    let options = BrokerOptions {
        seed: Some(seed),
        tag_prefix: TEST_TAG_PREFIX.to_string(),
        ..BrokerOptions::new(clock.clone())
    };
    broker_with_options(provider, policy, prewarm, options)
}

/// Jitter at its maximum: every renewal as early as jitter allows.
pub(crate) fn max_jitter(clock: &Clock, seed: u64) -> BrokerOptions {
    BrokerOptions {
        seed: Some(seed),
        fixed_jitter: Some(1.0),
        tag_prefix: TEST_TAG_PREFIX.to_string(),
        ..BrokerOptions::new(clock.clone())
    }
}

pub(crate) fn broker_with_options(
    provider: Arc<dyn Provider>,
    policy: RenewPolicy,
    prewarm: bool,
    options: BrokerOptions,
) -> Broker {
    Broker::start(
        vec![ProfileSpec {
            name: "p".into(),
            provider,
            policy,
            prewarm,
            revoke_on_shutdown: true,
            adopted: Vec::new(),
            unsettled: Vec::new(),
        }],
        options,
    )
}

/// The tag prefix of the brokers in these tests.
pub(crate) const TEST_TAG_PREFIX: &str = "keybroker-test-0000cafe-";

/// A broker for profile `p` of CoreWeave against `fake`, with the right token or a wrong one.
fn broker_for(
    fake: &Arc<FakeCloud>,
    wrong_token: bool,
    clock: &Clock,
    policy: RenewPolicy,
    prewarm: bool,
    seed: u64,
) -> Broker {
    broker_with(
        fake.provider("coreweave", clock, wrong_token),
        clock,
        policy,
        prewarm,
        seed,
    )
}

/// Checks, at a served key's `Expiration` − 1 s, that the key is still alive at the fake: the
/// central promise. Keys whose check falls after `end` (stop revokes them) are not checked.
#[derive(Clone, Default)]
pub(crate) struct PromiseWatch {
    broken: Arc<std::sync::Mutex<Vec<String>>>,
    checked: Arc<std::sync::atomic::AtomicUsize>,
    ended: Arc<std::sync::atomic::AtomicBool>,
}

impl PromiseWatch {
    pub(crate) fn watch(
        &self,
        fake: &Arc<FakeCloud>,
        clock: &Clock,
        id: String,
        expiration: OffsetDateTime,
    ) {
        let (me, fake, clock) = (self.clone(), Arc::clone(fake), clock.clone());
        tokio::spawn(async move {
            tokio::time::sleep_until(clock.instant_at(expiration - Duration::from_secs(1))).await;
            if me.ended.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            me.checked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let at_fake = fake.key(&id).expect("a served key exists at the fake");
            let now = clock.now();
            if at_fake.revoked_at.is_some() || at_fake.expires_at.is_some_and(|e| e <= now) {
                me.broken.lock().unwrap().push(format!(
                    "{id} served until {expiration} was dead at {now}: revoked at {:?}",
                    at_fake.revoked_at
                ));
            }
        });
    }

    /// Ends the watch (before stop) and returns the broken promises and the number checked.
    pub(crate) fn end(&self) -> (Vec<String>, usize) {
        self.ended.store(true, std::sync::atomic::Ordering::SeqCst);
        (
            self.broken.lock().unwrap().clone(),
            self.checked.load(std::sync::atomic::Ordering::SeqCst),
        )
    }
}

/// 24 simulated hours of one provider with renewal jitter at its maximum, a request every
/// simulated minute: every key served is alive at the fake at its served Expiration − 1 s;
/// renewals come before `renew_before` (with a key budget, no later than the retired key's
/// Expiration allows, and always before `min_remaining`); every served key has at least
/// `min_remaining` left; every retired key is revoked by the end of its lease (for GleSYS the
/// lease is the only expiry); the provider's key budget is respected; stop leaves no key alive.
async fn a_day_of_renewals(provider: &str) {
    let clock = Clock::tokio();
    let fake = FakeCloud::new(clock.clone());
    let latency = Duration::from_secs(2);
    fake.set_faults(Faults {
        create_latency: latency,
        ..Faults::default()
    });
    let policy = hour_policy();
    let broker = broker_with_options(
        fake.provider(provider, &clock, false),
        policy,
        true,
        max_jitter(&clock, 7),
    );
    let promise = PromiseWatch::default();

    let mut lease_end = std::collections::HashMap::new();
    let mut max_live = 0;
    for _ in 0..(24 * 60) {
        let key = broker.get("p").await.expect("a key every minute");
        let id = key.handle.access_key_id.clone();
        if !lease_end.contains_key(&id) {
            promise.watch(&fake, &clock, id.clone(), key.expires_at);
        }
        let left = positive(key.expires_at - clock.now());
        assert!(
            left >= policy.min_remaining,
            "{provider}: served {id} with only {left:?} left"
        );
        let at_fake = fake.key(&id).expect("served key exists at the fake");
        assert!(
            at_fake.revoked_at.is_none(),
            "{provider}: served a revoked key"
        );
        if let Some(expiry) = at_fake.expires_at {
            assert!(
                expiry > clock.now() && key.expires_at <= expiry,
                "{provider}: served Expiration beyond the real one"
            );
        }
        lease_end.insert(id, key.expires_at);
        max_live = max_live.max(fake.live().len());
        tokio::time::sleep(MIN).await;
    }
    let budget = if provider == "crusoe" { 2 } else { 3 };
    assert!(
        max_live <= budget && fake.peak_live() <= budget,
        "{provider}: live keys peaked at {max_live}/{}",
        fake.peak_live()
    );

    let end = clock.now();
    let (broken, checked) = promise.end();
    assert!(broken.is_empty(), "{provider}: {broken:#?}");
    assert!(
        checked >= 45,
        "{provider}: only {checked} served keys reached their Expiration"
    );
    let report = broker
        .stop(tokio::time::Instant::now() + Duration::from_secs(20))
        .await;
    assert!(report.is_clean(), "{provider}: {report:?}");
    assert!(
        fake.live().is_empty(),
        "{provider}: keys alive after stop: {:?}",
        fake.live()
    );

    let keys = fake.keys();
    // A renewal about every 27-30 minutes: roughly 48-54 keys in a day.
    assert!(
        (48..=56).contains(&keys.len()),
        "{provider}: {} keys minted in 24h",
        keys.len()
    );
    assert_eq!(
        fake.calls("create") as usize,
        keys.len(),
        "{provider}: no failed or duplicate creates"
    );
    // Every key minted was served, but perhaps one minted after the last request.
    assert!(
        lease_end.len() + 1 >= keys.len()
            && keys
                .iter()
                .rev()
                .skip(1)
                .all(|k| lease_end.contains_key(&k.id)),
        "{provider}: {} keys minted, {} served",
        keys.len(),
        lease_end.len()
    );
    for pair in keys.windows(2) {
        let (old, new) = (&pair[0], &pair[1]);
        let old_end = lease_end[&old.id];
        // The successor was requested (the fake makes a key when the request arrives and
        // answers `latency` later) before the old key got down to renew_before; under
        // Crusoe's two-key budget it waits for the key before the old one to expire, and
        // still comes before the old key gets down to min_remaining.
        let renew_by = if provider == "crusoe" {
            old_end - policy.min_remaining
        } else {
            old_end - policy.renew_before
        };
        assert!(
            new.created <= renew_by,
            "{provider}: key {} renewed at {} with too little left (lease ends {old_end})",
            old.id,
            new.created
        );
        // Every retired key is revoked: no later than its lease end (tokio timers fire on the
        // next millisecond tick, hence the millisecond of slack), or at stop if still valid then.
        let revoked = old
            .revoked_at
            .unwrap_or_else(|| panic!("{provider}: retired key {} never revoked", old.id));
        if old_end <= end {
            assert!(
                revoked <= old_end + Duration::from_millis(1),
                "{provider}: key {} revoked at {revoked}, after its lease end {old_end}",
                old.id
            );
        } else {
            assert!(
                revoked >= end,
                "{provider}: key {} revoked early, at {revoked}",
                old.id
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_day_of_renewals_coreweave() {
    a_day_of_renewals("coreweave").await;
}

#[tokio::test(start_paused = true)]
async fn a_day_of_renewals_crusoe_within_two_keys() {
    a_day_of_renewals("crusoe").await;
}

#[tokio::test(start_paused = true)]
async fn a_day_of_renewals_glesys_deletes_at_lease_end() {
    a_day_of_renewals("glesys").await;
}

/// When renewal fails, the last key is served (degraded) until the floor before its expiry,
/// then requests get 503 with Retry-After; a recovered provider is used at once.
#[tokio::test(start_paused = true)]
async fn degraded_then_unavailable_then_recovered() {
    let clock = Clock::tokio();
    let fake = FakeCloud::new(clock.clone());
    let policy = hour_policy();
    let broker = broker_for(&fake, false, &clock, policy, true, 11);
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
    assert_eq!(status.state, State::Degraded);
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
    let broker = broker_for(&fake, false, &clock, hour_policy(), true, 3);
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
    let broker = broker_for(&fake, false, &clock, hour_policy(), false, 5);
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
    let broker = broker_for(&fake, true, &clock, hour_policy(), true, 1);
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

/// A key someone else made sits in the Crusoe user's two-key budget: keybroker never deletes
/// it, serves its own key while it can, and says in status and errors what blocks renewal,
/// without hammering the API.
#[tokio::test(start_paused = true)]
async fn a_third_party_crusoe_key_is_never_touched_and_is_reported() {
    let clock = Clock::tokio();
    let fake = FakeCloud::new(clock.clone());
    let foreign = fake.add_crusoe_key("ci-pipeline-key", true);
    let policy = hour_policy();
    let broker = broker_with(
        fake.provider("crusoe", &clock, false),
        &clock,
        policy,
        true,
        21,
    );
    let first = broker
        .get("p")
        .await
        .expect("one key fits beside the foreign one");

    // Past the renewal point: renewal needs a second key of ours, and there is no room.
    tokio::time::sleep(positive(first.expires_at - clock.now()) - policy.renew_before + 20 * MIN)
        .await;
    let creates_before = fake.calls("create");
    let served = broker
        .get("p")
        .await
        .expect("the current key is still served");
    assert_eq!(served.handle, first.handle);
    let status = &broker.status()[0].2;
    let error = status.last_error.as_deref().unwrap_or_default();
    assert!(
        error.contains("not minted by keybroker")
            && error.contains(&foreign)
            && error.contains("maximum of 2"),
        "{error}"
    );
    assert_eq!(status.state, State::Degraded);
    // Twenty minutes of failed renewals cost a bounded number of calls (backoff up to 60 s).
    assert!(
        creates_before <= 30,
        "{creates_before} creates in 20 minutes"
    );
    assert!(
        fake.key(&foreign).unwrap().revoked_at.is_none(),
        "the foreign key was revoked"
    );

    broker
        .stop(tokio::time::Instant::now() + Duration::from_secs(20))
        .await;
    assert!(
        fake.live().is_empty(),
        "keybroker's own keys are revoked at stop"
    );
    assert!(
        fake.key(&foreign).unwrap().revoked_at.is_none(),
        "the foreign key survives stop"
    );
}

/// Keys keybroker tagged in an earlier life fill the budget: a create refused at the limit is
/// answered by evicting keybroker's own oldest key and retrying once.
#[tokio::test(start_paused = true)]
async fn leftover_keybroker_keys_are_evicted_to_make_room() {
    let clock = Clock::tokio();
    let fake = FakeCloud::new(clock.clone());
    let oldest = fake.add_crusoe_key(&format!("{TEST_TAG_PREFIX}leftover1"), false);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let newer = fake.add_crusoe_key(&format!("{TEST_TAG_PREFIX}leftover2"), false);
    let broker = broker_with(
        fake.provider("crusoe", &clock, false),
        &clock,
        hour_policy(),
        true,
        22,
    );
    let key = broker.get("p").await.expect("room was made");
    assert!(
        fake.key(&oldest).unwrap().revoked_at.is_some(),
        "the oldest leftover was evicted"
    );
    assert!(fake.key(&newer).unwrap().revoked_at.is_none());
    assert!(fake.calls("limit") >= 1 && fake.calls("list") >= 1);
    assert_ne!(key.handle.access_key_id, newer);
    broker
        .stop(tokio::time::Instant::now() + Duration::from_secs(20))
        .await;
    assert!(
        fake.live().iter().all(|k| k.id == newer),
        "only the untracked leftover may remain: {:?}",
        fake.live()
    );
}

/// A Crusoe key that sees several organizations needs org_id; the error lists them.
#[tokio::test(start_paused = true)]
async fn crusoe_org_discovery_needs_exactly_one_org() {
    let clock = Clock::tokio();
    let fake = FakeCloud::new(clock.clone());
    fake.set_extra_orgs(1);
    let broker = broker_with(
        fake.provider("crusoe", &clock, false),
        &clock,
        hour_policy(),
        true,
        23,
    );
    match broker.get("p").await {
        Err(ServeError::Unavailable(u)) => {
            assert!(
                u.message.contains("sees 2 organizations") && u.message.contains("set org_id"),
                "{u:?}"
            );
            assert!(u.message.contains(fake.crusoe_org()), "{u:?}");
        }
        other => panic!("expected 503, got {other:?}"),
    }
    broker
        .stop(tokio::time::Instant::now() + Duration::from_secs(20))
        .await;
    assert!(fake.live().is_empty());
}

/// An OIDC profile through 24 simulated hours whose token file is rewritten every hour, each
/// time for another subject (as kubelet refreshes a projected service-account token): every
/// key served has at least `min_remaining` left, every mint read the file afresh (its key
/// belongs to the subject written last), no expired token ever reached the provider, no
/// exchange carried an `Authorization` header, and stop revokes every key.
#[tokio::test(start_paused = true)]
async fn a_day_of_oidc_renewals_reads_the_token_file_each_time() {
    let clock = Clock::tokio();
    let fake = FakeCloud::new(clock.clone());
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    let write_token = |hour: u32| {
        let token = fake.oidc_token(&format!("sa-{hour}"), clock.now() + 80 * MIN);
        std::fs::write(&token_file, token).unwrap();
    };
    write_token(0);
    let policy = hour_policy();
    let broker = broker_with_options(
        fake.oidc_provider(&token_file, &clock),
        policy,
        true,
        max_jitter(&clock, 11),
    );
    let mut served = std::collections::BTreeMap::new();
    for minute in 0..(24 * 60) {
        if minute % 60 == 0 {
            write_token(minute / 60);
        }
        let key = broker.get("p").await.expect("a key every minute");
        let left = positive(key.expires_at - clock.now());
        assert!(
            left >= policy.min_remaining,
            "served with only {left:?} left"
        );
        served.insert(key.handle.access_key_id.clone(), ());
        tokio::time::sleep(MIN).await;
    }
    assert_eq!(fake.calls("exchange_expired_token"), 0);
    assert_eq!(fake.calls("exchange_with_authorization"), 0);
    assert_eq!(fake.calls("unauthorized"), 0, "revokes used the API token");
    let keys = fake.keys();
    assert!(
        (48..=56).contains(&keys.len()),
        "{} keys minted in 24h",
        keys.len()
    );
    for k in &keys {
        // Minted in hour h, from the token written at the start of hour h.
        let hour = (k.created - keys[0].created).whole_hours();
        let want = format!("role/{}:sa-{hour}", crate::fake_cloud::WIF_ISSUER);
        assert_eq!(k.principal.as_deref(), Some(want.as_str()), "key {}", k.id);
    }
    assert!(served.len() + 1 >= keys.len());
    let report = broker
        .stop(tokio::time::Instant::now() + Duration::from_secs(20))
        .await;
    assert!(report.is_clean(), "{report:?}");
    assert!(
        fake.live().is_empty(),
        "alive after stop: {:?}",
        fake.live()
    );
}

/// A token the provider refuses (no access policy for its principal): the error carries the
/// provider's words and says which, nothing is served, and the driver's attempts wait the
/// whole backoff cap (a minute) from the first refusal: a refused token is not fixed by
/// retrying sooner. (Requests may trigger an attempt at most every 10 s.)
#[tokio::test(start_paused = true)]
async fn a_refused_oidc_token_is_explained_and_retried_with_backoff() {
    let clock = Clock::tokio();
    let fake = FakeCloud::new(clock.clone());
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(
        &token_file,
        fake.oidc_token("intruder", clock.now() + 600 * MIN),
    )
    .unwrap();
    fake.deny_subject("intruder");
    let broker = broker_with(
        fake.oidc_provider(&token_file, &clock),
        &clock,
        hour_policy(),
        true,
        3,
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    match broker.get("p").await {
        Err(ServeError::Unavailable(u)) => assert!(
            u.message.contains("permission denied")
                && u.message
                    .contains("no org access policy lets principal role/")
                && u.message.contains(":intruder"),
            "{u:?}"
        ),
        other => panic!("expected 503, got {other:?}"),
    }
    // Attempts per minute with no requests: one, and it keeps trying.
    let mut per_minute = Vec::new();
    for _ in 0..10 {
        let before = fake.calls("exchange");
        tokio::time::sleep(MIN).await;
        per_minute.push(fake.calls("exchange") - before);
    }
    assert!(per_minute.iter().all(|n| *n == 1), "{per_minute:?}");
    assert!(fake.live().is_empty());
    broker
        .stop(tokio::time::Instant::now() + Duration::from_secs(20))
        .await;
}
