//! What the daemon reports about itself: `/readyz`, `/v1/status` and `/metrics`.

use bytes::Bytes;
use http::{Response, StatusCode};

use super::{json_body, json_response, App, Body};
use crate::api::{ProfileStatus, Readiness, SlotStatus, StatusAnswer};

/// `GET /readyz`: 200 `{"ready": true}` when every prewarmed profile has a key it would serve
/// now, else 503 naming those that have none and why. For any peer that can connect: it tells
/// profile names and states, never a key id.
pub(super) fn readiness(app: &App) -> Response<Body> {
    let profiles = app.broker.not_ready();
    let ready = profiles.is_empty();
    let body = json_body(&Readiness { ready, profiles });
    if ready {
        return json_response(StatusCode::OK, body);
    }
    json_response(StatusCode::SERVICE_UNAVAILABLE, body)
}

pub(super) fn metrics_body(app: &App) -> String {
    let slots = app.broker.slots();
    let statuses: Vec<_> = slots.iter().map(|(_, slot)| slot.status()).collect();
    let samples: Vec<_> = slots
        .iter()
        .zip(&statuses)
        .map(|((name, slot), status)| crate::metrics::ProfileSample {
            profile: name,
            provider: slot.provider().kind(),
            revocable: slot.provider().revocable(),
            values: status.into(),
            upstream: slot.upstream(),
        })
        .collect();
    crate::metrics::render(
        &samples,
        &app.requests,
        app.limits.snapshot(),
        app.broker.ledger_backlog(),
    )
}

/// A profile's status, in the numbers `/metrics` shows.
impl From<&SlotStatus> for crate::metrics::ProfileValues {
    fn from(status: &SlotStatus) -> Self {
        let c = &status.counters;
        crate::metrics::ProfileValues {
            mints: c.mints,
            renewals: c.renewals,
            revokes: c.revokes,
            mint_failures: c.mint_failures,
            revoke_failures: c.revoke_failures,
            degraded_serves: c.degraded_serves,
            key_remaining_seconds: status.expires_in_seconds.unwrap_or(0).max(0) as u64,
            retired_keys: status.retired_keys as u64,
            failing_revokes: status.failing_revokes.len() as u64,
            unsettled_creates: status.unsettled_creates.len() as u64,
            state: status.state,
        }
    }
}

/// The body of `GET /v1/status`, of every profile or of those in `only` (`?profiles=a,b`); the
/// error lists names in `only` that are not profiles.
pub(super) fn status_body(app: &App, only: Option<&[&str]>) -> Result<Bytes, Vec<String>> {
    let slots = app.broker.slots();
    if let Some(only) = only {
        let unknown: Vec<String> = only
            .iter()
            .filter(|n| !slots.iter().any(|(name, _)| name == *n))
            .map(|n| n.to_string())
            .collect();
        if !unknown.is_empty() {
            return Err(unknown);
        }
    }
    let profiles = slots
        .iter()
        .filter(|(name, _)| only.is_none_or(|only| only.contains(&name.as_str())))
        .map(|(name, slot)| ProfileStatus {
            name: name.to_string(),
            provider: slot.provider().kind().to_string(),
            auth: slot.provider().auth().map(str::to_string),
            revocable: slot.provider().revocable(),
            container_token_file: app
                .container
                .as_ref()
                .and_then(|t| t.file(name))
                .map(|file| file.display().to_string()),
            slot: slot.status(),
        })
        .collect();
    Ok(json_body(&StatusAnswer {
        version: env!("CARGO_PKG_VERSION").to_string(),
        profiles,
    }))
}
