//! The chat page at `/` and the client library it loads from `/chorus.js`.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::AppState;

/// The chat page's template (its script imports [`CLIENT_LIBRARY`] from `/chorus.js`).
const PAGE: &str = include_str!("../../static/index.html");
/// Where the gateway's id and fallback URLs go in [`PAGE`].
const SLOT: &str = r#"/*CHORUS_CONFIG*/{"gateway":"?","fallbacks":[]}/*END*/"#;
/// The TypeScript client library (clients/typescript) compiled to one ES module; committed so
/// that cargo needs no Node.js, and checked against its source by `scripts/client-test`.
const CLIENT_LIBRARY: &str = include_str!("../../static/chorus.js");

/// The chat page, with this gateway's id and fallback URLs filled in.
pub(crate) fn chat_page(gateway_id: &str, fallbacks: &[String]) -> String {
    // JSON inside a <script>: escape '<' so no value can close the element.
    let config = serde_json::json!({"gateway": gateway_id, "fallbacks": fallbacks})
        .to_string()
        .replace('<', "\\u003c");
    PAGE.replacen(SLOT, &config, 1)
}

pub(super) async fn page(State(state): State<AppState>) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'",
            ),
        ],
        state.page.to_string(),
    )
        .into_response()
}

pub(super) async fn client_library() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        CLIENT_LIBRARY,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_gets_its_config_and_loads_the_library_from_this_origin() {
        let page = chat_page("gw-1", &["ws://b/ws".to_owned()]);
        assert!(!page.contains(SLOT), "the config slot was filled");
        assert!(page.contains(r#"const CONFIG = {"fallbacks":["ws://b/ws"],"gateway":"gw-1"};"#));
        assert!(page.contains(r#"import { ChorusClient } from "/chorus.js";"#));
        assert!(CLIENT_LIBRARY.contains("export class ChorusClient"));
    }
}
