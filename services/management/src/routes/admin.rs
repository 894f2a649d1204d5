//! The tenant admin page ("Email configuration") at `/admin/`: plain HTML, CSS and ES modules
//! from `services/management/admin/`, embedded at compile time (no Node build step). The page
//! talks only to `/api/v1` with the bearer token of its sign-in link
//! (`management-service token --role tenant_admin --tenant acme --open-url`).
//!
//! Every answer carries a strict Content-Security-Policy: scripts, styles and connections only
//! from this origin, no inline script or style, no framing.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};

use crate::routes::method_not_allowed;

/// Where the page is served.
pub const ADMIN_PATH: &str = "/admin/";

/// `script-src 'self'` without `'unsafe-inline'`: the page has no inline script, and an
/// injected one would not run. `connect-src 'self'`: the page talks only to this origin's API.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// The embedded assets: (file name, content type, body).
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("../../admin/index.html"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_str!("../../admin/app.css"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../../admin/app.js"),
    ),
    (
        "api.js",
        "text/javascript; charset=utf-8",
        include_str!("../../admin/api.js"),
    ),
    (
        "favicon.svg",
        "image/svg+xml",
        include_str!("../../admin/favicon.svg"),
    ),
];

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/admin")
            .route(web::get().to(redirect))
            .default_service(web::to(method_not_allowed("GET"))),
    )
    .service(
        web::resource(ADMIN_PATH)
            .route(web::get().to(index))
            .default_service(web::to(method_not_allowed("GET"))),
    )
    .service(
        web::resource("/admin/{file}")
            .route(web::get().to(asset))
            .default_service(web::to(method_not_allowed("GET"))),
    );
}

/// `/admin` → `/admin/`, so that the page's relative asset URLs resolve. The fragment (the
/// sign-in token) never reaches the server; browsers keep it across the redirect.
async fn redirect() -> HttpResponse {
    HttpResponse::PermanentRedirect()
        .insert_header(("Location", ADMIN_PATH))
        .finish()
}

async fn index() -> HttpResponse {
    serve("index.html")
}

async fn asset(file: web::Path<String>) -> HttpResponse {
    serve(&file)
}

fn serve(name: &str) -> HttpResponse {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, content_type, body)) => secured(HttpResponse::Ok())
            .content_type(*content_type)
            // Assets change with the binary: revalidate instead of caching for good.
            .insert_header(("Cache-Control", "no-cache"))
            .body(*body),
        None => secured(HttpResponse::build(StatusCode::NOT_FOUND))
            .content_type("text/plain; charset=utf-8")
            .body("not found"),
    }
}

/// The security headers of every admin-page answer.
fn secured(mut b: actix_web::HttpResponseBuilder) -> actix_web::HttpResponseBuilder {
    b.insert_header(("Content-Security-Policy", CONTENT_SECURITY_POLICY))
        .insert_header(("X-Frame-Options", "DENY"))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .insert_header(("Referrer-Policy", "no-referrer"))
        // The Authorize popup must keep its opener (the page) to report back, also after
        // visiting the provider's origin.
        .insert_header(("Cross-Origin-Opener-Policy", "same-origin-allow-popups"))
        .insert_header(("Cross-Origin-Resource-Policy", "same-origin"))
        .insert_header((
            "Permissions-Policy",
            "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
        ))
        .insert_header(("Strict-Transport-Security", "max-age=31536000"));
    b
}

/// The sign-in link of a token: the page reads the token from the fragment, which browsers
/// never send to a server (nor in `Referer`).
pub fn sign_in_url(public_url: &url::Url, token: &str) -> String {
    format!(
        "{}{ADMIN_PATH}#token={token}",
        public_url.as_str().trim_end_matches('/')
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_in_url_puts_the_token_in_the_fragment() {
        let u = url::Url::parse("https://mail.example.com/").unwrap();
        assert_eq!(
            sign_in_url(&u, "a.b.c"),
            "https://mail.example.com/admin/#token=a.b.c"
        );
        let u = url::Url::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(sign_in_url(&u, "x"), "http://127.0.0.1:8080/admin/#token=x");
    }

    #[test]
    fn no_asset_has_inline_script_or_style() {
        for (name, _, body) in ASSETS {
            if name.ends_with(".html") {
                // every <script> loads a same-origin file; no inline handlers or styles
                for tag in body.split("<script").skip(1) {
                    let open = tag.split('>').next().unwrap_or_default();
                    assert!(open.contains("src="), "{name}: inline <script>");
                    assert!(
                        tag.trim_start_matches(|c| c != '>')
                            .starts_with("></script>"),
                        "{name}: <script> with a body"
                    );
                }
                assert!(!body.contains(" style="), "{name}: inline style");
                assert!(!body.contains("<style"), "{name}: inline <style>");
                assert!(!body.contains(" onclick="), "{name}: inline handler");
            }
        }
    }
}
