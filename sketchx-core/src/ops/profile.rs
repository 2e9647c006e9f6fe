//! An opt-in per-operation-kind timer for the UNet and ControlNet.
//!
//! Off by default (one relaxed atomic load per operation). When [`enable`]d, every operation that the blocks run
//! through [`scope`] adds its wall time to its kind; [`take`] returns and clears the totals. candle's CPU
//! operations are synchronous, so wall time around a call is the time of that call.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<BTreeMap<&'static str, (Duration, u64)>> = Mutex::new(BTreeMap::new());

/// Turns timing on or off.
#[cfg(any(test, feature = "bench-internals"))]
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Runs `f`, adding its wall time to `kind` when timing is enabled.
#[inline]
pub fn scope<T>(kind: &'static str, f: impl FnOnce() -> T) -> T {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    let start = Instant::now();
    let out = f();
    let dt = start.elapsed();
    let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let e = totals.entry(kind).or_insert((Duration::ZERO, 0));
    e.0 += dt;
    e.1 += 1;
    out
}

/// The accumulated `(kind, seconds, calls)`, largest first; clears the totals.
#[cfg(any(test, feature = "bench-internals"))]
pub fn take() -> Vec<(&'static str, f64, u64)> {
    let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<_> = std::mem::take(&mut *totals)
        .into_iter()
        .map(|(k, (d, n))| (k, d.as_secs_f64(), n))
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}
