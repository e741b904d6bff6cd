//! mma
