//! Reference routing: flatten, stable sort and count (SPEC §2.1) and the active-expert list of
//! the compact remapping (SPEC §2.4).
//!
//! # Dropped rows (expert parallelism)
//!
//! An expert id of [`DROPPED`] (`-1`, DeepEP's sentinel, SPEC §10) marks a (token, slot) pair that
//! this rank does not compute. Such slots are **excluded** from the sorted arrays, so the number
//! of grouped rows `L_valid = sorted_expert_idxs.len()` may be smaller than the slot count
//! `T·k`, and `expert_offsets` count valid rows only (`expert_offsets[E−1] == L_valid`). Slot
//! indices keep their meaning: `sorted_scattered_idxs[p]` is still the flat slot index `t·k + j`
//! in `[0, T·k)`, so slot-ordered (scattered) tensors keep `T·k` rows and a dropped slot's row is
//! simply never touched by a grouped row (the reference leaves it zero).

use crate::error::{Error, Result};
use crate::routing::{DROPPED, Routing};

/// Flattens `ids` (`[tokens, top_k]`, row-major), sorts the slots by expert id with a **stable**
/// sort (ties broken by the flat index `i = t·top_k + j`) and counts rows per expert (SPEC §2.1).
///
/// An id of [`DROPPED`] (`-1`) drops its slot (see the module documentation). Errors:
/// [`Error::Shape`] if `ids.len() != tokens·top_k`; [`Error::InvalidArgument`] for any other id
/// outside `[0, num_experts)`, or if the slot count or `num_experts` do not fit the `u32`
/// index arrays.
pub fn flatten_sort_count(
    ids: &[i64],
    tokens: usize,
    top_k: usize,
    num_experts: usize,
) -> Result<Routing> {
    let slots = tokens
        .checked_mul(top_k)
        .ok_or_else(|| Error::InvalidArgument {
            what: "ids",
            detail: format!("tokens·top_k overflows ({tokens} · {top_k})"),
        })?;
    if ids.len() != slots {
        return Err(Error::Shape {
            tensor: "ids",
            expected: format!("{slots} elements ([{tokens}, {top_k}])"),
            actual: format!("{} elements", ids.len()),
        });
    }
    if slots > u32::MAX as usize {
        return Err(Error::InvalidArgument {
            what: "ids",
            detail: format!("{slots} slots do not fit 32-bit slot indices"),
        });
    }
    if num_experts > u32::MAX as usize {
        return Err(Error::InvalidArgument {
            what: "num_experts",
            detail: format!("{num_experts} experts do not fit 32-bit expert ids"),
        });
    }

    // (expert, flat index) of every valid slot, in flat order.
    let mut pairs: Vec<(u32, u32)> = Vec::with_capacity(slots);
    for (i, &id) in ids.iter().enumerate() {
        if id == DROPPED {
            continue;
        }
        if id < 0 || id >= num_experts as i64 {
            return Err(Error::InvalidArgument {
                what: "ids",
                detail: format!(
                    "slot {i} (token {}, choice {}) has expert id {id}, outside [0, {num_experts}) \
                     and not the dropped sentinel {DROPPED}",
                    i / top_k,
                    i % top_k
                ),
            });
        }
        pairs.push((id as u32, i as u32));
    }
    // The keys (expert, flat index) are unique, so this order is exactly the stable sort by expert.
    pairs.sort();

    let mut counts = vec![0u32; num_experts];
    for &(e, _) in &pairs {
        counts[e as usize] += 1;
    }
    let mut expert_offsets = Vec::with_capacity(num_experts);
    let mut running = 0u32;
    for c in counts {
        running += c;
        expert_offsets.push(running);
    }

    Ok(Routing {
        sorted_expert_idxs: pairs.iter().map(|&(e, _)| e).collect(),
        sorted_scattered_idxs: pairs.iter().map(|&(_, i)| i).collect(),
        expert_offsets,
        tokens,
        top_k,
    })
}

/// The experts that own at least one grouped row, ascending (`get_active_experts`, SPEC §2.4):
/// the sorted unique values of `sorted_expert_idxs`. Strategy A dequantizes and gathers only these.
pub fn active_experts(routing: &Routing) -> Vec<u32> {
    let mut active = routing.sorted_expert_idxs.clone();
    active.sort_unstable();
    active.dedup();
    active
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::XorShift;

    fn route(ids: &[i64], tokens: usize, top_k: usize, e: usize) -> Routing {
        let r = flatten_sort_count(ids, tokens, top_k, e).expect("valid routing");
        r.validate().expect("self-consistent routing");
        r
    }

    #[test]
    fn stable_order_with_an_empty_expert() {
        // flat: 0→1, 1→0, 2→0, 3→1, 4→1, 5→0; expert 2 is empty.
        let r = route(&[1, 0, 0, 1, 1, 0], 3, 2, 3);
        assert_eq!(r.sorted_expert_idxs, [0, 0, 0, 1, 1, 1]);
        assert_eq!(r.sorted_scattered_idxs, [1, 2, 5, 0, 3, 4]);
        assert_eq!(r.expert_offsets, [3, 6, 6]);
        assert_eq!(r.expert_rows(2), 6..6);
        assert_eq!(active_experts(&r), [0, 1]);
    }

    #[test]
    fn all_tokens_on_one_expert() {
        let r = route(&[2, 2, 2, 2], 4, 1, 3);
        assert_eq!(r.sorted_expert_idxs, [2, 2, 2, 2]);
        assert_eq!(r.sorted_scattered_idxs, [0, 1, 2, 3]);
        assert_eq!(r.expert_offsets, [0, 0, 4]);
        assert_eq!(r.expert_rows(0), 0..0);
        assert_eq!(r.expert_rows(2), 0..4);
        assert_eq!(active_experts(&r), [2]);
    }

    #[test]
    fn top_k_equals_num_experts() {
        let r = route(&[2, 0, 1, 1, 2, 0], 2, 3, 3);
        assert_eq!(r.sorted_expert_idxs, [0, 0, 1, 1, 2, 2]);
        assert_eq!(r.sorted_scattered_idxs, [1, 5, 2, 3, 0, 4]);
        assert_eq!(r.expert_offsets, [2, 4, 6]);
        assert_eq!(active_experts(&r), [0, 1, 2]);
    }

    #[test]
    fn single_token() {
        let r = route(&[3, 1], 1, 2, 4);
        assert_eq!(r.sorted_expert_idxs, [1, 3]);
        assert_eq!(r.sorted_scattered_idxs, [1, 0]);
        assert_eq!(r.expert_offsets, [0, 1, 1, 2]);
        assert_eq!(active_experts(&r), [1, 3]);
    }

    #[test]
    fn no_tokens() {
        let r = route(&[], 0, 2, 3);
        assert_eq!(r.num_rows(), 0);
        assert_eq!(r.expert_offsets, [0, 0, 0]);
        assert!(active_experts(&r).is_empty());
    }

    #[test]
    fn dropped_sentinel_rows_are_excluded() {
        let r = route(&[0, -1, -1, 1, -1, 0], 3, 2, 2);
        assert_eq!(r.sorted_expert_idxs, [0, 0, 1]);
        assert_eq!(r.sorted_scattered_idxs, [0, 5, 3]);
        assert_eq!(r.expert_offsets, [2, 3]);
        assert_eq!(r.num_rows(), 3);
        assert_eq!(r.num_slots(), 6);

        let all_dropped = route(&[-1, -1], 1, 2, 2);
        assert_eq!(all_dropped.num_rows(), 0);
        assert_eq!(all_dropped.expert_offsets, [0, 0]);
    }

    #[test]
    fn invalid_ids_are_rejected() {
        for bad in [3, 4, -2, i64::MIN, i64::MAX] {
            let err = flatten_sort_count(&[0, bad], 1, 2, 3).unwrap_err();
            assert!(
                matches!(err, Error::InvalidArgument { what: "ids", .. }),
                "{bad}: {err}"
            );
        }
        let err = flatten_sort_count(&[0, 1, 2], 2, 2, 3).unwrap_err();
        assert!(matches!(err, Error::Shape { tensor: "ids", .. }), "{err}");
        // Zero experts: only fully dropped routings are valid.
        let err = flatten_sort_count(&[0], 1, 1, 0).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { what: "ids", .. }),
            "{err}"
        );
        assert_eq!(flatten_sort_count(&[-1], 1, 1, 0).unwrap().num_rows(), 0);
    }

    #[test]
    fn matches_the_per_expert_scan_definition() {
        // A stable sort by expert is "for each expert, the slots holding it, in flat order".
        let mut rng = XorShift::new(17);
        for _ in 0..200 {
            let tokens = rng.below(9) as usize;
            let top_k = 1 + rng.below(4) as usize;
            let e = 1 + rng.below(6) as usize;
            let ids: Vec<i64> = (0..tokens * top_k)
                .map(|_| rng.below(e as u64 + 1) as i64 - 1)
                .collect();
            let r = route(&ids, tokens, top_k, e);
            let mut ssi = Vec::new();
            let mut sei = Vec::new();
            let mut offsets = Vec::new();
            for expert in 0..e {
                for (i, &id) in ids.iter().enumerate() {
                    if id == expert as i64 {
                        ssi.push(i as u32);
                        sei.push(expert as u32);
                    }
                }
                offsets.push(ssi.len() as u32);
            }
            assert_eq!(r.sorted_scattered_idxs, ssi);
            assert_eq!(r.sorted_expert_idxs, sei);
            assert_eq!(r.expert_offsets, offsets);
        }
    }

    #[test]
    fn validate_rejects_inconsistent_arrays() {
        let good = route(&[1, 0, 0, 1], 2, 2, 2);
        let expect = |bad: Routing, field: &str| {
            let err = bad.validate().unwrap_err();
            let named = match &err {
                Error::InvalidArgument { what, .. } => *what,
                Error::Shape { tensor, .. } => *tensor,
                other => panic!("{field}: unexpected error {other:?}"),
            };
            assert_eq!(named, field, "{err}");
        };
        let mut bad = good.clone();
        bad.expert_offsets = vec![3, 4];
        expect(bad, "routing.sorted_expert_idxs");
        let mut bad = good.clone();
        bad.sorted_scattered_idxs[0] = bad.sorted_scattered_idxs[1];
        expect(bad, "routing.sorted_scattered_idxs");
        let mut bad = good.clone();
        bad.sorted_scattered_idxs[0] = 4;
        expect(bad, "routing.sorted_scattered_idxs");
        let mut bad = good.clone();
        bad.expert_offsets = vec![2, 3];
        expect(bad, "routing.expert_offsets");
        let mut bad = good;
        bad.sorted_expert_idxs.pop();
        expect(bad, "routing.sorted_scattered_idxs");
    }
}
