//! Jobs as callers see them: unguessable [`JobId`]s, the [`JobState`] machine, and the [`JobStatus`] snapshot
//! that serialises to the original service's JSON shape (`{"job_id", "status", "progress", "images",
//! "message"}` plus extra fields).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Serialize, Serializer};

use crate::error::{Error, Result};

/// A job's id: 128 random bits as 32 lowercase hex digits, safe in file names and URLs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(String);

impl JobId {
    /// A fresh id from the operating system's random source.
    pub fn random() -> Self {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b).expect("the operating system's random source is unavailable");
        JobId(b.iter().map(|x| format!("{x:02x}")).collect())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `s` has the shape of a job id (32 lowercase hex digits).
    pub fn is_well_formed(s: &str) -> bool {
        s.len() == 32
            && s.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    }
}

impl FromStr for JobId {
    type Err = Error;

    /// Parses an id; anything that is not 32 lowercase hex digits cannot be a job and is [`Error::UnknownJob`].
    fn from_str(s: &str) -> Result<Self> {
        if Self::is_well_formed(s) {
            Ok(JobId(s.to_string()))
        } else {
            Err(Error::UnknownJob(s.to_string()))
        }
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for JobId {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// Where a job is in its life. `Completed`, `Failed` and `Cancelled` are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting in the queue.
    Queued,
    /// Being generated.
    Running,
    /// Every image was written.
    Completed,
    /// An error (or a panic) stopped it; `message` says why.
    Failed,
    /// Cancelled by the caller or by shutdown.
    Cancelled,
}

impl JobState {
    /// Whether the state is final.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Failed | JobState::Cancelled
        )
    }

    /// The lowercase name used in JSON (`queued`, `running`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// An order in which a job's states only ever increase.
    pub fn rank(self) -> u8 {
        match self {
            JobState::Queued => 0,
            JobState::Running => 1,
            _ => 2,
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The original service's messages.
pub mod messages {
    /// While queued.
    pub const QUEUED: &str = "Task is waiting in the queue.";
    /// While running.
    pub const RUNNING: &str = "Task is in progress.";
    /// When every image is written.
    pub const COMPLETED: &str = "Task completed successfully.";
    /// After a cancel.
    pub const CANCELLED: &str = "Task was cancelled.";
    /// When shutdown cancelled a pending job.
    pub const CANCELLED_BY_SHUTDOWN: &str = "Task was cancelled: the pipeline shut down.";
}

fn unix_secs<S: Serializer>(t: &Option<SystemTime>, s: S) -> std::result::Result<S::Ok, S::Error> {
    match t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok()) {
        Some(d) => s.serialize_some(&d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

fn paths<S: Serializer>(p: &[PathBuf], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_seq(p.iter().map(|p| p.to_string_lossy()))
}

/// A snapshot of one job. Serialises (serde) to the original service's JSON, with extra fields after the
/// original five: `{"job_id", "status", "progress", "images", "message", "step", "total_steps", ...}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobStatus {
    /// The job.
    pub job_id: JobId,
    /// Its state (`"status"` in JSON, as in the original service).
    #[serde(rename = "status")]
    pub state: JobState,
    /// 0..=100: advances with every denoising step and every decoded image; 100 only when every file is written.
    pub progress: f64,
    /// Paths of the written images (only when completed).
    #[serde(serialize_with = "paths")]
    pub images: Vec<PathBuf>,
    /// A human-readable message: the original service's texts, or the error.
    pub message: String,
    /// Denoising steps done.
    pub step: usize,
    /// Denoising steps in all.
    pub total_steps: usize,
    /// 1-based position in the queue while queued (1 = next).
    pub queue_position: Option<usize>,
    /// Estimated seconds to completion while running, from measured step times.
    pub eta_secs: Option<f64>,
    /// The seed the job uses (the request's, or the random one drawn at submission).
    pub seed: u64,
    /// Images requested.
    pub num_images: u32,
    /// Output width in pixels.
    pub width: u32,
    /// Output height in pixels.
    pub height: u32,
    /// When the job was submitted (Unix seconds in JSON).
    #[serde(serialize_with = "unix_secs")]
    pub created_at: Option<SystemTime>,
    /// When it started running.
    #[serde(serialize_with = "unix_secs")]
    pub started_at: Option<SystemTime>,
    /// When it reached a final state.
    #[serde(serialize_with = "unix_secs")]
    pub finished_at: Option<SystemTime>,
}

impl JobStatus {
    /// The status as the original service's JSON (with the extra fields).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a JobStatus always serialises")
    }
}

/// A look at a running job: with a tiny VAE (TAESD) loaded, the step's predicted clean image decoded at full
/// resolution; otherwise a linear latent-to-RGB approximation of the current latents (no extra model) at latent
/// resolution (1/8 of the image for SD1.5).
#[derive(Debug, Clone, PartialEq)]
pub struct Preview {
    /// Denoising step the preview shows.
    pub step: usize,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// RGB8 pixels of the first image of the batch, row-major.
    pub rgb: Vec<u8>,
}

/// Callback receiving a snapshot after every change of a job: one call at a time, in the order of the changes, on
/// the thread that made the change or on one delivering earlier changes (whose call then also waits for it). It
/// may submit, poll and cancel, but must not wait for a job ([`Pipeline::wait`](crate::Pipeline::wait)): the job's
/// own next change would wait for the callback.
pub type EventCallback = Arc<dyn Fn(&JobStatus) + Send + Sync>;
