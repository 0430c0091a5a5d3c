//! The broker: one [`Slot`] per profile, each driven by a background task that mints, renews
//! and revokes; requests read the current key without a lock (DESIGN.md §1, §5).

mod policy;
mod slot;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use policy::{backoff, retry_delay, RenewPolicy, BACKOFF_CAP, DEGRADED_FLOOR, RENEW_JITTER};
pub use slot::{Adopted, ReadyKey, Slot, SlotContext, SlotStatus, Unavailable};

use crate::clock::Clock;
use crate::provider::{Provider, ProviderKind};

/// How a profile is run by the broker.
pub struct ProfileSpec {
    /// Profile name.
    pub name: String,
    /// Who mints its keys.
    pub provider: Arc<dyn Provider>,
    /// Timing.
    pub policy: RenewPolicy,
    /// Mint at start.
    pub prewarm: bool,
    /// Revoke at stop (false leaves keys to expire by themselves).
    pub revoke_on_shutdown: bool,
    /// Keys of an earlier run to track as retired and revoke at their expiry.
    pub adopted: Vec<Adopted>,
    /// Creates of an earlier run not found by tag yet, as (lease, tag): looked for once more.
    pub unsettled: Vec<(String, String)>,
}

/// How the broker runs its slots.
#[derive(Clone, Debug)]
pub struct BrokerOptions {
    /// Where time comes from.
    pub clock: Clock,
    /// Seed for jitter and lease ids (tests); `None` in production.
    pub seed: Option<u64>,
    /// Longest a request waits for a mint it triggered.
    pub mint_wait: Duration,
    /// The ledger every create and revoke is journaled in, if any.
    pub ledger: Option<Arc<crate::ledger::Ledger>>,
    /// `keybroker-<host>-<instance>-`: the prefix of every tag this broker puts on a key.
    pub tag_prefix: String,
}

impl BrokerOptions {
    /// Defaults: real-time `clock` given, random seed, no ledger, a tag prefix with this host
    /// and a random instance id.
    pub fn new(clock: Clock) -> Self {
        BrokerOptions {
            clock,
            seed: None,
            mint_wait: DEFAULT_MINT_WAIT,
            ledger: None,
            tag_prefix: tag_prefix(&format!("{:08x}", rand::random::<u32>())),
        }
    }
}

/// `keybroker-<host>-<instance>-`, where host is this machine's name (lowercase letters,
/// digits and '-', at most 20) and instance names one state directory. With a 16-hex lease id
/// the tag stays within CoreWeave's 63-character attribute values.
pub fn tag_prefix(instance: &str) -> String {
    let node = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .to_ascii_lowercase();
    let host: String = node
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(20)
        .collect();
    let host = host.trim_matches('-');
    let host = if host.is_empty() { "host" } else { host };
    format!("{}{host}-{instance}-", crate::provider::TAG_PREFIX)
}

/// Why a request got no key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServeError {
    /// No such profile.
    UnknownProfile(String),
    /// The profile has no servable key now.
    Unavailable(Unavailable),
}

/// What stop achieved.
#[derive(Debug, Default)]
pub struct StopReport {
    /// Keys revoked.
    pub revoked: Vec<String>,
    /// Keys that could not be revoked in time, with why: they stay alive until they expire.
    pub unrevoked: Vec<(String, String)>,
    /// Keys left alive on purpose (`revoke_on_shutdown = false`).
    pub kept: Vec<String>,
}

/// The set of profile slots and their driver tasks.
pub struct Broker {
    slots: BTreeMap<String, (Arc<Slot>, bool)>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("profiles", &self.slots.keys())
            .finish()
    }
}

/// Longest a request waits for a mint it triggered (the upstream call timeout plus a margin).
pub const DEFAULT_MINT_WAIT: Duration = Duration::from_secs(11);

impl Broker {
    /// Starts a driver task per profile.
    pub fn start(profiles: Vec<ProfileSpec>, options: BrokerOptions) -> Self {
        let mut seeder = match options.seed {
            Some(s) => SmallRng::seed_from_u64(s),
            None => SmallRng::from_entropy(),
        };
        let context = SlotContext {
            clock: options.clock,
            mint_wait: options.mint_wait,
            ledger: options.ledger,
            tag_prefix: options.tag_prefix.into(),
        };
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        let mut slots = BTreeMap::new();
        for spec in profiles {
            let (name, revoke) = (spec.name.clone(), spec.revoke_on_shutdown);
            let rng = SmallRng::seed_from_u64(seeder.gen());
            let slot = Arc::new(Slot::new(spec, rng, context.clone()));
            tasks.spawn(Arc::clone(&slot).drive(cancel.child_token()));
            slots.insert(name, (slot, revoke));
        }
        tasks.close();
        Broker {
            slots,
            cancel,
            tasks,
        }
    }

    /// The slot of `profile`.
    pub fn slot(&self, profile: &str) -> Option<&Arc<Slot>> {
        self.slots.get(profile).map(|(s, _)| s)
    }

    /// Profile names.
    pub fn profiles(&self) -> impl Iterator<Item = &str> {
        self.slots.keys().map(String::as_str)
    }

    /// A key for `profile` (see [`Slot::get`]).
    pub async fn get(&self, profile: &str) -> Result<Arc<ReadyKey>, ServeError> {
        let slot = self
            .slot(profile)
            .ok_or_else(|| ServeError::UnknownProfile(profile.to_string()))?;
        slot.get().await.map_err(ServeError::Unavailable)
    }

    /// Waits until every prewarmed profile has a ready key or has failed once, or `deadline`.
    pub async fn prewarmed(&self, deadline: Instant) {
        for (slot, _) in self.slots.values() {
            let _ = tokio::time::timeout_at(deadline, slot.settled()).await;
        }
    }

    /// Status of every profile.
    pub fn status(&self) -> Vec<(String, ProviderKind, SlotStatus)> {
        self.slots
            .iter()
            .map(|(name, (slot, _))| (name.clone(), slot.provider().kind(), slot.status()))
            .collect()
    }

    /// Stops the drivers and revokes every key, current and retired, concurrently, by
    /// `deadline`. A mint in flight is waited for (until the deadline) so its key is revoked too.
    pub async fn stop(&self, deadline: Instant) -> StopReport {
        self.cancel.cancel();
        let mut report = StopReport::default();
        // Revoke what exists now while in-flight mints finish, then whatever those minted.
        let first = self.revoke_all(deadline, &mut report);
        let drivers = tokio::time::timeout_at(deadline, self.tasks.wait());
        let (revoked, drivers) = tokio::join!(first, drivers);
        merge(&mut report, revoked);
        if drivers.is_err() {
            tracing::error!("a mint was still in flight at the shutdown deadline; its key, if created, was not revoked");
        }
        let second = self.revoke_all(deadline, &mut report).await;
        merge(&mut report, second);
        // Creates whose answer was lost: settle them if time allows; otherwise the ledger
        // keeps their intent and the next start finds them by tag.
        for (slot, _) in self.slots.values() {
            let _ = tokio::time::timeout_at(deadline, slot.settle_pending()).await;
        }
        report
    }

    fn revoke_all(
        &self,
        deadline: Instant,
        report: &mut StopReport,
    ) -> impl std::future::Future<Output = StopReport> {
        let mut jobs = Vec::new();
        for (slot, revoke) in self.slots.values() {
            for key in slot.take_all() {
                if *revoke {
                    jobs.push(revoke_by(Arc::clone(slot), key, deadline));
                } else {
                    tracing::info!(profile = slot.name(), key_id = %key.handle.access_key_id, "left alive at stop (revoke_on_shutdown = false)");
                    report.kept.push(key.handle.access_key_id.clone());
                }
            }
        }
        async move {
            let mut out = StopReport::default();
            for (id, result) in futures_join_all(jobs).await {
                match result {
                    Ok(()) => out.revoked.push(id),
                    Err(why) => out.unrevoked.push((id, why)),
                }
            }
            out
        }
    }
}

fn merge(into: &mut StopReport, from: StopReport) {
    into.revoked.extend(from.revoked);
    into.unrevoked.extend(from.unrevoked);
    into.kept.extend(from.kept);
}

async fn futures_join_all<F: std::future::Future + Send + 'static>(
    futures: Vec<F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

/// Revokes one key, retrying what a retry can fix, until `deadline`.
async fn revoke_by(
    slot: Arc<Slot>,
    key: Arc<ReadyKey>,
    deadline: Instant,
) -> (String, Result<(), String>) {
    let handle = &key.handle;
    let id = handle.access_key_id.clone();
    let mut failures = 0;
    let outcome = loop {
        let err = match tokio::time::timeout_at(deadline, slot.provider().revoke(handle)).await {
            Ok(Ok(())) => break Ok(()),
            Ok(Err(e)) => e,
            Err(_) => break Err("no answer before the shutdown deadline".to_string()),
        };
        failures += 1;
        let retryable = matches!(
            err,
            crate::provider::ProviderError::Transient(_)
                | crate::provider::ProviderError::RateLimited { .. }
        );
        let wait = backoff(failures, 0.5, Duration::from_millis(200)).min(Duration::from_secs(2));
        if !retryable || Instant::now() + wait >= deadline {
            break Err(err.to_string());
        }
        tokio::time::sleep(wait).await;
    };
    match &outcome {
        Ok(()) => {
            slot.counters
                .revokes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            slot.journal_revoked(&key.lease);
            tracing::info!(profile = slot.name(), key_id = %id, "revoked key at stop");
        }
        Err(why) => {
            slot.counters
                .revoke_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(profile = slot.name(), key_id = %id, error = %why, "could not revoke key at stop; it stays valid until it expires");
        }
    }
    (id, outcome)
}
