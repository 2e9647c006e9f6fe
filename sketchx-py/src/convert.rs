//! Python values to the core's types. Only types are translated here (an `int` to `u32`, a number to `f64`, a
//! `str` to `String`); every range and rule is the core's. An integer too wide for the core's type gets the
//! core's out-of-range message ([`int_out_of_range`]).

use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyInt, PyString, PyTuple};
use sketchx_core::models::lora::LoraSpec;
use sketchx_core::models::textual_inversion::EmbeddingSpec;
use sketchx_core::settings::{duration_from_secs, int_out_of_range};

use crate::errors::{invalid, to_py};

/// The Python type's name of `value`, for messages.
pub fn type_name(value: &Bound<'_, PyAny>) -> String {
    value
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// An integer field (`bool` refused): an `int` that does not fit `T` is the core's out-of-range error.
pub fn int_field<'py, T>(
    py: Python<'py>,
    field: &'static str,
    value: &Bound<'py, PyAny>,
) -> PyResult<T>
where
    T: FromPyObjectOwned<'py>,
{
    if value.is_instance_of::<PyBool>() {
        return Err(invalid(py, field, "expected an integer, got bool"));
    }
    match value.extract::<T>() {
        Ok(v) => Ok(v),
        Err(_) if value.is_instance_of::<PyInt>() => Err(to_py(py, int_out_of_range(field, value))),
        Err(_) => Err(invalid(
            py,
            field,
            format!("expected an integer, got {}", type_name(value)),
        )),
    }
}

/// [`int_field`] where `None` means absent.
pub fn opt_int_field<'py, T>(
    py: Python<'py>,
    field: &'static str,
    value: Option<&Bound<'py, PyAny>>,
) -> PyResult<Option<T>>
where
    T: FromPyObjectOwned<'py>,
{
    value
        .filter(|v| !v.is_none())
        .map(|v| int_field(py, field, v))
        .transpose()
}

/// A float field (ints are accepted; `bool` and `str` are not).
pub fn float_field(py: Python<'_>, field: &'static str, value: &Bound<'_, PyAny>) -> PyResult<f64> {
    let refuse = || {
        invalid(
            py,
            field,
            format!("expected a number, got {}", type_name(value)),
        )
    };
    if value.is_instance_of::<PyBool>() || value.is_instance_of::<PyString>() {
        return Err(refuse());
    }
    value.extract::<f64>().map_err(|_| refuse())
}

/// [`float_field`] where `None` means absent.
pub fn opt_float_field(
    py: Python<'_>,
    field: &'static str,
    value: Option<&Bound<'_, PyAny>>,
) -> PyResult<Option<f64>> {
    value
        .filter(|v| !v.is_none())
        .map(|v| float_field(py, field, v))
        .transpose()
}

/// A text field; `None` means absent.
pub fn text_field(
    py: Python<'_>,
    field: &'static str,
    value: Option<&Bound<'_, PyAny>>,
) -> PyResult<Option<String>> {
    match value.filter(|v| !v.is_none()) {
        None => Ok(None),
        Some(v) => v.extract::<String>().map(Some).map_err(|_| {
            invalid(
                py,
                field,
                format!("expected a str or None, got {}", type_name(v)),
            )
        }),
    }
}

/// A flag: only a real `bool` (a truthy string or number here is far more likely a mistake than a wish).
pub fn bool_field(py: Python<'_>, field: &'static str, value: &Bound<'_, PyAny>) -> PyResult<bool> {
    match value.cast::<PyBool>() {
        Ok(b) => Ok(b.is_true()),
        Err(_) => Err(invalid(
            py,
            field,
            format!("expected a bool, got {}", type_name(value)),
        )),
    }
}

/// Seconds as a [`Duration`], by the core's rule ([`duration_from_secs`]).
pub fn seconds(py: Python<'_>, field: &'static str, secs: f64) -> PyResult<Duration> {
    duration_from_secs(field, secs).map_err(|e| to_py(py, e))
}

/// The `loras` argument: an iterable of `(path, scale)` pairs (a `str` or `os.PathLike` location and a number),
/// or of bare locations (scale [`LoraSpec::DEFAULT_SCALE`]); `None` is none. Locations and scales are checked by
/// the core ([`sketchx_core::settings::PipelineSettings::to_config`]); a malformed item is an invalid `loras`.
pub fn lora_list(py: Python<'_>, value: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<(String, f64)>> {
    pair_list(py, "loras", "(path, scale)", value, |second| match second {
        Some(scale) => float_field(py, "loras.scale", scale),
        None => Ok(LoraSpec::DEFAULT_SCALE),
    })
}

/// The `embeddings` argument: an iterable of `(path, token)` pairs (a `str` or `os.PathLike` location and a
/// `str` token, or `None` for the file's own), or of bare `PATH[:TOKEN]` locations as the CLI takes them (split
/// by [`EmbeddingSpec::split_arg`]: no token, the file's own, unless one follows the last `:`); `None` is none.
/// Locations and tokens are checked by the core; a malformed item is an invalid `embeddings`.
pub fn embedding_list(
    py: Python<'_>,
    value: Option<&Bound<'_, PyAny>>,
) -> PyResult<Vec<(String, Option<String>)>> {
    let mut out = pair_list(py, "embeddings", "(path, token)", value, |second| {
        Ok(match second {
            Some(token) => Tagged::Given(text_field(py, "embeddings.token", Some(token))?),
            None => Tagged::Bare,
        })
    })?;
    // Bare locations may end in `:TOKEN`: split by the core's rule.
    Ok(out
        .drain(..)
        .map(|(location, token)| match token {
            Tagged::Given(token) => (location, token),
            Tagged::Bare => {
                let (location, token) = EmbeddingSpec::split_arg(&location);
                (location.to_string(), token.map(str::to_string))
            }
        })
        .collect())
}

/// An `embeddings` item's token: given in a pair (maybe `None`), or absent (a bare location).
enum Tagged {
    Given(Option<String>),
    Bare,
}

/// An iterable argument `field` of `pair` tuples (a location and a second value) or bare locations, each
/// location a `str` or `os.PathLike`; `second` converts the tuple's second item (`None` for a bare location).
fn pair_list<T>(
    py: Python<'_>,
    field: &'static str,
    pair: &str,
    value: Option<&Bound<'_, PyAny>>,
    second: impl Fn(Option<&Bound<'_, PyAny>>) -> PyResult<T>,
) -> PyResult<Vec<(String, T)>> {
    let Some(value) = value.filter(|v| !v.is_none()) else {
        return Ok(Vec::new());
    };
    if value.is_instance_of::<PyString>() {
        return Err(invalid(
            py,
            field,
            format!("expected a list of {pair} pairs, got a str"),
        ));
    }
    let items = value.try_iter().map_err(|_| {
        invalid(
            py,
            field,
            format!("expected a list of {pair} pairs, got {}", type_name(value)),
        )
    })?;
    let location = |item: &Bound<'_, PyAny>| -> PyResult<String> {
        let os = py.import("os")?;
        os.call_method1("fspath", (item,))
            .and_then(|p| p.extract::<String>())
            .map_err(|_| {
                invalid(
                    py,
                    field,
                    format!(
                        "expected a path (str or os.PathLike), got {}",
                        type_name(item)
                    ),
                )
            })
    };
    let mut out = Vec::new();
    for item in items {
        let item = item?;
        if let Ok(tuple) = item.cast::<PyTuple>() {
            if tuple.len() != 2 {
                return Err(invalid(
                    py,
                    field,
                    format!("expected a {pair} pair, got a tuple of {}", tuple.len()),
                ));
            }
            let value = second(Some(&tuple.get_item(1)?))?;
            out.push((location(&tuple.get_item(0)?)?, value));
        } else {
            out.push((location(&item)?, second(None)?));
        }
    }
    Ok(out)
}
