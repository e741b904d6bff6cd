//! The (row, column) position of a grid-stride loop over a row-major matrix, stepped without a
//! division per step: the element-wise row kernels (`kernels::eltwise`) walk their 8-element
//! row vectors with it, and the host tests below check it against `v / per_row, v % per_row`.

/// Where item `v` of a grid-stride walk is in rows of `per_row` items, for `v = first,
/// first + stride, …`: two divisions when it is made, none per [`RowWalk::advance`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowWalk {
    /// Row of the current item (`v / per_row`).
    pub row: u64,
    /// Column of the current item (`v % per_row`).
    pub col: u64,
    row_step: u64,
    col_step: u64,
    per_row: u64,
}

impl RowWalk {
    /// The walk's position at item `first`, for a stride of `stride` items over rows of
    /// `per_row` items (taken as 1 when 0, so there is no zero divisor; a caller with no items
    /// per row runs no step).
    #[inline(always)]
    pub const fn new(first: u64, stride: u64, per_row: u64) -> Self {
        let per_row = if per_row == 0 { 1 } else { per_row };
        RowWalk {
            row: first / per_row,
            col: first % per_row,
            row_step: stride / per_row,
            col_step: stride % per_row,
            per_row,
        }
    }

    /// Moves to the item `stride` further on.
    #[inline(always)]
    pub const fn advance(&mut self) {
        self.row += self.row_step;
        self.col += self.col_step;
        if self.col >= self.per_row {
            self.col -= self.per_row;
            self.row += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_walk_matches_division_at_every_step() {
        for per_row in 0..23u64 {
            for stride in 1..61u64 {
                for first in [0, 1, stride / 2, stride - 1] {
                    let mut w = RowWalk::new(first, stride, per_row);
                    let d = per_row.max(1);
                    let mut v = first;
                    for _ in 0..97 {
                        assert_eq!(
                            (w.row, w.col),
                            (v / d, v % d),
                            "per_row {per_row} stride {stride} v {v}"
                        );
                        w.advance();
                        v += stride;
                    }
                }
            }
        }
        // Large positions and strides (64-bit rows).
        let (first, stride, per_row) = (3 << 40, 4224 * 256, 360);
        let mut w = RowWalk::new(first, stride, per_row);
        for i in 0..1000u64 {
            let v = first + i * stride;
            assert_eq!((w.row, w.col), (v / per_row, v % per_row));
            w.advance();
        }
    }
}
