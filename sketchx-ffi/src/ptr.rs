//! Checked conversions of C pointers: NULL and invalid UTF-8 become [`Failure`]s, never undefined behaviour.

use std::ffi::{c_char, CStr};

use crate::error::{sketchx_result, Failure};

/// The object behind `p`, or a `SKETCHX_NULL_ARGUMENT` failure naming `name`.
///
/// # Safety
/// `p` is NULL or points to a valid, initialised `T` that outlives `'a` and is not mutated meanwhile.
pub(crate) unsafe fn arg_ref<'a, T>(p: *const T, name: &str) -> Result<&'a T, Failure> {
    // SAFETY: the caller guarantees `p` is NULL or valid.
    unsafe { p.as_ref() }.ok_or_else(|| Failure::null(name))
}

/// Checks that an out-pointer is not NULL (before any work is done, so nothing happens on failure).
pub(crate) fn arg_out<T>(p: *mut T, name: &str) -> Result<*mut T, Failure> {
    if p.is_null() {
        Err(Failure::null(name))
    } else {
        Ok(p)
    }
}

/// A UTF-8 string argument that may be NULL (`None`).
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that outlives `'a`.
pub(crate) unsafe fn opt_str<'a>(p: *const c_char, name: &str) -> Result<Option<&'a str>, Failure> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: the caller guarantees a NUL-terminated string.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map(Some).map_err(|e| {
        Failure::new(
            sketchx_result::SKETCHX_INVALID_UTF8,
            format!(
                "{name} is not valid UTF-8 (invalid byte at offset {})",
                e.valid_up_to()
            ),
        )
    })
}

/// A UTF-8 string argument that must not be NULL.
///
/// # Safety
/// As [`opt_str`].
pub(crate) unsafe fn arg_str<'a>(p: *const c_char, name: &str) -> Result<&'a str, Failure> {
    // SAFETY: forwarded from the caller.
    unsafe { opt_str(p, name) }?.ok_or_else(|| Failure::null(name))
}

/// A byte buffer argument (`data` must not be NULL, even for `len == 0`).
///
/// # Safety
/// `data` is NULL or points to `len` readable bytes that outlive `'a`.
pub(crate) unsafe fn arg_bytes<'a>(
    data: *const u8,
    len: usize,
    name: &str,
) -> Result<&'a [u8], Failure> {
    if data.is_null() {
        return Err(Failure::null(name));
    }
    // SAFETY: non-NULL, and the caller guarantees `len` readable bytes.
    Ok(unsafe { std::slice::from_raw_parts(data, len) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::sketchx_result::*;

    #[test]
    fn null_and_bad_utf8_are_failures() {
        // SAFETY: NULL or valid NUL-terminated literals.
        unsafe {
            assert_eq!(
                arg_str(std::ptr::null(), "prompt").unwrap_err().code,
                SKETCHX_NULL_ARGUMENT
            );
            assert_eq!(opt_str(std::ptr::null(), "prompt").unwrap(), None);
            assert_eq!(opt_str(c"h\xc3\xa9".as_ptr(), "p").unwrap(), Some("hé"));
            let bad = opt_str(c"ab\xff".as_ptr(), "prompt").unwrap_err();
            assert_eq!(bad.code, SKETCHX_INVALID_UTF8);
            assert_eq!(
                bad.message,
                "prompt is not valid UTF-8 (invalid byte at offset 2)"
            );
            assert_eq!(
                arg_ref::<u32>(std::ptr::null(), "x").unwrap_err().message,
                "x is NULL"
            );
            assert_eq!(*arg_ref(&5u32, "x").unwrap(), 5);
            assert!(arg_bytes(std::ptr::null(), 0, "data").is_err());
            assert_eq!(arg_bytes([1u8, 2].as_ptr(), 2, "data").unwrap(), &[1, 2]);
        }
        assert!(arg_out::<u32>(std::ptr::null_mut(), "out").is_err());
    }
}
