//! What is done to a slot from outside its driver: an operator's `keybroker rotate` (a new key
//! now, lifting a hold) and `keybroker revoke` (every key revoked now, the profile held), a
//! reload that takes the profile out of service, and stop taking every key for revocation.

use std::sync::Arc;
use std::time::Duration;

use super::{ReadyKey, Retired, Slot};
use crate::api::Rotated;

/// What `keybroker revoke` achieved.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RevokedKeys {
    /// Keys revoked now.
    pub revoked: Vec<String>,
    /// Keys whose revocation failed, with why; the broker keeps retrying them.
    pub failed: Vec<(String, String)>,
}

impl Slot {
    /// `keybroker rotate`: mints a new key now, whatever the renewal schedule or backoff say,
    /// and retires the current one (still valid for clients that fetched it, revoked at its
    /// expiry). Also lifts a `keybroker revoke` hold. Waits at most `wait` for the outcome of
    /// that mint (or of a later rotation's, when several are asked for at once).
    pub async fn rotate(&self, wait: Duration) -> Result<Rotated, String> {
        let mut attempts = self.attempts.subscribe();
        let stopping = || format!("profile {} is stopping", self.name);
        let want = {
            let mut st = self.lock();
            if st.phase.is_gone() {
                return Err(stopping());
            }
            // A rotation never revokes a key before the Expiration it was served with: with
            // the provider's key limit taken by such keys, it waits for one to expire.
            if let Some(why) = self.blocked(&st, self.clock.now()) {
                return Err(why);
            }
            st.phase.release();
            st.rotations_asked += 1;
            st.rotations_asked
        };
        self.wake.notify_one();
        tracing::info!(profile = %self.name, "rotation requested by an operator");
        let outcome = tokio::time::timeout(wait, async {
            loop {
                {
                    let st = self.lock();
                    match &st.rotated {
                        Some((n, outcome)) if *n >= want => return outcome.clone(),
                        _ if matches!(st.phase, super::state::Phase::Stopped { .. }) => {
                            return Err(stopping())
                        }
                        _ => {}
                    }
                }
                if attempts.changed().await.is_err() {
                    return Err(stopping());
                }
            }
        })
        .await;
        outcome.unwrap_or_else(|_| {
            Err(format!(
                "profile {}: the new key's mint did not finish within {}s; it goes on in the background (keybroker status shows it)",
                self.name,
                wait.as_secs()
            ))
        })
    }

    /// `keybroker revoke`: revokes every key of the profile now, current and retired, and holds
    /// it: no new key and 503 for requests until [`Slot::rotate`]. The keys stay in the slot,
    /// due now, and the driver revokes them: nothing is lost if this call is abandoned or the
    /// daemon stops meanwhile. Waits at most `wait` for the driver's pass, then reports every
    /// key of the profile still alive (a failed revoke is retried with backoff), and creates
    /// whose answer was lost that could not be settled.
    pub async fn revoke_all(&self, wait: Duration) -> RevokedKeys {
        let deadline = tokio::time::Instant::now() + wait;
        let (targets, want) = self.hold();
        tracing::warn!(profile = %self.name, keys = targets.len(), "an operator revoked every key of the profile; requests get 503 until keybroker rotate");
        self.wake.notify_one();
        let pass_done =
            tokio::time::timeout_at(deadline, self.passes.wait_until(|pass| pass >= want))
                .await
                .is_ok();
        if self.has_lost() {
            let _ = tokio::time::timeout_at(deadline, self.look_for_lost()).await;
        }
        self.revoke_report(targets, pass_done, wait)
    }

    /// Holds the profile and makes every key due now. Returns the keys' ids and the number of
    /// the driver's revoke pass that will see them.
    fn hold(&self) -> (Vec<String>, u64) {
        let mut st = self.lock();
        let now = self.clock.now();
        st.phase.hold(now);
        st.rotations_started = st.rotations_asked;
        st.renew_at = None;
        if let Some(key) = self.current.swap(None) {
            st.retired.push(Retired::served(key));
        }
        // An operator's revoke is the one thing that comes before a served Expiration.
        for r in &mut st.retired {
            r.revoke_at = now;
            r.served_until = now;
        }
        let targets = st
            .retired
            .iter()
            .map(|r| r.key.handle.access_key_id.clone())
            .collect();
        (targets, st.revoke_passes + 1)
    }

    /// What `keybroker revoke` reports: `targets` not in the slot any more were revoked; the
    /// rest, and lost creates not found yet, were not (yet).
    fn revoke_report(&self, targets: Vec<String>, pass_done: bool, wait: Duration) -> RevokedKeys {
        let mut outcome = RevokedKeys::default();
        for r in &self.lock().retired {
            let why = match &r.last_error {
                Some(e) => format!("{e}; retrying"),
                None if pass_done => "not revoked yet; under way".to_string(),
                None => format!("not revoked within {}s; under way", wait.as_secs()),
            };
            outcome
                .failed
                .push((r.key.handle.access_key_id.clone(), why));
        }
        for id in targets {
            if !outcome.failed.iter().any(|(f, _)| *f == id) {
                outcome.revoked.push(id);
            }
        }
        for p in self.unsettled() {
            outcome.failed.push((
                format!("the key tagged {}", p.tag),
                "a create whose answer was lost; not found in the provider's listing yet, looked for again in the background, at stop and at the next start".into(),
            ));
        }
        outcome
    }

    /// Takes the profile out of service (a reload removed or changed it): no more mints;
    /// its keys are retired, kept until the Expiration they were served with and revoked
    /// then by the driver, which ends once nothing is left.
    pub fn close(&self) {
        let mut st = self.lock();
        st.phase.close();
        st.renew_at = None;
        if let Some(key) = self.current.swap(None) {
            st.retired.push(Retired::served(key));
        }
        drop(st);
        self.wake.notify_one();
        // Requests waiting on a mint that will not come.
        self.attempts.send_modify(|n| *n += 1);
    }

    /// Takes every key out of the slot (current and retired), for revocation at stop.
    /// Each with whether a client may still hold it (it was served and its Expiration has
    /// not passed): keys nobody holds are revoked even where `revoke_on_shutdown = false`.
    pub fn take_all(&self) -> Vec<(Arc<ReadyKey>, bool)> {
        let mut st = self.lock();
        st.phase.stop();
        let now = self.clock.now();
        let mut keys: Vec<(Arc<ReadyKey>, bool)> = st
            .retired
            .drain(..)
            .map(|r| (r.key, r.served_until > now))
            .collect();
        keys.extend(self.current.swap(None).map(|k| (k, true)));
        keys
    }
}
