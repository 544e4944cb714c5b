//! A real browser as a test peer: Debian's headless Chromium (`/usr/bin/chromium`, or
//! `$WEIR_CHROMIUM`) driven by `playwright-core` from npm (pinned in
//! `interop/browser/package-lock.json`; no Playwright browser download) through
//! `interop/browser/page.mjs`. [`load`] opens one URL, waits for what the test names, evaluates
//! an expression in the page and reports it with the page's console errors and its requests that
//! failed or went to another origin (those are blocked: a page under test loads nothing
//! external, and a test never depends on the network).
//!
//! Needs Node.js >= 20 with npm and Debian's `chromium`; `interop/browser/install` (run here on
//! first use, and by `scripts/test`) installs the npm package, and Chromium when it is missing
//! and the user is root.

use std::fs;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::workspace_root;

/// What to do with the page, besides loading it.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Where to save a full-page PNG screenshot (see [`artefact_path`]); none when `None`.
    pub screenshot: Option<PathBuf>,
    /// A CSS selector to wait for (until an element matches).
    pub wait_for: Option<String>,
    /// A JavaScript expression to wait for (polled every 100 ms until truthy), after `wait_for`.
    pub wait_js: Option<String>,
    /// A JavaScript expression evaluated in the page once loaded and waited for; its value (a
    /// promise is awaited) must be JSON-serialisable and becomes [`PageReport::result`].
    pub eval: Option<String>,
    /// Bounds the whole load: starting Chromium, loading, waiting, evaluating, the screenshot.
    pub timeout: Duration,
    /// The window's width and height in CSS pixels.
    pub viewport: (u32, u32),
}

impl Default for LoadOptions {
    /// Nothing waited for or evaluated, no screenshot, 30 s, 1280x900.
    fn default() -> LoadOptions {
        LoadOptions {
            screenshot: None,
            wait_for: None,
            wait_js: None,
            eval: None,
            timeout: Duration::from_secs(30),
            viewport: (1280, 900),
        }
    }
}

/// What the browser saw.
#[derive(Clone, Debug, PartialEq)]
pub struct PageReport {
    /// The value of [`LoadOptions::eval`] (`null` without it, or when it was `undefined`).
    pub result: Value,
    /// `console.error` calls, errors Chromium logged (a resource that failed to load) and
    /// uncaught exceptions (`uncaught: ...`), each with its source location when known.
    pub console_errors: Vec<String>,
    /// `<METHOD> <url>` of every request to an origin other than the page's: blocked, never sent.
    pub external_requests: Vec<String>,
    /// `<METHOD> <url>: <reason>` of the page's own-origin requests that failed (a network error,
    /// or an HTTP status >= 400).
    pub failed_requests: Vec<String>,
}

impl PageReport {
    /// Panics, listing them, when the page logged errors, asked for anything external or had a
    /// request fail.
    pub fn assert_clean(&self, what: &str) {
        assert!(
            self.console_errors.is_empty()
                && self.external_requests.is_empty()
                && self.failed_requests.is_empty(),
            "{what}: the page is not clean:\n  console errors: {:?}\n  external requests: {:?}\n  \
             failed requests: {:?}",
            self.console_errors,
            self.external_requests,
            self.failed_requests
        );
    }
}

/// Loads `url` in headless Chromium as `opts` says; panics with the script's message (on a
/// timeout: what it waited for and an excerpt of the page's text) or with how to install what is
/// missing.
pub fn load(url: &str, opts: &LoadOptions) -> PageReport {
    try_load(url, opts).unwrap_or_else(|e| panic!("loading {url} in headless Chromium: {e}"))
}

/// [`load`], returning the failure's message instead of panicking (for a test that expects one).
/// One load at a time per test binary: a Chromium each for tests running in parallel would
/// starve a small machine (and eat their own timeouts).
pub fn try_load(url: &str, opts: &LoadOptions) -> Result<PageReport, String> {
    install();
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let script = workspace_root().join("interop/browser/page.mjs");
    let mut args: Vec<String> = vec![script.display().to_string(), url.into()];
    if let Some(p) = &opts.screenshot {
        args.extend(["--screenshot".into(), p.display().to_string()]);
    }
    for (flag, v) in [
        ("--wait-for", &opts.wait_for),
        ("--wait-js", &opts.wait_js),
        ("--eval", &opts.eval),
    ] {
        if let Some(v) = v {
            args.extend([flag.into(), v.clone()]);
        }
    }
    let timeout_ms = opts.timeout.as_millis().max(1);
    args.extend([
        "--timeout-ms".into(),
        timeout_ms.to_string(),
        "--viewport".into(),
        format!("{}x{}", opts.viewport.0, opts.viewport.1),
    ]);

    let mut child = Command::new("node")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running node: {e}; {HOW_TO_INSTALL}"))?;
    let read = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let stdout = read(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = read(Box::new(child.stderr.take().expect("piped stderr")));

    // The script keeps its own deadline; this one is for a script or a browser that hangs.
    let hard = opts.timeout + Duration::from_secs(60);
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child
            .try_wait()
            .map_err(|e| format!("waiting for node: {e}"))?
        {
            break Some(s);
        }
        if t0.elapsed() > hard {
            // SIGTERM first: playwright closes Chromium on it.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            std::thread::sleep(Duration::from_secs(5));
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    let Some(status) = status else {
        return Err(format!(
            "node page.mjs did not end within {hard:?} (its own timeout is {:?}); killed. \
             stderr:\n{stderr}",
            opts.timeout
        ));
    };
    if !status.success() {
        let hint = if status.code() == Some(3) {
            format!("\n{HOW_TO_INSTALL}")
        } else {
            String::new()
        };
        return Err(format!(
            "node {} failed ({status}):\n{}{hint}",
            args.join(" "),
            stderr.trim_end()
        ));
    }
    parse_report(&stdout).map_err(|e| {
        format!("page.mjs printed no report ({e}); stdout:\n{stdout}\nstderr:\n{stderr}")
    })
}

const HOW_TO_INSTALL: &str = "the headless-browser tests need Node.js >= 20 with npm (Debian \
    13: apt-get install nodejs npm; on Debian 12 NodeSource's nodejs or nodejs.org) and Debian's \
    chromium (apt-get install chromium); then run interop/browser/install from the repository \
    root (npm ci of the pinned playwright-core; it installs chromium too when run as root)";

/// Runs `interop/browser/install` once per test binary (idempotent: npm only when node_modules
/// is missing or stale, apt only when Chromium is missing and the user is root).
fn install() {
    static INSTALL: OnceLock<()> = OnceLock::new();
    INSTALL.get_or_init(|| {
        let out = Command::new(workspace_root().join("interop/browser/install"))
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!(
                "interop/browser/install failed ({}):\n{}{}\n{HOW_TO_INSTALL}",
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => panic!("running interop/browser/install: {e}; {HOW_TO_INSTALL}"),
        }
    });
}

/// The report on page.mjs's last line of output.
fn parse_report(stdout: &str) -> Result<PageReport, String> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .ok_or("empty output")?;
    let mut v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let strings = |v: &mut Value, field: &str| -> Result<Vec<String>, String> {
        match v.get_mut(field).map(Value::take) {
            Some(Value::Array(a)) => a
                .into_iter()
                .map(|x| match x {
                    Value::String(s) => Ok(s),
                    other => Err(format!("{field}: {other} is not a string")),
                })
                .collect(),
            _ => Err(format!("no array {field:?}")),
        }
    };
    Ok(PageReport {
        console_errors: strings(&mut v, "console_errors")?,
        external_requests: strings(&mut v, "external_requests")?,
        failed_requests: strings(&mut v, "failed_requests")?,
        result: v
            .get_mut("result")
            .map(Value::take)
            .ok_or("no field \"result\"")?,
    })
}

/// A path for a test's artefact (a screenshot) under `target/test-artefacts/` (of
/// `$CARGO_TARGET_DIR` when set): its directories are created and a file left there by an
/// earlier run is removed, so what is found there afterwards was written by this run.
pub fn artefact_path(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| {
            if t.is_relative() {
                workspace_root().join(t)
            } else {
                t
            }
        })
        .unwrap_or_else(|| workspace_root().join("target"));
    let path = target.join("test-artefacts").join(name);
    let dir = path.parent().expect("an artefact's path has a directory");
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("removing the old {}: {e}", path.display()),
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_report_line() {
        let r = parse_report(
            "noise\n{\"result\":{\"a\":[1]},\"console_errors\":[\"x\"],\"external_requests\":[],\
             \"failed_requests\":[\"GET /y: HTTP 404\"]}\n",
        )
        .unwrap();
        assert_eq!(r.result, serde_json::json!({"a": [1]}));
        assert_eq!(r.console_errors, ["x"]);
        assert!(r.external_requests.is_empty());
        assert_eq!(r.failed_requests, ["GET /y: HTTP 404"]);
        assert!(parse_report("").is_err());
        assert!(parse_report("{\"result\":1}").is_err());
        assert!(parse_report(
            "{\"result\":1,\"console_errors\":[2],\"external_requests\":[],\
             \"failed_requests\":[]}"
        )
        .is_err());
    }
}
