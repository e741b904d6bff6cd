//! Kernel entry points.
