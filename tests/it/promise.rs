//! The central promise under budgets, faults, reloads and stops: a served key works until the
//! Expiration it was served with, and no key the broker minted outlives its use. Paused-time
//! tests drive the library against the fake in process; the daemon tests run the real binary.

use std::sync::Arc;
use std::time::Duration;

use keybroker::broker::{Broker, ServeError, LANDING_GRACE, MAX_RETIRED, SETTLE_WAIT};
use keybroker::clock::{positive, Clock};

use crate::broker_time::{broker_with_options, hour_policy, max_jitter, PromiseWatch};
use crate::fake_cloud::{FakeCloud, Faults, PROVIDERS};
use crate::harness::Env;

const MIN: Duration = Duration::from_secs(60);

fn broker(fake: &Arc<FakeCloud>, provider: &str, clock: &Clock, seed: u64) -> Broker {
    broker_with_options(
        fake.provider(provider, clock, false),
        hour_policy(),
        true,
        max_jitter(clock, seed),
    )
}

async fn stop(broker: &Broker) -> keybroker::broker::StopReport {
    broker
        .stop(tokio::time::Instant::now() + Duration::from_secs(20))
        .await
}

/// Two `rotate`s in a row on Crusoe: the second would need a third key, and the only way to
/// make room would be to revoke the key the first rotation retired, which clients still hold.
/// It is refused with a message saying when room opens; the retired key lives until its
/// Expiration; after that a rotation works again.
#[tokio::test(start_paused = true)]
async fn two_quick_rotates_on_crusoe_revoke_no_served_key_early() {
    let clock = Clock::tokio();
    let fake = FakeCloud::new(clock.clone());
    let broker = broker(&fake, "crusoe", &clock, 31);
    let promise = PromiseWatch::default();
    let first = broker.get("p").await.unwrap();
    promise.watch(
        &fake,
        &clock,
        first.handle.access_key_id.clone(),
        first.expires_at,
    );
    let slot = broker.slot("p").unwrap();

    let rotated = slot
        .rotate(Duration::from_secs(30))
        .await
        .expect("first rotation");
    assert_eq!(
        rotated.retired.as_deref(),
        Some(first.handle.access_key_id.as_str())
    );
    let second = broker.get("p").await.unwrap();
    promise.watch(
        &fake,
        &clock,
        second.handle.access_key_id.clone(),
        second.expires_at,
    );

    let refused = slot.rotate(Duration::from_secs(30)).await.unwrap_err();
    assert!(
        refused.contains("allows 2 keys")
            && refused.contains(&first.handle.access_key_id)
            && refused.contains(&keybroker::credentials::format_expiration(first.expires_at)),
        "{refused}"
    );
    assert!(fake
        .key(&first.handle.access_key_id)
        .unwrap()
        .revoked_at
        .is_none());

    // Past the first key's Expiration there is room again.
    tokio::time::sleep(positive(first.expires_at - clock.now()) + Duration::from_secs(1)).await;
    let third = slot
        .rotate(Duration::from_secs(30))
        .await
        .expect("room after expiry");
    assert!(third.retired.is_some(), "{third:?}");
    assert!(fake.peak_live() <= 2, "Crusoe above two keys");

    let (broken, checked) = promise.end();
    assert!(broken.is_empty(), "{broken:#?}");
    assert_eq!(checked, 2, "both keys reached their Expiration - 1 s alive");
    assert!(stop(&broker).await.is_clean());
    assert!(fake.live().is_empty(), "{:?}", fake.live());
}

/// Every revoke is answered 400 for a day: renewals go on (CoreWeave has no key budget), the
/// refused keys show in status with the provider's words and in /metrics, and the retired list
/// stays within its bound.
#[tokio::test(start_paused = true)]
async fn refused_revokes_keep_renewals_going_within_a_bounded_retired_list() {
    let clock = Clock::tokio();
    let fake = FakeCloud::new(clock.clone());
    fake.set_faults(Faults {
        revoke_status: Some((400, "access key is locked by a legal hold".into())),
        ..Faults::default()
    });
    let broker = broker(&fake, "coreweave", &clock, 32);
    let mut most_retired = 0;
    for _ in 0..(24 * 6) {
        broker.get("p").await.expect("a key every ten minutes");
        most_retired = most_retired.max(broker.status()[0].2.retired_keys);
        tokio::time::sleep(10 * MIN).await;
    }
    let (_, _, status) = broker.status().remove(0);
    assert!(status.counters.mints >= 45, "renewals stopped: {status:?}");
    assert!(
        most_retired <= MAX_RETIRED,
        "retired list grew to {most_retired}"
    );
    let refused = status.failing_revokes.first().unwrap_or_else(|| {
        panic!(
            "no failing revoke in status: {status:#?} {:#?}",
            fake.keys()
        )
    });
    assert_eq!(refused.kind, keybroker::api::RevokeFailure::Refused);
    assert!(
        refused
            .error
            .contains("access key is locked by a legal hold"),
        "{refused:?}"
    );
    assert!(status.blocked.is_none(), "{status:?}");
    assert!(
        status.retired_given_up > 0,
        "the bound was reached: {status:?}"
    );

    let slots = broker.slots();
    let samples: Vec<keybroker::metrics::ProfileSample> = slots
        .iter()
        .map(|(name, slot)| keybroker::metrics::ProfileSample {
            profile: name,
            provider: keybroker::provider::ProviderKind::Coreweave,
            revocable: true,
            values: (&status).into(),
            upstream: slot.upstream(),
        })
        .collect();
    let scrape =
        keybroker::metrics::render(&samples, &Default::default(), Default::default(), None);
    let line = format!(
        "keybroker_failing_revokes{{profile=\"p\",provider=\"coreweave\"}} {}",
        status.failing_revokes.len()
    );
    assert!(scrape.contains(&line), "{line} not in the scrape");

    fake.set_faults(Faults::default());
    assert!(stop(&broker).await.is_clean());
    assert!(fake.live().is_empty(), "{:?}", fake.live());
}

/// A create answered 500 after the provider made the key: the key is found by its tag and
/// revoked before the next create; the fake ends with no key.
#[tokio::test(start_paused = true)]
async fn a_create_answered_500_is_found_by_tag_and_revoked_before_the_next() {
    for (seed, provider) in PROVIDERS.into_iter().enumerate() {
        let clock = Clock::tokio();
        let fake = FakeCloud::new(clock.clone());
        fake.set_faults(Faults {
            create_then_status: Some(500),
            ..Faults::default()
        });
        let broker = broker(&fake, provider, &clock, 40 + seed as u64);
        let first = broker.get("p").await;
        assert!(
            matches!(first, Err(ServeError::Unavailable(_))),
            "{provider}: {first:?}"
        );
        fake.set_faults(Faults::default());
        tokio::time::sleep(Duration::from_secs(2)).await;
        let key = broker
            .get("p")
            .await
            .unwrap_or_else(|e| panic!("{provider}: {e:?}"));
        let keys = fake.keys();
        assert_eq!(keys.len(), 2, "{provider}: {keys:?}");
        let (lost, served) = (&keys[0], &keys[1]);
        assert_eq!(served.id, key.handle.access_key_id);
        let revoked = lost
            .revoked_at
            .unwrap_or_else(|| panic!("{provider}: lost key alive"));
        assert!(
            revoked <= served.created,
            "{provider}: revoked after the next create"
        );
        assert!(broker.status()[0].2.unsettled_creates.is_empty());
        assert!(stop(&broker).await.is_clean(), "{provider}");
        assert!(fake.live().is_empty(), "{provider}: {:?}", fake.live());
    }
}

/// With the provider's listing failing, a create whose answer was lost holds up new creates
/// for at most SETTLE_WAIT; the profile then gets a key, status shows the unsettled create,
/// and once listings work again its key is found and revoked.
#[tokio::test(start_paused = true)]
async fn a_lost_create_with_listing_down_does_not_stop_new_keys() {
    let clock = Clock::tokio();
    let fake = FakeCloud::new(clock.clone());
    fake.set_faults(Faults {
        drop_create_responses: 1,
        fail_lists: true,
        ..Faults::default()
    });
    let broker = broker(&fake, "coreweave", &clock, 33);
    let started = tokio::time::Instant::now();
    let key = loop {
        match broker.get("p").await {
            Ok(key) => break key,
            Err(_) => {
                assert!(
                    started.elapsed() < SETTLE_WAIT + 2 * MIN,
                    "no key while listing is down"
                );
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    };
    let (_, _, status) = broker.status().remove(0);
    let unsettled = &status.unsettled_creates;
    assert_eq!(unsettled.len(), 1, "{status:?}");
    assert!(
        unsettled[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("listing is down")),
        "{unsettled:?}"
    );
    let lost = fake.keys().remove(0);
    assert_ne!(lost.id, key.handle.access_key_id);
    assert_eq!(lost.tag.as_deref(), Some(unsettled[0].tag.as_str()));

    fake.set_faults(Faults::default());
    tokio::time::sleep(2 * MIN).await;
    assert!(
        fake.key(&lost.id).unwrap().revoked_at.is_some(),
        "found and revoked"
    );
    assert!(broker.status()[0].2.unsettled_creates.is_empty());
    assert!(stop(&broker).await.is_clean());
    assert!(fake.live().is_empty(), "{:?}", fake.live());
}

/// A create the provider carries out after its caller gave up (the call times out at 10 s, the
/// key lands at 15 s) is not closed as "made no key" by a listing taken before it landed: it
/// is looked for until LANDING_GRACE has passed, found, and revoked.
#[tokio::test(start_paused = true)]
async fn a_create_that_lands_after_its_timeout_is_found() {
    for (seed, provider) in PROVIDERS.into_iter().enumerate() {
        let clock = Clock::tokio();
        let fake = FakeCloud::new(clock.clone());
        fake.set_faults(Faults {
            create_latency: Duration::from_secs(15),
            lands_late: true,
            ..Faults::default()
        });
        let broker = broker(&fake, provider, &clock, 50 + seed as u64);
        tokio::time::sleep(Duration::from_secs(12)).await;
        assert!(fake.keys().is_empty(), "{provider}: landed too early");
        assert_eq!(
            broker.status()[0].2.unsettled_creates.len(),
            1,
            "{provider}"
        );
        fake.set_faults(Faults::default());
        tokio::time::sleep(LANDING_GRACE).await;
        let landed = fake
            .keys()
            .into_iter()
            .find(|k| k.created <= clock.now() - LANDING_GRACE + Duration::from_secs(5))
            .unwrap_or_else(|| panic!("{provider}: the late key never landed"));
        assert!(
            landed.revoked_at.is_some(),
            "{provider}: the late key is alive"
        );
        assert!(
            broker.status()[0].2.unsettled_creates.is_empty(),
            "{provider}"
        );
        assert!(stop(&broker).await.is_clean(), "{provider}");
        assert!(fake.live().is_empty(), "{provider}: {:?}", fake.live());
    }
}

/// Creates delayed 15 s that land after their caller gave up; `rotate` on each provider;
/// SIGTERM 1 s later: the daemon exits 1 naming each unsettled create, and the next start finds
/// the keys when they land and leaves none alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_in_flight_at_stop_are_settled_by_the_next_start() {
    let fake = FakeCloud::new(Clock::System);
    let url = fake.serve().await;
    let env = Env::new();
    let profiles: String = PROVIDERS
        .iter()
        .map(|p| fake.profile_toml(p, p, &url, &env, ""))
        .collect();
    let config = env.config(&format!(
        "[server]\nshutdown_timeout = \"20s\"\n\n{profiles}"
    ));
    let mut daemon = tokio::task::block_in_place(|| env.serve(&config, "info"));
    crate::harness::wait_until("three prewarmed keys", Duration::from_secs(20), || {
        fake.live().len() == 3
    })
    .await;
    fake.set_faults(Faults {
        create_latency: Duration::from_secs(15),
        lands_late: true,
        ..Faults::default()
    });
    let rotations: Vec<std::process::Child> = PROVIDERS
        .iter()
        .map(|p| {
            env.command(&["rotate", p])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    crate::harness::wait_until("three creates under way", Duration::from_secs(10), || {
        fake.calls("create") == 6
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (status, _) = tokio::task::block_in_place(|| daemon.stop(Duration::from_secs(30)));
    for mut r in rotations {
        let _ = r.wait();
    }
    assert_eq!(status.code(), Some(1), "{}", daemon.logs());
    // The three keys land at 15 s, after the stop.
    crate::harness::wait_until("the late keys land", Duration::from_secs(20), || {
        fake.keys().len() == 6
    })
    .await;
    let logs = daemon.logs();
    let last = logs.lines().last().unwrap_or_default();
    let late: Vec<String> = fake.keys().iter().skip(3).map(|k| k.id.clone()).collect();
    for key in fake.keys().iter().skip(3) {
        let tag = key.tag.as_deref().unwrap();
        assert!(
            last.contains(tag),
            "{tag} not named in the last log line: {last}"
        );
    }

    fake.set_faults(Faults::default());
    let mut next = tokio::task::block_in_place(|| env.serve(&config, "info"));
    crate::harness::wait_until("the late keys revoked", Duration::from_secs(60), || {
        late.iter()
            .all(|id| fake.key(id).unwrap().revoked_at.is_some())
    })
    .await;
    let (status, _) = tokio::task::block_in_place(|| next.stop(Duration::from_secs(30)));
    assert!(status.success(), "{}", next.logs());
    assert!(fake.live().is_empty(), "{:?}", fake.live());
}

/// SIGHUP removing a profile, then SIGTERM at once: the removed profile's key stays valid
/// after the reload (clients hold it until its Expiration), the stop revokes it, exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_removing_a_profile_then_sigterm_leaves_no_key() {
    let fake = FakeCloud::new(Clock::System);
    let url = fake.serve().await;
    let env = Env::new();
    let keep = fake.profile_toml("coreweave", "keep", &url, &env, "");
    let gone = fake.profile_toml("glesys", "gone", &url, &env, "");
    let config = env.config(&format!("{keep}\n{gone}"));
    let mut daemon = tokio::task::block_in_place(|| env.serve(&config, "info"));
    crate::harness::wait_until("two prewarmed keys", Duration::from_secs(20), || {
        fake.live().len() == 2
    })
    .await;
    std::fs::write(&config, &keep).unwrap();
    daemon.signal(rustix::process::Signal::HUP);
    crate::harness::wait_until("the reload", Duration::from_secs(10), || {
        daemon.logs().contains("reload: profile out of service")
    })
    .await;
    assert_eq!(
        fake.live().len(),
        2,
        "the removed profile's key was revoked before its Expiration"
    );
    let (status, _) = tokio::task::block_in_place(|| daemon.stop(Duration::from_secs(30)));
    assert!(status.success(), "{}", daemon.logs());
    assert!(fake.live().is_empty(), "{:?}", fake.live());
}
