//! Where a profile is in its key lifecycle (ARCHITECTURE.md, "One key's lifecycle"), and the
//! rest of a slot's state that its lock guards.
//!
//! [`Phase`] is the lifecycle: in service a profile is dormant (no key wanted yet), idle or
//! minting; an operator's `keybroker revoke` holds it until `keybroker rotate`; a reload that
//! removes it closes it; stop stops it. A mint started before a hold, a close or a stop still
//! finishes (its key is then revoked, not served), so those phases remember it. The state word
//! status shows follows from the phase, the current key's freshness and the last mint's
//! outcome ([`Phase::word`]).

use time::OffsetDateTime;

use super::revoke::Retired;
use crate::api::{Rotated, State as Word};
use crate::provider::ProviderError;

/// A profile's place in the key lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// In service, no key wanted yet: not prewarmed, and no request has asked.
    Dormant,
    /// In service, a key wanted, no mint under way.
    Idle,
    /// In service, a mint under way.
    Minting,
    /// An operator revoked every key at `at` (`keybroker revoke`): nothing is minted and
    /// requests get 503 until `keybroker rotate`.
    Held {
        /// When the keys were revoked.
        at: OffsetDateTime,
        /// A mint started before is still under way; its key is revoked, not served.
        minting: bool,
    },
    /// A reload took the profile out of service: no more mints; its keys are revoked when
    /// their served `Expiration` has passed, then the driver ends.
    Closing {
        /// A mint started before is still under way; its key is revoked, not served.
        minting: bool,
    },
    /// The broker is stopping, or the driver has ended.
    Stopped {
        /// A mint started before is still under way; stop waits for it and revokes its key.
        minting: bool,
    },
}

impl Phase {
    /// The first phase: a prewarmed profile wants a key at once.
    pub(super) fn initial(prewarm: bool) -> Self {
        if prewarm {
            Phase::Idle
        } else {
            Phase::Dormant
        }
    }

    /// Whether a mint is under way.
    pub(super) fn minting(self) -> bool {
        match self {
            Phase::Dormant | Phase::Idle => false,
            Phase::Minting => true,
            Phase::Held { minting, .. }
            | Phase::Closing { minting }
            | Phase::Stopped { minting } => minting,
        }
    }

    /// Whether a key is wanted and may be minted: in service, and a request, a prewarm or a
    /// rotation has asked for one.
    pub(super) fn wants_key(self) -> bool {
        matches!(self, Phase::Idle | Phase::Minting)
    }

    /// Whether the profile left service for good (reload or stop).
    pub(super) fn is_gone(self) -> bool {
        matches!(self, Phase::Closing { .. } | Phase::Stopped { .. })
    }

    /// Whether the profile may mint: in service and not held.
    pub(super) fn may_mint(self) -> bool {
        matches!(self, Phase::Dormant | Phase::Idle | Phase::Minting)
    }

    /// When an operator revoked every key, while the profile is held.
    pub(super) fn held_since(self) -> Option<OffsetDateTime> {
        match self {
            Phase::Held { at, .. } => Some(at),
            _ => None,
        }
    }

    /// A request asked for a key: dormant → idle.
    pub(super) fn want(&mut self) {
        if *self == Phase::Dormant {
            *self = Phase::Idle;
        }
    }

    /// The driver starts a mint: dormant or idle → minting.
    pub(super) fn start_mint(&mut self) {
        if self.may_mint() {
            *self = Phase::Minting;
        }
    }

    /// The mint under way has ended, however.
    pub(super) fn mint_ended(&mut self) {
        *self = match *self {
            Phase::Minting => Phase::Idle,
            Phase::Held { at, .. } => Phase::Held { at, minting: false },
            Phase::Closing { .. } => Phase::Closing { minting: false },
            Phase::Stopped { .. } => Phase::Stopped { minting: false },
            other => other,
        };
    }

    /// `keybroker revoke` at `at`: held until a rotation (a profile already gone stays gone).
    pub(super) fn hold(&mut self, at: OffsetDateTime) {
        if !self.is_gone() {
            *self = Phase::Held {
                at,
                minting: self.minting(),
            };
        }
    }

    /// `keybroker rotate`: a key is wanted again, and a hold is lifted.
    pub(super) fn release(&mut self) {
        if !self.is_gone() {
            *self = if self.minting() {
                Phase::Minting
            } else {
                Phase::Idle
            };
        }
    }

    /// A reload took the profile out of service.
    pub(super) fn close(&mut self) {
        if !matches!(self, Phase::Stopped { .. }) {
            *self = Phase::Closing {
                minting: self.minting(),
            };
        }
    }

    /// Stop, or the driver ended.
    pub(super) fn stop(&mut self) {
        *self = Phase::Stopped {
            minting: self.minting(),
        };
    }

    /// The state word status shows. `fresh`: the current key has at least `min_remaining`
    /// left; `usable`: it has more than the degraded floor left; `failing`: the last mint
    /// failed, or no mint may happen while no key is fresh.
    pub(super) fn word(self, fresh: bool, usable: bool, failing: bool) -> Word {
        match self {
            Phase::Closing { .. } | Phase::Stopped { .. } => Word::Stopped,
            Phase::Held { .. } => Word::Revoked,
            _ if failing && usable => Word::Degraded,
            _ if failing => Word::Unavailable,
            Phase::Minting if fresh => Word::Renewing,
            Phase::Minting => Word::Minting,
            Phase::Dormant | Phase::Idle if fresh => Word::Ready,
            Phase::Dormant | Phase::Idle => Word::Cold,
        }
    }
}

/// What a slot's lock guards.
#[derive(Debug)]
pub(super) struct State {
    /// Where the profile is in its lifecycle.
    pub(super) phase: Phase,
    /// Keys taken out of service, revoked when their time comes.
    pub(super) retired: Vec<Retired>,
    /// When the current key is renewed.
    pub(super) renew_at: Option<OffsetDateTime>,
    /// The last mint's failure, if the last mint failed.
    pub(super) last_error: Option<(ProviderError, OffsetDateTime)>,
    /// Mints failed since the last success, for the backoff.
    pub(super) failures_in_row: u32,
    /// The driver does not retry before this.
    pub(super) next_attempt: OffsetDateTime,
    /// A request may trigger an attempt from this time on.
    pub(super) request_floor: OffsetDateTime,
    /// Rotations asked for (`keybroker rotate`), numbered from 1.
    pub(super) rotations_asked: u64,
    /// The number of the last rotation whose mint has started: one is pending while
    /// `rotations_asked` is ahead of it.
    pub(super) rotations_started: u64,
    /// The rotation whose mint is in flight.
    pub(super) rotating: Option<u64>,
    /// The last rotation mint's number and outcome.
    pub(super) rotated: Option<(u64, Result<Rotated, String>)>,
    /// Revoke passes of the driver started so far; `revoke_all` waits for one that started
    /// after it.
    pub(super) revoke_passes: u64,
    /// The lease and tag of the create in flight, if one is.
    pub(super) creating: Option<(String, String)>,
    /// Retired keys given up on in this run (see [`super::MAX_RETIRED`]).
    pub(super) dropped_retired: u64,
}

impl State {
    /// A slot's state at start: `retired` keys adopted from an earlier run.
    pub(super) fn new(prewarm: bool, retired: Vec<Retired>, now: OffsetDateTime) -> Self {
        State {
            phase: Phase::initial(prewarm),
            retired,
            renew_at: None,
            last_error: None,
            failures_in_row: 0,
            next_attempt: now,
            request_floor: now,
            rotations_asked: 0,
            rotations_started: 0,
            rotating: None,
            rotated: None,
            revoke_passes: 0,
            creating: None,
            dropped_retired: 0,
        }
    }

    /// Whether a rotation was asked for and its mint has not started.
    pub(super) fn rotation_pending(&self) -> bool {
        self.rotations_asked > self.rotations_started
    }

    /// Ends the rotation in flight, if one is, with `outcome`.
    pub(super) fn end_rotation(&mut self, outcome: impl FnOnce() -> Result<Rotated, String>) {
        if let Some(n) = self.rotating.take() {
            self.rotated = Some((n, outcome()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AT: OffsetDateTime = OffsetDateTime::UNIX_EPOCH;

    #[test]
    fn a_profile_goes_cold_minting_ready_renewing_ready() {
        let mut p = Phase::initial(false);
        assert_eq!(p.word(false, false, false).as_str(), "cold");
        p.want();
        p.start_mint();
        assert_eq!(p.word(false, false, false).as_str(), "minting");
        p.mint_ended();
        assert_eq!(p.word(true, true, false).as_str(), "ready");
        p.start_mint();
        assert_eq!(p.word(true, true, false).as_str(), "renewing");
        p.mint_ended();
        assert_eq!(p.word(true, true, false).as_str(), "ready");
    }

    #[test]
    fn a_failing_profile_is_degraded_while_its_key_is_usable() {
        for p in [Phase::Idle, Phase::Minting] {
            assert_eq!(p.word(false, true, true).as_str(), "degraded");
            assert_eq!(p.word(false, false, true).as_str(), "unavailable");
        }
    }

    #[test]
    fn a_hold_lasts_until_a_rotation_and_remembers_the_mint_in_flight() {
        let mut p = Phase::Minting;
        p.hold(AT);
        assert_eq!(
            p,
            Phase::Held {
                at: AT,
                minting: true
            }
        );
        assert_eq!(p.word(true, true, true).as_str(), "revoked");
        assert!(!p.may_mint() && !p.wants_key());
        p.release();
        assert_eq!(p, Phase::Minting);
        p.hold(AT);
        p.mint_ended();
        p.release();
        assert_eq!(p, Phase::Idle);
    }

    #[test]
    fn a_profile_that_left_service_stays_stopped() {
        let mut p = Phase::Idle;
        p.close();
        assert_eq!(p.word(true, true, false).as_str(), "stopped");
        p.hold(AT);
        p.release();
        p.want();
        p.start_mint();
        assert_eq!(p, Phase::Closing { minting: false });
        p.stop();
        p.close();
        assert_eq!(p, Phase::Stopped { minting: false });
        assert_eq!(p.word(false, false, true).as_str(), "stopped");
    }
}
