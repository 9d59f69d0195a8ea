//! The operations console: driven in headless Chromium (the Debian package `chromium`, found
//! like the test servers, never downloaded) against a real relay and the fake Centercode, on
//! both queue backends; and every page and action refused without a session, over plain HTTP.
//!
//! The browser is driven over the DevTools protocol on `--remote-debugging-pipe`: JSON
//! messages ending in a NUL byte, commands on the browser's fd 3, answers on its fd 4. That
//! needs no WebSocket client, so the tests add no dependency.

use crate::admin::with_id;
use crate::helpers::{
    finds, fixture, spawn_app_on, Backend, TestApp, API_KEY, BEARER, HMAC_SECRET,
};
use fake_centercode::Fault;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const TOKEN: &str = "console-admin-token-for-tests-0123456789";
const COOKIE: &str = "__Host-relay_console";
const EMAIL: &str = "marta.kowalska@example.org";
/// How long the page may take to show what a step expects.
const PAGE_DEADLINE: Duration = Duration::from_secs(20);

/// Headless Chromium with one page, driven over the DevTools pipe.
struct Browser {
    child: tokio::process::Child,
    commands: tokio::process::ChildStdin,
    answers: BufReader<tokio::process::ChildStdout>,
    next_id: u64,
    /// The DevTools session of the page.
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn launch() -> Self {
        let chromium = crate::services::find_program("chromium", "chromium")
            .unwrap_or_else(|why| panic!("the console tests drive a real browser: {why}"));
        let profile = tempfile::tempdir().unwrap();
        // The shell hands our pipes to Chromium as fds 3 (commands) and 4 (answers).
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>/dev/null"#)
            .arg(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--remote-debugging-pipe",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start chromium");
        let commands = child.stdin.take().unwrap();
        let answers = BufReader::new(child.stdout.take().unwrap());
        let mut browser = Self {
            child,
            commands,
            answers,
            next_id: 0,
            session: String::new(),
            _profile: profile,
        };
        let target = browser
            .send(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await["targetId"]
            .clone();
        let session = browser
            .send(
                None,
                "Target.attachToTarget",
                json!({"targetId": target, "flatten": true}),
            )
            .await["sessionId"]
            .as_str()
            .unwrap()
            .to_owned();
        browser.session = session;
        browser
    }

    /// Send one command (to the page's session, or the browser's) and await its answer;
    /// events in between are not needed (the tests poll the page instead).
    async fn send(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        match self.try_send(session, method, params).await {
            Ok(v) => v,
            Err(e) => panic!("{method} failed: {e}"),
        }
    }

    /// [`Self::send`], with Chromium's error answer given back instead of a panic.
    async fn try_send(
        &mut self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> Result<Value, Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.commands.write_all(&bytes).await.unwrap();
        self.commands.flush().await.unwrap();
        let read = async {
            loop {
                let mut buf = Vec::new();
                let n = self.answers.read_until(0, &mut buf).await.unwrap();
                assert!(n > 0, "chromium closed the DevTools pipe");
                buf.pop();
                let answer: Value = serde_json::from_slice(&buf).unwrap();
                if answer["id"] == json!(id) {
                    return answer;
                }
            }
        };
        let answer = tokio::time::timeout(PAGE_DEADLINE, read)
            .await
            .unwrap_or_else(|_| panic!("chromium did not answer {method}"));
        if let Some(e) = answer.get("error") {
            return Err(e.clone());
        }
        Ok(answer["result"].clone())
    }

    async fn page(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.send(Some(&session), method, params).await
    }

    async fn goto(&mut self, url: &str) {
        self.page("Page.navigate", json!({"url": url})).await;
        self.wait_for(
            &format!(
                "document.readyState === 'complete' && location.href === {}",
                json!(url)
            ),
            &format!("{url} to load"),
        )
        .await;
    }

    /// Evaluate `expression` in the page (awaiting a promise) and return its value.
    async fn eval(&mut self, expression: &str) -> Value {
        // A page that navigates meanwhile (a form posted, the overview refreshing itself)
        // drops the evaluation: ask again on the new page, within the deadline.
        let deadline = std::time::Instant::now() + PAGE_DEADLINE;
        let r = loop {
            let session = self.session.clone();
            let params =
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true});
            match self
                .try_send(Some(&session), "Runtime.evaluate", params)
                .await
            {
                Ok(r) => break r,
                Err(e)
                    if std::time::Instant::now() < deadline
                        && e["message"].as_str().is_some_and(|m| {
                            m.contains("navigated or closed") || m.contains("context")
                        }) =>
                {
                    // Ask again at once: each attempt is a round trip to Chromium, which
                    // answers this error until the new page has a context.
                    continue;
                }
                Err(e) => panic!("Runtime.evaluate failed: {e}"),
            }
        };
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expression}: {e}");
        }
        r["result"]["value"].clone()
    }

    async fn text(&mut self, selector: &str) -> String {
        self.eval(&format!(
            "(document.querySelector({}) || {{}}).textContent || ''",
            json!(selector)
        ))
        .await
        .as_str()
        .unwrap_or_default()
        .to_owned()
    }

    async fn html(&mut self) -> String {
        self.eval("document.documentElement.outerHTML")
            .await
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Poll until `condition` (JavaScript) is true in the page, or fail after a deadline.
    async fn wait_for(&mut self, condition: &str, what: &str) {
        let deadline = Instant::now() + PAGE_DEADLINE;
        loop {
            let r = self
                .page(
                    "Runtime.evaluate",
                    json!({"expression": format!("!!({condition})"), "returnByValue": true}),
                )
                .await;
            if r["result"]["value"] == json!(true) {
                return;
            }
            if Instant::now() > deadline {
                let url = self.eval("location.href").await;
                let body = self.text("body").await;
                panic!("waited for {what} ({condition}); the page at {url} shows: {body}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await; // poll with deadline
        }
    }

    async fn click(&mut self, selector: &str) {
        let found = self
            .eval(&format!(
                "(() => {{ const e = document.querySelector({}); if (!e) return false; e.click(); return true; }})()",
                json!(selector)
            ))
            .await;
        assert_eq!(found, json!(true), "nothing to click at {selector}");
    }

    /// Type into the focused element as a keyboard would.
    async fn type_text(&mut self, text: &str) {
        self.page("Input.insertText", json!({"text": text})).await;
    }

    async fn press(&mut self, key: &str, code: u32) {
        for kind in ["keyDown", "keyUp"] {
            let mut event =
                json!({"type": kind, "key": key, "code": key, "windowsVirtualKeyCode": code});
            if key == "Enter" && kind == "keyDown" {
                event["text"] = json!("\r");
            }
            self.page("Input.dispatchKeyEvent", event).await;
        }
    }

    async fn cookies(&mut self) -> Vec<Value> {
        self.send(None, "Storage.getCookies", json!({})).await["cookies"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// A PNG of the whole page.
    async fn screenshot(&mut self, path: &std::path::Path) {
        let metrics = self.page("Page.getLayoutMetrics", json!({})).await;
        let size = &metrics["cssContentSize"];
        let shot = self
            .page(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true, "clip": {
                    "x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1
                }}),
            )
            .await;
        use base64::Engine;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        std::fs::write(path, png).unwrap();
    }

    async fn viewport(&mut self, width: u32, height: u32, mobile: bool) {
        self.page(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
        )
        .await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Where a backend's screenshots go: the test output directory (`target/tmp`).
fn screenshot_dir(backend: Backend) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("console-screenshots")
        .join(format!("{backend:?}").to_lowercase());
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn spawn_console_app(backend: Backend) -> TestApp {
    let pg = match backend {
        Backend::Embedded => None,
        Backend::Rabbitmq => Some(
            tokio::task::spawn_blocking(|| crate::services::postgres().url.clone())
                .await
                .unwrap(),
        ),
    };
    spawn_app_on(backend, move |s| {
        s.admin.token = Some(TOKEN.to_owned().into());
        if let Some(url) = pg {
            s.ledger.url = Some(url.into());
            s.ledger.schema = s.queue.prefix.clone();
            s.ledger.subject_key = "console-subject-key-for-tests-0123456789".to_owned().into();
        }
    })
    .await
}

/// The console pages a session opens (a parked job's page with `job`).
fn pages(job: &str) -> Vec<String> {
    [
        "/console/overview",
        "/console/parked",
        &format!("/console/parked/{job}"),
        "/console/trace",
        "/console/trace?record_id=0038d0000000041AAA",
        "/console/routes",
    ]
    .map(str::to_owned)
    .to_vec()
}

async fn walkthrough(backend: Backend) {
    // Arrange: a relay with the admin token, the fake refusing every removal, a browser.
    let app = spawn_console_app(backend).await;
    let shots = screenshot_dir(backend);
    let base = app.address.clone();
    let mut b = Browser::launch().await;

    // Log in, by keyboard: every page asks for the token first.
    b.goto(&format!("{base}/console/overview")).await;
    b.wait_for("document.querySelector('form.login')", "the login form")
        .await;
    assert_eq!(b.text("h1").await, "Log in");
    b.screenshot(&shots.join("01-login.png")).await;
    b.eval("document.getElementById('token').focus()").await;
    b.type_text(TOKEN).await;
    b.press("Enter", 13).await;
    b.wait_for(
        "document.querySelector('h1').textContent === 'Overview'",
        "the overview after logging in",
    )
    .await;
    // The browser holds a session, not the token: Secure, HttpOnly, SameSite=Strict, expiring.
    let cookies = b.cookies().await;
    let session = cookies
        .iter()
        .find(|c| c["name"] == COOKIE)
        .unwrap_or_else(|| panic!("no session cookie in {cookies:?}"));
    assert_eq!(session["secure"], json!(true), "{session}");
    assert_eq!(session["httpOnly"], json!(true), "{session}");
    assert_eq!(session["sameSite"], json!("Strict"), "{session}");
    assert_eq!(session["session"], json!(false), "a lifetime: {session}");
    let cookie_value = session["value"].as_str().unwrap().to_owned();
    assert!(!cookie_value.contains(TOKEN));
    assert_eq!(b.eval("document.cookie").await, json!(""));

    // The fake refuses the removal: the job is parked, and the parked page shows it.
    app.centercode.push_fault(Fault {
        status: 400,
        times: 1000,
        ..Fault::default()
    });
    app.post_outbound("gdpr", fixture("om_contact_gdpr_removal_single.xml"))
        .await;
    app.deliver_until_settled().await;
    // Reading works without JavaScript.
    b.page(
        "Emulation.setScriptExecutionDisabled",
        json!({"value": true}),
    )
    .await;
    b.goto(&format!("{base}/console/parked")).await;
    b.wait_for("document.querySelector('tr[data-job]')", "a parked job")
        .await;
    b.page(
        "Emulation.setScriptExecutionDisabled",
        json!({"value": false}),
    )
    .await;
    let job = b
        .eval("document.querySelector('tr[data-job]').dataset.job")
        .await
        .as_str()
        .unwrap()
        .to_owned();
    let row = b.text(&format!("tr[data-job='{job}']")).await;
    assert!(row.contains("gdpr") && row.contains("400"), "{row}");
    assert!(row.contains("0038d0000000041AAA"), "record id: {row}");
    assert!(row.contains("04l8d0000100001AAA"), "notification id: {row}");
    b.screenshot(&shots.join("02-parked.png")).await;

    // Its page shows the request a replay would send now, secrets masked.
    b.click(&format!("tr[data-job='{job}'] a")).await;
    b.wait_for(
        "document.getElementById('request-now')",
        "the parked job's page",
    )
    .await;
    let request = b.text("#request-now").await;
    assert!(request.contains("apiKey=***"), "{request}");
    assert!(
        request.contains("find=m%2A%2A%2A%40example.org"),
        "{request}"
    );
    let html = b.html().await;
    assert!(!html.contains(API_KEY) && !html.contains(EMAIL), "{html}");
    b.screenshot(&shots.join("03-parked-job.png")).await;

    // Fix the fake, then replay from the page: a dry run first, which moves nothing.
    let fixed = app
        .client
        .delete(format!("{}/__fake/faults", app.centercode.base_url()))
        .send()
        .await
        .unwrap();
    assert!(fixed.status().is_success());
    b.goto(&format!("{base}/console/parked")).await;
    b.click(&format!("#sel-{job}")).await;
    b.click("button[name=scope][value=selected]:not([formaction])")
        .await;
    b.wait_for("document.getElementById('confirm')", "the dry run")
        .await;
    assert!(
        b.text("main")
            .await
            .contains("Dry run: 1 parked job(s) match"),
        "{}",
        b.text("main").await
    );
    assert_eq!(app.stats().await.parked, 1, "a dry run moves nothing");
    b.screenshot(&shots.join("04-replay-dry-run.png")).await;
    b.click("#confirm").await;
    b.wait_for(
        // The new page's own text, not only its URL: the URL changes when the navigation
        // commits, before the new page's main is parsed.
        "location.search === '?replayed=1' && !document.querySelector('tr[data-job]') \
         && (document.querySelector('main')?.textContent ?? '').includes('Replayed 1 job(s).')",
        "the job to leave the parked list",
    )
    .await;
    assert!(b.text("main").await.contains("Replayed 1 job(s)."));
    app.deliver_until_settled().await;
    assert_eq!(
        finds(&app.centercode).last().map(String::as_str),
        Some(EMAIL)
    );

    // Its trace shows the delivery; the e-mail goes in a form body, never the address.
    b.goto(&format!("{base}/console/trace")).await;
    b.eval("document.querySelector('input[name=email]').focus()")
        .await;
    b.type_text(EMAIL).await;
    b.click("form[method=post][action='/console/trace'] button")
        .await;
    b.wait_for(
        &format!("document.querySelector(\"section.job[data-job='{job}']\")"),
        "the job's trace",
    )
    .await;
    let timeline = b.text(&format!("section.job[data-job='{job}']")).await;
    for step in ["received", "stored", "parked", "replayed", "delivered"] {
        assert!(timeline.contains(step), "{step} missing from {timeline}");
    }
    let url = b.eval("location.href").await;
    assert!(!url.as_str().unwrap().contains('@'), "{url}");
    assert!(!b.html().await.contains(EMAIL), "the e-mail is not echoed");
    assert_eq!(
        b.eval("localStorage.length + sessionStorage.length").await,
        json!(0)
    );
    b.screenshot(&shots.join("05-trace.png")).await;
    b.goto(&format!("{base}/console/trace?job_id={job}")).await;
    assert!(b.text("main").await.contains("delivered"));

    // Pause the route from the page: shared, and deliveries stop.
    b.goto(&format!("{base}/console/routes")).await;
    b.click("section[data-route=gdpr] form button").await;
    b.wait_for(
        "document.querySelector('section[data-route=gdpr] .paused-state').textContent === 'paused'",
        "gdpr paused",
    )
    .await;
    assert!(app.control.is_paused("gdpr"));
    let html = b.html().await;
    for secret in [API_KEY, BEARER, HMAC_SECRET, TOKEN] {
        assert!(!html.contains(secret), "a secret on the routes page");
    }
    b.screenshot(&shots.join("06-routes.png")).await;
    let sent = app.centercode.requests().len();
    app.post_outbound("gdpr", with_id(2)).await;
    let outcomes = app.worker.deliver_all().await.unwrap();
    assert!(
        !outcomes
            .iter()
            .any(|o| matches!(o, sf_centercode_relay::worker::Outcome::Delivered { .. })),
        "{outcomes:?}"
    );
    assert_eq!(
        app.centercode.requests().len(),
        sent,
        "nothing sent while paused"
    );

    // The overview shows it, with the chart, and refreshes (the script's fetch of the live part).
    b.goto(&format!("{base}/console/overview")).await;
    b.wait_for("document.querySelector('svg.chart')", "the depth chart")
        .await;
    let gdpr = b.text("tr[data-route=gdpr] .state").await;
    assert_eq!(gdpr, "paused");
    let held = b.text("tr[data-route=gdpr] .held").await;
    assert!(
        held.split_whitespace().next() == Some("1"),
        "the held job waits, with its age: {held}"
    );
    assert_eq!(b.text("tr[data-route=gdpr] .ready").await, "0");
    assert!(b.text(".badges").await.contains("Paused: gdpr"));
    let fragment = b
        .eval("fetch(location.href, {headers: {'X-Console-Fragment': '1'}}).then(r => r.text())")
        .await;
    let fragment = fragment.as_str().unwrap();
    assert!(fragment.contains("Readiness") && !fragment.contains("<html"));
    b.screenshot(&shots.join("07-overview.png")).await;
    // It fits a phone: nothing wider than the screen.
    b.viewport(390, 844, true).await;
    b.goto(&format!("{base}/console/overview")).await;
    assert_eq!(
        b.eval("document.documentElement.scrollWidth <= window.innerWidth")
            .await,
        json!(true),
        "the overview is wider than a phone"
    );
    b.screenshot(&shots.join("08-overview-phone.png")).await;
    b.page("Emulation.clearDeviceMetricsOverride", json!({}))
        .await;

    // Resume: the held job goes out.
    b.goto(&format!("{base}/console/routes")).await;
    b.click("section[data-route=gdpr] form button").await;
    b.wait_for(
        "document.querySelector('section[data-route=gdpr] .paused-state').textContent === 'running'",
        "gdpr resumed",
    )
    .await;
    app.deliver_until_settled().await;
    assert!(
        app.centercode.requests().len() > sent,
        "delivered after resuming"
    );

    // Log out: every page asks for the token again, and the old session is dead.
    b.click(".logout button").await;
    b.wait_for(
        "document.querySelector('form.login') && document.body.textContent.includes('Logged out.')",
        "the login page after logging out",
    )
    .await;
    assert!(!b.cookies().await.iter().any(|c| c["name"] == COOKIE));
    for page in pages(&job) {
        b.goto(&format!("{base}{page}")).await;
        b.wait_for(
            "document.querySelector('form.login') && !document.querySelector('nav')",
            &format!("{page} refused"),
        )
        .await;
    }
    let replayed = no_redirects()
        .get(format!("{base}/console/overview"))
        .header("Cookie", format!("{COOKIE}={cookie_value}"))
        .send()
        .await
        .unwrap();
    assert_eq!(replayed.status(), 401, "a logged-out session stays out");
    eprintln!("console screenshots: {}", shots.display());
}

#[tokio::test]
async fn an_operator_replays_a_refused_job_and_pauses_a_route_from_the_browser() {
    walkthrough(Backend::Embedded).await;
}

#[tokio::test]
async fn an_operator_replays_a_refused_job_and_pauses_a_route_from_the_browser_on_rabbitmq() {
    walkthrough(Backend::Rabbitmq).await;
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Log in over HTTP: the session cookie, and the CSRF token of the session's forms.
async fn log_in(base: &str) -> (String, String) {
    log_in_as(base, TOKEN).await
}

/// [`log_in`] with the relay's admin token `token`.
pub async fn log_in_as(base: &str, token: &str) -> (String, String) {
    let client = no_redirects();
    let res = client
        .post(format!("{base}/console/login"))
        .header("Origin", base)
        .form(&[("token", token)])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 303);
    let set = res.headers()["set-cookie"].to_str().unwrap().to_owned();
    for attribute in [
        "HttpOnly",
        "Secure",
        "SameSite=Strict",
        "Max-Age=",
        "Path=/",
    ] {
        assert!(set.contains(attribute), "{attribute} missing: {set}");
    }
    let cookie = set.split(';').next().unwrap().to_owned();
    let page = client
        .get(format!("{base}/console/routes"))
        .header("Cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a csrf field")
        .to_owned();
    (cookie, csrf)
}

#[tokio::test]
async fn every_console_page_and_action_is_refused_without_a_session() {
    // Arrange
    let app = spawn_console_app(Backend::Embedded).await;
    let base = app.address.clone();
    let client = no_redirects();
    let forged = format!("{COOKIE}=v1.99999999999.00.AAAA");
    let actions = [
        "/console/logout",
        "/console/parked/replay",
        "/console/parked/purge",
        "/console/trace",
        "/console/routes/gdpr/pause",
        "/console/routes/gdpr/resume",
    ];
    let form = [
        ("csrf", "guess"),
        ("scope", "filter"),
        ("step", "run"),
        ("expected", "1"),
        ("email", EMAIL),
    ];

    // Act / Assert: pages answer 401 with the login form and nothing else.
    for page in pages("some-job")
        .iter()
        .chain([&"/console/nope".to_owned()])
    {
        for cookie in [None, Some(forged.as_str())] {
            let mut req = client.get(format!("{base}{page}"));
            if let Some(c) = cookie {
                req = req.header("Cookie", c);
            }
            let res = req.send().await.unwrap();
            assert_eq!(res.status(), 401, "{page} with {cookie:?}");
            let body = res.text().await.unwrap();
            assert!(body.contains("form method=\"post\" action=\"/console/login\""));
            assert!(
                !body.contains("gdpr") && !body.contains("<nav"),
                "{page}: {body}"
            );
        }
    }
    // Actions answer 401 without a (genuine) session.
    for action in actions {
        for cookie in [None, Some(forged.as_str())] {
            let mut req = client
                .post(format!("{base}{action}"))
                .header("Origin", &base)
                .form(&form);
            if let Some(c) = cookie {
                req = req.header("Cookie", c);
            }
            let res = req.send().await.unwrap();
            assert_eq!(res.status(), 401, "{action} with {cookie:?}");
        }
    }
    // A cross-site form post riding on a real session is refused, whatever it carries.
    let (cookie, csrf) = log_in(&base).await;
    for action in actions {
        let cross_site: [(&str, &str); 2] = [
            ("Origin", "https://evil.example"),
            ("Sec-Fetch-Site", "cross-site"),
        ];
        for (name, value) in cross_site {
            let res = client
                .post(format!("{base}{action}"))
                .header("Cookie", &cookie)
                .header(name, value)
                .form(&[
                    ("csrf", csrf.as_str()),
                    ("scope", "filter"),
                    ("step", "count"),
                ])
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 403, "{action} with {name}: {value}");
        }
        for token in ["", "wrong"] {
            let res = client
                .post(format!("{base}{action}"))
                .header("Cookie", &cookie)
                .header("Origin", &base)
                .form(&[("csrf", token), ("scope", "filter"), ("step", "count")])
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 403, "{action} with csrf {token:?}");
        }
    }
    assert!(
        !app.control.is_paused("gdpr"),
        "no refused request changed anything"
    );
    // The same request from the console's own page passes (the refusals were for the reasons above).
    let res = client
        .post(format!("{base}/console/routes/gdpr/pause"))
        .header("Cookie", &cookie)
        .header("Origin", &base)
        .header("Sec-Fetch-Site", "same-origin")
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 303);
    assert!(app.control.is_paused("gdpr"));
    // Logging in from another site, or with a wrong token, gives no session.
    let res = client
        .post(format!("{base}/console/login"))
        .header("Origin", "https://evil.example")
        .form(&[("token", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    assert!(res.headers().get("set-cookie").is_none());
    let res = client
        .post(format!("{base}/console/login"))
        .form(&[("token", "not-the-token")])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert!(res.headers().get("set-cookie").is_none());
}

#[tokio::test]
async fn console_pages_load_nothing_from_elsewhere_and_the_console_is_off_without_a_token() {
    // Arrange
    let app = spawn_console_app(Backend::Embedded).await;
    let (cookie, _) = log_in(&app.address).await;
    let client = no_redirects();

    for page in pages("some-job") {
        // Act
        let res = client
            .get(format!("{}{page}", app.address))
            .header("Cookie", &cookie)
            .send()
            .await
            .unwrap();

        // Assert: a strict policy, and every address on the page is the relay's own.
        let csp = res.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(csp.starts_with("default-src 'self'"), "{csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert_eq!(res.headers()["cache-control"], "no-store");
        let body = res.text().await.unwrap();
        for attr in ["src=\"", "href=\"", "action=\""] {
            for value in body.split(attr).skip(1) {
                assert!(
                    value.starts_with('/') || value.starts_with('#'),
                    "{page}: {attr}{}",
                    &value[..value.len().min(40)]
                );
            }
        }
        assert!(
            !body.contains("<script>") && !body.contains(" style=\""),
            "{page}: inline code"
        );
    }

    // Without admin.token the console does not exist.
    let off = crate::helpers::spawn_app().await;
    let res = client
        .get(format!("{}/console/login", off.address))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
}

#[tokio::test]
async fn with_an_ops_listener_the_console_is_served_there_only() {
    // Arrange
    let fake = fake_centercode::FakeCentercode::start(fake_centercode::FakeConfig::demo())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut settings =
        crate::helpers::test_settings(&dir.path().join("relay.db"), &fake.base_url());
    settings.admin.token = Some(TOKEN.to_owned().into());
    settings.server.ops_bind = Some("127.0.0.1:0".into());
    let app = sf_centercode_relay::startup::Application::build(settings)
        .await
        .unwrap();
    let (main, ops) = (app.port(), app.ops_port().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(app.run_until_stopped(stop.clone(), false));
    let _stop = stop.drop_guard();

    // Act
    let on_main = no_redirects()
        .get(format!("http://127.0.0.1:{main}/console/login"))
        .send()
        .await
        .unwrap();
    let on_ops = no_redirects()
        .get(format!("http://127.0.0.1:{ops}/console/login"))
        .send()
        .await
        .unwrap();

    // Assert
    assert_eq!(on_main.status(), 404);
    assert_eq!(on_ops.status(), 200);
}
