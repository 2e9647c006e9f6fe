//! Python sketch arguments → [`SketchInput`]. The Python layer has already turned PIL images and numpy arrays
//! into raw pixel bytes plus their `(height, width, channels)`; here only `str`/`os.PathLike` (a file), `bytes`
//! (an encoded image) and raw pixels remain.

use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes};
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
                        "sketch",
                        format!("expected a path (str or os.PathLike), bytes, a PIL image or a numpy array of shape (H, W, 3) or (H, W, 4) and dtype uint8, got {kind}"),
                    )
                }),
            (None, Some(_)) => Err(Error::invalid("sketch", "raw pixels must be given as bytes")),
        }
    }

    /// The core's sketch input (raw pixels are validated here: 3 or 4 channels, matching length).
    pub fn into_input(self) -> Result<SketchInput, Error> {
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
                    "sketch",
                    format!("{channels} channels per pixel; expected 3 (RGB) or 4 (RGBA)"),
                ))
            }
        })
    }
}
