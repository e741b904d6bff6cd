//! `mxmoe run`: one operator call, forward and backward, on tensors read from a safetensors
//! file; the output and the gradients are written to another, so anyone can check mxmoe against
//! their own implementation.
//!
//! Two modes (metadata `mode`): `projection` (the default) runs one LoRA-fused expert linear
//! ([`mxmoe::op::ExpertLinear`]); `block` runs the whole gated MoE MLP block
//! ([`mxmoe::moe::MoeBlock`]: gate/up projection, SwiGLU, gated down projection). With a GPU
//! the call runs through the library; without one (or with `--cpu`) it runs the CPU reference
//! ([`mxmoe::reference`] with [`Rounding::Bf16`], MXFP4 weights dequantized on the CPU) and says
//! so. The file formats are described in [`FORMAT_HELP`] (printed by `mxmoe run --help`).

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use mxmoe::Runtime;
use mxmoe::checkpoint::{Checkpoint, CheckpointWriter, StoredWeights};
use mxmoe::device::Gpu;
use mxmoe::moe::{self, MoeBlock};
use mxmoe::mxfp4::dequantize_bf16;
use mxmoe::op::{
    self, Bf16Matrix, DenseExperts, ExpertLinear, ExpertWeights, LoraWeights, MxExperts, RowOrder,
};
use mxmoe::reference::moe::{MoeProblem, RefLora, moe_forward, moe_forward_backward};
use mxmoe::reference::{self, LinearProblem, Rounding};
use mxmoe::routing::DeviceRouting;

use crate::env::{check_device_memory, open_gpu, sum_bytes, tensor_bytes};
use crate::output::{same_file, write_atomic};
use mxmoe::checkpoint::escape;
use mxmoe::reference::check_host_memory;

/// The file formats of `mxmoe run`, printed after `--help`.
pub const FORMAT_HELP: &str = "\
Projection mode (the default; metadata mode = projection) computes, for each routed slot
(token t, slot j, expert e = expert_ids[t, j]), with bf16 rounding where the kernels round:
    y[t*k + j] = x_t W_e^T + s * round(x_t A_e^T) B_e^T
(W_e = w[e] is [N, K], A_e = lora_a rows e*r..e*r+r-1, B_e = lora_b columns e*r..e*r+r-1),
and its backward for the output gradient dy. The frozen weights get no gradient.
Input file (--inputs), safetensors; T tokens, k = top_k, E experts, N outputs, K inputs, r = rank:
  expert_ids  I32 or I64 [T, k]   expert of each (token, slot); -1 marks a dropped slot
  x           BF16/F16/F32        [T, K] token order or [T*k, K] slot order (input_order = scattered),
                                  [T*k, K] grouped rows (input_order = grouped)
  w           BF16/F16/F32 [E, N, K] dense expert weights W_store, or MXFP4 as
              w.packed U8 [E, N, K/2] + w.scales U8 [E, N, K/32] (torchao; also w.qdata/w.scale), or
              w_blocks U8 [E, N, K/32, 16] + w_scales U8 [E, N, K/32] (gpt-oss)
              (another name with --weight NAME)
  lora_a      optional, [E*r, K]   (with lora_b)
  lora_b      optional, [N, E*r]
  gates       optional, [T, k]     out[t] = sum_j gates[t, j] * y[t*k + j] (needs output_order = scattered)
  dy          optional, the gradient of the output, in its shape; without it only `out` is computed
Metadata (__metadata__, all strings):
  scaling       LoRA scaling s (required with lora_a/lora_b), e.g. \"2.0\"
  input_order   scattered (default) | grouped
  output_order  scattered (default) | grouped
Grouped rows are ordered by expert, ties by slot t*k + j (a stable sort); dropped slots sort last,
are ignored in inputs and are zero in outputs.
Output file (--out), all BF16; the gradient of input NAME is d_NAME:
  out       [T, N] with gates, else [T*k, N] (slot order if output_order = scattered, else grouped)
  d_x       the shape of x            (present when dy is given; likewise below)
  d_lora_a  [E*r, K], d_lora_b [N, E*r]  (with LoRA)
  d_gates   [T, k]                    (with gates)

Block mode (metadata mode = block): the gated MoE MLP block, H hidden, I expert intermediate:
    [g | u] = gate_up(x)   (gate = the first I rows of each expert, up = the last I)
    h = silu(g) * u        (with metadata limit: g = min(g, limit), u = clamp(u, -limit, limit))
    out[t] = sum_j gates[t, j] * down(h)[t*k + j]
Each projection is the expert linear above (with its own LoRA). gpt-oss checkpoints interleave
gate and up rows and use another activation: reorder the rows first; this is not gpt-oss's block.
  expert_ids [T, k]; x [T, H]; gates [T, k] (required); dy [T, H] (optional)
  gate_up_proj [E, 2I, H] and down_proj [E, H, I], each dense or MXFP4 (names as for w)
  gate_up_lora_a [E*r, H] + gate_up_lora_b [2I, E*r], down_lora_a [E*r, I] + down_lora_b [H, E*r]
  metadata: scaling (both LoRAs; gate_up_scaling / down_scaling override it), limit (optional)
  output: out [T, H], d_x [T, H], d_gates [T, k], d_gate_up_lora_a, d_gate_up_lora_b,
          d_down_lora_a, d_down_lora_b
Output metadata (both modes): mxmoe.mode, mxmoe.backend (gpu | cpu-reference), mxmoe.strategy,
mxmoe.weights, mxmoe.device, mxmoe.version, and the inputs' metadata.
Without a GPU (and without --device), or with --cpu, the CPU reference computes the result (bf16
rounding at the kernels' points, MXFP4 dequantized exactly); --device N for a device that does
not exist is an error.
Checks, on every backend alike: N and K of every projection positive multiples of 8 (MXFP4: K a
multiple of 32), LoRA rank 1 to 128, no MXFP4 scale byte 255 (NaN) unless --allow-nan-scales,
and every size the file implies must fit in the memory available (host RAM for the CPU
reference, free device memory for the GPU). Tensors that the call does not read are listed in a
warning. The output is written to a temporary file beside --out and renamed over it when
complete; --out may not be the --inputs file.";

/// How the weights are multiplied (GPU only; the CPU reference computes the same math for all).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum RunStrategy {
    /// MXFP4 weights: the library's per-call choice (`op::Strategy::Auto`); dense weights: bf16.
    #[default]
    Auto,
    /// MXFP4 weights decoded inside the tensor-core K-loop (Strategy B).
    Fused,
    /// MXFP4 weights: the active experts dequantized to a compact bf16 buffer (Strategy A).
    Selective,
    /// Dense bf16 kernels (MXFP4 weights are dequantized to bf16 on the host first).
    Bf16,
}

impl RunStrategy {
    fn label(self) -> &'static str {
        match self {
            RunStrategy::Auto => "auto",
            RunStrategy::Fused => "fused",
            RunStrategy::Selective => "selective",
            RunStrategy::Bf16 => "bf16",
        }
    }

    /// The op layer's strategy for MXFP4 weights on the device.
    fn op(self) -> op::Strategy {
        match self {
            RunStrategy::Auto => op::Strategy::Auto,
            RunStrategy::Selective => op::Strategy::SelectiveDequant,
            RunStrategy::Fused | RunStrategy::Bf16 => op::Strategy::Fused,
        }
    }
}

/// Options of `mxmoe run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Input safetensors file: expert_ids, x, the weights, optional LoRA, gates and dy; metadata
    /// mode, scaling, input_order, output_order, limit (details below).
    #[arg(long, value_name = "IN.safetensors")]
    pub inputs: PathBuf,
    /// Output safetensors file (bf16 out and the gradients d_<input name>; replaced atomically
    /// when complete; must not be the input file).
    #[arg(long, value_name = "OUT.safetensors")]
    pub out: PathBuf,
    /// How the weights are multiplied on the GPU: auto, fused (MXFP4 decoded in the K-loop),
    /// selective (active experts dequantized first) or bf16 (dense kernels). fused and selective
    /// need MXFP4 weights. Ignored by the CPU reference.
    #[arg(long, value_enum, default_value_t)]
    pub strategy: RunStrategy,
    /// CUDA device ordinal (an error if it does not exist). Default: device 0, or the CPU
    /// reference when there is no GPU.
    #[arg(long, value_name = "N")]
    pub device: Option<usize>,
    /// Compute with the CPU reference even when a GPU is present.
    #[arg(long)]
    pub cpu: bool,
    /// Accept MXFP4 scale byte 255 (E8M0 NaN) and let NaN propagate into out, d_x and d_gates,
    /// as torchao does. Default: such weights are refused, naming expert, row and block.
    #[arg(long)]
    pub allow_nan_scales: bool,
    /// Projection mode: name of the expert weights in the input file: NAME (dense),
    /// NAME.packed + NAME.scales (torchao) or NAME_blocks + NAME_scales (gpt-oss).
    #[arg(long, default_value = "w", value_name = "NAME")]
    pub weight: String,
}

/// What one run does, independent of files.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// See [`RunArgs::strategy`].
    pub strategy: RunStrategy,
    /// See [`RunArgs::device`].
    pub device: Option<usize>,
    /// See [`RunArgs::cpu`].
    pub force_cpu: bool,
    /// See [`RunArgs::allow_nan_scales`].
    pub allow_nan_scales: bool,
    /// See [`RunArgs::weight`].
    pub weight: String,
}

/// LoRA factors as read.
struct Lora {
    a: Vec<f32>,
    b: Vec<f32>,
    rank: usize,
    scaling: f32,
}

impl Lora {
    fn reference(&self) -> RefLora<'_> {
        RefLora {
            a: &self.a,
            b: &self.b,
            rank: self.rank,
            scaling: self.scaling,
        }
    }
}

/// The expert ids `[T, k]`.
struct Routed {
    ids: Vec<i64>,
    tokens: usize,
    top_k: usize,
    /// Slots that are not dropped, `L_valid`.
    valid_rows: usize,
}

impl Routed {
    /// Slots whose expert id is -1.
    fn dropped(&self) -> impl Iterator<Item = usize> + '_ {
        self.ids
            .iter()
            .enumerate()
            .filter(|(_, id)| **id < 0)
            .map(|(i, _)| i)
    }

    fn slots(&self) -> usize {
        self.tokens * self.top_k
    }

    fn reference(&self, experts: usize) -> anyhow::Result<reference::Routing> {
        reference::flatten_sort_count(&self.ids, self.tokens, self.top_k, experts)
            .context("the CPU reference rejected the expert ids")
    }

    fn device(&self, gpu: &Gpu, experts: usize) -> anyhow::Result<DeviceRouting> {
        DeviceRouting::from_host_ids(gpu, &self.ids, self.tokens, self.top_k, experts)
            .context("could not route the expert ids on the device")
    }
}

/// An output tensor: name, shape, values (written as bf16).
type Output = (&'static str, Vec<usize>, Vec<f32>);

fn order(ck: &Checkpoint<'_>, key: &str) -> anyhow::Result<RowOrder> {
    match ck.metadata_value(key) {
        None => Ok(RowOrder::Scattered),
        Some(name) => match name.parse() {
            Ok(order) => Ok(order),
            Err(_) => bail!(
                "metadata `{key}` is `{}`, expected `scattered` or `grouped`",
                escape(name)
            ),
        },
    }
}

fn order_name(o: RowOrder) -> &'static str {
    o.name()
}

/// A metadata value parsed as a finite f32.
fn metadata_f32(ck: &Checkpoint<'_>, key: &str) -> anyhow::Result<Option<f32>> {
    let Some(s) = ck.metadata_value(key) else {
        return Ok(None);
    };
    let v = s
        .trim()
        .parse::<f32>()
        .ok()
        .filter(|v| v.is_finite())
        .with_context(|| format!("metadata `{key}` is `{}`, not a finite number", escape(s)))?;
    Ok(Some(v))
}

/// Expert ids `[T, k]` with every id in `[-1, experts)`.
fn load_ids(ck: &Checkpoint<'_>, experts: usize) -> anyhow::Result<Routed> {
    let ids = ck.read_index("expert_ids")?;
    let (tokens, top_k) = ids.dims2("(T, k)")?;
    if tokens == 0 || top_k == 0 {
        bail!(
            "`expert_ids` has shape [{tokens}, {top_k}]: it needs at least one token and one slot"
        );
    }
    if let Some((i, id)) = ids
        .data
        .iter()
        .enumerate()
        .find(|(_, id)| **id < -1 || **id >= experts as i64)
    {
        bail!(
            "`expert_ids` holds expert {id} at token {}, slot {}: outside [0, {experts}) (the weights have {experts} experts; -1 marks a dropped slot)",
            i / top_k,
            i % top_k
        );
    }
    let valid_rows = ids.data.iter().filter(|&&id| id >= 0).count();
    Ok(Routed {
        ids: ids.data,
        tokens,
        top_k,
        valid_rows,
    })
}

/// The optional LoRA pair `a_name` `[E·r, K]` + `b_name` `[N, E·r]` and its scaling (the first
/// of `scaling_keys` present in the metadata).
fn load_lora(
    ck: &Checkpoint<'_>,
    [a_name, b_name]: [&str; 2],
    scaling_keys: &[&str],
    experts: usize,
    k: usize,
    n: usize,
) -> anyhow::Result<Option<Lora>> {
    match (ck.contains(a_name), ck.contains(b_name)) {
        (false, false) => return Ok(None),
        (true, false) => {
            bail!("`{b_name}` is missing (the file has `{a_name}`; give both or neither)")
        }
        (false, true) => {
            bail!("`{a_name}` is missing (the file has `{b_name}`; give both or neither)")
        }
        (true, true) => {}
    }
    let a = ck.read_float(a_name)?;
    let (a_rows, _) = a.dims2("(E*r, K)")?;
    if a_rows == 0 || a_rows % experts != 0 {
        bail!(
            "`{a_name}` has {a_rows} rows, which is not E*r for E = {experts} experts and a rank r >= 1"
        );
    }
    let rank = a_rows / experts;
    let max_rank = mxmoe::shared::tiles::MAX_RANK as usize;
    if rank > max_rank {
        return Err(mxmoe::Error::InvalidArgument {
            what: "LoRA rank",
            detail: format!(
                "must be in 1..={max_rank} (use no LoRA for rank 0), got {rank} (`{a_name}` has {a_rows} rows for E = {experts})"
            ),
        }
        .into());
    }
    a.expect_shape(&[Some(experts * rank), Some(k)], "(E*r, K)")?;
    let b = ck.read_float(b_name)?;
    b.expect_shape(&[Some(n), Some(experts * rank)], "(N, E*r)")?;
    let mut scaling = None;
    for key in scaling_keys {
        if let Some(s) = metadata_f32(ck, key)? {
            scaling = Some(s);
            break;
        }
    }
    let Some(scaling) = scaling else {
        bail!("metadata `scaling` is missing (it is required with `{a_name}` and `{b_name}`)");
    };
    Ok(Some(Lora {
        a: a.data,
        b: b.data,
        rank,
        scaling,
    }))
}

/// Rejects an MXFP4-only strategy for dense weights.
fn check_strategy(w: &StoredWeights, name: &str, strategy: RunStrategy) -> anyhow::Result<()> {
    if let (StoredWeights::Dense(t), RunStrategy::Fused | RunStrategy::Selective) = (w, strategy) {
        bail!(
            "--strategy {} needs MXFP4 weights, but `{name}` is dense {} (quantize it first with `mxmoe quantize`)",
            strategy.label(),
            t.dtype
        );
    }
    Ok(())
}

/// The weights on the device in the form `strategy` multiplies.
enum DeviceWeights {
    Dense(DenseExperts),
    Mx(MxExperts),
}

impl DeviceWeights {
    fn upload(
        gpu: &Gpu,
        w: &StoredWeights,
        strategy: RunStrategy,
        name: &str,
    ) -> anyhow::Result<Self> {
        let (e, n, k) = w.dims();
        Ok(match (w, strategy) {
            (StoredWeights::Dense(t), _) => DeviceWeights::Dense(
                DenseExperts::from_f32(gpu, &t.data, e, n, k)
                    .with_context(|| format!("could not upload `{name}`"))?,
            ),
            (StoredWeights::Mx { weights, .. }, RunStrategy::Bf16) => DeviceWeights::Dense(
                DenseExperts::from_bits(gpu, &dequantize_bf16(weights), e, n, k)
                    .with_context(|| format!("could not upload `{name}` dequantized"))?,
            ),
            (StoredWeights::Mx { weights, .. }, _) => DeviceWeights::Mx(
                MxExperts::upload(gpu, weights)
                    .with_context(|| format!("could not upload the MXFP4 `{name}`"))?,
            ),
        })
    }

    fn as_op(&self) -> ExpertWeights<'_> {
        match self {
            DeviceWeights::Dense(w) => ExpertWeights::Bf16(w),
            DeviceWeights::Mx(w) => ExpertWeights::Mxfp4(w),
        }
    }

    /// The path that ran for these weights: `bf16`, `fused` or `selective`.
    fn ran(&self, strategy: op::Strategy) -> &'static str {
        match (self, strategy) {
            (DeviceWeights::Dense(_), _) => "bf16",
            (DeviceWeights::Mx(_), op::Strategy::SelectiveDequant) => {
                op::Strategy::SelectiveDequant.name()
            }
            (DeviceWeights::Mx(_), _) => op::Strategy::Fused.name(),
        }
    }
}

fn upload_lora(
    gpu: &Gpu,
    l: Option<&Lora>,
    e: usize,
    k: usize,
    n: usize,
    name: &str,
) -> anyhow::Result<Option<LoraWeights>> {
    let Some(l) = l else { return Ok(None) };
    Ok(Some(LoraWeights {
        a: Bf16Matrix::from_f32(gpu, &l.a, e * l.rank, k)
            .with_context(|| format!("could not upload the {name} LoRA A"))?,
        b: Bf16Matrix::from_f32(gpu, &l.b, n, e * l.rank)
            .with_context(|| format!("could not upload the {name} LoRA B"))?,
        rank: l.rank,
        scaling: l.scaling,
    }))
}

fn download(gpu: &Gpu, m: &Bf16Matrix, what: &str) -> anyhow::Result<Vec<f32>> {
    m.to_f32(gpu)
        .with_context(|| format!("could not download {what}"))
}

/// The tensors of the file that hold expert weights `name` as read: the dense tensor, or the
/// MXFP4 codes and scales.
fn weight_tensors(ck: &Checkpoint<'_>, name: &str, w: &StoredWeights) -> Vec<String> {
    match w {
        StoredWeights::Dense(_) => vec![name.to_string()],
        StoredWeights::Mx { .. } => ck
            .find_mx(name)
            .map(|(_, codes, scales)| vec![codes, scales])
            .unwrap_or_default(),
    }
}

/// Bytes the weights take on the device in the form `strategy` uploads.
fn device_weight_bytes(w: &StoredWeights, strategy: RunStrategy) -> Option<u128> {
    let (e, n, k) = w.dims();
    match (w, strategy) {
        (StoredWeights::Mx { weights, .. }, RunStrategy::Auto | RunStrategy::Fused) => {
            Some(weights.shape().bytes() as u128)
        }
        // Strategy A keeps the packed weights and a bf16 buffer for the active experts.
        (StoredWeights::Mx { weights, .. }, RunStrategy::Selective) => sum_bytes(&[
            Some(weights.shape().bytes() as u128),
            tensor_bytes(&[e, n, k], 2),
        ]),
        _ => tensor_bytes(&[e, n, k], 2),
    }
}

/// The shape rule of [`ExpertLinear::check_dims`] for the projection `what`, with its context.
fn check_dims(what: &str, n: usize, k: usize) -> anyhow::Result<()> {
    ExpertLinear::check_dims(n, k).with_context(|| {
        format!("{what} cannot run on any backend (the GPU kernels refuse it, so the CPU reference does too)")
    })
}

// ---------------------------------------------------------------------------------------------
// Projection mode.

/// The validated inputs of one projection.
struct Projection {
    weights: StoredWeights,
    experts: usize,
    n: usize,
    k: usize,
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

    /// Reads and checks everything the call needs (see [`FORMAT_HELP`]).
    fn load(ck: &Checkpoint<'_>, weight: &str) -> anyhow::Result<Self> {
        let weights = ck
            .read_expert_weights(weight)
            .context("could not read the expert weights")?;
        let (experts, n, k) = weights.dims();
        let routed = load_ids(ck, experts)?;
        let (tokens, top_k, slots) = (routed.tokens, routed.top_k, routed.slots());
        let input_order = order(ck, "input_order")?;
        let output_order = order(ck, "output_order")?;

        let x = ck.read_float("x")?;
        let (x_rows, x_cols) = x.dims2("(rows, K)")?;
        if x_cols != k {
            bail!("`x` has {x_cols} columns, but the weights have K = {k}");
        }
        let fan_out = match input_order {
            RowOrder::Grouped if x_rows == slots => 1,
            RowOrder::Grouped => {
                bail!("`x` has {x_rows} rows; grouped input needs T*k = {slots} rows")
            }
            RowOrder::Scattered if x_rows == slots => 1,
            RowOrder::Scattered if x_rows == tokens => top_k,
            RowOrder::Scattered => bail!(
                "`x` has {x_rows} rows; scattered input needs T = {tokens} (token order) or T*k = {slots} (slot order)"
            ),
        };
        let lora = load_lora(ck, ["lora_a", "lora_b"], &["scaling"], experts, k, n)?;
        let gates = if ck.contains("gates") {
            if output_order != RowOrder::Scattered {
                bail!(
                    "`gates` need output_order = scattered (the gate sum runs over each token's slots)"
                );
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
    ) -> Vec<Output> {
        let mut v = vec![("out", vec![self.out_rows(), self.n], out)];
        if let Some(d) = d_x {
            v.push(("d_x", vec![self.x_rows, self.k], d));
        }
        if let (Some((da, db)), Some(l)) = (d_lora, &self.lora) {
            let er = self.experts * l.rank;
            v.push(("d_lora_a", vec![er, self.k], da));
            v.push(("d_lora_b", vec![self.n, er], db));
        }
        if let Some(d) = d_gates {
            v.push(("d_gates", vec![self.routed.tokens, self.routed.top_k], d));
        }
        v
    }

    /// Bytes still to be allocated on the host by the call, computed with checked arithmetic
    /// (`None` on overflow): outputs and gradients as f32, bf16 and serialized bytes, and with
    /// `cpu` the CPU reference's f64 copies of every input and its f64 intermediates.
    fn host_bytes(&self, cpu: bool) -> Option<u128> {
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
    fn device_bytes(&self, strategy: RunStrategy) -> Option<u128> {
        let (e, n, k) = (self.experts, self.n, self.k);
        let s = self.routed.slots();
        let r = self.lora.as_ref().map_or(0, |l| l.rank);
        sum_bytes(&[
            device_weight_bytes(&self.weights, strategy),
            tensor_bytes(&[self.x_rows, k], 2 * 2), // x, dx
            tensor_bytes(&[s, n], 2 * 3),           // out (slot rows), dy, the gated copy
            tensor_bytes(&[s, k], 2),               // per-slot dX
            tensor_bytes(&[s, r], 2 * 2),           // XA, YB
            tensor_bytes(&[e, r, k + n], 2 * 3),    // LoRA and its gradients
            tensor_bytes(&[s], 16),                 // routing
        ])
    }

    /// The sizes of this call, for messages.
    fn size_label(&self) -> String {
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

    /// The CPU reference ([`Rounding::Bf16`]).
    fn cpu(&self) -> anyhow::Result<Vec<Output>> {
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
        };
        let fwd = reference::linear_forward(&problem, &routing, Rounding::Bf16)
            .context("the CPU reference forward failed")?;
        let out = pad_rows(fwd.y.unwrap_or(fwd.out), self.out_rows(), n);
        let Some(dy) = &self.dy else {
            return Ok(self.outputs(out, None, None, None));
        };
        let dy = if self.gates.is_none() && self.output_order == RowOrder::Grouped {
            &dy[..valid * n]
        } else {
            &dy[..]
        };
        let grads = reference::linear_backward(&problem, &routing, dy, Rounding::Bf16)
            .context("the CPU reference backward failed")?;
        let d_x = pad_rows(grads.dx, self.x_rows, k);
        let d_lora = self.lora.is_some().then_some((grads.da, grads.db));
        Ok(self.outputs(out, Some(d_x), d_lora, grads.d_gates))
    }

    /// [`mxmoe::op`] on the device; returns the outputs and the path that ran.
    fn gpu(&self, gpu: &Runtime, strategy: RunStrategy) -> anyhow::Result<(Vec<Output>, String)> {
        let (e, n, k) = (self.experts, self.n, self.k);
        let weights = DeviceWeights::upload(gpu, &self.weights, strategy, "the expert weights")?;
        let routing = self.routed.device(gpu, e)?;
        let x = Bf16Matrix::from_f32(gpu, &self.x, self.x_rows, k).context("could not upload x")?;
        let lora = upload_lora(gpu, self.lora.as_ref(), e, k, n, "")?;
        let gates = match &self.gates {
            Some(g) => Some(
                Bf16Matrix::from_f32(gpu, g, self.routed.tokens, self.routed.top_k)
                    .context("could not upload the gates")?,
            ),
            None => None,
        };
        let layer = ExpertLinear::new(
            weights.as_op(),
            lora.as_ref(),
            self.input_order,
            self.output_order,
        )
        .with_strategy(strategy.op());
        let (fwd, saved) = layer
            .forward(gpu, &x, &routing, gates.as_ref())
            .context("the forward pass failed")?;
        let ran = weights.ran(fwd.strategy).to_string();
        let mut out = download(gpu, &fwd.out, "the output")?;
        let Some(dy) = &self.dy else {
            self.zero_dropped(&mut out, None, None);
            return Ok((self.outputs(out, None, None, None), ran));
        };
        let dy =
            Bf16Matrix::from_f32(gpu, dy, self.out_rows(), n).context("could not upload dy")?;
        let grads = op::backward(gpu, &saved, &dy).context("the backward pass failed")?;
        let mut d_x = download(gpu, &grads.dx, "d_x")?;
        let d_lora = match (&grads.da, &grads.db) {
            (Some(da), Some(db)) => Some((
                download(gpu, da, "d_lora_a")?,
                download(gpu, db, "d_lora_b")?,
            )),
            _ => None,
        };
        let mut d_gates = grads
            .d_gates
            .as_ref()
            .map(|g| download(gpu, g, "d_gates"))
            .transpose()?;
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

    fn describe(&self) -> String {
        format!(
            "one expert projection: weights {}, T = {}, k = {}, LoRA rank {}, input {}, output {}{}{}",
            self.weights.describe(),
            self.routed.tokens,
            self.routed.top_k,
            self.lora.as_ref().map_or(0, |l| l.rank),
            order_name(self.input_order),
            order_name(self.output_order),
            if self.gates.is_some() { ", gated" } else { "" },
            if self.dy.is_some() {
                ""
            } else {
                ", forward only (no dy)"
            },
        )
    }
}

/// Appends zero rows up to `rows` rows of `cols` (grouped tensors keep T*k rows in the file).
fn pad_rows(mut v: Vec<f32>, rows: usize, cols: usize) -> Vec<f32> {
    v.resize(rows * cols, 0.0);
    v
}

// ---------------------------------------------------------------------------------------------
// Block mode.

/// The validated inputs of one MoE block call.
struct Block {
    gate_up: StoredWeights,
    down: StoredWeights,
    experts: usize,
    hidden: usize,
    inter: usize,
    routed: Routed,
    x: Vec<f32>,
    gates: Vec<f32>,
    lora_gate_up: Option<Lora>,
    lora_down: Option<Lora>,
    limit: Option<f32>,
    dy: Option<Vec<f32>>,
}

impl Block {
    fn load(ck: &Checkpoint<'_>) -> anyhow::Result<Self> {
        let gate_up = ck
            .read_expert_weights("gate_up_proj")
            .context("could not read the gate/up weights")?;
        let down = ck
            .read_expert_weights("down_proj")
            .context("could not read the down weights")?;
        let (experts, two_i, hidden) = gate_up.dims();
        if two_i % 2 != 0 {
            bail!("`gate_up_proj` has {two_i} rows per expert; it needs 2*I (an even number)");
        }
        let inter = two_i / 2;
        if down.dims() != (experts, hidden, inter) {
            let (a, b, c) = down.dims();
            bail!(
                "`down_proj` is [{a}, {b}, {c}], expected [{experts}, {hidden}, {inter}] ([E, H, I] for gate_up_proj [{experts}, {two_i}, {hidden}])"
            );
        }
        let routed = load_ids(ck, experts)?;
        let (tokens, top_k) = (routed.tokens, routed.top_k);
        let x = ck.read_float("x")?;
        x.expect_shape(&[Some(tokens), Some(hidden)], "(T, H)")?;
        let gates = ck.read_float("gates")?;
        gates.expect_shape(&[Some(tokens), Some(top_k)], "(T, k)")?;
        let lora_gate_up = load_lora(
            ck,
            ["gate_up_lora_a", "gate_up_lora_b"],
            &["gate_up_scaling", "scaling"],
            experts,
            hidden,
            two_i,
        )?;
        let lora_down = load_lora(
            ck,
            ["down_lora_a", "down_lora_b"],
            &["down_scaling", "scaling"],
            experts,
            inter,
            hidden,
        )?;
        let limit = metadata_f32(ck, "limit")?;
        if let Some(l) = limit
            && l <= 0.0
        {
            bail!("metadata `limit` is {l}; the clamp limit must be positive");
        }
        let dy = if ck.contains("dy") {
            let d = ck.read_float("dy")?;
            d.expect_shape(&[Some(tokens), Some(hidden)], "(T, H): the output's shape")?;
            Some(d.data)
        } else {
            None
        };
        Ok(Self {
            gate_up,
            down,
            experts,
            hidden,
            inter,
            routed,
            x: x.data,
            gates: gates.data,
            lora_gate_up,
            lora_down,
            limit,
            dy,
        })
    }

    fn outputs(
        &self,
        out: Vec<f32>,
        d_x: Option<Vec<f32>>,
        d_gate_up: Option<(Vec<f32>, Vec<f32>)>,
        d_down: Option<(Vec<f32>, Vec<f32>)>,
        d_gates: Option<Vec<f32>>,
    ) -> Vec<Output> {
        let (e, h, i) = (self.experts, self.hidden, self.inter);
        let (t, top_k) = (self.routed.tokens, self.routed.top_k);
        let mut v = vec![("out", vec![t, h], out)];
        if let Some(d) = d_x {
            v.push(("d_x", vec![t, h], d));
        }
        if let Some(d) = d_gates {
            v.push(("d_gates", vec![t, top_k], d));
        }
        if let (Some((da, db)), Some(l)) = (d_gate_up, &self.lora_gate_up) {
            v.push(("d_gate_up_lora_a", vec![e * l.rank, h], da));
            v.push(("d_gate_up_lora_b", vec![2 * i, e * l.rank], db));
        }
        if let (Some((da, db)), Some(l)) = (d_down, &self.lora_down) {
            v.push(("d_down_lora_a", vec![e * l.rank, i], da));
            v.push(("d_down_lora_b", vec![h, e * l.rank], db));
        }
        v
    }

    /// As [`Projection::host_bytes`], for the block (both projections and the SwiGLU between).
    fn host_bytes(&self, cpu: bool) -> Option<u128> {
        let (e, h, i) = (self.experts, self.hidden, self.inter);
        let (t, s) = (self.routed.tokens, self.routed.slots());
        let rank = |l: &Option<Lora>| l.as_ref().map_or(0, |l| l.rank);
        let loras = sum_bytes(&[
            tensor_bytes(&[e, rank(&self.lora_gate_up), h + 2 * i], 1),
            tensor_bytes(&[e, rank(&self.lora_down), i + h], 1),
        ]);
        let outputs = sum_bytes(&[
            tensor_bytes(&[t, h], 2), // out, d_x
            tensor_bytes(&[s], 1),
            loras,
        ]);
        let written = outputs.and_then(|o| o.checked_mul(4 + 2 + 2));
        if !cpu {
            return written;
        }
        let weights = tensor_bytes(&[e, 3 * i, h], 1);
        sum_bytes(&[
            written,
            weights.and_then(|w| w.checked_mul(4 + 8)), // f32, then f64
            sum_bytes(&[tensor_bytes(&[t, h], 2), loras]).and_then(|b| b.checked_mul(8)),
            // Per projection, forward and backward: outputs, gradients and their copies.
            tensor_bytes(&[s, 2 * i + i + h], 8 * 4),
        ])
    }

    /// As [`Projection::device_bytes`], for the block.
    fn device_bytes(&self, strategy: RunStrategy) -> Option<u128> {
        let (e, h, i) = (self.experts, self.hidden, self.inter);
        let (t, s) = (self.routed.tokens, self.routed.slots());
        let rank = |l: &Option<Lora>| l.as_ref().map_or(0, |l| l.rank);
        sum_bytes(&[
            device_weight_bytes(&self.gate_up, strategy),
            device_weight_bytes(&self.down, strategy),
            tensor_bytes(&[t, h], 2 * 3),
            tensor_bytes(&[s, 2 * i + i + h + h], 2 * 3),
            tensor_bytes(&[e, rank(&self.lora_gate_up), h + 2 * i], 2 * 3),
            tensor_bytes(&[e, rank(&self.lora_down), i + h], 2 * 3),
            tensor_bytes(&[s], 16),
        ])
    }

    fn size_label(&self) -> String {
        format!(
            "out [{}, {}] from T = {}, k = {}, gate_up [{}, {}, {}], down [{}, {}, {}]",
            self.routed.tokens,
            self.hidden,
            self.routed.tokens,
            self.routed.top_k,
            self.experts,
            2 * self.inter,
            self.hidden,
            self.experts,
            self.hidden,
            self.inter
        )
    }

    /// The CPU reference ([`Rounding::Bf16`]).
    fn cpu(&self) -> anyhow::Result<Vec<Output>> {
        let routing = self.routed.reference(self.experts)?;
        let (gu, dn) = (self.gate_up.to_f32(), self.down.to_f32());
        let p = MoeProblem {
            x: &self.x,
            num_experts: self.experts,
            hidden: self.hidden,
            intermediate: self.inter,
            gate_up: &gu,
            down: &dn,
            lora_gate_up: self.lora_gate_up.as_ref().map(Lora::reference),
            lora_down: self.lora_down.as_ref().map(Lora::reference),
            gates: &self.gates,
            limit: self.limit,
        };
        let Some(dy) = &self.dy else {
            let fwd = moe_forward(&p, &routing, Rounding::Bf16)
                .context("the CPU reference forward failed")?;
            return Ok(self.outputs(fwd.y, None, None, None, None));
        };
        let (fwd, g) = moe_forward_backward(&p, &routing, dy, Rounding::Bf16)
            .context("the CPU reference failed")?;
        Ok(self.outputs(
            fwd.y,
            Some(g.dx),
            g.gate_up.map(|l| (l.da, l.db)),
            g.down.map(|l| (l.da, l.db)),
            Some(g.d_gates),
        ))
    }

    /// [`mxmoe::moe`] on the device; returns the outputs and the paths that ran.
    fn gpu(&self, gpu: &Runtime, strategy: RunStrategy) -> anyhow::Result<(Vec<Output>, String)> {
        let (e, h, i) = (self.experts, self.hidden, self.inter);
        let (t, top_k) = (self.routed.tokens, self.routed.top_k);
        let gate_up = DeviceWeights::upload(gpu, &self.gate_up, strategy, "gate_up_proj")?;
        let down = DeviceWeights::upload(gpu, &self.down, strategy, "down_proj")?;
        let routing = self.routed.device(gpu, e)?;
        let x = Bf16Matrix::from_f32(gpu, &self.x, t, h).context("could not upload x")?;
        let gates = Bf16Matrix::from_f32(gpu, &self.gates, t, top_k)
            .context("could not upload the gates")?;
        let lora_gate_up = upload_lora(gpu, self.lora_gate_up.as_ref(), e, h, 2 * i, "gate/up")?;
        let lora_down = upload_lora(gpu, self.lora_down.as_ref(), e, i, h, "down")?;
        let block = MoeBlock {
            gate_up: gate_up.as_op(),
            down: down.as_op(),
            lora_gate_up: lora_gate_up.as_ref(),
            lora_down: lora_down.as_ref(),
            limit: self.limit,
            strategy: strategy.op(),
        };
        let (y, saved) = block
            .forward(gpu, &x, &routing, &gates)
            .context("the block forward failed")?;
        let (s_up, s_down) = saved.strategies();
        let ran = format!("gate_up {}, down {}", gate_up.ran(s_up), down.ran(s_down));
        let out = download(gpu, &y, "the output")?;
        let Some(dy) = &self.dy else {
            return Ok((self.outputs(out, None, None, None, None), ran));
        };
        let dy = Bf16Matrix::from_f32(gpu, dy, t, h).context("could not upload dy")?;
        let g = moe::backward(gpu, &saved, &dy).context("the block backward failed")?;
        let pair = |l: &Option<moe::LoraGrads>,
                    what: &str|
         -> anyhow::Result<Option<(Vec<f32>, Vec<f32>)>> {
            l.as_ref()
                .map(|l| Ok((download(gpu, &l.da, what)?, download(gpu, &l.db, what)?)))
                .transpose()
        };
        let mut d_gates = download(gpu, &g.d_gates, "d_gates")?;
        for slot in self.routed.dropped() {
            d_gates[slot] = 0.0;
        }
        Ok((
            self.outputs(
                out,
                Some(download(gpu, &g.dx, "d_x")?),
                pair(&g.gate_up, "the gate/up LoRA gradients")?,
                pair(&g.down, "the down LoRA gradients")?,
                Some(d_gates),
            ),
            ran,
        ))
    }

    fn describe(&self) -> String {
        let rank = |l: &Option<Lora>| l.as_ref().map_or(0, |l| l.rank);
        format!(
            "one MoE block: gate_up {}, down {}, T = {}, k = {}, LoRA ranks {}/{}{}{}",
            self.gate_up.describe(),
            self.down.describe(),
            self.routed.tokens,
            self.routed.top_k,
            rank(&self.lora_gate_up),
            rank(&self.lora_down),
            self.limit.map_or(String::new(), |l| format!(", limit {l}")),
            if self.dy.is_some() {
                ""
            } else {
                ", forward only (no dy)"
            },
        )
    }
}

// ---------------------------------------------------------------------------------------------

/// What [`execute`] did, for the summary.
pub struct RunReport {
    /// One line on where the call ran.
    pub backend: String,
    /// The tensors written, with shapes.
    pub written: Vec<(String, Vec<usize>)>,
    /// One line on the problem.
    pub problem: String,
    /// Tensors of the input file that the call did not read (as stored, unescaped).
    pub unused: Vec<String>,
}

/// The loaded call, in either mode.
enum Call {
    Projection(Projection),
    Block(Block),
}

/// Runs one call on the bytes of an input file and returns the bytes of the output file.
///
/// Before choosing a backend it checks what every backend needs: the inputs (as the file format
/// says), the N/K rule of [`ExpertLinear::check_dims`] for every projection, and the host memory
/// the call will allocate; on the GPU also the free device memory. MXFP4 scale byte 255 is
/// refused unless `options.allow_nan_scales`.
pub fn execute(input: &[u8], options: &RunOptions) -> anyhow::Result<(Vec<u8>, RunReport)> {
    let ck = Checkpoint::parse(input)
        .context("could not parse the input file")?
        .allow_nan_scales(options.allow_nan_scales);
    let (call, mut read) = match ck.metadata_value("mode") {
        None | Some("projection") => {
            let p = Projection::load(&ck, &options.weight)?;
            check_strategy(&p.weights, &options.weight, options.strategy)?;
            check_dims("the projection", p.n, p.k)?;
            let read = weight_tensors(&ck, &options.weight, &p.weights);
            (Call::Projection(p), read)
        }
        Some("block") => {
            let b = Block::load(&ck)?;
            check_strategy(&b.gate_up, "gate_up_proj", options.strategy)?;
            check_strategy(&b.down, "down_proj", options.strategy)?;
            check_dims("the gate/up projection", 2 * b.inter, b.hidden)?;
            check_dims("the down projection", b.hidden, b.inter)?;
            let mut read = weight_tensors(&ck, "gate_up_proj", &b.gate_up);
            read.extend(weight_tensors(&ck, "down_proj", &b.down));
            (Call::Block(b), read)
        }
        Some(other) => bail!(
            "metadata `mode` is `{}`, expected `projection` or `block`",
            escape(other)
        ),
    };
    let inputs: &[&str] = match &call {
        Call::Projection(_) => &["expert_ids", "x", "lora_a", "lora_b", "gates", "dy"],
        Call::Block(_) => &[
            "expert_ids",
            "x",
            "gates",
            "dy",
            "gate_up_lora_a",
            "gate_up_lora_b",
            "down_lora_a",
            "down_lora_b",
        ],
    };
    read.extend(inputs.iter().map(|n| n.to_string()));
    let unused: Vec<String> = ck
        .names()
        .into_iter()
        .filter(|n| !read.iter().any(|r| r == n))
        .map(str::to_string)
        .collect();

    let gpu = if options.force_cpu {
        Err("--cpu was given".to_string())
    } else {
        open_gpu(options.device)?.map_err(|no| no.to_string())
    };
    let (label, host_bytes) = match &call {
        Call::Projection(p) => (p.size_label(), p.host_bytes(gpu.is_err())),
        Call::Block(b) => (b.size_label(), b.host_bytes(gpu.is_err())),
    };
    check_host_memory(
        format!(
            "the {} ({label})",
            if gpu.is_err() {
                "CPU reference"
            } else {
                "results"
            }
        ),
        host_bytes,
    )?;
    let (outputs, backend, strategy_ran, device) = match gpu {
        Ok(gpu) => {
            let device_bytes = match &call {
                Call::Projection(p) => p.device_bytes(options.strategy),
                Call::Block(b) => b.device_bytes(options.strategy),
            };
            check_device_memory(&gpu, &format!("the device buffers ({label})"), device_bytes)?;
            let (outputs, ran) = match &call {
                Call::Projection(p) => p.gpu(&gpu, options.strategy)?,
                Call::Block(b) => b.gpu(&gpu, options.strategy)?,
            };
            let name = gpu.limits().name.clone();
            let line = format!(
                "computed on cuda:{} ({name}), strategy {ran}",
                gpu.ordinal()
            );
            (outputs, line, ran, name)
        }
        Err(why) => {
            let outputs = match &call {
                Call::Projection(p) => p.cpu()?,
                Call::Block(b) => b.cpu()?,
            };
            let line = format!(
                "computed with the CPU reference ({why}; bf16 rounding at the kernels' points, strategy ignored)"
            );
            (outputs, line, "reference".to_string(), "cpu".to_string())
        }
    };

    let mut out = CheckpointWriter::new();
    for (k, v) in ck.metadata() {
        out.set_metadata(k.clone(), v.clone());
    }
    let mut written = Vec::new();
    for (name, shape, values) in outputs {
        out.add_bf16_from_f32(name, &shape, &values)
            .with_context(|| format!("could not store `{name}`"))?;
        written.push((name.to_string(), shape));
    }
    let (mode, weights, problem) = match &call {
        Call::Projection(p) => ("projection", p.weights.describe(), p.describe()),
        Call::Block(b) => (
            "block",
            format!(
                "gate_up {}, down {}",
                b.gate_up.describe(),
                b.down.describe()
            ),
            b.describe(),
        ),
    };
    let backend_key = if device == "cpu" {
        "cpu-reference"
    } else {
        "gpu"
    };
    out.set_metadata("mxmoe.mode", mode);
    out.set_metadata("mxmoe.backend", backend_key);
    out.set_metadata("mxmoe.strategy", strategy_ran);
    out.set_metadata("mxmoe.weights", weights);
    out.set_metadata("mxmoe.device", device);
    out.set_metadata("mxmoe.version", env!("CARGO_PKG_VERSION"));
    let bytes = out
        .to_bytes()
        .context("could not serialize the output file")?;
    Ok((
        bytes,
        RunReport {
            backend,
            written,
            problem,
            unused,
        },
    ))
}

/// Reads the input file, runs the call and writes the output file.
pub fn run(args: &RunArgs) -> anyhow::Result<()> {
    if args.out == args.inputs || same_file(&args.out, &args.inputs) {
        bail!(
            "--out {} is the --inputs file; write the results to another file (the input would be replaced)",
            args.out.display()
        );
    }
    let input = std::fs::read(&args.inputs)
        .with_context(|| format!("could not read {}", args.inputs.display()))?;
    let options = RunOptions {
        strategy: args.strategy,
        device: args.device,
        force_cpu: args.cpu,
        weight: args.weight.clone(),
        allow_nan_scales: args.allow_nan_scales,
    };
    let (bytes, report) = execute(&input, &options)
        .with_context(|| format!("could not run {}", args.inputs.display()))?;
    if !report.unused.is_empty() {
        let names: Vec<String> = report
            .unused
            .iter()
            .map(|n| format!("`{}`", escape(n)))
            .collect();
        eprintln!(
            "warning: the call did not read {} tensor(s) of {}: {} (misnamed? see `mxmoe run --help` for the names it reads)",
            names.len(),
            args.inputs.display(),
            names.join(", ")
        );
    }
    write_atomic(&args.out, &bytes)?;
    println!("{}", report.problem);
    println!("{}", report.backend);
    let list: Vec<String> = report
        .written
        .iter()
        .map(|(n, s)| format!("{n} {s:?}"))
        .collect();
    println!("wrote {}: {}", args.out.display(), list.join(", "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mxmoe::checkpoint::MxLayoutKind;
    use mxmoe::mxfp4::{dequantize_f32, quantize_mxfp4_bf16};
    use mxmoe::reference::moe::RefLora;
    use mxmoe::shared::bf16::{f32_to_bf16_bits, round_bf16};

    /// Deterministic values in `[-scale, scale)`, rounded to bf16.
    fn values(len: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                round_bf16(((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale)
            })
            .collect()
    }

    /// One test problem, held as the values the file will hold.
    struct Case {
        e: usize,
        n: usize,
        k: usize,
        t: usize,
        top_k: usize,
        r: usize,
        ids: Vec<i64>,
        input: RowOrder,
        output: RowOrder,
        gates: bool,
        w: Vec<f32>,
    }

    impl Case {
        fn new(input: RowOrder, output: RowOrder, gates: bool) -> Self {
            let (e, n, k, t, top_k, r) = (4, 32, 64, 5, 2, 3);
            // Expert 3 gets no rows; token 2's second slot is dropped.
            let ids = vec![0, 1, 2, 0, 1, -1, 2, 1, 0, 2];
            Case {
                e,
                n,
                k,
                t,
                top_k,
                r,
                ids,
                input,
                output,
                gates,
                w: values(e * n * k, 1, 0.5),
            }
        }

        fn x_rows(&self) -> usize {
            match self.input {
                RowOrder::Scattered => self.t,
                RowOrder::Grouped => self.t * self.top_k,
            }
        }

        fn out_rows(&self) -> usize {
            if self.gates {
                self.t
            } else {
                self.t * self.top_k
            }
        }

        /// The input file; `weights` adds the weight tensors.
        fn file(&self, weights: impl FnOnce(&mut CheckpointWriter)) -> Vec<u8> {
            let mut f = CheckpointWriter::new();
            weights(&mut f);
            f.add_i32(
                "expert_ids",
                &[self.t, self.top_k],
                &self.ids.iter().map(|&v| v as i32).collect::<Vec<_>>(),
            )
            .unwrap();
            f.add_bf16_from_f32(
                "x",
                &[self.x_rows(), self.k],
                &values(self.x_rows() * self.k, 2, 1.0),
            )
            .unwrap();
            f.add_bf16_from_f32(
                "lora_a",
                &[self.e * self.r, self.k],
                &values(self.e * self.r * self.k, 3, 0.2),
            )
            .unwrap();
            f.add_f32(
                "lora_b",
                &[self.n, self.e * self.r],
                &values(self.n * self.e * self.r, 4, 0.2),
            )
            .unwrap();
            if self.gates {
                f.add_bf16_from_f32(
                    "gates",
                    &[self.t, self.top_k],
                    &values(self.t * self.top_k, 5, 1.0),
                )
                .unwrap();
            }
            f.add_bf16_from_f32(
                "dy",
                &[self.out_rows(), self.n],
                &values(self.out_rows() * self.n, 6, 1.0),
            )
            .unwrap();
            f.set_metadata("scaling", "0.75");
            f.set_metadata("input_order", order_name(self.input));
            f.set_metadata("output_order", order_name(self.output));
            f.to_bytes().unwrap()
        }

        /// The reference called directly on dense weights `w`, outputs bf16-rounded into the
        /// file layout: (name, values).
        fn expected(&self, w: &[f32]) -> Vec<(&'static str, Vec<u16>)> {
            let routing =
                reference::flatten_sort_count(&self.ids, self.t, self.top_k, self.e).unwrap();
            let valid = routing.num_rows();
            let x = values(self.x_rows() * self.k, 2, 1.0);
            let (a, b) = (
                values(self.e * self.r * self.k, 3, 0.2),
                values(self.n * self.e * self.r, 4, 0.2),
            );
            let gates = values(self.t * self.top_k, 5, 1.0);
            let dy = values(self.out_rows() * self.n, 6, 1.0);
            let grouped_in = self.input == RowOrder::Grouped;
            let p = LinearProblem {
                x: if grouped_in { &x[..valid * self.k] } else { &x },
                x_rows: if grouped_in { valid } else { self.t },
                w,
                num_experts: self.e,
                n: self.n,
                k: self.k,
                lora_a: &a,
                lora_b: &b,
                rank: self.r,
                scaling: 0.75,
                fan_out: if grouped_in { 1 } else { self.top_k },
                input_order: self.input,
                output_order: self.output,
                gates: self.gates.then_some(&gates[..]),
            };
            let fwd = reference::linear_forward(&p, &routing, Rounding::Bf16).unwrap();
            let grouped_out = !self.gates && self.output == RowOrder::Grouped;
            let dy_ref = if grouped_out {
                &dy[..valid * self.n]
            } else {
                &dy[..]
            };
            let g = reference::linear_backward(&p, &routing, dy_ref, Rounding::Bf16).unwrap();
            let bits = |v: Vec<f32>, len: usize| {
                let mut b: Vec<u16> = v.iter().map(|&x| f32_to_bf16_bits(x)).collect();
                b.resize(len, 0);
                b
            };
            let mut want = vec![
                (
                    "out",
                    bits(fwd.y.unwrap_or(fwd.out), self.out_rows() * self.n),
                ),
                ("d_x", bits(g.dx, self.x_rows() * self.k)),
                ("d_lora_a", bits(g.da, self.e * self.r * self.k)),
                ("d_lora_b", bits(g.db, self.n * self.e * self.r)),
            ];
            if let Some(dg) = g.d_gates {
                want.push(("d_gates", bits(dg, self.t * self.top_k)));
            }
            want
        }
    }

    fn cpu() -> RunOptions {
        RunOptions {
            strategy: RunStrategy::Auto,
            device: None,
            force_cpu: true,
            weight: "w".into(),
            allow_nan_scales: false,
        }
    }

    fn check_outputs(bytes: &[u8], want: &[(&'static str, Vec<u16>)]) {
        let ck = Checkpoint::parse(bytes).unwrap();
        let names: Vec<&str> = want.iter().map(|(n, _)| *n).collect();
        let mut have = ck.names();
        have.sort_by_key(|n| names.iter().position(|m| m == n));
        assert_eq!(have, names);
        for (name, bits) in want {
            let got = ck.read_bf16(name).unwrap();
            assert_eq!(&got.data, bits, "tensor {name}");
        }
        assert_eq!(ck.metadata_value("mxmoe.backend"), Some("cpu-reference"));
    }

    #[test]
    fn cpu_run_matches_the_reference_called_directly() {
        let cases = [
            Case::new(RowOrder::Scattered, RowOrder::Grouped, false),
            Case::new(RowOrder::Grouped, RowOrder::Scattered, true),
            Case::new(RowOrder::Grouped, RowOrder::Grouped, false),
            Case::new(RowOrder::Scattered, RowOrder::Scattered, false),
        ];
        for case in cases {
            // Dense bf16 weights.
            let file = case.file(|f| {
                f.add_bf16_from_f32("w", &[case.e, case.n, case.k], &case.w)
                    .unwrap()
            });
            let (bytes, report) = execute(&file, &cpu()).unwrap();
            assert!(
                report.backend.contains("CPU reference"),
                "{}",
                report.backend
            );
            check_outputs(&bytes, &case.expected(&case.w));

            // MXFP4 weights in both layouts: the reference on the dequantized weights.
            let bits: Vec<u16> = case.w.iter().map(|&v| f32_to_bf16_bits(v)).collect();
            let mx = quantize_mxfp4_bf16(&bits, case.e, case.n, case.k).unwrap();
            let want = case.expected(&dequantize_f32(&mx));
            for layout in MxLayoutKind::ALL {
                let file = case.file(|f| f.add_mx("w", &mx, layout).unwrap());
                let (bytes, _) = execute(
                    &file,
                    &RunOptions {
                        strategy: RunStrategy::Fused,
                        ..cpu()
                    },
                )
                .unwrap();
                check_outputs(&bytes, &want);
            }
        }
    }

    #[test]
    fn run_without_dy_or_lora_writes_the_forward_only() {
        let case = Case::new(RowOrder::Scattered, RowOrder::Scattered, false);
        let mut f = CheckpointWriter::new();
        f.add_bf16_from_f32("w", &[case.e, case.n, case.k], &case.w)
            .unwrap();
        f.add_i64("expert_ids", &[case.t, case.top_k], &case.ids)
            .unwrap();
        f.add_f32(
            "x",
            &[case.t * case.top_k, case.k],
            &values(case.t * case.top_k * case.k, 2, 1.0),
        )
        .unwrap();
        let (bytes, report) = execute(&f.to_bytes().unwrap(), &cpu()).unwrap();
        assert!(report.problem.contains("forward only"));
        let ck = Checkpoint::parse(&bytes).unwrap();
        assert_eq!(ck.names(), ["out"]);
        let out = ck.read_bf16("out").unwrap();
        assert_eq!(out.shape, [case.t * case.top_k, case.n]);
        // The dropped slot's row is zero.
        assert!(out.data[5 * case.n..6 * case.n].iter().all(|&b| b == 0));
    }

    #[test]
    fn bad_inputs_give_one_sentence_naming_the_problem() {
        let case = Case::new(RowOrder::Scattered, RowOrder::Scattered, true);
        let dense = |f: &mut CheckpointWriter| {
            f.add_bf16_from_f32("w", &[case.e, case.n, case.k], &case.w)
                .unwrap()
        };
        let good = case.file(dense);
        let fails = |bytes: &[u8], options: &RunOptions, needle: &str| {
            let e = execute(bytes, options).err().expect("expected an error");
            let msg = format!("{e:#}");
            assert!(msg.contains(needle), "`{needle}` not in: {msg}");
        };
        // Dense weights cannot run an MXFP4 strategy.
        fails(
            &good,
            &RunOptions {
                strategy: RunStrategy::Selective,
                ..cpu()
            },
            "needs MXFP4 weights",
        );
        // A missing weight names what was looked for.
        fails(
            &good,
            &RunOptions {
                weight: "v".into(),
                ..cpu()
            },
            "`v.packed`",
        );

        let edit = |drop: &str, f: &dyn Fn(&mut CheckpointWriter)| {
            let ck = Checkpoint::parse(&good).unwrap();
            let mut out = CheckpointWriter::new();
            for name in ck.names() {
                if name != drop {
                    out.add_view(name, &ck.view(name).unwrap()).unwrap();
                }
            }
            for (k, v) in ck.metadata() {
                if k != drop {
                    out.set_metadata(k.clone(), v.clone());
                }
            }
            f(&mut out);
            out.to_bytes().unwrap()
        };
        let none = |_: &mut CheckpointWriter| {};
        fails(&edit("x", &none), &cpu(), "`x` is not in the file");
        fails(&edit("lora_b", &none), &cpu(), "`lora_b` is missing");
        fails(&edit("scaling", &none), &cpu(), "metadata `scaling`");
        fails(
            &edit("output_order", &|f| {
                f.set_metadata("output_order", "grouped")
            }),
            &cpu(),
            "`gates` need output_order = scattered",
        );
        fails(
            &edit("input_order", &|f| f.set_metadata("input_order", "sorted")),
            &cpu(),
            "`input_order`",
        );
        fails(
            &edit("dy", &|f| {
                f.add_bf16_from_f32("dy", &[10, 32], &[0.0; 320]).unwrap()
            }),
            &cpu(),
            "`dy`",
        );
        fails(
            &edit("expert_ids", &|f| {
                f.add_i64("expert_ids", &[5, 2], &[0, 1, 2, 0, 1, 4, 2, 1, 0, 2])
                    .unwrap()
            }),
            &cpu(),
            "expert 4",
        );
        fails(
            &edit("expert_ids", &|f| {
                f.add_f32("expert_ids", &[5, 2], &[0.0; 10]).unwrap()
            }),
            &cpu(),
            "`expert_ids` is F32",
        );
        fails(
            &edit("x", &|f| {
                f.add_bf16_from_f32("x", &[5, 48], &[0.0; 240]).unwrap()
            }),
            &cpu(),
            "`x` has 48 columns",
        );
        fails(&good[..good.len() - 7], &cpu(), "`x`");
    }

    /// A block-mode input file: `gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]` (dense, or
    /// quantized in `layout`), LoRA on both projections with different scalings, a clamp limit,
    /// a dropped slot; and the reference block called directly on the same values.
    fn block_case(layout: Option<MxLayoutKind>) -> (Vec<u8>, Vec<(&'static str, Vec<u16>)>) {
        let (e, h, i, t, top_k, r) = (4, 64, 32, 5, 2, 2);
        let ids: Vec<i64> = vec![0, 1, 2, 0, 1, -1, 2, 1, 0, 3];
        let gu = values(e * 2 * i * h, 11, 0.3);
        let dn = values(e * h * i, 12, 0.3);
        let x = values(t * h, 13, 1.0);
        let gates = values(t * top_k, 14, 1.0);
        let dy = values(t * h, 15, 1.0);
        let (gua, gub) = (values(e * r * h, 16, 0.2), values(2 * i * e * r, 17, 0.2));
        let (dna, dnb) = (values(e * r * i, 18, 0.2), values(h * e * r, 19, 0.2));
        let mut f = CheckpointWriter::new();
        let (gu_ref, dn_ref) = match layout {
            None => {
                f.add_bf16_from_f32("gate_up_proj", &[e, 2 * i, h], &gu)
                    .unwrap();
                f.add_f32("down_proj", &[e, h, i], &dn).unwrap();
                (gu.clone(), dn.clone())
            }
            Some(layout) => {
                let q = |v: &[f32], n: usize, k: usize| {
                    let bits: Vec<u16> = v.iter().map(|&x| f32_to_bf16_bits(x)).collect();
                    quantize_mxfp4_bf16(&bits, e, n, k).unwrap()
                };
                let (qgu, qdn) = (q(&gu, 2 * i, h), q(&dn, h, i));
                f.add_mx("gate_up_proj", &qgu, layout).unwrap();
                f.add_mx("down_proj", &qdn, layout).unwrap();
                (dequantize_f32(&qgu), dequantize_f32(&qdn))
            }
        };
        f.add_i64("expert_ids", &[t, top_k], &ids).unwrap();
        f.add_bf16_from_f32("x", &[t, h], &x).unwrap();
        f.add_bf16_from_f32("gates", &[t, top_k], &gates).unwrap();
        f.add_bf16_from_f32("dy", &[t, h], &dy).unwrap();
        f.add_bf16_from_f32("gate_up_lora_a", &[e * r, h], &gua)
            .unwrap();
        f.add_bf16_from_f32("gate_up_lora_b", &[2 * i, e * r], &gub)
            .unwrap();
        f.add_bf16_from_f32("down_lora_a", &[e * r, i], &dna)
            .unwrap();
        f.add_bf16_from_f32("down_lora_b", &[h, e * r], &dnb)
            .unwrap();
        f.set_metadata("mode", "block");
        f.set_metadata("scaling", "0.5");
        f.set_metadata("down_scaling", "1.5");
        f.set_metadata("limit", "0.75");

        let routing = reference::flatten_sort_count(&ids, t, top_k, e).unwrap();
        let p = MoeProblem {
            x: &x,
            num_experts: e,
            hidden: h,
            intermediate: i,
            gate_up: &gu_ref,
            down: &dn_ref,
            lora_gate_up: Some(RefLora {
                a: &gua,
                b: &gub,
                rank: r,
                scaling: 0.5,
            }),
            lora_down: Some(RefLora {
                a: &dna,
                b: &dnb,
                rank: r,
                scaling: 1.5,
            }),
            gates: &gates,
            limit: Some(0.75),
        };
        let (fwd, g) = moe_forward_backward(&p, &routing, &dy, Rounding::Bf16).unwrap();
        let bits = |v: Vec<f32>| v.iter().map(|&x| f32_to_bf16_bits(x)).collect::<Vec<u16>>();
        let (gul, dnl) = (g.gate_up.unwrap(), g.down.unwrap());
        let want = vec![
            ("out", bits(fwd.y)),
            ("d_x", bits(g.dx)),
            ("d_gates", bits(g.d_gates)),
            ("d_gate_up_lora_a", bits(gul.da)),
            ("d_gate_up_lora_b", bits(gul.db)),
            ("d_down_lora_a", bits(dnl.da)),
            ("d_down_lora_b", bits(dnl.db)),
        ];
        (f.to_bytes().unwrap(), want)
    }

    #[test]
    fn cpu_block_run_matches_the_reference_block() {
        for layout in [
            None,
            Some(MxLayoutKind::Torchao),
            Some(MxLayoutKind::GptOss),
        ] {
            let (file, want) = block_case(layout);
            let (bytes, report) = execute(&file, &cpu()).unwrap();
            assert!(report.problem.contains("MoE block"), "{}", report.problem);
            check_outputs(&bytes, &want);
            let ck = Checkpoint::parse(&bytes).unwrap();
            assert_eq!(ck.metadata_value("mxmoe.mode"), Some("block"));
        }
    }

    #[test]
    fn bad_block_inputs_name_the_tensor() {
        let (good, _) = block_case(None);
        let ck = Checkpoint::parse(&good).unwrap();
        let without = |drop: &str| {
            let mut out = CheckpointWriter::new();
            for name in ck.names() {
                if name != drop {
                    out.add_view(name, &ck.view(name).unwrap()).unwrap();
                }
            }
            for (k, v) in ck.metadata() {
                if k != drop {
                    out.set_metadata(k.clone(), v.clone());
                }
            }
            out.to_bytes().unwrap()
        };
        for (drop, needle) in [
            ("gates", "`gates` is not in the file"),
            ("down_proj", "`down_proj.packed`"),
            ("down_lora_b", "`down_lora_b` is missing"),
        ] {
            let msg = format!("{:#}", execute(&without(drop), &cpu()).err().unwrap());
            assert!(msg.contains(needle), "`{needle}` not in: {msg}");
        }
        let msg = format!(
            "{:#}",
            execute(
                &good,
                &RunOptions {
                    strategy: RunStrategy::Fused,
                    ..cpu()
                }
            )
            .err()
            .unwrap()
        );
        assert!(msg.contains("`gate_up_proj` is dense"), "{msg}");
    }

    /// `mxmoe quantize` then `mxmoe run` through real files: the run on the quantized file equals
    /// the reference on the dequantized weights, and the other tensors survive quantization.
    #[test]
    fn quantize_then_run_round_trip_through_files() {
        use crate::quantize::{LayoutArg, QuantizeArgs};
        let dir = std::env::temp_dir().join(format!("mxmoe-run-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let case = Case::new(RowOrder::Scattered, RowOrder::Grouped, false);
        let raw = dir.join("raw.safetensors");
        std::fs::write(
            &raw,
            case.file(|f| {
                f.add_bf16_from_f32("w", &[case.e, case.n, case.k], &case.w)
                    .unwrap()
            }),
        )
        .unwrap();
        let bits: Vec<u16> = case.w.iter().map(|&v| f32_to_bf16_bits(v)).collect();
        let want = case.expected(&dequantize_f32(
            &quantize_mxfp4_bf16(&bits, case.e, case.n, case.k).unwrap(),
        ));
        for layout in [LayoutArg::Torchao, LayoutArg::GptOss] {
            let quantized = dir.join("quantized.safetensors");
            crate::quantize::run(&QuantizeArgs {
                input: raw.clone(),
                output: quantized.clone(),
                layout,
                tensors: None,
            })
            .unwrap();
            let q_bytes = std::fs::read(&quantized).unwrap();
            let q = Checkpoint::parse(&q_bytes).unwrap();
            assert!(!q.contains("w"));
            assert_eq!(
                q.metadata_value("mxmoe.layout"),
                Some(MxLayoutKind::from(layout).name())
            );
            assert_eq!(q.metadata_value("scaling"), Some("0.75"));
            let out = dir.join("out.safetensors");
            run(&RunArgs {
                inputs: quantized.clone(),
                out: out.clone(),
                strategy: RunStrategy::Auto,
                device: None,
                cpu: true,
                weight: "w".into(),
                allow_nan_scales: false,
            })
            .unwrap();
            check_outputs(&std::fs::read(&out).unwrap(), &want);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
