//! The names a user types, parsed in one place: devices, precisions, and the default models. Every binding (the
//! CLI and REST examples, C, Python) calls these parsers and takes these defaults and lists of accepted names;
//! none spells them again.
//!
//! Parsing is the same for every name the core accepts (here and in
//! [`SchedulerKind`](crate::sampling::schedulers::SchedulerKind), [`Preprocess`](crate::sketch::Preprocess) and
//! [`VaeKind`](crate::request::VaeKind)): surrounding whitespace is ignored and letters match in any ASCII case.
//!
//! ```
//! use candle_core::DType;
//! use sketchx_core::names::{device_from_name, dtype_from_name};
//!
//! let device = device_from_name(" CPU ")?;
//! assert_eq!(dtype_from_name(Some("BF16"), &device)?, DType::BF16);
//! assert_eq!(dtype_from_name(None, &device)?, DType::F32); // the default on the CPU
//! # Ok::<(), sketchx_core::Error>(())
//! ```

use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// The Stable Diffusion 1.5 repository used when none is given.
pub const DEFAULT_MODEL: &str = "stable-diffusion-v1-5/stable-diffusion-v1-5";
/// The scribble ControlNet used when none is given.
pub const DEFAULT_CONTROLNET: &str = "lllyasviel/sd-controlnet-scribble";
/// The device used when none is given.
pub const DEFAULT_DEVICE: &str = "cpu";

/// The device names [`device_from_name`] accepts, for help texts (`cuda:N` stands for `cuda:0`, `cuda:1`, ...).
pub const DEVICE_NAMES: [&str; 4] = ["cpu", "cuda", "cuda:N", "metal"];
/// The precision names [`dtype_from_name`] accepts.
pub const DTYPE_NAMES: [&str; 3] = ["f32", "bf16", "f16"];

/// Parses a device name: `cpu`, `cuda`, `cuda:N` or `metal` (the last two need the matching cargo feature).
///
/// An unknown name is [`Error::InvalidRequest`] for the field `device`; a known device this build or machine
/// cannot open is [`Error::Device`].
pub fn device_from_name(name: &str) -> Result<Device> {
    let unavailable = |e: candle_core::Error| Error::Device(format!("{name}: {e}"));
    match name.trim().to_ascii_lowercase().as_str() {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0).map_err(unavailable),
        "metal" => Device::new_metal(0).map_err(unavailable),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Device::new_cuda(i).map_err(unavailable),
            _ => Err(Error::invalid(
                "device",
                format!("{name:?} is not one of {}", DEVICE_NAMES.join(", ")),
            )),
        },
    }
}

/// Parses a precision name: `f32`, `bf16` or `f16` (see [`EngineConfig::dtype`](crate::engine::EngineConfig::dtype));
/// `None` or an empty name gives [`default_dtype`] for the device. An unknown name is [`Error::InvalidRequest`]
/// for the field `dtype`.
pub fn dtype_from_name(name: Option<&str>, device: &Device) -> Result<DType> {
    let Some(name) = name.filter(|n| !n.trim().is_empty()) else {
        return Ok(default_dtype(device));
    };
    let t = name.trim();
    [DType::F32, DType::BF16, DType::F16]
        .into_iter()
        .find(|d| t.eq_ignore_ascii_case(d.as_str()))
        .ok_or_else(|| {
            Error::invalid(
                "dtype",
                format!("{name:?} is not one of {}", DTYPE_NAMES.join(", ")),
            )
        })
}

/// The default precision on `device`: f32 on the CPU (the reference; bf16 is opt-in), f16 on GPUs.
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::F16
    }
}

/// `names` for an error message or a help text: each quoted, the last joined by "or" (`"a", "b" or "c"`).
pub fn quoted_list(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    match quoted.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

/// `Display` (the name) and `FromStr` (by [`parse_name`]: ASCII case-insensitive, surrounding whitespace ignored;
/// an unknown name is [`Error::InvalidRequest`] for `$field`) for a name enum with `ALL` and `as_str`.
macro_rules! name_traits {
    ($t:ty, $field:literal, $what:literal) => {
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $t {
            type Err = crate::error::Error;

            fn from_str(s: &str) -> crate::error::Result<Self> {
                crate::names::parse_name($field, $what, s, &Self::ALL, |k| k.as_str())
            }
        }
    };
}
pub(crate) use name_traits;

/// The member of `all` whose `name` is `s` (ASCII case-insensitive, surrounding whitespace ignored); otherwise
/// [`Error::InvalidRequest`] for `field`: "unknown `what` "s" (expected ...)".
pub(crate) fn parse_name<T: Copy>(
    field: &'static str,
    what: &str,
    s: &str,
    all: &[T],
    name: fn(T) -> &'static str,
) -> Result<T> {
    let t = s.trim();
    all.iter()
        .copied()
        .find(|k| t.eq_ignore_ascii_case(name(*k)))
        .ok_or_else(|| {
            let names: Vec<&str> = all.iter().map(|k| name(*k)).collect();
            Error::invalid(
                field,
                format!("unknown {what} {s:?} (expected {})", quoted_list(&names)),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `result` is an `InvalidRequest` for `field` whose message contains `needle`.
    fn assert_invalid<T: std::fmt::Debug>(result: Result<T>, field: &str, needle: &str) {
        match result {
            Err(Error::InvalidRequest { field: f, message }) => {
                assert_eq!(f, field);
                assert!(message.contains(needle), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn device_names_ignore_case_and_surrounding_whitespace() {
        for name in ["cpu", "CPU", " Cpu\t"] {
            assert!(device_from_name(name).unwrap().is_cpu(), "{name:?}");
        }
    }

    #[test]
    fn unknown_devices_name_the_field_and_list_the_accepted_names() {
        for name in ["tpu", "", "cuda:x", "cuda:-1"] {
            match device_from_name(name) {
                Err(Error::InvalidRequest { field, message }) => {
                    assert_eq!(field, "device");
                    for accepted in DEVICE_NAMES {
                        assert!(message.contains(accepted), "{message}");
                    }
                }
                other => panic!("{name:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn every_listed_dtype_parses_in_any_case_and_back() {
        let cpu = Device::Cpu;
        for name in DTYPE_NAMES {
            let d = dtype_from_name(Some(name), &cpu).unwrap();
            assert_eq!(d.as_str(), name);
            let upper = format!("  {}  ", name.to_ascii_uppercase());
            assert_eq!(dtype_from_name(Some(&upper), &cpu).unwrap(), d);
        }
    }

    #[test]
    fn absent_or_blank_dtype_is_the_devices_default() {
        let cpu = Device::Cpu;
        for name in [None, Some(""), Some("  ")] {
            assert_eq!(dtype_from_name(name, &cpu).unwrap(), default_dtype(&cpu));
        }
        assert_eq!(default_dtype(&cpu), DType::F32);
    }

    #[test]
    fn unknown_dtypes_name_the_field() {
        assert_invalid(
            dtype_from_name(Some("f64"), &Device::Cpu),
            "dtype",
            "f32, bf16, f16",
        );
    }

    #[test]
    fn scheduler_and_preprocess_names_parse_like_the_others() {
        use crate::sampling::schedulers::SchedulerKind;
        use crate::sketch::Preprocess;
        for kind in SchedulerKind::ALL {
            for spelled in [
                kind.as_str().to_string(),
                kind.as_str().to_ascii_uppercase(),
                format!(" {}\t", kind.as_str()),
            ] {
                assert_eq!(
                    spelled.parse::<SchedulerKind>().unwrap(),
                    kind,
                    "{spelled:?}"
                );
            }
        }
        for mode in Preprocess::ALL {
            for spelled in [mode.as_str().to_ascii_uppercase(), format!("  {mode} ")] {
                assert_eq!(spelled.parse::<Preprocess>().unwrap(), mode, "{spelled:?}");
            }
        }
        assert_eq!(
            SchedulerKind::names(),
            ["euler_a", "euler", "ddim", "lcm", "tcd"]
        );
        assert_eq!(
            Preprocess::names(),
            ["scribble", "lineart", "canny", "none"]
        );
        // The default comes first in each list.
        assert_eq!(SchedulerKind::ALL[0], SchedulerKind::default());
        assert_eq!(Preprocess::ALL[0], Preprocess::default());
        for bad in ["plms", "euler a"] {
            assert_invalid(
                bad.parse::<SchedulerKind>(),
                "scheduler",
                "\"euler_a\", \"euler\", \"ddim\", \"lcm\" or \"tcd\"",
            );
        }
        assert_invalid(
            "hed".parse::<Preprocess>(),
            "preprocess",
            "\"scribble\", \"lineart\", \"canny\" or \"none\"",
        );
    }

    #[test]
    fn quoted_lists_read_as_prose() {
        assert_eq!(quoted_list(&[]), "");
        assert_eq!(quoted_list(&["a"]), "\"a\"");
        assert_eq!(quoted_list(&["a", "b"]), "\"a\" or \"b\"");
        assert_eq!(
            quoted_list(&["euler_a", "euler", "ddim"]),
            "\"euler_a\", \"euler\" or \"ddim\""
        );
    }
}
