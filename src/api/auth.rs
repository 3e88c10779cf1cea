//! Who may call the API: the bearer tokens of `[[http.token]]` and their scopes.
//!
//! Every route that is not open sits behind [`scoped`], one layer per scope: a request without
//! `Authorization: Bearer <token>`, or with a token that is not configured, is 401; a token
//! without the route's scope is 403. Each refusal counts in `iotfwd_http_auth_refused_total`
//! by token name and reason, never by value. Tokens are compared as SHA-256 digests with
//! [`subtle`]'s constant-time equality, against every configured token each time, so neither
//! the time taken nor the length of a guess tells how close it was.
//!
//! With no `[[http.token]]` the API is anonymous, as it was before tokens: every route is open
//! (config validation allows that only on a loopback `http.listen` unless
//! `http.allow_anonymous = true`).
//!
//! The layer also tells the ingest whether it may take an envelope's identity fields as given
//! ([`crate::source::http::TrustIdentity`]): with a token, only for the scope
//! `ingest:any-identity`; anonymously, only on a loopback listener.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{HttpConfig, Scope};
use crate::source::http::{TrustIdentity, json_error};
use crate::telemetry::Metrics;

/// The tokens the API accepts, with their secrets read (at start: a change needs a restart).
pub struct Auth {
    tokens: Vec<Token>,
    /// Anonymous callers may set an envelope's identity: no tokens, loopback listener.
    anonymous_trusts_identity: bool,
    metrics: Arc<Metrics>,
}

struct Token {
    name: String,
    scopes: Vec<Scope>,
    digest: [u8; 32],
}

/// Why a request was refused; the `reason` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    /// No `Authorization: Bearer` header (401).
    Missing,
    /// A bearer token that is not configured (401).
    Invalid,
    /// A known token without the route's scope (403).
    Scope,
}

impl Auth {
    /// Reads every token's secret (`token_env` / `token_file`). Every entry that cannot be read
    /// is one error naming it; a daemon with any does not start.
    pub fn from_config(http: &HttpConfig, metrics: Arc<Metrics>) -> Result<Auth, Vec<String>> {
        let mut tokens = Vec::new();
        let mut errors = Vec::new();
        for (i, t) in http.token.iter().enumerate() {
            match t.secret(i) {
                Ok(secret) => tokens.push(Token {
                    name: t.name.clone(),
                    scopes: t.scopes.clone(),
                    digest: digest(secret.as_bytes()),
                }),
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Auth {
            anonymous_trusts_identity: http.is_loopback(),
            tokens,
            metrics,
        })
    }

    /// Whether the API asks for tokens at all.
    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// The name of the token a request carries and whether it grants `scope`; else why not.
    fn check(&self, headers: &HeaderMap, scope: Scope) -> Result<TrustIdentity, (Refusal, &str)> {
        if !self.enabled() {
            return Ok(TrustIdentity(self.anonymous_trusts_identity));
        }
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err((Refusal::Missing, "-"));
        };
        let presented = value
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| digest(token.trim().as_bytes()));
        let Some(presented) = presented else {
            return Err((Refusal::Invalid, "-"));
        };
        // Compare with every token, without stopping at a match.
        let mut found = None;
        for token in &self.tokens {
            if bool::from(token.digest.ct_eq(&presented)) {
                found = Some(token);
            }
        }
        let token = found.ok_or((Refusal::Invalid, "-"))?;
        if !token.scopes.iter().any(|s| s.grants(scope)) {
            return Err((Refusal::Scope, &token.name));
        }
        Ok(TrustIdentity(
            token.scopes.contains(&Scope::IngestAnyIdentity),
        ))
    }

    fn refuse(&self, refusal: Refusal, token: &str, scope: Scope) -> Response {
        let reason = match refusal {
            Refusal::Missing => "missing",
            Refusal::Invalid => "invalid",
            Refusal::Scope => "scope",
        };
        self.metrics
            .http_auth_refused
            .with_label_values(&[token, reason])
            .inc();
        match refusal {
            Refusal::Missing | Refusal::Invalid => {
                let message = if refusal == Refusal::Missing {
                    "this route needs a token: send Authorization: Bearer <token> (see docs/security.md)"
                } else {
                    "the bearer token is not one of this daemon's [[http.token]]"
                };
                let mut response = json_error(StatusCode::UNAUTHORIZED, message);
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                response
            }
            Refusal::Scope => json_error(
                StatusCode::FORBIDDEN,
                format!(
                    "token {token:?} lacks the scope {:?} this route needs",
                    scope.as_str()
                ),
            ),
        }
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// `router`'s routes, each asking for a token with `scope` (nothing when no token is
/// configured). A new route needs one line: add it to the router of its scope in
/// [`crate::api::router`].
pub fn scoped<S>(router: Router<S>, scope: Scope, auth: &Arc<Auth>) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    router.route_layer(axum::middleware::from_fn_with_state(
        (Arc::clone(auth), scope),
        require,
    ))
}

async fn require(
    State((auth, scope)): State<(Arc<Auth>, Scope)>,
    mut request: Request,
    next: Next,
) -> Response {
    match auth.check(request.headers(), scope) {
        Ok(trust) => {
            request.extensions_mut().insert(trust);
            next.run(request).await
        }
        Err((refusal, token)) => auth.refuse(refusal, token, scope).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TokenConfig;

    fn auth(listen: &str, tokens: &[(&str, &str, &[Scope])]) -> Auth {
        let dir = tempfile::tempdir().unwrap();
        let mut http = HttpConfig {
            listen: listen.into(),
            ..HttpConfig::default()
        };
        for (name, value, scopes) in tokens {
            let file = dir.path().join(name);
            std::fs::write(&file, format!("{value}\n")).unwrap();
            http.token.push(TokenConfig {
                name: (*name).into(),
                scopes: scopes.to_vec(),
                token_env: None,
                token_file: Some(file),
            });
        }
        Auth::from_config(&http, Arc::new(Metrics::new())).unwrap()
    }

    fn bearer(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, value.parse().unwrap());
        h
    }

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaa";
    const G: &str = "gggggggggggggggggggggggg";

    #[test]
    fn scopes_decide_and_refusals_say_why() {
        let a = auth(
            "0.0.0.0:1",
            &[
                ("reader", A, &[Scope::Read]),
                ("gw", G, &[Scope::IngestAnyIdentity]),
            ],
        );
        assert!(a.enabled());
        let ok = |h: &HeaderMap, s| {
            a.check(h, s)
                .map(|t| t.0)
                .map_err(|(r, n)| (r, n.to_owned()))
        };
        assert_eq!(
            ok(&HeaderMap::new(), Scope::Read),
            Err((Refusal::Missing, "-".into()))
        );
        assert_eq!(
            ok(&bearer("Basic abc"), Scope::Read),
            Err((Refusal::Invalid, "-".into()))
        );
        assert_eq!(
            ok(&bearer(&format!("Bearer {A}x")), Scope::Read),
            Err((Refusal::Invalid, "-".into()))
        );
        assert_eq!(ok(&bearer(&format!("Bearer {A}")), Scope::Read), Ok(false));
        assert_eq!(
            ok(&bearer(&format!("bearer {A}")), Scope::Admin),
            Err((Refusal::Scope, "reader".into()))
        );
        assert_eq!(ok(&bearer(&format!("Bearer {G}")), Scope::Ingest), Ok(true));
        assert_eq!(
            ok(&bearer(&format!("Bearer {A}")), Scope::Ingest),
            Err((Refusal::Scope, "reader".into()))
        );
    }

    #[test]
    fn anonymous_is_open_and_trusts_identity_only_on_loopback() {
        assert_eq!(
            auth("127.0.0.1:8080", &[])
                .check(&HeaderMap::new(), Scope::Admin)
                .map(|t| t.0),
            Ok(true)
        );
        assert_eq!(
            auth("0.0.0.0:8080", &[])
                .check(&HeaderMap::new(), Scope::Ingest)
                .map(|t| t.0),
            Ok(false)
        );
    }

    #[test]
    fn an_unreadable_token_names_its_entry() {
        let http = HttpConfig {
            token: vec![TokenConfig {
                name: "ops".into(),
                scopes: vec![Scope::Admin],
                token_env: Some("IOTFWD_TEST_NO_SUCH_TOKEN_VAR".into()),
                token_file: None,
            }],
            ..HttpConfig::default()
        };
        let errors = Auth::from_config(&http, Arc::new(Metrics::new()))
            .err()
            .unwrap();
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].starts_with("http.token[0] (\"ops\"): token_env"),
            "{errors:?}"
        );
    }
}
