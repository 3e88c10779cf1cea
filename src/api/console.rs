//! The console in the browser: `GET /console` and its assets, embedded in the binary.
//!
//! Plain HTML, CSS and JavaScript modules under `src/api/console/`, written by hand: no build
//! step, no CDN, nothing fetched at run time, so the console works offline and a fresh clone
//! builds with cargo alone. The page reads the same JSON API as everyone else (docs/api.md)
//! and holds no data of its own; its routes (`/console/logs`, `/console/trace/ID`,
//! `/console/rules`, `/console/overview`) all serve the same page, which reads its state from
//! the URL. See docs/console.md.

use axum::Router;
use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// Every asset: name under `/console/assets/`, content type, bytes.
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "console.css",
        "text/css; charset=utf-8",
        include_bytes!("console/console.css"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("console/app.js"),
    ),
    (
        "api.js",
        "text/javascript; charset=utf-8",
        include_bytes!("console/api.js"),
    ),
    (
        "util.js",
        "text/javascript; charset=utf-8",
        include_bytes!("console/util.js"),
    ),
    (
        "logs.js",
        "text/javascript; charset=utf-8",
        include_bytes!("console/logs.js"),
    ),
    (
        "trace.js",
        "text/javascript; charset=utf-8",
        include_bytes!("console/trace.js"),
    ),
    (
        "rules.js",
        "text/javascript; charset=utf-8",
        include_bytes!("console/rules.js"),
    ),
    (
        "overview.js",
        "text/javascript; charset=utf-8",
        include_bytes!("console/overview.js"),
    ),
    (
        "chart.js",
        "text/javascript; charset=utf-8",
        include_bytes!("console/chart.js"),
    ),
];

const INDEX: &[u8] = include_bytes!("console/index.html");

/// Only this origin's scripts, styles and API; no inline script; never framed. Record contents
/// are put on the page as text, never as markup, so a payload cannot run code either way.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The console's routes, for any state type.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/console", get(index))
        .route("/console/", get(index))
        .route("/console/assets/{name}", get(asset))
        .route("/console/{*page}", get(index))
}

async fn index() -> Response {
    serve("text/html; charset=utf-8", INDEX)
}

async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, content_type, bytes)) => serve(content_type, bytes),
        None => (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "no such console asset\n",
        )
            .into_response(),
    }
}

fn serve(content_type: &'static str, bytes: &'static [u8]) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            // The binary is the version: revalidate, so an upgrade shows at once.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        bytes,
    )
        .into_response()
}
