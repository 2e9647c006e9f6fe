//! Retention: deleting the pipeline's own old files from its output directory, as the original service's hourly
//! beat task did, but safely — only regular files named like sketchx output (`<32 hex>_<n>.png`, or the hidden
//! temporaries of an interrupted write), never following a symlink, never touching another file, and never the
//! files of queued, running or recently finished jobs.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::jobs::JobId;
use crate::store::JobStore;

/// What a cleanup removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CleanupReport {
    /// Files deleted.
    pub files_removed: usize,
    /// Bytes freed.
    pub bytes_removed: u64,
    /// Finished jobs forgotten (their ids now poll as unknown).
    pub jobs_forgotten: usize,
}

/// The job id an output file name belongs to: `<id>_<n>.png`, or a temporary `.<id>_<n>.png.tmp-<x>`.
pub fn owner_of(file_name: &str) -> Option<&str> {
    let name = file_name.strip_prefix('.').map_or(file_name, |rest| {
        rest.split_once(".png.tmp-").map_or("", |(stem, _)| stem)
    });
    let name = name.strip_suffix(".png").unwrap_or(name);
    let (id, index) = name.split_once('_')?;
    (JobId::is_well_formed(id) && !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()))
        .then_some(id)
}

/// Removes own files older than `max_age` from `dir` and has the store forget finished jobs that are older than
/// `max_age` and have no files left. Files of jobs that are queued, running, or finished less than `max_age` ago
/// are kept whatever their modification time.
pub(crate) fn sweep(store: &dyn JobStore, dir: &Path, max_age: Duration) -> Result<CleanupReport> {
    let now = SystemTime::now();
    let is_old = |t: SystemTime| now.duration_since(t).is_ok_and(|age| age >= max_age);
    let protected: HashSet<String> = store.protected(max_age).into_iter().collect();
    let mut report = CleanupReport::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(report),
        Err(e) => return Err(Error::io(dir, e)),
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(owner) = owner_of(name) else {
            continue;
        };
        if protected.contains(owner) {
            continue;
        }
        // symlink_metadata: a symlink is judged as itself (and skipped), never through its target.
        let Ok(meta) = std::fs::symlink_metadata(entry.path()) else {
            continue;
        };
        if !meta.file_type().is_file() {
            continue;
        }
        if meta.modified().is_ok_and(is_old) && std::fs::remove_file(entry.path()).is_ok() {
            report.files_removed += 1;
            report.bytes_removed += meta.len();
        }
    }
    // Forget old finished jobs whose files are gone (their ids then poll as unknown).
    report.jobs_forgotten = store.forget_old(max_age);
    Ok(report)
}
