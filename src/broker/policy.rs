//! When to renew, when to stop serving, how long to back off: pure functions of time and
//! jitter, so the schedule is unit-tested without a clock.

use std::time::Duration;

use time::OffsetDateTime;

use crate::provider::ProviderError;

/// The most a renewal is moved earlier, as a fraction of `renew_before` (README, "Behaviour over time": up to 10%).
pub const RENEW_JITTER: f64 = 0.10;
/// A degraded profile serves its last key until this long before it expires (README,
/// "Behaviour over time").
pub const DEGRADED_FLOOR: Duration = Duration::from_secs(5 * 60);
/// First retry delay after a failed mint.
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Longest retry delay after failed mints.
pub const BACKOFF_CAP: Duration = Duration::from_secs(60);

/// A profile's key timing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RenewPolicy {
    /// Requested key lifetime.
    pub lifetime: Duration,
    /// Renew when this much lifetime is left.
    pub renew_before: Duration,
    /// Never serve a key with less than this left while a renewal can succeed.
    pub min_remaining: Duration,
}

impl RenewPolicy {
    /// When to renew a key that expires at `expires_at`; `jitter` in `[0, 1)` moves it earlier
    /// by up to [`RENEW_JITTER`] of `renew_before`, so a fleet started together spreads out.
    pub fn renew_at(&self, expires_at: OffsetDateTime, jitter: f64) -> OffsetDateTime {
        let early = self
            .renew_before
            .mul_f64(RENEW_JITTER * jitter.clamp(0.0, 1.0));
        expires_at - self.renew_before - early
    }

    /// How close to expiry a degraded profile still serves its key: [`DEGRADED_FLOOR`], or half
    /// of `min_remaining` for short-key profiles where five minutes would be most of the key.
    pub fn degraded_floor(&self) -> Duration {
        DEGRADED_FLOOR.min(self.min_remaining / 2)
    }
}

/// Delay before background retry number `failures` (1 = after the first failure): exponential
/// from [`BACKOFF_BASE`] to [`BACKOFF_CAP`] with full jitter, never under `floor`.
pub fn backoff(failures: u32, jitter: f64, floor: Duration) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let ceiling = BACKOFF_BASE.saturating_mul(1 << exp).min(BACKOFF_CAP);
    ceiling.mul_f64(jitter.clamp(0.0, 1.0)).max(floor)
}

/// Delay before the driver's next attempt after `failures` failed mints ending in `error`.
/// Errors a prompt retry cannot fix (refused credentials, a refused request, a full key
/// budget) wait the whole [`BACKOFF_CAP`]; the others back off exponentially with full jitter,
/// never sooner than the provider's `Retry-After`.
pub fn retry_delay(error: &ProviderError, failures: u32, jitter: f64) -> Duration {
    match error {
        ProviderError::Auth(_) | ProviderError::Rejected(_) | ProviderError::LimitReached(_) => {
            BACKOFF_CAP
        }
        _ => backoff(failures, jitter, error.retry_floor()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const HOUR: RenewPolicy = RenewPolicy {
        lifetime: Duration::from_secs(3600),
        renew_before: Duration::from_secs(1800),
        min_remaining: Duration::from_secs(1200),
    };

    #[test]
    fn renews_at_renew_before_minus_jitter() {
        let exp = datetime!(2026-11-23 13:00:00 UTC);
        assert_eq!(HOUR.renew_at(exp, 0.0), datetime!(2026-11-23 12:30:00 UTC));
        assert_eq!(HOUR.renew_at(exp, 1.0), datetime!(2026-11-23 12:27:00 UTC));
        assert_eq!(HOUR.renew_at(exp, 0.5), datetime!(2026-11-23 12:28:30 UTC));
    }

    #[test]
    fn degraded_floor_is_five_minutes_or_half_min_remaining() {
        assert_eq!(HOUR.degraded_floor(), DEGRADED_FLOOR);
        let short = RenewPolicy {
            min_remaining: Duration::from_secs(4),
            ..HOUR
        };
        assert_eq!(short.degraded_floor(), Duration::from_secs(2));
    }

    #[test]
    fn errors_a_retry_cannot_fix_wait_the_cap() {
        let auth = ProviderError::Auth("x".into());
        assert_eq!(retry_delay(&auth, 1, 0.0), BACKOFF_CAP);
        let limit = ProviderError::LimitReached("x".into());
        assert_eq!(retry_delay(&limit, 1, 0.0), BACKOFF_CAP);
        let transient = ProviderError::Transient("x".into());
        assert_eq!(retry_delay(&transient, 1, 0.0), Duration::from_secs(1));
        let limited = ProviderError::RateLimited {
            retry_after: Some(Duration::from_secs(30)),
            message: "x".into(),
        };
        assert_eq!(retry_delay(&limited, 1, 0.0), Duration::from_secs(30));
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_full_jitter() {
        let floor = Duration::ZERO;
        assert_eq!(backoff(1, 1.0, floor), Duration::from_secs(1));
        assert_eq!(backoff(2, 1.0, floor), Duration::from_secs(2));
        assert_eq!(backoff(4, 1.0, floor), Duration::from_secs(8));
        assert_eq!(backoff(7, 1.0, floor), Duration::from_secs(60));
        assert_eq!(backoff(40, 1.0, floor), Duration::from_secs(60));
        assert_eq!(backoff(7, 0.5, floor), Duration::from_secs(30));
        assert_eq!(
            backoff(7, 0.0, Duration::from_secs(1)),
            Duration::from_secs(1)
        );
    }
}
