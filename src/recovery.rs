//! Finishing what an earlier run left (README, "Never leak a key"): at start-up, before
//! serving, and in `keybroker sweep`. Every lease the ledger holds open is revoked by its
//! handle, or, when only its intent was written, found by its tag in the provider's listing;
//! then every key carrying this broker's tag prefix that the ledger does not know is revoked
//! too. Every revocation goes through the broker's one revoke path ([`Revoker`]), which
//! closes the lease in the ledger; the ledger is then compacted to what is still open.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::broker::{find_tagged, lease_of, Adopted, Pending, RevokeError, Revoker, LANDING_GRACE};
use crate::clock::Clock;
use crate::credentials::format_expiration;
use crate::ledger::{Ledger, LedgerError, OpenLease};
use crate::provider::{KeyHandle, ListedKey, Provider, ProviderError};

/// A configured profile, as recovery sees it.
pub struct Target {
    /// Its provider.
    pub provider: Arc<dyn Provider>,
    /// Whether its keys are revoked at stop; if not, a live key is tracked until its expiry.
    pub revoke_on_shutdown: bool,
}

/// What recovery did.
#[derive(Debug, Default)]
pub struct Recovery {
    /// One line per action or problem, for the log or the terminal.
    pub lines: Vec<String>,
    /// Keys to track until their expiry, by profile (`revoke_on_shutdown = false`).
    pub adopted: BTreeMap<String, Vec<Adopted>>,
    /// Creates not found by their tag that may still land, by profile: the profile keeps
    /// looking for them.
    pub unsettled: BTreeMap<String, Vec<Pending>>,
    /// Leases that could not be finished: they stay in the ledger for the next try.
    pub unfinished: usize,
    /// Keys revoked.
    pub revoked: usize,
}

/// Lists each profile's keys once.
#[derive(Default)]
struct Listings(BTreeMap<String, Result<Vec<ListedKey>, ProviderError>>);

impl Listings {
    async fn get(
        &mut self,
        profile: &str,
        provider: &dyn Provider,
    ) -> &Result<Vec<ListedKey>, ProviderError> {
        if !self.0.contains_key(profile) {
            let listed = provider.list_keys().await;
            self.0.insert(profile.to_string(), listed);
        }
        &self.0[profile]
    }
}

/// Calls a mint may make after its intent is written: making room, the create, the listing
/// that tells a key limit, the eviction's listing and revoke, and a second create.
const CALLS_PER_MINT: u32 = 6;

/// Until when the create of an open lease with no key may still land: [`LANDING_GRACE`]
/// after its request ended, at the latest [`CALLS_PER_MINT`] provider calls after its intent
/// was written. An unreadable or absurd time counts as now.
fn may_land_until(lease: &OpenLease) -> OffsetDateTime {
    let longest = crate::provider::http::DEFAULT_CALL_TIMEOUT * CALLS_PER_MINT + LANDING_GRACE;
    OffsetDateTime::parse(&lease.at, &Rfc3339)
        .ok()
        .and_then(|written| written.checked_add(longest.try_into().ok()?))
        .unwrap_or_else(|| OffsetDateTime::now_utc() + longest)
}

/// Runs recovery. `tag_prefix` identifies this broker's keys; `daemon` says whether a daemon
/// will keep running (and so can track kept keys until they expire).
pub async fn recover(
    ledger: &Ledger,
    targets: &BTreeMap<String, Target>,
    tag_prefix: &str,
    clock: &Clock,
    daemon: bool,
) -> Result<Recovery, LedgerError> {
    let replay = ledger.replay()?;
    let mut run = Run {
        ledger,
        clock,
        now: clock.now(),
        daemon,
        listings: Listings::default(),
        handled: HashSet::new(),
        still_open: Vec::new(),
        out: Recovery::default(),
    };
    for (line, why) in &replay.bad_lines {
        run.line(format!("ledger line {line} skipped: {why}"));
    }
    if replay.torn_tail {
        run.line("ledger: the last line was cut short (a write interrupted by power loss?) and was skipped".into());
    }
    for lease in replay.open {
        let Some(target) = targets.get(&lease.profile) else {
            run.unconfigured(lease);
            continue;
        };
        match lease.minted.clone() {
            Some(minted) => run.finish_minted(lease, target, minted).await?,
            None => run.find_by_tag(lease, target).await?,
        }
    }
    // Keys with this broker's tag that the ledger does not know (a lost or deleted ledger).
    for (profile, target) in targets {
        run.revoke_strays(profile, target, tag_prefix).await;
    }
    ledger.compact(&run.still_open)?;
    Ok(run.out)
}

/// One recovery pass: what it has done so far, and what it still has to do.
struct Run<'a> {
    ledger: &'a Ledger,
    clock: &'a Clock,
    /// When recovery started: what has expired, or can no longer land, is judged against it.
    now: OffsetDateTime,
    /// A daemon keeps running after recovery.
    daemon: bool,
    listings: Listings,
    /// Keys finished by their lease: not strays.
    handled: HashSet<String>,
    /// Leases the ledger keeps.
    still_open: Vec<OpenLease>,
    out: Recovery,
}

impl Run<'_> {
    fn line(&mut self, line: String) {
        self.out.lines.push(line);
    }

    /// The broker's one revoke path, for `profile`'s keys.
    fn revoker<'r>(&'r self, profile: &'r str, target: &'r Target) -> Revoker<'r> {
        Revoker {
            profile,
            provider: target.provider.as_ref(),
            ledger: Some(self.ledger),
            counters: None,
            clock: self.clock,
        }
    }

    /// A lease recovery could not finish: reported with `line`, and kept in the ledger.
    fn keep(&mut self, lease: OpenLease, line: String) {
        self.out.unfinished += 1;
        self.line(line);
        self.still_open.push(lease);
    }

    /// A lease of a profile no longer configured: nothing can revoke its key.
    fn unconfigured(&mut self, lease: OpenLease) {
        let line = format!(
            "lease {} of profile {} ({}): the profile is no longer configured, so its key cannot be revoked; kept in the ledger",
            lease.lease,
            lease.profile,
            lease.minted.as_ref().map_or("key unknown", |m| m.0.as_str())
        );
        self.keep(lease, line);
    }

    /// Revokes `key`, the key of `lease`, for `why`; reports `done` when that worked, and keeps
    /// the lease when the provider refused.
    async fn revoke_lease(
        &mut self,
        lease: OpenLease,
        target: &Target,
        key: &KeyHandle,
        why: &str,
        done: String,
    ) -> Result<(), LedgerError> {
        let profile = lease.profile.clone();
        let revoked = self
            .revoker(&profile, target)
            .revoke_key(key, &lease.lease, why)
            .await;
        match revoked {
            Ok(()) => {
                self.out.revoked += 1;
                self.line(done);
            }
            Err(RevokeError::Journal(e)) => return Err(e),
            Err(RevokeError::Provider(e)) => {
                let id = &key.access_key_id;
                let line =
                    format!("could not revoke {id} (profile {profile}): {e}; kept in the ledger");
                self.keep(lease, line);
            }
        }
        Ok(())
    }

    /// A lease whose create answered: its key is revoked by its handle, or, when the profile
    /// keeps keys at stop and a daemon runs, tracked until its expiry.
    async fn finish_minted(
        &mut self,
        lease: OpenLease,
        target: &Target,
        (key_id, handle, expires): (String, String, String),
    ) -> Result<(), LedgerError> {
        let profile = lease.profile.clone();
        self.handled.insert(key_id.clone());
        let expires_at = OffsetDateTime::parse(&expires, &Rfc3339).ok();
        let key = KeyHandle {
            access_key_id: key_id.clone(),
            revoke_handle: handle,
        };
        let revocable = target.provider.revocable();
        if !target.revoke_on_shutdown || !revocable {
            let reason = if revocable {
                "revoke_on_shutdown = false"
            } else {
                "the profile cannot revoke keys (no token_file)"
            };
            if let Some(expires_at) = expires_at.filter(|e| *e > self.now) {
                if self.daemon {
                    self.line(format!("tracking {key_id} (profile {profile}) until it expires at {expires}: {reason}"));
                    self.out.adopted.entry(profile).or_default().push(Adopted {
                        handle: key,
                        lease: lease.lease.clone(),
                        expires_at,
                    });
                } else {
                    self.line(format!("left {key_id} (profile {profile}) alive until {expires}: {reason}; sweep again after that"));
                }
                self.still_open.push(lease);
                return Ok(());
            }
            if !revocable {
                self.revoker(&profile, target).close_lease(&lease.lease)?;
                self.line(format!("{key_id} (profile {profile}, lease {}) has expired by itself: the profile cannot revoke keys; lease closed", lease.lease));
                return Ok(());
            }
        }
        let done = format!(
            "revoked {key_id} (profile {profile}, lease {}): left by an earlier run",
            lease.lease
        );
        self.revoke_lease(lease, target, &key, "left by an earlier run", done)
            .await
    }

    /// A lease with only its intent written: its key, if the create made one, is found by its
    /// tag and revoked; if none carries the tag, the lease is closed once its create can no
    /// longer land.
    async fn find_by_tag(&mut self, lease: OpenLease, target: &Target) -> Result<(), LedgerError> {
        let profile = lease.profile.clone();
        if !target.provider.revocable() {
            return self.unlooked(lease, target);
        }
        let listed = self.listings.get(&profile, target.provider.as_ref()).await;
        let found = match listed {
            Ok(keys) => find_tagged(keys, &lease.tag).cloned(),
            Err(e) => {
                let line = format!("lease {} of profile {profile}: listing keys to find it failed: {e}; kept in the ledger", lease.lease);
                self.keep(lease, line);
                return Ok(());
            }
        };
        let Some(found) = found else {
            return self.not_found(lease, target);
        };
        let id = &found.handle.access_key_id;
        self.handled.insert(id.clone());
        let done = format!(
            "revoked {id} (profile {profile}): its create's answer was lost; found by tag {}",
            lease.tag
        );
        let why = "its create's answer was lost; found by its tag";
        self.revoke_lease(lease, target, &found.handle, why, done)
            .await
    }

    /// A lost create of a profile that cannot list keys: it cannot be looked for, and nothing
    /// could revoke its key, so the lease is closed (as the daemon does when it happens), with
    /// when any key it made has expired by: the provider's longest lifetime after the intent.
    fn unlooked(&mut self, lease: OpenLease, target: &Target) -> Result<(), LedgerError> {
        let profile = lease.profile.clone();
        let longest = target
            .provider
            .kind()
            .max_lifetime()
            .unwrap_or(Duration::from_secs(43_200));
        let intent = OffsetDateTime::parse(&lease.at, &Rfc3339).unwrap_or(self.now);
        let gone_by = format_expiration(intent + longest + LANDING_GRACE);
        self.revoker(&profile, target).close_lease(&lease.lease)?;
        self.line(format!(
            "lease {} of profile {profile}: its create's answer was lost; without token_file its key cannot be looked for and, if it was made, expires by itself by {gone_by}; lease closed",
            lease.lease
        ));
        Ok(())
    }

    /// No key carries the lease's tag: its create may still land (a daemon keeps looking; a
    /// sweep keeps the lease), or it made none.
    fn not_found(&mut self, lease: OpenLease, target: &Target) -> Result<(), LedgerError> {
        let profile = lease.profile.clone();
        let until = may_land_until(&lease);
        if self.now >= until {
            self.revoker(&profile, target).close_lease(&lease.lease)?;
            self.line(format!(
                "lease {} of profile {profile}: no key carries its tag; none was made",
                lease.lease
            ));
            return Ok(());
        }
        let until_text = format_expiration(until);
        if self.daemon {
            self.line(format!(
                "lease {} of profile {profile}: no key carries its tag yet, and its create may still land until {until_text}; the profile keeps looking",
                lease.lease
            ));
            self.out
                .unsettled
                .entry(profile)
                .or_default()
                .push(Pending {
                    lease: lease.lease.clone(),
                    tag: lease.tag.clone(),
                    ended_at: until - LANDING_GRACE,
                });
        } else {
            self.out.unfinished += 1;
            self.line(format!(
                "lease {} of profile {profile}: no key carries its tag yet, and its create may still land until {until_text}; kept in the ledger: sweep again after that",
                lease.lease
            ));
        }
        self.still_open.push(lease);
        Ok(())
    }

    /// Revokes `profile`'s keys carrying `tag_prefix` that no lease accounted for.
    async fn revoke_strays(&mut self, profile: &str, target: &Target, tag_prefix: &str) {
        if !target.provider.revocable() {
            return;
        }
        let keys = match self.listings.get(profile, target.provider.as_ref()).await {
            Ok(keys) => keys.clone(),
            Err(e) => {
                let line = format!("profile {profile}: listing keys failed: {e}; untracked keys, if any, were not looked for");
                self.line(line);
                return;
            }
        };
        let adopted: HashSet<String> = self
            .out
            .adopted
            .values()
            .flatten()
            .map(|a| a.handle.access_key_id.clone())
            .collect();
        let strays: Vec<ListedKey> = keys
            .into_iter()
            .filter(|k| lease_of(k, tag_prefix).is_some())
            .filter(|k| {
                !self.handled.contains(&k.handle.access_key_id)
                    && !adopted.contains(&k.handle.access_key_id)
            })
            .collect();
        for stray in strays {
            let id = &stray.handle.access_key_id;
            self.handled.insert(id.clone());
            // Not in the ledger: no lease to close.
            let revoked = self
                .revoker(profile, target)
                .revoke_key(
                    &stray.handle,
                    "",
                    "tagged by this broker but not in the ledger",
                )
                .await;
            match revoked {
                Ok(()) | Err(RevokeError::Journal(_)) => {
                    self.out.revoked += 1;
                    self.line(format!(
                        "revoked {id} (profile {profile}): tagged {} by this broker but not in the ledger",
                        stray.tag.as_deref().unwrap_or_default()
                    ));
                }
                Err(RevokeError::Provider(e)) => {
                    self.out.unfinished += 1;
                    self.line(format!(
                        "could not revoke untracked key {id} (profile {profile}): {e}"
                    ));
                }
            }
        }
    }
}
