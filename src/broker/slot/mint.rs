//! One mint: a fresh lease and tag, the intent journaled, room made under the provider's key
//! limit, the create, its outcome journaled, and the new key made current (the old one
//! retired) or the failure recorded for the backoff.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use rand::Rng;
use time::OffsetDateTime;

use super::state::State;
use super::{ReadyKey, Retired, Slot};
use crate::api::Rotated;
use crate::broker::policy::retry_delay;
use crate::broker::Revoker;
use crate::clock::positive;
use crate::credentials::format_expiration;
use crate::ledger::{LedgerError, Record};
use crate::provider::{MintedKey, ProviderError};

impl Slot {
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

    /// The one revoke path ([`Revoker`]) with this slot's provider, ledger and counters.
    pub(super) fn revoker(&self) -> Revoker<'_> {
        Revoker {
            profile: &self.name,
            provider: self.provider.as_ref(),
            ledger: self.ledger.as_deref(),
            counters: Some(&self.counters),
            clock: &self.clock,
        }
    }

    /// Records that a lease made no key, or that its key is gone. A failed write is logged,
    /// and only means the next start revokes an already revoked key, which providers accept.
    pub(super) fn journal_revoked(&self, lease: &str) {
        let _ = self.revoker().close_lease(lease);
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

    /// A key with less than `min_remaining` left is not servable: it is retired at once, to
    /// be revoked, and the mint counts as failed.
    fn servable(
        &self,
        key: MintedKey,
        tag: &str,
        lease: &str,
        now: OffsetDateTime,
    ) -> Result<MintedKey, ProviderError> {
        let left = positive(key.expires_at - now);
        if left >= self.policy.min_remaining {
            return Ok(key);
        }
        let e = ProviderError::Malformed(format!(
            "{} issued key {} with only {}s left, under min_remaining ({}s)",
            self.provider.kind(),
            key.access_key_id,
            left.as_secs(),
            self.policy.min_remaining.as_secs()
        ));
        let key = Arc::new(ReadyKey::new(key, tag.to_string(), lease.to_string()));
        self.lock().retired.push(Retired::unserved(key, now));
        Err(e)
    }

    /// The driver's mint: one journaled create, then its outcome applied to the slot.
    pub(super) async fn mint_once(&self) {
        let (tag, lease) = self.new_lease();
        let kind = self.provider.kind();
        tracing::debug!(profile = %self.name, provider = %kind, %tag, "minting a key");
        let result = self.mint_journaled(&tag, &lease).await;
        let now = self.clock.now();
        let result = result.and_then(|key| self.servable(key, &tag, &lease, now));
        let jitter = self.jitter();
        let mut st = self.lock();
        let may_serve = st.phase.may_mint();
        st.phase.mint_ended();
        // The key, if any, is stored below under this lock: stop sees it in the slot.
        st.creating = None;
        match result {
            Ok(key) if !may_serve => {
                // An operator revoked the profile's keys, or a reload took the profile out of
                // service, while this mint was in flight: the new key is not served, only
                // revoked.
                tracing::info!(profile = %self.name, key_id = %key.access_key_id, "minted while the profile's keys were being revoked; revoking it too");
                st.end_rotation(|| {
                    Err(format!(
                        "profile {}: an operator revoked its keys while the rotation's mint was in flight",
                        self.name
                    ))
                });
                let key = Arc::new(ReadyKey::new(key, tag, lease));
                st.retired.push(Retired::unserved(key, now));
                // The driver revokes it on its next pass, which follows this attempt.
            }
            Ok(key) => self.minted(&mut st, ReadyKey::new(key, tag, lease), jitter, now),
            Err(e) => self.mint_failed(&mut st, e, jitter, now),
        }
        drop(st);
        self.attempts.send_modify(|n| *n += 1);
    }

    /// A mint succeeded: the new key is current, the old one retired.
    fn minted(&self, st: &mut State, ready: ReadyKey, jitter: f64, now: OffsetDateTime) {
        let ready = Arc::new(ready);
        let renew_at = self.policy.renew_at(ready.expires_at, jitter);
        st.renew_at = Some(renew_at);
        st.failures_in_row = 0;
        st.last_error = None;
        st.next_attempt = now;
        st.request_floor = now;
        let old = self.current.swap(Some(Arc::clone(&ready)));
        self.counters.mints.fetch_add(1, Ordering::Relaxed);
        let old_id = old.as_ref().map(|o| o.handle.access_key_id.clone());
        st.end_rotation(|| {
            Ok(Rotated {
                key_id: ready.handle.access_key_id.clone(),
                expires_at: format_expiration(ready.expires_at),
                retired: old_id.clone(),
            })
        });
        if let Some(old) = old {
            self.counters.renewals.fetch_add(1, Ordering::Relaxed);
            st.retired.push(Retired::served(old));
            self.bound_retired(st);
        }
        tracing::info!(
            profile = %self.name,
            provider = %self.provider.kind(),
            key_id = %ready.handle.access_key_id,
            tag = %ready.tag,
            expires_at = %format_expiration(ready.expires_at),
            renews_in_seconds = positive(renew_at - now).as_secs(),
            replaces = old_id.as_deref().unwrap_or(""),
            "minted key"
        );
    }

    /// A mint failed: the backoff grows, and the failure is what status and 503s report.
    fn mint_failed(&self, st: &mut State, e: ProviderError, jitter: f64, now: OffsetDateTime) {
        let kind = self.provider.kind();
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
        st.end_rotation(|| {
            Err(format!(
                "profile {}: minting the new key failed: the {kind} API failed: {e}",
                self.name
            ))
        });
        st.last_error = Some((e, now));
    }
}
