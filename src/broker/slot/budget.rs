//! The provider's key budget: a provider may limit how many keys an account holds at once
//! (Crusoe: two per API user). A mint makes room first by revoking retired keys nobody holds
//! any more, and a create refused at the limit evicts the broker's own oldest unserved key;
//! a key still within the `Expiration` it was served with, by any profile, is never revoked
//! to make room, so a mint waits for one to expire instead.

use std::collections::HashMap;
use std::sync::Mutex;

use time::OffsetDateTime;

use super::state::State;
use super::{ReadyKey, Slot};
use crate::broker::listing::lease_of;
use crate::credentials::format_expiration;
use crate::provider::{ListedKey, ProviderError};

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

    /// Forgets `key_id`: it is revoked.
    pub(super) fn remove(&self, key_id: &str) {
        self.lock().remove(key_id);
    }

    /// Whether a client may still hold `key_id` at `now`.
    fn protects(&self, key_id: &str, now: OffsetDateTime) -> bool {
        self.lock().get(key_id).is_some_and(|until| *until > now)
    }
}

impl Slot {
    /// Why no mint may happen now although one may be due: too many retired keys that could
    /// not be revoked, or no room under the provider's key limit before a retired key's
    /// Expiration.
    pub(super) fn blocked(&self, st: &State, now: OffsetDateTime) -> Option<String> {
        if let Some(why) = self.retired_overflow(st) {
            return Some(why);
        }
        self.budget_wait(st, now)
            .map(|until| self.budget_message(st, until))
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
    fn budget_message(&self, st: &State, until: OffsetDateTime) -> String {
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
        let Some((victim, lease)) = self.eviction_victim(&keys) else {
            return Err(ProviderError::LimitReached(
                self.budget_full_message(message, &keys),
            ));
        };
        let key = ReadyKey::untracked(victim.handle.clone(), victim.tag.clone(), lease.into());
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

    /// The oldest listed key carrying this broker's tag that is not current and no client of
    /// any profile may still hold, with its lease.
    fn eviction_victim<'a>(&self, keys: &'a [ListedKey]) -> Option<(&'a ListedKey, &'a str)> {
        let now = self.clock.now();
        let current = self
            .current
            .load()
            .as_ref()
            .map(|k| k.handle.access_key_id.clone());
        keys.iter()
            .filter_map(|k| Some((k, lease_of(k, &self.tag_prefix)?)))
            .filter(|(k, _)| Some(&k.handle.access_key_id) != current.as_ref())
            .filter(|(k, _)| !self.served.protects(&k.handle.access_key_id, now))
            .min_by_key(|(k, _)| (k.created_at, k.expires_at))
    }

    /// Why nothing can be evicted: the broker's keys are all held by clients, and the rest are
    /// not the broker's.
    fn budget_full_message(&self, message: &str, keys: &[ListedKey]) -> String {
        let (ours, foreign): (Vec<&ListedKey>, Vec<&ListedKey>) = keys
            .iter()
            .partition(|k| lease_of(k, &self.tag_prefix).is_some());
        let ids = |keys: &[&ListedKey]| {
            keys.iter()
                .map(|k| k.handle.access_key_id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "{message}; keybroker's keys ({}) are still within the Expiration they were served with, and {} not minted by keybroker ({}), which it never touches: delete one, or give keybroker an API user of its own",
            ids(&ours),
            foreign.len(),
            ids(&foreign)
        )
    }
}
