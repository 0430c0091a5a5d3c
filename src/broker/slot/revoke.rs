//! Retired keys and their revocation: the one place a slot revokes a key (renewal's retired
//! keys, the key budget, stop, an operator's revoke, a reload, lost creates found by tag), how
//! a failed revoke is retried, and the rule that no key is revoked before the `Expiration` it
//! was served with, except by an operator.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{ReadyKey, Slot, State};
use crate::broker::policy::backoff;
use crate::credentials::format_expiration;
use crate::provider::{ListedKey, ProviderError, ProviderKind};

/// Longest a slot's list of retired keys grows. Each renewal retires a key; only revokes
/// that keep failing make the list grow, and past this bound keys that have expired by
/// themselves leave it (they stay open in the ledger for the next start or `keybroker sweep`),
/// and a profile whose keys do not expire by themselves stops renewing.
pub const MAX_RETIRED: usize = 16;

/// How long a revoke the provider refused (400, 403: a retry of the same call is unlikely to
/// help soon) waits before it is tried again.
pub const REFUSED_REVOKE_RETRY: Duration = Duration::from_secs(15 * 60);

/// A retired key and when to revoke it.
#[derive(Debug)]
pub(super) struct Retired {
    pub(super) key: Arc<ReadyKey>,
    /// When the driver revokes it next.
    pub(super) revoke_at: OffsetDateTime,
    /// Until when clients may hold it: the `Expiration` it was served with, or the time it was
    /// retired for a key never served. Only an operator's revoke comes earlier.
    pub(super) served_until: OffsetDateTime,
    /// Revoke attempts that failed.
    pub(super) failures: u32,
    /// The last failed attempt's error.
    pub(super) last_error: Option<ProviderError>,
}

impl Retired {
    /// A key that was (or may have been) served: revoked at its expiry.
    pub(super) fn served(key: Arc<ReadyKey>) -> Self {
        Retired {
            revoke_at: key.expires_at,
            served_until: key.expires_at,
            key,
            failures: 0,
            last_error: None,
        }
    }

    /// A key nobody was given: revoked at once.
    pub(super) fn unserved(key: Arc<ReadyKey>, now: OffsetDateTime) -> Self {
        Retired {
            key,
            revoke_at: now,
            served_until: now,
            failures: 0,
            last_error: None,
        }
    }
}

/// A retired key whose revocation keeps failing, as status shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FailingRevoke {
    /// The key's id.
    pub key_id: String,
    /// Failed attempts so far.
    pub attempts: u32,
    /// `refused` (the provider said no: retried every 15 minutes) or `transient`.
    pub kind: &'static str,
    /// What the provider said.
    pub error: String,
    /// The next attempt (RFC 3339).
    pub next_attempt: String,
}

/// The keys every slot of a broker has served and that are still within their `Expiration`:
/// evicting "keybroker's own oldest key" to make room under a provider's key limit never
/// touches one of these, whichever profile served it.
#[derive(Debug, Default)]
pub struct ServedKeys(Mutex<HashMap<String, OffsetDateTime>>);

impl ServedKeys {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, OffsetDateTime>> {
        self.0.lock().expect("served keys lock poisoned")
    }

    /// Records that `key_id` may be held by clients until `until`.
    pub(super) fn insert(&self, key_id: &str, until: OffsetDateTime) {
        self.lock().insert(key_id.to_string(), until);
    }

    fn remove(&self, key_id: &str) {
        self.lock().remove(key_id);
    }

    /// Whether a client may still hold `key_id` at `now`.
    fn protects(&self, key_id: &str, now: OffsetDateTime) -> bool {
        self.lock().get(key_id).is_some_and(|until| *until > now)
    }
}

/// Whether a provider's keys stop working by themselves at their expiry (GleSYS credentials
/// live until deleted).
fn expire_by_themselves(kind: ProviderKind) -> bool {
    kind != ProviderKind::Glesys
}

impl Slot {
    /// Revokes `key`: the provider call, then the ledger, the counters and the log. `why` says
    /// for the log what made it due. Every revocation of a slot goes through here.
    pub(crate) async fn revoke_key(&self, key: &ReadyKey, why: &str) -> Result<(), ProviderError> {
        let id = &key.handle.access_key_id;
        match self.provider.revoke(&key.handle).await {
            Ok(()) => {
                self.counters.revokes.fetch_add(1, Ordering::Relaxed);
                self.journal_revoked(&key.lease);
                self.served.remove(id);
                tracing::info!(profile = %self.name, key_id = %id, why, "revoked key");
                Ok(())
            }
            Err(e) => {
                self.counters
                    .revoke_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(profile = %self.name, key_id = %id, why, error = %e, kind = e.code(), "revoke failed");
                Err(e)
            }
        }
    }

    /// Revokes retired keys whose time has come. A failure is retried: after a refusal
    /// ([`REFUSED_REVOKE_RETRY`]), else with backoff. A revoke still pending when `cancel`
    /// fires hands its key back to the slot, where stop finds it.
    pub(super) async fn revoke_due(&self, now: OffsetDateTime, cancel: &CancellationToken) {
        let (due, pass): (Vec<Retired>, u64) = {
            let mut st = self.lock();
            // Read under the lock that numbers the pass: a pass numbered after a `revoke_all`
            // sees the keys that call made due.
            let now = self.clock.now().max(now);
            st.revoke_passes += 1;
            let (due, keep) = std::mem::take(&mut st.retired)
                .into_iter()
                .partition(|r| r.revoke_at <= now);
            st.retired = keep;
            (due, st.revoke_passes)
        };
        // Tells `revoke_all` when this pass is over, however it ends.
        struct PassDone<'a>(&'a watch::Sender<u64>, u64);
        impl Drop for PassDone<'_> {
            fn drop(&mut self) {
                self.0.send_replace(self.1);
            }
        }
        let _done = PassDone(&self.passes, pass);
        let mut due = due.into_iter();
        while let Some(mut r) = due.next() {
            let why = if r.key.expires_at <= self.clock.now() {
                "retired and past its expiry"
            } else {
                "never served, or revoked by an operator"
            };
            let outcome = tokio::select! {
                outcome = self.revoke_key(&r.key, why) => outcome,
                _ = cancel.cancelled() => {
                    let mut st = self.lock();
                    st.retired.push(r);
                    st.retired.extend(due);
                    return;
                }
            };
            if let Err(e) = outcome {
                r.failures += 1;
                let delay = match e {
                    ProviderError::Auth(_) | ProviderError::Rejected(_) => REFUSED_REVOKE_RETRY,
                    _ => backoff(r.failures, self.jitter(), e.retry_floor()),
                };
                r.revoke_at = self.clock.now() + delay;
                r.last_error = Some(e);
                let mut st = self.lock();
                st.retired.push(r);
                self.bound_retired(&mut st);
            }
        }
    }

    /// Keeps room for one more key in the retired list ([`MAX_RETIRED`]): when it is full,
    /// keys that expired by themselves and whose revoke failed leave it, oldest first (the
    /// ledger keeps them for the next start or `keybroker sweep`).
    pub(super) fn bound_retired(&self, st: &mut State) {
        if st.retired.len() < MAX_RETIRED || !expire_by_themselves(self.provider.kind()) {
            return;
        }
        let now = self.clock.now();
        st.retired.sort_by_key(|r| r.key.expires_at);
        while st.retired.len() >= MAX_RETIRED {
            let Some(i) = st
                .retired
                .iter()
                .position(|r| r.key.expires_at <= now && r.failures > 0)
            else {
                return;
            };
            let r = st.retired.remove(i);
            st.dropped_retired += 1;
            tracing::error!(
                profile = %self.name,
                key_id = %r.key.handle.access_key_id,
                expired_at = %format_expiration(r.key.expires_at),
                error = %r.last_error.as_ref().map(|e| e.to_string()).unwrap_or_default(),
                "more than {MAX_RETIRED} retired keys could not be revoked; this one expired by itself and is no longer retried until the next start or keybroker sweep"
            );
        }
    }

    /// Why a renewal may not mint now: the retired list is full of keys whose revoke fails
    /// ([`MAX_RETIRED`]), so a new key would only add one more that cannot be revoked.
    pub(super) fn retired_overflow(&self, st: &State) -> Option<String> {
        (st.retired.len() >= MAX_RETIRED).then(|| {
            format!(
                "{} retired keys of profile {} could not be revoked; no new key is minted until revocations succeed",
                st.retired.len(),
                self.name
            )
        })
    }

    /// When a mint must wait for room under the provider's key limit: every key slot is
    /// taken by the current key and retired keys that clients may still hold until their
    /// `Expiration`. `None` when a mint may go ahead.
    pub(super) fn budget_wait(&self, st: &State, now: OffsetDateTime) -> Option<OffsetDateTime> {
        let limit = self.provider.key_limit()?;
        let held = usize::from(self.current.load().is_some()) + st.retired.len();
        if held < limit || st.retired.iter().any(|r| r.served_until <= now) {
            return None;
        }
        st.retired.iter().map(|r| r.served_until).min()
    }

    /// The message for a mint or rotation that must wait for room under the key limit.
    pub(super) fn budget_message(&self, st: &State, until: OffsetDateTime) -> String {
        let limit = self.provider.key_limit().unwrap_or_default();
        let held: Vec<String> = self
            .current
            .load()
            .iter()
            .map(|k| format!("{} (current)", k.handle.access_key_id))
            .chain(st.retired.iter().map(|r| {
                format!(
                    "{} (retired, served until {})",
                    r.key.handle.access_key_id,
                    format_expiration(r.served_until)
                )
            }))
            .collect();
        format!(
            "profile {}: {} allows {limit} keys per API user and they are in use: {}; a new key can be minted at {}, when the retired key's Expiration has passed (keybroker revoke {} frees them at once)",
            self.name,
            self.provider.kind(),
            held.join(", "),
            format_expiration(until),
            self.name
        )
    }

    /// Revokes retired keys nobody holds any more, oldest first, until one more key fits under
    /// `limit`. A key still within the `Expiration` it was served with is never revoked here.
    pub(super) async fn make_room(&self, limit: usize) -> Result<(), ProviderError> {
        loop {
            let oldest = {
                let mut st = self.lock();
                let now = self.clock.now();
                let held = usize::from(self.current.load().is_some()) + st.retired.len();
                if held < limit {
                    return Ok(());
                }
                let Some(i) = (0..st.retired.len())
                    .filter(|&i| st.retired[i].served_until <= now)
                    .min_by_key(|&i| st.retired[i].key.expires_at)
                else {
                    let until = st.retired.iter().map(|r| r.served_until).min();
                    return Err(ProviderError::LimitReached(match until {
                        Some(until) => self.budget_message(&st, until),
                        None => format!(
                            "profile {}: the {} key limit of {limit} is taken by the current key",
                            self.name,
                            self.provider.kind()
                        ),
                    }));
                };
                st.retired.swap_remove(i)
            };
            if let Err(e) = self
                .revoke_key(&oldest.key, "making room under the provider's key limit")
                .await
            {
                let mut oldest = oldest;
                let id = oldest.key.handle.access_key_id.clone();
                oldest.failures += 1;
                oldest.last_error = Some(e.clone());
                self.lock().retired.push(oldest);
                return Err(ProviderError::LimitReached(format!(
                    "cannot make room under the {} key limit of {limit}: revoking {id} failed: {e}",
                    self.provider.kind()
                )));
            }
        }
    }

    /// After a create refused at the limit: revokes the oldest key carrying the broker's tag
    /// that no client of any profile may still hold (a lost create that landed, a leftover),
    /// or explains whose keys fill the budget.
    pub(super) async fn evict_own_oldest(&self, message: &str) -> Result<(), ProviderError> {
        let keys = self.provider.list_keys().await.map_err(|e| {
            ProviderError::LimitReached(format!(
                "{message}; listing the keys to make room failed: {e}"
            ))
        })?;
        let now = self.clock.now();
        let current = self
            .current
            .load()
            .as_ref()
            .map(|k| k.handle.access_key_id.clone());
        let ours = |k: &&ListedKey| {
            k.tag
                .as_deref()
                .is_some_and(|t| t.starts_with(&*self.tag_prefix))
        };
        let victim = keys
            .iter()
            .filter(ours)
            .filter(|k| Some(&k.handle.access_key_id) != current.as_ref())
            .filter(|k| !self.served.protects(&k.handle.access_key_id, now))
            .min_by_key(|k| (k.created_at, k.expires_at));
        let Some(victim) = victim else {
            let foreign: Vec<&str> = keys
                .iter()
                .filter(|k| !ours(k))
                .map(|k| k.handle.access_key_id.as_str())
                .collect();
            let served: Vec<&str> = keys
                .iter()
                .filter(ours)
                .map(|k| k.handle.access_key_id.as_str())
                .collect();
            return Err(ProviderError::LimitReached(format!(
                "{message}; keybroker's keys ({}) are still within the Expiration they were served with, and {} not minted by keybroker ({}), which it never touches: delete one, or give keybroker an API user of its own",
                served.join(", "),
                foreign.len(),
                foreign.join(", ")
            )));
        };
        let lease = victim
            .tag
            .as_deref()
            .and_then(|t| t.strip_prefix(&*self.tag_prefix))
            .unwrap_or_default()
            .to_string();
        let key = ReadyKey::untracked(victim.handle.clone(), victim.tag.clone(), lease);
        self.revoke_key(
            &key,
            "keybroker's own oldest unserved key, to make room under the provider's key limit",
        )
        .await
        .map_err(|e| {
            ProviderError::LimitReached(format!(
                "{message}; revoking keybroker's own oldest key {} to make room failed: {e}",
                victim.handle.access_key_id
            ))
        })?;
        self.lock()
            .retired
            .retain(|r| r.key.handle.access_key_id != victim.handle.access_key_id);
        self.forget_lost(victim.tag.as_deref());
        Ok(())
    }

    /// Retired keys whose revoke has failed, for status.
    pub(super) fn failing_revokes(&self, st: &State) -> Vec<FailingRevoke> {
        st.retired
            .iter()
            .filter_map(|r| {
                let e = r.last_error.as_ref()?;
                Some(FailingRevoke {
                    key_id: r.key.handle.access_key_id.clone(),
                    attempts: r.failures,
                    kind: match e {
                        ProviderError::Auth(_) | ProviderError::Rejected(_) => "refused",
                        _ => "transient",
                    },
                    error: e.to_string(),
                    next_attempt: format_expiration(r.revoke_at),
                })
            })
            .collect()
    }
}
