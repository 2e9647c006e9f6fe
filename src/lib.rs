pub use sketchx_core::*;
