//! Many profiles on one provider endpoint: they share its rate limit through one pacer, so a
//! prewarm of hundreds of profiles neither floods the provider nor makes a client with a cold
//! profile wait behind the queue.

use std::time::{Duration, Instant};

use keybroker::clock::Clock;

use crate::fake_cloud::{stop_leaving_no_key, FakeCloud, Faults};
use crate::harness::Env;

/// 300 prewarmed CoreWeave profiles against a provider that allows 50 creates a second and
/// takes 100 ms for each: every profile has its key within 8 s (6 s is the provider's own
/// floor), at most one create in ten is refused with 429, and the provider never has more
/// creates in flight than `upstream_concurrency` (8). A request for a profile that is not
/// prewarmed, made a second into the prewarm, is answered within a second of its own create.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_profiles_share_one_rate_limited_endpoint() {
    const PROFILES: usize = 300;
    let latency = Duration::from_millis(100);
    let fake = FakeCloud::new(Clock::System);
    fake.set_faults(Faults {
        create_rate: Some(50),
        create_latency: latency,
        ..Faults::default()
    });
    let url = fake.serve().await;
    let env = Env::new();
    let mut toml = String::from("[server]\nupstream_concurrency = 8\n\n");
    for i in 0..PROFILES {
        toml += &fake.profile_toml("coreweave", &format!("p{i}"), &url, &env, "");
    }
    toml += &fake.profile_toml("coreweave", "cold", &url, &env, "prewarm = false\n");
    let config = env.config(&toml);

    let start = Instant::now();
    let mut daemon = tokio::task::block_in_place(|| env.serve(&config, "warn"));
    tokio::time::sleep_until((start + Duration::from_secs(1)).into()).await;
    let queued = PROFILES - fake.live().len();
    let asked = Instant::now();
    let (code, out, err) =
        tokio::task::block_in_place(|| env.run(&["credential-process", "--profile", "cold"]));
    let answered = time::OffsetDateTime::now_utc();
    let took = asked.elapsed();
    assert_eq!(code, 0, "{err}");

    let deadline = start + Duration::from_secs(30);
    while fake.live().len() < PROFILES + 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all_keys = start.elapsed();
    let live = fake.live();
    assert_eq!(live.len(), PROFILES + 1, "{}", daemon.logs());
    let (creates, throttled) = (fake.calls("create"), fake.calls("throttled"));
    let peak = fake.peak_creates_in_flight();
    eprintln!(
        "scale: {PROFILES} profiles keyed in {all_keys:?}; {creates} creates, {throttled} refused with 429; at most {peak} in flight; the cold profile (behind {queued} queued creates) answered in {took:?}"
    );
    assert!(
        all_keys <= Duration::from_secs(8),
        "all keys after {all_keys:?}"
    );
    assert!(
        throttled * 10 <= creates,
        "{throttled} of {creates} creates got 429"
    );
    assert!(peak <= 8, "{peak} creates in flight at once");
    // Its create was not queued behind the prewarm: the key exists from the create's
    // arrival and its answer comes `latency` later; the client had it within a second of
    // that, and the whole request took far less than the queue ahead of it would have.
    let served: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = served["AccessKeyId"].as_str().unwrap();
    let created = live.iter().find(|k| k.id == id).unwrap().created;
    let after_create = answered - (created + latency);
    assert!(
        after_create < time::Duration::seconds(1),
        "answered {after_create} after its create finished"
    );
    assert!(
        queued > 50,
        "only {queued} creates were still to come at the cold request"
    );
    assert!(
        took < Duration::from_secs(2),
        "the cold request took {took:?}"
    );

    stop_leaving_no_key(&mut daemon, &fake);
}
