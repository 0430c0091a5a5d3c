//! Retired keys and their revocation: [`Slot::revoke_key`], through which the slot revokes
//! every key (renewal's retired keys, the key budget, stop, an operator's revoke, a reload,
//! lost creates found by tag) by the broker's one revoke path; how a failed revoke is retried;
//! and the rule that no key is revoked before the `Expiration` it was served with, except by
//! an operator.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::state::State;
use super::{ReadyKey, Slot};
use crate::api::{FailingRevoke, RevokeFailure};
use crate::broker::policy::backoff;
use crate::broker::RevokeError;
use crate::credentials::format_expiration;
use crate::provider::{ProviderError, ProviderKind};

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

/// Whether a provider's keys stop working by themselves at their expiry (GleSYS credentials
/// live until deleted).
fn expire_by_themselves(kind: ProviderKind) -> bool {
    kind != ProviderKind::Glesys
}

impl Slot {
    /// Revokes `key` by the broker's one revoke path ([`Revoker`](crate::broker::Revoker)):
    /// the provider call, then the ledger, the counters and the log. `why` says for the log
    /// what made it due. Every revocation of a slot goes through here. A revoked key is no
    /// longer protected from eviction; one whose revocation the ledger could not record
    /// counts as revoked.
    pub(crate) async fn revoke_key(&self, key: &ReadyKey, why: &str) -> Result<(), ProviderError> {
        match self
            .revoker()
            .revoke_key(&key.handle, &key.lease, why)
            .await
        {
            Ok(()) | Err(RevokeError::Journal(_)) => {
                self.served.remove(&key.handle.access_key_id);
                Ok(())
            }
            Err(RevokeError::Provider(e)) => Err(e),
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
        struct PassDone<'a>(&'a super::Mark, u64);
        impl Drop for PassDone<'_> {
            fn drop(&mut self) {
                self.0.set(self.1);
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
                        ProviderError::Auth(_) | ProviderError::Rejected(_) => {
                            RevokeFailure::Refused
                        }
                        _ => RevokeFailure::Transient,
                    },
                    error: e.to_string(),
                    next_attempt: format_expiration(r.revoke_at),
                })
            })
            .collect()
    }
}
