//! The one error type of sketchx: every fallible operation returns [`Result`].
//!
//! Variants are typed so that bindings can map them to result codes (C) and exception classes (Python)
//! without parsing messages; every message names what is wrong (the field, the file, the limit).

use std::path::PathBuf;

/// Why a sketch image was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SketchError {
    /// The input held no bytes at all.
    #[error("the sketch is empty (0 bytes)")]
    Empty,
    /// The bytes are not an image format sketchx decodes.
    #[error("unrecognised image format (expected PNG, JPEG, WebP, BMP or GIF)")]
    UnknownFormat,
    /// The image header or data is damaged or truncated.
    #[error("the sketch could not be decoded: {0}")]
    Corrupt(String),
    /// The image is larger than the decoder limits allow (a decompression bomb, or simply too big).
    #[error("the sketch is too large: {width}x{height} pixels exceeds the limit of {max_side} pixels per side / {max_pixels} pixels in total")]
    TooLarge {
        /// Declared width in pixels.
        width: u32,
        /// Declared height in pixels.
        height: u32,
        /// Largest accepted side.
        max_side: u32,
        /// Largest accepted pixel count.
        max_pixels: u64,
    },
    /// The image has a zero-sized side.
    #[error("the sketch has no pixels ({width}x{height})")]
    ZeroSized {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
    /// Reading the sketch file failed.
    #[error("cannot read sketch file {path}: {message}")]
    Read {
        /// The file that was read.
        path: PathBuf,
        /// The operating system's message.
        message: String,
    },
    /// Raw pixels were given with a length that does not match their dimensions.
    #[error("pixel buffer of {len} bytes does not match {width}x{height}x{channels}")]
    PixelBuffer {
        /// Bytes given.
        len: usize,
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// Channels per pixel.
        channels: u32,
    },
}

/// Every error sketchx reports.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A request field is out of range or malformed; `field` is the request field's name.
    #[error("invalid {field}: {message}")]
    InvalidRequest {
        /// The offending field, as named in the request (`steps`, `guidance_scale`, ...).
        field: &'static str,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// The sketch image could not be used.
    #[error("invalid sketch: {0}")]
    InvalidSketch(#[from] SketchError),
    /// A model file is missing (locally, or on the Hub).
    #[error("model file not found: {path}")]
    MissingFile {
        /// The file that was looked for (a path, or `repo_id/file` for the Hub).
        path: String,
    },
    /// A model file exists but cannot be parsed.
    #[error("malformed model file {path}: {message}")]
    MalformedFile {
        /// The file.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// A model configuration uses a feature sketchx does not implement.
    #[error("unsupported model configuration in {path}: {message}")]
    UnsupportedModel {
        /// The configuration file.
        path: String,
        /// What is unsupported.
        message: String,
    },
    /// Downloading from the Hugging Face Hub failed.
    #[error("download of {repo}/{file} failed: {message}")]
    Download {
        /// The repository id.
        repo: String,
        /// The file within the repository.
        file: String,
        /// The underlying error.
        message: String,
    },
    /// The requested device is not available in this build or on this machine.
    #[error("device unavailable: {0}")]
    Device(String),
    /// The job queue is at capacity; try again later.
    #[error("the job queue is full ({capacity} jobs waiting)")]
    QueueFull {
        /// The queue's capacity.
        capacity: usize,
    },
    /// No job has this id (never submitted, or forgotten after cleanup).
    #[error("unknown job id {0:?}")]
    UnknownJob(String),
    /// Waiting for a job took longer than the caller's timeout (the job goes on).
    #[error("timed out waiting for job {0}")]
    Timeout(String),
    /// The operation was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// The pipeline has been shut down and accepts no more work.
    #[error("the pipeline is shut down")]
    ShutDown,
    /// A job failed while running (an error or a panic inside the worker).
    #[error("generation failed: {0}")]
    JobFailed(String),
    /// Reading or writing a file failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A LoRA file cannot be applied to the models: a key that matches no layer (or belongs to another model
    /// family, such as SDXL), a shape that does not fit its layer, a non-finite alpha. Nothing is loaded.
    #[error("cannot apply LoRA {path}: {key}: {message}")]
    Lora {
        /// The LoRA file (a path, or `repo_id/file` for the Hub).
        path: String,
        /// The LoRA key at fault, or the model layer (diffusers' dotted module name) whose shape does not fit.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A textual inversion embedding cannot be used: a file layout that holds no embedding (or several), a width
    /// that differs from the text encoder's, a token that is already in the tokenizer's vocabulary, a file without
    /// a token of its own and none given. Nothing is loaded.
    #[error("cannot load embedding {path}: {key}: {message}")]
    Embedding {
        /// The embedding file (a path, or `repo_id/file` for the Hub).
        path: String,
        /// The key of the file at fault (`emb_params`, `string_to_param`, ...) or the token.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A weights file whose content sketchx will not use as it stands, named down to the key at fault: a
    /// checkpoint of another model family (SD2, SDXL, a LoRA or a ControlNet given as a model), a key that maps to
    /// no layer of the network being built, a tensor whose shape does not fit it, a missing tensor, or a pickle
    /// entry built by a Python callable that sketchx never runs (such as `os.system`). Nothing is loaded.
    #[error("cannot load {path}: {key}: {message}")]
    Checkpoint {
        /// The file (a path, or `repo_id/file` for the Hub).
        path: String,
        /// The key at fault, as the file names it (for a pickle, the path of dict keys joined with `/`).
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A tensor operation failed inside candle.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// The job store (Redis) could not be reached or refused a command; `key` names the server or key involved.
    #[error("job store error on {key}: {message}")]
    Store {
        /// The store address (without credentials) or the key the command was about.
        key: String,
        /// What went wrong.
        message: String,
    },
}

/// The result type of every fallible sketchx function.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Shorthand for [`Error::InvalidRequest`].
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Error::InvalidRequest {
            field,
            message: message.into(),
        }
    }

    /// Shorthand for [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// An error opening or reading a model file: [`Error::MissingFile`] when it does not exist, [`Error::Io`]
    /// otherwise.
    pub fn reading(path: &std::path::Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::MissingFile {
                path: path.display().to_string(),
            }
        } else {
            Error::io(path, source)
        }
    }

    /// Shorthand for [`Error::MalformedFile`].
    pub fn malformed(path: impl std::fmt::Display, message: impl std::fmt::Display) -> Self {
        Error::MalformedFile {
            path: path.to_string(),
            message: message.to_string(),
        }
    }

    /// Shorthand for [`Error::UnsupportedModel`].
    pub fn unsupported(path: impl std::fmt::Display, message: impl std::fmt::Display) -> Self {
        Error::UnsupportedModel {
            path: path.to_string(),
            message: message.to_string(),
        }
    }
}
