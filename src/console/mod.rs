//! The operations console at `/console` on the ops listener: server-rendered pages (overview,
//! parked jobs, trace, routes) behind the admin token, with assets compiled into the binary.
//! It calls the same queue, ledger and control functions as the admin API and renders every
//! value escaped; it never shows an unmasked e-mail, an API key or a token.

mod html;
mod overview;
mod parked;
mod routes;
mod session;
mod trace;

use crate::inbound::AppState;
use crate::queue::QueueStats;
use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use secrecy::ExposeSecret;
use session::{Session, SessionKey};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub use html::esc;

/// How often the process samples its queue for the overview and its chart.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(10);
/// Samples kept: one hour at [`SAMPLE_INTERVAL`].
pub const HISTORY: usize = 360;
/// Largest console form body.
const MAX_FORM_BYTES: usize = 256 * 1024;

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");

/// Nothing is loaded from elsewhere, nothing runs inline, no page can be framed.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The console's memory in this process: recent samples and the sessions logged out.
#[derive(Default)]
pub struct Console {
    history: Mutex<VecDeque<Sample>>,
    /// Nonces of sessions logged out here, until they would have expired anyway.
    revoked: Mutex<HashMap<String, i64>>,
}

impl Console {
    pub fn new() -> Self {
        Self::default()
    }

    /// Keep `sample`, forgetting the oldest beyond [`HISTORY`].
    pub fn record(&self, sample: Sample) {
        let mut h = self.history.lock().expect("console lock");
        if h.len() == HISTORY {
            h.pop_front();
        }
        h.push_back(sample);
    }

    /// Every sample kept, oldest first.
    pub fn history(&self) -> Vec<Sample> {
        self.history
            .lock()
            .expect("console lock")
            .iter()
            .cloned()
            .collect()
    }

    fn revoke(&self, session: &Session) {
        let now = now_secs();
        let mut r = self.revoked.lock().expect("console lock");
        r.retain(|_, expires| *expires > now);
        r.insert(session.nonce.clone(), session.expires_at);
    }

    fn is_revoked(&self, session: &Session) -> bool {
        self.revoked
            .lock()
            .expect("console lock")
            .contains_key(&session.nonce)
    }
}

/// One reading of the queue, the ledger and this process's counters.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at_ms: i64,
    /// `None` when the queue did not answer.
    pub stats: Option<QueueStats>,
    pub queue_writable: bool,
    pub ledger: LedgerHealth,
    /// Per route: notifications stored and jobs delivered, since this process started.
    pub counters: BTreeMap<String, (u64, u64)>,
}

/// Whether the ledger answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedgerHealth {
    /// None is kept (off, or RabbitMQ without `ledger.url`).
    Off,
    Answers,
    Failing,
}

/// Read the queue, the ledger and the counters once (bounded by timeouts).
pub async fn sample(state: &AppState) -> Sample {
    let limit = Duration::from_secs(3);
    let stats = match tokio::time::timeout(limit, state.queue.stats()).await {
        Ok(Ok(s)) => Some(s),
        _ => None,
    };
    let queue_writable = matches!(
        tokio::time::timeout(limit, state.queue.check_writable()).await,
        Ok(Ok(()))
    );
    let ledger = if !state.queue.keeps_ledger() {
        LedgerHealth::Off
    } else {
        match tokio::time::timeout(limit, state.queue.ledger_oldest_ms()).await {
            Ok(Ok(_)) => LedgerHealth::Answers,
            _ => LedgerHealth::Failing,
        }
    };
    let counters = route_counters(state);
    Sample {
        at_ms: crate::queue::now_ms(),
        stats,
        queue_writable,
        ledger,
        counters,
    }
}

/// Per route: notifications stored and jobs delivered (done or user not found) so far.
fn route_counters(state: &AppState) -> BTreeMap<String, (u64, u64)> {
    state
        .settings
        .routes
        .iter()
        .map(|r| {
            let name = r.name.as_str();
            let stored = state
                .metrics
                .counter("relay_ingest_notifications_total", &[("route", name)]);
            let delivered = ["done", "user_not_found"]
                .iter()
                .map(|o| {
                    state.metrics.counter(
                        "relay_deliveries_total",
                        &[
                            ("route", name),
                            ("action", r.action.as_str()),
                            ("outcome", o),
                        ],
                    )
                })
                .sum();
            (r.name.clone(), (stored, delivered))
        })
        .collect()
}

/// Sample every [`SAMPLE_INTERVAL`] until `stop`, into the state's console.
pub async fn sample_until_stopped(state: AppState, stop: CancellationToken) {
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let s = sample(&state).await;
        state.console.record(s);
    }
}

/// Mount `/console` (wherever `/admin` is mounted).
pub fn configure(cfg: &mut web::ServiceConfig) {
    let headers = actix_web::middleware::DefaultHeaders::new()
        .add((header::CONTENT_SECURITY_POLICY, CSP))
        .add((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .add((header::X_FRAME_OPTIONS, "DENY"))
        // Not `no-referrer`: under it browsers send `Origin: null`, which the CSRF check refuses.
        .add((header::REFERRER_POLICY, "same-origin"))
        .add((header::CACHE_CONTROL, "no-store"));
    cfg.service(
        web::scope("/console")
            .wrap(headers)
            .route("", web::get().to(home))
            .route("/", web::get().to(home))
            .route("/login", web::get().to(login_page))
            .route("/login", web::post().to(login))
            .route("/logout", web::post().to(logout))
            .route("/assets/console.css", web::get().to(css))
            .route("/assets/console.js", web::get().to(js))
            .route("/overview", web::get().to(overview::show))
            .route("/parked", web::get().to(parked::list))
            .route("/parked/replay", web::post().to(parked::replay))
            .route("/parked/purge", web::post().to(parked::purge))
            .route("/parked/{id}", web::get().to(parked::show))
            .route("/trace", web::get().to(trace::show))
            .route("/trace", web::post().to(trace::by_email))
            .route("/routes", web::get().to(routes::show))
            .route("/routes/{route}/{change}", web::post().to(routes::change))
            .default_service(web::to(not_found)),
    );
}

fn now_secs() -> i64 {
    crate::queue::now_ms() / 1000
}

/// The session key, or `None` when the admin API (and so the console) is off.
fn key(state: &AppState) -> Option<SessionKey> {
    state
        .settings
        .admin
        .token()
        .map(|t| SessionKey::from_admin_token(t.expose_secret()))
}

fn cookie(req: &HttpRequest, name: &str) -> Option<String> {
    req.headers()
        .get_all(header::COOKIE)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.to_owned())
}

/// The session the request's cookie proves, if any.
fn current_session(req: &HttpRequest, state: &AppState) -> Option<Session> {
    let key = key(state)?;
    let s = key.verify(&cookie(req, session::COOKIE)?, now_secs())?;
    (!state.console.is_revoked(&s)).then_some(s)
}

/// A refusal to send instead of the page (boxed: an `HttpResponse` is large to move).
type Refusal = Box<HttpResponse>;

fn console_off() -> HttpResponse {
    HttpResponse::NotFound()
        .content_type("text/plain; charset=utf-8")
        .body("the console is off: set admin.token")
}

/// A page's session, or the refusal: 404 when the console is off, else 401 with the login
/// form (which returns to this page).
fn page_session(req: &HttpRequest, state: &AppState) -> Result<Session, Refusal> {
    if key(state).is_none() {
        return Err(Box::new(console_off()));
    }
    current_session(req, state).ok_or_else(|| {
        let next = match req.query_string() {
            "" => req.path().to_owned(),
            q => format!("{}?{q}", req.path()),
        };
        Box::new(login_form(StatusCode::UNAUTHORIZED, Some(&next), None))
    })
}

fn header_str<'a>(req: &'a HttpRequest, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

fn is_same_origin(req: &HttpRequest) -> bool {
    session::same_origin(
        header_str(req, "sec-fetch-site"),
        header_str(req, "origin"),
        header_str(req, "host"),
    )
}

fn refused(status: StatusCode, why: &str) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("text/plain; charset=utf-8")
        .body(why.to_owned())
}

/// A state-changing request: same origin, a live session, and the session's CSRF token in
/// the form. The body is read only after the origin and the cookie are checked.
async fn action_session(
    req: &HttpRequest,
    state: &AppState,
    payload: web::Payload,
) -> Result<(Session, Form), Refusal> {
    if key(state).is_none() {
        return Err(Box::new(console_off()));
    }
    if !is_same_origin(req) {
        return Err(Box::new(refused(
            StatusCode::FORBIDDEN,
            "refused: the request did not come from a console page",
        )));
    }
    let Some(session) = current_session(req, state) else {
        return Err(Box::new(refused(
            StatusCode::UNAUTHORIZED,
            "refused: log in to the console first",
        )));
    };
    let form = read_form(req, payload).await?;
    if !session.csrf_matches(form.get("csrf").unwrap_or("")) {
        return Err(Box::new(refused(
            StatusCode::FORBIDDEN,
            "refused: the form is stale or not from this session; reload the page",
        )));
    }
    Ok((session, form))
}

async fn read_form(req: &HttpRequest, payload: web::Payload) -> Result<Form, Refusal> {
    let body = crate::inbound::read_body(req, payload, MAX_FORM_BYTES, Duration::from_secs(10))
        .await
        .map_err(|e| Box::new(refused(StatusCode::BAD_REQUEST, &e.to_string())))?;
    Ok(Form::parse(&String::from_utf8_lossy(&body)))
}

/// An `application/x-www-form-urlencoded` body or query string, keeping repeated names.
#[derive(Debug, Default, Clone)]
pub struct Form(Vec<(String, String)>);

impl Form {
    pub fn parse(text: &str) -> Self {
        let decode = |s: &str| {
            let s = s.replace('+', " ");
            percent_encoding::percent_decode_str(&s)
                .decode_utf8_lossy()
                .into_owned()
        };
        Self(
            text.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (decode(k), decode(v))
                })
                .collect(),
        )
    }

    /// The first non-blank value of `name`, trimmed.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.trim())
            .find(|v| !v.is_empty())
    }

    /// Every non-blank value of `name`.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    }
}

fn html(status: StatusCode, body: String) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("text/html; charset=utf-8")
        .body(body)
}

/// `303 See Other` (POST-redirect-GET).
fn see_other(location: &str) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, location.to_owned()))
        .finish()
}

/// Where a login may return to: a console page of this relay, never another site.
fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(n)
            if n.starts_with("/console/")
                && !n.starts_with("/console/login")
                && !n.contains("//")
                && !n.contains('\\')
                && n.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            n
        }
        _ => "/console/overview",
    }
}

/// The login form; `notice` is already HTML.
fn login_form(status: StatusCode, next: Option<&str>, notice: Option<String>) -> HttpResponse {
    let next = safe_next(next);
    let body = format!(
        "{}<form method=\"post\" action=\"/console/login\" class=\"login\">\
<input type=\"hidden\" name=\"next\" value=\"{}\">\
<label for=\"token\">Admin token</label>\
<input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" required autofocus>\
<button type=\"submit\">Log in</button></form>\
<p class=\"hint\">The relay's <code>admin.token</code>. Your browser keeps a session for {} hours, not the token.</p>",
        notice.unwrap_or_default(),
        html::esc(next),
        session::LIFETIME_SECS / 3600,
    );
    html(status, html::page("Log in", None, None, &body))
}

async fn home() -> HttpResponse {
    see_other("/console/overview")
}

async fn login_page(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    if key(&state).is_none() {
        return console_off();
    }
    if current_session(&req, &state).is_some() {
        return see_other("/console/overview");
    }
    let q = Form::parse(req.query_string());
    let notice = q.get("out").map(|_| html::notice("Logged out.", false));
    login_form(StatusCode::OK, q.get("next"), notice)
}

async fn login(
    req: HttpRequest,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> HttpResponse {
    let Some(token) = state.settings.admin.token() else {
        return console_off();
    };
    if !is_same_origin(&req) {
        return refused(
            StatusCode::FORBIDDEN,
            "refused: the request did not come from a console page",
        );
    }
    let form = match read_form(&req, payload).await {
        Ok(f) => f,
        Err(refusal) => return *refusal,
    };
    let given = form.get("token").unwrap_or("");
    if !session::token_matches(given, token.expose_secret()) {
        tracing::warn!("console login refused: wrong admin token");
        return login_form(
            StatusCode::UNAUTHORIZED,
            form.get("next"),
            Some(html::notice("That is not the admin token.", true)),
        );
    }
    let value = SessionKey::from_admin_token(token.expose_secret()).issue(now_secs());
    tracing::info!("console login");
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, safe_next(form.get("next")).to_owned()))
        .insert_header((
            header::SET_COOKIE,
            format!(
                "{}={value}; Path=/; Max-Age={}; HttpOnly; Secure; SameSite=Strict",
                session::COOKIE,
                session::LIFETIME_SECS
            ),
        ))
        .finish()
}

async fn logout(
    req: HttpRequest,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> HttpResponse {
    let (session, _) = match action_session(&req, &state, payload).await {
        Ok(s) => s,
        Err(refusal) => return *refusal,
    };
    state.console.revoke(&session);
    tracing::info!("console logout");
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, "/console/login?out=1"))
        .insert_header((
            header::SET_COOKIE,
            format!(
                "{}=; Path=/; Max-Age=0; HttpOnly; Secure; SameSite=Strict",
                session::COOKIE
            ),
        ))
        .finish()
}

async fn css() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/css; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(CSS)
}

async fn js() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/javascript; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(JS)
}

async fn not_found(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    match page_session(&req, &state) {
        Err(refusal) => *refusal,
        Ok(s) => html(
            StatusCode::NOT_FOUND,
            html::page(
                "Not found",
                None,
                Some(&s.csrf),
                "<p>No such console page. <a href=\"/console/overview\">Overview</a></p>",
            ),
        ),
    }
}

/// Whether the page is asked for its live part only (the auto-refresh script).
fn wants_fragment(req: &HttpRequest) -> bool {
    header_str(req, "x-console-fragment") == Some("1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_decode_and_keep_repeated_names() {
        let f = Form::parse("ids=a&ids=b+c&csrf=x%2By&empty=&ids=");
        assert_eq!(f.all("ids").collect::<Vec<_>>(), ["a", "b c"]);
        assert_eq!(f.get("csrf"), Some("x+y"));
        assert_eq!(f.get("empty"), None);
        assert_eq!(f.get("missing"), None);
    }

    #[test]
    fn a_login_returns_only_to_a_console_page() {
        assert_eq!(
            safe_next(Some("/console/parked?route=a")),
            "/console/parked?route=a"
        );
        assert_eq!(
            safe_next(Some("https://evil.example/")),
            "/console/overview"
        );
        assert_eq!(
            safe_next(Some("/console//evil.example")),
            "/console/overview"
        );
        assert_eq!(safe_next(Some("/console/login")), "/console/overview");
        assert_eq!(safe_next(None), "/console/overview");
    }
}
