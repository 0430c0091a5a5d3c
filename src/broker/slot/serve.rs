//! The hot path: the current key with its response bodies rendered once, read without a lock;
//! a request that finds no fresh key joins (or starts) the one mint in flight, then falls back
//! to a key served degraded, or to 503 with `Retry-After`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use time::OffsetDateTime;

use super::Slot;
use crate::clock::positive;
use crate::credentials::{self, format_expiration};
use crate::provider::{KeyHandle, MintedKey};

/// A key ready to serve, with its response bodies rendered once.
#[derive(Debug)]
pub struct ReadyKey {
    /// Id and revoke handle.
    pub handle: KeyHandle,
    /// The broker's tag on the key.
    pub tag: String,
    /// The lease id, the ledger's name for the key.
    pub lease: String,
    /// When the key stops working (the `Expiration` served).
    pub expires_at: OffsetDateTime,
    /// Who owns the key at the provider, when it said.
    pub principal: Option<String>,
    /// `credential_process` JSON.
    pub process_json: Bytes,
}

impl ReadyKey {
    pub(super) fn new(key: MintedKey, tag: String, lease: String) -> Self {
        let process_json = credentials::process_json(
            &key.access_key_id,
            &key.secret,
            key.session_token.as_ref(),
            key.expires_at,
        );
        ReadyKey {
            handle: key.handle(),
            tag,
            lease,
            expires_at: key.expires_at,
            principal: key.principal,
            process_json,
        }
    }

    /// A key known only by its handle (adopted from an earlier run, or found by its tag):
    /// never served by this run, so it has no response bodies.
    pub(super) fn untracked(handle: KeyHandle, tag: Option<String>, lease: String) -> Self {
        ReadyKey {
            handle,
            tag: tag.unwrap_or_default(),
            lease,
            expires_at: OffsetDateTime::UNIX_EPOCH,
            principal: None,
            process_json: Bytes::new(),
        }
    }
}

/// Why a request got no key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable {
    /// When it is worth asking again.
    pub retry_after: Duration,
    /// What went wrong, for a human.
    pub message: String,
}

/// `Retry-After` for a profile whose keys an operator revoked: nothing changes until they
/// rotate it, so clients need not ask often.
const HELD_RETRY_AFTER: Duration = Duration::from_secs(60);

impl Slot {
    /// The hottest path: the current key's `credential_process` body if the key has at least
    /// `min_remaining` left. No lock and no reference count taken (an arc-swap guard).
    pub fn ready_body(&self) -> Option<Bytes> {
        let key = self.current.load();
        let key = key.as_ref()?;
        (self.remaining(key) >= self.policy.min_remaining).then(|| key.process_json.clone())
    }

    /// The hot path: the current key if it has at least `min_remaining` left. No lock.
    pub fn ready(&self) -> Option<Arc<ReadyKey>> {
        let key = self.current.load_full()?;
        (self.remaining(&key) >= self.policy.min_remaining).then_some(key)
    }

    /// A key for a request: the ready key, else the outcome of a (shared) mint, else a
    /// still-valid key served degraded, else [`Unavailable`].
    pub async fn get(&self) -> Result<Arc<ReadyKey>, Unavailable> {
        if let Some(key) = self.ready() {
            return Ok(key);
        }
        let mut attempts = {
            let mut st = self.lock();
            let now = self.clock.now();
            if st.phase.is_gone() {
                return Err(Unavailable {
                    retry_after: Duration::from_secs(1),
                    message: format!(
                        "profile {} has no valid key: keybroker is stopping",
                        self.name
                    ),
                });
            }
            if let Some(at) = st.phase.held_since() {
                self.counters.unavailable.fetch_add(1, Ordering::Relaxed);
                return Err(Unavailable {
                    retry_after: HELD_RETRY_AFTER,
                    message: format!(
                        "profile {} has no key: an operator revoked its keys at {}; `keybroker rotate {}` mints a new one",
                        self.name,
                        format_expiration(at),
                        self.name
                    ),
                });
            }
            if !st.phase.minting() && (now < st.request_floor || self.blocked(&st, now).is_some()) {
                // A mint failed moments ago (asking again now would only hammer the
                // provider), or no mint may happen now.
                drop(st);
                return self.fallback();
            }
            st.phase.want();
            self.attempts.subscribe()
        };
        self.wake.notify_one();
        let waited = tokio::time::timeout(self.mint_wait, async {
            // Wait for an attempt that finishes after this request arrived.
            loop {
                if attempts.changed().await.is_err() {
                    return;
                }
                if self.ready().is_some() || !self.lock().phase.minting() {
                    return;
                }
            }
        })
        .await;
        if let Some(key) = self.ready() {
            return Ok(key);
        }
        if waited.is_err() {
            tracing::debug!(profile = %self.name, "request gave up waiting for a mint");
        }
        self.fallback()
    }

    /// No fresh key: serve the current one degraded while it has more than the floor left.
    fn fallback(&self) -> Result<Arc<ReadyKey>, Unavailable> {
        if let Some(key) = self.current.load_full() {
            let left = self.remaining(&key);
            if left > self.policy.degraded_floor() {
                self.counters
                    .degraded_serves
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    profile = %self.name,
                    key_id = %key.handle.access_key_id,
                    remaining_seconds = left.as_secs(),
                    "serving a key with less than min_remaining left: renewal is failing"
                );
                return Ok(key);
            }
        }
        self.counters.unavailable.fetch_add(1, Ordering::Relaxed);
        let st = self.lock();
        let now = self.clock.now();
        // Waiting for room under the key limit: ask again when it opens.
        let floor = self
            .budget_wait(&st, now)
            .unwrap_or(st.request_floor)
            .max(st.request_floor);
        let retry_after = positive(floor - now).max(Duration::from_secs(1));
        let message = match (&st.last_error, self.blocked(&st, now)) {
            (_, Some(why)) => format!("profile {} has no valid key: {why}", self.name),
            (Some((e, _)), None) => format!(
                "profile {} has no valid key: the {} API failed: {e}",
                self.name,
                self.provider.kind()
            ),
            (None, None) => format!(
                "profile {} has no valid key yet: a mint is in progress",
                self.name
            ),
        };
        Err(Unavailable {
            retry_after: Duration::from_secs(retry_after.as_secs_f64().ceil() as u64),
            message,
        })
    }

    /// Returns once the slot has a key, or its first attempt has failed, or it is not prewarmed.
    pub async fn settled(&self) {
        let mut attempts = self.attempts.subscribe();
        loop {
            {
                let st = self.lock();
                if !st.phase.wants_key() || self.current.load().is_some() || st.last_error.is_some()
                {
                    return;
                }
            }
            if attempts.changed().await.is_err() {
                return;
            }
        }
    }
}
