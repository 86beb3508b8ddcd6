//! The admin page in a real browser: headless Chromium (Debian's `chromium` and
//! `chromium-driver`, installed by `.ci/chromium` when missing), driven over WebDriver
//! with plain HTTP calls, against the real `idem` binary under light load. It logs in,
//! sees the rates move, releases a stuck key with the button (and its confirmation),
//! checks the page fits a phone's width, and takes the screenshot `docs/operations.md`
//! shows (written to `docs/img/admin-page.png` when `IDEM_UPDATE_SCREENSHOTS=1`).
//!
//! Without a browser the test skips loudly; under `IDEM_REQUIRE_BACKENDS=1` it fails.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use idem_test_support::*;
use serde_json::{Value, json};

const TOKEN: &str = "admin-token-0123456789";

/// Chromium's flags for a closed network and a throwaway profile.
const CHROMIUM_ARGS: [&str; 9] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1100",
];

fn browser_installed() -> bool {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../.ci/chromium");
    Command::new("bash")
        .arg(script)
        .status()
        .is_ok_and(|s| s.success())
}

/// A chromedriver process; killed when dropped.
struct Chromedriver {
    child: Child,
    url: String,
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn chromedriver(http: &reqwest::Client) -> Chromedriver {
    let port = idem_conformance::servers::free_port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let driver = Chromedriver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = http.get(format!("{}/status", driver.url)).send().await
            && r.status().is_success()
        {
            return driver;
        }
        assert!(Instant::now() < deadline, "chromedriver did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One WebDriver session.
struct Browser {
    http: reqwest::Client,
    session: String,
}

impl Browser {
    async fn open(
        http: &reqwest::Client,
        driver: &Chromedriver,
        profile: &std::path::Path,
    ) -> Self {
        let binary = ["/usr/lib/chromium/chromium", "/usr/bin/chromium"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("chromium binary");
        let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|a| a.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": binary, "args": args },
        }}});
        let res: Value = http
            .post(format!("{}/session", driver.url))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = res["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {res}"));
        Browser {
            http: http.clone(),
            session: format!("{}/session/{id}", driver.url),
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> Result<Value, String> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.session));
        if method != reqwest::Method::GET {
            req = req.json(&body);
        }
        let res = req.send().await.map_err(|e| e.to_string())?;
        let ok = res.status().is_success();
        let v: Value = res.json().await.map_err(|e| e.to_string())?;
        if ok {
            Ok(v["value"].clone())
        } else {
            Err(v["value"].to_string())
        }
    }

    async fn script(&self, script: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            json!({ "script": script, "args": [] }),
        )
        .await
        .unwrap_or_else(|e| panic!("{script}: {e}"))
    }

    async fn element(&self, css: &str) -> Result<String, String> {
        let v = self
            .call(
                reqwest::Method::POST,
                "/element",
                json!({ "using": "css selector", "value": css }),
            )
            .await?;
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| format!("no element id in {v}"))
    }

    /// Clicks the element `css` names, finding it again if the page redrew it.
    async fn click(&self, css: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let clicked = match self.element(css).await {
                Ok(id) => {
                    self.call(
                        reqwest::Method::POST,
                        &format!("/element/{id}/click"),
                        json!({}),
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            match clicked {
                Ok(_) => return,
                Err(e) if Instant::now() > deadline => panic!("cannot click {css}: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    async fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css).await.unwrap();
        self.call(
            reqwest::Method::POST,
            &format!("/element/{id}/value"),
            json!({ "text": text }),
        )
        .await
        .unwrap();
    }

    /// Waits until `script` returns true.
    async fn wait_for(&self, what: &str, script: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while self.script(script).await != Value::Bool(true) {
            assert!(Instant::now() < deadline, "waited {within:?} for {what}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn resize(&self, width: u32, height: u32) {
        self.call(
            reqwest::Method::POST,
            "/window/rect",
            json!({ "width": width, "height": height }),
        )
        .await
        .unwrap();
    }

    async fn screenshot(&self) -> Vec<u8> {
        let v = self
            .call(reqwest::Method::GET, "/screenshot", json!({}))
            .await
            .unwrap();
        base64_decode(v.as_str().expect("base64 PNG"))
    }

    async fn close(self) {
        let _ = self.call(reqwest::Method::DELETE, "", json!({})).await;
    }
}

/// Standard base64, as WebDriver sends screenshots.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let clean: Vec<u8> = text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, c)| n | (u32::from(value(*c)) << (18 - 6 * i)));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

/// Light load: a new key every 100 ms, each sent twice (executed, then replayed).
fn load(idem: &Idem) -> tokio::task::JoinHandle<()> {
    let url = idem.url("/v1/charges");
    tokio::spawn(async move {
        let c = client();
        for i in 0u64.. {
            for _ in 0..2 {
                if let Ok(res) = post(&c, url.clone(), Some(&format!("load-{i}")), "{}")
                    .send()
                    .await
                {
                    let _ = res.bytes().await;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

fn start(dir: &std::path::Path, upstream: std::net::SocketAddr) -> Idem {
    let path = dir.join("idem.toml");
    std::fs::write(
        &path,
        format!(
            "upstream = \"http://{upstream}\"\nstore = \"sqlite:idem.db\"\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n\
             [defaults]\nlease = \"30s\"\n[[routes]]\nmethod = \"POST\"\npath = \"/v1/charges\"\n\
             [[routes]]\nmethod = \"POST\"\npath = \"/v1/slow\"\n"
        ),
    )
    .unwrap();
    start_idem(dir, &["--config", &path.display().to_string()])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_page_shows_rates_and_releases_a_stuck_key() {
    if !browser_or_skip() {
        return;
    }
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let idem = start(dir.path(), up.addr);
    let admin = format!("http://{}", idem.admin.unwrap());
    let load = load(&idem);
    let c = client();
    // The stuck key: the upstream holds it for a minute.
    let stuck = tokio::spawn(slow_post(&c, &idem, "k-stuck", 60_000).send());

    let http = reqwest::Client::new();
    let driver = chromedriver(&http).await;
    let browser = Browser::open(&http, &driver, &dir.path().join("profile")).await;
    log_in(&browser, &admin).await;
    assert_eq!(
        browser.script("return document.cookie").await,
        json!(""),
        "the session cookie is HttpOnly: the page's script cannot read it"
    );

    let row = "tr[data-key='k-stuck']";
    see_the_page_move(&browser, row).await;
    let png = browser.screenshot().await;
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG screenshot");
    save_screenshot(&png);

    release_with_the_button(&browser, row).await;
    let listed: Value = c
        .get(format!("{admin}/api/in-flight"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        listed["records"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["key"] != "k-stuck"),
        "the store no longer holds the key in flight: {listed}"
    );

    browser.resize(390, 844).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        browser
            .script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
            .await,
        json!(true),
        "the page fits a phone's width"
    );
    browser.close().await;
    load.abort();
    stuck.abort();
}

/// Whether the browser is there; without it, skips loudly or, when backends are
/// required, fails.
fn browser_or_skip() -> bool {
    if browser_installed() {
        return true;
    }
    if idem_conformance::backends_required() {
        panic!(
            "chromium and chromedriver are needed and could not be installed (IDEM_REQUIRE_BACKENDS=1)"
        );
    }
    eprintln!(
        "SKIPPED the_admin_page_shows_rates_and_releases_a_stuck_key: no chromium/chromedriver (set IDEM_REQUIRE_BACKENDS=1 to make this an error)"
    );
    false
}

/// Waits for the counts and rates to move under the load, for the stuck key's row,
/// and for the latency table.
async fn see_the_page_move(browser: &Browser, row: &str) {
    let total = "return Number(document.getElementById('total-executed').textContent)";
    let first = browser.script(total).await.as_f64().unwrap();
    browser
        .wait_for(
            "the executed count and rate to move",
            &format!("return Number(document.getElementById('total-executed').textContent) > {first} && Number(document.getElementById('rate-executed').textContent) > 0 && Number(document.getElementById('rate-replayed').textContent) > 0"),
            Duration::from_secs(20),
        )
        .await;
    browser
        .wait_for(
            "the stuck key",
            &format!("return document.querySelector(\"{row}\") !== null"),
            Duration::from_secs(15),
        )
        .await;
    browser
        .wait_for(
            "store latency rows",
            "return document.querySelectorAll('#latency tbody tr').length >= 3",
            Duration::from_secs(10),
        )
        .await;
}

/// Opens the page and logs in with the form.
async fn log_in(browser: &Browser, admin: &str) {
    browser
        .call(
            reqwest::Method::POST,
            "/url",
            json!({ "url": format!("{admin}/") }),
        )
        .await
        .unwrap();
    browser
        .wait_for(
            "the login form",
            "return !document.getElementById('login').classList.contains('hidden')",
            Duration::from_secs(15),
        )
        .await;
    browser.type_into("#token", TOKEN).await;
    browser.click("#login-form button").await;
    browser
        .wait_for(
            "the dashboard",
            "return !document.getElementById('dashboard').classList.contains('hidden')",
            Duration::from_secs(15),
        )
        .await;
}

/// Presses the row's Release button, then its confirmation; waits for the row to go.
async fn release_with_the_button(browser: &Browser, row: &str) {
    browser.click(&format!("{row} button.release")).await;
    browser
        .wait_for("the confirmation", &format!("return document.querySelector(\"{row} button.release\").textContent === 'Confirm release'"), Duration::from_secs(5))
        .await;
    browser.click(&format!("{row} button.release")).await;
    browser
        .wait_for("the key to leave the table", &format!("return document.querySelector(\"{row}\") === null && document.getElementById('release-result').textContent === 'released k-stuck'"), Duration::from_secs(10))
        .await;
}

fn save_screenshot(png: &[u8]) {
    let target = std::env::temp_dir().join("idem-admin-page.png");
    std::fs::write(&target, png).unwrap();
    eprintln!("screenshot: {}", target.display());
    if std::env::var("IDEM_UPDATE_SCREENSHOTS").is_ok_and(|v| v == "1") {
        let docs = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/img/admin-page.png");
        std::fs::create_dir_all(std::path::Path::new(docs).parent().unwrap()).unwrap();
        std::fs::write(docs, png).unwrap();
    }
}
