//! The control API's bearer token: every request that may change something (any method but
//! GET and HEAD) must carry `Authorization: Bearer <control.token>`; reads (health, metrics,
//! status, lists) stay open so that monitoring needs no secret. Missing or malformed header:
//! 401 (with `WWW-Authenticate: Bearer`); a wrong token: 403. An empty configured token turns
//! the check off, which is meant for development only.

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{header, Method, StatusCode};
use actix_web::middleware::Next;
use actix_web::{web, HttpResponse};

use super::ErrorBody;

/// The configured token, as app data of the control API.
pub struct ControlToken(pub String);

/// Compares without an early exit, so the time taken does not tell how much of a guess was
/// right.
fn tokens_equal(presented: &[u8], expected: &[u8]) -> bool {
    if presented.len() != expected.len() {
        return false;
    }
    presented
        .iter()
        .zip(expected)
        .fold(0u8, |difference, (a, b)| difference | (a ^ b))
        == 0
}

/// What the check decides for one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Missing,
    Wrong,
}

/// The rule of the module doc, on plain values (tested without a server).
pub fn check(method: &Method, authorization: Option<&[u8]>, token: &str) -> Verdict {
    if token.is_empty() || method == Method::GET || method == Method::HEAD {
        return Verdict::Allowed;
    }
    let Some(value) = authorization else {
        return Verdict::Missing;
    };
    let Some(presented) = value
        .strip_prefix(b"Bearer ")
        .or_else(|| value.strip_prefix(b"bearer "))
    else {
        return Verdict::Missing;
    };
    if tokens_equal(presented.trim_ascii(), token.as_bytes()) {
        Verdict::Allowed
    } else {
        Verdict::Wrong
    }
}

/// actix-web middleware (`middleware::from_fn(require_token)`) applying [`check`].
pub async fn require_token(
    request: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let token = request
        .app_data::<web::Data<ControlToken>>()
        .map(|token| token.0.clone())
        .unwrap_or_default();
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|value| value.as_bytes().to_vec());
    let refusal = match check(request.method(), authorization.as_deref(), &token) {
        Verdict::Allowed => None,
        Verdict::Missing => Some(
            HttpResponse::build(StatusCode::UNAUTHORIZED)
                .insert_header((header::WWW_AUTHENTICATE, "Bearer"))
                .json(ErrorBody {
                    error: "this request changes the cluster and needs \
                            'Authorization: Bearer <token>' (control.token)"
                        .to_string(),
                }),
        ),
        Verdict::Wrong => Some(HttpResponse::build(StatusCode::FORBIDDEN).json(ErrorBody {
            error: "the bearer token is not this cluster's control.token".to_string(),
        })),
    };
    match refusal {
        Some(response) => Ok(request.into_response(response).map_into_right_body()),
        None => next
            .call(request)
            .await
            .map(ServiceResponse::map_into_left_body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_need_the_token_reads_do_not() {
        let token = "s3cret";
        assert_eq!(check(&Method::GET, None, token), Verdict::Allowed);
        assert_eq!(check(&Method::POST, None, token), Verdict::Missing);
        assert_eq!(
            check(&Method::POST, Some(b"Basic abc"), token),
            Verdict::Missing
        );
        assert_eq!(
            check(&Method::DELETE, Some(b"Bearer s3cre"), token),
            Verdict::Wrong
        );
        assert_eq!(
            check(&Method::PUT, Some(b"Bearer s3cret"), token),
            Verdict::Allowed
        );
        assert_eq!(check(&Method::POST, None, ""), Verdict::Allowed);
    }
}
