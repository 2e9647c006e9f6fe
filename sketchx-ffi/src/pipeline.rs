//! The pipeline handle and its functions (submit / poll / wait / cancel / cleanup / preview / images / shutdown),
//! the status object with its accessors, and the byte buffer (a finished job's PNG) with its accessors.

use std::ffi::{c_char, c_int, CString};
use std::path::PathBuf;
use std::time::Duration;

use sketchx_core::cleanup::CleanupReport;
use sketchx_core::{JobId, JobState, JobStatus, Pipeline, SketchInput};

use crate::error::{guard, guard_or, sketchx_result, to_cstring, Failure};
use crate::ptr::{arg_bytes, arg_out, arg_ref, arg_str};
use crate::types::{
    sketchx_cleanup_report, sketchx_job_id, sketchx_job_info, sketchx_pipeline_options,
    sketchx_preview_info, sketchx_request,
};

/// A loaded pipeline: the models, a worker thread running jobs one at a time, the job table and the retention
/// sweeper. Opaque; create with `sketchx_pipeline_new`, free with `sketchx_pipeline_free`. Every function
/// taking a `const sketchx_pipeline *` may be called from several threads at once.
#[allow(non_camel_case_types)]
pub struct sketchx_pipeline {
    inner: Pipeline,
}

/// A snapshot of one job with its strings (message, image paths, JSON). Opaque; returned by
/// `sketchx_pipeline_status` and `sketchx_pipeline_wait`, freed with `sketchx_status_free`. Immutable, so it
/// may be read from several threads.
#[allow(non_camel_case_types)]
pub struct sketchx_status {
    info: sketchx_job_info,
    message: CString,
    images: Vec<CString>,
    json: CString,
}

impl From<&JobStatus> for sketchx_status {
    fn from(s: &JobStatus) -> Self {
        sketchx_status {
            info: s.into(),
            message: to_cstring(&s.message),
            images: s
                .images
                .iter()
                .map(|p| to_cstring(&p.to_string_lossy()))
                .collect(),
            json: to_cstring(&s.to_json()),
        }
    }
}

/// # Safety
/// `p` is NULL or a live pipeline from `sketchx_pipeline_new`.
unsafe fn pipe_of<'a>(p: *const sketchx_pipeline) -> Result<&'a Pipeline, Failure> {
    // SAFETY: forwarded from the caller.
    Ok(&unsafe { arg_ref(p, "pipeline") }?.inner)
}

/// # Safety
/// `id` is NULL or a NUL-terminated string.
unsafe fn job_id(id: *const c_char) -> Result<JobId, Failure> {
    // SAFETY: forwarded from the caller.
    Ok(unsafe { arg_str(id, "job_id") }?.parse::<JobId>()?)
}

fn boxed_status(s: &JobStatus) -> *mut sketchx_status {
    Box::into_raw(Box::new(sketchx_status::from(s)))
}

fn report(r: CleanupReport) -> sketchx_cleanup_report {
    sketchx_cleanup_report {
        files_removed: r.files_removed,
        bytes_removed: r.bytes_removed,
        jobs_forgotten: r.jobs_forgotten,
    }
}

/// Loads the models (downloading them into the Hugging Face cache if needed) and starts the worker; blocks
/// until the models are loaded. `options` NULL is `SKETCHX_NULL_ARGUMENT` (use `sketchx_pipeline_options_init`
/// for the defaults).
///
/// Ownership: on `SKETCHX_OK`, `*out` receives a new pipeline owned by the caller, to be released with
/// `sketchx_pipeline_free`; on failure `*out` is untouched. `options` and its strings are only borrowed during
/// the call; the callback's `user_data` must stay valid until the pipeline is freed.
///
/// # Safety
/// `options` is NULL or points to an initialised `sketchx_pipeline_options` whose strings are NULL or
/// NUL-terminated, and whose `loras` is NULL or points to `lora_count` such strings; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sketchx_pipeline_new(
    options: *const sketchx_pipeline_options,
    out: *mut *mut sketchx_pipeline,
) -> sketchx_result {
    guard(|| {
        // SAFETY: caller's guarantee.
        let options = unsafe { arg_ref(options, "options") }?;
        let out = arg_out(out, "out")?;
        // SAFETY: caller's guarantee on the string fields.
        let config = unsafe { options.core_config() }?;
        let inner = Pipeline::new(config)?;
        let p = Box::into_raw(Box::new(sketchx_pipeline { inner }));
        // SAFETY: non-NULL and writable.
        unsafe { out.write(p) };
        Ok(())
    })
}

/// Connects to the Redis job queue at `redis_url` (`redis://host:port`) as a client: no model is loaded and no job
/// runs in this process; submit / poll / wait / cancel work as on any pipeline and the queue's worker processes
/// (pipelines with `options.redis_url`, or the `worker` example) run the jobs. At most `queue_capacity` jobs may
/// wait (0 is `SKETCHX_INVALID_REQUEST`). An unreachable server is `SKETCHX_STORE`.
///
/// Ownership: on `SKETCHX_OK`, `*out` receives a new pipeline owned by the caller, to be released with
/// `sketchx_pipeline_free`; on failure `*out` is untouched. `redis_url` is only borrowed during the call.
///
/// # Safety
/// `redis_url` is NULL or a NUL-terminated string; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sketchx_pipeline_connect(
    redis_url: *const c_char,
    queue_capacity: usize,
    out: *mut *mut sketchx_pipeline,
) -> sketchx_result {
    guard(|| {
        // SAFETY: caller's guarantee.
        let url = unsafe { arg_str(redis_url, "redis_url") }?;
        let out = arg_out(out, "out")?;
        let inner = connect(url, queue_capacity)?;
        let p = Box::into_raw(Box::new(sketchx_pipeline { inner }));
        // SAFETY: non-NULL and writable.
        unsafe { out.write(p) };
        Ok(())
    })
}

#[cfg(feature = "redis")]
fn connect(url: &str, queue_capacity: usize) -> Result<Pipeline, Failure> {
    Ok(Pipeline::connect_with(
        sketchx_core::RedisConfig::new(url),
        queue_capacity,
    )?)
}

#[cfg(not(feature = "redis"))]
fn connect(_: &str, _: usize) -> Result<Pipeline, Failure> {
    Err(
        sketchx_core::Error::invalid("redis_url", "this build of sketchx has no Redis support")
            .into(),
    )
}

/// Shuts the pipeline down (as `sketchx_pipeline_shutdown`: waits for the worker) and frees it. NULL is a
/// no-op. Freeing the same pointer twice is undefined behaviour (as with `free`).
///
/// Ownership: takes back the pipeline from `sketchx_pipeline_new`. Statuses obtained from it stay valid (they
/// are independent objects).
///
/// # Safety
/// `pipeline` is NULL or a pipeline from `sketchx_pipeline_new` not yet freed, not in use by another thread,
/// and this is not called from the progress callback.
#[no_mangle]
pub unsafe extern "C" fn sketchx_pipeline_free(pipeline: *mut sketchx_pipeline) {
    guard_or((), || {
        if !pipeline.is_null() {
            // SAFETY: from `Box::into_raw` in `sketchx_pipeline_new`, not freed yet (caller's guarantee).
            let p = unsafe { Box::from_raw(pipeline) };
            p.inner.shutdown();
            drop(p);
        }
    })
}

/// # Safety
/// As `sketchx_pipeline_submit_file`.
unsafe fn submit(
    pipeline: *const sketchx_pipeline,
    request: *const sketchx_request,
    sketch: impl FnOnce() -> Result<SketchInput, Failure>,
    out: *mut sketchx_job_id,
) -> sketchx_result {
    guard(|| {
        // SAFETY: caller's guarantees.
        let p = unsafe { pipe_of(pipeline) }?;
        // SAFETY: caller's guarantee.
        let request = unsafe { arg_ref(request, "request") }?;
        let out = arg_out(out, "out_id")?;
        let sketch = sketch()?;
        // SAFETY: caller's guarantee on the string fields.
        let request = unsafe { request.core_request() }?;
        let id = p.submit(request, sketch)?;
        // SAFETY: non-NULL and writable.
        unsafe { out.write(sketchx_job_id::from_str(id.as_str())) };
        Ok(())
    })
}

/// Validates `request`, reads and decodes the sketch file at `sketch_path` (PNG, JPEG, WebP, BMP, GIF) and
/// queues a job; returns at once. Bad input fails here (`SKETCHX_INVALID_REQUEST`, `SKETCHX_INVALID_SKETCH`,
/// `SKETCHX_INVALID_UTF8`) and nothing is queued; a full queue is `SKETCHX_QUEUE_FULL`; after shutdown
/// `SKETCHX_SHUT_DOWN`.
///
/// Ownership: everything is borrowed for the call only; on `SKETCHX_OK` the job's id is written to `*out_id`
/// (caller's memory, nothing to free).
///
/// # Safety
/// `pipeline` is NULL or live; `request` NULL or initialised (strings NULL or NUL-terminated); `sketch_path`
/// NULL or NUL-terminated; `out_id` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sketchx_pipeline_submit_file(
    pipeline: *const sketchx_pipeline,
    request: *const sketchx_request,
    sketch_path: *const c_char,
    out_id: *mut sketchx_job_id,
) -> sketchx_result {
    // SAFETY: caller's guarantees.
    unsafe {
        submit(
            pipeline,
            request,
            || {
                Ok(SketchInput::Path(PathBuf::from(arg_str(
                    sketch_path,
                    "sketch_path",
                )?)))
            },
            out_id,
        )
    }
}

/// As `sketchx_pipeline_submit_file`, with the sketch as an encoded image in memory (`data`, `len` bytes).
/// `data` must not be NULL (even when `len` is 0; an empty image is `SKETCHX_INVALID_SKETCH`).
///
/// Ownership: the bytes are copied during the call; the buffer stays the caller's.
///
/// # Safety
/// As `sketchx_pipeline_submit_file`; `data` NULL or `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn sketchx_pipeline_submit_buffer(
    pipeline: *const sketchx_pipeline,
    request: *const sketchx_request,
    data: *const u8,
    len: usize,
    out_id: *mut sketchx_job_id,
) -> sketchx_result {
    // SAFETY: caller's guarantees.
    unsafe {
        submit(
            pipeline,
            request,
            || Ok(SketchInput::Bytes(arg_bytes(data, len, "data")?.to_vec())),
            out_id,
        )
    }
}

/// The job's current status without its strings, written to `*out` (no allocation for the caller). An id this
/// pipeline does not know (or that is not 32 lowercase hex digits) is `SKETCHX_UNKNOWN_JOB`.
///
/// Ownership: `job_id` is borrowed; `*out` is the caller's memory, written only on `SKETCHX_OK`.
///
/// # Safety
/// `pipeline` NULL or live; `job_id` NULL or NUL-terminated; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sketchx_pipeline_poll(
    pipeline: *const sketchx_pipeline,
    job_id: *const c_char,
    out: *mut sketchx_job_info,
) -> sketchx_result {
    guard(|| {
        // SAFETY: caller's guarantees.
        let (p, id) = unsafe { (pipe_of(pipeline)?, self::job_id(job_id)?) };
        let out = arg_out(out, "out")?;
        let s = p.poll(&id)?;
        // SAFETY: non-NULL and writable.
        unsafe { out.write(sketchx_job_info::from(&s)) };
        Ok(())
    })
}

/// The job's current status with its message, image paths and JSON, as a new status object.
///
/// Ownership: on `SKETCHX_OK`, `*out` receives a status owned by the caller, to be released with
/// `sketchx_status_free`.
///
/// # Safety
/// `pipeline` NULL or live; `job_id` NULL or NUL-terminated; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sketchx_pipeline_status(
    pipeline: *const sketchx_pipeline,
    job_id: *const c_char,
    out: *mut *mut sketchx_status,
) -> sketchx_result {
    guard(|| {
        // SAFETY: caller's guarantees.
        let (p, id) = unsafe { (pipe_of(pipeline)?, self::job_id(job_id)?) };
        let out = arg_out(out, "out")?;
        let s = p.poll(&id)?;
        // SAFETY: non-NULL and writable.
        unsafe { out.write(boxed_status(&s)) };
        Ok(())
    })
}

/// Blocks until the job reaches a final state (completed, failed or cancelled: all are `SKETCHX_OK`; read the
/// state from the status), or until `timeout_ms` milliseconds pass (`SKETCHX_TIMEOUT`; the job goes on).
/// A negative `timeout_ms` waits forever.
///
/// Ownership: on `SKETCHX_OK`, `*out` receives a status owned by the caller (`sketchx_status_free`).
///
/// # Safety
/// `pipeline` NULL or live; `job_id` NULL or NUL-terminated; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sketchx_pipeline_wait(
    pipeline: *const sketchx_pipeline,
    job_id: *const c_char,
    timeout_ms: i64,
    out: *mut *mut sketchx_status,
) -> sketchx_result {
    guard(|| {
        // SAFETY: caller's guarantees.
        let (p, id) = unsafe { (pipe_of(pipeline)?, self::job_id(job_id)?) };
        let out = arg_out(out, "out")?;
        let timeout = u64::try_from(timeout_ms).ok().map(Duration::from_millis);
        let s = p.wait(&id, timeout)?;
        // SAFETY: non-NULL and writable.
        unsafe { out.write(boxed_status(&s)) };
        Ok(())
    })
}

/// Cancels a job: a queued one is removed at once, a running one stops at its next step and leaves no files.
/// If `out_cancelled` is not NULL it receives 1 if the job was still pending, 0 if it had already finished.
///
/// Ownership: all arguments borrowed.
///
/// # Safety
/// `pipeline` NULL or live; `job_id` NULL or NUL-terminated; `out_cancelled` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sketchx_pipeline_cancel(
    pipeline: *const sketchx_pipeline,
    job_id: *const c_char,
    out_cancelled: *mut c_int,
) -> sketchx_result {
    guard(|| {
        // SAFETY: caller's guarantees.
        let (p, id) = unsafe { (pipe_of(pipeline)?, self::job_id(job_id)?) };
        let was_pending = p.cancel(&id)?;
        if !out_cancelled.is_null() {
            // SAFETY: non-NULL and writable.
            unsafe { out_cancelled.write(c_int::from(was_pending)) };
        }
        Ok(())
    })
}

/// The latest live preview of a running job (RGB8, every `preview_every` steps). Call with `rgb = NULL,
/// rgb_len = 0` to learn the size (`out_info->rgb_len`); then with a buffer of at least that many bytes to
/// copy the pixels. No preview yet: `SKETCHX_OK` with `out_info->available == 0`. A non-NULL buffer smaller
/// than needed is `SKETCHX_BUFFER_TOO_SMALL` (nothing written).
///
/// Ownership: `rgb` and `out_info` are the caller's memory.
///
/// # Safety
/// `pipeline` NULL or live; `job_id` NULL or NUL-terminated; `rgb` NULL or `rgb_len` writable bytes;
/// `out_info` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sketchx_pipeline_preview(
    pipeline: *const sketchx_pipeline,
    job_id: *const c_char,
    rgb: *mut u8,
    rgb_len: usize,
    out_info: *mut sketchx_preview_info,
) -> sketchx_result {
    guard(|| {
        // SAFETY: caller's guarantees.
        let (p, id) = unsafe { (pipe_of(pipeline)?, self::job_id(job_id)?) };
        let out_info = arg_out(out_info, "out_info")?;
        let info = match p.preview(&id)? {
            None => sketchx_preview_info::default(),
            Some(pv) => {
                if !rgb.is_null() {
                    if rgb_len < pv.rgb.len() {
                        return Err(Failure::new(
                            sketchx_result::SKETCHX_BUFFER_TOO_SMALL,
                            format!(
                                "the preview needs {} bytes, the buffer holds {rgb_len}",
                                pv.rgb.len()
                            ),
                        ));
                    }
                    // SAFETY: `rgb` holds at least `rgb_len >= pv.rgb.len()` writable bytes.
                    unsafe { std::ptr::copy_nonoverlapping(pv.rgb.as_ptr(), rgb, pv.rgb.len()) };
                }
                sketchx_preview_info {
                    available: 1,
                    step: pv.step,
                    width: pv.width,
                    height: pv.height,
                    rgb_len: pv.rgb.len(),
                }
            }
        };
        // SAFETY: non-NULL and writable.
        unsafe { out_info.write(info) };
        Ok(())
    })
}

/// The bytes of one image (a PNG file) of a finished job. Opaque; returned by `sketchx_pipeline_image`, read
/// with `sketchx_bytes_data` / `sketchx_bytes_len`, freed with `sketchx_bytes_free`. Immutable, so it may be
/// read from several threads.
#[allow(non_camel_case_types)]
pub struct sketchx_bytes {
    data: Vec<u8>,
}

/// The refusal for a job that has no images to give: not finished yet, failed or cancelled.
fn no_images(id: &JobId, s: &JobStatus) -> Failure {
    let (code, what) = match s.state {
        JobState::Queued | JobState::Running => {
            (sketchx_result::SKETCHX_NOT_FINISHED, "has not finished yet")
        }
        JobState::Failed => (sketchx_result::SKETCHX_JOB_FAILED, "failed"),
        JobState::Cancelled => (sketchx_result::SKETCHX_CANCELLED, "was cancelled"),
        JobState::Completed => (sketchx_result::SKETCHX_INTERNAL, "completed without images"),
    };
    Failure::new(
        code,
        format!("job {id} {what} ({}): it has no images", s.message),
    )
}

/// The PNG file `index` (0-based) of a completed job, as a new byte buffer: from the job store, so a client of
/// a Redis queue (`sketchx_pipeline_connect`) needs no disk shared with the workers; an in-process pipeline
/// reads the file it wrote to `output_dir`.
///
/// Errors: `SKETCHX_UNKNOWN_JOB` (never submitted, forgotten, expired, or not an id); `SKETCHX_NOT_FINISHED`
/// (queued or running: wait first); `SKETCHX_JOB_FAILED` / `SKETCHX_CANCELLED` (a final state without images);
/// `SKETCHX_INDEX_OUT_OF_RANGE` (`index` not below the job's image count, which the message gives);
/// `SKETCHX_IO` (the in-process file was deleted, e.g. by cleanup); `SKETCHX_STORE` (Redis unreachable, or the
/// images expired from it).
///
/// Ownership: `job_id` is borrowed; on `SKETCHX_OK`, `*out` receives a buffer owned by the caller, to be
/// released with `sketchx_bytes_free`; on failure `*out` is untouched.
///
/// # Safety
/// `pipeline` NULL or live; `job_id` NULL or NUL-terminated; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sketchx_pipeline_image(
    pipeline: *const sketchx_pipeline,
    job_id: *const c_char,
    index: usize,
    out: *mut *mut sketchx_bytes,
) -> sketchx_result {
    guard(|| {
        // SAFETY: caller's guarantees.
        let (p, id) = unsafe { (pipe_of(pipeline)?, self::job_id(job_id)?) };
        let out = arg_out(out, "out")?;
        // A completed job stays completed, so a status read first decides the refusals without a race.
        let s = p.poll(&id)?;
        if s.state != JobState::Completed {
            return Err(no_images(&id, &s));
        }
        let mut images = p.images(&id)?;
        if images.is_empty() {
            return Err(no_images(&id, &s));
        }
        if index >= images.len() {
            return Err(Failure::new(
                sketchx_result::SKETCHX_INDEX_OUT_OF_RANGE,
                format!(
                    "image index {index} is out of range: job {id} has {} image(s)",
                    images.len()
                ),
            ));
        }
        let data = images.swap_remove(index);
        let b = Box::into_raw(Box::new(sketchx_bytes { data }));
        // SAFETY: non-NULL and writable.
        unsafe { out.write(b) };
        Ok(())
    })
}

/// The first byte of the buffer (its `sketchx_bytes_len` bytes follow); NULL if `bytes` is NULL.
///
/// Ownership: owned by the buffer; valid until `sketchx_bytes_free(bytes)`.
///
/// # Safety
/// `bytes` NULL or a live buffer.
#[no_mangle]
pub unsafe extern "C" fn sketchx_bytes_data(bytes: *const sketchx_bytes) -> *const u8 {
    guard_or(std::ptr::null(), || {
        // SAFETY: caller's guarantee.
        unsafe { bytes.as_ref() }.map_or(std::ptr::null(), |b| b.data.as_ptr())
    })
}

/// The buffer's length in bytes; 0 if `bytes` is NULL.
///
/// # Safety
/// `bytes` NULL or a live buffer.
#[no_mangle]
pub unsafe extern "C" fn sketchx_bytes_len(bytes: *const sketchx_bytes) -> usize {
    guard_or(0, || {
        // SAFETY: caller's guarantee.
        unsafe { bytes.as_ref() }.map_or(0, |b| b.data.len())
    })
}

/// Frees a byte buffer. NULL is a no-op; freeing twice is undefined behaviour.
///
/// # Safety
/// `bytes` NULL or a buffer from `sketchx_pipeline_image` not yet freed.
#[no_mangle]
pub unsafe extern "C" fn sketchx_bytes_free(bytes: *mut sketchx_bytes) {
    guard_or((), || {
        if !bytes.is_null() {
            // SAFETY: from `Box::into_raw` in `sketchx_pipeline_image`, not freed yet (caller's guarantee).
            drop(unsafe { Box::from_raw(bytes) });
        }
    })
}

/// Deletes this pipeline's files older than the retention period and forgets finished jobs whose files are
/// gone. `out` may be NULL; otherwise it receives what was removed.
///
/// # Safety
/// `pipeline` NULL or live; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sketchx_pipeline_cleanup(
    pipeline: *const sketchx_pipeline,
    out: *mut sketchx_cleanup_report,
) -> sketchx_result {
    guard(|| {
        // SAFETY: caller's guarantee.
        let r = unsafe { pipe_of(pipeline) }?.cleanup()?;
        if !out.is_null() {
            // SAFETY: non-NULL and writable.
            unsafe { out.write(report(r)) };
        }
        Ok(())
    })
}

/// As `sketchx_pipeline_cleanup` with another maximum age (`max_age_secs`; 0 removes every finished job's
/// files).
///
/// # Safety
/// `pipeline` NULL or live; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sketchx_pipeline_cleanup_older_than(
    pipeline: *const sketchx_pipeline,
    max_age_secs: u64,
    out: *mut sketchx_cleanup_report,
) -> sketchx_result {
    guard(|| {
        // SAFETY: caller's guarantee.
        let r =
            unsafe { pipe_of(pipeline) }?.cleanup_older_than(Duration::from_secs(max_age_secs))?;
        if !out.is_null() {
            // SAFETY: non-NULL and writable.
            unsafe { out.write(report(r)) };
        }
        Ok(())
    })
}

/// Number of jobs waiting in the queue, written to `*out`.
///
/// # Safety
/// `pipeline` NULL or live; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sketchx_pipeline_queued(
    pipeline: *const sketchx_pipeline,
    out: *mut usize,
) -> sketchx_result {
    guard(|| {
        // SAFETY: caller's guarantee.
        let p = unsafe { pipe_of(pipeline) }?;
        let out = arg_out(out, "out")?;
        // SAFETY: non-NULL and writable.
        unsafe { out.write(p.queued()) };
        Ok(())
    })
}

/// Stops intake (later submissions: `SKETCHX_SHUT_DOWN`), cancels queued jobs and the running one (or finishes
/// them with `drain_on_shutdown`), and waits for the worker thread. Idempotent. Jobs stay readable (poll,
/// status, wait); the handle must still be freed with `sketchx_pipeline_free`.
///
/// # Safety
/// `pipeline` NULL or live; not called from the progress callback.
#[no_mangle]
pub unsafe extern "C" fn sketchx_pipeline_shutdown(
    pipeline: *const sketchx_pipeline,
) -> sketchx_result {
    guard(|| {
        // SAFETY: caller's guarantee.
        unsafe { pipe_of(pipeline) }?.shutdown();
        Ok(())
    })
}

/// # Safety
/// `s` NULL or a live status.
unsafe fn status_ref<'a>(s: *const sketchx_status) -> Option<&'a sketchx_status> {
    // SAFETY: forwarded.
    unsafe { s.as_ref() }
}

/// Copies the status's numbers (state, progress, step, seed, ...) to `*out`.
///
/// # Safety
/// `status` NULL or live; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sketchx_status_info(
    status: *const sketchx_status,
    out: *mut sketchx_job_info,
) -> sketchx_result {
    guard(|| {
        // SAFETY: caller's guarantee.
        let s = unsafe { arg_ref(status, "status") }?;
        let out = arg_out(out, "out")?;
        // SAFETY: non-NULL and writable.
        unsafe { out.write(s.info) };
        Ok(())
    })
}

/// The status's human-readable message (the original service's texts, or the error), UTF-8; NULL if `status`
/// is NULL.
///
/// Ownership: owned by the status; valid until `sketchx_status_free(status)`.
///
/// # Safety
/// `status` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn sketchx_status_message(status: *const sketchx_status) -> *const c_char {
    guard_or(std::ptr::null(), || {
        // SAFETY: caller's guarantee.
        unsafe { status_ref(status) }.map_or(std::ptr::null(), |s| s.message.as_ptr())
    })
}

/// Number of image files of a completed job (0 otherwise, and for NULL).
///
/// # Safety
/// `status` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn sketchx_status_image_count(status: *const sketchx_status) -> usize {
    guard_or(0, || {
        // SAFETY: caller's guarantee.
        unsafe { status_ref(status) }.map_or(0, |s| s.images.len())
    })
}

/// The path of image `index` (0-based), UTF-8; NULL if `status` is NULL or `index` is out of range.
///
/// Ownership: owned by the status; valid until `sketchx_status_free(status)`.
///
/// # Safety
/// `status` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn sketchx_status_image_path(
    status: *const sketchx_status,
    index: usize,
) -> *const c_char {
    guard_or(std::ptr::null(), || {
        // SAFETY: caller's guarantee.
        unsafe { status_ref(status) }
            .and_then(|s| s.images.get(index))
            .map_or(std::ptr::null(), |p| p.as_ptr())
    })
}

/// The status as the original service's JSON (`{"job_id", "status", "progress", "images", "message", ...}`);
/// NULL if `status` is NULL.
///
/// Ownership: owned by the status; valid until `sketchx_status_free(status)`.
///
/// # Safety
/// `status` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn sketchx_status_json(status: *const sketchx_status) -> *const c_char {
    guard_or(std::ptr::null(), || {
        // SAFETY: caller's guarantee.
        unsafe { status_ref(status) }.map_or(std::ptr::null(), |s| s.json.as_ptr())
    })
}

/// Frees a status and its strings. NULL is a no-op; freeing twice is undefined behaviour.
///
/// # Safety
/// `status` NULL or a status from `sketchx_pipeline_status`/`_wait` not yet freed.
#[no_mangle]
pub unsafe extern "C" fn sketchx_status_free(status: *mut sketchx_status) {
    guard_or((), || {
        if !status.is_null() {
            // SAFETY: from `Box::into_raw` in `boxed_status`, not freed yet (caller's guarantee).
            drop(unsafe { Box::from_raw(status) });
        }
    })
}
