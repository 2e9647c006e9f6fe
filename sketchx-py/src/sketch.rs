//! Python sketch and start-image arguments → [`SketchInput`] / [`StartImage`]. The Python layer has already
//! turned PIL images and numpy arrays into raw pixel bytes plus their `(height, width, channels)`; here only
//! `str`/`os.PathLike` (a file), `bytes` (an encoded image) and raw pixels remain.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyString};
use sketchx_core::request::StartImage;
use sketchx_core::sketch::Sketch;
use sketchx_core::{Error, SketchInput};

/// A sketch as handed over by Python, converted without decoding (decoding runs without the GIL).
pub enum SketchArg {
    /// A file path.
    Path(std::path::PathBuf),
    /// An encoded image.
    Bytes(Vec<u8>),
    /// Raw 8-bit pixels, row-major.
    Pixels {
        data: Vec<u8>,
        width: u32,
        height: u32,
        channels: u32,
    },
}

impl SketchArg {
    /// Reads the Python object; `raw` = `(height, width, channels)` marks `sketch` as raw pixel bytes.
    pub fn extract(sketch: &Bound<'_, PyAny>, raw: Option<(u32, u32, u32)>) -> Result<Self, Error> {
        Self::extract_field(sketch, raw, "sketch")
    }

    /// [`SketchArg::extract`] for the argument `field` (errors name it).
    fn extract_field(
        sketch: &Bound<'_, PyAny>,
        raw: Option<(u32, u32, u32)>,
        field: &'static str,
    ) -> Result<Self, Error> {
        let bytes = if let Ok(b) = sketch.cast::<PyBytes>() {
            Some(b.as_bytes().to_vec())
        } else {
            sketch.cast::<PyByteArray>().ok().map(|b| b.to_vec())
        };
        match (bytes, raw) {
            (Some(data), Some((height, width, channels))) => Ok(SketchArg::Pixels {
                data,
                width,
                height,
                channels,
            }),
            (Some(data), None) => Ok(SketchArg::Bytes(data)),
            (None, None) => sketch
                .extract::<std::path::PathBuf>()
                .map(SketchArg::Path)
                .map_err(|_| {
                    let kind = sketch
                        .get_type()
                        .name()
                        .map(|n| n.to_string())
                        .unwrap_or_else(|_| "?".into());
                    Error::invalid(
                        field,
                        format!("expected a path (str or os.PathLike), bytes, a PIL image or a numpy array of shape (H, W, 3) or (H, W, 4) and dtype uint8, got {kind}"),
                    )
                }),
            (None, Some(_)) => Err(Error::invalid(field, "raw pixels must be given as bytes")),
        }
    }

    /// The core's sketch input (raw pixels are validated here: 3 or 4 channels, matching length).
    pub fn into_input(self) -> Result<SketchInput, Error> {
        self.into_input_field("sketch")
    }

    fn into_input_field(self, field: &'static str) -> Result<SketchInput, Error> {
        Ok(match self {
            SketchArg::Path(p) => SketchInput::Path(p),
            SketchArg::Bytes(b) => SketchInput::Bytes(b),
            SketchArg::Pixels {
                data,
                width,
                height,
                channels: 3,
            } => SketchInput::Decoded(Sketch::from_rgb8(width, height, data)?),
            SketchArg::Pixels {
                data,
                width,
                height,
                channels: 4,
            } => SketchInput::Decoded(Sketch::from_rgba8(width, height, &data)?),
            SketchArg::Pixels { channels, .. } => {
                return Err(Error::invalid(
                    field,
                    format!("{channels} channels per pixel; expected 3 (RGB) or 4 (RGBA)"),
                ))
            }
        })
    }
}

/// A start image as handed over by Python: the sketch (`"sketch"`), or an image as a sketch is given.
pub enum StartImageArg {
    /// The sketch itself.
    Sketch,
    /// Another image, not yet decoded.
    Image(SketchArg),
}

impl StartImageArg {
    /// Reads the Python object: a `str` naming [`StartImage::SKETCH_NAME`] (any ASCII case) is the sketch; any
    /// other `str`, an `os.PathLike`, `bytes` or raw pixels (`raw` = `(height, width, channels)`) an image.
    pub fn extract(value: &Bound<'_, PyAny>, raw: Option<(u32, u32, u32)>) -> Result<Self, Error> {
        if let Ok(s) = value.cast::<PyString>() {
            if raw.is_none()
                && s.to_cow()
                    .is_ok_and(|t| t.trim().eq_ignore_ascii_case(StartImage::SKETCH_NAME))
            {
                return Ok(StartImageArg::Sketch);
            }
        }
        SketchArg::extract_field(value, raw, "start_image").map(StartImageArg::Image)
    }

    /// Decodes the image (without the GIL): the core's [`StartImage`], errors naming `start_image`.
    pub fn into_start_image(self) -> Result<StartImage, Error> {
        let arg = match self {
            StartImageArg::Sketch => return Ok(StartImage::Sketch),
            StartImageArg::Image(arg) => arg,
        };
        // Raw pixels whose size does not match are the start image's fault, not the sketch's.
        let input = arg.into_input_field("start_image").map_err(|e| match e {
            Error::InvalidSketch(e) => Error::invalid("start_image", e.to_string()),
            e => e,
        })?;
        match input {
            SketchInput::Path(p) => StartImage::open(&p),
            SketchInput::Bytes(b) => StartImage::decode(&b),
            SketchInput::Decoded(s) => Ok(StartImage::Image(Arc::new(s))),
        }
    }
}
