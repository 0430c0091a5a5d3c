//! Wall-clock time, injectable so that paused-time tests can run a day in milliseconds.
//!
//! Provider expiries are wall-clock timestamps, but tokio's paused clock only moves
//! `tokio::time::Instant`. [`Clock::Tokio`] derives a wall clock from tokio's clock so that the
//! broker, the providers and the test fakes all agree on "now" when time is paused.

use std::time::Duration;
use time::OffsetDateTime;

/// Where "now" comes from.
#[derive(Clone, Debug)]
pub enum Clock {
    /// The system's real-time clock (production).
    System,
    /// A wall clock that advances with tokio's (possibly paused) clock, starting at `wall`
    /// when tokio's clock read `at`.
    Tokio {
        /// The wall time at `at`.
        wall: OffsetDateTime,
        /// The tokio instant matching `wall`.
        at: tokio::time::Instant,
    },
}

impl Clock {
    /// A clock that follows tokio time from the current real time on. Call it inside a runtime.
    pub fn tokio() -> Self {
        Clock::Tokio {
            wall: OffsetDateTime::now_utc(),
            at: tokio::time::Instant::now(),
        }
    }

    /// The current wall-clock time, UTC.
    pub fn now(&self) -> OffsetDateTime {
        match self {
            Clock::System => OffsetDateTime::now_utc(),
            Clock::Tokio { wall, at } => *wall + at.elapsed(),
        }
    }

    /// How long until `when`, zero if it has passed.
    pub fn until(&self, when: OffsetDateTime) -> Duration {
        positive(when - self.now())
    }

    /// The tokio instant at which the wall clock reads `when` (now if it has passed).
    pub fn instant_at(&self, when: OffsetDateTime) -> tokio::time::Instant {
        tokio::time::Instant::now() + self.until(when)
    }
}

/// A signed `time::Duration` as a std one, negative clamped to zero.
pub fn positive(d: time::Duration) -> Duration {
    Duration::try_from(d).unwrap_or(Duration::ZERO)
}
