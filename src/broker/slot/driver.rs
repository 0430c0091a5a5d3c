//! The driver task of a slot: each turn it revokes retired keys that are due, looks for lost
//! creates, and plans: mint now (a key is wanted, due for renewal, or a rotation asked for),
//! or sleep until the next thing that is due.

use std::sync::Arc;

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::{Retired, Slot};
use crate::provider::pacer::{Urgency, URGENT};

impl Slot {
    /// The driver: mints when a key is wanted or due for renewal, revokes retired keys at
    /// their expiry, until `cancel` fires. A mint already started is finished, not abandoned.
    pub async fn drive(self: Arc<Self>, cancel: CancellationToken) {
        // A mint a request is waiting for goes ahead of the endpoint's queue.
        let waited_for: Urgency = {
            let slot = Arc::clone(&self);
            Arc::new(move || slot.attempts.receiver_count() > 0)
        };
        loop {
            if cancel.is_cancelled() {
                break;
            }
            let now = self.clock.now();
            // Each step's future is boxed while it runs: the driver of an idle profile (most
            // of them, most of the time) stays small.
            Box::pin(self.revoke_due(now, &cancel)).await;
            if self.next_look().is_some_and(|at| at <= now) {
                let looked = tokio::select! {
                    looked = Box::pin(self.look_for_lost()) => looked,
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
                URGENT
                    .scope(Arc::clone(&waited_for), Box::pin(self.mint_once()))
                    .await;
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
        self.lock().phase.stop();
        // Wake requests waiting on a mint that will not come.
        self.attempts.send_modify(|n| *n += 1);
        self.finished.set(1);
    }

    /// Whether the slot left service and has nothing left to revoke or look for.
    fn is_drained(&self) -> bool {
        let st = self.lock();
        matches!(st.phase, super::state::Phase::Closing { minting: false })
            && st.retired.is_empty()
            && !self.has_lost()
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
        let rotate = st.rotation_pending();
        let due = match (&*self.current.load(), st.renew_at) {
            _ if !st.phase.may_mint() => false,
            _ if rotate => true,
            (None, _) => st.phase.wants_key(),
            (Some(_), Some(renew_at)) => now >= renew_at,
            (Some(_), None) => true,
        };
        let wanted_now = st.phase.wants_key() && self.ready().is_none();
        let allowed = rotate || now >= st.next_attempt || (wanted_now && now >= st.request_floor);
        // Room under the key limit opens when a retired key's Expiration passes: its revoke
        // is due then, and the next plan sees the room.
        let blocked = due && allowed && self.blocked(&st, now).is_some();
        if blocked && wanted_now {
            // Requests waiting for this mint fall back (degraded or 503) at once.
            self.attempts.send_modify(|n| *n += 1);
        }
        if due && allowed && !blocked {
            st.phase.start_mint();
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
}
