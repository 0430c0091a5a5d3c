//! The broker: one [`Slot`] per profile, each driven by a background task that mints, renews
//! and revokes; requests read the current key without a lock (ARCHITECTURE.md, "A request,
//! from connect to answer" and "One key's lifecycle"). Every key is revoked through one path,
//! [`Revoker`], which start-up recovery and `keybroker sweep` use too.

mod listing;
mod policy;
mod revoker;
mod slot;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use listing::{find_tagged, lease_of};
pub use policy::{backoff, retry_delay, RenewPolicy, BACKOFF_CAP, DEGRADED_FLOOR, RENEW_JITTER};
pub use revoker::{RevokeError, Revoker};
pub use slot::{
    Adopted, Counters, Pending, ReadyKey, RevokedKeys, ServedKeys, Slot, SlotContext, Unavailable,
    LANDING_GRACE, MAX_RETIRED, REFUSED_REVOKE_RETRY, SETTLE_WAIT,
};

use crate::api::{NotReady, SlotStatus, State};
use crate::clock::Clock;
use crate::credentials::format_expiration;
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
    /// Creates of an earlier run not found by tag yet: looked for until they are found or
    /// can no longer land.
    pub unsettled: Vec<Pending>,
}

/// How the broker runs its slots.
#[derive(Clone, Debug)]
pub struct BrokerOptions {
    /// Where time comes from.
    pub clock: Clock,
    /// Seed for jitter and lease ids (tests); `None` in production.
    pub seed: Option<u64>,
    /// One jitter for every draw instead of random ones (tests: 1.0 renews as early as
    /// jitter allows); `None` in production.
    pub fixed_jitter: Option<f64>,
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
            fixed_jitter: None,
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
    /// Tags of creates whose key may exist or still land: their leases stay open in the
    /// ledger, and the next start or `keybroker sweep` settles them.
    pub unsettled: Vec<String>,
}

impl StopReport {
    /// Whether stop left nothing behind that the next start must finish.
    pub fn is_clean(&self) -> bool {
        self.unrevoked.is_empty() && self.unsettled.is_empty()
    }
}

/// A running profile.
#[derive(Clone)]
struct Entry {
    slot: Arc<Slot>,
    revoke_on_shutdown: bool,
    /// Minted at start: readiness waits for its key.
    prewarm: bool,
}

/// The set of profile slots and their driver tasks. Profiles can be added and removed while
/// requests are served (reload): the map is swapped whole, so reads take no lock.
pub struct Broker {
    slots: ArcSwap<BTreeMap<String, Entry>>,
    /// Serializes changes to `slots`.
    changes: std::sync::Mutex<()>,
    cancel: CancellationToken,
    tasks: TaskTracker,
    context: SlotContext,
    seeder: std::sync::Mutex<SmallRng>,
    /// Profiles a reload took out of service whose keys are not all revoked yet: their
    /// drivers revoke them at their Expiration; stop revokes what is left.
    draining: std::sync::Mutex<Vec<Entry>>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("profiles", &self.profiles())
            .finish()
    }
}

/// Longest a request waits for a mint it triggered (the upstream call timeout plus a margin).
pub const DEFAULT_MINT_WAIT: Duration = Duration::from_secs(11);

impl Broker {
    /// Starts a driver task per profile.
    pub fn start(profiles: Vec<ProfileSpec>, options: BrokerOptions) -> Self {
        let seeder = match options.seed {
            Some(s) => SmallRng::seed_from_u64(s),
            None => SmallRng::from_entropy(),
        };
        let broker = Broker {
            slots: ArcSwap::from_pointee(BTreeMap::new()),
            changes: std::sync::Mutex::new(()),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            context: SlotContext {
                clock: options.clock,
                mint_wait: options.mint_wait,
                ledger: options.ledger,
                tag_prefix: options.tag_prefix.into(),
                served: Arc::default(),
                fixed_jitter: options.fixed_jitter,
            },
            seeder: std::sync::Mutex::new(seeder),
            draining: Default::default(),
        };
        broker.add(profiles);
        broker.tasks.close();
        broker
    }

    /// Starts profiles: [`Broker::insert`], then [`Broker::drive`].
    pub fn add(&self, specs: Vec<ProfileSpec>) {
        let slots = self.insert(specs);
        self.drive(slots);
    }

    /// Puts profiles in service, all at once (one copy of the profile map however many there
    /// are: 10,000 at start-up one by one took seconds). They mint nothing until
    /// [`Broker::drive`] starts their drivers. A profile of the same name must have been
    /// removed first.
    pub fn insert(&self, specs: Vec<ProfileSpec>) -> Vec<Arc<Slot>> {
        let _change = self.changes.lock().expect("broker change lock");
        let mut map = BTreeMap::clone(&self.slots.load());
        let mut slots = Vec::with_capacity(specs.len());
        for spec in specs {
            let rng = SmallRng::seed_from_u64(self.seeder.lock().expect("seeder lock").gen());
            let name = spec.name.clone();
            let revoke_on_shutdown = spec.revoke_on_shutdown;
            let prewarm = spec.prewarm;
            let slot = Arc::new(Slot::new(spec, rng, self.context.clone()));
            slots.push(Arc::clone(&slot));
            map.insert(
                name,
                Entry {
                    slot,
                    revoke_on_shutdown,
                    prewarm,
                },
            );
        }
        self.slots.store(Arc::new(map));
        slots
    }

    /// Starts the drivers of slots [`Broker::insert`] returned: they mint, renew and revoke.
    pub fn drive(&self, slots: Vec<Arc<Slot>>) {
        for slot in slots {
            self.tasks.spawn(slot.drive(self.cancel.child_token()));
        }
    }

    /// Stops serving a profile (a reload removed or changed it): it leaves the map at once,
    /// mints no more, and its keys are revoked when the Expiration they were served with has
    /// passed (by its driver, which retries a failed revoke like any other), or at stop.
    /// Returns whether the profile was there.
    pub fn detach(&self, profile: &str) -> bool {
        let _change = self.changes.lock().expect("broker change lock");
        let mut map = BTreeMap::clone(&self.slots.load());
        let Some(entry) = map.remove(profile) else {
            return false;
        };
        self.slots.store(Arc::new(map));
        entry.slot.close();
        let mut draining = self.draining.lock().expect("draining lock");
        draining.retain(|e| !e.slot.is_finished());
        draining.push(entry);
        true
    }

    /// The `credential_process` body of `profile`'s current key when it is ready to serve:
    /// the request path's first try, which takes no lock and no reference count.
    pub fn ready_body(&self, profile: &str) -> Option<Bytes> {
        self.slots.load().get(profile)?.slot.ready_body()
    }

    /// The slot of `profile`.
    pub fn slot(&self, profile: &str) -> Option<Arc<Slot>> {
        self.slots.load().get(profile).map(|e| Arc::clone(&e.slot))
    }

    /// Open leases in the ledger, when there is one.
    pub fn ledger_backlog(&self) -> Option<usize> {
        self.context.ledger.as_ref().map(|l| l.backlog())
    }

    /// Every profile's slot, by name.
    pub fn slots(&self) -> Vec<(String, Arc<Slot>)> {
        self.slots
            .load()
            .iter()
            .map(|(name, e)| (name.clone(), Arc::clone(&e.slot)))
            .collect()
    }

    /// Profile names.
    pub fn profiles(&self) -> Vec<String> {
        self.slots.load().keys().cloned().collect()
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
        let entries = self.slots.load_full();
        for entry in entries.values() {
            let _ = tokio::time::timeout_at(deadline, entry.slot.settled()).await;
        }
    }

    /// Status of every profile.
    pub fn status(&self) -> Vec<(String, ProviderKind, SlotStatus)> {
        self.slots
            .load()
            .iter()
            .map(|(name, e)| (name.clone(), e.slot.provider().kind(), e.slot.status()))
            .collect()
    }

    /// The prewarmed profiles that would not answer a request with a key now (readiness),
    /// with why: every state but `ready`, `renewing` and `degraded` (which serves the last
    /// key). Profiles with `prewarm = false` mint on first request and are not listed. Nothing
    /// secret: no key id.
    pub fn not_ready(&self) -> Vec<NotReady> {
        self.slots
            .load()
            .iter()
            .filter(|(_, e)| e.prewarm)
            .filter_map(|(name, e)| {
                let status = e.slot.status();
                if status.state.serves() {
                    return None;
                }
                let failed = |err| format!("the {} API failed: {err}", e.slot.provider().kind());
                let reason = status.blocked.or(status.last_error.map(failed));
                Some(NotReady {
                    profile: name.clone(),
                    state: status.state,
                    reason: reason.unwrap_or_else(|| no_key_reason(name, status.state)),
                })
            })
            .collect()
    }

    /// Stops the drivers and revokes every key, current and retired, concurrently, by
    /// `deadline`. A mint in flight is waited for (until the deadline) so its key is revoked too.
    pub async fn stop(&self, deadline: Instant) -> StopReport {
        self.cancel.cancel();
        let mut entries: Vec<Entry> = self.slots.load().values().cloned().collect();
        entries.extend(self.draining.lock().expect("draining lock").iter().cloned());
        let mut report = StopReport::default();
        // Revoke what exists now while in-flight mints finish, then whatever those minted.
        let first = revoke_entries(&entries, deadline, &mut report);
        let drivers = tokio::time::timeout_at(deadline, self.tasks.wait());
        let (revoked, drivers) = tokio::join!(first, drivers);
        merge(&mut report, revoked);
        // Creates whose answer was lost: a key found by its tag is revoked with the rest.
        for entry in &entries {
            let _ = tokio::time::timeout_at(deadline, entry.slot.look_for_lost()).await;
        }
        let second = revoke_entries(&entries, deadline, &mut report).await;
        merge(&mut report, second);
        // What may still exist or land stays open in the ledger for the next start.
        for entry in &entries {
            let slot = &entry.slot;
            if drivers.is_err() {
                let lost = slot.unsettled();
                if let Some(tag) = slot
                    .creating()
                    .filter(|t| !lost.iter().any(|l| &l.tag == t))
                {
                    if slot.provider().revocable() {
                        tracing::error!(profile = slot.name(), %tag, "a create was still in flight at the shutdown deadline; its key, if it lands, is revoked by the next start or keybroker sweep");
                    } else {
                        tracing::error!(profile = slot.name(), %tag, "a create was still in flight at the shutdown deadline; its key, if it lands, expires by itself (this profile cannot revoke keys)");
                    }
                    report.unsettled.push(tag);
                }
            }
            for lost in slot.unsettled() {
                tracing::error!(profile = slot.name(), tag = %lost.tag, "a create whose answer was lost is unsettled at stop; the next start or keybroker sweep finds its key by the tag");
                report.unsettled.push(lost.tag);
            }
        }
        report
    }
}

/// Takes every key out of `entries` and revokes them concurrently by `deadline` (keys of
/// profiles with `revoke_on_shutdown = false` are only listed as kept).
fn revoke_entries(
    entries: &[Entry],
    deadline: Instant,
    report: &mut StopReport,
) -> impl std::future::Future<Output = StopReport> {
    let mut jobs = tokio::task::JoinSet::new();
    for entry in entries {
        let revocable = entry.slot.provider().revocable();
        for (key, held) in entry.slot.take_all() {
            if !revocable {
                tracing::info!(profile = entry.slot.name(), key_id = %key.handle.access_key_id, expires_at = %format_expiration(key.expires_at), "left to expire at stop: this profile cannot revoke keys (no token_file)");
                report.kept.push(key.handle.access_key_id.clone());
            } else if entry.revoke_on_shutdown || !held {
                jobs.spawn(revoke_by(Arc::clone(&entry.slot), key, deadline));
            } else {
                tracing::info!(profile = entry.slot.name(), key_id = %key.handle.access_key_id, "left alive at stop (revoke_on_shutdown = false)");
                report.kept.push(key.handle.access_key_id.clone());
            }
        }
    }
    async move {
        let mut out = StopReport::default();
        // In the order the revokes end; one that panicked is left out of both lists.
        while let Some(joined) = jobs.join_next().await {
            let Ok((id, result)) = joined else { continue };
            match result {
                Ok(()) => out.revoked.push(id),
                Err(why) => out.unrevoked.push((id, why)),
            }
        }
        out
    }
}

fn merge(into: &mut StopReport, from: StopReport) {
    into.revoked.extend(from.revoked);
    into.unrevoked.extend(from.unrevoked);
    into.kept.extend(from.kept);
}

/// Revokes one key, retrying what a retry can fix, until `deadline`.
async fn revoke_by(
    slot: Arc<Slot>,
    key: Arc<ReadyKey>,
    deadline: Instant,
) -> (String, Result<(), String>) {
    let id = key.handle.access_key_id.clone();
    let mut failures = 0;
    let outcome = loop {
        let err = match tokio::time::timeout_at(deadline, slot.revoke_key(&key, "stop")).await {
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
    if let Err(why) = &outcome {
        tracing::error!(profile = slot.name(), key_id = %id, error = %why, "could not revoke key at stop; it stays valid until it expires");
    }
    (id, outcome)
}

/// Why a profile in `state` has no key when nothing failed.
fn no_key_reason(profile: &str, state: State) -> String {
    match state {
        State::Cold => "no key to serve: no mint has started yet".to_string(),
        State::Minting => "no key to serve yet: a mint is under way".to_string(),
        State::Revoked => {
            format!("an operator revoked its keys; `keybroker rotate {profile}` mints a new one")
        }
        State::Stopped => "keybroker is stopping".to_string(),
        _ => "no key it may serve".to_string(),
    }
}
