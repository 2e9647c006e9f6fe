//! An opt-in per-operation-kind timer for the UNet and ControlNet.
//!
//! Off by default (one relaxed atomic load per operation). When [`enable`]d, every operation that the blocks run
//! through [`scope`] adds its wall time to its kind, and the products that go through [`scope_flops`] also their
//! floating-point operations (a multiply-add counts two), so a kind's rate can be set against the machine's peak;
//! [`take`] returns and clears the totals. With [`enable_shapes`] the convolutions, linear layers and attention are
//! timed per input shape as well as per kind. candle's CPU operations are synchronous, so wall time around a call is
//! the time of that call.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(false);
static SHAPES: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<BTreeMap<&'static str, Totals>> = Mutex::new(BTreeMap::new());

/// One kind's accumulated time, calls and floating-point operations.
#[derive(Default)]
struct Totals {
    time: Duration,
    calls: u64,
    flops: u64,
}

/// Turns timing on or off.
#[cfg(any(test, feature = "bench-internals"))]
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether timing is on.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Runs `f`, adding its wall time to `kind` when timing is enabled.
#[inline]
pub fn scope<T>(kind: &'static str, f: impl FnOnce() -> T) -> T {
    scope_flops(kind, || 0, f)
}

/// `kind`, or `kind` followed by `shape()` while timing by shape ([`enable_shapes`]) is on, so that each shape of
/// an operation kind is timed apart (the names are kept for the process: a few dozen shapes per model).
pub fn shaped(kind: &'static str, shape: impl FnOnce() -> String) -> &'static str {
    if !ENABLED.load(Ordering::Relaxed) || !SHAPES.load(Ordering::Relaxed) {
        return kind;
    }
    static NAMES: Mutex<BTreeMap<String, &'static str>> = Mutex::new(BTreeMap::new());
    let key = format!("{kind} {}", shape());
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(&name) = names.get(&key) {
        return name;
    }
    let name: &'static str = Box::leak(key.clone().into_boxed_str());
    names.insert(key, name);
    name
}

/// Turns timing by shape ([`shaped`]) on or off.
#[cfg(any(test, feature = "bench-internals"))]
pub fn enable_shapes(on: bool) {
    SHAPES.store(on, Ordering::Relaxed);
}

/// [`scope`] for an operation of `flops()` floating-point operations (computed only when timing is enabled).
#[inline]
pub fn scope_flops<T>(kind: &'static str, flops: impl FnOnce() -> u64, f: impl FnOnce() -> T) -> T {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    let start = Instant::now();
    let out = f();
    let dt = start.elapsed();
    let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let e = totals.entry(kind).or_default();
    e.time += dt;
    e.calls += 1;
    e.flops = e.flops.saturating_add(flops());
    out
}

/// One kind's totals, as [`take`] returns them.
#[cfg(any(test, feature = "bench-internals"))]
#[derive(Debug, Clone, PartialEq)]
pub struct KindTotals {
    /// The operation kind (`conv3x3`, `linear`, ...).
    pub kind: &'static str,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Calls timed.
    pub calls: u64,
    /// Floating-point operations of the calls that count them (0 for kinds that do not).
    pub flops: u64,
}

/// The accumulated totals per kind, largest time first; clears them.
#[cfg(any(test, feature = "bench-internals"))]
pub fn take() -> Vec<KindTotals> {
    let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<_> = std::mem::take(&mut *totals)
        .into_iter()
        .map(|(kind, t)| KindTotals {
            kind,
            seconds: t.time.as_secs_f64(),
            calls: t.calls,
            flops: t.flops,
        })
        .collect();
    v.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_time_calls_and_flops_per_kind() {
        enable(true);
        let x = scope_flops("test-flops", || 1000, || 7);
        scope_flops("test-flops", || 24, || ());
        scope("test-plain", || ());
        enable(false);
        // Disabled: neither counted nor its flops computed.
        scope_flops(
            "test-flops",
            || panic!("flops computed while disabled"),
            || (),
        );
        assert_eq!(x, 7);
        let totals = take();
        let get = |k: &str| totals.iter().find(|t| t.kind == k).cloned();
        let f = get("test-flops").expect("kind recorded");
        assert_eq!((f.calls, f.flops), (2, 1024));
        let p = get("test-plain").expect("kind recorded");
        assert_eq!((p.calls, p.flops), (1, 0));
        // By shape: one name per shape, the same name for the same shape.
        enable(true);
        assert_eq!(shaped("test-shape", || "[1]".into()), "test-shape");
        enable_shapes(true);
        let a = shaped("test-shape", || "[1]".into());
        assert_eq!(a, "test-shape [1]");
        assert!(std::ptr::eq(a, shaped("test-shape", || "[1]".into())));
        enable_shapes(false);
        enable(false);
    }
}
