//! One pacer per provider endpoint and credential: every call to it (creates, revokes,
//! listings, exchanges, of every profile using it) waits for a place among at most `limit`
//! calls in flight. The limit adapts to the provider, additive increase, multiplicative
//! decrease: a 429 halves it (once per round of calls in flight), and each answer that is not
//! a 429 adds 1/limit, up to `upstream_concurrency`. So a provider's rate limit slows the
//! whole endpoint at once instead of each profile finding it out by itself.
//!
//! Calls wait in arrival order, except that a call made while a client waits for its
//! profile's key goes first: the slot's driver runs its mint inside [`URGENT`], a check the
//! pacer asks again each time a place opens.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::oneshot;

/// Whether the calls of the current task are for a client waiting now.
pub type Urgency = Arc<dyn Fn() -> bool + Send + Sync>;

tokio::task_local! {
    /// Set around a mint by the slot's driver: whether a client waits for it.
    pub static URGENT: Urgency;
}

/// The pacer of one endpoint and credential.
pub struct Pacer {
    max: usize,
    state: Mutex<State>,
}

struct State {
    /// The adaptive limit on calls in flight, in `1.0..=max`.
    limit: f64,
    in_flight: usize,
    waiting: VecDeque<Waiter>,
    /// When the limit was last halved: a 429 to a call sent before then is the same congestion.
    decreased_at: Option<Instant>,
    /// Highest number of calls in flight at once, for tests and status.
    peak: usize,
}

struct Waiter {
    urgent: Option<Urgency>,
    grant: oneshot::Sender<Permit>,
}

/// A place among the calls in flight, given back when dropped.
pub struct Permit {
    pacer: Option<Arc<Pacer>>,
    sent_at: Instant,
}

impl std::fmt::Debug for Pacer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.lock();
        f.debug_struct("Pacer")
            .field("max", &self.max)
            .field("limit", &st.limit)
            .field("in_flight", &st.in_flight)
            .finish()
    }
}

impl Pacer {
    /// A pacer allowing at most `max` calls in flight (at least 1), starting at `max`.
    pub fn new(max: usize) -> Arc<Self> {
        let max = max.max(1);
        Arc::new(Pacer {
            max,
            state: Mutex::new(State {
                limit: max as f64,
                in_flight: 0,
                waiting: VecDeque::new(),
                decreased_at: None,
                peak: 0,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("pacer lock poisoned")
    }

    /// Waits for a place, ahead of the queue when [`URGENT`] says a client waits.
    pub async fn acquire(self: &Arc<Self>) -> Permit {
        let urgent = URGENT.try_with(Arc::clone).ok();
        let rx = {
            let mut st = self.lock();
            if st.waiting.is_empty() && st.in_flight < st.allowed() {
                return self.admit(&mut st);
            }
            let (grant, rx) = oneshot::channel();
            st.waiting.push_back(Waiter { urgent, grant });
            rx
        };
        // The pacer outlives its waiters and sends every one a permit or drops it whole.
        rx.await.expect("the pacer answers every waiter")
    }

    /// Counts a call in and hands out its permit.
    fn admit(self: &Arc<Self>, st: &mut State) -> Permit {
        st.in_flight += 1;
        st.peak = st.peak.max(st.in_flight);
        Permit {
            pacer: Some(Arc::clone(self)),
            sent_at: Instant::now(),
        }
    }

    /// Hands the open places to waiters: urgent ones first, then in arrival order. A waiter
    /// that gave up is skipped.
    fn grant(self: &Arc<Self>, st: &mut State) {
        while st.in_flight < st.allowed() && !st.waiting.is_empty() {
            let next = st
                .waiting
                .iter()
                .position(|w| w.urgent.as_ref().is_some_and(|u| u()))
                .unwrap_or(0);
            let waiter = st.waiting.remove(next).expect("index within the queue");
            let permit = self.admit(st);
            if let Err(mut unwanted) = waiter.grant.send(permit) {
                // Given back here, under the lock the drop would take.
                unwanted.pacer = None;
                st.in_flight -= 1;
            }
        }
    }

    /// The answer to a call was a 429: halve the limit, unless a call sent after the last
    /// halving is not the one answered.
    pub fn throttled(&self, permit: &Permit) {
        let mut st = self.lock();
        if st.decreased_at.is_some_and(|at| permit.sent_at < at) {
            return;
        }
        st.limit = (st.limit / 2.0).max(1.0);
        st.decreased_at = Some(Instant::now());
        tracing::debug!(
            limit = st.limit,
            "upstream rate limit: fewer calls in flight"
        );
    }

    /// The provider answered without a 429: one more call in flight after `limit` of them.
    pub fn answered(self: &Arc<Self>) {
        let mut st = self.lock();
        st.limit = (st.limit + 1.0 / st.limit).min(self.max as f64);
        self.grant(&mut st);
    }

    /// The current limit on calls in flight and the highest number seen in flight at once.
    pub fn snapshot(&self) -> (f64, usize) {
        let st = self.lock();
        (st.limit, st.peak)
    }
}

impl State {
    fn allowed(&self) -> usize {
        self.limit as usize
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(pacer) = self.pacer.take() {
            let mut st = pacer.lock();
            st.in_flight -= 1;
            pacer.grant(&mut st);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn at_most_the_limit_is_in_flight_and_urgent_calls_go_first() {
        let pacer = Pacer::new(2);
        let a = pacer.acquire().await;
        let b = pacer.acquire().await;
        assert_eq!(pacer.lock().in_flight, 2);
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (name, urgent) in [("plain-1", false), ("plain-2", false), ("urgent", true)] {
            let (pacer, order) = (Arc::clone(&pacer), Arc::clone(&order));
            let call = async move {
                let _permit = pacer.acquire().await;
                order.lock().unwrap().push(name);
            };
            let flag: Urgency = Arc::new(move || urgent);
            tasks.push(tokio::spawn(URGENT.scope(flag, call)));
            tokio::task::yield_now().await;
        }
        assert_eq!(pacer.lock().waiting.len(), 3);
        drop(a);
        drop(b);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["urgent", "plain-1", "plain-2"]);
        assert_eq!(pacer.snapshot().1, 2);
    }

    #[tokio::test]
    async fn a_429_halves_the_limit_once_per_round_and_answers_raise_it() {
        let pacer = Pacer::new(8);
        let first = pacer.acquire().await;
        let second = pacer.acquire().await;
        pacer.throttled(&first);
        assert_eq!(pacer.snapshot().0, 4.0);
        // Sent before the halving: the same congestion, not another halving.
        pacer.throttled(&second);
        assert_eq!(pacer.snapshot().0, 4.0);
        let third = pacer.acquire().await;
        pacer.throttled(&third);
        assert_eq!(pacer.snapshot().0, 2.0);
        // Additive: about one more per `limit` answers (2 + 1/2 + 1/2.5).
        pacer.answered();
        pacer.answered();
        assert!(
            (pacer.snapshot().0 - 2.9).abs() < 1e-9,
            "{:?}",
            pacer.snapshot()
        );
        for _ in 0..100 {
            pacer.answered();
        }
        assert_eq!(pacer.snapshot().0, 8.0);
        drop((first, second, third));
        assert_eq!(pacer.lock().in_flight, 0);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_loses_its_place_not_the_pacers() {
        let pacer = Pacer::new(1);
        let held = pacer.acquire().await;
        let p = Arc::clone(&pacer);
        let waiting = tokio::spawn(async move { p.acquire().await });
        tokio::task::yield_now().await;
        waiting.abort();
        let _ = waiting.await;
        drop(held);
        assert_eq!(pacer.lock().in_flight, 0);
        let _again = pacer.acquire().await;
        assert_eq!(pacer.lock().in_flight, 1);
    }
}
