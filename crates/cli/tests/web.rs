//! `granule serve`'s HTTP side against a real server process: the API (loopback,
//! read-only without a token, as its OpenAPI description says), live events,
//! Prometheus metrics checked by `promtool`, and the dashboard in a real headless
//! Chromium.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// A `granule serve` of `job`'s store, listening where it says it does.
struct Server {
    _child: Spawned,
    addr: SocketAddr,
}

/// Starts `granule serve ARGS` for the job's store and waits for its address.
fn serve(job: &Job, args: &[&str]) -> Server {
    let mut cmd = job.cmd(&["serve", "--listen", "127.0.0.1:0"]);
    cmd.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = Spawned::start(&mut cmd);
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let deadline = Instant::now() + PATIENCE;
    let addr = loop {
        assert!(
            Instant::now() < deadline,
            "serve never said where it listens"
        );
        let line = lines.next().expect("serve exited").unwrap();
        if let Some(rest) = line.split("dashboard at http://").nth(1) {
            break rest.split('/').next().unwrap().parse().unwrap();
        }
    };
    // Keep reading its stderr so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Server {
        _child: child,
        addr,
    }
}

/// One HTTP/1.1 request; the status code and the body.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        unchunk(rest)
    } else {
        rest.to_string()
    };
    (code, body)
}

/// The body of a chunked response.
fn unchunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&tail[..n]);
        rest = &tail[n + 2..];
    }
    out
}

fn get_json(addr: SocketAddr, path: &str) -> serde_json::Value {
    let (code, body) = http(addr, "GET", path, None, "");
    assert_eq!(code, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

/// A finished two-stage job in a fresh store, for the server to show.
fn finished_job() -> Job {
    let job = Job::new(
        "name = \"shown\"\n[[stage]]\nname = \"first\"\ncommand = [\"sh\", \"-c\", \"while read -r x; do echo $x >&3; done\"]\nitems = { range = [0, 300] }\n\
         [[stage]]\nname = \"second\"\ncommand = [\"sh\", \"-c\", \"read -r x; exit 1\"]\nitems = { range = [0, 3] }\nretries = 0\n",
    );
    let out = job.run(&[], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    job
}

#[test]
fn the_api_binds_loopback_and_refuses_writes_without_the_token() {
    let job = finished_job();
    // Beyond loopback without a token: refused before anything listens.
    let out = job.output(&["serve", "--listen", "0.0.0.0:0"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--token"), "{}", stderr(&out));
    // The default address is loopback.
    let help = job.output(&["serve", "--help"]);
    assert!(String::from_utf8_lossy(&help.stdout).contains("127.0.0.1:8470"));

    let server = serve(&job, &[]);
    assert!(server.addr.ip().is_loopback());
    let status = get_json(server.addr, "/api/status");
    assert_eq!(status["jobs"][0]["name"], "shown");
    let spec = "name = \"new\"\n[[stage]]\nname = \"s\"\ncommand = [\"true\"]\nitems = { range = [0, 1] }\n";
    for (method, path, body) in [
        ("POST", "/api/jobs", spec),
        ("POST", "/api/jobs/shown/cancel", ""),
        ("POST", "/api/jobs/shown/retry", ""),
    ] {
        let (code, text) = http(server.addr, method, path, Some("anything-at-all"), body);
        assert_eq!(code, 403, "{method} {path}: {text}");
        assert!(text.contains("read-only"), "{text}");
    }
    assert_eq!(
        get_json(server.addr, "/api/jobs")["jobs"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // A page elsewhere reaching 127.0.0.1 through its own name is turned away.
    let mut stream = TcpStream::connect(server.addr).unwrap();
    write!(
        stream,
        "GET /api/status HTTP/1.1\r\nHost: evil.example:8470\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
}

#[test]
fn writes_need_the_token_and_do_what_the_cli_does() {
    let job = finished_job();
    let token = "s3cret-token-1";
    let server = serve(&job, &["--token", token]);
    let spec = "name = \"new\"\n[[stage]]\nname = \"s\"\ncommand = [\"sleep\", \"30\"]\nitems = { range = [0, 1] }\n";
    for given in [None, Some("wrong-token-9")] {
        let (code, _) = http(server.addr, "POST", "/api/jobs", given, spec);
        assert_eq!(code, 401, "{given:?}");
    }
    let (code, body) = http(
        server.addr,
        "POST",
        "/api/jobs",
        Some(token),
        "name = \"x\"\nbogus = 1\n",
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("bogus"), "{body}");
    let (code, body) = http(server.addr, "POST", "/api/jobs", Some(token), spec);
    assert_eq!(code, 201, "{body}");
    let (code, body) = http(server.addr, "POST", "/api/jobs/new/cancel", Some(token), "");
    assert_eq!(code, 200, "{body}");
    let (code, _) = http(
        server.addr,
        "POST",
        "/api/jobs/nosuch/cancel",
        Some(token),
        "",
    );
    assert_eq!(code, 404);
    let (code, body) = http(
        server.addr,
        "POST",
        "/api/jobs/shown/retry",
        Some(token),
        "",
    );
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("\"items\":3"),
        "the three quarantined items: {body}"
    );
    let jobs = String::from_utf8_lossy(&job.output(&["jobs"]).stdout).into_owned();
    assert!(jobs.contains("new") && jobs.contains("cancelled"), "{jobs}");
}

/// Every property a schema requires is in `value` (objects, one level of arrays).
fn conforms(
    doc: &serde_json::Value,
    schema: &serde_json::Value,
    value: &serde_json::Value,
    at: &str,
) {
    let schema = match schema["$ref"].as_str() {
        Some(r) => &doc["components"]["schemas"][r.rsplit('/').next().unwrap()],
        None => schema,
    };
    match schema["type"].as_str() {
        Some("object") => {
            assert!(value.is_object(), "{at}: not an object: {value}");
            for key in schema["required"].as_array().into_iter().flatten() {
                let key = key.as_str().unwrap();
                assert!(value.get(key).is_some(), "{at}: lacks {key}: {value}");
            }
            if let Some(props) = schema["properties"].as_object() {
                for (k, s) in props {
                    if let Some(v) = value.get(k).filter(|v| !v.is_null()) {
                        conforms(doc, s, v, &format!("{at}.{k}"));
                    }
                }
            }
        }
        Some("array") => {
            let items = value
                .as_array()
                .unwrap_or_else(|| panic!("{at}: not an array"));
            for (i, v) in items.iter().enumerate() {
                conforms(doc, &schema["items"], v, &format!("{at}[{i}]"));
            }
        }
        Some("integer") => assert!(
            value.is_i64() || value.is_u64(),
            "{at}: not an integer: {value}"
        ),
        Some("number") => assert!(value.is_number(), "{at}: not a number: {value}"),
        Some("string") => {
            assert!(value.is_string(), "{at}: not a string: {value}");
            if let Some(allowed) = schema["enum"].as_array() {
                assert!(
                    allowed.contains(value),
                    "{at}: {value} is not one of {allowed:?}"
                );
            }
        }
        _ => {}
    }
}

#[test]
fn the_api_answers_as_its_openapi_description_says() {
    let job = finished_job();
    let token = "s3cret-token-2";
    let server = serve(&job, &["--token", token]);
    let (code, text) = http(server.addr, "GET", "/api/openapi.json", None, "");
    assert_eq!(code, 200);
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let checked_in: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("src/cmd/serve/openapi.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        doc, checked_in,
        "the server serves the checked-in description"
    );
    let mut checked = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let url = path.replace("{job}", "shown");
            let url = if path == "/api/fragments" {
                format!("{url}?job=shown&since_ms=0")
            } else {
                url
            };
            let (code, body) = match method.as_str() {
                "get" if path == "/api/events" => continue,
                "get" => http(server.addr, "GET", &url, None, ""),
                // Writes: without the token (401), then as documented with it.
                "post" => {
                    let (code, _) = http(server.addr, "POST", &url, None, "");
                    assert_eq!(code, 401, "POST {url} without the token");
                    let body = if path == "/api/jobs" {
                        "name = \"viaapi\"\n[[stage]]\nname = \"s\"\ncommand = [\"true\"]\nitems = { range = [0, 1] }\n"
                    } else {
                        ""
                    };
                    http(server.addr, "POST", &url, Some(token), body)
                }
                other => panic!("undocumented method {other}"),
            };
            let response = &op["responses"][code.to_string()];
            assert!(
                response.is_object(),
                "{method} {url} answered {code}, not documented: {body}"
            );
            if let Some(schema) = response["content"]["application/json"]["schema"].as_object() {
                let value: serde_json::Value = serde_json::from_str(&body).unwrap();
                conforms(
                    &doc,
                    &serde_json::Value::Object(schema.clone()),
                    &value,
                    &format!("{method} {url}"),
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 11, "{checked} operations checked");
    let (code, _) = http(server.addr, "GET", "/api/jobs/nosuch", None, "");
    assert_eq!(code, 404);
    // The same fields as `status --json`.
    let api = get_json(server.addr, "/api/status");
    let cli = job.status();
    for key in cli.as_object().unwrap().keys() {
        assert!(api.get(key).is_some(), "the API lacks {key}");
    }
    assert_eq!(
        api["jobs"][0]["stages"][0]["done"],
        cli["jobs"][0]["stages"][0]["done"]
    );
}

#[test]
fn events_stream_live_progress() {
    let job = Job::new(
        "name = \"live\"\n[[stage]]\nname = \"slow\"\ncommand = [\"sh\", \"-c\", \"while read -r x; do sleep 0.05; echo $x >&3; done\"]\nitems = { range = [0, 200] }\n",
    );
    std::fs::create_dir_all(job.path(".granule")).unwrap();
    let server = serve(&job, &[]);
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    write!(
        stream,
        "GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    )
    .unwrap();
    let mut run = start_run(&job, &[]);
    let mut seen = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    for line in BufReader::new(stream).lines() {
        let line = line.unwrap();
        if let Some(data) = line.strip_prefix("data: ") {
            let v: serde_json::Value = serde_json::from_str(data).unwrap();
            if let Some(done) = v["jobs"][0]["stages"][0]["done"].as_u64() {
                if seen.last() != Some(&done) {
                    seen.push(done);
                }
            }
        }
        if seen.iter().any(|&d| d > 0 && d < 200) && seen.len() >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "no live progress: {seen:?}");
    }
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    let _ = run.kill();
}

/// Where `promtool` and Chromium are: required under CI, otherwise a loud skip.
fn tool(names: &[&str]) -> Option<PathBuf> {
    for name in names {
        for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
            let path = dir.join(name);
            if path.is_file() {
                return Some(path);
            }
        }
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{names:?} missing under CI (scripts/test.sh installs them)"
    );
    eprintln!("SKIPPED: {names:?} not installed (apt install chromium prometheus)");
    None
}

#[test]
fn metrics_pass_promtool_and_count_what_ran() {
    let job = finished_job();
    let server = serve(&job, &[]);
    let (code, text) = http(server.addr, "GET", "/metrics", None, "");
    assert_eq!(code, 200);
    for name in [
        "granule_stage_items{",
        "granule_fragments_total{",
        "granule_items_failed_total{",
        "granule_fragment_duration_seconds_bucket{",
        "granule_claims_total",
        "granule_claim_latency_seconds_bucket",
        "granule_workers{",
        "granule_stage_work_wasted_seconds{",
        "granule_fragment_prediction_error_ratio_bucket",
    ] {
        assert!(text.contains(name), "/metrics lacks {name}:\n{text}");
    }
    let done = text
        .lines()
        .find(|l| {
            l.starts_with("granule_stage_items{")
                && l.contains("stage=\"first\"")
                && l.contains("state=\"done\"")
        })
        .unwrap_or_else(|| panic!("{text}"));
    assert!(done.ends_with(" 300"), "{done}");
    let Some(promtool) = tool(&["promtool"]) else {
        return;
    };
    let mut check = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Where a test leaves files worth looking at (screenshots).
fn artefacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-artefacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn the_dashboard_renders_in_headless_chromium() {
    let Some(chromium) = tool(&["chromium", "chromium-browser", "google-chrome"]) else {
        return;
    };
    let job = finished_job();
    let server = serve(&job, &[]);
    // Polling: a headless browser's virtual clock stands still while a stream is open.
    let url = format!("http://{}/?poll=1", server.addr);
    let profile = tempfile::tempdir().unwrap();
    let browse = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(&chromium);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(&url);
        output_of(&mut cmd)
    };
    let dom = browse(&["--dump-dom"]);
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    assert!(
        dom.contains("data-rendered=\"1\""),
        "the page finished its first render: {dom}"
    );
    for text in [
        "shown",
        "first",
        "second",
        "id=\"timeline\"",
        "class=\"frag",
        "id=\"errors\"",
    ] {
        assert!(dom.contains(text), "the page lacks {text}");
    }
    let shot = artefacts().join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let out = browse(&[
        "--window-size=1400,1600",
        &format!("--screenshot={}", shot.display()),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 20_000,
        "a screenshot with content: {size} bytes at {}",
        shot.display()
    );
}

#[test]
fn the_page_carries_its_first_data_so_the_first_render_needs_one_request() {
    let job = finished_job();
    let server = serve(&job, &[]);
    let (code, page) = http(server.addr, "GET", "/", None, "");
    assert_eq!(code, 200, "{page}");
    // Nothing else to fetch before the first render: style and script are inline.
    for sub in ["src=\"app.js\"", "href=\"style.css\""] {
        assert!(!page.contains(sub), "the page still loads {sub}");
    }
    let boot = page
        .split("<script type=\"application/json\" id=\"boot\">")
        .nth(1)
        .and_then(|rest| rest.split("</script>").next())
        .unwrap_or_else(|| panic!("no boot data in the page: {page}"));
    let boot: serde_json::Value = serde_json::from_str(boot).unwrap();
    assert_eq!(boot["status"]["jobs"][0]["name"], "shown", "{boot}");
    assert!(boot["status"]["workers"].is_array(), "{boot}");
    // The ended job's timeline is its whole life: every fragment of both stages.
    let fragments = &boot["fragments"];
    assert_eq!(fragments["job"], "shown", "{boot}");
    assert_eq!(fragments["running"], false, "{boot}");
    let rows = fragments["rows"].as_array().unwrap();
    let all = get_json(
        server.addr,
        "/api/fragments?job=shown&since_ms=0&limit=20000",
    );
    assert_eq!(rows.len(), all["fragments"].as_array().unwrap().len());
    for stage in ["first", "second"] {
        assert!(
            rows.iter().any(|f| f["stage"] == stage),
            "fragments of {stage}: {boot}"
        );
    }
}
