//! The Redis job store: jobs shared by any number of client and worker processes through one Redis server.
//!
//! Layout, under a key prefix `P` (several deployments can share one Redis):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:stream` | stream, consumer group `workers` | one entry per delivery of a job (`job` = its id) |
//! | `P:queued` | sorted set | ids of queued jobs by submission order (queue positions, the queue bound) |
//! | `P:seq` | counter | submission order |
//! | `P:job:<id>` | hash | state, message, progress, request, size, seed, times, image paths, cancel flag, owner |
//! | `P:sketch:<id>` | string | the decoded sketch, until the job is final |
//! | `P:png:<id>` | hash | index -> PNG bytes of a completed job |
//! | `P:worker:<name>` | string with a TTL | a worker's heartbeat: the job it runs |
//!
//! Every transition is one Lua script, which Redis runs without interleaving anything else: the same guarantee
//! as the memory store's single lock. Workers read new entries with `XREADGROUP` and acknowledge (`XACK`, then
//! `XDEL`) only when the job is final. While a worker runs a job it heartbeats: it refreshes its key and resets
//! the entry's idle time with `XCLAIM ... JUSTID` (which does not count as a delivery). An entry idle longer than
//! the heartbeat timeout therefore belongs to a worker that died, and an idle worker takes it over with
//! `XAUTOCLAIM`. Each start counts an attempt on the job; a job started `max_deliveries` times without finishing
//! (one that kills every worker that runs it) fails instead of being delivered again. Only the owner recorded in
//! the job may report progress or finish it, so a worker presumed dead that comes back cannot overwrite the
//! result of the worker that took over: execution is at least once, the final state exactly once. Final jobs'
//! keys expire after the retention.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::{Script, Value};

use super::{
    eta_secs, progress_percent, Claim, Events, JobStore, NewJob, Outcome, Progress, StopFlag,
    StopReason,
};
use crate::error::{Error, Result};
use crate::jobs::{messages, JobId, JobState, JobStatus};
use crate::jobs::{EventCallback, Preview};
use crate::request::{GenerationRequest, StartImage};
use crate::sketch::Sketch;

/// The key prefix unless told otherwise.
pub const DEFAULT_PREFIX: &str = "sketchx";
/// Seconds between a worker's heartbeats unless told otherwise.
pub const DEFAULT_HEARTBEAT_SECS: u64 = 10;
/// Seconds of a worker's silence after which its job goes to another worker, unless told otherwise.
pub const DEFAULT_HEARTBEAT_TIMEOUT_SECS: u64 = 30;
/// Starts after which a job that never finishes fails, unless told otherwise.
pub const DEFAULT_MAX_DELIVERIES: u32 = 3;

/// How to reach and use a Redis job store.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]` (or `rediss://`, `unix://`).
    pub url: String,
    /// Prefix of every key, so several deployments can share one Redis. Default `sketchx`.
    pub prefix: String,
    /// How often a worker says it is alive. Default 10 s.
    pub heartbeat_interval: Duration,
    /// A job whose worker has been silent this long is delivered to another worker. Default 30 s (so a job is
    /// running again within about 30 s of its worker's death, and within 60 s whatever the timing).
    pub heartbeat_timeout: Duration,
    /// A job started this many times without finishing fails instead of being delivered again. Default 3.
    pub max_deliveries: u32,
    /// How long a final job's status and images stay in the store. Default one hour.
    pub retention: Duration,
    /// This process's consumer name in the group; default `<host>-<pid>-<random>`.
    pub worker_name: Option<String>,
    /// Connect timeout, and the longest a command may take. Default 10 s.
    pub timeout: Duration,
    /// How often `wait` looks at a job. Default 50 ms.
    pub poll_interval: Duration,
}

impl RedisConfig {
    /// Defaults for the server at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: DEFAULT_PREFIX.into(),
            heartbeat_interval: Duration::from_secs(DEFAULT_HEARTBEAT_SECS),
            heartbeat_timeout: Duration::from_secs(DEFAULT_HEARTBEAT_TIMEOUT_SECS),
            max_deliveries: DEFAULT_MAX_DELIVERIES,
            retention: Duration::from_secs(super::DEFAULT_RETENTION_SECS),
            worker_name: None,
            timeout: Duration::from_secs(10),
            poll_interval: Duration::from_millis(50),
        }
    }

    fn validate(&self) -> Result<()> {
        if self.prefix.is_empty() || self.prefix.contains(char::is_whitespace) {
            return Err(Error::invalid(
                "prefix",
                "must be non-empty and without spaces",
            ));
        }
        if self.heartbeat_interval.is_zero() || self.heartbeat_timeout <= self.heartbeat_interval {
            return Err(Error::invalid(
                "heartbeat_timeout",
                "must be longer than a positive heartbeat_interval",
            ));
        }
        if self.max_deliveries == 0 {
            return Err(Error::invalid("max_deliveries", "must be at least 1"));
        }
        if self.retention.is_zero() {
            return Err(Error::invalid("retention", "must be positive"));
        }
        Ok(())
    }
}

/// The server's address without credentials, for error messages.
fn display_url(url: &str) -> String {
    match (url.split_once("://"), url.rsplit_once('@')) {
        (Some((scheme, _)), Some((_, host))) => format!("{scheme}://{host}"),
        _ => url.to_string(),
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn from_unix(s: &str) -> Option<SystemTime> {
    let secs: f64 = s.parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| UNIX_EPOCH + Duration::from_secs_f64(secs))
}

fn millis(d: Duration) -> u64 {
    d.as_millis().clamp(1, u64::MAX as u128) as u64
}

/// Connections to one server: each caller takes an idle one (or opens one), so threads never queue behind a
/// worker's blocking read. A connection that fails with an I/O error is dropped and the command retried once on
/// a fresh one: that is how clients and workers come back after the server restarts.
struct Pool {
    client: redis::Client,
    idle: Mutex<Vec<redis::Connection>>,
    label: String,
    timeout: Duration,
}

impl Pool {
    fn connect(&self) -> redis::RedisResult<redis::Connection> {
        let con = self.client.get_connection_with_timeout(self.timeout)?;
        con.set_read_timeout(Some(self.timeout))?;
        con.set_write_timeout(Some(self.timeout))?;
        Ok(con)
    }

    fn run<T>(
        &self,
        mut f: impl FnMut(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T> {
        let mut last = None;
        for _ in 0..2 {
            let pooled = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let mut con = match pooled.map_or_else(|| self.connect(), Ok) {
                Ok(c) => c,
                Err(e) => return Err(self.error(e)),
            };
            match f(&mut con) {
                Ok(v) => {
                    self.idle
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(con);
                    return Ok(v);
                }
                Err(e) if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() => {
                    last = Some(e);
                }
                Err(e) => {
                    self.idle
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(con);
                    return Err(self.error(e));
                }
            }
        }
        Err(self.error(last.expect("the loop ran")))
    }

    fn error(&self, e: redis::RedisError) -> Error {
        Error::Store {
            key: self.label.clone(),
            message: e.to_string(),
        }
    }
}

/// Reads a bulk or simple string reply as text.
fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        Value::Okay => Some("OK".into()),
        _ => None,
    }
}

fn bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => text(other)?.parse().ok(),
    }
}

fn array(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        _ => Vec::new(),
    }
}

/// How a request's start image is named in the stored JSON; an `"image"`'s pixels follow the sketch's in the
/// job's sketch key.
fn start_image_name(s: Option<&StartImage>) -> Option<&'static str> {
    s.map(|s| match s {
        StartImage::Sketch => StartImage::SKETCH_NAME,
        StartImage::Image(_) => "image",
    })
}

/// The request as it travels through the store: JSON with the scheduler and preprocessing by name, the start
/// image by [`start_image_name`] (its pixels travel with the sketch's: [`images_to_bytes`]).
fn request_to_json(r: &GenerationRequest) -> String {
    serde_json::json!({
        "start_image": start_image_name(r.start_image.as_ref()), "strength": r.strength,
        "canny_low_threshold": r.canny_low_threshold, "canny_high_threshold": r.canny_high_threshold,
        "prompt": r.prompt, "negative_prompt": r.negative_prompt, "temperature": r.temperature,
        "controlnet_scale": r.controlnet_scale, "guidance_scale": r.guidance_scale,
        "num_images": r.num_images, "steps": r.steps, "seed": r.seed, "width": r.width, "height": r.height,
        "scheduler": r.scheduler.as_str(), "preprocess": r.preprocess.as_str(), "guess_mode": r.guess_mode,
        "control_guidance_start": r.control_guidance_start, "control_guidance_end": r.control_guidance_end,
        "timestep_spacing": r.timestep_spacing.map(|s| s.as_str()), "eta": r.eta, "vae": r.vae.as_str(),
        "clip_skip": r.clip_skip,
    })
    .to_string()
}

/// The request stored by [`request_to_json`], and whether a start image's pixels follow the sketch's (the request's
/// `start_image` is then set by [`images_from_bytes`]).
fn request_from_json(s: &str) -> std::result::Result<(GenerationRequest, bool), String> {
    let v: serde_json::Value = serde_json::from_str(s).map_err(|e| e.to_string())?;
    let field = |k: &str| v.get(k).cloned().unwrap_or(serde_json::Value::Null);
    fn typed<T: serde::de::DeserializeOwned>(
        v: serde_json::Value,
        k: &str,
    ) -> std::result::Result<T, String> {
        serde_json::from_value(v).map_err(|e| format!("{k}: {e}"))
    }
    let get = |k: &str| typed(field(k), k);
    let named = |k: &str| -> std::result::Result<String, String> { typed(field(k), k) };
    let d = GenerationRequest::DEFAULT;
    // Absent in jobs queued before img2img and canny existed: no start image, the defaults.
    let start = typed::<Option<String>>(field("start_image"), "start_image")?;
    let (start_image, image_follows) = match start.as_deref() {
        None => (None, false),
        Some(StartImage::SKETCH_NAME) => (Some(StartImage::Sketch), false),
        Some("image") => (None, true),
        Some(other) => return Err(format!("start_image: unknown kind {other:?}")),
    };
    let request = GenerationRequest {
        start_image,
        strength: typed::<Option<f64>>(field("strength"), "strength")?.unwrap_or(d.strength),
        canny_low_threshold: typed::<Option<u32>>(
            field("canny_low_threshold"),
            "canny_low_threshold",
        )?
        .unwrap_or(d.canny_low_threshold),
        canny_high_threshold: typed::<Option<u32>>(
            field("canny_high_threshold"),
            "canny_high_threshold",
        )?
        .unwrap_or(d.canny_high_threshold),
        prompt: typed(field("prompt"), "prompt")?,
        negative_prompt: typed(field("negative_prompt"), "negative_prompt")?,
        temperature: get("temperature")?,
        controlnet_scale: typed(field("controlnet_scale"), "controlnet_scale")?,
        guidance_scale: get("guidance_scale")?,
        num_images: typed(field("num_images"), "num_images")?,
        steps: typed(field("steps"), "steps")?,
        seed: typed(field("seed"), "seed")?,
        width: typed(field("width"), "width")?,
        height: typed(field("height"), "height")?,
        scheduler: named("scheduler")?
            .parse()
            .map_err(|e: Error| e.to_string())?,
        preprocess: named("preprocess")?
            .parse()
            .map_err(|e: Error| e.to_string())?,
        guess_mode: typed(field("guess_mode"), "guess_mode")?,
        control_guidance_start: get("control_guidance_start")?,
        control_guidance_end: get("control_guidance_end")?,
        // Absent in requests stored before these fields existed: the defaults.
        timestep_spacing: typed::<Option<String>>(field("timestep_spacing"), "timestep_spacing")?
            .map(|s| s.parse().map_err(|e: Error| e.to_string()))
            .transpose()?,
        eta: typed::<Option<f64>>(field("eta"), "eta")?.unwrap_or(GenerationRequest::DEFAULT.eta),
        // Absent in jobs queued before the field existed: the default.
        vae: match typed::<Option<String>>(field("vae"), "vae")? {
            Some(name) => name.parse().map_err(|e: Error| e.to_string())?,
            None => d.vae,
        },
        clip_skip: typed::<Option<u32>>(field("clip_skip"), "clip_skip")?
            .unwrap_or(GenerationRequest::DEFAULT.clip_skip),
    };
    Ok((request, image_follows))
}

/// A sketch as stored: width and height (u32 little-endian), then RGB8 pixels.
fn sketch_to_bytes(s: &Sketch) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + s.rgb().len());
    b.extend_from_slice(&s.width().to_le_bytes());
    b.extend_from_slice(&s.height().to_le_bytes());
    b.extend_from_slice(s.rgb());
    b
}

/// A job's images as stored under its sketch key: the sketch ([`sketch_to_bytes`]), then the start image's
/// the same way when the request has one of its own.
fn images_to_bytes(sketch: &Sketch, request: &GenerationRequest) -> Vec<u8> {
    let mut b = sketch_to_bytes(sketch);
    if let Some(StartImage::Image(image)) = &request.start_image {
        b.extend_from_slice(&sketch_to_bytes(image));
    }
    b
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// One image stored by [`sketch_to_bytes`] at the start of `b`, and the bytes after it.
fn image_from_bytes<'a>(b: &'a [u8], field: &'static str) -> Result<(Sketch, &'a [u8])> {
    let truncated = || Error::invalid(field, "stored image is truncated");
    let (Some(w), Some(h)) = (u32_at(b, 0), u32_at(b, 4)) else {
        return Err(truncated());
    };
    let len = (w as usize)
        .checked_mul(h as usize)
        .and_then(|n| n.checked_mul(3))
        .ok_or_else(truncated)?;
    let pixels = b
        .get(8..)
        .and_then(|p| p.get(..len))
        .ok_or_else(truncated)?;
    Ok((Sketch::from_rgb8(w, h, pixels.to_vec())?, &b[8 + len..]))
}

fn sketch_from_bytes(b: &[u8]) -> Result<Sketch> {
    let (sketch, rest) = image_from_bytes(b, "sketch")?;
    if !rest.is_empty() {
        return Err(Error::invalid("sketch", "stored sketch has trailing bytes"));
    }
    Ok(sketch)
}

/// The sketch, and the start image when `image_follows` (set into `request`), as [`images_to_bytes`] stored them.
fn images_from_bytes(
    b: &[u8],
    request: &mut GenerationRequest,
    image_follows: bool,
) -> Result<Sketch> {
    if !image_follows {
        return sketch_from_bytes(b);
    }
    let (sketch, rest) = image_from_bytes(b, "sketch")?;
    let (image, rest) = image_from_bytes(rest, "start_image")?;
    if !rest.is_empty() {
        return Err(Error::invalid(
            "start_image",
            "stored start image has trailing bytes",
        ));
    }
    request.start_image = Some(StartImage::Image(std::sync::Arc::new(image)));
    Ok(sketch)
}

/// A preview as stored: step, width, height (u32 little-endian), then RGB8 pixels.
fn preview_to_bytes(p: &Preview) -> Vec<u8> {
    let mut b = Vec::with_capacity(12 + p.rgb.len());
    for v in [p.step as u32, p.width, p.height] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(&p.rgb);
    b
}

fn preview_from_bytes(b: &[u8]) -> Option<Preview> {
    Some(Preview {
        step: u32_at(b, 0)? as usize,
        width: u32_at(b, 4)?,
        height: u32_at(b, 8)?,
        rgb: b.get(12..)?.to_vec(),
    })
}

/// Queues a job unless the queue is full. KEYS: queued, job, sketch, stream, seq. ARGV: capacity, id, sketch,
/// then the job hash's fields and values. Returns 1, -1 (full) or -2 (already there: a retried call).
const ENQUEUE: &str = r#"
if redis.call('EXISTS', KEYS[2]) == 1 then return -2 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return -1 end
local seq = redis.call('INCR', KEYS[5])
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
redis.call('SET', KEYS[3], ARGV[3])
redis.call('ZADD', KEYS[1], seq, ARGV[2])
local entry = redis.call('XADD', KEYS[4], '*', 'job', ARGV[2])
redis.call('HSET', KEYS[2], 'entry', entry, 'seq', seq)
return 1
"#;

/// A worker starts a delivered entry. KEYS: job, queued, stream, sketch. ARGV: group, entry, consumer, now,
/// max deliveries, retention ms, id, the failure message for a job out of attempts. Returns {'run', request,
/// sketch} or {'skip'} (cancelled, final, stale or expired: acknowledged and dropped) or {'poison'}.
const START: &str = r#"
local function drop_entry()
  redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[3], ARGV[2])
end
local function final(state, message)
  redis.call('HSET', KEYS[1], 'state', state, 'message', message, 'finished_at', ARGV[4])
  redis.call('HDEL', KEYS[1], 'preview')
  redis.call('ZREM', KEYS[2], ARGV[7])
  redis.call('DEL', KEYS[4])
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
  drop_entry()
end
local st = redis.call('HGET', KEYS[1], 'state')
if (st ~= 'queued' and st ~= 'running') or redis.call('HGET', KEYS[1], 'entry') ~= ARGV[2] then
  drop_entry()
  return {'skip'}
end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then
  final('cancelled', 'Task was cancelled.')
  return {'skip'}
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if attempts > tonumber(ARGV[5]) then
  final('failed', ARGV[8])
  return {'poison'}
end
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[3], 'started_at', ARGV[4], 'step', 0,
  'decoded', 0, 'message', 'Task is in progress.')
redis.call('HDEL', KEYS[1], 'preview')
redis.call('ZREM', KEYS[2], ARGV[7])
return {'run', redis.call('HGET', KEYS[1], 'request'), redis.call('GET', KEYS[4])}
"#;

/// Progress of a running job. KEYS: job. ARGV: consumer, step, total, decoded, preview (or ''). Returns 1 (go
/// on), 0 (cancelled) or -1 (this worker no longer owns the job).
const PROGRESS: &str = r#"
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'state') ~= 'running' then
  return -1
end
redis.call('HSET', KEYS[1], 'step', ARGV[2], 'total_steps', ARGV[3], 'decoded', ARGV[4])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'preview', ARGV[5]) end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return 0 end
return 1
"#;

/// The final state of a run. KEYS: job, stream, sketch, png. ARGV: group, entry, consumer, state, message, now,
/// retention ms, images JSON, then the PNGs. A cancel recorded meanwhile wins over completion. Returns the state
/// written, or nil if this worker no longer owns the job.
const FINISH: &str = r#"
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[3] or redis.call('HGET', KEYS[1], 'state') ~= 'running' then
  return false
end
local state, message, images = ARGV[4], ARGV[5], ARGV[8]
if redis.call('HGET', KEYS[1], 'cancel') == '1' and state ~= 'failed' then
  state, message, images = 'cancelled', 'Task was cancelled.', '[]'
end
redis.call('HSET', KEYS[1], 'state', state, 'message', message, 'finished_at', ARGV[6], 'images', images)
redis.call('HDEL', KEYS[1], 'preview')
if state == 'completed' and #ARGV > 8 then
  for i = 9, #ARGV do redis.call('HSET', KEYS[4], tostring(i - 9), ARGV[i]) end
  redis.call('PEXPIRE', KEYS[4], ARGV[7])
end
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('DEL', KEYS[3])
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
return state
"#;

/// A worker that shuts down gives its running job back: a fresh entry at the end of the stream, not counted
/// as an attempt. KEYS: job, stream, queued, seq, sketch. ARGV: group, entry, consumer, id, now, retention ms.
/// Returns 1 (re-queued), 2 (it had been cancelled: now final) or 0 (not ours).
const HAND_BACK: &str = r#"
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[3] or redis.call('HGET', KEYS[1], 'state') ~= 'running' then
  return 0
end
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
redis.call('HDEL', KEYS[1], 'preview', 'started_at')
if redis.call('HGET', KEYS[1], 'cancel') == '1' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'message', 'Task was cancelled.', 'finished_at', ARGV[5])
  redis.call('DEL', KEYS[5])
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
  return 2
end
local seq = redis.call('INCR', KEYS[4])
local entry = redis.call('XADD', KEYS[2], '*', 'job', ARGV[4])
redis.call('HSET', KEYS[1], 'state', 'queued', 'message', 'Task is waiting in the queue.', 'step', 0,
  'decoded', 0, 'worker', '', 'entry', entry, 'seq', seq)
redis.call('HINCRBY', KEYS[1], 'attempts', -1)
redis.call('ZADD', KEYS[3], seq, ARGV[4])
return 1
"#;

/// Cancels a job. KEYS: job, queued, sketch. ARGV: id, now, retention ms. Returns -1 (unknown), 0 (already
/// final), 1 (cancelled, or flagged while running).
const CANCEL: &str = r#"
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return -1 end
if st == 'queued' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'message', 'Task was cancelled.', 'finished_at', ARGV[2],
    'cancel', '1')
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('DEL', KEYS[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
if st == 'running' then
  redis.call('HSET', KEYS[1], 'cancel', '1')
  return 1
end
return 0
"#;

/// A worker's heartbeat. KEYS: worker key, job, stream. ARGV: consumer, ttl ms, group, entry (or ''), id.
/// Resets the entry's idle time (XCLAIM JUSTID: no delivery counted) while the job is still this worker's.
/// Returns 1, or 0 if the job is no longer this worker's.
const HEARTBEAT: &str = r#"
redis.call('SET', KEYS[1], ARGV[5], 'PX', ARGV[2])
if ARGV[4] == '' then return 1 end
if redis.call('HGET', KEYS[2], 'worker') ~= ARGV[1] or redis.call('HGET', KEYS[2], 'state') ~= 'running' then
  return 0
end
redis.pcall('XCLAIM', KEYS[3], ARGV[3], ARGV[1], 0, ARGV[4], 'JUSTID')
return 1
"#;

/// Fields read for a status, in this order.
const STATUS_FIELDS: [&str; 13] = [
    "state",
    "message",
    "step",
    "total_steps",
    "decoded",
    "seed",
    "num_images",
    "width",
    "height",
    "created_at",
    "started_at",
    "finished_at",
    "images",
];

/// A job's status fields and its queue rank. KEYS: job, queued. ARGV: id, then the fields.
const STATUS: &str = r#"
local v = redis.call('HMGET', KEYS[1], unpack(ARGV, 2))
if not v[1] then return false end
local rank = false
if v[1] == 'queued' then rank = redis.call('ZRANK', KEYS[2], ARGV[1]) end
return {v, rank}
"#;

struct Scripts {
    enqueue: Script,
    start: Script,
    progress: Script,
    finish: Script,
    hand_back: Script,
    cancel: Script,
    heartbeat: Script,
    status: Script,
}

/// The Redis store: a client of the shared queue, and a worker of it when a pipeline with a model opens it.
pub(crate) struct RedisStore {
    pool: Pool,
    config: RedisConfig,
    consumer: String,
    group: &'static str,
    scripts: Scripts,
    events: Events,
    closed: std::sync::atomic::AtomicBool,
}

fn default_worker_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    let random = JobId::random();
    format!("{host}-{}-{}", std::process::id(), &random.as_str()[..8])
}

impl RedisStore {
    /// Connects (checking the server answers) and makes sure the consumer group exists.
    pub fn open(config: &RedisConfig, on_event: Option<EventCallback>) -> Result<Self> {
        config.validate()?;
        let label = display_url(&config.url);
        let client = redis::Client::open(config.url.as_str()).map_err(|e| Error::Store {
            key: label.clone(),
            message: e.to_string(),
        })?;
        let store = Self {
            pool: Pool {
                client,
                idle: Mutex::new(Vec::new()),
                label,
                timeout: config.timeout,
            },
            consumer: config
                .worker_name
                .clone()
                .unwrap_or_else(default_worker_name),
            config: config.clone(),
            group: "workers",
            scripts: Scripts {
                enqueue: Script::new(ENQUEUE),
                start: Script::new(START),
                progress: Script::new(PROGRESS),
                finish: Script::new(FINISH),
                hand_back: Script::new(HAND_BACK),
                cancel: Script::new(CANCEL),
                heartbeat: Script::new(HEARTBEAT),
                status: Script::new(STATUS),
            },
            events: Events::new(on_event),
            closed: std::sync::atomic::AtomicBool::new(false),
        };
        store.ensure_group()?;
        Ok(store)
    }

    fn key(&self, what: &str) -> String {
        format!("{}:{what}", self.config.prefix)
    }

    fn job_key(&self, kind: &str, id: &str) -> String {
        format!("{}:{kind}:{id}", self.config.prefix)
    }

    /// Creates the consumer group (and the stream) unless they exist; also after a server restart lost them.
    fn ensure_group(&self) -> Result<()> {
        let stream = self.key("stream");
        self.pool.run(|c| {
            let r: redis::RedisResult<Value> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&stream)
                .arg(self.group)
                .arg("0")
                .arg("MKSTREAM")
                .query(c);
            match r {
                Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
                other => other.map(|_| ()),
            }
        })
    }

    fn retention_ms(&self) -> u64 {
        millis(self.config.retention)
    }

    fn notify(&self, id: &JobId) {
        self.events.emit(|_| self.status(id).ok());
    }

    /// Starts a delivered entry: the job to run, or `None` if it was cancelled, stale, expired or poisoned.
    fn start(&self, entry: &str, id: &str) -> Result<Option<Claim>> {
        let Ok(job_id) = id.parse::<JobId>() else {
            // Not ours (a foreign entry in the stream): acknowledge it so it is not delivered again.
            let stream = self.key("stream");
            self.pool.run(|c| {
                redis::cmd("XACK")
                    .arg(&stream)
                    .arg(self.group)
                    .arg(entry)
                    .query::<Value>(c)
            })?;
            return Ok(None);
        };
        let poison = format!(
            "the job was started {} times without finishing (each time its worker died or stopped \
             answering); it is not delivered again",
            self.config.max_deliveries
        );
        let reply: Value = self.pool.run(|c| {
            self.scripts
                .start
                .key(self.job_key("job", id))
                .key(self.key("queued"))
                .key(self.key("stream"))
                .key(self.job_key("sketch", id))
                .arg(self.group)
                .arg(entry)
                .arg(&self.consumer)
                .arg(unix_now())
                .arg(self.config.max_deliveries)
                .arg(self.retention_ms())
                .arg(id)
                .arg(&poison)
                .invoke(c)
        })?;
        let mut parts = array(reply).into_iter();
        let verdict = parts.next().as_ref().and_then(text).unwrap_or_default();
        if verdict != "run" {
            if verdict == "poison" {
                self.notify(&job_id);
            }
            return Ok(None);
        }
        let request = parts.next().as_ref().and_then(text).unwrap_or_default();
        let sketch = parts.next().and_then(bytes).unwrap_or_default();
        let decoded = request_from_json(&request)
            .map_err(|m| Error::invalid("request", format!("stored request of job {id}: {m}")))
            .and_then(|(mut r, image_follows)| {
                let sketch = images_from_bytes(&sketch, &mut r, image_follows)?;
                Ok((r, sketch))
            });
        let claim = |request, sketch| Claim {
            id: job_id.clone(),
            request,
            sketch,
            stop: StopFlag::default(),
            entry: entry.to_string(),
        };
        match decoded {
            Ok((request, sketch)) => {
                self.notify(&job_id);
                Ok(Some(claim(request, sketch)))
            }
            Err(e) => {
                // A stored job that cannot be read fails; it would fail on every worker.
                let c = claim(
                    GenerationRequest::default(),
                    Sketch::from_rgb8(1, 1, vec![0; 3])?,
                );
                self.finish(&c, Outcome::Failed(e.to_string()))?;
                Ok(None)
            }
        }
    }

    /// An entry to start: one abandoned by a dead worker (idle past the heartbeat timeout), else a new one,
    /// waiting up to `wait`. Returns (entry id, job id).
    fn next_entry(&self, wait: Duration) -> Result<Option<(String, String)>> {
        let stream = self.key("stream");
        let first = |v: Value| -> Option<(String, String)> {
            let mut e = array(v).into_iter();
            let id = text(&e.next()?)?;
            let fields = array(e.next()?);
            let mut f = fields.iter();
            while let (Some(k), Some(v)) = (f.next(), f.next()) {
                if text(k).as_deref() == Some("job") {
                    return Some((id, text(v)?));
                }
            }
            Some((id, String::new()))
        };
        let reclaimed: Result<Value> = self.pool.run(|c| {
            redis::cmd("XAUTOCLAIM")
                .arg(&stream)
                .arg(self.group)
                .arg(&self.consumer)
                .arg(millis(self.config.heartbeat_timeout))
                .arg("0-0")
                .arg("COUNT")
                .arg(1)
                .query(c)
        });
        let reclaimed = self.retry_without_group(reclaimed)?;
        if let Some(e) = array(reclaimed).into_iter().nth(1) {
            if let Some(entry) = array(e).into_iter().next().and_then(first) {
                return Ok(Some(entry));
            }
        }
        // BLOCK 0 would wait forever; the wait is at least a millisecond.
        let read: Result<Value> = self.pool.run(|c| {
            redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(self.group)
                .arg(&self.consumer)
                .arg("COUNT")
                .arg(1)
                .arg("BLOCK")
                .arg(millis(wait))
                .arg("STREAMS")
                .arg(&stream)
                .arg(">")
                .query(c)
        });
        let read = self.retry_without_group(read)?;
        // [[stream, [[id, [k, v, ...]]]]]
        let entry = array(read)
            .into_iter()
            .next()
            .and_then(|s| array(s).into_iter().nth(1))
            .and_then(|entries| array(entries).into_iter().next())
            .and_then(first);
        Ok(entry)
    }

    /// A missing group (the server restarted without persistence) is created again; the caller tries later.
    fn retry_without_group(&self, r: Result<Value>) -> Result<Value> {
        match r {
            Err(Error::Store { message, .. }) if message.contains("NOGROUP") => {
                self.ensure_group()?;
                Ok(Value::Nil)
            }
            other => other,
        }
    }

    fn status_of(&self, id: &JobId, reply: Value) -> Result<JobStatus> {
        let mut parts = array(reply).into_iter();
        let fields = parts.next().map(array).unwrap_or_default();
        let rank = parts.next().as_ref().and_then(int);
        let get = |i: usize| fields.get(i).and_then(text);
        let num = |i: usize| get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
        let state = match get(0).as_deref() {
            Some("queued") => JobState::Queued,
            Some("running") => JobState::Running,
            Some("completed") => JobState::Completed,
            Some("failed") => JobState::Failed,
            Some("cancelled") => JobState::Cancelled,
            _ => return Err(Error::UnknownJob(id.to_string())),
        };
        let (step, total_steps, decoded) = (num(2) as usize, num(3) as usize, num(4) as usize);
        let num_images = num(6) as u32;
        let started_at = get(10).as_deref().and_then(from_unix);
        let eta = match (state, started_at) {
            (JobState::Running, Some(t)) if step > 0 => {
                let pace = SystemTime::now()
                    .duration_since(t)
                    .map_or(0.0, |d| d.as_secs_f64())
                    / step as f64;
                Some(eta_secs(pace, None, step, total_steps, decoded, num_images))
            }
            _ => None,
        };
        let images: Vec<String> = get(12)
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        Ok(JobStatus {
            job_id: id.clone(),
            state,
            progress: progress_percent(state, step, decoded, total_steps, num_images),
            images: images.into_iter().map(Into::into).collect(),
            message: get(1).unwrap_or_default(),
            step,
            total_steps,
            queue_position: rank.map(|r| r as usize + 1),
            eta_secs: eta,
            seed: num(5),
            num_images,
            width: num(7) as u32,
            height: num(8) as u32,
            created_at: get(9).as_deref().and_then(from_unix),
            started_at,
            finished_at: get(11).as_deref().and_then(from_unix),
        })
    }
}

impl JobStore for RedisStore {
    fn enqueue(&self, job: NewJob, capacity: usize) -> Result<()> {
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::ShutDown);
        }
        let id = job.id.as_str().to_string();
        let created = job
            .created_at
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let fields: Vec<(&str, String)> = vec![
            ("state", "queued".into()),
            ("message", messages::QUEUED.into()),
            ("step", "0".into()),
            ("total_steps", job.request.denoising_steps().to_string()),
            ("decoded", "0".into()),
            ("seed", job.request.seed.unwrap_or_default().to_string()),
            ("num_images", job.request.num_images.to_string()),
            ("width", job.width.to_string()),
            ("height", job.height.to_string()),
            ("created_at", created.to_string()),
            ("request", request_to_json(&job.request)),
            ("attempts", "0".into()),
        ];
        let sketch = images_to_bytes(&job.sketch, &job.request);
        let r: i64 = self.pool.run(|c| {
            let mut inv = self.scripts.enqueue.prepare_invoke();
            inv.key(self.key("queued"))
                .key(self.job_key("job", &id))
                .key(self.job_key("sketch", &id))
                .key(self.key("stream"))
                .key(self.key("seq"))
                .arg(capacity)
                .arg(&id)
                .arg(&sketch);
            for (k, v) in &fields {
                inv.arg(*k).arg(v);
            }
            inv.invoke(c)
        })?;
        if r == -1 {
            return Err(Error::QueueFull { capacity });
        }
        self.notify(&job.id);
        Ok(())
    }

    fn status(&self, id: &JobId) -> Result<JobStatus> {
        let reply: Value = self.pool.run(|c| {
            let mut inv = self.scripts.status.prepare_invoke();
            inv.key(self.job_key("job", id.as_str()))
                .key(self.key("queued"))
                .arg(id.as_str());
            for f in STATUS_FIELDS {
                inv.arg(f);
            }
            inv.invoke(c)
        })?;
        if reply == Value::Nil {
            return Err(Error::UnknownJob(id.to_string()));
        }
        self.status_of(id, reply)
    }

    fn wait(&self, id: &JobId, timeout: Option<Duration>) -> Result<JobStatus> {
        let deadline = timeout.map(|d| Instant::now() + d);
        loop {
            let st = self.status(id)?;
            if st.state.is_terminal() {
                return Ok(st);
            }
            let mut pause = self.config.poll_interval;
            if let Some(d) = deadline {
                let now = Instant::now();
                if now >= d {
                    return Err(Error::Timeout(id.to_string()));
                }
                pause = pause.min(d - now);
            }
            std::thread::sleep(pause);
        }
    }

    fn cancel(&self, id: &JobId) -> Result<bool> {
        let r: i64 = self.pool.run(|c| {
            self.scripts
                .cancel
                .key(self.job_key("job", id.as_str()))
                .key(self.key("queued"))
                .key(self.job_key("sketch", id.as_str()))
                .arg(id.as_str())
                .arg(unix_now())
                .arg(self.retention_ms())
                .invoke(c)
        })?;
        match r {
            -1 => Err(Error::UnknownJob(id.to_string())),
            0 => Ok(false),
            _ => {
                self.notify(id);
                Ok(true)
            }
        }
    }

    fn preview(&self, id: &JobId) -> Result<Option<Preview>> {
        let key = self.job_key("job", id.as_str());
        let (state, preview): (Option<String>, Option<Vec<u8>>) = self.pool.run(|c| {
            redis::cmd("HMGET")
                .arg(&key)
                .arg("state")
                .arg("preview")
                .query(c)
        })?;
        if state.is_none() {
            return Err(Error::UnknownJob(id.to_string()));
        }
        Ok(preview.as_deref().and_then(preview_from_bytes))
    }

    fn images(&self, id: &JobId) -> Result<Vec<Vec<u8>>> {
        let st = self.status(id)?;
        if st.state != JobState::Completed || st.images.is_empty() {
            return Ok(Vec::new());
        }
        let key = self.job_key("png", id.as_str());
        let pngs: Vec<Option<Vec<u8>>> = self.pool.run(|c| {
            let mut cmd = redis::cmd("HMGET");
            cmd.arg(&key);
            for i in 0..st.images.len() {
                cmd.arg(i);
            }
            cmd.query(c)
        })?;
        pngs.into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Error::Store {
                key: key.clone(),
                message: "the job's images are missing from the store (expired?)".into(),
            })
    }

    fn queued(&self) -> Result<usize> {
        let key = self.key("queued");
        let n: usize = self.pool.run(|c| redis::cmd("ZCARD").arg(&key).query(c))?;
        Ok(n)
    }

    fn keeps_png_bytes(&self) -> bool {
        true
    }

    fn take_next(&self, wait: Duration) -> Result<Option<Claim>> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Some((entry, id)) = self.next_entry(left)? {
                if let Some(claim) = self.start(&entry, &id)? {
                    return Ok(Some(claim));
                }
            }
            if Instant::now() >= deadline || self.closed.load(std::sync::atomic::Ordering::SeqCst) {
                return Ok(None);
            }
        }
    }

    fn progress(&self, claim: &Claim, p: Progress) -> bool {
        let preview = p.preview.as_ref().map(preview_to_bytes).unwrap_or_default();
        let r: Result<i64> = self.pool.run(|c| {
            self.scripts
                .progress
                .key(self.job_key("job", claim.id.as_str()))
                .arg(&self.consumer)
                .arg(p.step)
                .arg(p.total_steps)
                .arg(p.decoded)
                .arg(&preview)
                .invoke(c)
        });
        match r {
            Ok(1) => {
                self.notify(&claim.id);
                true
            }
            Ok(0) => {
                claim.stop.raise(StopReason::Cancelled);
                false
            }
            Ok(_) => {
                claim.stop.raise(StopReason::Lost);
                false
            }
            // The store is away (restarting): keep generating; the finish retries, and if this worker is
            // presumed dead meanwhile, another one runs the job and this result is dropped.
            Err(_) => true,
        }
    }

    fn finish(&self, claim: &Claim, outcome: Outcome) -> Result<Option<JobState>> {
        let id = claim.id.as_str();
        let (state, message, images, pngs) = match outcome {
            Outcome::Completed { images, pngs, .. } => {
                let paths: Vec<String> = images
                    .iter()
                    .map(|p| p.to_string_lossy().into_owned())
                    .collect();
                (
                    "completed",
                    messages::COMPLETED.to_string(),
                    serde_json::to_string(&paths).unwrap_or_else(|_| "[]".into()),
                    pngs,
                )
            }
            Outcome::Failed(m) => ("failed", m, "[]".into(), Vec::new()),
            Outcome::Cancelled => (
                "cancelled",
                messages::CANCELLED.to_string(),
                "[]".into(),
                Vec::new(),
            ),
        };
        // A result is worth a few retries across a short outage of the store; after that the job is left to
        // re-delivery (at least once).
        let mut pause = Duration::from_millis(100);
        let mut tries = 0;
        let reply: Value = loop {
            let r = self.pool.run(|c| {
                let mut inv = self.scripts.finish.prepare_invoke();
                inv.key(self.job_key("job", id))
                    .key(self.key("stream"))
                    .key(self.job_key("sketch", id))
                    .key(self.job_key("png", id))
                    .arg(self.group)
                    .arg(&claim.entry)
                    .arg(&self.consumer)
                    .arg(state)
                    .arg(&message)
                    .arg(unix_now())
                    .arg(self.retention_ms())
                    .arg(&images);
                for png in &pngs {
                    inv.arg(png);
                }
                inv.invoke(c)
            });
            match r {
                Ok(v) => break v,
                Err(e) if tries >= 6 => return Err(e),
                Err(_) => {
                    tries += 1;
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        };
        let state = match text(&reply).as_deref() {
            Some("completed") => JobState::Completed,
            Some("failed") => JobState::Failed,
            Some("cancelled") => JobState::Cancelled,
            _ => return Ok(None),
        };
        self.notify(&claim.id);
        Ok(Some(state))
    }

    fn hand_back(&self, claim: &Claim) -> Result<()> {
        let id = claim.id.as_str();
        let _: i64 = self.pool.run(|c| {
            self.scripts
                .hand_back
                .key(self.job_key("job", id))
                .key(self.key("stream"))
                .key(self.key("queued"))
                .key(self.key("seq"))
                .key(self.job_key("sketch", id))
                .arg(self.group)
                .arg(&claim.entry)
                .arg(&self.consumer)
                .arg(id)
                .arg(unix_now())
                .arg(self.retention_ms())
                .invoke(c)
        })?;
        self.notify(&claim.id);
        Ok(())
    }

    fn heartbeat(&self, running: Option<(&JobId, &str)>) -> Result<bool> {
        let (id, entry) = running.map_or(("", ""), |(id, e)| (id.as_str(), e));
        let r: i64 = self.pool.run(|c| {
            self.scripts
                .heartbeat
                .key(self.job_key("worker", &self.consumer))
                .key(self.job_key("job", id))
                .key(self.key("stream"))
                .arg(&self.consumer)
                .arg(millis(self.config.heartbeat_timeout))
                .arg(self.group)
                .arg(entry)
                .arg(id)
                .invoke(c)
        })?;
        Ok(r == 1)
    }

    fn heartbeat_interval(&self) -> Option<Duration> {
        Some(self.config.heartbeat_interval)
    }

    fn close(&self, _cancel_pending: bool) {
        // The queue is shared: other workers serve it. Only this process's intake stops.
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn wake(&self) {
        // A worker blocked in XREADGROUP wakes within its wait (at most the executor's take wait).
    }

    fn protected(&self, _max_age: Duration) -> Vec<String> {
        // Files are judged by age alone: a job's keys expire `retention` after it finished, which is when its
        // files (written just before) reach that age too. The running job is protected by the executor's claim.
        Vec::new()
    }

    fn forget_old(&self, _max_age: Duration) -> usize {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_through_the_stored_json() {
        let r = GenerationRequest {
            prompt: Some("a \"red\" car".into()),
            negative_prompt: Some(String::new()),
            seed: Some((1 << 53) - 1),
            width: Some(128),
            controlnet_scale: Some(0.5),
            guess_mode: Some(true),
            scheduler: "ddim".parse().unwrap(),
            preprocess: "none".parse().unwrap(),
            vae: "tiny".parse().unwrap(),
            clip_skip: 2,
            ..Default::default()
        };
        assert_eq!(
            request_from_json(&request_to_json(&r)).unwrap(),
            (r.clone(), false)
        );
        // Jobs stored without the newer fields decode with their defaults.
        let mut v: serde_json::Value = serde_json::from_str(&request_to_json(&r)).unwrap();
        for k in [
            "vae",
            "start_image",
            "strength",
            "canny_low_threshold",
            "canny_high_threshold",
            "clip_skip",
        ] {
            v.as_object_mut().unwrap().remove(k);
        }
        let defaults = GenerationRequest {
            vae: GenerationRequest::DEFAULT.vae,
            clip_skip: GenerationRequest::DEFAULT.clip_skip,
            ..r
        };
        assert_eq!(
            request_from_json(&v.to_string()).unwrap(),
            (defaults, false)
        );
        assert!(request_from_json("{}").is_err());
    }

    #[test]
    fn start_images_and_canny_thresholds_round_trip_with_the_sketch() {
        let sketch = Sketch::from_rgb8(2, 1, vec![1, 2, 3, 4, 5, 6]).unwrap();
        let image = Sketch::from_rgb8(1, 2, vec![9, 8, 7, 6, 5, 4]).unwrap();
        for start in [
            None,
            Some(StartImage::Sketch),
            Some(StartImage::Image(std::sync::Arc::new(image))),
        ] {
            let r = GenerationRequest {
                start_image: start,
                strength: 0.35,
                canny_low_threshold: 7,
                canny_high_threshold: 900,
                ..Default::default()
            };
            let (mut back, follows) = request_from_json(&request_to_json(&r)).unwrap();
            let blob = images_to_bytes(&sketch, &r);
            assert_eq!(
                images_from_bytes(&blob, &mut back, follows).unwrap(),
                sketch
            );
            assert_eq!(back, r);
            if follows {
                // A blob cut inside the start image is an error naming it, never a panic.
                let cut = &blob[..blob.len() - 1];
                let err = images_from_bytes(cut, &mut back, follows).unwrap_err();
                assert!(matches!(
                    err,
                    Error::InvalidRequest {
                        field: "start_image",
                        ..
                    }
                ));
            }
        }
        let mut v: serde_json::Value =
            serde_json::from_str(&request_to_json(&GenerationRequest::default())).unwrap();
        v["start_image"] = "elsewhere".into();
        assert!(request_from_json(&v.to_string()).is_err());
    }

    #[test]
    fn sketches_and_previews_round_trip_and_truncation_is_an_error() {
        let s = Sketch::from_rgb8(2, 1, vec![1, 2, 3, 4, 5, 6]).unwrap();
        let back = sketch_from_bytes(&sketch_to_bytes(&s)).unwrap();
        assert_eq!((back.width(), back.height(), back.rgb()), (2, 1, s.rgb()));
        assert!(sketch_from_bytes(&[1, 0, 0]).is_err());
        let p = Preview {
            step: 3,
            width: 1,
            height: 1,
            rgb: vec![7, 8, 9],
        };
        assert_eq!(preview_from_bytes(&preview_to_bytes(&p)), Some(p));
    }

    #[test]
    fn urls_lose_their_credentials_in_messages() {
        assert_eq!(display_url("redis://u:secret@h:1/0"), "redis://h:1/0");
        assert_eq!(display_url("redis://h:1"), "redis://h:1");
    }
}
