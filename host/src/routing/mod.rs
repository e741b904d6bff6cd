//! Routing (SPEC §2.1): from top-k expert ids to the expert-contiguous row order every grouped
//! kernel iterates. This module holds the host-side vocabulary ([`RowOrder`], [`DROPPED`], the
//! host copy of the arrays [`Routing`]); [`device`] computes the arrays on the GPU
//! ([`DeviceRouting`]). The CPU reference (`crate::reference`) imports these types.
//!
//! Conventions (ours, documented in `ARCHITECTURE.md`): ids are i32 or i64 in `[-1, E)`; `-1`
//! ([`DROPPED`]) marks a slot dropped by expert parallelism: it sorts after every expert, its
//! forward output row and its gradients are zero. The order is stable (ties by flat slot index
//! `t·k + j`), so results are deterministic. Indices are u32 (`T·k < 2^32`); every element
//! offset computed from them on the device is 64-bit.
//!
//! # Dropped rows in the host copy
//!
//! [`Routing`] (the CPU reference's form, also what [`DeviceRouting::to_host`] returns)
//! **excludes** dropped slots from the sorted arrays, so the number of grouped rows
//! `L_valid = sorted_expert_idxs.len()` may be smaller than the slot count `T·k`, and
//! `expert_offsets` count valid rows only (`expert_offsets[E−1] == L_valid`). Slot indices keep
//! their meaning: `sorted_scattered_idxs[p]` is still the flat slot index `t·k + j` in
//! `[0, T·k)`. On the device, dropped slots instead sort last into bucket `E`.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use crate::error::{Error, Result, parse_name};

mod device;
pub use crate::kernels::routing::DeviceIds;
pub use device::DeviceRouting;

/// How the rows of an input or output tensor are ordered (SPEC §2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RowOrder {
    /// Expert-contiguous: row `p` is grouped row `p` (`grouped_in` / `grouped_out` = true).
    Grouped,
    /// Slot (token) order, addressed through `sorted_scattered_idxs` (`grouped_* = false`).
    Scattered,
}

impl RowOrder {
    /// Both orders.
    pub const ALL: [RowOrder; 2] = [RowOrder::Grouped, RowOrder::Scattered];

    /// `grouped` or `scattered` (the spelling of the CLI, the checkpoint metadata and the Python
    /// package).
    pub const fn name(self) -> &'static str {
        match self {
            RowOrder::Grouped => "grouped",
            RowOrder::Scattered => "scattered",
        }
    }
}

impl fmt::Display for RowOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for RowOrder {
    type Err = Error;
    /// Parses [`RowOrder::name`]. Errors: [`Error::InvalidArgument`] listing the names.
    fn from_str(s: &str) -> Result<Self> {
        parse_name("row order", s, &RowOrder::ALL.map(|v| (v.name(), v)))
    }
}

/// The expert id that marks a dropped (token, slot) pair; see the module documentation.
pub const DROPPED: i64 = -1;

/// The routing arrays of SPEC §2.1, plus the slot geometry they were built for.
///
/// Grouped row `p ∈ [0, L_valid)` belongs to expert `sorted_expert_idxs[p]` and comes from flat
/// slot `sorted_scattered_idxs[p] = t·top_k + j`. Expert `e` owns grouped rows
/// [`Routing::expert_rows`]`(e)` = `[expert_offsets[e−1], expert_offsets[e])`, with
/// `expert_offsets[−1] := 0`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Routing {
    /// Expert id of each grouped row, ascending (`[L_valid]`).
    pub sorted_expert_idxs: Vec<u32>,
    /// Flat slot index `t·top_k + j` of each grouped row (`[L_valid]`). [`flatten_sort_count`]
    /// orders rows of one expert by ascending slot index (a stable sort).
    pub sorted_scattered_idxs: Vec<u32>,
    /// Inclusive cumulative row counts per expert (`[E]`): `expert_offsets[e]` is the end of
    /// expert `e`'s rows. Dropped slots are not counted.
    pub expert_offsets: Vec<u32>,
    /// Number of tokens `T`.
    pub tokens: usize,
    /// Experts chosen per token, `top_k`; the slot count is `tokens · top_k`.
    pub top_k: usize,
}

impl Routing {
    /// Number of experts `E` (the length of `expert_offsets`).
    pub fn num_experts(&self) -> usize {
        self.expert_offsets.len()
    }

    /// Number of (token, slot) pairs `T·k`, dropped ones included.
    pub fn num_slots(&self) -> usize {
        self.tokens * self.top_k
    }

    /// Number of grouped (valid, not dropped) rows `L_valid`.
    pub fn num_rows(&self) -> usize {
        self.sorted_expert_idxs.len()
    }

    /// The grouped rows owned by expert `e` (empty for an out-of-range `e`).
    pub fn expert_rows(&self, e: usize) -> Range<usize> {
        let Some(&end) = self.expert_offsets.get(e) else {
            return 0..0;
        };
        let start = if e == 0 {
            0
        } else {
            self.expert_offsets[e - 1]
        };
        start as usize..end as usize
    }

    /// Checks that the arrays are mutually consistent: equal lengths of the two sorted arrays,
    /// non-decreasing offsets ending at `L_valid`, each row's expert id matching the offsets,
    /// slot indices in `[0, T·k)` and no slot listed twice. The order of rows *within* an expert
    /// is not checked (the REF sort is not stable, SPEC §2.1).
    pub fn validate(&self) -> Result<()> {
        let rows = self.num_rows();
        let slots = self
            .tokens
            .checked_mul(self.top_k)
            .ok_or_else(|| Error::InvalidArgument {
                what: "routing",
                detail: format!("tokens·top_k overflows ({} · {})", self.tokens, self.top_k),
            })?;
        if self.sorted_scattered_idxs.len() != rows {
            return Err(Error::Shape {
                tensor: "routing.sorted_scattered_idxs",
                expected: format!("{rows} entries (as sorted_expert_idxs)"),
                actual: format!("{} entries", self.sorted_scattered_idxs.len()),
            });
        }
        if rows > slots {
            return Err(Error::Shape {
                tensor: "routing.sorted_expert_idxs",
                expected: format!("at most tokens·top_k = {slots} rows"),
                actual: format!("{rows} rows"),
            });
        }
        let mut previous_end = 0u32;
        for (e, &end) in self.expert_offsets.iter().enumerate() {
            if end < previous_end {
                return Err(Error::InvalidArgument {
                    what: "routing.expert_offsets",
                    detail: format!("decreases at expert {e} ({previous_end} then {end})"),
                });
            }
            previous_end = end;
        }
        if previous_end as usize != rows {
            return Err(Error::InvalidArgument {
                what: "routing.expert_offsets",
                detail: format!("the last offset is {previous_end}, expected L_valid = {rows}"),
            });
        }
        for e in 0..self.num_experts() {
            for p in self.expert_rows(e) {
                if self.sorted_expert_idxs[p] as usize != e {
                    return Err(Error::InvalidArgument {
                        what: "routing.sorted_expert_idxs",
                        detail: format!(
                            "row {p} has expert {}, but expert_offsets assign it to expert {e}",
                            self.sorted_expert_idxs[p]
                        ),
                    });
                }
            }
        }
        let mut seen = vec![false; slots];
        for (p, &slot) in self.sorted_scattered_idxs.iter().enumerate() {
            let slot = slot as usize;
            if slot >= slots {
                return Err(Error::InvalidArgument {
                    what: "routing.sorted_scattered_idxs",
                    detail: format!("row {p} has slot {slot}, outside [0, {slots})"),
                });
            }
            if seen[slot] {
                return Err(Error::InvalidArgument {
                    what: "routing.sorted_scattered_idxs",
                    detail: format!("slot {slot} appears more than once (again at row {p})"),
                });
            }
            seen[slot] = true;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_orders_parse_the_names_they_display() {
        for o in RowOrder::ALL {
            assert_eq!(o.to_string().parse::<RowOrder>().unwrap(), o);
        }
        assert_eq!(
            "rows".parse::<RowOrder>().unwrap_err().to_string(),
            r#"row order: expected "grouped" or "scattered", got "rows""#
        );
    }
}
