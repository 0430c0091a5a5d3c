//! Creates whose outcome is unknown: the answer was lost (a timeout, a broken connection, a
//! 5xx, an unreadable success), or the daemon stopped or crashed while the create was under
//! way. The key may exist, or may still land: creates are not idempotent, so such a key is
//! never re-created blindly but found by its tag in the provider's listing and revoked (its
//! secret was lost with the answer, so it is never served).
//!
//! A lease is closed as "made no key" only by a listing taken [`LANDING_GRACE`] after its
//! create's request ended: a provider may still be carrying out a create its client gave up
//! on. Until then it stays open in the ledger and in status, is looked for in the background,
//! and makes a stop exit 1 so the next start or `keybroker sweep` settles it. An unsettled
//! lease holds up new creates only while listings fail, and then at most [`SETTLE_WAIT`].

use std::time::Duration;

use time::OffsetDateTime;

use super::revoke::Retired;
use super::{ReadyKey, Slot};
use crate::api::UnsettledCreate;
use crate::broker::listing::find_tagged;
use crate::credentials::format_expiration;
use crate::provider::ProviderError;

/// How long after its request ended a create may still land at the provider.
pub const LANDING_GRACE: Duration = Duration::from_secs(120);

/// Longest an unsettled create holds up new creates while the provider's listing fails.
pub const SETTLE_WAIT: Duration = Duration::from_secs(60);

/// Longest between two background looks for unsettled creates.
const LOOK_CAP: Duration = Duration::from_secs(60);

/// A create whose outcome is unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Its lease.
    pub lease: String,
    /// The tag its key would carry.
    pub tag: String,
    /// When its request ended (for one an earlier run left: when its intent was written,
    /// plus the longest a provider call takes).
    pub ended_at: OffsetDateTime,
}

/// The unsettled creates of a slot, and when to look for them next.
#[derive(Debug, Default)]
pub(super) struct Lost {
    pending: Vec<Pending>,
    /// The next background look.
    next_look: Option<OffsetDateTime>,
    /// Looks since the last new entry, for the backoff between looks.
    looks: u32,
    /// Why the last look failed, if it did.
    last_error: Option<String>,
}

impl Lost {
    /// Creates an earlier run left unsettled, looked for at once.
    pub(super) fn inherited(pending: Vec<Pending>, now: OffsetDateTime) -> Self {
        Lost {
            next_look: (!pending.is_empty()).then_some(now),
            pending,
            looks: 0,
            last_error: None,
        }
    }
}

impl Slot {
    fn lost(&self) -> std::sync::MutexGuard<'_, Lost> {
        self.lost.lock().expect("lost creates lock poisoned")
    }

    /// Records a create whose outcome is unknown; it is looked for at once. `may_land`: no
    /// answer came, so the provider may still be carrying it out. A profile that cannot list
    /// or revoke keys cannot look: the lease is closed, and its key, if made, expires by itself.
    pub(super) fn add_lost(&self, lease: &str, tag: &str, may_land: bool) {
        let now = self.clock.now();
        if !self.provider.revocable() {
            let by = format_expiration(now + self.policy.lifetime + LANDING_GRACE);
            tracing::warn!(profile = %self.name, %tag, "a create's answer was lost; without token_file keybroker cannot look for its key, which, if it was made, expires by itself by {by}");
            let _ = self.revoker().close_lease(lease);
            return;
        }
        let mut lost = self.lost();
        lost.pending.push(Pending {
            lease: lease.to_string(),
            tag: tag.to_string(),
            ended_at: if may_land { now } else { now - LANDING_GRACE },
        });
        lost.looks = 0;
        lost.next_look = Some(self.clock.now());
    }

    /// Drops the unsettled create whose key carried `tag` (its key was revoked elsewhere).
    pub(super) fn forget_lost(&self, tag: Option<&str>) {
        if let Some(tag) = tag {
            self.lost().pending.retain(|p| p.tag != tag);
        }
    }

    /// Whether any create is unsettled.
    pub(super) fn has_lost(&self) -> bool {
        !self.lost().pending.is_empty()
    }

    /// When the driver should look for unsettled creates next.
    pub(super) fn next_look(&self) -> Option<OffsetDateTime> {
        let lost = self.lost();
        lost.next_look.filter(|_| !lost.pending.is_empty())
    }

    /// Looks for unsettled creates in the provider's listing: a key found by its tag is
    /// retired to be revoked at once; a lease missing from a listing taken [`LANDING_GRACE`]
    /// after its request ended is closed as "made no key"; the rest wait for the next look.
    pub(crate) async fn look_for_lost(&self) -> Result<(), ProviderError> {
        let pending = self.lost().pending.clone();
        if pending.is_empty() {
            return Ok(());
        }
        let listed_at = self.clock.now();
        let listed = self.provider.list_keys().await;
        let now = self.clock.now();
        let mut lost = self.lost();
        lost.looks += 1;
        let wait = Duration::from_secs(1 << lost.looks.min(6)).min(LOOK_CAP);
        lost.next_look = Some(now + wait);
        let listed = match listed {
            Ok(listed) => listed,
            Err(e) => {
                let message = format!(
                    "{} create(s) whose answer was lost are unsettled: listing the keys to find them failed: {e}",
                    pending.len()
                );
                lost.last_error = Some(message.clone());
                return Err(ProviderError::Transient(message));
            }
        };
        lost.last_error = None;
        let mut found = Vec::new();
        lost.pending.retain(|p| {
            if !pending.iter().any(|q| q.lease == p.lease) {
                return true;
            }
            if let Some(k) = find_tagged(&listed, &p.tag) {
                tracing::warn!(profile = %self.name, key_id = %k.handle.access_key_id, tag = %p.tag, "found the key of a create whose answer was lost; revoking it");
                let mut key =
                    ReadyKey::untracked(k.handle.clone(), Some(p.tag.clone()), p.lease.clone());
                // Its expiry as listed; unknown counts as never, so the retired list's bound
                // never gives up on it as if it had expired by itself.
                key.expires_at = k.expires_at.unwrap_or(OffsetDateTime::new_utc(
                    time::Date::MAX,
                    time::Time::MIDNIGHT,
                ));
                found.push(key);
                return false;
            }
            if listed_at >= p.ended_at + LANDING_GRACE {
                self.journal_revoked(&p.lease);
                tracing::info!(profile = %self.name, tag = %p.tag, "a create whose answer was lost made no key");
                return false;
            }
            true
        });
        drop(lost);
        if !found.is_empty() {
            let mut st = self.lock();
            for key in found {
                st.retired
                    .push(Retired::unserved(std::sync::Arc::new(key), now));
            }
            drop(st);
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Before a create: looks for unsettled creates. A failed listing holds the create up
    /// while the oldest unsettled create is younger than [`SETTLE_WAIT`]; after that the
    /// create goes ahead and the lease stays open, looked for in the background.
    pub(super) async fn settle_before_create(&self) -> Result<(), ProviderError> {
        if !self.has_lost() {
            return Ok(());
        }
        let Err(e) = self.look_for_lost().await else {
            return Ok(());
        };
        let oldest = self.lost().pending.iter().map(|p| p.ended_at).min();
        match oldest {
            Some(t) if self.clock.now() < t + SETTLE_WAIT => {
                Err(ProviderError::Transient(format!(
                    "{e}; no new key is made for up to {}s",
                    SETTLE_WAIT.as_secs()
                )))
            }
            _ => {
                tracing::warn!(profile = %self.name, error = %e, "minting although a lost create is unsettled; it stays in the ledger and is looked for in the background");
                Ok(())
            }
        }
    }

    /// Unsettled creates, for status and the stop report.
    pub fn unsettled(&self) -> Vec<UnsettledCreate> {
        let lost = self.lost();
        lost.pending
            .iter()
            .map(|p| UnsettledCreate {
                tag: p.tag.clone(),
                since: format_expiration(p.ended_at),
                last_error: lost.last_error.clone(),
            })
            .collect()
    }
}
