//! Faults around the job pipeline on the tiny fixture models: the output directory removed while a job runs, made
//! read-only, or full (a 64 KiB tmpfs); an event callback that panics. In each case the job fails with a message
//! naming the path, no partial or temporary file is ever left, and the pipeline goes on serving once the fault is
//! gone. The read-only and disk-full cases need `mount` (as root) for a tmpfs, since root ignores file
//! permissions; without it the read-only case falls back to `chmod` (as a user) and the others say why they skip.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sketchx::request::GenerationRequest;
use sketchx::{JobId, JobState, JobStatus, Pipeline, PipelineConfig};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sketchx-faults-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn config(output_dir: &Path) -> PipelineConfig {
    let (model, controlnet) = tiny_models();
    let mut c = PipelineConfig::new(&model, &controlnet).unwrap();
    c.output_dir = output_dir.to_path_buf();
    c.cleanup_interval = None;
    c.preview_every = 0;
    c
}

fn req(steps: u32) -> GenerationRequest {
    GenerationRequest {
        prompt: Some("a house".into()),
        steps,
        width: Some(64),
        height: Some(64),
        seed: Some(3),
        ..GenerationRequest::DEFAULT
    }
}

fn sketch() -> Vec<u8> {
    std::fs::read(fixtures().join("sketches/house_black_on_white.png")).unwrap()
}

fn run(pipe: &Pipeline, steps: u32) -> JobStatus {
    let id = pipe.submit(req(steps), sketch()).unwrap();
    pipe.wait(&id, Some(Duration::from_secs(300))).unwrap()
}

/// Every entry of `dir`, hidden temporaries included.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The job failed with a message naming `dir` and the system's reason.
fn assert_failed_naming(st: &JobStatus, dir: &Path, reason: &[&str]) {
    assert_eq!(st.state, JobState::Failed, "{st:?}");
    assert!(st.images.is_empty(), "{st:?}");
    assert!(
        st.message.contains(&*dir.to_string_lossy()),
        "the message does not name {}: {}",
        dir.display(),
        st.message
    );
    assert!(
        reason.iter().any(|r| st.message.contains(r)),
        "the message gives none of {reason:?}: {}",
        st.message
    );
}

fn wait_running(pipe: &Pipeline, id: &JobId) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while pipe.poll(id).unwrap().state == JobState::Queued {
        assert!(Instant::now() < deadline, "the job never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(pipe.poll(id).unwrap().state, JobState::Running);
}

#[test]
fn output_dir_removed_while_a_job_runs() {
    let out = dir("removed");
    let pipe = Pipeline::new(config(&out)).unwrap();
    assert_eq!(run(&pipe, 1).state, JobState::Completed);
    // A job long enough to be caught running (tens of steps of the tiny model).
    let id = pipe.submit(req(20), sketch()).unwrap();
    wait_running(&pipe, &id);
    std::fs::remove_dir_all(&out).unwrap();
    let st = pipe.wait(&id, Some(Duration::from_secs(300))).unwrap();
    assert_failed_naming(&st, &out, &["No such file or directory"]);
    assert!(!out.exists(), "something recreated the directory");
    // Still serving: the next job fails the same way, and once the directory is back one completes.
    assert_failed_naming(&run(&pipe, 1), &out, &["No such file or directory"]);
    std::fs::create_dir(&out).unwrap();
    let st = run(&pipe, 1);
    assert_eq!(st.state, JobState::Completed, "{}", st.message);
    let names: Vec<String> = st
        .images
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(entries(&out), names, "only the last job's image is there");
    drop(pipe);
    std::fs::remove_dir_all(&out).unwrap();
}

/// A tmpfs mounted (as root) on a directory; unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (mount's syntax, e.g. `64k`) on `dir`, or says why it cannot.
    fn mount(dir: &Path, size: &str) -> Result<Self, String> {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs(dir.to_path_buf()))
    }

    fn remount(&self, mode: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,{mode}")])
            .arg(&self.0)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "remount {mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|u| u.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

#[test]
fn read_only_output_dir() {
    use std::os::unix::fs::PermissionsExt;
    let out = dir("readonly");
    // Root ignores permissions: a read-only tmpfs is then the only way; a user gets chmod 0555.
    let mounted = if is_root() {
        match Tmpfs::mount(&out, "1m") {
            Ok(m) => Some(m),
            Err(why) => {
                println!("SKIPPED read_only_output_dir: running as root and {why}");
                return;
            }
        }
    } else {
        None
    };
    let pipe = Pipeline::new(config(&out)).unwrap();
    assert_eq!(run(&pipe, 1).state, JobState::Completed);
    let before = entries(&out);
    let set_read_only = |ro: bool| match &mounted {
        Some(m) => m.remount(if ro { "ro" } else { "rw" }),
        None => std::fs::set_permissions(
            &out,
            std::fs::Permissions::from_mode(if ro { 0o555 } else { 0o755 }),
        )
        .unwrap(),
    };
    set_read_only(true);
    let st = run(&pipe, 1);
    assert_failed_naming(&st, &out, &["Read-only file system", "Permission denied"]);
    assert_eq!(entries(&out), before, "the failed job left something");
    set_read_only(false);
    let st = run(&pipe, 1);
    assert_eq!(st.state, JobState::Completed, "{}", st.message);
    assert_eq!(entries(&out).len(), before.len() + 1);
    drop(pipe);
    drop(mounted);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn disk_full() {
    let out = dir("full");
    let mounted = match Tmpfs::mount(&out, "64k") {
        Ok(m) => m,
        Err(why) => {
            println!("SKIPPED disk_full: {why}");
            return;
        }
    };
    let pipe = Pipeline::new(config(&out)).unwrap();
    // Fill the file system to the last byte.
    let filler = out.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 4096];
        let err = loop {
            if let Err(e) = f.write_all(&block) {
                break e;
            }
        };
        assert_eq!(err.raw_os_error(), Some(28), "{err}"); // ENOSPC
    }
    let st = run(&pipe, 1);
    assert_failed_naming(&st, &out, &["No space left on device"]);
    assert_eq!(entries(&out), ["filler"], "the failed job left something");
    // Space freed: serving goes on.
    std::fs::remove_file(&filler).unwrap();
    let st = run(&pipe, 1);
    assert_eq!(st.state, JobState::Completed, "{}", st.message);
    assert_eq!(entries(&out).len(), 1);
    drop(pipe);
    drop(mounted);
}

#[test]
fn a_panicking_event_callback_does_not_stop_jobs() {
    let out = dir("callback");
    let mut cfg = config(&out);
    let calls = Arc::new(AtomicUsize::new(0));
    {
        let calls = calls.clone();
        cfg.on_event = Some(Arc::new(move |s: &JobStatus| {
            calls.fetch_add(1, Ordering::SeqCst);
            panic!("callback panics on purpose at {}", s.state);
        }));
    }
    let pipe = Pipeline::new(cfg).unwrap();
    for _ in 0..3 {
        let st = run(&pipe, 2);
        assert_eq!(st.state, JobState::Completed, "{}", st.message);
        assert!(st.images.iter().all(|p| p.is_file()));
    }
    // Every change still reached the callback (submit, start, steps, decode, end: more than 4 per job).
    assert!(
        calls.load(Ordering::SeqCst) > 12,
        "{}",
        calls.load(Ordering::SeqCst)
    );
    // Cancels also go through it.
    let id = pipe.submit(req(150), sketch()).unwrap();
    assert!(pipe.cancel(&id).unwrap());
    let st = pipe.wait(&id, Some(Duration::from_secs(120))).unwrap();
    assert_eq!(st.state, JobState::Cancelled);
    drop(pipe);
    let _ = std::fs::remove_dir_all(&out);
}
