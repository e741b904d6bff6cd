//! One expert-linear call as the CLI draws it: the shape and flags ([`Shape`]), the host data
//! ([`HostProblem`]), its CPU reference ([`HostProblem::reference`]) and its device copy
//! ([`DeviceProblem`]), which runs forward and backward through [`mxmoe::op`].
//!
//! Expert weights are kept apart from the rest (as bf16 bits `W_store [E, N, K]`), because the
//! benchmark reuses one weight tensor for every configuration with the same expert count and
//! each [`Strategy`] turns it into its own device format.

use anyhow::{Context as _, bail};
use mxmoe::Runtime;
use mxmoe::device::Gpu;
use mxmoe::op::{Bf16Matrix, ExpertLinear, Forward, Grads, LoraWeights, RowOrder, backward};
use mxmoe::reference::{self, LinearProblem, Rounding};
use mxmoe::routing::{DeviceIds, DeviceRouting};
use mxmoe::shared::bf16::{bf16_bits_to_f32, round_bf16};

use crate::rng::normal_bf16_bits;
use crate::routing_gen::{RoutingKind, top_k};
use crate::strategy::{DeviceWeights, HostWeights, Strategy};

/// Shape and layout flags of one expert-linear call (SPEC §0 notation).
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Shape {
    /// Experts `E`.
    pub experts: usize,
    /// Reduction (input) dimension `K`.
    pub k: usize,
    /// Output dimension `N`.
    pub n: usize,
    /// Tokens `T`.
    pub tokens: usize,
    /// Experts per token.
    pub top_k: usize,
    /// LoRA rank `r` (0: no LoRA).
    pub rank: usize,
    /// LoRA scaling `s`.
    pub scaling: f32,
    /// `Scattered`: `x` is `[T, K]` in token order; `Grouped`: `x` is `[T·k, K]` in grouped order.
    #[serde(serialize_with = "row_order_name")]
    pub input: RowOrder,
    /// Where output rows go (`Scattered`: per slot; `Grouped`: per grouped row).
    #[serde(serialize_with = "row_order_name")]
    pub output: RowOrder,
    /// Down-projection gates (`[T, k]`, scattered output only).
    pub gates: bool,
}

fn row_order_name<S: serde::Serializer>(order: &RowOrder, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(order.name())
}

impl Shape {
    /// Routed rows `L = T·k`.
    pub fn rows(&self) -> usize {
        self.tokens * self.top_k
    }

    /// Rows of `x`: `T` for token-ordered input, `L` for grouped input.
    pub fn x_rows(&self) -> usize {
        match self.input {
            RowOrder::Scattered => self.tokens,
            RowOrder::Grouped => self.rows(),
        }
    }

    /// Rows of the forward output (and of `dy`): `T` with gates, else `L`.
    pub fn out_rows(&self) -> usize {
        if self.gates { self.tokens } else { self.rows() }
    }
}

/// Seeds of the inputs of one problem (SPEC §8 uses 0 for the weights, 1 for the routing, 2 for
/// the LoRA factors; `x` and `dy` get their own).
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Seeds {
    /// Router logits.
    pub routing: u64,
    /// LoRA `A` (stream 0) and `B` (stream 1).
    pub lora: u64,
    /// Input activations.
    pub x: u64,
    /// Output gradient.
    pub dy: u64,
}

/// Host data of one problem, everything rounded to bf16 (kept as bits) as the upload would.
pub struct HostProblem {
    /// Shape and flags.
    pub shape: Shape,
    /// Expert ids `[T, k]`.
    pub ids: Vec<i64>,
    /// Gates `[T, k]` (bf16-rounded), when the shape has gates.
    pub gates: Option<Vec<f32>>,
    /// `x`, `[x_rows, K]`.
    pub x: Vec<u16>,
    /// LoRA `A`, `[E·r, K]`.
    pub lora_a: Vec<u16>,
    /// LoRA `B`, `[N, E·r]`.
    pub lora_b: Vec<u16>,
    /// Output gradient, `[out_rows, N]`.
    pub dy: Vec<u16>,
}

/// The results of one forward + backward, as f32, in the op layer's layouts.
#[derive(Clone, Debug)]
pub struct Outputs {
    /// Forward output (`[T, N]` with gates, else `[L, N]`).
    pub out: Vec<f32>,
    /// Gradient of `x`.
    pub dx: Vec<f32>,
    /// Gradient of LoRA `A` (empty without LoRA).
    pub da: Vec<f32>,
    /// Gradient of LoRA `B` (empty without LoRA).
    pub db: Vec<f32>,
    /// Gradient of the gates (present exactly with gates).
    pub d_gates: Option<Vec<f32>>,
}

impl Outputs {
    /// `(name, values)` of every tensor, in a fixed order.
    pub fn tensors(&self) -> Vec<(&'static str, &[f32])> {
        let mut v: Vec<(&'static str, &[f32])> = vec![("out", &self.out), ("dx", &self.dx)];
        if !self.da.is_empty() || !self.db.is_empty() {
            v.push(("dA", &self.da));
            v.push(("dB", &self.db));
        }
        if let Some(g) = &self.d_gates {
            v.push(("d_gates", g));
        }
        v
    }
}

/// Wall-clock time of a closure, in milliseconds.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let start = std::time::Instant::now();
    let value = f();
    (value, start.elapsed().as_secs_f64() * 1e3)
}

fn widen(bits: &[u16]) -> Vec<f32> {
    bits.iter().map(|&b| bf16_bits_to_f32(b)).collect()
}

impl HostProblem {
    /// Draws a problem: routing = top-k of softmax of `routing` logits, `x = randn`, LoRA
    /// `A, B = 0.01·randn`, `dy = randn` (a fixed random output gradient, never all ones).
    pub fn draw(shape: Shape, routing: RoutingKind, seeds: Seeds) -> anyhow::Result<Self> {
        if shape.top_k == 0 || shape.top_k > shape.experts {
            bail!(
                "top_k = {} must be between 1 and the number of experts ({})",
                shape.top_k,
                shape.experts
            );
        }
        let logits = routing.logits(shape.tokens, shape.experts, seeds.routing);
        let chosen = top_k(&logits, shape.tokens, shape.experts, shape.top_k);
        let er = shape.experts * shape.rank;
        Ok(Self {
            shape,
            ids: chosen.ids,
            gates: shape
                .gates
                .then(|| chosen.gates.iter().map(|&g| round_bf16(g)).collect()),
            x: normal_bf16_bits(shape.x_rows() * shape.k, 1.0, seeds.x, 0),
            lora_a: normal_bf16_bits(er * shape.k, 0.01, seeds.lora, 0),
            lora_b: normal_bf16_bits(shape.n * er, 0.01, seeds.lora, 1),
            dy: normal_bf16_bits(shape.out_rows() * shape.n, 1.0, seeds.dy, 0),
        })
    }

    /// Runs the CPU reference ([`Rounding::Bf16`]) with dense weights `w [E, N, K]`; returns the
    /// results and the forward and backward wall-clock milliseconds (the reference backward
    /// recomputes its forward internally).
    pub fn reference(&self, w: &[f32]) -> anyhow::Result<(Outputs, f64, f64)> {
        let s = &self.shape;
        let routing = reference::flatten_sort_count(&self.ids, s.tokens, s.top_k, s.experts)
            .context("the CPU reference rejected the routing")?;
        let (x, a, b, dy) = (
            widen(&self.x),
            widen(&self.lora_a),
            widen(&self.lora_b),
            widen(&self.dy),
        );
        let problem = LinearProblem {
            x: &x,
            x_rows: s.x_rows(),
            w,
            num_experts: s.experts,
            n: s.n,
            k: s.k,
            lora_a: &a,
            lora_b: &b,
            rank: s.rank,
            scaling: s.scaling,
            fan_out: match s.input {
                RowOrder::Scattered => s.top_k,
                RowOrder::Grouped => 1,
            },
            input_order: s.input,
            output_order: s.output,
            gates: self.gates.as_deref(),
            bias: None,
        };
        let (fwd, fwd_ms) = timed(|| reference::linear_forward(&problem, &routing, Rounding::Bf16));
        let fwd = fwd.context("the CPU reference forward failed")?;
        let (grads, bwd_ms) =
            timed(|| reference::linear_backward(&problem, &routing, &dy, Rounding::Bf16));
        let grads = grads.context("the CPU reference backward failed")?;
        let outputs = Outputs {
            out: fwd.y.unwrap_or(fwd.out),
            dx: grads.dx,
            da: grads.da,
            db: grads.db,
            d_gates: grads.d_gates,
        };
        Ok((outputs, fwd_ms, bwd_ms))
    }
}

/// Expert ids `[T, k]` resident on the device, as a router leaves them: every call routes them
/// afresh ([`route`](Self::route)), so a timed call includes the routing and whatever reads of
/// the routing its strategy makes (a real layer call routes new ids every step; a routing built
/// once would let `Auto` and Strategy A read its offsets back only on the first call).
pub struct RoutedIds {
    /// The ids (`None` for zero tokens: routed from an empty host slice).
    ids: Option<cudarc::driver::CudaSlice<i64>>,
    tokens: usize,
    top_k: usize,
    experts: usize,
}

impl RoutedIds {
    /// Uploads `ids` and routes them once, checking every id (a typed error names a bad one);
    /// returns once that has finished.
    pub fn upload(
        gpu: &Gpu,
        ids: &[i64],
        tokens: usize,
        top_k: usize,
        experts: usize,
    ) -> anyhow::Result<Self> {
        DeviceRouting::from_host_ids(gpu, ids, tokens, top_k, experts)
            .context("could not route the expert ids on the device")?
            .check(gpu)
            .context("the device routing rejected the expert ids")?;
        let ids = if ids.is_empty() {
            None
        } else {
            Some(mxmoe::device::upload(gpu, ids).context("could not upload the expert ids")?)
        };
        Ok(Self {
            ids,
            tokens,
            top_k,
            experts,
        })
    }

    /// Routes the ids on the device (enqueued, no synchronisation).
    pub fn route(&self, gpu: &Gpu) -> anyhow::Result<DeviceRouting> {
        let (t, k, e) = (self.tokens, self.top_k, self.experts);
        match &self.ids {
            Some(ids) => DeviceRouting::from_device_ids(gpu, DeviceIds::I64(ids), t, k, e),
            None => DeviceRouting::from_host_ids(gpu, &[], t, k, e),
        }
        .context("could not route the expert ids on the device")
    }
}

/// A problem resident on the device, ready to run forward and backward repeatedly.
pub struct DeviceProblem {
    ids: RoutedIds,
    x: Bf16Matrix,
    lora: Option<LoraWeights>,
    gates: Option<Bf16Matrix>,
    dy: Bf16Matrix,
    weights: DeviceWeights,
    strategy: Strategy,
    shape: Shape,
}

impl DeviceProblem {
    /// Uploads the problem and the weights in `strategy`'s format, and routes the ids on the
    /// device once to check them. Returns once the uploads and the routing have finished.
    pub fn upload(
        gpu: &Gpu,
        strategy: Strategy,
        p: &HostProblem,
        w: &HostWeights,
    ) -> anyhow::Result<Self> {
        let s = p.shape;
        if (w.experts, w.n, w.k) != (s.experts, s.n, s.k) {
            bail!(
                "the weights are [{}, {}, {}] but the problem needs [{}, {}, {}]",
                w.experts,
                w.n,
                w.k,
                s.experts,
                s.n,
                s.k
            );
        }
        let weights = strategy.upload(gpu, w)?;
        let ids = RoutedIds::upload(gpu, &p.ids, s.tokens, s.top_k, s.experts)?;
        let x = Bf16Matrix::from_bits(gpu, &p.x, s.x_rows(), s.k).context("could not upload x")?;
        let lora = if s.rank == 0 {
            None
        } else {
            Some(LoraWeights {
                a: Bf16Matrix::from_bits(gpu, &p.lora_a, s.experts * s.rank, s.k)
                    .context("could not upload LoRA A")?,
                b: Bf16Matrix::from_bits(gpu, &p.lora_b, s.n, s.experts * s.rank)
                    .context("could not upload LoRA B")?,
                rank: s.rank,
                scaling: s.scaling,
            })
        };
        let gates = match &p.gates {
            Some(g) => Some(
                Bf16Matrix::from_f32(gpu, g, s.tokens, s.top_k)
                    .context("could not upload the gates")?,
            ),
            None => None,
        };
        let dy =
            Bf16Matrix::from_bits(gpu, &p.dy, s.out_rows(), s.n).context("could not upload dy")?;
        gpu.synchronize().context("the uploads did not complete")?;
        Ok(Self {
            ids,
            x,
            lora,
            gates,
            dy,
            weights,
            strategy,
            shape: s,
        })
    }

    /// One routing of the ids, forward and backward, enqueued without host synchronisation
    /// (unless the strategy reads the routing back: A and `Auto`). `between` runs after the
    /// forward has been enqueued and before the backward (for timing or memory probes).
    pub fn forward_backward(
        &self,
        gpu: &Runtime,
        between: impl FnOnce() -> anyhow::Result<()>,
    ) -> anyhow::Result<(Forward, Grads)> {
        let layer = ExpertLinear::new(
            self.weights.as_expert_weights(),
            self.lora.as_ref(),
            self.shape.input,
            self.shape.output,
        )
        .with_strategy(self.strategy.op_strategy());
        let routing = self.ids.route(gpu)?;
        let (fwd, saved) = layer
            .forward(gpu, &self.x, &routing, self.gates.as_ref())
            .context("the forward pass failed")?;
        between()?;
        let grads = backward(gpu, &saved, &self.dy).context("the backward pass failed")?;
        Ok((fwd, grads))
    }

    /// Downloads the results of [`forward_backward`](Self::forward_backward) (synchronizes).
    pub fn download(&self, gpu: &Gpu, fwd: &Forward, grads: &Grads) -> anyhow::Result<Outputs> {
        let get = |m: &Bf16Matrix, what: &str| {
            m.to_f32(gpu)
                .with_context(|| format!("could not download {what}"))
        };
        let optional = |m: &Option<Bf16Matrix>, what: &str| -> anyhow::Result<Vec<f32>> {
            match m {
                Some(m) => get(m, what),
                None => Ok(Vec::new()),
            }
        };
        Ok(Outputs {
            out: get(&fwd.out, "the output")?,
            dx: get(&grads.dx, "dx")?,
            da: optional(&grads.da, "dA")?,
            db: optional(&grads.db, "dB")?,
            d_gates: match &grads.d_gates {
                Some(m) => Some(get(m, "d_gates")?),
                None => None,
            },
        })
    }
}
