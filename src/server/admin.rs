//! The admin calls: `POST /v1/admin/{rotate,revoke,revoke-principal}/{profile}`, for root and
//! the daemon's user.

use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use super::{error_response, forbidden, json_ok, unknown_profile, App, Body, Peer};
use crate::api::{PrincipalRequest, RevokeAnswer, RotateAnswer};

/// How long an admin call waits for the provider (a rotation's mint, a revocation) before
/// answering; what is under way goes on in the background.
pub const ADMIN_WAIT: Duration = Duration::from_secs(30);

/// The largest request body read (the admin calls' JSON).
const MAX_BODY: usize = 4096;

/// `POST /v1/admin/{rotate,revoke,revoke-principal}/{profile}`: root and the daemon's user only.
pub(super) async fn admin(
    app: &App,
    peer: Peer,
    action: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    if !app.access.load().is_admin(peer) {
        return forbidden(peer, "admin calls are for root and the daemon's user");
    }
    let Some((action, profile)) = action.split_once('/') else {
        return error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            "admin calls are POST /v1/admin/{rotate,revoke,revoke-principal}/PROFILE",
        );
    };
    let Some(slot) = app.broker.slot(profile) else {
        return unknown_profile(profile);
    };
    let upstream_failed =
        |message: &str| error_response(StatusCode::BAD_GATEWAY, "upstream_failed", message);
    if matches!(action, "revoke" | "revoke-principal") && !slot.provider().revocable() {
        return error_response(
            StatusCode::BAD_REQUEST,
            "not_supported",
            &format!("profile {profile} has no token_file, so keybroker cannot revoke its keys: they expire by themselves within its lifetime. Revoke them in the Cloud Console (Object Storage, Access Keys), or give the profile a token_file and reload"),
        );
    }
    match action {
        "rotate" => match slot.rotate(ADMIN_WAIT).await {
            Ok(rotated) => json_ok(&RotateAnswer {
                profile: profile.to_string(),
                rotated,
            }),
            Err(message) => upstream_failed(&message),
        },
        "revoke" => revoked_answer(profile, None, slot.revoke_all(ADMIN_WAIT).await),
        "revoke-principal" => {
            if slot.provider().kind() != crate::provider::ProviderKind::Coreweave {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "not_supported",
                    &format!(
                        "profile {profile} uses {}, which has no call that revokes a principal's keys; only coreweave does. keybroker revoke {profile} revokes the keys keybroker minted",
                        slot.provider().kind()
                    ),
                );
            }
            let principal = match read_principal(req).await {
                Ok(p) => p,
                Err(message) => {
                    return error_response(StatusCode::BAD_REQUEST, "bad_request", &message)
                }
            };
            tracing::warn!(profile, principal = %principal, "an operator is revoking every key of a principal");
            let call =
                tokio::time::timeout(ADMIN_WAIT, slot.provider().revoke_principal(&principal))
                    .await;
            match call {
                Ok(Ok(())) => {
                    tracing::warn!(profile, principal = %principal, "revoked every key of the principal");
                    // Its keys may be among them: drop and hold them too, until a rotate.
                    revoked_answer(profile, Some(&principal), slot.revoke_all(ADMIN_WAIT).await)
                }
                Ok(Err(e)) => upstream_failed(&format!(
                    "revoking the keys of principal {principal} failed: {e}"
                )),
                Err(_) => upstream_failed(&format!(
                    "the CoreWeave API did not answer within {}s; the keys of principal {principal} may or may not be revoked: run the command again",
                    ADMIN_WAIT.as_secs()
                )),
            }
        }
        _ => error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no admin call {action:?}; there are rotate, revoke and revoke-principal"),
        ),
    }
}

/// The `{"principal": "..."}` of a revoke-principal call.
async fn read_principal(req: Request<Incoming>) -> Result<String, String> {
    use http_body_util::BodyExt;
    let body = http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| format!("reading the request body: {e}"))?
        .to_bytes();
    let request: PrincipalRequest = serde_json::from_slice(&body)
        .map_err(|e| format!("the body must be JSON {{\"principal\": \"coreweave/...\"}}: {e}"))?;
    match request.principal.trim() {
        "" => Err("the body must name the principal: {\"principal\": \"coreweave/...\"}".into()),
        p => Ok(p.to_string()),
    }
}

/// The answer to a revoke: 200 when every key is gone, else 502 naming the ones that are not.
fn revoked_answer(
    profile: &str,
    principal: Option<&str>,
    outcome: crate::broker::RevokedKeys,
) -> Response<Body> {
    if outcome.failed.is_empty() {
        return json_ok(&RevokeAnswer {
            profile: profile.to_string(),
            revoked: outcome.revoked,
            principal: principal.map(str::to_string),
        });
    }
    let failed: Vec<String> = outcome
        .failed
        .iter()
        .map(|(id, why)| format!("{id} ({why})"))
        .collect();
    error_response(
        StatusCode::BAD_GATEWAY,
        "revoke_failed",
        &format!(
            "profile {profile}: revoked {} key(s); could not revoke {}; keybroker keeps retrying in the background, and the profile serves no key until keybroker rotate {profile}",
            outcome.revoked.len(),
            failed.join(", ")
        ),
    )
}
