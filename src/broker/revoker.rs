//! The one revoke path: every key keybroker revokes (a renewal's retired key, the key budget,
//! stop, an operator's revoke, a reload, a lost create found by its tag, start-up recovery and
//! `keybroker sweep`) goes through [`Revoker::revoke_key`], which calls the provider, closes the
//! lease in the ledger, counts the outcome and logs it with why the key was due. A profile that
//! cannot revoke (CoreWeave Workload Identity without `token_file`) makes no call: the lease is
//! closed and the key left to expire, and the log says so. Callers hand it such keys only once
//! nothing more can be done (expired, or never served); at stop they keep them instead.

use std::sync::atomic::Ordering;

use crate::clock::Clock;
use crate::credentials::format_expiration;
use crate::ledger::{Ledger, LedgerError, Record};
use crate::provider::{KeyHandle, Provider, ProviderError};

use super::Counters;

/// What a revocation needs: whose key it is, who revokes it, and where it is recorded.
#[derive(Clone, Copy)]
pub struct Revoker<'a> {
    /// The profile, for the log.
    pub profile: &'a str,
    /// Who revokes the key.
    pub provider: &'a dyn Provider,
    /// Where the lease is closed, if keys are journaled.
    pub ledger: Option<&'a Ledger>,
    /// The profile's status counters, when a running slot revokes.
    pub counters: Option<&'a Counters>,
    /// When the lease is closed.
    pub clock: &'a Clock,
}

/// Why a revocation did not finish.
#[derive(Debug)]
pub enum RevokeError {
    /// The provider did not revoke the key: it is still alive.
    Provider(ProviderError),
    /// The key is revoked, but the ledger could not record it: the next start revokes it
    /// again, which providers accept.
    Journal(LedgerError),
}

impl Revoker<'_> {
    /// Revokes `key`, then closes its `lease` in the ledger (none when `lease` is empty: a key
    /// the ledger never knew). `why` says for the log what made it due.
    pub async fn revoke_key(
        &self,
        key: &KeyHandle,
        lease: &str,
        why: &str,
    ) -> Result<(), RevokeError> {
        let id = &key.access_key_id;
        if !self.provider.revocable() {
            let journaled = self.close_lease(lease);
            tracing::info!(profile = %self.profile, key_id = %id, why, "left to expire: this profile cannot revoke keys (no token_file)");
            return journaled.map_err(RevokeError::Journal);
        }
        match self.provider.revoke(key).await {
            Ok(()) => {
                if let Some(c) = self.counters {
                    c.revokes.fetch_add(1, Ordering::Relaxed);
                }
                let journaled = self.close_lease(lease);
                tracing::info!(profile = %self.profile, key_id = %id, why, "revoked key");
                journaled.map_err(RevokeError::Journal)
            }
            Err(e) => {
                if let Some(c) = self.counters {
                    c.revoke_failures.fetch_add(1, Ordering::Relaxed);
                }
                tracing::warn!(profile = %self.profile, key_id = %id, why, error = %e, kind = e.code(), "revoke failed");
                Err(RevokeError::Provider(e))
            }
        }
    }

    /// Records that `lease`'s key is gone, or was never made. A failed write is logged, and
    /// only means the next start revokes an already revoked key.
    pub fn close_lease(&self, lease: &str) -> Result<(), LedgerError> {
        let Some(ledger) = self.ledger.filter(|_| !lease.is_empty()) else {
            return Ok(());
        };
        let record = Record::Revoked {
            lease: lease.to_string(),
            at: format_expiration(self.clock.now()),
        };
        ledger.append(&record).inspect_err(|e| {
            tracing::error!(profile = %self.profile, lease, error = %e, "could not record a revocation in the ledger");
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::provider::dev::Dev;
    use crate::provider::ProviderKind;

    #[tokio::test]
    async fn a_revocation_closes_its_lease_and_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        let clock = Clock::System;
        let dev = Dev::new(clock.clone());
        let counters = Counters::default();
        let key = dev
            .mint("keybroker-h-i-01", Duration::from_secs(3600))
            .await
            .unwrap();
        ledger
            .append(&Record::Intent {
                lease: "01".into(),
                profile: "p".into(),
                provider: ProviderKind::Dev,
                tag: "keybroker-h-i-01".into(),
                at: format_expiration(clock.now()),
            })
            .unwrap();
        let revoker = Revoker {
            profile: "p",
            provider: &dev,
            ledger: Some(&ledger),
            counters: Some(&counters),
            clock: &clock,
        };
        revoker
            .revoke_key(&key.handle(), "01", "a test")
            .await
            .unwrap();
        assert_eq!(dev.revocations(), 1);
        assert_eq!(counters.snapshot().revokes, 1);
        assert!(ledger.replay().unwrap().open.is_empty());

        // A key the ledger never knew: revoked, nothing written.
        let stray = dev
            .mint("keybroker-h-i-02", Duration::from_secs(3600))
            .await
            .unwrap();
        let before = std::fs::read(ledger.path()).unwrap();
        revoker
            .revoke_key(&stray.handle(), "", "a test")
            .await
            .unwrap();
        assert_eq!(dev.revocations(), 2);
        assert_eq!(std::fs::read(ledger.path()).unwrap(), before);
    }

    /// A profile that cannot revoke makes no call: the lease is closed and the key left to
    /// expire, and nothing counts as a revocation or a failure.
    #[tokio::test]
    async fn a_profile_that_cannot_revoke_closes_the_lease_without_a_call() {
        use crate::provider::coreweave::{wif::Exchange, CoreWeave};
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        let clock = Clock::System;
        let (http, asked) = crate::provider::http::canned::client(Vec::new());
        let exchange = Exchange::Oidc {
            org_id: "o".into(),
            token_file: dir.path().join("token"),
        };
        let cw = CoreWeave::federated(
            http,
            "http://cw.invalid",
            Some(exchange),
            None,
            clock.clone(),
        );
        assert!(!cw.revocable());
        ledger
            .append(&Record::Intent {
                lease: "01".into(),
                profile: "p".into(),
                provider: ProviderKind::Coreweave,
                tag: "keybroker-h-i-01".into(),
                at: format_expiration(clock.now()),
            })
            .unwrap();
        let counters = Counters::default();
        let revoker = Revoker {
            profile: "p",
            provider: &cw,
            ledger: Some(&ledger),
            counters: Some(&counters),
            clock: &clock,
        };
        let key = KeyHandle {
            access_key_id: "CWA".into(),
            revoke_handle: "CWA".into(),
        };
        revoker.revoke_key(&key, "01", "a test").await.unwrap();
        assert!(asked.lock().unwrap().is_empty());
        assert!(ledger.replay().unwrap().open.is_empty());
        let c = counters.snapshot();
        assert_eq!((c.revokes, c.revoke_failures), (0, 0));
    }
}
