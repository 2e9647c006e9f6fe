//! Result codes, the thread-local last error, and the panic boundary every `extern "C"` body runs inside.

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use sketchx_core::Error;

/// What a fallible sketchx function returns. The values are stable: new codes are only ever appended.
/// On anything but `SKETCHX_OK`, [`sketchx_last_error_message`] describes the failure.
#[allow(non_camel_case_types)]
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum sketchx_result {
    /// Success.
    SKETCHX_OK = 0,
    /// A pointer argument that must not be NULL was NULL.
    SKETCHX_NULL_ARGUMENT = 1,
    /// A string argument or field was not valid UTF-8.
    SKETCHX_INVALID_UTF8 = 2,
    /// A request or option field is out of range or malformed; [`sketchx_last_error_field`] names it.
    SKETCHX_INVALID_REQUEST = 3,
    /// The sketch image could not be read or decoded (or is empty, too large, ...).
    SKETCHX_INVALID_SKETCH = 4,
    /// A model file is missing (locally or on the Hub).
    SKETCHX_MODEL_NOT_FOUND = 5,
    /// A model file exists but cannot be parsed, or a LoRA file cannot be applied to the model (a key that
    /// matches no layer, a shape that does not fit), or a textual inversion embedding cannot be used (its width,
    /// its token, its layout); the message names the file and the key.
    SKETCHX_MODEL_MALFORMED = 6,
    /// A model configuration uses a feature sketchx does not implement.
    SKETCHX_MODEL_UNSUPPORTED = 7,
    /// Downloading from the Hugging Face Hub failed.
    SKETCHX_DOWNLOAD = 8,
    /// The requested device is not available in this build or on this machine.
    SKETCHX_DEVICE = 9,
    /// The job queue is full; try again later.
    SKETCHX_QUEUE_FULL = 10,
    /// No job has this id (never submitted, forgotten after cleanup, or not a 32-hex-digit id at all).
    SKETCHX_UNKNOWN_JOB = 11,
    /// A wait timed out (the job goes on).
    SKETCHX_TIMEOUT = 12,
    /// The operation was cancelled.
    SKETCHX_CANCELLED = 13,
    /// The pipeline has been shut down and accepts no more work.
    SKETCHX_SHUT_DOWN = 14,
    /// A job failed while running.
    SKETCHX_JOB_FAILED = 15,
    /// Reading or writing a file failed.
    SKETCHX_IO = 16,
    /// An internal (tensor) error, or an error kind newer than this list.
    SKETCHX_INTERNAL = 17,
    /// A Rust panic was caught at the API boundary (a bug in sketchx; the handle stays usable).
    SKETCHX_PANIC = 18,
    /// The caller's buffer is too small; the message says how many bytes are needed.
    SKETCHX_BUFFER_TOO_SMALL = 19,
    /// The job store (Redis) cannot be reached or refused a command; the message names the server or key.
    SKETCHX_STORE = 20,
    /// The job has not finished yet (queued or running), so it has no images yet; wait for it first.
    SKETCHX_NOT_FINISHED = 21,
    /// An index is past the end (an image index not below the job's image count); the message gives the count.
    SKETCHX_INDEX_OUT_OF_RANGE = 22,
}

use sketchx_result::*;

/// Every code, in order of value.
const ALL_RESULTS: [sketchx_result; 23] = [
    SKETCHX_OK,
    SKETCHX_NULL_ARGUMENT,
    SKETCHX_INVALID_UTF8,
    SKETCHX_INVALID_REQUEST,
    SKETCHX_INVALID_SKETCH,
    SKETCHX_MODEL_NOT_FOUND,
    SKETCHX_MODEL_MALFORMED,
    SKETCHX_MODEL_UNSUPPORTED,
    SKETCHX_DOWNLOAD,
    SKETCHX_DEVICE,
    SKETCHX_QUEUE_FULL,
    SKETCHX_UNKNOWN_JOB,
    SKETCHX_TIMEOUT,
    SKETCHX_CANCELLED,
    SKETCHX_SHUT_DOWN,
    SKETCHX_JOB_FAILED,
    SKETCHX_IO,
    SKETCHX_INTERNAL,
    SKETCHX_PANIC,
    SKETCHX_BUFFER_TOO_SMALL,
    SKETCHX_STORE,
    SKETCHX_NOT_FINISHED,
    SKETCHX_INDEX_OUT_OF_RANGE,
];

impl sketchx_result {
    /// The code's name as a NUL-terminated static string (`"SKETCHX_OK"`, ...).
    fn name(self) -> &'static CStr {
        match self {
            SKETCHX_OK => c"SKETCHX_OK",
            SKETCHX_NULL_ARGUMENT => c"SKETCHX_NULL_ARGUMENT",
            SKETCHX_INVALID_UTF8 => c"SKETCHX_INVALID_UTF8",
            SKETCHX_INVALID_REQUEST => c"SKETCHX_INVALID_REQUEST",
            SKETCHX_INVALID_SKETCH => c"SKETCHX_INVALID_SKETCH",
            SKETCHX_MODEL_NOT_FOUND => c"SKETCHX_MODEL_NOT_FOUND",
            SKETCHX_MODEL_MALFORMED => c"SKETCHX_MODEL_MALFORMED",
            SKETCHX_MODEL_UNSUPPORTED => c"SKETCHX_MODEL_UNSUPPORTED",
            SKETCHX_DOWNLOAD => c"SKETCHX_DOWNLOAD",
            SKETCHX_DEVICE => c"SKETCHX_DEVICE",
            SKETCHX_QUEUE_FULL => c"SKETCHX_QUEUE_FULL",
            SKETCHX_UNKNOWN_JOB => c"SKETCHX_UNKNOWN_JOB",
            SKETCHX_TIMEOUT => c"SKETCHX_TIMEOUT",
            SKETCHX_CANCELLED => c"SKETCHX_CANCELLED",
            SKETCHX_SHUT_DOWN => c"SKETCHX_SHUT_DOWN",
            SKETCHX_JOB_FAILED => c"SKETCHX_JOB_FAILED",
            SKETCHX_IO => c"SKETCHX_IO",
            SKETCHX_INTERNAL => c"SKETCHX_INTERNAL",
            SKETCHX_PANIC => c"SKETCHX_PANIC",
            SKETCHX_BUFFER_TOO_SMALL => c"SKETCHX_BUFFER_TOO_SMALL",
            SKETCHX_STORE => c"SKETCHX_STORE",
            SKETCHX_NOT_FINISHED => c"SKETCHX_NOT_FINISHED",
            SKETCHX_INDEX_OUT_OF_RANGE => c"SKETCHX_INDEX_OUT_OF_RANGE",
        }
    }
}

/// A failure on its way to the caller: the code, the message and (for invalid requests) the field.
#[derive(Debug)]
pub(crate) struct Failure {
    pub code: sketchx_result,
    pub message: String,
    pub field: Option<&'static str>,
}

impl Failure {
    pub fn new(code: sketchx_result, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
            field: None,
        }
    }

    /// `name` was NULL.
    pub fn null(name: &str) -> Self {
        Failure::new(SKETCHX_NULL_ARGUMENT, format!("{name} is NULL"))
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        let (code, field) = match e {
            Error::InvalidRequest { field, .. } => (SKETCHX_INVALID_REQUEST, Some(field)),
            Error::InvalidSketch(_) => (SKETCHX_INVALID_SKETCH, None),
            Error::MissingFile { .. } => (SKETCHX_MODEL_NOT_FOUND, None),
            Error::MalformedFile { .. } | Error::Lora { .. } | Error::Embedding { .. } => {
                (SKETCHX_MODEL_MALFORMED, None)
            }
            Error::UnsupportedModel { .. } | Error::Checkpoint { .. } => {
                (SKETCHX_MODEL_UNSUPPORTED, None)
            }
            Error::Download { .. } => (SKETCHX_DOWNLOAD, None),
            Error::Device(_) => (SKETCHX_DEVICE, None),
            Error::QueueFull { .. } => (SKETCHX_QUEUE_FULL, None),
            Error::UnknownJob(_) => (SKETCHX_UNKNOWN_JOB, None),
            Error::Timeout(_) => (SKETCHX_TIMEOUT, None),
            Error::Cancelled => (SKETCHX_CANCELLED, None),
            Error::ShutDown => (SKETCHX_SHUT_DOWN, None),
            Error::JobFailed(_) => (SKETCHX_JOB_FAILED, None),
            Error::Io { .. } => (SKETCHX_IO, None),
            Error::Candle(_) => (SKETCHX_INTERNAL, None),
            Error::Store { .. } => (SKETCHX_STORE, None),
            _ => (SKETCHX_INTERNAL, None),
        };
        Failure {
            code,
            message,
            field,
        }
    }
}

struct LastError {
    message: CString,
    field: CString,
}

thread_local! {
    static LAST_ERROR: RefCell<LastError> = RefCell::new(LastError {
        message: CString::default(),
        field: CString::default(),
    });
}

/// A C string from any text: interior NULs (which C cannot represent) become U+FFFD.
pub(crate) fn to_cstring(s: &str) -> CString {
    CString::new(s.replace('\0', "\u{FFFD}")).unwrap_or_default()
}

fn set_last_error(message: &str, field: &str) {
    let _ = LAST_ERROR.try_with(|l| {
        if let Ok(mut l) = l.try_borrow_mut() {
            l.message = to_cstring(message);
            l.field = to_cstring(field);
        }
    });
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let what = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    format!("internal panic in sketchx: {what}")
}

/// Runs a fallible API body inside the panic boundary: clears the last error, maps failures and panics to a
/// code and records their message.
pub(crate) fn guard(f: impl FnOnce() -> Result<(), Failure>) -> sketchx_result {
    set_last_error("", "");
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => SKETCHX_OK,
        Ok(Err(fail)) => {
            set_last_error(&fail.message, fail.field.unwrap_or(""));
            fail.code
        }
        Err(payload) => {
            set_last_error(&panic_message(payload.as_ref()), "");
            SKETCHX_PANIC
        }
    }
}

/// Runs an infallible API body (accessors, `_free`) inside the panic boundary; `fallback` on a panic.
pub(crate) fn guard_or<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(fallback)
}

/// The message of the last failed sketchx call on this thread, as UTF-8; `""` when the last fallible call
/// succeeded (every fallible function clears it on entry). Never NULL.
///
/// Ownership: the string belongs to the library (thread-local storage); do not free it. It stays valid until
/// the next fallible sketchx call on the same thread; copy it to keep it.
#[no_mangle]
pub extern "C" fn sketchx_last_error_message() -> *const c_char {
    guard_or(c"".as_ptr(), || {
        LAST_ERROR
            .try_with(|l| l.borrow().message.as_ptr())
            .unwrap_or(c"".as_ptr())
    })
}

/// For `SKETCHX_INVALID_REQUEST`: the offending request or option field (`"steps"`, `"guidance_scale"`,
/// `"device"`, ...); otherwise `""`. Never NULL.
///
/// Ownership: as [`sketchx_last_error_message`] (library-owned, valid until the next fallible call on this
/// thread).
#[no_mangle]
pub extern "C" fn sketchx_last_error_field() -> *const c_char {
    guard_or(c"".as_ptr(), || {
        LAST_ERROR
            .try_with(|l| l.borrow().field.as_ptr())
            .unwrap_or(c"".as_ptr())
    })
}

/// The name of a result code (`"SKETCHX_QUEUE_FULL"`), or `"SKETCHX_UNKNOWN_RESULT"` for a value that is not
/// one. Never NULL.
///
/// Ownership: a static string; do not free it.
#[no_mangle]
pub extern "C" fn sketchx_result_name(code: u32) -> *const c_char {
    guard_or(c"SKETCHX_UNKNOWN_RESULT".as_ptr(), || {
        ALL_RESULTS
            .iter()
            .find(|r| **r as u32 == code)
            .map_or(c"SKETCHX_UNKNOWN_RESULT", |r| r.name())
            .as_ptr()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last() -> (String, String) {
        // SAFETY: both accessors return valid NUL-terminated strings owned by this thread.
        unsafe {
            (
                CStr::from_ptr(sketchx_last_error_message())
                    .to_string_lossy()
                    .into_owned(),
                CStr::from_ptr(sketchx_last_error_field())
                    .to_string_lossy()
                    .into_owned(),
            )
        }
    }

    #[test]
    fn a_panic_becomes_a_code_and_a_message() {
        let r = guard(|| panic!("boom {}", 42));
        assert_eq!(r, SKETCHX_PANIC);
        assert_eq!(last().0, "internal panic in sketchx: boom 42");
        assert_eq!(guard_or(7, || panic!("static")), 7);
    }

    #[test]
    fn success_clears_the_last_error() {
        let r = guard(|| Err(Error::invalid("steps", "0 is too few").into()));
        assert_eq!(r, SKETCHX_INVALID_REQUEST);
        assert_eq!(
            last(),
            ("invalid steps: 0 is too few".into(), "steps".into())
        );
        assert_eq!(guard(|| Ok(())), SKETCHX_OK);
        assert_eq!(last(), (String::new(), String::new()));
    }

    #[test]
    fn every_core_error_has_a_code() {
        let cases: Vec<(Error, sketchx_result)> = vec![
            (
                Error::InvalidSketch(sketchx_core::SketchError::Empty),
                SKETCHX_INVALID_SKETCH,
            ),
            (
                Error::MissingFile { path: "x".into() },
                SKETCHX_MODEL_NOT_FOUND,
            ),
            (Error::malformed("x", "y"), SKETCHX_MODEL_MALFORMED),
            (Error::unsupported("x", "y"), SKETCHX_MODEL_UNSUPPORTED),
            (
                Error::Download {
                    repo: "r".into(),
                    file: "f".into(),
                    message: "m".into(),
                },
                SKETCHX_DOWNLOAD,
            ),
            (Error::Device("cuda".into()), SKETCHX_DEVICE),
            (Error::QueueFull { capacity: 1 }, SKETCHX_QUEUE_FULL),
            (Error::UnknownJob("x".into()), SKETCHX_UNKNOWN_JOB),
            (Error::Timeout("x".into()), SKETCHX_TIMEOUT),
            (Error::Cancelled, SKETCHX_CANCELLED),
            (Error::ShutDown, SKETCHX_SHUT_DOWN),
            (Error::JobFailed("x".into()), SKETCHX_JOB_FAILED),
            (
                Error::Store {
                    key: "redis://h:1".into(),
                    message: "refused".into(),
                },
                SKETCHX_STORE,
            ),
            (
                Error::io("p", std::io::Error::other("disk full")),
                SKETCHX_IO,
            ),
            (
                Error::Candle(candle_core::Error::Msg("m".into())),
                SKETCHX_INTERNAL,
            ),
        ];
        for (e, code) in cases {
            let f = Failure::from(e);
            assert_eq!(f.code, code, "{}", f.message);
            assert!(f.field.is_none());
        }
    }

    #[test]
    fn result_values_and_names_are_stable() {
        for (i, r) in ALL_RESULTS.iter().enumerate() {
            assert_eq!(*r as u32, i as u32);
            // SAFETY: static strings.
            let name = unsafe { CStr::from_ptr(sketchx_result_name(i as u32)) };
            assert_eq!(name, r.name());
        }
        // SAFETY: static string.
        let unknown = unsafe { CStr::from_ptr(sketchx_result_name(9999)) };
        assert_eq!(unknown, c"SKETCHX_UNKNOWN_RESULT");
        assert_eq!(SKETCHX_QUEUE_FULL as u32, 10);
        assert_eq!(SKETCHX_BUFFER_TOO_SMALL as u32, 19);
        assert_eq!(SKETCHX_STORE as u32, 20);
        assert_eq!(SKETCHX_NOT_FINISHED as u32, 21);
        assert_eq!(SKETCHX_INDEX_OUT_OF_RANGE as u32, 22);
    }

    #[test]
    fn nul_bytes_do_not_truncate_messages() {
        assert_eq!(to_cstring("a\0b").to_str().unwrap(), "a\u{FFFD}b");
    }
}
