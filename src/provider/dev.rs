//! The development provider: keys made in process, with real expiry and counted revocations, so
//! `serve --dev` shows the whole lifecycle without a cloud account.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use rand::distributions::{Alphanumeric, DistString};
use time::OffsetDateTime;

use super::{KeyHandle, ListedKey, MintedKey, Provider, ProviderError, ProviderKind};
use crate::clock::Clock;
use crate::credentials::Secret;

/// In-process keys that expire on time.
#[derive(Debug)]
pub struct Dev {
    clock: Clock,
    mint_delay: Duration,
    live: Mutex<HashMap<String, (OffsetDateTime, String)>>,
    revocations: AtomicU64,
}

impl Dev {
    /// A dev provider reading time from `clock`.
    pub fn new(clock: Clock) -> Self {
        Dev {
            clock,
            mint_delay: Duration::ZERO,
            live: Mutex::new(HashMap::new()),
            revocations: AtomicU64::new(0),
        }
    }

    /// Makes every mint take `delay`, like a provider's API would (benchmarks, demos).
    pub fn with_mint_delay(mut self, delay: Duration) -> Self {
        self.mint_delay = delay;
        self
    }

    /// Keys minted, not revoked and not yet expired.
    pub fn live_keys(&self) -> usize {
        let now = self.clock.now();
        self.live
            .lock()
            .expect("dev provider lock")
            .values()
            .filter(|(e, _)| *e > now)
            .count()
    }

    /// How many revocations the provider has accepted.
    pub fn revocations(&self) -> u64 {
        self.revocations.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl Provider for Dev {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Dev
    }

    async fn mint(&self, tag: &str, lifetime: Duration) -> Result<MintedKey, ProviderError> {
        if !self.mint_delay.is_zero() {
            tokio::time::sleep(self.mint_delay).await;
        }
        let mut rng = rand::thread_rng();
        let access_key_id = format!(
            "KBDEV{}",
            Alphanumeric.sample_string(&mut rng, 15).to_uppercase()
        );
        let secret = Secret::new(Alphanumeric.sample_string(&mut rng, 40));
        let expires_at = self.clock.now() + lifetime;
        self.live
            .lock()
            .expect("dev provider lock")
            .insert(access_key_id.clone(), (expires_at, tag.to_string()));
        Ok(MintedKey {
            revoke_handle: access_key_id.clone(),
            access_key_id,
            secret,
            session_token: None,
            expires_at,
            principal: None,
        })
    }

    async fn list_keys(&self) -> Result<Vec<ListedKey>, ProviderError> {
        let now = self.clock.now();
        Ok(self
            .live
            .lock()
            .expect("dev provider lock")
            .iter()
            .filter(|(_, (expires, _))| *expires > now)
            .map(|(id, (expires, tag))| ListedKey {
                handle: KeyHandle {
                    access_key_id: id.clone(),
                    revoke_handle: id.clone(),
                },
                tag: Some(tag.clone()),
                created_at: None,
                expires_at: Some(*expires),
            })
            .collect())
    }

    async fn revoke(&self, key: &KeyHandle) -> Result<(), ProviderError> {
        if self
            .live
            .lock()
            .expect("dev provider lock")
            .remove(&key.revoke_handle)
            .is_some()
        {
            self.revocations.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}
