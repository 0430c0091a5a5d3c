//! One profile's keys: the current key, read without a lock ([`serve`]); the driver task that
//! plans, mints and renews ([`driver`], [`mint`]); the provider's key budget ([`budget`]);
//! retired keys awaiting revocation ([`revoke`]); creates whose outcome is unknown ([`lost`]);
//! what operators, reloads and stop do to a slot ([`operator`]); and what status shows of it
//! ([`status`]). Where the profile is in its lifecycle is one [`state::Phase`].

mod budget;
mod driver;
mod lost;
mod mint;
mod operator;
mod revoke;
mod serve;
mod state;
mod status;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use rand::rngs::SmallRng;
use rand::Rng;
use time::OffsetDateTime;
use tokio::sync::{watch, Notify};

use super::policy::RenewPolicy;
use super::ProfileSpec;
use crate::clock::Clock;
use crate::ledger::Ledger;
use crate::metrics::{Timed, UpstreamStats};
use crate::provider::{KeyHandle, Provider};

pub use budget::ServedKeys;
pub use lost::{Pending, LANDING_GRACE, SETTLE_WAIT};
pub use operator::RevokedKeys;
use revoke::Retired;
pub use revoke::{MAX_RETIRED, REFUSED_REVOKE_RETRY};
pub use serve::{ReadyKey, Unavailable};
use state::State;
pub use status::Counters;

/// A profile's key slot.
pub struct Slot {
    name: Arc<str>,
    provider: Arc<dyn Provider>,
    policy: RenewPolicy,
    clock: Clock,
    current: ArcSwapOption<ReadyKey>,
    state: Mutex<State>,
    wake: Notify,
    /// Bumped after every finished attempt; requests waiting on a mint watch it.
    attempts: watch::Sender<u64>,
    /// The number of the last finished revoke pass of the driver.
    passes: Mark,
    rng: Mutex<SmallRng>,
    /// Status counters.
    pub counters: Counters,
    /// Longest a request waits for an in-flight mint.
    mint_wait: Duration,
    /// Becomes true when the driver has returned.
    finished: Mark,
    /// Where every create and revoke is journaled, if anywhere.
    ledger: Option<Arc<Ledger>>,
    /// `keybroker-<host>-<instance>-`: every key's tag starts with it.
    tag_prefix: Arc<str>,
    /// Creates whose outcome is unknown: the key may exist; its tag will tell.
    lost: Mutex<lost::Lost>,
    /// Keys any slot of the broker has served, still within their Expiration.
    served: Arc<ServedKeys>,
    /// One jitter for every draw instead of random ones (tests).
    fixed_jitter: Option<f64>,
    /// Timings of every provider call made for this profile.
    upstream: Arc<UpstreamStats>,
}

/// What a slot shares with its broker.
#[derive(Clone, Debug)]
pub struct SlotContext {
    /// Where time comes from.
    pub clock: Clock,
    /// Longest a request waits for an in-flight mint.
    pub mint_wait: Duration,
    /// The ledger, if keys are journaled.
    pub ledger: Option<Arc<Ledger>>,
    /// The prefix of every tag.
    pub tag_prefix: Arc<str>,
    /// Keys the broker's slots have served, still within their Expiration.
    pub served: Arc<ServedKeys>,
    /// One jitter for every draw instead of random ones (tests).
    pub fixed_jitter: Option<f64>,
}

/// A key from an earlier run that is tracked until its expiry, then revoked.
#[derive(Debug, Clone)]
pub struct Adopted {
    /// Id and revoke handle.
    pub handle: KeyHandle,
    /// Its lease.
    pub lease: String,
    /// When to revoke it.
    pub expires_at: OffsetDateTime,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A number that only grows, and a way to wait for it: what a `watch` channel gives, in a
/// tenth of its size (a slot holds two; a daemon may hold 10,000 slots).
#[derive(Default)]
struct Mark {
    value: std::sync::atomic::AtomicU64,
    changed: Notify,
}

impl Mark {
    fn get(&self) -> u64 {
        self.value.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn set(&self, value: u64) {
        self.value.store(value, std::sync::atomic::Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// Returns once `ok` holds for the value.
    async fn wait_until(&self, ok: impl Fn(u64) -> bool) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the value is read: a `set` in between still wakes it.
            changed.as_mut().enable();
            if ok(self.get()) {
                return;
            }
            changed.await;
        }
    }
}

impl Slot {
    /// A slot for profile `name`. `prewarm` makes the driver mint at once.
    pub fn new(spec: ProfileSpec, rng: SmallRng, context: SlotContext) -> Self {
        let ProfileSpec {
            name,
            provider,
            policy,
            prewarm,
            adopted,
            unsettled,
            ..
        } = spec;
        let SlotContext {
            clock,
            mint_wait,
            ledger,
            tag_prefix,
            served,
            fixed_jitter,
        } = context;
        let now = clock.now();
        let upstream = Arc::new(UpstreamStats::default());
        let provider: Arc<dyn Provider> = Arc::new(Timed::new(provider, Arc::clone(&upstream)));
        // An earlier run served these; they are kept until their Expiration.
        let retired = adopted
            .into_iter()
            .map(|a| {
                served.insert(&a.handle.access_key_id, a.expires_at);
                let tag = Some(format!("{tag_prefix}{}", a.lease));
                let mut key = ReadyKey::untracked(a.handle, tag, a.lease);
                key.expires_at = a.expires_at;
                Retired::served(Arc::new(key))
            })
            .collect();
        Slot {
            name: name.into(),
            provider,
            policy,
            clock,
            current: ArcSwapOption::empty(),
            state: Mutex::new(State::new(prewarm, retired, now)),
            wake: Notify::new(),
            attempts: watch::channel(0).0,
            passes: Mark::default(),
            rng: Mutex::new(rng),
            counters: Counters::default(),
            mint_wait,
            finished: Mark::default(),
            ledger,
            tag_prefix,
            lost: Mutex::new(lost::Lost::inherited(unsettled, now)),
            served,
            fixed_jitter,
            upstream,
        }
    }

    /// Timings of the provider calls made for this profile.
    pub fn upstream(&self) -> &UpstreamStats {
        &self.upstream
    }

    /// The profile name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The provider behind the slot.
    pub fn provider(&self) -> &Arc<dyn Provider> {
        &self.provider
    }

    /// The slot's policy.
    pub fn policy(&self) -> RenewPolicy {
        self.policy
    }

    /// The tag of the create in flight, if one is.
    pub fn creating(&self) -> Option<String> {
        self.lock().creating.as_ref().map(|(_, tag)| tag.clone())
    }

    /// Returns once the driver has stopped (after its cancellation, and any mint in flight).
    pub async fn finished(&self) {
        self.finished.wait_until(|done| done > 0).await;
    }

    /// Whether the driver has returned.
    pub fn is_finished(&self) -> bool {
        self.finished.get() > 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("slot state lock poisoned")
    }

    fn jitter(&self) -> f64 {
        if let Some(j) = self.fixed_jitter {
            return j;
        }
        self.rng
            .lock()
            .expect("slot rng lock poisoned")
            .gen::<f64>()
    }

    fn remaining(&self, key: &ReadyKey) -> Duration {
        self.clock.until(key.expires_at)
    }
}
