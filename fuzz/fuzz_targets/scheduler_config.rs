//! Fuzz target `scheduler_config`: see [`sketchx_fuzz::checks::scheduler_config`].
#![no_main]

#[global_allocator]
static ALLOC: sketchx_fuzz::alloc::Counting = sketchx_fuzz::alloc::Counting;

libfuzzer_sys::fuzz_target!(|data: &[u8]| sketchx_fuzz::checks::scheduler_config(data));
