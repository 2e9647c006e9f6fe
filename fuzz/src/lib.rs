//! sketchx's fuzz targets' shared code: [`checks`] (what every target checks, also replayed by the stable
//! regression tests) and [`alloc`] (the counting allocator the targets install to bound allocations).

pub mod alloc;
pub mod checks;
