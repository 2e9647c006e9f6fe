//! The REST example (`examples/server`) over real HTTP on loopback, with the tiny fixture models: the original
//! service's endpoints, status codes for bad input (422), unknown jobs (404), a full queue (429 + Retry-After),
//! oversized uploads (413), cancellation and the served images. With `SKETCHX_TEST_REDIS_URL` set (as
//! `scripts/test` does), also the server as a mere client of a Redis queue, a worker elsewhere, no shared disk.

mod common;
use common::*;

#[path = "../examples/server/app.rs"]
mod app;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use sketchx::{Pipeline, PipelineConfig};

struct Server {
    base: String,
    _rt: tokio::runtime::Runtime,
    dir: PathBuf,
    pipe: Pipeline,
}

impl Server {
    /// Stops the pipeline (cancelling what is queued and joining its worker, so no job still writes an image) and
    /// removes the output directory.
    fn finish(self) {
        self.pipe.shutdown();
        std::fs::remove_dir_all(&self.dir).unwrap();
    }
}

/// Serves the REST API on `pipe` over loopback.
fn serve(pipe: Pipeline, dir: PathBuf) -> Server {
    serve_router(
        app::router(pipe.clone()),
        pipe,
        dir,
        app::HEADER_READ_TIMEOUT,
    )
}

/// Serves `router` (built on `pipe`) over loopback with the example's own accept loop.
fn serve_router(
    router: axum::Router,
    pipe: Pipeline,
    dir: PathBuf,
    header_timeout: Duration,
) -> Server {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    rt.spawn(app::serve(
        listener,
        router,
        header_timeout,
        std::future::pending(),
        Duration::ZERO,
    ));
    Server {
        base,
        _rt: rt,
        dir,
        pipe,
    }
}

fn start(queue_capacity: usize) -> Server {
    start_with(
        queue_capacity,
        app::BODY_READ_TIMEOUT,
        app::HEADER_READ_TIMEOUT,
    )
}

fn start_with(queue_capacity: usize, body_timeout: Duration, header_timeout: Duration) -> Server {
    let f = fixtures();
    let mut cfg = PipelineConfig::new(
        f.join("tiny-sd").to_str().unwrap(),
        f.join("tiny-controlnet").to_str().unwrap(),
    )
    .unwrap();
    // One directory per server: tests run in parallel and each removes its own at the end.
    static SERVERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = SERVERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "sketchx-server-{queue_capacity}-{}-{n}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    cfg.output_dir = dir.clone();
    cfg.queue_capacity = queue_capacity;
    cfg.cleanup_interval = None;
    let pipe = Pipeline::new(cfg).unwrap();
    serve_router(
        app::router_with(pipe.clone(), body_timeout),
        pipe,
        dir,
        header_timeout,
    )
}

/// A multipart/form-data body with text fields and an optional `sketch` file.
fn multipart(fields: &[(&str, &str)], sketch: Option<&[u8]>) -> (String, Vec<u8>) {
    let boundary = "sketchxBoundary7MA4YWxkTrZu0gW";
    let mut body = Vec::new();
    for (k, v) in fields {
        body.extend(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n")
                .bytes(),
        );
    }
    if let Some(data) = sketch {
        body.extend(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"sketch\"; filename=\"s.png\"\r\nContent-Type: image/png\r\n\r\n")
                .bytes(),
        );
        body.extend_from_slice(data);
        body.extend(b"\r\n");
    }
    body.extend(format!("--{boundary}--\r\n").bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// (status, JSON body, Retry-After) of a request; HTTP error statuses are returned, not raised.
fn call(req: ureq::Request, body: Option<(String, Vec<u8>)>) -> (u16, Value, Option<String>) {
    let resp = match body {
        Some((ct, bytes)) => req.set("Content-Type", &ct).send_bytes(&bytes),
        None => req.call(),
    };
    let resp = match resp {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("transport error: {e}"),
    };
    let status = resp.status();
    let retry = resp.header("Retry-After").map(str::to_string);
    let text = resp.into_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
        retry,
    )
}

fn sketch() -> Vec<u8> {
    std::fs::read(fixtures().join("sketches/house_black_on_white.png")).unwrap()
}

/// Text fields of a multipart form.
type Form = Vec<(&'static str, String)>;

fn small(steps: &str) -> Form {
    vec![
        ("prompt", "a house".into()),
        ("steps", steps.into()),
        ("width", "64".into()),
        ("height", "64".into()),
        ("seed", "3".into()),
    ]
}

fn post(
    s: &Server,
    fields: &[(&str, String)],
    sketch: Option<&[u8]>,
) -> (u16, Value, Option<String>) {
    let f: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    call(
        ureq::post(&format!("{}/api/generate", s.base)),
        Some(multipart(&f, sketch)),
    )
}

/// Polls `/api/status/{id}` until the job is final (or a minute passes); returns the last status.
fn wait_final(s: &Server, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (code, st, _) = call(ureq::get(&format!("{}/api/status/{id}", s.base)), None);
        assert_eq!(code, 200, "{st}");
        let done =
            ["completed", "failed", "cancelled"].contains(&st["status"].as_str().unwrap_or(""));
        if done || Instant::now() > deadline {
            return st;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The bytes of a GET, with its status.
fn get_bytes(url: &str) -> (u16, Vec<u8>) {
    let resp = match ureq::get(url).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("transport error: {e}"),
    };
    let code = resp.status();
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut resp.into_reader(), &mut bytes).unwrap();
    (code, bytes)
}

#[test]
fn the_original_rest_api_over_http() {
    let s = start(64);
    let sk = sketch();
    let (code, body, _) = post(&s, &small("2"), Some(&sk));
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["status"], "queued");
    let id = body["job_id"].as_str().unwrap().to_string();

    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let (code, st, _) = call(ureq::get(&format!("{}/api/status/{id}", s.base)), None);
        assert_eq!(code, 200);
        for key in ["job_id", "status", "progress", "images", "message"] {
            assert!(st.get(key).is_some(), "{key} missing from {st}");
        }
        if st["status"] == "completed" || Instant::now() > deadline {
            break st;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status["status"], "completed", "{status}");
    assert_eq!(status["progress"], 100.0);
    let url = status["images"][0].as_str().unwrap();
    assert!(url.starts_with("/generated/"), "{url}");
    let png = ureq::get(&format!("{}{url}", s.base)).call().unwrap();
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut png.into_reader(), &mut bytes).unwrap();
    assert_eq!(image::load_from_memory(&bytes).unwrap().width(), 64);

    // Unknown ids: well-formed or not, 404.
    for bad in ["0123456789abcdef0123456789abcdef", "nope", "..%2F..%2Fetc"] {
        let (code, _, _) = call(ureq::get(&format!("{}/api/status/{bad}", s.base)), None);
        assert_eq!(code, 404, "{bad}");
    }
    let (code, _, _) = call(
        ureq::delete(&format!(
            "{}/api/jobs/0123456789abcdef0123456789abcdef",
            s.base
        )),
        None,
    );
    assert_eq!(code, 404);

    // Cancel a long job.
    let (_, body, _) = post(&s, &small("150"), Some(&sk));
    let long = body["job_id"].as_str().unwrap().to_string();
    let (code, body, _) = call(ureq::delete(&format!("{}/api/jobs/{long}", s.base)), None);
    assert_eq!((code, body["cancelled"].as_bool()), (200, Some(true)));

    // The API description.
    let (code, doc, _) = call(ureq::get(&format!("{}/openapi.json", s.base)), None);
    assert_eq!(code, 200);
    assert!(doc["paths"]["/api/generate"]["post"].is_object());
    let (code, _, _) = call(ureq::get(&format!("{}/docs", s.base)), None);
    assert_eq!(code, 200);
    s.finish();
}

#[test]
fn bad_input_is_422_naming_the_field_never_500() {
    let s = start(64);
    let sk = sketch();
    let cases: Vec<(Form, Option<&[u8]>, &str)> = vec![
        (small("0"), Some(&sk), "steps"),
        (small("abc"), Some(&sk), "steps"),
        (vec![("temperature", "2".into())], Some(&sk), "temperature"),
        (
            vec![("guidance_scale", "nan".into())],
            Some(&sk),
            "guidance_scale",
        ),
        (vec![("num_images", "-1".into())], Some(&sk), "num_images"),
        (vec![("seed", "x".into())], Some(&sk), "seed"),
        (vec![("width", "100".into())], Some(&sk), "width"),
        (small("2"), None, "sketch"),
        (small("2"), Some(b"not an image"), "sketch"),
        (small("2"), Some(b""), "sketch"),
        (vec![("bogus", "1".into())], Some(&sk), "bogus"),
        (
            vec![("prompt", "x".repeat(sketchx::request::MAX_PROMPT_BYTES + 1))],
            Some(&sk),
            "prompt",
        ),
    ];
    for (fields, sketch, field) in cases {
        let (code, body, _) = post(&s, &fields, sketch);
        assert_eq!(code, 422, "{field}: {body}");
        assert_eq!(body["field"], field, "{body}");
    }
    // Over the upload limit: 413.
    let big = vec![0u8; app::MAX_UPLOAD_BYTES + 1024];
    let (code, _, _) = post(&s, &small("2"), Some(&big));
    assert_eq!(code, 413);
    // So is a text field over it.
    let huge_prompt = vec![("prompt", "x".repeat(app::MAX_UPLOAD_BYTES + 1024))];
    let (code, body, _) = post(&s, &huge_prompt, Some(&sk));
    assert_eq!(code, 413, "{body}");
    // Not multipart at all: a client error, not a 500.
    let (code, _, _) = call(
        ureq::post(&format!("{}/api/generate", s.base)),
        Some(("text/plain".into(), b"hi".to_vec())),
    );
    assert!((400..500).contains(&code), "{code}");
    s.finish();
}

#[test]
fn a_full_queue_is_429_with_retry_after() {
    let s = start(1);
    let sk = sketch();
    let (code, first, _) = post(&s, &small("150"), Some(&sk));
    assert_eq!(code, 200);
    // Wait for the first job to leave the queue, then fill the single place.
    let id = first["job_id"].as_str().unwrap().to_string();
    while call(ureq::get(&format!("{}/api/status/{id}", s.base)), None).1["status"] == "queued" {
        std::thread::sleep(Duration::from_millis(5));
    }
    let (code, _, _) = post(&s, &small("1"), Some(&sk));
    assert_eq!(code, 200);
    let (code, body, retry) = post(&s, &small("1"), Some(&sk));
    assert_eq!(code, 429, "{body}");
    assert!(retry.is_some_and(|r| r.parse::<u64>().is_ok()));
    call(ureq::delete(&format!("{}/api/jobs/{id}", s.base)), None);
    s.finish();
}

#[test]
fn the_openapi_form_takes_its_defaults_ranges_and_names_from_the_core() {
    use sketchx::request::{
        GenerationRequest, GUIDANCE_RANGE, NUM_IMAGES_RANGE, SIZE_MULTIPLE, SIZE_RANGE,
        STEPS_RANGE, TEMPERATURE_RANGE,
    };
    use sketchx::sampling::schedulers::SchedulerKind;

    let d = GenerationRequest::DEFAULT;
    let doc = app::openapi();
    let form = &doc["paths"]["/api/generate"]["post"]["requestBody"]["content"]
        ["multipart/form-data"]["schema"];
    assert_eq!(form, &app::generate_form_schema());
    let p = &form["properties"];
    assert_eq!(p["temperature"]["default"].as_f64(), Some(d.temperature));
    assert_eq!(
        p["guidance_scale"]["default"].as_f64(),
        Some(d.guidance_scale)
    );
    assert_eq!(
        p["num_images"]["default"].as_u64(),
        Some(d.num_images.into())
    );
    assert_eq!(p["steps"]["default"].as_u64(), Some(d.steps.into()));
    assert_eq!(p["scheduler"]["default"], d.scheduler.as_str());
    let names: Vec<&str> = p["scheduler"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(names, SchedulerKind::names());
    // Absent in the core (random seed, size from the sketch): no default in the document either.
    for field in ["seed", "width", "height", "prompt", "negative_prompt"] {
        assert!(p[field].get("default").is_none(), "{field}");
    }
    let range = |field: &str| (p[field]["minimum"].as_f64(), p[field]["maximum"].as_f64());
    let f = |r: &std::ops::RangeInclusive<f64>| (Some(*r.start()), Some(*r.end()));
    let u = |r: &std::ops::RangeInclusive<u32>| {
        (Some(f64::from(*r.start())), Some(f64::from(*r.end())))
    };
    assert_eq!(range("temperature"), f(&TEMPERATURE_RANGE));
    assert_eq!(range("guidance_scale"), f(&GUIDANCE_RANGE));
    assert_eq!(range("num_images"), u(&NUM_IMAGES_RANGE));
    assert_eq!(range("steps"), u(&STEPS_RANGE));
    for side in ["width", "height"] {
        assert_eq!(range(side), u(&SIZE_RANGE));
        assert_eq!(p[side]["multipleOf"].as_u64(), Some(SIZE_MULTIPLE.into()));
    }
}

/// The API server as a mere client of a Redis queue (`--redis`: no model, no output directory) and a worker
/// elsewhere (a pipeline on the tiny models in this process, its own thread and directory): a job submitted over
/// HTTP runs on the worker, and its images are served from Redis, byte for byte the worker's files, with no disk
/// shared between the two.
#[test]
fn a_client_only_server_serves_a_worker_job_from_redis() {
    let url = match std::env::var("SKETCHX_TEST_REDIS_URL") {
        Ok(u) if !u.is_empty() => u,
        _ => {
            eprintln!(
                "SKIPPED a_client_only_server_serves_a_worker_job_from_redis: SKETCHX_TEST_REDIS_URL is not set \
                 (scripts/test sets it)"
            );
            return;
        }
    };
    let prefix = format!(
        "sketchx-test-server-{}",
        &sketchx::JobId::random().as_str()[..8]
    );
    let mut redis = sketchx::RedisConfig::new(url.as_str());
    redis.prefix = prefix;
    redis.poll_interval = Duration::from_millis(10);

    let f = fixtures();
    let mut cfg = PipelineConfig::new(
        f.join("tiny-sd").to_str().unwrap(),
        f.join("tiny-controlnet").to_str().unwrap(),
    )
    .unwrap();
    let worker_dir = std::env::temp_dir().join(format!(
        "sketchx-server-redis-worker-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&worker_dir);
    cfg.output_dir = worker_dir.clone();
    cfg.cleanup_interval = None;
    cfg.store = sketchx::StoreConfig::Redis(redis.clone());
    let worker = Pipeline::new(cfg).unwrap();

    let client = Pipeline::connect_with(redis, 8).unwrap();
    assert!(!client.is_worker());
    let server_dir =
        std::env::temp_dir().join(format!("sketchx-server-redis-api-{}", std::process::id()));
    let s = serve(client, server_dir.clone());

    let mut form = small("2");
    form.push(("num_images", "2".into()));
    let (code, body, _) = post(&s, &form, Some(&sketch()));
    assert_eq!(code, 200, "{body}");
    let id = body["job_id"].as_str().unwrap().to_string();
    let st = wait_final(&s, &id);
    assert_eq!(st["status"], "completed", "{st}");
    assert_eq!(st["progress"], 100.0);
    let urls: Vec<&str> = st["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap())
        .collect();
    assert_eq!(urls.len(), 2, "{st}");
    for (i, u) in urls.iter().enumerate() {
        assert_eq!(*u, format!("/generated/{id}_{i}.png"));
        let (code, png) = get_bytes(&format!("{}{u}", s.base));
        assert_eq!(code, 200);
        assert_eq!(image::load_from_memory(&png).unwrap().width(), 64);
        // The worker's file, which the server never reads: the bytes came through Redis.
        assert_eq!(
            png,
            std::fs::read(worker_dir.join(format!("{id}_{i}.png"))).unwrap()
        );
    }
    assert!(!server_dir.exists(), "the client-only server wrote files");
    // Out of range, malformed and unknown images: 404.
    for bad in [
        format!("{id}_2.png"),
        format!("{id}_x.png"),
        "0123456789abcdef0123456789abcdef_0.png".to_string(),
        "nope.png".to_string(),
    ] {
        let (code, _) = get_bytes(&format!("{}/generated/{bad}", s.base));
        assert_eq!(code, 404, "{bad}");
    }
    // Cancelling through the client-only server reaches the job wherever it is (queued or on the worker).
    let (_, body, _) = post(&s, &small("150"), Some(&sketch()));
    let long = body["job_id"].as_str().unwrap().to_string();
    let (code, body, _) = call(ureq::delete(&format!("{}/api/jobs/{long}", s.base)), None);
    assert_eq!((code, body["cancelled"].as_bool()), (200, Some(true)));
    assert_eq!(wait_final(&s, &long)["status"], "cancelled");
    worker.shutdown();
    std::fs::remove_dir_all(&worker_dir).unwrap();
}

#[test]
fn the_few_step_fields_reach_the_request() {
    let s = start(64);
    let sk = sketch();
    let mut fields = small("2");
    fields.extend([
        ("scheduler", "lcm".to_string()),
        ("timestep_spacing", "trailing".into()),
        ("eta", "0.5".into()),
        ("vae", "full".into()),
        ("clip_skip", "1".into()),
    ]);
    let (code, body, _) = post(&s, &fields, Some(&sk));
    assert_eq!(code, 200, "{body}");
    let id = body["job_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let (_, st, _) = call(ureq::get(&format!("{}/api/status/{id}", s.base)), None);
        if st["status"] == "completed" || st["status"] == "failed" || Instant::now() > deadline {
            break st;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status["status"], "completed", "{status}");
    let mut tcd = small("2");
    tcd.push(("scheduler", "TCD".into()));
    tcd.push(("timestep_spacing", "".into()));
    let (code, body, _) = post(&s, &tcd, Some(&sk));
    assert_eq!(code, 200, "{body}");
    let st = wait_final(&s, body["job_id"].as_str().unwrap());
    assert_eq!(st["status"], "completed", "{st}");

    for (field, value) in [
        ("eta", "1.5"),
        ("eta", "x"),
        ("timestep_spacing", "sideways"),
        ("vae", "medium"),
        ("scheduler", "lcm2"),
        ("clip_skip", "13"),
        ("clip_skip", "3"),
        ("clip_skip", "-1"),
    ] {
        let mut fields = small("2");
        fields.push((field, value.into()));
        let (code, body, _) = post(&s, &fields, Some(&sk));
        assert_eq!(code, 422, "{field}={value}: {body}");
        assert_eq!(body["field"], field, "{body}");
    }
    s.finish();
}

#[test]
fn the_openapi_form_has_the_few_step_fields_from_the_core() {
    use sketchx::request::{GenerationRequest, VaeKind, ETA_RANGE};
    use sketchx::sampling::schedulers::TimestepSpacing;

    let form = app::generate_form_schema();
    let p = &form["properties"];
    let d = GenerationRequest::DEFAULT;
    assert_eq!(p["eta"]["default"].as_f64(), Some(d.eta));
    assert_eq!(p["eta"]["minimum"].as_f64(), Some(*ETA_RANGE.start()));
    assert_eq!(p["eta"]["maximum"].as_f64(), Some(*ETA_RANGE.end()));
    assert_eq!(p["vae"]["default"], d.vae.as_str());
    assert_eq!(p["vae"]["enum"], serde_json::json!(VaeKind::names()));
    assert_eq!(p["clip_skip"]["default"].as_u64(), Some(d.clip_skip.into()));
    assert_eq!(
        p["clip_skip"]["maximum"].as_u64(),
        Some((*sketchx::request::CLIP_SKIP_RANGE.end()).into())
    );
    assert_eq!(
        p["timestep_spacing"]["enum"],
        serde_json::json!(TimestepSpacing::names())
    );
    assert!(p["timestep_spacing"].get("default").is_none());
    let names = p["scheduler"]["enum"].as_array().unwrap();
    for kind in ["lcm", "tcd"] {
        assert!(names.iter().any(|n| n == kind), "{kind}");
    }
}

/// A multipart body with text fields and file parts (`(field, bytes)`).
fn multipart_files(fields: &[(&str, String)], files: &[(&str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "sketchxBoundary7MA4YWxkTrZu0gW";
    let mut body = Vec::new();
    for (k, v) in fields {
        body.extend(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n")
                .bytes(),
        );
    }
    for (k, data) in files {
        body.extend(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"; filename=\"{k}.png\"\r\nContent-Type: image/png\r\n\r\n")
                .bytes(),
        );
        body.extend_from_slice(data);
        body.extend(b"\r\n");
    }
    body.extend(format!("--{boundary}--\r\n").bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[test]
fn img2img_and_the_preprocessors_over_http() {
    let s = start(64);
    let sk = std::fs::read(fixtures().join("sketches/house_colour.png")).unwrap();
    let other = std::fs::read(fixtures().join("sketches/house_colour_alt.png")).unwrap();
    let send = |fields: &[(&str, String)], files: &[(&str, &[u8])]| {
        call(
            ureq::post(&format!("{}/api/generate", s.base)),
            Some(multipart_files(fields, files)),
        )
    };
    // The sketch's own colours (text part), lineart; another image (file part), canny: both complete, running
    // int(4 * strength) steps.
    let mut from_sketch = small("4");
    from_sketch.extend([
        ("start_image", "Sketch".to_string()),
        ("strength", "0.5".into()),
        ("preprocess", "lineart".into()),
    ]);
    let mut from_file = small("4");
    from_file.extend([
        ("strength", "0.75".into()),
        ("preprocess", "canny".into()),
        ("canny_low_threshold", "50".into()),
        ("canny_high_threshold", "120".into()),
    ]);
    for (fields, files, steps) in [
        (&from_sketch, vec![("sketch", &sk[..])], 2),
        (
            &from_file,
            vec![("sketch", &sk[..]), ("start_image", &other[..])],
            3,
        ),
    ] {
        let (code, body, _) = send(fields, &files);
        assert_eq!(code, 200, "{body}");
        let st = wait_final(&s, body["job_id"].as_str().unwrap());
        assert_eq!(st["status"], "completed", "{st}");
        assert_eq!(st["total_steps"], steps, "{st}");
    }
    // Bad values are 422 naming the field; a text start image other than "sketch" is never a server path.
    let garbage: &[u8] = b"not an image";
    for (field, value, file) in [
        ("strength", "1.5", None),
        ("strength", "x", None),
        ("start_image", "/etc/hostname", None),
        ("start_image", "", Some(garbage)),
        ("canny_low_threshold", "300", None),
        ("canny_high_threshold", "9999", None),
        ("preprocess", "hed", None),
    ] {
        let mut fields = small("4");
        let mut files = vec![("sketch", &sk[..])];
        match file {
            Some(bytes) => files.push((field, bytes)),
            None => fields.push((field, value.to_string())),
        }
        let (code, body, _) = send(&fields, &files);
        assert_eq!(code, 422, "{field}={value}: {body}");
        assert_eq!(body["field"], field, "{body}");
    }
    let form = app::generate_form_schema();
    let p = &form["properties"];
    let d = sketchx::request::GenerationRequest::DEFAULT;
    assert_eq!(p["strength"]["default"].as_f64(), Some(d.strength));
    assert_eq!(
        p["preprocess"]["enum"],
        serde_json::json!(sketchx::sketch::Preprocess::names())
    );
    assert_eq!(
        p["canny_high_threshold"]["default"].as_u64(),
        Some(u64::from(d.canny_high_threshold))
    );
    assert!(p.get("start_image").is_some());
    s.finish();
}

/// One raw HTTP exchange on loopback: writes `request`, reads until the server closes or a whole response with a
/// Content-Length is in; returns the status code (0 when none came within 30 s).
fn raw_exchange(base: &str, request: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let addr = base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
        let text = String::from_utf8_lossy(&got);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse::<usize>().ok());
            if len.is_some_and(|n| body.len() >= n) {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

/// A POST of `body` as multipart/form-data with `content_type`, raw (any bytes, any header).
fn raw_post(base: &str, content_type: &str, body: &[u8]) -> (u16, String) {
    let mut req = format!(
        "POST /api/generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    raw_exchange(base, &req)
}

#[test]
fn concurrent_clients_on_loopback_all_get_their_images() {
    let s = start(64);
    let sk = sketch();
    let started = Instant::now();
    let finals: Vec<Value> = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..32)
            .map(|i| {
                let (s, sk) = (&s, &sk);
                scope.spawn(move || {
                    let mut form = small("1");
                    form.push(("seed", i.to_string()));
                    let (code, body, _) = post(s, &form, Some(sk));
                    assert_eq!(code, 200, "client {i}: {body}");
                    let id = body["job_id"].as_str().unwrap().to_string();
                    let st = wait_final(s, &id);
                    let url = st["images"][0].as_str().unwrap_or_default().to_string();
                    let (code, png) = get_bytes(&format!("{}{url}", s.base));
                    assert_eq!(code, 200, "client {i}: {url}");
                    assert_eq!(image::load_from_memory(&png).unwrap().width(), 64);
                    st
                })
            })
            .collect();
        clients.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let elapsed = started.elapsed();
    assert!(finals.iter().all(|st| st["status"] == "completed"));
    let mut ids: Vec<&str> = finals
        .iter()
        .map(|st| st["job_id"].as_str().unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 32, "every client got its own job");
    println!("32 concurrent clients: {:.1} s", elapsed.as_secs_f64());
    assert!(elapsed < Duration::from_secs(300), "{elapsed:?}");
}

#[test]
fn malformed_multipart_bodies_are_client_errors_and_the_server_goes_on() {
    let s = start(64);
    let b = "sketchxBoundary7MA4YWxkTrZu0gW";
    let ct = format!("multipart/form-data; boundary={b}");
    let png = sketch();
    let mut truncated_file = format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"sketch\"; filename=\"s.png\"\r\n\r\n"
    )
    .into_bytes();
    truncated_file.extend_from_slice(&png[..png.len() / 2]);
    let cases: Vec<(&str, String, Vec<u8>)> = vec![
        ("no boundary", "multipart/form-data".into(), b"--x\r\n\r\n".to_vec()),
        ("not multipart", "application/json".into(), b"{\"prompt\": \"a\"}".to_vec()),
        ("empty body", ct.clone(), Vec::new()),
        ("garbage", ct.clone(), (0..=255u8).cycle().take(5000).collect()),
        ("other boundary", ct.clone(), b"--other\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\na\r\n--other--\r\n".to_vec()),
        ("no closing boundary", ct.clone(), format!("--{b}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\na house").into_bytes()),
        ("truncated file", ct.clone(), truncated_file),
        ("no Content-Disposition", ct.clone(), format!("--{b}\r\nContent-Type: text/plain\r\n\r\na\r\n--{b}--\r\n").into_bytes()),
        ("unterminated part headers", ct.clone(), format!("--{b}\r\nContent-Disposition: form-data; name=\"prompt\"").into_bytes()),
        ("invalid UTF-8 text", ct.clone(), [format!("--{b}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\n").as_bytes(), &[0xff, 0xfe, 0xc0], format!("\r\n--{b}--\r\n").as_bytes()].concat()),
        ("a sketch that is not an image", ct.clone(), format!("--{b}\r\nContent-Disposition: form-data; name=\"sketch\"; filename=\"s.png\"\r\n\r\nnot a png\r\n--{b}--\r\n").into_bytes()),
        ("no sketch", ct.clone(), format!("--{b}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\na\r\n--{b}--\r\n").into_bytes()),
    ];
    for (what, content_type, body) in &cases {
        let (code, text) = raw_post(&s.base, content_type, body);
        assert!(
            (400..500).contains(&code),
            "{what}: expected a 4xx, got {code}: {text}"
        );
        assert!(text.contains("detail") || code != 422, "{what}: {text}");
    }
    // Still serving.
    let (code, body, _) = post(&s, &small("1"), Some(&png));
    assert_eq!(code, 200, "{body}");
    let st = wait_final(&s, body["job_id"].as_str().unwrap());
    assert_eq!(st["status"], "completed", "{st}");
}

#[test]
fn huge_fields_are_refused_naming_the_field() {
    let s = start(64);
    let png = sketch();
    let huge = "7".repeat(3 << 20);
    for field in ["prompt", "negative_prompt", "steps", "seed", "scheduler"] {
        let mut form = small("1");
        form.retain(|(k, _)| *k != field);
        form.push((field, huge.clone()));
        let (code, body, _) = post(&s, &form, Some(&png));
        assert_eq!(code, 422, "{field}: {body}");
        assert_eq!(body["field"], field, "{body}");
    }
    // A part over the upload limit, text or file: 413 without reading the rest.
    let over = "a".repeat(app::MAX_UPLOAD_BYTES + 1);
    let mut form = small("1");
    form.push(("prompt", over));
    let (code, body, _) = post(&s, &form, Some(&png));
    assert_eq!(code, 413, "{body}");
    let big_file = vec![0u8; app::MAX_UPLOAD_BYTES + 1];
    let (code, body, _) = post(&s, &small("1"), Some(&big_file));
    assert_eq!(code, 413, "{body}");
    // A part name of a megabyte is an unknown field.
    let name: &'static str = Box::leak("n".repeat(1 << 20).into_boxed_str());
    let mut form = small("1");
    form.push((name, "1".into()));
    let (code, _, _) = post(&s, &form, Some(&png));
    assert!((400..500).contains(&code), "{code}");
}

#[test]
fn a_slow_client_blocks_no_one_and_times_out() {
    use std::io::Write;
    let timeout = Duration::from_secs(3);
    let s = start_with(64, timeout, app::HEADER_READ_TIMEOUT);
    let (ct, body) = multipart(&[("prompt", "a house"), ("steps", "1")], Some(&sketch()));
    let addr = s.base.trim_start_matches("http://").to_string();
    // The slow client: its headers at once, then one byte of its body every 100 ms.
    let slow = {
        let (addr, ct, body) = (addr.clone(), ct.clone(), body.clone());
        std::thread::spawn(move || {
            let mut stream = std::net::TcpStream::connect(&addr).unwrap();
            let head = format!(
                "POST /api/generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            stream.write_all(head.as_bytes()).unwrap();
            let started = Instant::now();
            for byte in &body {
                if stream.write_all(&[*byte]).is_err() {
                    break; // the server answered and closed
                }
                std::thread::sleep(Duration::from_millis(100));
                if started.elapsed() > Duration::from_secs(20) {
                    break;
                }
            }
            let mut rest = String::new();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let _ = std::io::Read::read_to_string(&mut stream, &mut rest);
            (started.elapsed(), rest)
        })
    };
    // Meanwhile, other clients are served at once.
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..8 {
        let t = Instant::now();
        let mut form = small("1");
        form.push(("seed", i.to_string()));
        let (code, body, _) = post(&s, &form, Some(&sketch()));
        assert_eq!(code, 200, "{body}");
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "a request waited {:?}",
            t.elapsed()
        );
    }
    let (elapsed, answer) = slow.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("did not arrive within"), "{answer}");
    assert!(
        elapsed >= timeout && elapsed < timeout + Duration::from_secs(5),
        "the slow client was cut after {elapsed:?}"
    );
}

#[test]
fn clients_trickling_or_withholding_headers_are_cut_at_the_header_deadline() {
    use std::io::{Read, Write};
    let timeout = Duration::from_secs(2);
    let s = start_with(64, app::BODY_READ_TIMEOUT, timeout);
    let addr = s.base.trim_start_matches("http://").to_string();
    // One client sends a header byte every 100 ms and never finishes; another connects and sends nothing.
    let trickling = {
        let addr = addr.clone();
        std::thread::spawn(move || {
            let mut stream = std::net::TcpStream::connect(&addr).unwrap();
            let head =
                "GET /openapi.json HTTP/1.1\r\nHost: x\r\nX-Slow: ".to_string() + &"a".repeat(400);
            let started = Instant::now();
            let mut cut = None;
            for byte in head.as_bytes() {
                if stream.write_all(&[*byte]).is_err() {
                    cut = Some(started.elapsed());
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            // A closed connection reads as end of file (or a reset) once the server dropped it.
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut rest = Vec::new();
            let read = stream.read_to_end(&mut rest);
            let closed = read.is_ok()
                || read
                    .as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset);
            (cut.unwrap_or_else(|| started.elapsed()), closed, rest)
        })
    };
    let silent = {
        let addr = addr.clone();
        std::thread::spawn(move || {
            let mut stream = std::net::TcpStream::connect(&addr).unwrap();
            let started = Instant::now();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut rest = Vec::new();
            let read = stream.read_to_end(&mut rest);
            (started.elapsed(), read.is_ok(), rest)
        })
    };
    // Meanwhile other clients are served.
    std::thread::sleep(Duration::from_millis(300));
    let (code, _) = get_bytes(&format!("{}/openapi.json", s.base));
    assert_eq!(code, 200);
    let (elapsed, closed, rest) = silent.join().unwrap();
    assert!(closed && rest.is_empty(), "{rest:?}");
    assert!(
        elapsed >= timeout - Duration::from_millis(100)
            && elapsed < timeout + Duration::from_secs(3),
        "the silent client was cut after {elapsed:?}"
    );
    let (elapsed, closed, rest) = trickling.join().unwrap();
    assert!(closed && rest.is_empty(), "{rest:?}");
    assert!(
        elapsed < timeout + Duration::from_secs(3),
        "the trickling client was cut after {elapsed:?}"
    );
}
