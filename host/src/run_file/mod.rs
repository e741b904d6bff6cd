//! One operator call described by a safetensors file (the format of `mxmoe run`, documented in
//! [`FORMAT_HELP`]): parse it into a [`Problem`], run it on a [`Backend`] (a GPU through
//! [`Runtime`], or the CPU reference with [`Rounding::Bf16`]), and get the named outputs and
//! gradients with their metadata as a [`RunOutput`], which [`RunOutput::to_bytes`] serializes
//! with [`CheckpointWriter`].
//!
//! Two modes (metadata `mode`): `projection` (the default) runs one LoRA-fused expert linear
//! ([`crate::op::ExpertLinear`], [`projection`]); `block` runs the whole gated MoE MLP block
//! ([`crate::moe::MoeBlock`], [`block`]). Every check that does not depend on the backend (names,
//! dtypes, shapes, metadata, MXFP4 in either layout, the NaN-scale rule and its opt-in, the shape
//! rule of [`ExpertLinear::check_dims`]) runs in [`Problem::parse`]; the memory the call needs is
//! checked in [`Problem::run`] against the backend's memory before anything is allocated.
//!
//! The CLI (`mxmoe run`) and the Python package (`mxmoe.run_file`) are thin front ends over this
//! module: they choose the backend, print or raise, and write the file. Nothing here prints;
//! what a front end should tell the user besides the result is a [`Warning`].

mod block;
mod projection;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::Runtime;
use crate::checkpoint::{
    Checkpoint, CheckpointErrorKind, CheckpointWriter, META_VERSION, StoredWeights, escape,
};
use crate::device::Gpu;
use crate::error::{Error, Result};
use crate::mxfp4::dequantize_bf16;
use crate::nvfp4::dequantize_nvfp4_bf16;
use crate::op::{
    self, Bf16Matrix, DenseExperts, ExpertLinear, ExpertWeights, LoraWeights, MxExperts, NvExperts,
};
use crate::reference::moe::RefLora;
use crate::reference::{self, Rounding, check_host_memory, sum_bytes, tensor_bytes};
use crate::routing::{DeviceRouting, RowOrder};

use block::Block;
use projection::Projection;

/// The file format, as `mxmoe run --help` prints it (front ends add how they choose the backend
/// and write the output).
pub const FORMAT_HELP: &str = "\
Projection mode (the default; metadata mode = projection) computes, for each routed slot
(token t, slot j, expert e = expert_ids[t, j]), with bf16 rounding where the kernels round:
    y[t*k + j] = x_t W_e^T + s * round(x_t A_e^T) B_e^T
(W_e = w[e] is [N, K], A_e = lora_a rows e*r..e*r+r-1, B_e = lora_b columns e*r..e*r+r-1),
and its backward for the output gradient dy. The frozen weights get no gradient.
Input file, safetensors; T tokens, k = top_k, E experts, N outputs, K inputs, r = rank:
  expert_ids  I32 or I64 [T, k]   expert of each (token, slot); -1 marks a dropped slot
  x           BF16/F16/F32        [T, K] token order or [T*k, K] slot order (input_order = scattered),
                                  [T*k, K] grouped rows (input_order = grouped)
  w           BF16/F16/F32 [E, N, K] dense expert weights W_store, or MXFP4 as
              w.packed U8 [E, N, K/2] + w.scales U8 [E, N, K/32] (torchao; also w.qdata/w.scale), or
              w_blocks U8 [E, N, K/32, 16] + w_scales U8 [E, N, K/32] (gpt-oss), or NVFP4 as
              w.packed U8 [E, N, K/2] + w.scales F8_E4M3 [E, N, K/16] (+ optional
              w.tensor_scales F32 [E] or [E, G]); `fused` NVFP4 needs K % 32 == 0 (`auto` then takes A)
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
Output file, all BF16; the gradient of input NAME is d_NAME:
  out       [T, N] with gates, else [T*k, N] (slot order if output_order = scattered, else grouped)
  d_x       the shape of x            (present when dy is given; likewise below)
  d_lora_a  [E*r, K], d_lora_b [N, E*r]  (with LoRA)
  d_gates   [T, k]                    (with gates)

Block mode (metadata mode = block): the gated MoE MLP block, H hidden, I expert intermediate,
activation = swiglu (the default) or gpt_oss (metadata activation):
    z = gate_up(x) + gate_up_bias[e]          (2I values per slot; the bias is optional)
  swiglu:  gate = z[0..I], up = z[I..2I]       (the first I rows of each expert are the gates)
           h = silu(g) * u  with g = min(gate, limit), u = clamp(up, -limit, limit) when limit is
           given, else g = gate, u = up
  gpt_oss: gate = z[2i], up = z[2i+1]          (interleaved rows, gpt-oss's checkpoint order)
           h = (u + 1) * g * sigmoid(alpha * g), g = min(gate, limit), u = clamp(up, -limit, limit)
    out[t] = sum_j gates[t, j] * (down(h) + down_bias[e])[t*k + j]   (the gates scale the bias)
Each projection is the expert linear above (with its own LoRA). The rows of gate_up_proj, of
gate_up_bias and of gate_up_lora_b are in the activation's order (gpt_oss: interleaved, as the
checkpoint stores them; nothing is reordered). The biases are frozen: they get no gradient.
  expert_ids [T, k]; x [T, H]; gates [T, k] (required); dy [T, H] (optional)
  gate_up_proj [E, 2I, H] and down_proj [E, H, I], each dense or MXFP4 (names as for w)
  gate_up_bias [E, 2I], down_bias [E, H]   optional, BF16/F16/F32, with either activation
  gate_up_lora_a [E*r, H] + gate_up_lora_b [2I, E*r], down_lora_a [E*r, I] + down_lora_b [H, E*r]
  metadata: scaling (both LoRAs; gate_up_scaling / down_scaling override it)
            activation      swiglu (default) | gpt_oss
            limit           clamp limit, positive; swiglu: optional (no clamp without it),
                            gpt_oss: default 7.0
            alpha           gpt_oss only: the sigmoid's alpha, positive, default 1.702
            clamp_boundary  gpt_oss only: the clamps' gradient at exactly +-limit: strict
                            (default; zero there, current torch) | inclusive (passes, older torch)
  output: out [T, H], d_x [T, H], d_gates [T, k], d_gate_up_lora_a, d_gate_up_lora_b,
          d_down_lora_a, d_down_lora_b
Output metadata (both modes): mxmoe.mode, mxmoe.backend (gpu | cpu-reference), mxmoe.strategy,
mxmoe.weights, mxmoe.device, mxmoe.version, and the inputs' metadata; with activation = gpt_oss
also the values used, defaults filled in: mxmoe.activation, mxmoe.alpha, mxmoe.limit,
mxmoe.clamp_boundary.
Checks, on every backend alike: N and K of every projection positive multiples of 8 (MXFP4: K a
multiple of 32), LoRA rank 1 to 128, no MXFP4 scale byte 255 (NaN) unless NaN scales are allowed
(--allow-nan-scales), and every size the file implies must fit in the memory available (host RAM
for the CPU reference, free device memory for the GPU). Tensors that the call does not read are
listed in a warning.";

/// Output metadata key: `projection` or `block`.
pub const META_MODE: &str = "mxmoe.mode";
/// Output metadata key: `gpu` or `cpu-reference` ([`Ran::backend_name`]).
pub const META_BACKEND: &str = "mxmoe.backend";
/// Output metadata key: the path that multiplied the weights ([`Ran::strategy`]).
pub const META_STRATEGY: &str = "mxmoe.strategy";
/// Output metadata key: the weights as stored (`StoredWeights::describe`).
pub const META_WEIGHTS: &str = "mxmoe.weights";
/// Output metadata key: the device's name, or `cpu`.
pub const META_DEVICE: &str = "mxmoe.device";
/// Output metadata key (block mode with `activation = gpt_oss`): `gpt_oss`.
pub const META_ACTIVATION: &str = "mxmoe.activation";
/// Output metadata key (block mode with `activation = gpt_oss`): the `alpha` used.
pub const META_ALPHA: &str = "mxmoe.alpha";
/// Output metadata key (block mode with `activation = gpt_oss`): the clamp `limit` used.
pub const META_LIMIT: &str = "mxmoe.limit";
/// Output metadata key (block mode with `activation = gpt_oss`): the `clamp_boundary` used.
pub const META_CLAMP_BOUNDARY: &str = "mxmoe.clamp_boundary";

/// How the weights are multiplied (GPU only; the CPU reference computes the same math for all).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RunStrategy {
    /// MXFP4 weights: the library's per-call choice ([`op::Strategy::Auto`]); dense weights: bf16.
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
    /// Every strategy with its name.
    pub const NAMES: [(&'static str, RunStrategy); 4] = [
        ("auto", RunStrategy::Auto),
        ("fused", RunStrategy::Fused),
        ("selective", RunStrategy::Selective),
        ("bf16", RunStrategy::Bf16),
    ];

    /// The name (`auto`, `fused`, `selective`, `bf16`).
    pub const fn name(self) -> &'static str {
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

impl fmt::Display for RunStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for RunStrategy {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        crate::error::parse_name("strategy", s, &Self::NAMES)
    }
}

/// What a file is read with, independent of the backend.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// How the weights are multiplied on the GPU (ignored by the CPU reference, but `fused` and
    /// `selective` need MXFP4 weights on every backend).
    pub strategy: RunStrategy,
    /// Accept MXFP4 scale byte 255 (E8M0 NaN) and let NaN propagate, as torchao does. Default:
    /// such weights are refused, naming tensor, expert, row and block.
    pub allow_nan_scales: bool,
    /// Projection mode: the name of the expert weights: NAME (dense), NAME.packed + NAME.scales
    /// (torchao) or NAME_blocks + NAME_scales (gpt-oss).
    pub weight: String,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            strategy: RunStrategy::Auto,
            allow_nan_scales: false,
            weight: "w".into(),
        }
    }
}

/// Where [`Problem::run`] computes.
#[derive(Clone, Copy, Debug)]
pub enum Backend<'a> {
    /// The GPU kernels, through the library's ops.
    Gpu(&'a Runtime),
    /// The CPU reference with [`Rounding::Bf16`] (MXFP4 weights dequantized exactly).
    CpuReference,
}

/// Where a call ran.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ran {
    /// On a GPU.
    Gpu {
        /// The CUDA device ordinal.
        ordinal: usize,
        /// The device's name.
        device: String,
        /// The path that multiplied the weights: `bf16`, `fused`, `selective`, or for a block
        /// `gate_up <path>, down <path>`.
        strategy: String,
    },
    /// On the CPU reference.
    CpuReference,
}

impl Ran {
    /// `gpu` or `cpu-reference` (the output's `mxmoe.backend`).
    pub fn backend_name(&self) -> &'static str {
        match self {
            Ran::Gpu { .. } => "gpu",
            Ran::CpuReference => "cpu-reference",
        }
    }

    /// The path that multiplied the weights, `reference` on the CPU (`mxmoe.strategy`).
    pub fn strategy(&self) -> &str {
        match self {
            Ran::Gpu { strategy, .. } => strategy,
            Ran::CpuReference => "reference",
        }
    }

    /// The device's name, `cpu` on the CPU (`mxmoe.device`).
    pub fn device(&self) -> &str {
        match self {
            Ran::Gpu { device, .. } => device,
            Ran::CpuReference => "cpu",
        }
    }
}

/// Something a front end should tell the user; the call itself succeeded.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Warning {
    /// Tensors of the input file that the call does not read (names as stored, unescaped):
    /// often a misspelt optional input.
    UnreadTensors(Vec<String>),
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Warning::UnreadTensors(names) => {
                let quoted: Vec<String> =
                    names.iter().map(|n| format!("`{}`", escape(n))).collect();
                write!(
                    f,
                    "the call did not read {} tensor(s) of the input file: {} (misnamed?)",
                    names.len(),
                    quoted.join(", ")
                )
            }
        }
    }
}

/// The two kinds of call a file describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// One LoRA-fused expert linear.
    Projection,
    /// The gated MoE MLP block.
    Block,
}

impl Mode {
    /// `projection` or `block` (metadata `mode` and `mxmoe.mode`).
    pub const fn name(self) -> &'static str {
        match self {
            Mode::Projection => "projection",
            Mode::Block => "block",
        }
    }
}

/// One tensor of the result.
#[derive(Clone, Debug, PartialEq)]
pub struct OutputTensor {
    /// `out`, or `d_<input name>` for a gradient.
    pub name: &'static str,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Row-major values; every one is a bf16 value (the kernels store bf16, the reference rounds
    /// to it), so writing them as BF16 is exact.
    pub values: Vec<f32>,
}

/// The result of [`Problem::run`]: what the output file holds, and how it was computed.
#[derive(Clone, Debug)]
pub struct RunOutput {
    /// The outputs and gradients, in the order the file lists them.
    pub tensors: Vec<OutputTensor>,
    /// The output file's metadata: the inputs' metadata and the `mxmoe.*` keys
    /// ([`META_MODE`], [`META_BACKEND`], [`META_STRATEGY`], [`META_WEIGHTS`], [`META_DEVICE`],
    /// `mxmoe.version`; for a gpt-oss block also [`META_ACTIVATION`], [`META_ALPHA`],
    /// [`META_LIMIT`], [`META_CLAMP_BOUNDARY`]).
    pub metadata: BTreeMap<String, String>,
    /// Where it ran.
    pub ran: Ran,
    /// One line on the problem ([`Problem::describe`]).
    pub problem: String,
    /// What the front end should tell the user ([`Problem::warnings`]).
    pub warnings: Vec<Warning>,
}

impl RunOutput {
    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&OutputTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The output file, every tensor as BF16, with [`Self::metadata`].
    pub fn to_writer(&self) -> Result<CheckpointWriter> {
        let mut out = CheckpointWriter::new();
        for (k, v) in &self.metadata {
            out.set_metadata(k.clone(), v.clone());
        }
        for t in &self.tensors {
            out.add_bf16_from_f32(t.name, &t.shape, &t.values)?;
        }
        Ok(out)
    }

    /// The output file's bytes ([`Self::to_writer`]).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        self.to_writer()?.to_bytes()
    }
}

/// The loaded call, in either mode.
enum Call {
    Projection(Projection),
    Block(Block),
}

/// A validated call read from a file: every input, checked as [`FORMAT_HELP`] says.
pub struct Problem {
    call: Call,
    strategy: RunStrategy,
    metadata: BTreeMap<String, String>,
    warnings: Vec<Warning>,
}

impl fmt::Debug for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Problem")
            .field("problem", &self.describe())
            .field("strategy", &self.strategy)
            .finish_non_exhaustive()
    }
}

impl Problem {
    /// Parses the bytes of an input file ([`Checkpoint::parse`], then [`Self::from_checkpoint`]).
    pub fn parse(bytes: &[u8], options: &RunOptions) -> Result<Self> {
        Self::from_checkpoint(Checkpoint::parse(bytes)?, options)
    }

    /// Reads and checks everything the call needs, on every backend alike: the inputs (as
    /// [`FORMAT_HELP`] says), MXFP4 scale byte 255 (refused unless
    /// `options.allow_nan_scales`, which overrides the checkpoint's own setting), the strategy
    /// against the weights, and the N/K rule of [`ExpertLinear::check_dims`] for every
    /// projection. Errors are typed: [`Error::Checkpoint`] for the file (kind and the tensor or
    /// metadata key), [`Error::InvalidArgument`] for the rank, the strategy and the shape rule.
    pub fn from_checkpoint(ck: Checkpoint<'_>, options: &RunOptions) -> Result<Self> {
        let ck = ck.allow_nan_scales(options.allow_nan_scales);
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
            Some(other) => {
                return Err(file_error(
                    CheckpointErrorKind::Metadata,
                    format!(
                        "`mode` is `{}`, expected `projection` or `block`",
                        escape(other)
                    ),
                ));
            }
        };
        let inputs: &[&str] = match &call {
            Call::Projection(_) => projection::INPUTS,
            Call::Block(_) => block::INPUTS,
        };
        read.extend(inputs.iter().map(|n| n.to_string()));
        let unread: Vec<String> = ck
            .names()
            .into_iter()
            .filter(|n| !read.iter().any(|r| r == n))
            .map(str::to_string)
            .collect();
        let mut warnings = Vec::new();
        if !unread.is_empty() {
            warnings.push(Warning::UnreadTensors(unread));
        }
        Ok(Self {
            call,
            strategy: options.strategy,
            metadata: ck.metadata().clone(),
            warnings,
        })
    }

    /// Projection or block.
    pub fn mode(&self) -> Mode {
        match self.call {
            Call::Projection(_) => Mode::Projection,
            Call::Block(_) => Mode::Block,
        }
    }

    /// One line on the problem: mode, weights, T, k, LoRA ranks, orders, and "forward only" when
    /// the file has no `dy`.
    pub fn describe(&self) -> String {
        match &self.call {
            Call::Projection(p) => p.describe(),
            Call::Block(b) => b.describe(),
        }
    }

    /// What a front end should tell the user (tensors the call does not read).
    pub fn warnings(&self) -> &[Warning] {
        &self.warnings
    }

    /// Runs the call on `backend`. First checks, with checked arithmetic, that everything it
    /// allocates fits: host memory for the results (and, on the CPU reference, its `f64`
    /// working copies), free device memory for the device buffers ([`Error::OutOfMemory`],
    /// [`Error::SizeOverflow`], naming the output's shape). Dropped slots are zero in every
    /// output, whatever the device left there.
    pub fn run(&self, backend: Backend<'_>) -> Result<RunOutput> {
        let cpu = matches!(backend, Backend::CpuReference);
        let (label, host_bytes) = match &self.call {
            Call::Projection(p) => (p.size_label(), p.host_bytes(cpu)),
            Call::Block(b) => (b.size_label(), b.host_bytes(cpu)),
        };
        let what = if cpu { "CPU reference" } else { "results" };
        check_host_memory(format!("the {what} ({label})"), host_bytes)?;
        let (tensors, ran) = match backend {
            Backend::Gpu(rt) => {
                let device_bytes = match &self.call {
                    Call::Projection(p) => p.device_bytes(self.strategy),
                    Call::Block(b) => b.device_bytes(self.strategy),
                };
                rt.check_free_memory(format!("the device buffers ({label})"), device_bytes)?;
                let (tensors, strategy) = match &self.call {
                    Call::Projection(p) => p.gpu(rt, self.strategy)?,
                    Call::Block(b) => b.gpu(rt, self.strategy)?,
                };
                let ran = Ran::Gpu {
                    ordinal: rt.ordinal(),
                    device: rt.limits().name.clone(),
                    strategy,
                };
                (tensors, ran)
            }
            Backend::CpuReference => {
                let tensors = match &self.call {
                    Call::Projection(p) => p.cpu()?,
                    Call::Block(b) => b.cpu()?,
                };
                (tensors, Ran::CpuReference)
            }
        };
        let weights = match &self.call {
            Call::Projection(p) => p.weights.describe(),
            Call::Block(b) => format!(
                "gate_up {}, down {}",
                b.gate_up.describe(),
                b.down.describe()
            ),
        };
        let mut metadata = self.metadata.clone();
        for (key, value) in [
            (META_MODE, self.mode().name().to_string()),
            (META_BACKEND, ran.backend_name().to_string()),
            (META_STRATEGY, ran.strategy().to_string()),
            (META_WEIGHTS, weights),
            (META_DEVICE, ran.device().to_string()),
            (META_VERSION, env!("CARGO_PKG_VERSION").to_string()),
        ] {
            metadata.insert(key.to_string(), value);
        }
        if let Call::Block(b) = &self.call {
            for (key, value) in b.metadata() {
                metadata.insert(key.to_string(), value);
            }
        }
        Ok(RunOutput {
            tensors,
            metadata,
            ran,
            problem: self.describe(),
            warnings: self.warnings.clone(),
        })
    }
}

/// Parses the bytes of an input file and runs the call on `backend` ([`Problem::parse`], then
/// [`Problem::run`]).
pub fn run(input: &[u8], options: &RunOptions, backend: Backend<'_>) -> Result<RunOutput> {
    Problem::parse(input, options)?.run(backend)
}

// ---------------------------------------------------------------------------------------------
// Pieces both modes use.

/// An [`Error::Checkpoint`] about the input file.
fn file_error(kind: CheckpointErrorKind, detail: String) -> Error {
    Error::Checkpoint { kind, detail }
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

    fn reference(&self, experts: usize) -> Result<reference::Routing> {
        reference::flatten_sort_count(&self.ids, self.tokens, self.top_k, experts)
    }

    fn device(&self, gpu: &Gpu, experts: usize) -> Result<DeviceRouting> {
        DeviceRouting::from_host_ids(gpu, &self.ids, self.tokens, self.top_k, experts)
    }
}

/// The row order in metadata `key` (default scattered).
fn order(ck: &Checkpoint<'_>, key: &str) -> Result<RowOrder> {
    match ck.metadata_value(key) {
        None => Ok(RowOrder::Scattered),
        Some(name) => name.parse().map_err(|_| {
            file_error(
                CheckpointErrorKind::Metadata,
                format!(
                    "`{key}` is `{}`, expected `scattered` or `grouped`",
                    escape(name)
                ),
            )
        }),
    }
}

/// A metadata value parsed as a finite f32.
fn metadata_f32(ck: &Checkpoint<'_>, key: &str) -> Result<Option<f32>> {
    let Some(s) = ck.metadata_value(key) else {
        return Ok(None);
    };
    match s.trim().parse::<f32>() {
        Ok(v) if v.is_finite() => Ok(Some(v)),
        _ => Err(file_error(
            CheckpointErrorKind::Metadata,
            format!("`{key}` is `{}`, not a finite number", escape(s)),
        )),
    }
}

/// Expert ids `[T, k]` with every id in `[-1, experts)`.
fn load_ids(ck: &Checkpoint<'_>, experts: usize) -> Result<Routed> {
    let ids = ck.read_index("expert_ids")?;
    let (tokens, top_k) = ids.dims2("(T, k)")?;
    if tokens == 0 || top_k == 0 {
        return Err(file_error(
            CheckpointErrorKind::Shape,
            format!(
                "`expert_ids` has shape [{tokens}, {top_k}]: it needs at least one token and one slot"
            ),
        ));
    }
    if let Some((i, id)) = ids
        .data
        .iter()
        .enumerate()
        .find(|(_, id)| **id < -1 || **id >= experts as i64)
    {
        return Err(file_error(
            CheckpointErrorKind::Value,
            format!(
                "`expert_ids` holds expert {id} at token {}, slot {}: outside [0, {experts}) (the weights have {experts} experts; -1 marks a dropped slot)",
                i / top_k,
                i % top_k
            ),
        ));
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
) -> Result<Option<Lora>> {
    let missing = |absent: &str, present: &str| {
        file_error(
            CheckpointErrorKind::Missing,
            format!("`{absent}` is missing (the file has `{present}`; give both or neither)"),
        )
    };
    match (ck.contains(a_name), ck.contains(b_name)) {
        (false, false) => return Ok(None),
        (true, false) => return Err(missing(b_name, a_name)),
        (false, true) => return Err(missing(a_name, b_name)),
        (true, true) => {}
    }
    let a = ck.read_float(a_name)?;
    let (a_rows, _) = a.dims2("(E*r, K)")?;
    if a_rows == 0 || !a_rows.is_multiple_of(experts) {
        return Err(file_error(
            CheckpointErrorKind::Shape,
            format!(
                "`{a_name}` has {a_rows} rows, which is not E*r for E = {experts} experts and a rank r >= 1"
            ),
        ));
    }
    let rank = a_rows / experts;
    let max_rank = crate::shared::tiles::MAX_RANK as usize;
    if rank > max_rank {
        return Err(Error::InvalidArgument {
            what: "LoRA rank",
            detail: format!(
                "must be in 1..={max_rank} (use no LoRA for rank 0), got {rank} (`{a_name}` has {a_rows} rows for E = {experts})"
            ),
        });
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
        return Err(file_error(
            CheckpointErrorKind::Metadata,
            format!("`scaling` is missing (it is required with `{a_name}` and `{b_name}`)"),
        ));
    };
    Ok(Some(Lora {
        a: a.data,
        b: b.data,
        rank,
        scaling,
    }))
}

/// Rejects a 4-bit-only strategy for dense weights, and `fused` for NVFP4 weights whose K is not
/// a multiple of 32 (the fused kernels' rule), on every backend, so a file that would fail on
/// the GPU fails on the CPU too.
fn check_strategy(w: &StoredWeights, name: &str, strategy: RunStrategy) -> Result<()> {
    if let (StoredWeights::Nv(nv), RunStrategy::Fused) = (w, strategy)
        && !nv.shape().k().is_multiple_of(32)
    {
        return Err(Error::InvalidArgument {
            what: "strategy",
            detail: format!(
                "the fused NVFP4 kernels need K % 32 == 0, and `{}` is NVFP4 with K = {}: use `auto` or `selective`",
                escape(name),
                nv.shape().k()
            ),
        });
    }
    if let (StoredWeights::Dense(t), RunStrategy::Fused | RunStrategy::Selective) = (w, strategy) {
        return Err(Error::InvalidArgument {
            what: "strategy",
            detail: format!(
                "`{strategy}` needs MXFP4 weights, but `{}` is dense {} (quantize it first, e.g. with `mxmoe quantize`)",
                escape(name),
                t.dtype
            ),
        });
    }
    Ok(())
}

/// The shape rule of [`ExpertLinear::check_dims`] for the projection `what`, which the CPU
/// reference enforces too, so a file that fails on the GPU fails everywhere.
fn check_dims(what: &'static str, n: usize, k: usize) -> Result<()> {
    ExpertLinear::check_dims(n, k).map_err(|e| match e {
        Error::InvalidArgument { detail, .. } => Error::InvalidArgument {
            what,
            detail: format!(
                "{detail}; no backend runs it (the GPU kernels refuse it, so the CPU reference does too)"
            ),
        },
        other => other,
    })
}

/// The weights on the device in the form `strategy` multiplies.
enum DeviceWeights {
    Dense(DenseExperts),
    Mx(MxExperts),
    Nv(NvExperts),
}

impl DeviceWeights {
    fn upload(gpu: &Gpu, w: &StoredWeights, strategy: RunStrategy) -> Result<Self> {
        let (e, n, k) = w.dims();
        Ok(match (w, strategy) {
            (StoredWeights::Dense(t), _) => {
                DeviceWeights::Dense(DenseExperts::from_f32(gpu, &t.data, e, n, k)?)
            }
            (StoredWeights::Mx { weights, .. }, RunStrategy::Bf16) => DeviceWeights::Dense(
                DenseExperts::from_bits(gpu, &dequantize_bf16(weights), e, n, k)?,
            ),
            (StoredWeights::Mx { weights, .. }, _) => {
                DeviceWeights::Mx(MxExperts::upload(gpu, weights)?)
            }
            (StoredWeights::Nv(w), RunStrategy::Bf16) => DeviceWeights::Dense(
                DenseExperts::from_bits(gpu, &dequantize_nvfp4_bf16(w), e, n, k)?,
            ),
            (StoredWeights::Nv(w), _) => DeviceWeights::Nv(NvExperts::upload(gpu, w)?),
        })
    }

    fn as_op(&self) -> ExpertWeights<'_> {
        match self {
            DeviceWeights::Dense(w) => ExpertWeights::Bf16(w),
            DeviceWeights::Mx(w) => ExpertWeights::Mxfp4(w),
            DeviceWeights::Nv(w) => ExpertWeights::Nvfp4(w),
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
            (DeviceWeights::Nv(_), _) => op::Strategy::SelectiveDequant.name(),
        }
    }
}

fn upload_lora(
    gpu: &Gpu,
    l: Option<&Lora>,
    e: usize,
    k: usize,
    n: usize,
) -> Result<Option<LoraWeights>> {
    let Some(l) = l else { return Ok(None) };
    Ok(Some(LoraWeights {
        a: Bf16Matrix::from_f32(gpu, &l.a, e * l.rank, k)?,
        b: Bf16Matrix::from_f32(gpu, &l.b, n, e * l.rank)?,
        rank: l.rank,
        scaling: l.scaling,
    }))
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
        StoredWeights::Nv(_) => ck.nv_tensor_names(name),
    }
}

/// Bytes the weights take on the device in the form `strategy` uploads.
fn device_weight_bytes(w: &StoredWeights, strategy: RunStrategy) -> Option<u128> {
    let (e, n, k) = w.dims();
    match (w, strategy) {
        (StoredWeights::Mx { weights, .. }, RunStrategy::Auto | RunStrategy::Fused) => {
            Some(weights.shape().bytes() as u128)
        }
        // NVFP4 runs Strategy A (Fused is refused before this): the packed weights and scales,
        // and a bf16 buffer for the active experts.
        (StoredWeights::Nv(w), RunStrategy::Auto | RunStrategy::Selective | RunStrategy::Fused) => {
            sum_bytes(&[
                tensor_bytes(&[e, n, k / 2 + k / 16], 1),
                tensor_bytes(&[e, w.groups()], 4),
                tensor_bytes(&[e, n, k], 2),
            ])
        }
        // Strategy A keeps the packed weights and a bf16 buffer for the active experts.
        (StoredWeights::Mx { weights, .. }, RunStrategy::Selective) => sum_bytes(&[
            Some(weights.shape().bytes() as u128),
            tensor_bytes(&[e, n, k], 2),
        ]),
        _ => tensor_bytes(&[e, n, k], 2),
    }
}

/// Appends zero rows up to `rows` rows of `cols` (grouped tensors keep T*k rows in the file).
fn pad_rows(mut v: Vec<f32>, rows: usize, cols: usize) -> Vec<f32> {
    v.resize(rows * cols, 0.0);
    v
}

/// An output tensor.
fn output(name: &'static str, shape: Vec<usize>, values: Vec<f32>) -> OutputTensor {
    OutputTensor {
        name,
        shape,
        values,
    }
}

/// Rounding of the CPU reference: the kernels' points.
const ROUNDING: Rounding = Rounding::Bf16;
