//! Projection mode: one LoRA-fused expert linear ([`ExpertLinear`]) read from a file, on the
//! device or the CPU reference, its outputs in the file's layout.

use crate::Runtime;
use crate::checkpoint::{Checkpoint, CheckpointErrorKind, StoredWeights};
use crate::error::Result;
use crate::op::{self, Bf16Matrix, ExpertLinear};
use crate::reference::{self, LinearProblem, sum_bytes, tensor_bytes};
use crate::routing::RowOrder;

use super::{
    DeviceWeights, Lora, OutputTensor, ROUNDING, Routed, RunStrategy, file_error, load_ids,
    load_lora, order, output, pad_rows, upload_lora,
};

/// The tensors besides the weights that projection mode reads.
pub(super) const INPUTS: &[&str] = &["expert_ids", "x", "lora_a", "lora_b", "gates", "dy"];

/// The validated inputs of one projection.
pub(super) struct Projection {
    pub(super) weights: StoredWeights,
    experts: usize,
    pub(super) n: usize,
    pub(super) k: usize,
    routed: Routed,
    x: Vec<f32>,
    x_rows: usize,
    fan_out: usize,
    input_order: RowOrder,
    output_order: RowOrder,
    lora: Option<Lora>,
    gates: Option<Vec<f32>>,
    dy: Option<Vec<f32>>,
}

impl Projection {
    /// Rows of the forward output.
    fn out_rows(&self) -> usize {
        if self.gates.is_some() {
            self.routed.tokens
        } else {
            self.routed.slots()
        }
    }

    /// Reads and checks everything the call needs (see [`super::FORMAT_HELP`]).
    pub(super) fn load(ck: &Checkpoint<'_>, weight: &str) -> Result<Self> {
        let weights = ck.read_expert_weights(weight)?;
        let (experts, n, k) = weights.dims();
        let routed = load_ids(ck, experts)?;
        let (tokens, top_k, slots) = (routed.tokens, routed.top_k, routed.slots());
        let input_order = order(ck, "input_order")?;
        let output_order = order(ck, "output_order")?;
        let shape = |detail: String| file_error(CheckpointErrorKind::Shape, detail);

        let x = ck.read_float("x")?;
        let (x_rows, x_cols) = x.dims2("(rows, K)")?;
        if x_cols != k {
            return Err(shape(format!(
                "`x` has {x_cols} columns, but the weights have K = {k}"
            )));
        }
        let fan_out = match input_order {
            RowOrder::Grouped if x_rows == slots => 1,
            RowOrder::Grouped => {
                return Err(shape(format!(
                    "`x` has {x_rows} rows; grouped input needs T*k = {slots} rows"
                )));
            }
            RowOrder::Scattered if x_rows == slots => 1,
            RowOrder::Scattered if x_rows == tokens => top_k,
            RowOrder::Scattered => {
                return Err(shape(format!(
                    "`x` has {x_rows} rows; scattered input needs T = {tokens} (token order) or T*k = {slots} (slot order)"
                )));
            }
        };
        let lora = load_lora(ck, ["lora_a", "lora_b"], &["scaling"], experts, k, n)?;
        let gates = if ck.contains("gates") {
            if output_order != RowOrder::Scattered {
                return Err(file_error(
                    CheckpointErrorKind::Metadata,
                    "`gates` need output_order = scattered (the gate sum runs over each token's slots)"
                        .into(),
                ));
            }
            let g = ck.read_float("gates")?;
            g.expect_shape(&[Some(tokens), Some(top_k)], "(T, k)")?;
            Some(g.data)
        } else {
            None
        };
        let dy = if ck.contains("dy") {
            let d = ck.read_float("dy")?;
            let (rows, dims) = if gates.is_some() {
                (tokens, "(T, N): the gated output's shape")
            } else {
                (slots, "(T*k, N): the output's shape")
            };
            d.expect_shape(&[Some(rows), Some(n)], dims)?;
            Some(d.data)
        } else {
            None
        };
        Ok(Self {
            weights,
            experts,
            n,
            k,
            routed,
            x: x.data,
            x_rows,
            fan_out,
            input_order,
            output_order,
            lora,
            gates,
            dy,
        })
    }

    /// The output tensors from the (file-layout) results.
    fn outputs(
        &self,
        out: Vec<f32>,
        d_x: Option<Vec<f32>>,
        d_lora: Option<(Vec<f32>, Vec<f32>)>,
        d_gates: Option<Vec<f32>>,
    ) -> Vec<OutputTensor> {
        let mut v = vec![output("out", vec![self.out_rows(), self.n], out)];
        if let Some(d) = d_x {
            v.push(output("d_x", vec![self.x_rows, self.k], d));
        }
        if let (Some((da, db)), Some(l)) = (d_lora, &self.lora) {
            let er = self.experts * l.rank;
            v.push(output("d_lora_a", vec![er, self.k], da));
            v.push(output("d_lora_b", vec![self.n, er], db));
        }
        if let Some(d) = d_gates {
            v.push(output(
                "d_gates",
                vec![self.routed.tokens, self.routed.top_k],
                d,
            ));
        }
        v
    }

    /// Bytes still to be allocated on the host by the call, computed with checked arithmetic
    /// (`None` on overflow): outputs and gradients as f32, bf16 and serialized bytes, and with
    /// `cpu` the CPU reference's f64 copies of every input and its f64 intermediates.
    pub(super) fn host_bytes(&self, cpu: bool) -> Option<u128> {
        let (e, n, k) = (self.experts, self.n, self.k);
        let (t, s) = (self.routed.tokens, self.routed.slots());
        let x = self.x_rows;
        let r = self.lora.as_ref().map_or(0, |l| l.rank);
        let lora = tensor_bytes(&[e, r, k + n], 1);
        let grads = self.dy.is_some();
        let outputs = sum_bytes(&[
            tensor_bytes(&[self.out_rows(), n], 1),
            if grads {
                sum_bytes(&[tensor_bytes(&[x, k], 1), lora, tensor_bytes(&[s], 1)])
            } else {
                Some(0)
            },
        ]);
        // f32 results, bf16 in the writer, the serialized file.
        let written = outputs.and_then(|o| o.checked_mul(4 + 2 + 2));
        if !cpu {
            return written;
        }
        let inputs = sum_bytes(&[
            tensor_bytes(&[x, k], 1),
            tensor_bytes(&[e, n, k], 1),
            lora,
            tensor_bytes(&[t, self.routed.top_k], 1),
        ]);
        sum_bytes(&[
            written,
            tensor_bytes(&[e, n, k], 4),           // the weights as f32
            inputs.and_then(|i| i.checked_mul(8)), // widened to f64
            tensor_bytes(&[s, r + 3 * n], 8),      // XA, grouped, slot-ordered outputs
            tensor_bytes(&[t, n], 8),              // the gate sum
            if grads {
                sum_bytes(&[
                    tensor_bytes(&[s, n + r + k], 8), // dY grouped, YB, per-row dX
                    tensor_bytes(&[x, k], 8),         // token sums
                    lora.and_then(|l| l.checked_mul(8)),
                ])
            } else {
                Some(0)
            },
        ])
    }

    /// Bytes the call allocates on the device (bf16 activations and gradients, routing, the
    /// weights as uploaded), with checked arithmetic.
    pub(super) fn device_bytes(&self, strategy: RunStrategy) -> Option<u128> {
        let (e, n, k) = (self.experts, self.n, self.k);
        let s = self.routed.slots();
        let r = self.lora.as_ref().map_or(0, |l| l.rank);
        sum_bytes(&[
            super::device_weight_bytes(&self.weights, strategy),
            tensor_bytes(&[self.x_rows, k], 2 * 2), // x, dx
            tensor_bytes(&[s, n], 2 * 3),           // out (slot rows), dy, the gated copy
            tensor_bytes(&[s, k], 2),               // per-slot dX
            tensor_bytes(&[s, r], 2 * 2),           // XA, YB
            tensor_bytes(&[e, r, k + n], 2 * 3),    // LoRA and its gradients
            tensor_bytes(&[s], 16),                 // routing
        ])
    }

    /// The sizes of this call, for messages.
    pub(super) fn size_label(&self) -> String {
        format!(
            "out [{}, {}] from T = {}, k = {}, x [{}, {}], weights [{}, {}, {}]",
            self.out_rows(),
            self.n,
            self.routed.tokens,
            self.routed.top_k,
            self.x_rows,
            self.k,
            self.experts,
            self.n,
            self.k
        )
    }

    /// The CPU reference ([`super::ROUNDING`]).
    pub(super) fn cpu(&self) -> Result<Vec<OutputTensor>> {
        let w = self.weights.to_f32();
        let routing = self.routed.reference(self.experts)?;
        let (k, n, valid) = (self.k, self.n, self.routed.valid_rows);
        // Grouped tensors hold T*k rows in the file; the reference takes the L_valid valid ones.
        let (x, x_rows) = match self.input_order {
            RowOrder::Grouped => (&self.x[..valid * k], valid),
            RowOrder::Scattered => (&self.x[..], self.x_rows),
        };
        let empty: &[f32] = &[];
        let problem = LinearProblem {
            x,
            x_rows,
            w: &w,
            num_experts: self.experts,
            n,
            k,
            lora_a: self.lora.as_ref().map_or(empty, |l| &l.a),
            lora_b: self.lora.as_ref().map_or(empty, |l| &l.b),
            rank: self.lora.as_ref().map_or(0, |l| l.rank),
            scaling: self.lora.as_ref().map_or(0.0, |l| l.scaling),
            fan_out: self.fan_out,
            input_order: self.input_order,
            output_order: self.output_order,
            gates: self.gates.as_deref(),
            bias: None,
        };
        let fwd = reference::linear_forward(&problem, &routing, ROUNDING)?;
        let out = pad_rows(fwd.y.unwrap_or(fwd.out), self.out_rows(), n);
        let Some(dy) = &self.dy else {
            return Ok(self.outputs(out, None, None, None));
        };
        let dy = if self.gates.is_none() && self.output_order == RowOrder::Grouped {
            &dy[..valid * n]
        } else {
            &dy[..]
        };
        let grads = reference::linear_backward(&problem, &routing, dy, ROUNDING)?;
        let d_x = pad_rows(grads.dx, self.x_rows, k);
        let d_lora = self.lora.is_some().then_some((grads.da, grads.db));
        Ok(self.outputs(out, Some(d_x), d_lora, grads.d_gates))
    }

    /// [`crate::op`] on the device; returns the outputs and the path that ran.
    pub(super) fn gpu(
        &self,
        rt: &Runtime,
        strategy: RunStrategy,
    ) -> Result<(Vec<OutputTensor>, String)> {
        let (e, n, k) = (self.experts, self.n, self.k);
        let weights = DeviceWeights::upload(rt, &self.weights, strategy)?;
        let routing = self.routed.device(rt, e)?;
        let x = Bf16Matrix::from_f32(rt, &self.x, self.x_rows, k)?;
        let lora = upload_lora(rt, self.lora.as_ref(), e, k, n)?;
        let gates = match &self.gates {
            Some(g) => Some(Bf16Matrix::from_f32(
                rt,
                g,
                self.routed.tokens,
                self.routed.top_k,
            )?),
            None => None,
        };
        let layer = ExpertLinear::new(
            weights.as_op(),
            lora.as_ref(),
            self.input_order,
            self.output_order,
        )
        .with_strategy(strategy.op());
        let (fwd, saved) = layer.forward(rt, &x, &routing, gates.as_ref())?;
        let ran = weights.ran(fwd.strategy).to_string();
        let mut out = fwd.out.to_f32(rt)?;
        let Some(dy) = &self.dy else {
            self.zero_dropped(&mut out, None, None);
            return Ok((self.outputs(out, None, None, None), ran));
        };
        let dy = Bf16Matrix::from_f32(rt, dy, self.out_rows(), n)?;
        let grads = op::backward(rt, &saved, &dy)?;
        let mut d_x = grads.dx.to_f32(rt)?;
        let d_lora = match (&grads.da, &grads.db) {
            (Some(da), Some(db)) => Some((da.to_f32(rt)?, db.to_f32(rt)?)),
            _ => None,
        };
        let mut d_gates = grads.d_gates.as_ref().map(|g| g.to_f32(rt)).transpose()?;
        self.zero_dropped(&mut out, Some(&mut d_x), d_gates.as_mut());
        Ok((self.outputs(out, Some(d_x), d_lora, d_gates), ran))
    }

    /// Zeroes what the file format defines as zero for dropped slots (grouped rows past
    /// `L_valid`, slot rows and gate gradients of dropped slots), whatever the device left there.
    fn zero_dropped(
        &self,
        out: &mut [f32],
        d_x: Option<&mut Vec<f32>>,
        d_gates: Option<&mut Vec<f32>>,
    ) {
        let zero_row = |v: &mut [f32], row: usize, cols: usize| {
            if let Some(s) = v.get_mut(row * cols..(row + 1) * cols) {
                s.fill(0.0);
            }
        };
        let rows_to_zero = |order: RowOrder| -> Vec<usize> {
            match order {
                RowOrder::Grouped => (self.routed.valid_rows..self.routed.slots()).collect(),
                RowOrder::Scattered => self.routed.dropped().collect(),
            }
        };
        if self.gates.is_none() {
            for row in rows_to_zero(self.output_order) {
                zero_row(out, row, self.n);
            }
        }
        // Token-ordered input (fan_out = k) sums the slots per token; its rows are all meaningful.
        if let Some(dx) = d_x
            && self.fan_out == 1
        {
            for row in rows_to_zero(self.input_order) {
                zero_row(dx, row, self.k);
            }
        }
        if let Some(dg) = d_gates {
            for slot in self.routed.dropped() {
                dg[slot] = 0.0;
            }
        }
    }

    pub(super) fn describe(&self) -> String {
        format!(
            "one expert projection: weights {}, T = {}, k = {}, LoRA rank {}, input {}, output {}{}{}",
            self.weights.describe(),
            self.routed.tokens,
            self.routed.top_k,
            self.lora.as_ref().map_or(0, |l| l.rank),
            self.input_order.name(),
            self.output_order.name(),
            if self.gates.is_some() { ", gated" } else { "" },
            if self.dy.is_some() {
                ""
            } else {
                ", forward only (no dy)"
            },
        )
    }
}
