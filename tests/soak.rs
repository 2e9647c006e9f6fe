//! A short soak of the job pipeline in the suite (`scripts/soak` runs the long ones): 100 jobs from 8 threads on
//! the tiny fixture models, bounded queue, random cancels of queued and running jobs; nothing lost, one final
//! state per job, never backwards, files exactly for completed jobs, no temporary left, memory flat. The driver is
//! `examples/soak.rs`, shared with the long run.

#[path = "../examples/soak.rs"]
#[allow(dead_code)] // `main` and the report line serve the example
mod soak;

#[test]
fn soak_100_jobs_from_8_threads_with_cancels() {
    let dir = std::env::temp_dir().join(format!("sketchx-soak-test-{}", std::process::id()));
    let report = soak::run(&soak::on_fixtures(100, 8, dir.clone())).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    println!("{}", report.line("rust"));
    assert!(report.violations.is_empty(), "{:#?}", report.violations);
    assert_eq!(report.jobs, 100);
    assert_eq!(report.completed + report.failed + report.cancelled, 100);
    assert!(
        report.cancels > 0 && report.cancelled > 0,
        "the soak cancelled nothing: {report:?}"
    );
    assert!(
        report.queue_full > 0,
        "the queue was never full: {report:?}"
    );
}

#[test]
fn the_memory_rule_can_fail() {
    assert!(soak::memory_is_flat(100_000, 110_000));
    assert!(!soak::memory_is_flat(100_000, 150_000));
    assert!(soak::rss_kib() > 0, "no VmRSS in /proc/self/status");
}
