//! Finishing what an earlier run left (DESIGN.md §6): at start-up, before serving, and in
//! `keybroker sweep`. Every lease the ledger holds open is revoked by its handle, or, when only
//! its intent was written, found by its tag in the provider's listing; then every key carrying
//! this broker's tag prefix that the ledger does not know is revoked too. Outcomes are recorded
//! and the ledger compacted to what is still open.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::broker::{Adopted, Pending, LANDING_GRACE};
use crate::clock::Clock;
use crate::credentials::format_expiration;
use crate::ledger::{Ledger, LedgerError, OpenLease, Record};
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
    let mut out = Recovery::default();
    for (line, why) in &replay.bad_lines {
        out.lines.push(format!("ledger line {line} skipped: {why}"));
    }
    if replay.torn_tail {
        out.lines.push("ledger: the last line was cut short (a write interrupted by power loss?) and was skipped".into());
    }
    let mut listings = Listings::default();
    let mut handled: HashSet<String> = HashSet::new();
    let mut still_open: Vec<OpenLease> = Vec::new();
    let now = clock.now();
    let closed = |lease: &OpenLease| Record::Revoked {
        lease: lease.lease.clone(),
        at: format_expiration(now),
    };

    for lease in replay.open {
        let Some(target) = targets.get(&lease.profile) else {
            out.lines.push(format!(
                "lease {} of profile {} ({}): the profile is no longer configured, so its key cannot be revoked; kept in the ledger",
                lease.lease,
                lease.profile,
                lease.minted.as_ref().map_or("key unknown", |m| m.0.as_str())
            ));
            out.unfinished += 1;
            still_open.push(lease);
            continue;
        };
        let profile = lease.profile.clone();
        match lease.minted.clone() {
            Some((key_id, handle, expires)) => {
                handled.insert(key_id.clone());
                let expires_at = OffsetDateTime::parse(&expires, &Rfc3339).ok();
                let key = KeyHandle {
                    access_key_id: key_id.clone(),
                    revoke_handle: handle,
                };
                if !target.revoke_on_shutdown {
                    if let Some(expires_at) = expires_at.filter(|e| *e > now) {
                        if daemon {
                            out.lines.push(format!("tracking {key_id} (profile {profile}) until it expires at {expires}: revoke_on_shutdown = false"));
                            out.adopted.entry(profile).or_default().push(Adopted {
                                handle: key,
                                lease: lease.lease.clone(),
                                expires_at,
                            });
                        } else {
                            out.lines.push(format!("left {key_id} (profile {profile}) alive until {expires}: revoke_on_shutdown = false; sweep again after that"));
                        }
                        still_open.push(lease);
                        continue;
                    }
                }
                match target.provider.revoke(&key).await {
                    Ok(()) => {
                        ledger.append(&closed(&lease))?;
                        out.revoked += 1;
                        out.lines.push(format!("revoked {key_id} (profile {profile}, lease {}): left by an earlier run", lease.lease));
                    }
                    Err(e) => {
                        out.unfinished += 1;
                        out.lines.push(format!("could not revoke {key_id} (profile {profile}): {e}; kept in the ledger"));
                        still_open.push(lease);
                    }
                }
            }
            None => {
                match listings.get(&profile, target.provider.as_ref()).await {
                    Ok(keys) => match keys
                        .iter()
                        .find(|k| k.tag.as_deref() == Some(lease.tag.as_str()))
                        .cloned()
                    {
                        Some(found) => {
                            handled.insert(found.handle.access_key_id.clone());
                            match target.provider.revoke(&found.handle).await {
                                Ok(()) => {
                                    ledger.append(&closed(&lease))?;
                                    out.revoked += 1;
                                    out.lines.push(format!(
                                    "revoked {} (profile {profile}): its create's answer was lost; found by tag {}",
                                    found.handle.access_key_id, lease.tag
                                ));
                                }
                                Err(e) => {
                                    out.unfinished += 1;
                                    out.lines.push(format!("could not revoke {} (profile {profile}): {e}; kept in the ledger", found.handle.access_key_id));
                                    still_open.push(lease);
                                }
                            }
                        }
                        None if now < may_land_until(&lease) => {
                            let until = format_expiration(may_land_until(&lease));
                            if daemon {
                                out.lines.push(format!(
                                    "lease {} of profile {profile}: no key carries its tag yet, and its create may still land until {until}; the profile keeps looking",
                                    lease.lease
                                ));
                                out.unsettled.entry(profile).or_default().push(Pending {
                                    lease: lease.lease.clone(),
                                    tag: lease.tag.clone(),
                                    ended_at: may_land_until(&lease) - LANDING_GRACE,
                                });
                            } else {
                                out.unfinished += 1;
                                out.lines.push(format!(
                                    "lease {} of profile {profile}: no key carries its tag yet, and its create may still land until {until}; kept in the ledger: sweep again after that",
                                    lease.lease
                                ));
                            }
                            still_open.push(lease);
                        }
                        None => {
                            ledger.append(&closed(&lease))?;
                            out.lines.push(format!("lease {} of profile {profile}: no key carries its tag; none was made", lease.lease));
                        }
                    },
                    Err(e) => {
                        out.unfinished += 1;
                        out.lines.push(format!("lease {} of profile {profile}: listing keys to find it failed: {e}; kept in the ledger", lease.lease));
                        still_open.push(lease);
                    }
                }
            }
        }
    }

    // Keys with this broker's tag that the ledger does not know (a lost or deleted ledger).
    for (profile, target) in targets {
        let keys = match listings.get(profile, target.provider.as_ref()).await {
            Ok(keys) => keys.clone(),
            Err(e) => {
                out.lines.push(format!("profile {profile}: listing keys failed: {e}; untracked keys, if any, were not looked for"));
                continue;
            }
        };
        let adopted: HashSet<&str> = out
            .adopted
            .values()
            .flatten()
            .map(|a| a.handle.access_key_id.as_str())
            .collect();
        let strays: Vec<ListedKey> = keys
            .into_iter()
            .filter(|k| k.tag.as_deref().is_some_and(|t| t.starts_with(tag_prefix)))
            .filter(|k| {
                !handled.contains(&k.handle.access_key_id)
                    && !adopted.contains(k.handle.access_key_id.as_str())
            })
            .collect();
        for stray in strays {
            handled.insert(stray.handle.access_key_id.clone());
            match target.provider.revoke(&stray.handle).await {
                Ok(()) => {
                    out.revoked += 1;
                    out.lines.push(format!(
                        "revoked {} (profile {profile}): tagged {} by this broker but not in the ledger",
                        stray.handle.access_key_id,
                        stray.tag.as_deref().unwrap_or_default()
                    ));
                }
                Err(e) => {
                    out.unfinished += 1;
                    out.lines.push(format!(
                        "could not revoke untracked key {} (profile {profile}): {e}",
                        stray.handle.access_key_id
                    ));
                }
            }
        }
    }
    ledger.compact(&still_open)?;
    Ok(out)
}
