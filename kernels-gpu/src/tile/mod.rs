//! Tile building blocks.
