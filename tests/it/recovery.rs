//! Never leak a key (README, "Never leak a key"): the ledger, lost creates settled by tag, recovery after
//! kill -9, stop's leftovers finished by the next start, and `keybroker sweep`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keybroker::broker::{Broker, BrokerOptions, ProfileSpec, RenewPolicy};
use keybroker::clock::Clock;
use keybroker::ledger::Ledger;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use time::OffsetDateTime;

use crate::fake_cloud::{FakeCloud, Faults, PROVIDERS};
use crate::harness::{Daemon, Env};

const MIN: Duration = Duration::from_secs(60);

/// A create whose answer is lost after the key was made: before any second create, the key is
/// found by its tag and revoked, for each provider; the ledger ends with nothing open.
#[tokio::test(start_paused = true)]
async fn a_dropped_create_is_found_by_its_tag_and_revoked() {
    for provider in PROVIDERS {
        let clock = Clock::tokio();
        let fake = FakeCloud::new(clock.clone());
        fake.set_faults(Faults {
            drop_create_responses: 1,
            ..Faults::default()
        });
        let dir = tempfile::tempdir().unwrap();
        let ledger = Arc::new(Ledger::open(dir.path()).unwrap());
        let options = BrokerOptions {
            seed: Some(9),
            ledger: Some(Arc::clone(&ledger)),
            tag_prefix: "keybroker-test-00000005-".into(),
            ..BrokerOptions::new(clock.clone())
        };
        let policy = RenewPolicy {
            lifetime: 60 * MIN,
            renew_before: 30 * MIN,
            min_remaining: 20 * MIN,
        };
        let spec = ProfileSpec {
            name: "p".into(),
            provider: fake.provider(provider, &clock, false),
            policy,
            prewarm: true,
            revoke_on_shutdown: true,
            adopted: Vec::new(),
            unsettled: Vec::new(),
        };
        let broker = Broker::start(vec![spec], options);
        let served = loop {
            if let Ok(key) = broker.get("p").await {
                break key;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        let keys = fake.keys();
        assert_eq!(
            keys.len(),
            2,
            "{provider}: one lost create, one good one: {keys:?}"
        );
        let (lost, good) = (&keys[0], &keys[1]);
        assert_eq!(fake.calls("dropped"), 1);
        assert_eq!(served.handle.access_key_id, good.id, "{provider}");
        let revoked = lost
            .revoked_at
            .unwrap_or_else(|| panic!("{provider}: the lost create's key is alive"));
        assert!(
            revoked <= good.created,
            "{provider}: no second create before the first was settled"
        );
        assert!(lost
            .tag
            .as_deref()
            .unwrap()
            .starts_with("keybroker-test-00000005-"));

        broker
            .stop(tokio::time::Instant::now() + Duration::from_secs(20))
            .await;
        assert!(fake.live().is_empty(), "{provider}: {:?}", fake.live());
        assert!(
            ledger.replay().unwrap().open.is_empty(),
            "{provider}: every lease closed"
        );
    }
}

fn short_profiles(fake: &FakeCloud, url: &str, env: &Env) -> String {
    let timing = "lifetime = \"2s\"\nrenew_before = \"1s\"\nmin_remaining = \"500ms\"\nallow_short_keys = true";
    let mut text = String::from("[server]\nshutdown_timeout = \"5s\"\n\n");
    for provider in PROVIDERS {
        text.push_str(&fake.profile_toml(provider, provider, url, env, timing));
    }
    text
}

/// Keys minted before `since` that are still alive at the fake.
fn leftovers(fake: &FakeCloud, since: OffsetDateTime) -> Vec<String> {
    fake.live()
        .into_iter()
        .filter(|k| k.created < since)
        .map(|k| format!("{} {}", k.provider, k.id))
        .collect()
}

/// kill -9 at 50 seeded moments inside mint, renewal and revoke calls (the fake makes a key or
/// revokes it when the request arrives and answers 100 ms later, so the moments land inside
/// those calls), each followed by a restart: once the new daemon serves, no key from an
/// earlier run is alive. At the end, SIGTERM leaves no key at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_fifty_moments_leaves_nothing_behind_after_restart() {
    let fake = FakeCloud::new(Clock::System);
    fake.set_faults(Faults {
        create_latency: Duration::from_millis(100),
        revoke_latency: Duration::from_millis(100),
        ..Faults::default()
    });
    let url = fake.serve().await;
    let env = Env::new();
    let config = env.config(&short_profiles(&fake, &url, &env));
    let mut rng = SmallRng::seed_from_u64(50);
    let mut moments = std::collections::BTreeMap::<&str, usize>::new();
    for i in 0..50 {
        let creates = fake.calls("create");
        let started = OffsetDateTime::now_utc();
        let mut daemon = tokio::task::block_in_place(|| env.serve(&config, "info"));
        let left = leftovers(&fake, started);
        assert!(
            left.is_empty(),
            "run {i}: alive after recovery: {left:?}\n{}",
            daemon.logs()
        );

        let revokes = fake.calls("revoke");
        let (moment, counter, target) = match rng.gen_range(0..3) {
            0 => ("mint", "create", creates + 1),
            1 => ("renewal", "create", creates + PROVIDERS.len() as u64 + 1),
            _ => ("revoke", "revoke", revokes + 1),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while fake.calls(counter) < target {
            assert!(
                Instant::now() < deadline,
                "run {i}: no {moment} came\n{}",
                daemon.logs()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..100))).await;
        tokio::task::block_in_place(|| daemon.kill9());
        *moments.entry(moment).or_default() += 1;
    }
    assert!(
        moments.values().all(|&n| n >= 10),
        "moments spread over the three kinds: {moments:?}"
    );

    let started = OffsetDateTime::now_utc();
    let mut last: Daemon = tokio::task::block_in_place(|| env.serve(&config, "info"));
    assert!(leftovers(&fake, started).is_empty());
    let (status, _) = tokio::task::block_in_place(|| last.stop(Duration::from_secs(15)));
    // A kill during a create leaves a lease whose key may still land for two minutes: a stop
    // within them exits 1 naming it (and nothing else), for the next start to settle.
    let logs = last.logs();
    let exit = logs.lines().last().unwrap_or_default();
    assert!(
        status.success()
            || (status.code() == Some(1)
                && exit.contains("whose key may exist or still land")
                && !exit.contains("unrevoked")),
        "{logs}"
    );
    assert!(
        fake.live().is_empty(),
        "alive at the end: {:?}",
        fake.live()
    );
    assert!(fake.keys().len() > 100, "the runs minted and renewed");
}

/// Revokes fail at stop: exit 1 naming the keys, which stay in the ledger; the next start
/// revokes them before serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_left_at_stop_are_revoked_by_the_next_start() {
    let fake = FakeCloud::new(Clock::System);
    let url = fake.serve().await;
    let env = Env::new();
    let mut text = String::from("[server]\nshutdown_timeout = \"2s\"\n\n");
    for provider in PROVIDERS {
        text.push_str(&fake.profile_toml(provider, provider, &url, &env, ""));
    }
    let config = env.config(&text);
    let mut first = tokio::task::block_in_place(|| env.serve(&config, "info"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while fake.live().len() < 3 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let minted: Vec<String> = fake.live().into_iter().map(|k| k.id).collect();
    fake.set_faults(Faults {
        fail_revokes: true,
        ..Faults::default()
    });
    let (status, _) = tokio::task::block_in_place(|| first.stop(Duration::from_secs(10)));
    assert_eq!(status.code(), Some(1));
    let logs = first.logs();
    for id in &minted {
        assert!(
            logs.lines().last().unwrap().contains(id.as_str()),
            "{id} named at exit: {logs}"
        );
    }
    assert_eq!(fake.live().len(), 3);

    fake.set_faults(Faults::default());
    let started = OffsetDateTime::now_utc();
    let mut second = tokio::task::block_in_place(|| env.serve(&config, "info"));
    assert!(
        leftovers(&fake, started).is_empty(),
        "the next start revoked them: {:?}",
        fake.live()
    );
    let logs = second.logs();
    for id in &minted {
        assert!(
            logs.contains(&format!("revoked {id}")),
            "recovery names {id}: {logs}"
        );
    }
    assert!(
        tokio::task::block_in_place(|| second.stop(Duration::from_secs(10)))
            .0
            .success()
    );
    assert!(fake.live().is_empty());
}

/// `keybroker sweep` after a crash: a ledger with garbage lines and a torn last line is
/// replayed anyway, what it skipped is reported, and the crashed run's keys are revoked;
/// keys carrying the broker's tag that the ledger lost are revoked too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_finishes_a_crashed_run_through_a_damaged_ledger() {
    let fake = FakeCloud::new(Clock::System);
    let url = fake.serve().await;
    let env = Env::new();
    let mut text = String::new();
    for provider in PROVIDERS {
        text.push_str(&fake.profile_toml(provider, provider, &url, &env, ""));
    }
    let config = env.config(&text);
    let mut daemon = tokio::task::block_in_place(|| env.serve(&config, "info"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while fake.live().len() < 3 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::task::block_in_place(|| daemon.kill9());
    let crashed: Vec<String> = fake.live().into_iter().map(|k| k.id).collect();

    // Damage: drop the glesys lease's records (the key is now only findable by its tag), add
    // garbage, and cut the last line short.
    let ledger = env.state_dir().join("ledger.jsonl");
    let text = std::fs::read_to_string(&ledger).unwrap();
    let mut kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.contains("\"profile\":\"glesys\""))
        .collect();
    let glesys_lease = text
        .lines()
        .find(|l| l.contains("\"profile\":\"glesys\""))
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .and_then(|v| v["lease"].as_str().map(str::to_string))
        .unwrap();
    kept.retain(|l| !l.contains(&glesys_lease));
    let damaged = format!("{}\nthis is not json\n{{\"event\":\"minted\",\"lease\":\"nope\"}}\n{{\"event\":\"intent\",\"le", kept.join("\n"));
    std::fs::write(&ledger, damaged).unwrap();

    let (code, stdout, stderr) = env.run(&["sweep", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("skipped") && stdout.contains("cut short"),
        "{stdout}"
    );
    for id in &crashed {
        assert!(stdout.contains(&format!("revoked {id}")), "{id}: {stdout}");
    }
    assert!(
        stdout.contains("not in the ledger"),
        "the glesys key was found by its tag: {stdout}"
    );
    assert!(
        stdout.contains("sweep: 3 keys revoked, 0 left to finish"),
        "{stdout}"
    );
    assert!(fake.live().is_empty());
    // A second sweep has nothing to do.
    let (code, stdout, _) = env.run(&["sweep", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("sweep: 0 keys revoked, 0 left to finish"),
        "{stdout}"
    );
}
