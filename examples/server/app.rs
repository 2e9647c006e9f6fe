//! The original service's REST API on one shared [`Pipeline`] (used by `main.rs` and by `tests/server.rs`).
//!
//! - `POST /api/generate` (multipart: `sketch` file, `prompt`, `negative_prompt`, `temperature`,
//!   `guidance_scale`, `num_images`, `steps`, `seed`, `width`, `height`, `scheduler`, `timestep_spacing`, `eta`,
//!   `vae`, `preprocess`, `canny_low_threshold`, `canny_high_threshold`, `start_image` (a file, or the text
//!   `sketch`), `strength`, `clip_skip`) -> `{"status": "queued", "job_id": ...}`
//! - `GET /api/status/{job_id}` -> the job's JSON status (images as `/generated/...` URLs)
//! - `DELETE /api/jobs/{job_id}` -> `{"job_id": ..., "cancelled": bool}`
//! - `GET /generated/...` -> the images; `GET /docs` and `GET /openapi.json` -> the API description
//!
//! Bad input is 422 naming the field, an unknown job 404, a full queue 429 with `Retry-After`, an upload over
//! the size limit 413, a body not sent within [`BODY_READ_TIMEOUT`] 408; nothing a client sends produces a 500.

use axum::extract::multipart::MultipartError;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Multipart, Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use serde_json::{json, Value};
use sketchx::request::{
    GenerationRequest, StartImage, VaeKind, CANNY_THRESHOLD_RANGE, CLIP_SKIP_RANGE, ETA_RANGE,
    GUIDANCE_RANGE, NUM_IMAGES_RANGE, SIZE_MULTIPLE, SIZE_RANGE, STEPS_RANGE, STRENGTH_RANGE,
    TEMPERATURE_RANGE,
};
use sketchx::sampling::schedulers::{SchedulerKind, TimestepSpacing};
use sketchx::sketch::Preprocess;
use sketchx::{Error, JobId, Pipeline};
use tower_http::services::ServeDir;

/// Largest accepted upload (the whole multipart body).
pub const MAX_UPLOAD_BYTES: usize = 10 * 1024 * 1024;

/// How long a client may take to send a `POST /api/generate` body once its headers are in: a client that sends
/// slowly (or stops) gets 408 then instead of holding its connection and buffers forever. Other clients are
/// never waiting on it (every connection is its own task).
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a client may take to send a request's headers (from its first byte, or from the end of the previous
/// request on a kept-alive connection). A client trickling header bytes is cut then; without it such a client
/// holds its connection for ever.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The body read deadline a router applies (see [`BODY_READ_TIMEOUT`]).
#[derive(Clone, Copy)]
struct BodyTimeout(Duration);

/// An HTTP error response: a status code and a JSON body `{"detail": ..., "field": ...}`.
pub struct ApiError {
    status: StatusCode,
    detail: String,
    field: Option<String>,
    retry_after: Option<u64>,
}

impl ApiError {
    fn unprocessable(field: &str, detail: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            detail: detail.into(),
            field: Some(field.to_string()),
            retry_after: None,
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let (status, field, retry_after) = match &e {
            Error::InvalidRequest { field, .. } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                Some(field.to_string()),
                None,
            ),
            Error::InvalidSketch(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                Some("sketch".to_string()),
                None,
            ),
            Error::UnknownJob(_) => (StatusCode::NOT_FOUND, None, None),
            Error::QueueFull { .. } => (StatusCode::TOO_MANY_REQUESTS, None, Some(30)),
            Error::ShutDown => (StatusCode::SERVICE_UNAVAILABLE, None, Some(60)),
            Error::Store { .. } => (StatusCode::SERVICE_UNAVAILABLE, None, Some(5)),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, None, None),
        };
        ApiError {
            status,
            detail: e.to_string(),
            field,
            retry_after,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "detail": self.detail });
        if let Some(f) = self.field {
            body["field"] = Value::String(f);
        }
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// A multipart body that cannot be read: 413 past [`MAX_UPLOAD_BYTES`] (read no further), 400 when malformed.
fn body_error(e: MultipartError, field: Option<&str>) -> ApiError {
    ApiError {
        status: e.status(),
        detail: e.body_text(),
        field: field.map(str::to_string),
        retry_after: None,
    }
}

/// The form's fields: the request, the sketch (if sent) and the `start_image` part (whether a file, its bytes).
type Form = (GenerationRequest, Option<Vec<u8>>, Option<(bool, Vec<u8>)>);

/// Reads every part of the multipart form.
async fn read_form(mut form: Multipart) -> Result<Form, ApiError> {
    let mut req = GenerationRequest::DEFAULT;
    let mut sketch: Option<Vec<u8>> = None;
    // A file part is an image to decode; a text part `sketch` asks for the sketch itself.
    let mut start: Option<(bool, Vec<u8>)> = None;
    loop {
        let field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(body_error(e, None)),
        };
        let name = field.name().unwrap_or_default().to_string();
        if name == "sketch" {
            let data = field
                .bytes()
                .await
                .map_err(|e| body_error(e, Some("sketch")))?;
            sketch = Some(data.to_vec());
            continue;
        }
        if name == "start_image" {
            let is_file = field.file_name().is_some();
            let data = field
                .bytes()
                .await
                .map_err(|e| body_error(e, Some("start_image")))?;
            start = Some((is_file, data.to_vec()));
            continue;
        }
        let text = field.text().await.map_err(|e| body_error(e, Some(&name)))?;
        // The core parses every field (`set_form_field`, also what the fuzzer drives); unknown names stop here.
        if !req.set_form_field(&name, &text)? {
            return Err(ApiError::unprocessable(
                &name,
                format!("unknown field {name:?}"),
            ));
        }
    }
    Ok((req, sketch, start))
}

async fn generate(
    State(pipe): State<Pipeline>,
    Extension(BodyTimeout(limit)): Extension<BodyTimeout>,
    form: Multipart,
) -> Result<Response, ApiError> {
    let (mut req, sketch, start) = tokio::time::timeout(limit, read_form(form))
        .await
        .map_err(|_| ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            detail: format!(
                "the request body did not arrive within {} s",
                limit.as_secs_f64()
            ),
            field: None,
            retry_after: None,
        })??;
    let sketch =
        sketch.ok_or_else(|| ApiError::unprocessable("sketch", "sketch: a file is required"))?;
    // Decoding the images takes milliseconds: keep it off the async executor.
    let id = tokio::task::spawn_blocking(move || {
        req.start_image = match start {
            None => None,
            Some((false, text)) if text.trim_ascii().is_empty() => None,
            Some((false, text))
                if text
                    .trim_ascii()
                    .eq_ignore_ascii_case(StartImage::SKETCH_NAME.as_bytes()) =>
            {
                Some(StartImage::Sketch)
            }
            Some((_, bytes)) => Some(StartImage::decode(&bytes)?),
        };
        pipe.submit(req, sketch)
    })
    .await
    .map_err(|e| ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        detail: e.to_string(),
        field: None,
        retry_after: None,
    })??;
    Ok((
        StatusCode::OK,
        Json(json!({ "status": "queued", "job_id": id.as_str() })),
    )
        .into_response())
}

fn job_id(text: &str) -> Result<JobId, ApiError> {
    Ok(text.parse::<JobId>()?)
}

async fn status(
    State(pipe): State<Pipeline>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let st = pipe.poll(&job_id(&id)?)?;
    let mut body = serde_json::to_value(&st).expect("status serialises");
    body["images"] = st
        .images
        .iter()
        .filter_map(|p| {
            p.file_name()
                .map(|n| format!("/generated/{}", n.to_string_lossy()))
        })
        .collect();
    Ok(Json(body))
}

async fn cancel(
    State(pipe): State<Pipeline>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = job_id(&id)?;
    let cancelled = pipe.cancel(&id)?;
    Ok(Json(
        json!({ "job_id": id.as_str(), "cancelled": cancelled }),
    ))
}

/// The JSON schema of a number field: the core's range and default.
fn number<T: Into<Value> + Copy>(range: &std::ops::RangeInclusive<T>, default: T) -> Value {
    json!({ "type": "number", "minimum": (*range.start()).into(), "maximum": (*range.end()).into(),
            "default": default.into() })
}

/// The JSON schema of an integer field: the core's range, and its default if it has one.
fn integer(range: &std::ops::RangeInclusive<u32>, default: Option<u32>) -> Value {
    let mut schema = json!({ "type": "integer", "minimum": range.start(), "maximum": range.end() });
    if let Some(d) = default {
        schema["default"] = d.into();
    }
    schema
}

/// The multipart form of `POST /api/generate`: every default, range and name is the core's
/// ([`GenerationRequest::DEFAULT`], the `*_RANGE` constants, [`SchedulerKind::names`], [`TimestepSpacing::names`],
/// [`VaeKind::names`]).
pub fn generate_form_schema() -> Value {
    let d = GenerationRequest::DEFAULT;
    let mut size = integer(&SIZE_RANGE, None);
    size["multipleOf"] = SIZE_MULTIPLE.into();
    let mut clip_skip = integer(&CLIP_SKIP_RANGE, Some(d.clip_skip));
    clip_skip["description"] = "diffusers' clip_skip: the prompt is encoded by the hidden state this many layers \
                                before the last (A1111's clip skip N is N - 1); the negative prompt always uses \
                                the last layer"
        .into();
    json!({
        "type": "object", "required": ["sketch"],
        "properties": {
            "sketch": { "type": "string", "format": "binary" },
            "prompt": { "type": "string" },
            "negative_prompt": { "type": "string" },
            "temperature": number(&TEMPERATURE_RANGE, d.temperature),
            "guidance_scale": number(&GUIDANCE_RANGE, d.guidance_scale),
            "num_images": integer(&NUM_IMAGES_RANGE, Some(d.num_images)),
            "steps": integer(&STEPS_RANGE, Some(d.steps)),
            "seed": { "type": "integer", "minimum": 0, "maximum": u64::MAX },
            "width": size.clone(),
            "height": size,
            "scheduler": { "type": "string", "enum": SchedulerKind::names(),
                           "default": d.scheduler.as_str() },
            "timestep_spacing": { "type": "string", "enum": TimestepSpacing::names(),
                                  "description": "default: the model's scheduler config" },
            "eta": number(&ETA_RANGE, d.eta),
            "vae": { "type": "string", "enum": VaeKind::names(), "default": d.vae.as_str(),
                     "description": "tiny needs a server started with --tiny-vae" },
            "preprocess": { "type": "string", "enum": Preprocess::names(), "default": d.preprocess.as_str() },
            "canny_low_threshold": integer(&CANNY_THRESHOLD_RANGE, Some(d.canny_low_threshold)),
            "canny_high_threshold": integer(&CANNY_THRESHOLD_RANGE, Some(d.canny_high_threshold)),
            "start_image": { "description": "img2img: an image file to start from, or the text \"sketch\" for \
                                             the sketch's own colours; absent: from noise",
                             "oneOf": [ { "type": "string", "format": "binary" },
                                        { "type": "string", "enum": [StartImage::SKETCH_NAME] } ] },
            "strength": number(&STRENGTH_RANGE, d.strength),
            "clip_skip": clip_skip } })
}

/// The OpenAPI 3.1 description of this API.
pub fn openapi() -> Value {
    let err = json!({ "description": "error", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } });
    json!({
        "openapi": "3.1.0",
        "info": { "title": "sketchx", "version": env!("CARGO_PKG_VERSION"),
                  "description": "Sketch to image with Stable Diffusion 1.5 + scribble ControlNet." },
        "paths": {
            "/api/generate": { "post": {
                "summary": "Queue a generation job",
                "requestBody": { "required": true, "content": { "multipart/form-data": {
                    "schema": generate_form_schema() } } },
                "responses": {
                    "200": { "description": "queued", "content": { "application/json": { "schema": {
                        "type": "object", "properties": { "status": { "const": "queued" }, "job_id": { "type": "string" } } } } } },
                    "413": err, "422": err, "429": err } } },
            "/api/status/{job_id}": { "get": {
                "summary": "A job's status",
                "parameters": [{ "name": "job_id", "in": "path", "required": true, "schema": { "type": "string" } }],
                "responses": { "200": { "description": "status", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/JobStatus" } } } }, "404": err } } },
            "/api/jobs/{job_id}": { "delete": {
                "summary": "Cancel a job",
                "parameters": [{ "name": "job_id", "in": "path", "required": true, "schema": { "type": "string" } }],
                "responses": { "200": { "description": "cancel result" }, "404": err } } }
        },
        "components": { "schemas": {
            "Error": { "type": "object", "properties": { "detail": { "type": "string" }, "field": { "type": "string" } } },
            "JobStatus": { "type": "object", "required": ["job_id", "status", "progress", "images", "message"], "properties": {
                "job_id": { "type": "string" },
                "status": { "type": "string", "enum": ["queued", "running", "completed", "failed", "cancelled"] },
                "progress": { "type": "number", "minimum": 0, "maximum": 100 },
                "images": { "type": "array", "items": { "type": "string" } },
                "message": { "type": "string" },
                "step": { "type": "integer" }, "total_steps": { "type": "integer" },
                "queue_position": { "type": ["integer", "null"] }, "eta_secs": { "type": ["number", "null"] },
                "seed": { "type": "integer" } } } } }
    })
}

async fn docs() -> Html<String> {
    Html(format!(
        "<!doctype html><title>sketchx API</title><h1>sketchx API</h1>\
         <p>The OpenAPI description: <a href=\"/openapi.json\">/openapi.json</a></p><pre>{}</pre>",
        serde_json::to_string_pretty(&openapi())
            .unwrap()
            .replace('<', "&lt;")
    ))
}

/// The router serving the API on `pipe`: images from its output directory, or, for a client of a Redis queue
/// (`--redis`, no model here), from the store.
pub fn router(pipe: Pipeline) -> Router {
    router_with(pipe, BODY_READ_TIMEOUT)
}

/// [`router`] with another body read deadline (tests use a short one).
pub fn router_with(pipe: Pipeline, body_timeout: Duration) -> Router {
    let api = Router::new()
        .route("/api/generate", post(generate))
        .route("/api/status/{job_id}", get(status))
        .route("/api/jobs/{job_id}", delete(cancel))
        .route("/openapi.json", get(|| async { Json(openapi()) }))
        .route("/docs", get(docs));
    let api = if pipe.is_worker() {
        api.nest_service("/generated", ServeDir::new(pipe.output_dir()))
    } else {
        api.route("/generated/{file}", get(stored_image))
    };
    api.layer(DefaultBodyLimit::max(MAX_UPLOAD_BYTES))
        .layer(Extension(BodyTimeout(body_timeout)))
        .with_state(pipe)
}

/// Serves `router` over HTTP/1.1 on `listener` until `shutdown` completes, then lets open connections finish
/// their requests (at most `grace`). Each connection is its own task, with `header_timeout` as hyper's header read
/// deadline (axum::serve sets no timer, so hyper would wait for headers for ever).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    header_timeout: Duration,
    shutdown: impl std::future::Future<Output = ()>,
    grace: Duration,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of descriptors, or a connection reset before accept: go on after a pause, not in a spin.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            // A client's broken connection or timeout ends only its own task.
            let _ = conn.await;
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(grace, graceful.shutdown()).await;
}

/// `GET /generated/<job_id>_<i>.png` on a Redis client: the PNG bytes the worker stored.
async fn stored_image(
    State(pipe): State<Pipeline>,
    Path(file): Path<String>,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::from(Error::UnknownJob(file.clone()));
    let id = sketchx::cleanup::owner_of(&file).ok_or_else(not_found)?;
    let index: usize = file
        .strip_suffix(".png")
        .and_then(|n| n.rsplit_once('_'))
        .and_then(|(_, i)| i.parse().ok())
        .ok_or_else(not_found)?;
    let id = job_id(id)?;
    let png = tokio::task::spawn_blocking(move || pipe.images(&id))
        .await
        .map_err(|e| ApiError::from(Error::JobFailed(e.to_string())))??
        .into_iter()
        .nth(index)
        .ok_or_else(not_found)?;
    Ok(([(axum::http::header::CONTENT_TYPE, "image/png")], png).into_response())
}
