//! One profile's keys: the current key (read without a lock), the retired keys awaiting
//! revocation ([`revoke`]), creates whose outcome is unknown ([`lost`]), and the driver task
//! that mints, renews and revokes them.

mod lost;
mod revoke;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::Rng;
use time::OffsetDateTime;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::policy::{retry_delay, RenewPolicy};
use super::ProfileSpec;
use crate::clock::{positive, Clock};
use crate::credentials::{self, format_expiration};
use crate::ledger::{Ledger, LedgerError, Record};
use crate::metrics::{Timed, UpstreamStats};
use crate::provider::{KeyHandle, MintedKey, Provider, ProviderError};

pub use lost::{Pending, UnsettledCreate, LANDING_GRACE, SETTLE_WAIT};
use revoke::Retired;
pub use revoke::{FailingRevoke, ServedKeys, MAX_RETIRED, REFUSED_REVOKE_RETRY};

/// A key ready to serve, with its response bodies rendered once.
#[derive(Debug)]
pub struct ReadyKey {
    /// Id and revoke handle.
    pub handle: KeyHandle,
    /// The broker's tag on the key.
    pub tag: String,
    /// The lease id, the ledger's name for the key.
    pub lease: String,
    /// When the key stops working (the `Expiration` served).
    pub expires_at: OffsetDateTime,
    /// `credential_process` JSON.
    pub process_json: Bytes,
    /// Container-credentials JSON.
    pub container_json: Bytes,
}

impl ReadyKey {
    fn new(key: MintedKey, tag: String, lease: String) -> Self {
        let process_json = credentials::process_json(
            &key.access_key_id,
            &key.secret,
            key.session_token.as_ref(),
            key.expires_at,
        );
        let container_json = credentials::container_json(
            &key.access_key_id,
            &key.secret,
            key.session_token.as_ref(),
            key.expires_at,
        );
        ReadyKey {
            handle: key.handle(),
            tag,
            lease,
            expires_at: key.expires_at,
            process_json,
            container_json,
        }
    }

    /// A key known only by its handle (adopted from an earlier run, or found by its tag):
    /// never served by this run, so it has no response bodies.
    fn untracked(handle: KeyHandle, tag: Option<String>, lease: String) -> Self {
        ReadyKey {
            handle,
            tag: tag.unwrap_or_default(),
            lease,
            expires_at: OffsetDateTime::UNIX_EPOCH,
            process_json: Bytes::new(),
            container_json: Bytes::new(),
        }
    }
}

/// Why a request got no key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable {
    /// When it is worth asking again.
    pub retry_after: Duration,
    /// What went wrong, for a human.
    pub message: String,
}

/// `Retry-After` for a profile whose keys an operator revoked: nothing changes until they
/// rotate it, so clients need not ask often.
const HELD_RETRY_AFTER: Duration = Duration::from_secs(60);

/// What `keybroker rotate` achieved.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Rotated {
    /// The new key's id.
    pub key_id: String,
    /// Its expiry (RFC 3339).
    pub expires_at: String,
    /// The key it replaced, now retired: valid until its expiry, then revoked.
    pub retired: Option<String>,
}

/// What `keybroker revoke` achieved.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RevokedKeys {
    /// Keys revoked now.
    pub revoked: Vec<String>,
    /// Keys whose revocation failed, with why; the broker keeps retrying them.
    pub failed: Vec<(String, String)>,
}

/// Counters reported in status.
#[derive(Debug, Default)]
pub struct Counters {
    /// Successful mints (first keys and renewals).
    pub mints: AtomicU64,
    /// Mints that replaced a current key.
    pub renewals: AtomicU64,
    /// Failed mint attempts.
    pub mint_failures: AtomicU64,
    /// Successful revocations.
    pub revokes: AtomicU64,
    /// Failed revoke attempts.
    pub revoke_failures: AtomicU64,
    /// Requests answered with a key while the profile was degraded.
    pub degraded_serves: AtomicU64,
    /// Requests answered 503.
    pub unavailable: AtomicU64,
}

#[derive(Debug)]
struct State {
    /// A key is wanted: prewarm, or a request has asked.
    active: bool,
    retired: Vec<Retired>,
    renew_at: Option<OffsetDateTime>,
    last_error: Option<(ProviderError, OffsetDateTime)>,
    failures_in_row: u32,
    /// The driver does not retry before this.
    next_attempt: OffsetDateTime,
    /// A request may trigger an attempt from this time on.
    request_floor: OffsetDateTime,
    in_flight: bool,
    stopping: bool,
    /// An operator revoked every key (`keybroker revoke`) at this time: no mint, and requests
    /// get 503, until `keybroker rotate`.
    held: Option<OffsetDateTime>,
    /// Rotations asked for (`keybroker rotate`), numbered from 1.
    rotations_asked: u64,
    /// The number of the last rotation whose mint has started: one is pending while
    /// `rotations_asked` is ahead of it.
    rotations_started: u64,
    /// The rotation whose mint is in flight.
    rotating: Option<u64>,
    /// The last rotation mint's number and outcome.
    rotated: Option<(u64, Result<Rotated, String>)>,
    /// Revoke passes of the driver started so far; `revoke_all` waits for one that started
    /// after it.
    revoke_passes: u64,
    /// The profile left service (a reload removed or changed it): no more mints; the driver
    /// revokes its keys at their expiry, then ends.
    closing: bool,
    /// The lease and tag of the create in flight, if one is.
    creating: Option<(String, String)>,
    /// Retired keys given up on in this run (see [`MAX_RETIRED`]).
    dropped_retired: u64,
}

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
    passes: watch::Sender<u64>,
    rng: Mutex<SmallRng>,
    /// Status counters.
    pub counters: Counters,
    /// Longest a request waits for an in-flight mint.
    mint_wait: Duration,
    /// Becomes true when the driver has returned.
    finished: watch::Sender<bool>,
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

/// What a status answer shows of a slot.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SlotStatus {
    /// `cold`, `minting`, `ready`, `renewing`, `degraded`, `unavailable`, `revoked` (by an
    /// operator, until `keybroker rotate`) or `stopped`.
    pub state: &'static str,
    /// The current key's id.
    pub key_id: Option<String>,
    /// The current key's expiry (RFC 3339).
    pub expires_at: Option<String>,
    /// Seconds until it expires.
    pub expires_in_seconds: Option<i64>,
    /// Next scheduled renewal (RFC 3339).
    pub next_renewal: Option<String>,
    /// Seconds until then.
    pub renews_in_seconds: Option<i64>,
    /// Retired keys not yet revoked.
    pub retired_keys: usize,
    /// Retired keys whose revocation failed, with the provider's words; retried.
    pub failing_revokes: Vec<FailingRevoke>,
    /// Retired keys given up on in this run because more than [`MAX_RETIRED`] could not be
    /// revoked (each had expired by itself; the ledger keeps them for the next start).
    pub retired_given_up: u64,
    /// Creates whose outcome is unknown: their key, if it exists, is looked for by tag.
    pub unsettled_creates: Vec<UnsettledCreate>,
    /// Counters.
    pub counters: CountersSnapshot,
    /// The last failure, if the last attempt failed.
    pub last_error: Option<String>,
    /// What keeps the profile from minting although it needs a key: room under the
    /// provider's key limit, or too many retired keys that could not be revoked.
    pub blocked: Option<String>,
}

impl SlotStatus {
    /// A status in `state` with no key, for tests of what renders it.
    #[cfg(test)]
    pub fn example(state: &'static str) -> Self {
        SlotStatus {
            state,
            key_id: None,
            expires_at: None,
            expires_in_seconds: None,
            next_renewal: None,
            renews_in_seconds: None,
            retired_keys: 0,
            failing_revokes: Vec::new(),
            retired_given_up: 0,
            unsettled_creates: Vec::new(),
            counters: CountersSnapshot {
                mints: 0,
                renewals: 0,
                mint_failures: 0,
                revokes: 0,
                revoke_failures: 0,
                degraded_serves: 0,
                unavailable: 0,
            },
            last_error: None,
            blocked: None,
        }
    }
}

/// A copy of [`Counters`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct CountersSnapshot {
    #[allow(missing_docs)]
    pub mints: u64,
    #[allow(missing_docs)]
    pub renewals: u64,
    #[allow(missing_docs)]
    pub mint_failures: u64,
    #[allow(missing_docs)]
    pub revokes: u64,
    #[allow(missing_docs)]
    pub revoke_failures: u64,
    #[allow(missing_docs)]
    pub degraded_serves: u64,
    #[allow(missing_docs)]
    pub unavailable: u64,
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
            state: Mutex::new(State {
                active: prewarm,
                retired,
                renew_at: None,
                last_error: None,
                failures_in_row: 0,
                next_attempt: now,
                request_floor: now,
                in_flight: false,
                stopping: false,
                held: None,
                rotations_asked: 0,
                rotations_started: 0,
                rotating: None,
                rotated: None,
                revoke_passes: 0,
                closing: false,
                creating: None,
                dropped_retired: 0,
            }),
            wake: Notify::new(),
            attempts: watch::channel(0).0,
            passes: watch::channel(0).0,
            rng: Mutex::new(rng),
            counters: Counters::default(),
            mint_wait,
            finished: watch::channel(false).0,
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

    /// The hottest path: the current key's `credential_process` body if the key has at least
    /// `min_remaining` left. No lock and no reference count taken (an arc-swap guard).
    pub fn ready_body(&self) -> Option<Bytes> {
        let key = self.current.load();
        let key = key.as_ref()?;
        (self.remaining(key) >= self.policy.min_remaining).then(|| key.process_json.clone())
    }

    /// The hot path: the current key if it has at least `min_remaining` left. No lock.
    pub fn ready(&self) -> Option<Arc<ReadyKey>> {
        let key = self.current.load_full()?;
        (self.remaining(&key) >= self.policy.min_remaining).then_some(key)
    }

    /// A key for a request: the ready key, else the outcome of a (shared) mint, else a
    /// still-valid key served degraded, else [`Unavailable`].
    pub async fn get(&self) -> Result<Arc<ReadyKey>, Unavailable> {
        if let Some(key) = self.ready() {
            return Ok(key);
        }
        let mut attempts = {
            let mut st = self.lock();
            let now = self.clock.now();
            if st.stopping || st.closing {
                return Err(Unavailable {
                    retry_after: Duration::from_secs(1),
                    message: format!(
                        "profile {} has no valid key: keybroker is stopping",
                        self.name
                    ),
                });
            }
            if let Some(at) = st.held {
                self.counters.unavailable.fetch_add(1, Ordering::Relaxed);
                return Err(Unavailable {
                    retry_after: HELD_RETRY_AFTER,
                    message: format!(
                        "profile {} has no key: an operator revoked its keys at {}; `keybroker rotate {}` mints a new one",
                        self.name,
                        format_expiration(at),
                        self.name
                    ),
                });
            }
            if !st.in_flight && (now < st.request_floor || self.blocked(&st, now).is_some()) {
                // A mint failed moments ago (asking again now would only hammer the
                // provider), or no mint may happen now.
                drop(st);
                return self.fallback();
            }
            st.active = true;
            self.attempts.subscribe()
        };
        self.wake.notify_one();
        let waited = tokio::time::timeout(self.mint_wait, async {
            // Wait for an attempt that finishes after this request arrived.
            loop {
                if attempts.changed().await.is_err() {
                    return;
                }
                if self.ready().is_some() || !self.lock().in_flight {
                    return;
                }
            }
        })
        .await;
        if let Some(key) = self.ready() {
            return Ok(key);
        }
        if waited.is_err() {
            tracing::debug!(profile = %self.name, "request gave up waiting for a mint");
        }
        self.fallback()
    }

    /// No fresh key: serve the current one degraded while it has more than the floor left.
    fn fallback(&self) -> Result<Arc<ReadyKey>, Unavailable> {
        if let Some(key) = self.current.load_full() {
            let left = self.remaining(&key);
            if left > self.policy.degraded_floor() {
                self.counters
                    .degraded_serves
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    profile = %self.name,
                    key_id = %key.handle.access_key_id,
                    remaining_seconds = left.as_secs(),
                    "serving a key with less than min_remaining left: renewal is failing"
                );
                return Ok(key);
            }
        }
        self.counters.unavailable.fetch_add(1, Ordering::Relaxed);
        let st = self.lock();
        let now = self.clock.now();
        // Waiting for room under the key limit: ask again when it opens.
        let floor = self
            .budget_wait(&st, now)
            .unwrap_or(st.request_floor)
            .max(st.request_floor);
        let retry_after = positive(floor - now).max(Duration::from_secs(1));
        let message = match (&st.last_error, self.blocked(&st, now)) {
            (_, Some(why)) => format!("profile {} has no valid key: {why}", self.name),
            (Some((e, _)), None) => format!(
                "profile {} has no valid key: the {} API failed: {e}",
                self.name,
                self.provider.kind()
            ),
            (None, None) => format!(
                "profile {} has no valid key yet: a mint is in progress",
                self.name
            ),
        };
        Err(Unavailable {
            retry_after: Duration::from_secs(retry_after.as_secs_f64().ceil() as u64),
            message,
        })
    }

    /// Returns once the slot has a key, or its first attempt has failed, or it is not prewarmed.
    pub async fn settled(&self) {
        let mut attempts = self.attempts.subscribe();
        loop {
            {
                let st = self.lock();
                if !st.active
                    || st.stopping
                    || self.current.load().is_some()
                    || st.last_error.is_some()
                {
                    return;
                }
            }
            if attempts.changed().await.is_err() {
                return;
            }
        }
    }

    /// The driver: mints when a key is wanted or due for renewal, revokes retired keys at
    /// their expiry, until `cancel` fires. A mint already started is finished, not abandoned.
    pub async fn drive(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            if cancel.is_cancelled() {
                break;
            }
            let now = self.clock.now();
            self.revoke_due(now, &cancel).await;
            if self.next_look().is_some_and(|at| at <= now) {
                let looked = tokio::select! {
                    looked = self.look_for_lost() => looked,
                    _ = cancel.cancelled() => break,
                };
                if let Err(e) = looked {
                    tracing::warn!(profile = %self.name, error = %e, "looking for lost creates failed; looking again later");
                }
                continue;
            }
            if self.is_drained() {
                tracing::info!(profile = %self.name, "every key of the removed profile is revoked");
                break;
            }
            let (mint_now, wake_at) = self.plan(now);
            if mint_now {
                self.mint_once().await;
                continue;
            }
            let sleep = async {
                match wake_at {
                    Some(at) => tokio::time::sleep_until(self.clock.instant_at(at)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = sleep => {}
            }
        }
        self.lock().stopping = true;
        // Wake requests waiting on a mint that will not come.
        self.attempts.send_modify(|n| *n += 1);
        self.finished.send_replace(true);
    }

    /// Whether the slot left service and has nothing left to revoke or look for.
    fn is_drained(&self) -> bool {
        let st = self.lock();
        st.closing && st.retired.is_empty() && !st.in_flight && !self.has_lost()
    }

    /// Takes the profile out of service (a reload removed or changed it): no more mints;
    /// its keys are retired, kept until the Expiration they were served with and revoked
    /// then by the driver, which ends once nothing is left.
    pub fn close(&self) {
        let mut st = self.lock();
        st.closing = true;
        st.active = false;
        st.renew_at = None;
        if let Some(key) = self.current.swap(None) {
            st.retired.push(Retired::served(key));
        }
        drop(st);
        self.wake.notify_one();
        // Requests waiting on a mint that will not come.
        self.attempts.send_modify(|n| *n += 1);
    }

    /// Returns once the driver has stopped (after its cancellation, and any mint in flight).
    pub async fn finished(&self) {
        let mut done = self.finished.subscribe();
        let _ = done.wait_for(|d| *d).await;
    }

    /// Whether the driver has returned.
    pub fn is_finished(&self) -> bool {
        *self.finished.borrow()
    }

    /// Why no mint may happen now although one may be due: too many retired keys that could
    /// not be revoked, or no room under the provider's key limit before a retired key's
    /// Expiration.
    fn blocked(&self, st: &State, now: OffsetDateTime) -> Option<String> {
        if let Some(why) = self.retired_overflow(st) {
            return Some(why);
        }
        self.budget_wait(st, now)
            .map(|until| self.budget_message(st, until))
    }

    /// Decides whether to mint now, and otherwise when to look again.
    fn plan(&self, now: OffsetDateTime) -> (bool, Option<OffsetDateTime>) {
        let mut st = self.lock();
        let current = self.current.load();
        // A current key past its expiry is retired so that it gets revoked (GleSYS: this
        // revocation is the expiry).
        if let Some(key) = current.as_ref().filter(|k| k.expires_at <= now) {
            st.retired.push(Retired::served(Arc::clone(key)));
            self.current.store(None);
            st.renew_at = None;
        }
        self.bound_retired(&mut st);
        let next_revoke = st.retired.iter().map(|r| r.revoke_at).min();
        let rotate = st.rotations_asked > st.rotations_started;
        let due = match (&*self.current.load(), st.renew_at) {
            _ if st.held.is_some() || st.closing || st.stopping => false,
            _ if rotate => true,
            (None, _) => st.active,
            (Some(_), Some(renew_at)) => now >= renew_at,
            (Some(_), None) => true,
        };
        let wanted_now = st.active && self.ready().is_none();
        let allowed = rotate || now >= st.next_attempt || (wanted_now && now >= st.request_floor);
        // Room under the key limit opens when a retired key's Expiration passes: its revoke
        // is due then, and the next plan sees the room.
        let blocked = due && allowed && self.blocked(&st, now).is_some();
        if blocked && wanted_now {
            // Requests waiting for this mint fall back (degraded or 503) at once.
            self.attempts.send_modify(|n| *n += 1);
        }
        if due && allowed && !blocked {
            st.in_flight = true;
            if rotate {
                st.rotations_started = st.rotations_asked;
                st.rotating = Some(st.rotations_started);
            }
            return (true, None);
        }
        let next_mint = if blocked {
            None
        } else if due {
            Some(st.next_attempt)
        } else {
            st.renew_at
        };
        let wake_at = [
            next_mint,
            next_revoke,
            self.next_look(),
            self.current.load().as_ref().map(|k| k.expires_at),
        ]
        .into_iter()
        .flatten()
        .min();
        (false, wake_at)
    }

    /// A fresh lease id and the tag that carries it.
    fn new_lease(&self) -> (String, String) {
        let n: u64 = self.rng.lock().expect("slot rng lock poisoned").gen();
        let lease = format!("{n:016x}");
        (format!("{}{lease}", self.tag_prefix), lease)
    }

    /// Appends to the ledger, if there is one.
    fn journal(&self, record: Record) -> Result<(), LedgerError> {
        match &self.ledger {
            Some(ledger) => ledger.append(&record),
            None => Ok(()),
        }
    }

    /// Records that a key is gone. A failed write only means the next start revokes an
    /// already revoked key, which providers accept.
    pub(super) fn journal_revoked(&self, lease: &str) {
        if lease.is_empty() {
            return;
        }
        let at = format_expiration(self.clock.now());
        if let Err(e) = self.journal(Record::Revoked {
            lease: lease.to_string(),
            at,
        }) {
            tracing::error!(profile = %self.name, lease, error = %e, "could not record a revocation in the ledger");
        }
    }

    /// Mints, keeping within the provider's key limit: the oldest retired key is revoked first
    /// when a new key would exceed it, and a create refused at the limit is retried once after
    /// evicting the broker's own oldest key. Keys the broker did not tag are never touched.
    async fn mint_within_limit(&self, tag: &str) -> Result<MintedKey, ProviderError> {
        if let Some(limit) = self.provider.key_limit() {
            self.make_room(limit).await?;
        }
        match self.provider.mint(tag, self.policy.lifetime).await {
            Err(ProviderError::LimitReached(message)) => {
                self.evict_own_oldest(&message).await?;
                self.provider.mint(tag, self.policy.lifetime).await
            }
            other => other,
        }
    }

    /// One create, journaled: settle lost creates first, record the intent, create, record
    /// the outcome (minted; closed when the provider refused; unsettled when the answer was
    /// lost).
    async fn mint_journaled(&self, tag: &str, lease: &str) -> Result<MintedKey, ProviderError> {
        self.settle_before_create().await?;
        self.journal(Record::Intent {
            lease: lease.to_string(),
            profile: self.name.to_string(),
            provider: self.provider.kind(),
            tag: tag.to_string(),
            at: format_expiration(self.clock.now()),
        })
        .map_err(|e| ProviderError::Transient(format!("not minting: {e}")))?;
        self.lock().creating = Some((lease.to_string(), tag.to_string()));
        let result = self.mint_within_limit(tag).await;
        match &result {
            Ok(key) => {
                // Protected from eviction by any profile from now on, before the fsync below.
                self.served.insert(&key.access_key_id, key.expires_at);
                let minted = Record::Minted {
                    lease: lease.to_string(),
                    key_id: key.access_key_id.clone(),
                    handle: key.revoke_handle.clone(),
                    expires_at: format_expiration(key.expires_at),
                };
                if let Err(e) = self.journal(minted) {
                    // The intent is on disk: a restart still finds the key by its tag.
                    tracing::error!(profile = %self.name, key_id = %key.access_key_id, error = %e, "could not record a minted key in the ledger");
                }
            }
            // No answer, or one we could not read: the key may exist, or land later.
            Err(ProviderError::Lost(_)) => self.add_lost(lease, tag, true),
            // Answered, but with a server error or an unreadable success: the key may exist,
            // and one listing tells.
            Err(ProviderError::MayExist(_) | ProviderError::Malformed(_)) => {
                self.add_lost(lease, tag, false)
            }
            // The provider answered no: nothing was made.
            Err(_) => self.journal_revoked(lease),
        }
        result
    }

    async fn mint_once(&self) {
        let (tag, lease) = self.new_lease();
        let kind = self.provider.kind();
        tracing::debug!(profile = %self.name, provider = %kind, %tag, "minting a key");
        let result = self.mint_journaled(&tag, &lease).await;
        let now = self.clock.now();
        let result = result.and_then(|key| {
            {
                let left = positive(key.expires_at - now);
                if left < self.policy.min_remaining {
                    Err((key, left))
                } else {
                    Ok(key)
                }
            }
            .map_err(|(key, left)| {
                let e = ProviderError::Malformed(format!(
                    "{kind} issued key {} with only {}s left, under min_remaining ({}s)",
                    key.access_key_id,
                    left.as_secs(),
                    self.policy.min_remaining.as_secs()
                ));
                // Not servable: keep it only to revoke it.
                let key = Arc::new(ReadyKey::new(key, tag.clone(), lease.clone()));
                self.lock().retired.push(Retired::unserved(key, now));
                e
            })
        });
        let jitter = self.jitter();
        let mut st = self.lock();
        st.in_flight = false;
        // The key, if any, is stored below under this lock: stop sees it in the slot.
        st.creating = None;
        match result {
            Ok(key) if st.held.is_some() || st.closing || st.stopping => {
                // An operator revoked the profile's keys, or a reload took the profile out of
                // service, while this mint was in flight: the new key is not served, only
                // revoked.
                tracing::info!(profile = %self.name, key_id = %key.access_key_id, "minted while the profile's keys were being revoked; revoking it too");
                if let Some(n) = st.rotating.take() {
                    st.rotated = Some((
                        n,
                        Err(format!(
                            "profile {}: an operator revoked its keys while the rotation's mint was in flight",
                            self.name
                        )),
                    ));
                }
                let key = Arc::new(ReadyKey::new(key, tag, lease));
                st.retired.push(Retired::unserved(key, now));
                // The driver revokes it on its next pass, which follows this attempt.
            }
            Ok(key) => {
                let ready = Arc::new(ReadyKey::new(key, tag, lease));
                let renew_at = self.policy.renew_at(ready.expires_at, jitter);
                st.renew_at = Some(renew_at);
                st.failures_in_row = 0;
                st.last_error = None;
                st.next_attempt = now;
                st.request_floor = now;
                let old = self.current.swap(Some(Arc::clone(&ready)));
                self.counters.mints.fetch_add(1, Ordering::Relaxed);
                if let Some(n) = st.rotating.take() {
                    st.rotated = Some((
                        n,
                        Ok(Rotated {
                            key_id: ready.handle.access_key_id.clone(),
                            expires_at: format_expiration(ready.expires_at),
                            retired: old.as_ref().map(|o| o.handle.access_key_id.clone()),
                        }),
                    ));
                }
                if let Some(old) = &old {
                    self.counters.renewals.fetch_add(1, Ordering::Relaxed);
                    st.retired.push(Retired::served(Arc::clone(old)));
                    self.bound_retired(&mut st);
                }
                tracing::info!(
                    profile = %self.name,
                    provider = %kind,
                    key_id = %ready.handle.access_key_id,
                    tag = %ready.tag,
                    expires_at = %format_expiration(ready.expires_at),
                    renews_in_seconds = positive(renew_at - now).as_secs(),
                    replaces = old.as_ref().map(|o| o.handle.access_key_id.as_str()).unwrap_or(""),
                    "minted key"
                );
            }
            Err(e) => {
                st.failures_in_row += 1;
                let floor = e.retry_floor();
                let delay = retry_delay(&e, st.failures_in_row, jitter);
                st.next_attempt = now + delay;
                st.request_floor = now + floor;
                self.counters.mint_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    profile = %self.name,
                    provider = %kind,
                    error = %e,
                    kind = e.code(),
                    retry_in_seconds = delay.as_secs_f64(),
                    "mint failed"
                );
                if let Some(n) = st.rotating.take() {
                    st.rotated = Some((
                        n,
                        Err(format!(
                            "profile {}: minting the new key failed: the {kind} API failed: {e}",
                            self.name
                        )),
                    ));
                }
                st.last_error = Some((e, now));
            }
        }
        drop(st);
        self.attempts.send_modify(|n| *n += 1);
    }

    /// `keybroker rotate`: mints a new key now, whatever the renewal schedule or backoff say,
    /// and retires the current one (still valid for clients that fetched it, revoked at its
    /// expiry). Also lifts a `keybroker revoke` hold. Waits at most `wait` for the outcome of
    /// that mint (or of a later rotation's, when several are asked for at once).
    pub async fn rotate(&self, wait: Duration) -> Result<Rotated, String> {
        let mut attempts = self.attempts.subscribe();
        let want = {
            let mut st = self.lock();
            if st.stopping || st.closing {
                return Err(format!("profile {} is stopping", self.name));
            }
            // A rotation never revokes a key before the Expiration it was served with: with
            // the provider's key limit taken by such keys, it waits for one to expire.
            if let Some(why) = self.blocked(&st, self.clock.now()) {
                return Err(why);
            }
            st.held = None;
            st.active = true;
            st.rotations_asked += 1;
            st.rotations_asked
        };
        self.wake.notify_one();
        tracing::info!(profile = %self.name, "rotation requested by an operator");
        let outcome = tokio::time::timeout(wait, async {
            loop {
                {
                    let st = self.lock();
                    match &st.rotated {
                        Some((n, outcome)) if *n >= want => return outcome.clone(),
                        _ if st.stopping => {
                            return Err(format!("profile {} is stopping", self.name))
                        }
                        _ => {}
                    }
                }
                if attempts.changed().await.is_err() {
                    return Err(format!("profile {} is stopping", self.name));
                }
            }
        })
        .await;
        outcome.unwrap_or_else(|_| {
            Err(format!(
                "profile {}: the new key's mint did not finish within {}s; it goes on in the background (keybroker status shows it)",
                self.name,
                wait.as_secs()
            ))
        })
    }

    /// `keybroker revoke`: revokes every key of the profile now, current and retired, and holds
    /// it: no new key and 503 for requests until [`Slot::rotate`]. The keys stay in the slot,
    /// due now, and the driver revokes them: nothing is lost if this call is abandoned or the
    /// daemon stops meanwhile. Waits at most `wait` for the driver's pass, then reports every
    /// key of the profile still alive (a failed revoke is retried with backoff), and creates
    /// whose answer was lost that could not be settled.
    pub async fn revoke_all(&self, wait: Duration) -> RevokedKeys {
        let deadline = tokio::time::Instant::now() + wait;
        let mut passes = self.passes.subscribe();
        let (targets, want) = {
            let mut st = self.lock();
            let now = self.clock.now();
            st.held = Some(now);
            st.active = false;
            st.rotations_started = st.rotations_asked;
            st.renew_at = None;
            if let Some(key) = self.current.swap(None) {
                st.retired.push(Retired::served(key));
            }
            // An operator's revoke is the one thing that comes before a served Expiration.
            for r in &mut st.retired {
                r.revoke_at = now;
                r.served_until = now;
            }
            let targets: Vec<String> = st
                .retired
                .iter()
                .map(|r| r.key.handle.access_key_id.clone())
                .collect();
            (targets, st.revoke_passes + 1)
        };
        tracing::warn!(profile = %self.name, keys = targets.len(), "an operator revoked every key of the profile; requests get 503 until keybroker rotate");
        self.wake.notify_one();
        let pass_done = tokio::time::timeout_at(deadline, async {
            while *passes.borrow_and_update() < want {
                if passes.changed().await.is_err() {
                    return;
                }
            }
        })
        .await
        .is_ok();
        if self.has_lost() {
            let _ = tokio::time::timeout_at(deadline, self.look_for_lost()).await;
        }
        let mut outcome = RevokedKeys::default();
        for r in &self.lock().retired {
            let why = match &r.last_error {
                Some(e) => format!("{e}; retrying"),
                None if pass_done => "not revoked yet; under way".to_string(),
                None => format!("not revoked within {}s; under way", wait.as_secs()),
            };
            outcome
                .failed
                .push((r.key.handle.access_key_id.clone(), why));
        }
        for id in targets {
            if !outcome.failed.iter().any(|(f, _)| *f == id) {
                outcome.revoked.push(id);
            }
        }
        for p in self.unsettled() {
            outcome.failed.push((
                format!("the key tagged {}", p.tag),
                "a create whose answer was lost; not found in the provider's listing yet, looked for again in the background, at stop and at the next start".into(),
            ));
        }
        outcome
    }

    /// Takes every key out of the slot (current and retired), for revocation at stop.
    /// Each with whether a client may still hold it (it was served and its Expiration has
    /// not passed): keys nobody holds are revoked even where `revoke_on_shutdown = false`.
    pub fn take_all(&self) -> Vec<(Arc<ReadyKey>, bool)> {
        let mut st = self.lock();
        st.stopping = true;
        let now = self.clock.now();
        let mut keys: Vec<(Arc<ReadyKey>, bool)> = st
            .retired
            .drain(..)
            .map(|r| (r.key, r.served_until > now))
            .collect();
        keys.extend(self.current.swap(None).map(|k| (k, true)));
        keys
    }

    /// The tag of the create in flight, if one is.
    pub fn creating(&self) -> Option<String> {
        self.lock().creating.as_ref().map(|(_, tag)| tag.clone())
    }

    /// The slot as status shows it.
    pub fn status(&self) -> SlotStatus {
        let st = self.lock();
        let now = self.clock.now();
        let current = self.current.load_full();
        let servable = current
            .as_ref()
            .is_some_and(|k| self.remaining(k) >= self.policy.min_remaining);
        // Only a mint that is wanted now can be held up.
        let wanted = !servable
            || st.renew_at.is_some_and(|r| r <= now)
            || st.rotations_asked > st.rotations_started;
        let blocked = self
            .blocked(&st, now)
            .filter(|_| wanted && st.held.is_none());
        let state = if st.stopping || st.closing {
            "stopped"
        } else if st.held.is_some() {
            "revoked"
        } else if st.last_error.is_some() || (blocked.is_some() && !servable) {
            match &current {
                Some(k) if self.remaining(k) > self.policy.degraded_floor() => "degraded",
                _ => "unavailable",
            }
        } else if servable {
            if st.in_flight {
                "renewing"
            } else {
                "ready"
            }
        } else if st.in_flight {
            "minting"
        } else {
            "cold"
        };
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SlotStatus {
            state,
            key_id: current.as_ref().map(|k| k.handle.access_key_id.clone()),
            expires_at: current.as_ref().map(|k| format_expiration(k.expires_at)),
            expires_in_seconds: current
                .as_ref()
                .map(|k| (k.expires_at - now).whole_seconds()),
            next_renewal: st
                .renew_at
                .filter(|_| current.is_some())
                .map(format_expiration),
            renews_in_seconds: st
                .renew_at
                .filter(|_| current.is_some())
                .map(|r| (r - now).whole_seconds().max(0)),
            retired_keys: st.retired.len(),
            failing_revokes: self.failing_revokes(&st),
            retired_given_up: st.dropped_retired,
            unsettled_creates: self.unsettled(),
            counters: CountersSnapshot {
                mints: get(&c.mints),
                renewals: get(&c.renewals),
                mint_failures: get(&c.mint_failures),
                revokes: get(&c.revokes),
                revoke_failures: get(&c.revoke_failures),
                degraded_serves: get(&c.degraded_serves),
                unavailable: get(&c.unavailable),
            },
            last_error: st.last_error.as_ref().map(|(e, _)| e.to_string()),
            blocked,
        }
    }
}
