//! The headless-browser peer (`weir_testkit::peers::browser`: Debian's Chromium driven by
//! playwright-core) on pages served here from a plain `TcpListener`: it waits for what a script
//! fills in later, reads it back, saves a real PNG, reports a request to another origin (blocked),
//! an own-origin request that failed, console errors and uncaught exceptions, and on a timeout
//! says what it waited for with the page's text. Named `real_browser_*` so that
//! `cargo test -- --skip real_` leaves them out with the other real-peer tests.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use weir_testkit::peers::browser::{self, LoadOptions};

/// Serves `pages` (path -> HTML) on 127.0.0.1, 404 for any other path, for the rest of the test
/// binary. Returns the base URL and the paths requested so far.
fn serve(pages: &[(&str, String)]) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
    let base = format!("http://{}", listener.local_addr().unwrap());
    let pages: HashMap<String, String> = pages
        .iter()
        .map(|(p, html)| (p.to_string(), html.clone()))
        .collect();
    let pages = Arc::new(pages);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let pages = pages.clone();
            let seen = seen2.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().expect("cloning a socket"));
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    return;
                }
                loop {
                    let mut header = String::new();
                    match reader.read_line(&mut header) {
                        Ok(0) | Err(_) => return,
                        Ok(_) if header == "\r\n" || header == "\n" => break,
                        Ok(_) => {}
                    }
                }
                let path = request_line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("")
                    .to_string();
                seen.lock().unwrap().push(path.clone());
                let (status, body) = match pages.get(&path) {
                    Some(html) => ("200 OK", html.as_str()),
                    None => ("404 Not Found", "not here"),
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    (base, seen)
}

/// A page whose table `#t` is empty until a script fills it 300 ms after loading.
fn late_table_page() -> String {
    r#"<!doctype html>
<html><head><meta charset="utf-8"><title>late table</title>
<style>body { font: 16px sans-serif; margin: 2em } td { border: 1px solid #888; padding: 4px 12px }</style>
</head><body>
<h1>Streams</h1>
<table id="t"></table>
<script>
  setTimeout(() => {
    const t = document.getElementById('t');
    for (const [name, records] of [['orders', 1200], ['clicks', 98765], ['audit', 7]]) {
      const row = t.insertRow();
      row.insertCell().textContent = name;
      row.insertCell().textContent = String(records);
    }
  }, 300);
</script>
</body></html>"#
        .to_string()
}

/// What the tests evaluate: the table's cells, row by row.
const READ_TABLE: &str =
    "[...document.querySelectorAll('#t tr')].map(r => [...r.cells].map(c => c.textContent))";

fn filled_table() -> serde_json::Value {
    json!([["orders", "1200"], ["clicks", "98765"], ["audit", "7"]])
}

/// Width and height from a PNG's IHDR chunk; panics unless `bytes` start like a PNG.
fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert!(
        bytes.len() > 24 && bytes.starts_with(b"\x89PNG\r\n\x1a\n") && &bytes[12..16] == b"IHDR",
        "not a PNG: {:?}",
        &bytes[..bytes.len().min(16)]
    );
    let be = |b: &[u8]| u32::from_be_bytes(b.try_into().unwrap());
    (be(&bytes[16..20]), be(&bytes[20..24]))
}

#[test]
fn real_browser_waits_for_a_selector_reads_the_table_and_saves_a_png() {
    let (base, seen) = serve(&[("/", late_table_page())]);
    let shot = browser::artefact_path("browser_peer/late_table.png");
    let t0 = Instant::now();
    let report = browser::load(
        &format!("{base}/"),
        &LoadOptions {
            screenshot: Some(shot.clone()),
            wait_for: Some("#t tr".into()),
            eval: Some(READ_TABLE.into()),
            ..LoadOptions::default()
        },
    );
    eprintln!("page loaded, waited for and shot in {:?}", t0.elapsed());
    assert_eq!(report.result, filled_table(), "{report:?}");
    report.assert_clean("the late-table page");
    assert_eq!(*seen.lock().unwrap(), ["/"], "the requests the server saw");

    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("{}: {e}", shot.display()));
    let (w, h) = png_size(&png);
    assert_eq!(w, 1280, "the screenshot's width is the viewport's");
    assert!(
        h >= 900,
        "a full-page screenshot is at least the viewport high: {h}"
    );
    assert!(
        png.len() > 5_000,
        "{} is only {} bytes: a blank page?",
        shot.display(),
        png.len()
    );
}

#[test]
fn real_browser_waits_for_a_js_expression() {
    let (base, _) = serve(&[("/", late_table_page())]);
    let report = browser::load(
        &format!("{base}/"),
        &LoadOptions {
            wait_js: Some("document.querySelectorAll('#t tr').length === 3".into()),
            eval: Some(format!("Promise.resolve({READ_TABLE})")),
            viewport: (800, 600),
            ..LoadOptions::default()
        },
    );
    assert_eq!(report.result, filled_table(), "{report:?}");
    report.assert_clean("the late-table page");
}

#[test]
fn real_browser_reports_external_and_failed_requests_and_console_errors() {
    let page = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>leaky</title>
<script src="http://example.invalid/x.js"></script>
</head><body>
<p id="p">still here</p>
<img src="/missing.png" alt="">
<script>
  console.error('status fetch failed: 503');
  setTimeout(() => { throw new Error('late failure') }, 0);
</script>
</body></html>"#;
    let (base, seen) = serve(&[("/leaky", page.to_string())]);
    let report = browser::load(
        &format!("{base}/leaky"),
        &LoadOptions {
            // The image's 404 and the uncaught error come after the load event.
            wait_js: Some("document.readyState === 'complete'".into()),
            eval: Some(
                "new Promise(r => setTimeout(() => r(document.getElementById('p').textContent), 200))"
                    .into(),
            ),
            timeout: Duration::from_secs(30),
            ..LoadOptions::default()
        },
    );
    assert_eq!(report.result, json!("still here"), "{report:?}");
    assert_eq!(
        report.external_requests,
        ["GET http://example.invalid/x.js"],
        "{report:?}"
    );
    assert_eq!(
        report.failed_requests,
        [format!("GET {base}/missing.png: HTTP 404")],
        "{report:?}"
    );
    let errors = report.console_errors.join("\n");
    assert!(errors.contains("status fetch failed: 503"), "{errors}");
    assert!(errors.contains("uncaught: late failure"), "{errors}");
    assert!(
        errors.contains("404"),
        "the image's 404 is logged: {errors}"
    );
    assert!(
        !errors.contains("example.invalid"),
        "the blocked request is reported once, as external: {errors}"
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        ["/leaky", "/missing.png"],
        "the requests the server saw"
    );
}

#[test]
fn real_browser_timeout_names_what_it_waited_for_and_the_page_text() {
    let (base, _) = serve(&[("/", late_table_page())]);
    let shot = browser::artefact_path("browser_peer/timeout.png");
    let t0 = Instant::now();
    let err = browser::try_load(
        &format!("{base}/"),
        &LoadOptions {
            screenshot: Some(shot.clone()),
            wait_for: Some("#never".into()),
            timeout: Duration::from_secs(5),
            ..LoadOptions::default()
        },
    )
    .expect_err("#never never appears");
    let took = t0.elapsed();
    assert!(err.contains("timed out after 5000 ms"), "{err}");
    assert!(err.contains("\"#never\""), "{err}");
    assert!(
        err.contains("Streams"),
        "the page's text is in the message: {err}"
    );
    assert!(took < Duration::from_secs(20), "took {took:?}");
    png_size(&std::fs::read(&shot).expect("a screenshot of the page that timed out"));
}

#[test]
fn real_browser_refused_connection_is_an_error() {
    // A port nothing listens on (bound, then closed).
    let port = weir_testkit::free_port();
    let err = browser::try_load(
        &format!("http://127.0.0.1:{port}/"),
        &LoadOptions::default(),
    )
    .expect_err("nothing listens there");
    assert!(err.contains("ERR_CONNECTION_REFUSED"), "{err}");
}
