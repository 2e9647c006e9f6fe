#![doc = include_str!("../README.md")]
//!
//! This facade crate re-exports [`sketchx_core`]; the README above is compiled as its documentation, so its Rust
//! examples are checked by `cargo test --doc`.

pub use sketchx_core::*;
