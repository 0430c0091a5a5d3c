//! What status shows of a slot ([`SlotStatus`]): its state, key, schedule, retired keys, unsettled creates
//! and counters.

use std::sync::atomic::{AtomicU64, Ordering};

use super::Slot;
use crate::api::{CountersSnapshot, SlotStatus};
use crate::credentials::format_expiration;

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

impl Counters {
    /// A copy of the counters now.
    pub fn snapshot(&self) -> CountersSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CountersSnapshot {
            mints: get(&self.mints),
            renewals: get(&self.renewals),
            mint_failures: get(&self.mint_failures),
            revokes: get(&self.revokes),
            revoke_failures: get(&self.revoke_failures),
            degraded_serves: get(&self.degraded_serves),
            unavailable: get(&self.unavailable),
        }
    }
}

impl Slot {
    /// The slot as status shows it.
    pub fn status(&self) -> SlotStatus {
        let st = self.lock();
        let now = self.clock.now();
        let current = self.current.load_full();
        let fresh = current
            .as_ref()
            .is_some_and(|k| self.remaining(k) >= self.policy.min_remaining);
        let usable = current
            .as_ref()
            .is_some_and(|k| self.remaining(k) > self.policy.degraded_floor());
        // Only a mint that is wanted now can be held up.
        let wanted = !fresh || st.renew_at.is_some_and(|r| r <= now) || st.rotation_pending();
        let blocked = self
            .blocked(&st, now)
            .filter(|_| wanted && st.phase.held_since().is_none());
        let failing = st.last_error.is_some() || (blocked.is_some() && !fresh);
        let renew_at = st.renew_at.filter(|_| current.is_some());
        SlotStatus {
            state: st.phase.word(fresh, usable, failing),
            key_id: current.as_ref().map(|k| k.handle.access_key_id.clone()),
            principal: current.as_ref().and_then(|k| k.principal.clone()),
            expires_at: current.as_ref().map(|k| format_expiration(k.expires_at)),
            expires_in_seconds: current
                .as_ref()
                .map(|k| (k.expires_at - now).whole_seconds()),
            next_renewal: renew_at.map(format_expiration),
            renews_in_seconds: renew_at.map(|r| (r - now).whole_seconds().max(0)),
            retired_keys: st.retired.len(),
            failing_revokes: self.failing_revokes(&st),
            retired_given_up: st.dropped_retired,
            unsettled_creates: self.unsettled(),
            counters: self.counters.snapshot(),
            last_error: st.last_error.as_ref().map(|(e, _)| e.to_string()),
            blocked,
        }
    }
}
