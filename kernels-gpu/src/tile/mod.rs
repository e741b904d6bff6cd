//! Device building blocks over `ptx/`: global-memory vector access and (later) fragments, stage
//! loaders and warp MMA loops.

pub mod gmem;
