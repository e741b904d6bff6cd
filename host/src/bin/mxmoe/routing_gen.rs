//! Router logits and top-k selection for the CLI's problems (SPEC §2.5, §8).
//!
//! The benchmark's three routing regimes (`bench_mxfp4.py`, seed 1):
//! - **dense**: `logits = randn(T, E)`: every expert is hit at these T;
//! - **sparse**: `logits = 5·randn(E)` (one vector shared by all tokens) `+ 0.1·randn(T, E)`:
//!   a handful of experts take almost every slot (10/256 active in the reference run);
//! - **balanced**: `randn(T, E) + 0.5·randn(E)`: near-uniform load with a mild per-expert bias.
//!
//! Expert ids are `topk(softmax(logits))`; gates are the chosen probabilities renormalised to sum
//! to one (`norm_topk_prob`, the default of Qwen/OLMoE/Mixtral routers).

use crate::rng::Rng;

/// A routing regime of SPEC §8.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RoutingKind {
    /// Independent logits per token and expert.
    Dense,
    /// A strong shared expert preference plus small per-token noise.
    Sparse,
    /// Independent logits plus a mild shared per-expert bias.
    Balanced,
}

impl RoutingKind {
    /// The lower-case name used in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            RoutingKind::Dense => "dense",
            RoutingKind::Sparse => "sparse",
            RoutingKind::Balanced => "balanced",
        }
    }

    /// Draws router logits `[tokens, experts]` (row-major) from `seed`.
    pub fn logits(self, tokens: usize, experts: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        let (shared_scale, noise_scale) = match self {
            RoutingKind::Dense => (0.0, 1.0),
            RoutingKind::Sparse => (5.0, 0.1),
            RoutingKind::Balanced => (0.5, 1.0),
        };
        let shared: Vec<f32> = (0..experts).map(|_| shared_scale * rng.normal()).collect();
        (0..tokens * experts)
            .map(|i| shared[i % experts] + noise_scale * rng.normal())
            .collect()
    }
}

/// Top-k routing of a batch: expert ids and renormalised gates, both `[tokens, top_k]`.
#[derive(Clone, Debug)]
pub struct TopK {
    /// Chosen expert per slot, best first within a token (distinct within a token).
    pub ids: Vec<i64>,
    /// Softmax probability of each chosen expert divided by the sum over the token's choices.
    pub gates: Vec<f32>,
}

/// `topk(softmax(logits), top_k)` per token, ties broken towards the lower expert index.
///
/// Softmax is monotone, so selection runs on the logits; the probabilities are computed (in
/// `f64`) only for the gates. Requires `1 ≤ top_k ≤ experts`.
pub fn top_k(logits: &[f32], tokens: usize, experts: usize, top_k: usize) -> TopK {
    assert!(
        top_k >= 1 && top_k <= experts,
        "top_k = {top_k} must be in 1..={experts}"
    );
    assert_eq!(
        logits.len(),
        tokens * experts,
        "logits must be [tokens, experts]"
    );
    let mut ids = Vec::with_capacity(tokens * top_k);
    let mut gates = Vec::with_capacity(tokens * top_k);
    let mut best: Vec<usize> = Vec::with_capacity(top_k + 1);
    for row in logits.chunks_exact(experts) {
        // Insertion into a short sorted list: O(E·k), fine for k ≤ 8 and E ≤ 256.
        best.clear();
        for e in 0..experts {
            let pos = best
                .iter()
                .position(|&b| row[e] > row[b])
                .unwrap_or(best.len());
            if pos < top_k {
                best.insert(pos, e);
                best.truncate(top_k);
            }
        }
        let max = f64::from(row[best[0]]);
        let chosen: Vec<f64> = best
            .iter()
            .map(|&e| (f64::from(row[e]) - max).exp())
            .collect();
        let sum: f64 = chosen.iter().sum();
        for (&e, &p) in best.iter().zip(&chosen) {
            ids.push(e as i64);
            gates.push((p / sum) as f32);
        }
    }
    TopK { ids, gates }
}

/// The number of distinct experts that receive at least one slot.
pub fn active_experts(ids: &[i64], experts: usize) -> usize {
    let mut hit = vec![false; experts];
    for &id in ids {
        if let Ok(e) = usize::try_from(id) {
            hit[e] = true;
        }
    }
    hit.iter().filter(|&&h| h).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_picks_the_largest_logits_in_order() {
        let logits = [0.1, 3.0, -1.0, 2.0, 2.0, 0.0];
        let r = top_k(&logits, 1, 6, 3);
        // Tie between experts 3 and 4 goes to the lower index.
        assert_eq!(r.ids, [1, 3, 4]);
        let sum: f32 = r.gates.iter().sum();
        assert!((sum - 1.0).abs() < 1e-6);
        assert!(r.gates[0] > r.gates[1] && (r.gates[1] - r.gates[2]).abs() < 1e-7);
    }

    #[test]
    fn regimes_differ_in_how_many_experts_they_hit() {
        let (t, e, k) = (4096, 256, 8);
        let active =
            |kind: RoutingKind| active_experts(&top_k(&kind.logits(t, e, 1), t, e, k).ids, e);
        assert_eq!(active(RoutingKind::Dense), e);
        assert!(
            active(RoutingKind::Sparse) < 40,
            "sparse hit {}",
            active(RoutingKind::Sparse)
        );
        assert!(active(RoutingKind::Balanced) > 240);
    }
}
