//! `GET /metrics`: Prometheus text exposition format 0.0.4.
//!
//! Counters live where the events happen (each profile's key slot, the upstream call timings
//! of [`Timed`], the server's [`Requests`], the ledger's open leases); a scrape reads them
//! into plain snapshots ([`ProfileValues`], [`Connections`]) and renders those; nothing is kept
//! here between scrapes. Labels are the profile
//! and provider names only (config-bound, so the series count stays small), never a key id.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::api::State;
use crate::provider::{KeyHandle, ListedKey, MintedKey, Provider, ProviderError, ProviderKind};

/// Upper bounds (seconds) of the upstream latency histogram: provider calls take tens of
/// milliseconds to seconds, and time out at 10 s.
pub const LATENCY_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The provider calls that are timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// Create a key.
    Mint,
    /// Revoke a key.
    Revoke,
    /// List the account's keys.
    List,
    /// Revoke every key of a principal (CoreWeave).
    RevokePrincipal,
}

impl Operation {
    const ALL: [Operation; 4] = [
        Operation::Mint,
        Operation::Revoke,
        Operation::List,
        Operation::RevokePrincipal,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Operation::Mint => "mint",
            Operation::Revoke => "revoke",
            Operation::List => "list",
            Operation::RevokePrincipal => "revoke_principal",
        }
    }
}

/// A latency histogram with the fixed [`LATENCY_BUCKETS`], plus a count of failed calls.
#[derive(Debug, Default)]
struct Histogram {
    /// Per bucket, calls that took at most its bound and more than the previous one; the last
    /// slot holds the calls slower than every bound.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
    count: AtomicU64,
    errors: AtomicU64,
}

impl Histogram {
    fn observe(&self, took: Duration, ok: bool) {
        let secs = took.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Upstream call timings of one profile, per operation.
#[derive(Debug, Default)]
pub struct UpstreamStats {
    ops: [Histogram; Operation::ALL.len()],
}

impl UpstreamStats {
    fn op(&self, op: Operation) -> &Histogram {
        // The variants are declared in the order of `Operation::ALL`.
        &self.ops[op as usize]
    }
}

/// A provider whose every call is timed into an [`UpstreamStats`].
pub struct Timed {
    inner: Arc<dyn Provider>,
    stats: Arc<UpstreamStats>,
}

impl Timed {
    /// Wraps `inner`; its calls are recorded in `stats`.
    pub fn new(inner: Arc<dyn Provider>, stats: Arc<UpstreamStats>) -> Self {
        Timed { inner, stats }
    }

    async fn time<T>(
        &self,
        op: Operation,
        call: impl std::future::Future<Output = Result<T, ProviderError>>,
    ) -> Result<T, ProviderError> {
        let start = Instant::now();
        let result = call.await;
        self.stats.op(op).observe(start.elapsed(), result.is_ok());
        result
    }
}

#[async_trait]
impl Provider for Timed {
    fn kind(&self) -> ProviderKind {
        self.inner.kind()
    }

    fn key_limit(&self) -> Option<usize> {
        self.inner.key_limit()
    }

    fn auth(&self) -> Option<&'static str> {
        self.inner.auth()
    }

    fn revocable(&self) -> bool {
        self.inner.revocable()
    }

    async fn list_keys(&self) -> Result<Vec<ListedKey>, ProviderError> {
        self.time(Operation::List, self.inner.list_keys()).await
    }

    async fn mint(&self, tag: &str, lifetime: Duration) -> Result<MintedKey, ProviderError> {
        self.time(Operation::Mint, self.inner.mint(tag, lifetime))
            .await
    }

    async fn revoke(&self, key: &KeyHandle) -> Result<(), ProviderError> {
        self.time(Operation::Revoke, self.inner.revoke(key)).await
    }

    async fn revoke_principal(&self, principal: &str) -> Result<(), ProviderError> {
        self.time(
            Operation::RevokePrincipal,
            self.inner.revoke_principal(principal),
        )
        .await
    }
}

/// HTTP answers the server gave, by status code. Aligned to its own cache lines: every request
/// adds to it, and it should not slow down the reads of its neighbours in `App`.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Requests {
    counts: [AtomicU64; Requests::CODES.len() + 1],
}

impl Requests {
    /// The codes the server sends; anything else is counted as `other`.
    const CODES: [u16; 10] = [200, 400, 401, 403, 404, 405, 409, 500, 502, 503];

    /// Counts one answer.
    pub fn record(&self, status: u16) {
        let i = Self::CODES
            .iter()
            .position(|&c| c == status)
            .unwrap_or(Self::CODES.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// What one profile contributes to a scrape.
#[derive(Debug)]
pub struct ProfileSample<'a> {
    /// Profile name.
    pub profile: &'a str,
    /// Provider name.
    pub provider: ProviderKind,
    /// Whether keybroker can revoke its keys.
    pub revocable: bool,
    /// Its counters, gauges and state.
    pub values: ProfileValues,
    /// Its upstream call timings.
    pub upstream: &'a UpstreamStats,
}

/// One profile's numbers at the time of a scrape.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProfileValues {
    /// Keys minted (first keys, renewals and rotations).
    pub mints: u64,
    /// Mints that replaced a current key.
    pub renewals: u64,
    /// Keys revoked.
    pub revokes: u64,
    /// Mint attempts that failed.
    pub mint_failures: u64,
    /// Revoke attempts that failed.
    pub revoke_failures: u64,
    /// Answers with a key that had less than `min_remaining` left.
    pub degraded_serves: u64,
    /// Seconds until the served key expires; 0 without one.
    pub key_remaining_seconds: u64,
    /// Replaced keys awaiting revocation.
    pub retired_keys: u64,
    /// Retired keys whose revocation is failing.
    pub failing_revokes: u64,
    /// Creates whose key may exist or still land.
    pub unsettled_creates: u64,
    /// Its state.
    pub state: State,
}

/// Renders a scrape.
pub fn render(
    profiles: &[ProfileSample<'_>],
    requests: &Requests,
    connections: Connections,
    ledger_backlog: Option<usize>,
) -> String {
    let mut out = String::with_capacity(4096);
    render_profiles(&mut out, profiles);
    render_upstream(&mut out, profiles);
    render_server(&mut out, requests, connections, ledger_backlog);
    out
}

/// A profile's labels.
fn labels(p: &ProfileSample<'_>) -> String {
    format!(
        "profile=\"{}\",provider=\"{}\"",
        escape(p.profile),
        p.provider
    )
}

/// Each profile's counters, gauges and state.
fn render_profiles(out: &mut String, profiles: &[ProfileSample<'_>]) {
    type Pick = fn(&ProfileValues) -> u64;
    let per_profile: [(&str, &str, &str, Pick); 10] = [
        (
            "keybroker_mints_total",
            "Keys minted (first keys, renewals and rotations).",
            "counter",
            |v| v.mints,
        ),
        (
            "keybroker_renewals_total",
            "Mints that replaced a current key.",
            "counter",
            |v| v.renewals,
        ),
        ("keybroker_revokes_total", "Keys revoked.", "counter", |v| {
            v.revokes
        }),
        (
            "keybroker_mint_failures_total",
            "Mint attempts that failed.",
            "counter",
            |v| v.mint_failures,
        ),
        (
            "keybroker_revoke_failures_total",
            "Revoke attempts that failed.",
            "counter",
            |v| v.revoke_failures,
        ),
        (
            "keybroker_degraded_serves_total",
            "Requests answered with a key that has less than min_remaining left.",
            "counter",
            |v| v.degraded_serves,
        ),
        (
            "keybroker_key_remaining_seconds",
            "Seconds until the served key of the profile expires; 0 when it has none.",
            "gauge",
            |v| v.key_remaining_seconds,
        ),
        (
            "keybroker_retired_keys",
            "Replaced keys still valid, awaiting revocation at their expiry.",
            "gauge",
            |v| v.retired_keys,
        ),
        (
            "keybroker_failing_revokes",
            "Retired keys whose revocation failed, retried (status names them and the provider's words).",
            "gauge",
            |v| v.failing_revokes,
        ),
        (
            "keybroker_unsettled_creates",
            "Creates whose key may exist or still land, looked for by their tag.",
            "gauge",
            |v| v.unsettled_creates,
        ),
    ];
    for (name, help, kind, pick) in per_profile {
        header(out, name, help, kind);
        for p in profiles {
            let _ = writeln!(out, "{name}{{{}}} {}", labels(p), pick(&p.values));
        }
    }
    header(
        out,
        "keybroker_profile_revocable",
        "1 if keybroker can revoke the profile's keys, 0 if they are left to expire (CoreWeave Workload Identity without token_file).",
        "gauge",
    );
    for p in profiles {
        let _ = writeln!(
            out,
            "keybroker_profile_revocable{{{}}} {}",
            labels(p),
            u8::from(p.revocable)
        );
    }
    header(
        out,
        "keybroker_profile_state",
        "1 for the state the profile is in, 0 for the others.",
        "gauge",
    );
    for p in profiles {
        for state in State::ALL {
            let _ = writeln!(
                out,
                "keybroker_profile_state{{{},state=\"{state}\"}} {}",
                labels(p),
                u8::from(p.values.state == state)
            );
        }
    }
}

/// Each profile's provider calls: latency histograms and errors, by operation.
fn render_upstream(out: &mut String, profiles: &[ProfileSample<'_>]) {
    let name = "keybroker_upstream_request_duration_seconds";
    header(
        out,
        name,
        "Provider API calls by operation, successful or not.",
        "histogram",
    );
    for p in profiles {
        for op in Operation::ALL {
            let h = p.upstream.op(op);
            let l = format!("{},operation=\"{}\"", labels(p), op.as_str());
            let mut cumulative = 0;
            for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
                cumulative += h.buckets[i].load(Ordering::Relaxed);
                let _ = writeln!(out, "{name}_bucket{{{l},le=\"{bound}\"}} {cumulative}");
            }
            cumulative += h.buckets[LATENCY_BUCKETS.len()].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{l},le=\"+Inf\"}} {cumulative}");
            let sum = h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
            let _ = writeln!(out, "{name}_sum{{{l}}} {sum}");
            let _ = writeln!(out, "{name}_count{{{l}}} {cumulative}");
        }
    }
    header(
        out,
        "keybroker_upstream_errors_total",
        "Provider API calls that failed, by operation.",
        "counter",
    );
    for p in profiles {
        for op in Operation::ALL {
            let _ = writeln!(
                out,
                "keybroker_upstream_errors_total{{{},operation=\"{}\"}} {}",
                labels(p),
                op.as_str(),
                p.upstream.op(op).errors.load(Ordering::Relaxed)
            );
        }
    }
}

/// The server's answers and connections, and the ledger's open leases.
fn render_server(
    out: &mut String,
    requests: &Requests,
    connections: Connections,
    ledger_backlog: Option<usize>,
) {
    header(
        out,
        "keybroker_http_responses_total",
        "Answers on the socket and the container endpoint, by HTTP status.",
        "counter",
    );
    for (i, count) in requests.counts.iter().enumerate() {
        let code = Requests::CODES
            .get(i)
            .map_or("other".to_string(), u16::to_string);
        let _ = writeln!(
            out,
            "keybroker_http_responses_total{{code=\"{code}\"}} {}",
            count.load(Ordering::Relaxed)
        );
    }
    for (name, help, kind, value) in [
        (
            "keybroker_connections_open",
            "Connections open on the socket and the container endpoint.",
            "gauge",
            connections.open as u64,
        ),
        (
            "keybroker_connections_limit",
            "The most connections open at once: the open-file limit less a reserve. One uid (or the container endpoint) holds at most a quarter.",
            "gauge",
            connections.limit as u64,
        ),
        (
            "keybroker_connections_refused_total",
            "Connections closed as soon as accepted, their uid (or the container endpoint) holding its share, or the daemon its limit.",
            "counter",
            connections.refused,
        ),
    ] {
        header(out, name, help, kind);
        let _ = writeln!(out, "{name} {value}");
    }
    if let Some(backlog) = ledger_backlog {
        header(
            out,
            "keybroker_ledger_backlog",
            "Leases in the ledger not yet closed by a revocation: keys alive, and creates whose outcome is not known yet. A restart revokes them all.",
            "gauge",
        );
        let _ = writeln!(out, "keybroker_ledger_backlog {backlog}");
    }
}

/// The server's connections, counted.
#[derive(Debug, Clone, Copy, Default)]
pub struct Connections {
    /// Open now.
    pub open: usize,
    /// The most open at once.
    pub limit: usize,
    /// Closed as soon as accepted, since start.
    pub refused: u64,
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value with `\`, `"` and newlines escaped (profile names are restricted by config
/// validation already; this keeps the format valid whatever they become).
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_errors_counted() {
        let stats = UpstreamStats::default();
        let h = stats.op(Operation::Mint);
        h.observe(Duration::from_millis(3), true);
        h.observe(Duration::from_millis(30), true);
        h.observe(Duration::from_secs(30), false);
        let out = render(
            &[ProfileSample {
                profile: "p",
                provider: ProviderKind::Dev,
                revocable: true,
                values: ProfileValues {
                    state: State::Ready,
                    ..ProfileValues::default()
                },
                upstream: &stats,
            }],
            &Requests::default(),
            Connections {
                open: 3,
                limit: 896,
                refused: 7,
            },
            Some(2),
        );
        let line = |s: &str| out.lines().any(|l| l == s);
        let l = "profile=\"p\",provider=\"dev\",operation=\"mint\"";
        assert!(
            line(&format!(
                "keybroker_upstream_request_duration_seconds_bucket{{{l},le=\"0.005\"}} 1"
            )),
            "{out}"
        );
        assert!(
            line(&format!(
                "keybroker_upstream_request_duration_seconds_bucket{{{l},le=\"0.05\"}} 2"
            )),
            "{out}"
        );
        assert!(
            line(&format!(
                "keybroker_upstream_request_duration_seconds_bucket{{{l},le=\"10\"}} 2"
            )),
            "{out}"
        );
        assert!(
            line(&format!(
                "keybroker_upstream_request_duration_seconds_bucket{{{l},le=\"+Inf\"}} 3"
            )),
            "{out}"
        );
        assert!(
            line(&format!(
                "keybroker_upstream_request_duration_seconds_count{{{l}}} 3"
            )),
            "{out}"
        );
        assert!(
            line(&format!("keybroker_upstream_errors_total{{{l}}} 1")),
            "{out}"
        );
        assert!(line("keybroker_ledger_backlog 2"), "{out}");
        assert!(line("keybroker_connections_open 3"), "{out}");
        assert!(line("keybroker_connections_limit 896"), "{out}");
        assert!(line("keybroker_connections_refused_total 7"), "{out}");
        assert!(
            line("keybroker_profile_state{profile=\"p\",provider=\"dev\",state=\"ready\"} 1"),
            "{out}"
        );
    }

    #[test]
    fn each_operation_indexes_its_own_histogram() {
        for (i, op) in Operation::ALL.iter().enumerate() {
            assert_eq!(*op as usize, i);
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
