//! `mxmoe bench`: SPEC §8's single-projection benchmark (REF `bench_mxfp4.py`) for every
//! [`Strategy`].
//!
//! Problem: `K = 2048`, `N = 1024`, `top_k = 8`, `r = 16`, `s = 0.5`; `x [T, K]` in token order,
//! scattered output `[T·k, N]`, no gates (REF: `grouped_in = grouped_out = false`). Weights
//! `W_store = randn(E, N, K)/√K` in bf16 (seed 0), LoRA `0.01·randn` (seed 2), routing seed 1,
//! `x` seed 3. REF's loss is `out.sum()`, i.e. an all-ones output gradient; we use a fixed random
//! `dy` (seed 4) instead, because a constant gradient can hide row-ordering bugs and our rules
//! forbid constant test data. The kernels do the same work either way.
//!
//! Per iteration (timed): the routing of the expert ids (already on the device, as a router
//! leaves them), forward and backward; inputs, ids and LoRA leaves are uploaded once. Each
//! iteration is bracketed by its own pair of CUDA events on the op stream; the events are read
//! after the loop, and the median, minimum and maximum are reported. See `docs/BENCHMARKS.md`
//! for the FLOP and byte accounting.
//!
//! The gpt-oss layer shapes (`--shape gpt-oss-20b`, `gpt-oss-120b`; run only when named) time
//! gpt-oss's whole MoE block instead ([`MoeBlock::gpt_oss`]: `H = I = 2880`, `top_k = 4`, E = 32
//! or 128, interleaved gate/up rows, [`Activation::GPT_OSS`], random frozen biases) with PEFT-style
//! LoRA of rank 16 on both projections, `x [T, H]`, the gates of the routing and `dy [T, H]`:
//! forward alone and forward + backward, each with its own events, for every strategy (the bf16
//! path for comparison, MXFP4 fused, selective and auto on both projections).

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use cudarc::driver::sys::CUevent_flags;
use mxmoe::Runtime;
use mxmoe::activation::Activation;
use mxmoe::device::Gpu;
use mxmoe::moe::{self, MoeBlock, MoeGrads, MoeSaved};
use mxmoe::op::{self, Bf16Matrix, LoraWeights, RowOrder};
use mxmoe::shared::bf16::round_bf16;

use crate::env::{commit, driver_description, open_gpu, utc_now};
use crate::output::{check_writable, write_atomic};
use crate::problem::{DeviceProblem, HostProblem, RoutedIds, Seeds, Shape};
use crate::rng::normal_bf16_bits;
use crate::routing_gen::{RoutingKind, active_experts, top_k};
use crate::strategy::{DeviceWeights, HostWeights, Strategy};
use mxmoe::device::PoolWatch;
use mxmoe::reference::{check_host_memory, sum_bytes, tensor_bytes};

/// Reduction dimension of the benchmarked projection.
const K: usize = 2048;
/// Output dimension.
const N: usize = 1024;
/// Experts per token.
const TOP_K: usize = 8;
/// LoRA rank.
const RANK: usize = 16;
/// LoRA scaling.
const SCALING: f32 = 0.5;
/// Seeds of SPEC §8 (weights 0, routing 1, LoRA 2) plus ours for `x` and `dy`.
const WEIGHT_SEED: u64 = 0;
const SEEDS: Seeds = Seeds {
    routing: 1,
    lora: 2,
    x: 3,
    dy: 4,
};
const MIB: f64 = (1u64 << 20) as f64;

/// gpt-oss's hidden size `H` (both layers).
const GPT_OSS_HIDDEN: usize = 2880;
/// gpt-oss's expert intermediate size `I` (both layers).
const GPT_OSS_INTER: usize = 2880;
/// gpt-oss's experts per token.
const GPT_OSS_TOP_K: usize = 4;
/// Default token counts of the gpt-oss layer shapes.
const LAYER_TOKENS: &[usize] = &[4096];
/// The routing regime of the gpt-oss layer shapes: near-uniform load with a mild per-expert bias,
/// like a trained router's.
const LAYER_ROUTING: RoutingKind = RoutingKind::Balanced;
/// Seed and scale of the gpt-oss layers' frozen biases (`0.1·randn`, stream 0 gate_up, 1 down).
const BIAS_SEED: u64 = 5;
const BIAS_SCALE: f32 = 0.1;

/// Which configurations to run (comma-separated; several may be given).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ShapeArg {
    /// Dense routing, E = 128, T = 4096 (one projection, SPEC §8).
    Dense,
    /// Sparse routing, E = 256, T = 4096 (one projection, SPEC §8).
    Sparse,
    /// Balanced routing, E = 256, T ∈ {256, 1024, 4096, 16384} (one projection, SPEC §8).
    Balanced,
    /// The three projection regimes above (the default; the gpt-oss layers run only when named).
    All,
    /// gpt-oss-20b's MoE layer: the whole block, E = 32, H = I = 2880, top_k = 4, T = 4096.
    #[value(name = "gpt-oss-20b")]
    GptOss20b,
    /// gpt-oss-120b's MoE layer: the whole block, E = 128, H = I = 2880, top_k = 4, T = 4096.
    #[value(name = "gpt-oss-120b")]
    GptOss120b,
}

/// Help text after the options: what the shapes run.
const SHAPES_HELP: &str = "\
Shapes: dense, sparse and balanced (all, the default) time one LoRA-fused expert projection
(K = 2048, N = 1024, top_k = 8, r = 16) per routing regime, forward + backward.
gpt-oss-20b (E = 32) and gpt-oss-120b (E = 128) time gpt-oss's whole MoE block (H = I = 2880,
top_k = 4, T = 4096 unless --tokens, balanced routing): interleaved gate/up rows, alpha 1.702,
limit 7, random frozen biases, LoRA r = 16 on both projections; forward alone and forward +
backward, with bf16 weights (for comparison) and MXFP4 (fused, selective, auto).
Example: mxmoe bench --shape gpt-oss-20b,gpt-oss-120b --strategy bf16,mxfp4-b";

/// Options of `mxmoe bench`.
#[derive(Debug, clap::Args)]
#[command(after_help = SHAPES_HELP)]
pub struct BenchArgs {
    /// Shapes to run, comma-separated: routing regimes of the projection benchmark, gpt-oss
    /// layers.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "all")]
    pub shape: Vec<ShapeArg>,
    /// Token counts, comma-separated; replaces every selected shape's default list.
    #[arg(long, value_delimiter = ',', value_parser = positive)]
    pub tokens: Vec<usize>,
    /// Timed iterations per configuration.
    #[arg(long, default_value_t = 50, value_parser = positive)]
    pub iters: usize,
    /// Untimed warm-up iterations per configuration.
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    /// Strategies to run, comma-separated (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub strategy: Vec<Strategy>,
    /// Also write the results as JSON to this file (written once, at the end, atomically; an
    /// existing file is kept until then).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// CUDA device ordinal (an error if it does not exist). Default: device 0, or the plan only
    /// when there is no GPU.
    #[arg(long, value_name = "N")]
    pub device: Option<usize>,
}

/// clap parser for a positive integer.
fn positive(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(v) => Ok(v),
        Err(e) => Err(format!("not a positive integer ({e})")),
    }
}

/// One routing configuration.
#[derive(Clone, Copy, Debug)]
struct Config {
    routing: RoutingKind,
    experts: usize,
    tokens: usize,
}

impl Config {
    fn shape(&self) -> Shape {
        Shape {
            experts: self.experts,
            k: K,
            n: N,
            tokens: self.tokens,
            top_k: TOP_K,
            rank: RANK,
            scaling: SCALING,
            input: RowOrder::Scattered,
            output: RowOrder::Scattered,
            gates: false,
        }
    }
}

/// The configurations of SPEC §8, in run order (same expert count adjacent, so one weight
/// tensor serves consecutive configurations). Every size a configuration implies is checked
/// ([`check_config`]) before anything is allocated.
fn configs(args: &BenchArgs) -> Vec<Config> {
    let regimes: &[(RoutingKind, usize, &[usize])] = &[
        (RoutingKind::Dense, 128, &[4096]),
        (RoutingKind::Sparse, 256, &[4096]),
        (RoutingKind::Balanced, 256, &[256, 1024, 4096, 16384]),
    ];
    let selected = |kind: RoutingKind| {
        args.shape.iter().any(|s| match s {
            ShapeArg::All => true,
            ShapeArg::Dense => kind == RoutingKind::Dense,
            ShapeArg::Sparse => kind == RoutingKind::Sparse,
            ShapeArg::Balanced => kind == RoutingKind::Balanced,
            ShapeArg::GptOss20b | ShapeArg::GptOss120b => false,
        })
    };
    let mut out = Vec::new();
    for &(routing, experts, default_tokens) in regimes {
        if !selected(routing) {
            continue;
        }
        let tokens: &[usize] = if args.tokens.is_empty() {
            default_tokens
        } else {
            &args.tokens
        };
        out.extend(tokens.iter().map(|&tokens| Config {
            routing,
            experts,
            tokens,
        }));
    }
    out
}

/// Useful floating-point operations of one projection over `l` rows, `(forward, backward)`
/// (LoRA at rank `r`, not the padded rank): forward `2LKN + 2LKr + 2LrN`; backward dX
/// `2LNK + 2LrK`, YB `2LNr`, dA `2LrK`, dB `2LNr`.
fn projection_flops(l: f64, k: f64, n: f64, r: f64) -> (f64, f64) {
    let forward = 2.0 * l * k * n + 2.0 * l * k * r + 2.0 * l * r * n;
    let backward =
        2.0 * l * n * k + 2.0 * l * r * k + 2.0 * l * n * r + 2.0 * l * r * k + 2.0 * l * n * r;
    (forward, backward)
}

/// Useful floating-point operations of one forward + backward of the benchmarked projection.
fn flops(s: &Shape) -> f64 {
    let (forward, backward) =
        projection_flops(s.rows() as f64, s.k as f64, s.n as f64, s.rank as f64);
    forward + backward
}

/// Minimum bytes one forward + backward must move (our accounting, bf16 activations): the active
/// experts' weight traffic ([`Strategy::weight_traffic_bytes`]: stored weights read in forward
/// and dX, plus Strategy A's dequantization), `x` read, `out` written, `dy` read, `dx` written,
/// the active experts' LoRA factors read twice, and the full `dA`, `dB` written.
fn bytes(strategy: Strategy, s: &Shape, active: usize) -> f64 {
    let weights = strategy.weight_traffic_bytes(s.n, s.k, active);
    let activations = 2 * (s.x_rows() * s.k) * 2 + 2 * (s.out_rows() * s.n) * 2;
    let lora = 2 * active * s.rank * (s.k + s.n) * 2 + s.experts * s.rank * (s.k + s.n) * 2;
    (weights + activations + lora) as f64
}

/// SPEC §8's byte count (REF's "HBM GB/s"): the active weights once plus `x`, nothing else.
fn spec_bytes(strategy: Strategy, s: &Shape, active: usize) -> f64 {
    (strategy.spec_weight_bytes(s.n, s.k, active) + s.tokens * s.k * 2) as f64
}

/// [`Activation::GPT_OSS`] in words.
fn gpt_oss_activation() -> String {
    match Activation::GPT_OSS {
        Activation::GptOss {
            alpha,
            limit,
            boundary,
        } => format!(
            "gpt-oss (u + 1)·g·σ(αg), g = min(gate, L), u = clamp(up, −L, L), α = {alpha}, L = {limit}, {boundary} clamp boundary"
        ),
        other => format!("{other:?}"),
    }
}

/// A gpt-oss MoE layer shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
enum Layer {
    /// gpt-oss-20b: 32 experts.
    #[serde(rename = "gpt-oss-20b")]
    GptOss20b,
    /// gpt-oss-120b: 128 experts.
    #[serde(rename = "gpt-oss-120b")]
    GptOss120b,
}

impl Layer {
    /// Both layers, in run order.
    const ALL: [Layer; 2] = [Layer::GptOss20b, Layer::GptOss120b];

    /// The name of `--shape` and the tables.
    fn name(self) -> &'static str {
        match self {
            Layer::GptOss20b => "gpt-oss-20b",
            Layer::GptOss120b => "gpt-oss-120b",
        }
    }

    /// Experts `E`.
    fn experts(self) -> usize {
        match self {
            Layer::GptOss20b => 32,
            Layer::GptOss120b => 128,
        }
    }

    fn arg(self) -> ShapeArg {
        match self {
            Layer::GptOss20b => ShapeArg::GptOss20b,
            Layer::GptOss120b => ShapeArg::GptOss120b,
        }
    }
}

/// One gpt-oss layer configuration.
#[derive(Clone, Copy, Debug)]
struct LayerConfig {
    layer: Layer,
    tokens: usize,
}

impl LayerConfig {
    fn experts(&self) -> usize {
        self.layer.experts()
    }

    /// `(forward, backward)` useful FLOPs of the block: both projections as
    /// [`projection_flops`] (gate_up `K = H`, `N = 2I`; down `K = I`, `N = H`) over
    /// `L = T·top_k` rows; the activation's element-wise work is not counted.
    fn flops(&self) -> (f64, f64) {
        let l = (self.tokens * GPT_OSS_TOP_K) as f64; // checked by check_layer_config
        let (h, i, r) = (GPT_OSS_HIDDEN as f64, GPT_OSS_INTER as f64, RANK as f64);
        let (up_f, up_b) = projection_flops(l, h, 2.0 * i, r);
        let (down_f, down_b) = projection_flops(l, i, h, r);
        (up_f + down_f, up_b + down_b)
    }
}

/// The gpt-oss layer configurations selected, in run order (one layer's configurations
/// adjacent, so its weights serve them all).
fn layer_configs(args: &BenchArgs) -> Vec<LayerConfig> {
    let tokens: &[usize] = if args.tokens.is_empty() {
        LAYER_TOKENS
    } else {
        &args.tokens
    };
    Layer::ALL
        .into_iter()
        .filter(|layer| args.shape.contains(&layer.arg()))
        .flat_map(|layer| {
            tokens
                .iter()
                .map(move |&tokens| LayerConfig { layer, tokens })
        })
        .collect()
}

/// The product of `dims` as a `usize`, or [`mxmoe::Error::SizeOverflow`] naming `what`.
fn elements(what: &str, dims: &[usize]) -> anyhow::Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            mxmoe::Error::SizeOverflow {
                what: what.to_string(),
                detail: format!("the element count of {dims:?} overflows usize"),
            }
            .into()
        })
}

/// As [`check_config`], for a gpt-oss layer: every size the configuration implies exists (checked
/// arithmetic) and fits. The routing draw in host memory always; with a device, the host problem
/// (both weight tensors as bf16 and MXFP4, `x`, `dy`, LoRA, biases) in host memory and, for the
/// selected strategy that needs the most (they run one at a time), the uploaded problem in the
/// device's free memory.
fn check_layer_config(
    c: &LayerConfig,
    strategies: &[Strategy],
    gpu: Option<&Gpu>,
) -> anyhow::Result<()> {
    let (t, e, h, i, k) = (
        c.tokens,
        c.experts(),
        GPT_OSS_HIDDEN,
        GPT_OSS_INTER,
        GPT_OSS_TOP_K,
    );
    let label = format!("the {} layer, T = {t}", c.layer.name());
    let rows = elements(&format!("{label}: the routed rows T·k"), &[t, k])?;
    elements(&format!("{label}: the router logits [T, E]"), &[t, e])?;
    elements(&format!("{label}: x and dy [T, H]"), &[t, h])?;
    let routing = sum_bytes(&[tensor_bytes(&[t, e], 4), tensor_bytes(&[rows], 8 + 4 + 4)]);
    check_host_memory(
        format!("{label}: the routing draw (logits [{t}, {e}] f32, top-{k} ids and weights)"),
        routing,
    )?;
    let Some(gpu) = gpu else { return Ok(()) };
    // Elements of both projections' weights, of the four LoRA factors and of both biases.
    let weights = tensor_bytes(&[e, 3 * i, h], 1);
    let lora = tensor_bytes(&[e * RANK, 2 * h + 3 * i], 1);
    let biases = tensor_bytes(&[e, 2 * i + h], 1);
    // Host: the weights as bf16 bits and their MXFP4 copy (17/32 byte per element, twice while
    // the parallel quantizer concatenates its parts), x and dy, LoRA and biases as bf16 bits.
    let host = sum_bytes(&[
        weights.and_then(|w| w.checked_mul(4)),
        tensor_bytes(&[t, h], 2 * 2),
        lora.and_then(|l| l.checked_mul(2)),
        biases.and_then(|b| b.checked_mul(2)),
    ]);
    check_host_memory(
        format!(
            "{label}: the host problem (gate_up [{e}, {}, {h}] and down [{e}, {h}, {i}] as bf16 and MXFP4, x and dy [{t}, {h}])",
            2 * i
        ),
        host,
    )?;
    // Device bytes per weight element: bf16 2; MXFP4 17/32 and NVFP4 18/32 (counted as 1);
    // Strategy A (and Auto, which may choose it) adds a compact bf16 copy of the active experts
    // (at most E).
    let per_weight = strategies
        .iter()
        .map(|s| match s {
            Strategy::Bf16 => 2,
            Strategy::Mxfp4B | Strategy::Nvfp4B => 1,
            Strategy::Mxfp4A | Strategy::Mxfp4Auto | Strategy::Nvfp4A | Strategy::Nvfp4Auto => 3,
        })
        .max()
        .unwrap_or(0);
    // Activations, bf16: x, y, dy, dx [T, H]; per routed row gu and d_gu [2I], h and dh [I], the
    // down projection's per-slot rows, gated dY and the up projection's per-slot dX [H], with
    // half again for the routed copies and the LoRA intermediates; LoRA, its gradients and
    // padded copies; the biases; the routing.
    let device = sum_bytes(&[
        weights.and_then(|w| w.checked_mul(per_weight)),
        tensor_bytes(&[t, h], 2 * 4),
        tensor_bytes(&[rows, 6 * i + 3 * h], 3),
        lora.and_then(|l| l.checked_mul(2 * 4)),
        biases.and_then(|b| b.checked_mul(2)),
        tensor_bytes(&[rows], 16),
    ]);
    gpu.check_free_memory(
        format!(
            "{label}: the device problem (weights [{e}, {}, {h}], rows [{rows}, ...])",
            3 * i
        ),
        device,
    )?;
    Ok(())
}

/// The frozen weights of one gpt-oss layer: both projections (each with its MXFP4
/// quantization made on first use) and both biases, as bf16 bits.
struct LayerWeights {
    layer: Layer,
    /// `gate_up_proj [E, 2I, H]`, `randn/√H`, rows interleaved (which changes no timing).
    gate_up: HostWeights,
    /// `down_proj [E, H, I]`, `randn/√I`.
    down: HostWeights,
    /// `[E, 2I]`.
    gate_up_bias: Vec<u16>,
    /// `[E, H]`.
    down_bias: Vec<u16>,
}

impl LayerWeights {
    /// Draws the weights (seed [`WEIGHT_SEED`], streams 0 and 1) and biases ([`BIAS_SEED`]).
    fn draw(layer: Layer) -> Self {
        let (e, h, i) = (layer.experts(), GPT_OSS_HIDDEN, GPT_OSS_INTER);
        eprintln!(
            "generating {} weights: gate_up [{e}, {}, {h}], down [{e}, {h}, {i}] bf16",
            layer.name(),
            2 * i
        );
        let gate_up = normal_bf16_bits(e * 2 * i * h, 1.0 / (h as f32).sqrt(), WEIGHT_SEED, 0);
        let down = normal_bf16_bits(e * h * i, 1.0 / (i as f32).sqrt(), WEIGHT_SEED, 1);
        Self {
            layer,
            gate_up: HostWeights::new(gate_up, e, 2 * i, h),
            down: HostWeights::new(down, e, h, i),
            gate_up_bias: normal_bf16_bits(e * 2 * i, BIAS_SCALE, BIAS_SEED, 0),
            down_bias: normal_bf16_bits(e * h, BIAS_SCALE, BIAS_SEED, 1),
        }
    }
}

/// Host data of one gpt-oss layer configuration besides the weights, as bf16 bits.
struct LayerHost {
    config: LayerConfig,
    /// Expert ids `[T, top_k]`.
    ids: Vec<i64>,
    /// Routing weights `[T, top_k]` (bf16-rounded).
    gates: Vec<f32>,
    /// `x [T, H]`.
    x: Vec<u16>,
    /// `dy [T, H]`.
    dy: Vec<u16>,
    /// LoRA A and B of gate_up (`[E·r, H]`, `[2I, E·r]`) and of down (`[E·r, I]`, `[H, E·r]`).
    lora: [Vec<u16>; 4],
}

impl LayerHost {
    /// Draws the routing (top-k of softmax of [`LAYER_ROUTING`] logits, renormalised: gpt-oss's
    /// softmax over the chosen logits), `x` and `dy` (`randn`) and LoRA (`0.01·randn`, streams
    /// 0–3) from [`SEEDS`]. The sizes were checked by [`check_layer_config`].
    fn draw(config: LayerConfig) -> Self {
        let (t, e, h, i, r) = (
            config.tokens,
            config.experts(),
            GPT_OSS_HIDDEN,
            GPT_OSS_INTER,
            RANK,
        );
        let logits = LAYER_ROUTING.logits(t, e, SEEDS.routing);
        let chosen = top_k(&logits, t, e, GPT_OSS_TOP_K);
        let lora = |len: usize, stream: u32| normal_bf16_bits(len, 0.01, SEEDS.lora, stream);
        Self {
            config,
            ids: chosen.ids,
            gates: chosen.gates.iter().map(|&g| round_bf16(g)).collect(),
            x: normal_bf16_bits(t * h, 1.0, SEEDS.x, 0),
            dy: normal_bf16_bits(t * h, 1.0, SEEDS.dy, 0),
            lora: [
                lora(e * r * h, 0),
                lora(2 * i * e * r, 1),
                lora(e * r * i, 2),
                lora(h * e * r, 3),
            ],
        }
    }
}

/// One gpt-oss layer configuration resident on the device in one strategy's format.
struct LayerDevice {
    gate_up: DeviceWeights,
    down: DeviceWeights,
    gate_up_bias: Bf16Matrix,
    down_bias: Bf16Matrix,
    lora_gate_up: LoraWeights,
    lora_down: LoraWeights,
    ids: RoutedIds,
    x: Bf16Matrix,
    gates: Bf16Matrix,
    dy: Bf16Matrix,
    strategy: Strategy,
}

impl LayerDevice {
    /// Uploads everything and routes the ids on the device once (to check them); returns once
    /// that has finished.
    fn upload(
        gpu: &Gpu,
        strategy: Strategy,
        p: &LayerHost,
        w: &LayerWeights,
    ) -> anyhow::Result<Self> {
        let c = &p.config;
        if w.layer != c.layer {
            bail!(
                "the weights are {}'s but the problem is {}'s",
                w.layer.name(),
                c.layer.name()
            );
        }
        let (t, e, h, i, r) = (c.tokens, c.experts(), GPT_OSS_HIDDEN, GPT_OSS_INTER, RANK);
        let matrix = |bits: &[u16], rows: usize, cols: usize, what: &str| {
            Bf16Matrix::from_bits(gpu, bits, rows, cols)
                .with_context(|| format!("could not upload {what}"))
        };
        let lora = |a: &[u16], b: &[u16], k: usize, n: usize, what: &str| {
            Ok::<_, anyhow::Error>(LoraWeights {
                a: matrix(a, e * r, k, &format!("the {what} LoRA A"))?,
                b: matrix(b, n, e * r, &format!("the {what} LoRA B"))?,
                rank: r,
                scaling: SCALING,
            })
        };
        let gate_up = strategy.upload(gpu, &w.gate_up)?;
        let down = strategy.upload(gpu, &w.down)?;
        let ids = RoutedIds::upload(gpu, &p.ids, t, GPT_OSS_TOP_K, e)?;
        let d = Self {
            gate_up,
            down,
            gate_up_bias: matrix(&w.gate_up_bias, e, 2 * i, "the gate_up bias")?,
            down_bias: matrix(&w.down_bias, e, h, "the down bias")?,
            lora_gate_up: lora(&p.lora[0], &p.lora[1], h, 2 * i, "gate_up")?,
            lora_down: lora(&p.lora[2], &p.lora[3], i, h, "down")?,
            ids,
            x: matrix(&p.x, t, h, "x")?,
            gates: Bf16Matrix::from_f32(gpu, &p.gates, t, GPT_OSS_TOP_K)
                .context("could not upload the gates")?,
            dy: matrix(&p.dy, t, h, "dy")?,
            strategy,
        };
        gpu.synchronize().context("the uploads did not complete")?;
        Ok(d)
    }

    /// gpt-oss's block over these buffers: [`MoeBlock::gpt_oss`] with LoRA on both projections
    /// and the strategy's op-layer strategy.
    fn block(&self) -> MoeBlock<'_> {
        MoeBlock {
            lora_gate_up: Some(&self.lora_gate_up),
            lora_down: Some(&self.lora_down),
            strategy: self.strategy.op_strategy(),
            ..MoeBlock::gpt_oss(
                self.gate_up.as_expert_weights(),
                self.down.as_expert_weights(),
                &self.gate_up_bias,
                &self.down_bias,
            )
        }
    }

    /// One routing of the ids and one forward, enqueued without host synchronisation (unless a
    /// projection runs Strategy A or Auto, which read the expert offsets back, once per routing).
    fn forward(&self, gpu: &Runtime) -> anyhow::Result<(Bf16Matrix, MoeSaved)> {
        let routing = self.ids.route(gpu)?;
        self.block()
            .forward(gpu, &self.x, &routing, &self.gates)
            .context("the block's forward pass failed")
    }

    /// One forward and backward; `between` runs after the forward has been enqueued and before
    /// the backward.
    fn forward_backward(
        &self,
        gpu: &Runtime,
        between: impl FnOnce() -> anyhow::Result<()>,
    ) -> anyhow::Result<(Bf16Matrix, MoeSaved, MoeGrads)> {
        let (y, saved) = self.forward(gpu)?;
        between()?;
        let grads =
            moe::backward(gpu, &saved, &self.dy).context("the block's backward pass failed")?;
        Ok((y, saved, grads))
    }
}

/// What ran for a gpt-oss layer: `bf16`, or per projection `A` (selective) / `B` (fused), one
/// letter when both projections ran the same path, else `gate_up/down`.
fn layer_ran(strategy: Strategy, (up, down): (op::Strategy, op::Strategy)) -> String {
    let letter = |s: op::Strategy| match s {
        op::Strategy::SelectiveDequant => "A",
        op::Strategy::Fused => "B",
        op::Strategy::Auto => "auto",
    };
    match strategy {
        Strategy::Bf16 => "bf16".into(),
        _ if up == down => letter(up).into(),
        _ => format!("{}/{}", letter(up), letter(down)),
    }
}

/// The timed pass of a gpt-oss layer row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
enum Pass {
    /// The forward alone.
    #[serde(rename = "forward")]
    Forward,
    /// Forward and backward.
    #[serde(rename = "forward+backward")]
    ForwardBackward,
}

impl Pass {
    fn name(self) -> &'static str {
        match self {
            Pass::Forward => "forward",
            Pass::ForwardBackward => "forward+backward",
        }
    }
}

/// A gpt-oss layer configuration before timing.
#[derive(Debug, serde::Serialize)]
struct LayerPlanRow {
    layer: Layer,
    experts: usize,
    tokens: usize,
    rows: usize,
    active_experts: usize,
    gflop_forward: f64,
    gflop_forward_backward: f64,
}

/// One measured gpt-oss layer configuration and pass.
#[derive(Debug, serde::Serialize)]
struct LayerRow {
    strategy: Strategy,
    /// What the op layer ran ([`layer_ran`]).
    ran: String,
    layer: Layer,
    pass: Pass,
    experts: usize,
    tokens: usize,
    rows: usize,
    active_experts: usize,
    #[serde(flatten)]
    m: Measured,
}

/// The fixed part of the gpt-oss layer problem, for the JSON document.
#[derive(Debug, serde::Serialize)]
struct LayerProblem {
    hidden: usize,
    intermediate: usize,
    top_k: usize,
    rank: usize,
    scaling: f32,
    routing: RoutingKind,
    activation: String,
    gate_up_layout: &'static str,
    weight_seed: u64,
    bias_seed: u64,
    bias_scale: f32,
    seeds: Seeds,
}

/// A configuration before timing.
#[derive(Debug, serde::Serialize)]
struct PlanRow {
    routing: RoutingKind,
    experts: usize,
    tokens: usize,
    rows: usize,
    active_experts: usize,
    gflop: f64,
}

/// One measured configuration.
#[derive(Debug, serde::Serialize)]
struct Row {
    strategy: Strategy,
    /// What the op layer reported running ("bf16", "A" or "B"; differs per call only for Auto).
    ran: &'static str,
    routing: RoutingKind,
    experts: usize,
    tokens: usize,
    rows: usize,
    active_experts: usize,
    #[serde(flatten)]
    m: Measured,
    slots_per_s: f64,
    bytes: f64,
    gb_per_s: f64,
    spec_bytes: f64,
    spec_gb_per_s: f64,
}

/// What every measured row holds (flattened into its JSON object): the iterations, their
/// statistics, the rates and the memory.
#[derive(Debug, serde::Serialize)]
struct Measured {
    warmup: usize,
    iters: usize,
    #[serde(flatten)]
    stats: Stats,
    /// Host wall clock of the whole timed loop (synchronized) divided by the iterations.
    wall_ms_per_iter: f64,
    tokens_per_s: f64,
    flops: f64,
    tflops: f64,
    /// Device memory used after the uploads, above the configuration's baseline.
    resident_mib: f64,
    /// Largest `cuMemGetInfo` used-memory sample (after forward, after backward), above baseline.
    peak_sampled_mib: f64,
    /// Memory pool high-water mark above baseline (PyTorch's `max_memory_allocated` analogue).
    peak_pool_mib: Option<f64>,
    /// Every timed iteration, in order.
    times_ms: Vec<f64>,
}

/// A configuration's memory readings, in MiB above its baseline.
#[derive(Clone, Copy)]
struct MemoryMib {
    resident: f64,
    peak_sampled: f64,
    peak_pool: Option<f64>,
}

impl Measured {
    /// The row of the `(times_ms, wall_ms_per_iter)` that [`time_iterations`] returned, for
    /// `tokens` tokens and `flops` per iteration.
    fn new(
        args: &BenchArgs,
        (times_ms, wall_ms_per_iter): (Vec<f64>, f64),
        tokens: usize,
        flops: f64,
        memory: MemoryMib,
    ) -> Self {
        let stats = stats(&times_ms);
        let seconds = stats.median_ms / 1e3;
        Self {
            warmup: args.warmup,
            iters: args.iters,
            stats,
            wall_ms_per_iter,
            tokens_per_s: tokens as f64 / seconds,
            flops,
            tflops: flops / seconds / 1e12,
            resident_mib: memory.resident,
            peak_sampled_mib: memory.peak_sampled,
            peak_pool_mib: memory.peak_pool,
            times_ms,
        }
    }

    /// The median in seconds.
    fn seconds(&self) -> f64 {
        self.stats.median_ms / 1e3
    }

    /// The peak to show: the pool watermark when available (it sees transients), else the samples.
    fn peak_mib(&self) -> f64 {
        self.peak_pool_mib.unwrap_or(self.peak_sampled_mib)
    }
}

/// Kernel resources, for the JSON header.
#[derive(Debug, serde::Serialize)]
struct KernelInfo {
    name: &'static str,
    registers: i32,
    static_smem_bytes: i32,
    local_bytes: i32,
}

/// Where and when the run happened.
#[derive(Debug, serde::Serialize)]
struct Header {
    device: Option<String>,
    compute_capability: Option<String>,
    sm_count: Option<u32>,
    memory_mib: Option<f64>,
    /// The PTX module loaded and why (`Gpu::module_selection`).
    module: Option<String>,
    /// Which code of the module was loaded (SASS, or PTX the driver JIT-compiled, and why).
    module_code: Option<String>,
    /// Whether the `wgmma` kernels take their weight tiles and their activation rows by TMA
    /// (`Gpu::tma`, `Gpu::tma_activations`, `MXMOE_TMA`).
    tma: Option<(bool, bool)>,
    driver: String,
    commit: String,
    date: String,
    kernels: Vec<KernelInfo>,
}

/// The fixed part of the problem, for the JSON document.
#[derive(Debug, serde::Serialize)]
struct Problem {
    k: usize,
    n: usize,
    top_k: usize,
    rank: usize,
    scaling: f32,
    input: &'static str,
    output: &'static str,
    gates: bool,
    weight_seed: u64,
    seeds: Seeds,
}

/// The JSON document (the `layer_*` keys only when gpt-oss layers were selected).
#[derive(Debug, serde::Serialize)]
struct Report {
    tool: &'static str,
    header: Header,
    problem: Problem,
    notes: Vec<String>,
    plan: Vec<PlanRow>,
    results: Vec<Row>,
    #[serde(skip_serializing_if = "Option::is_none")]
    layer_problem: Option<LayerProblem>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    layer_plan: Vec<LayerPlanRow>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    layer_results: Vec<LayerRow>,
}

/// Checks with checked arithmetic that a configuration's sizes exist and fit: the routing draw
/// (logits `[T, E]` f32 and the top-k choice) in host memory always; with a device, the host
/// problem (`x`, `dy`, the weights, in f32 and bf16) in host memory and the uploaded problem in
/// the device's free memory. Errors are typed ([`mxmoe::Error::SizeOverflow`],
/// [`mxmoe::Error::OutOfMemory`]) and name the configuration.
fn check_config(c: &Config, gpu: Option<&Gpu>) -> anyhow::Result<()> {
    let (t, e) = (c.tokens, c.experts);
    let label = format!("{} routing, E = {e}, T = {t}", c.routing.name());
    let Some(rows) = t.checked_mul(TOP_K) else {
        return Err(mxmoe::Error::SizeOverflow {
            what: format!("{label}: the routed rows T·k"),
            detail: format!("{t} · {TOP_K} overflows usize"),
        }
        .into());
    };
    let routing = sum_bytes(&[tensor_bytes(&[t, e], 4), tensor_bytes(&[rows], 8 + 4 + 4)]);
    check_host_memory(
        format!("{label}: the routing draw (logits [{t}, {e}] f32, top-{TOP_K} ids and weights)"),
        routing,
    )?;
    let Some(gpu) = gpu else { return Ok(()) };
    let lora = tensor_bytes(&[e * RANK, K + N], 1);
    // Host: x [T, K] and dy [T·k, N] as f32 and bf16, W [E, N, K] bf16 and its MXFP4 copy, LoRA.
    let host = sum_bytes(&[
        tensor_bytes(&[t, K], 6),
        tensor_bytes(&[rows, N], 6),
        tensor_bytes(&[e, N, K], 3),
        lora.and_then(|l| l.checked_mul(6)),
    ]);
    check_host_memory(
        format!("{label}: the host problem (x [{t}, {K}], dy [{rows}, {N}], W [{e}, {N}, {K}])"),
        host,
    )?;
    // Device, bf16: x, out, dy, dx, the per-slot dX and the routed copies (about 3·L·N + 2·L·K),
    // the weights, LoRA and its gradients.
    let device = sum_bytes(&[
        tensor_bytes(&[t, K], 4),
        tensor_bytes(&[rows, N], 6),
        tensor_bytes(&[rows, K], 4),
        tensor_bytes(&[e, N, K], 2),
        lora.and_then(|l| l.checked_mul(8)),
    ]);
    gpu.check_free_memory(
        format!(
            "{label}: the device problem (x [{t}, {K}], out and dy [{rows}, {N}], W [{e}, {N}, {K}])"
        ),
        device,
    )?;
    Ok(())
}

/// Runs the benchmark. Without a device (and no `--device`), prints the plan and returns
/// (nothing to time). The JSON file is written once, at the end.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let configs = configs(args);
    let layers = layer_configs(args);
    // Probe the JSON file's folder first, so a bad path fails before minutes of measuring; the
    // file itself (if it exists) is untouched until the results are written.
    if let Some(path) = &args.json {
        check_writable(path)?;
    }
    let strategies: Vec<Strategy> = if args.strategy.is_empty() {
        Strategy::ALL.to_vec()
    } else {
        args.strategy.clone()
    };
    let gpu = open_gpu(args.device)?;
    for c in &configs {
        check_config(c, gpu.as_ref().ok().map(|rt| rt.gpu()))?;
    }
    for c in &layers {
        check_layer_config(c, &strategies, gpu.as_ref().ok().map(|rt| rt.gpu()))?;
    }
    let header = header(gpu.as_ref().ok().map(|rt| rt.gpu()))?;
    let notes = notes(args, !configs.is_empty(), !layers.is_empty());

    // The routing alone is cheap, so the plan (with active-expert counts) is known up front.
    let plan: Vec<PlanRow> = configs
        .iter()
        .map(|c| {
            let logits = c.routing.logits(c.tokens, c.experts, SEEDS.routing);
            let chosen = top_k(&logits, c.tokens, c.experts, TOP_K);
            PlanRow {
                routing: c.routing,
                experts: c.experts,
                tokens: c.tokens,
                rows: c.tokens * TOP_K, // checked by check_config
                active_experts: active_experts(&chosen.ids, c.experts),
                gflop: flops(&c.shape()) / 1e9,
            }
        })
        .collect();
    let layer_plan: Vec<LayerPlanRow> = layers
        .iter()
        .map(|c| {
            let logits = LAYER_ROUTING.logits(c.tokens, c.experts(), SEEDS.routing);
            let chosen = top_k(&logits, c.tokens, c.experts(), GPT_OSS_TOP_K);
            let (forward, backward) = c.flops();
            LayerPlanRow {
                layer: c.layer,
                experts: c.experts(),
                tokens: c.tokens,
                rows: c.tokens * GPT_OSS_TOP_K, // checked by check_layer_config
                active_experts: active_experts(&chosen.ids, c.experts()),
                gflop_forward: forward / 1e9,
                gflop_forward_backward: (forward + backward) / 1e9,
            }
        })
        .collect();

    print_header(&header, &notes);
    let (results, layer_results) = match &gpu {
        Ok(gpu) => (
            measure_all(gpu, args, &configs, &strategies)?,
            measure_layers(gpu, args, &layers, &strategies)?,
        ),
        Err(reason) => {
            if !plan.is_empty() {
                print_plan(&plan);
            }
            if !layer_plan.is_empty() {
                print_layer_plan(&layer_plan);
            }
            println!("{reason}: no GPU available, nothing to time.");
            (Vec::new(), Vec::new())
        }
    };
    if !results.is_empty() {
        print_results(&results);
    }
    if !layer_results.is_empty() {
        print_layer_results(&layer_results);
    }
    if let Some(path) = &args.json {
        let problem = Problem {
            k: K,
            n: N,
            top_k: TOP_K,
            rank: RANK,
            scaling: SCALING,
            input: "scattered (x [T, K], token order)",
            output: "scattered ([T·k, N])",
            gates: false,
            weight_seed: WEIGHT_SEED,
            seeds: SEEDS,
        };
        let layer_problem = (!layers.is_empty()).then(|| LayerProblem {
            hidden: GPT_OSS_HIDDEN,
            intermediate: GPT_OSS_INTER,
            top_k: GPT_OSS_TOP_K,
            rank: RANK,
            scaling: SCALING,
            routing: LAYER_ROUTING,
            activation: gpt_oss_activation(),
            gate_up_layout: "interleaved",
            weight_seed: WEIGHT_SEED,
            bias_seed: BIAS_SEED,
            bias_scale: BIAS_SCALE,
            seeds: SEEDS,
        });
        let report = Report {
            tool: "mxmoe bench",
            header,
            problem,
            notes,
            plan,
            results,
            layer_problem,
            layer_plan,
            layer_results,
        };
        let mut text =
            serde_json::to_string_pretty(&report).context("could not serialize the results")?;
        text.push('\n');
        write_atomic(path, text.as_bytes())?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn header(gpu: Option<&Gpu>) -> anyhow::Result<Header> {
    let mut h = Header {
        device: None,
        compute_capability: None,
        sm_count: None,
        memory_mib: None,
        module: None,
        module_code: None,
        tma: None,
        driver: driver_description(),
        commit: commit(),
        date: utc_now(),
        kernels: Vec::new(),
    };
    if let Some(gpu) = gpu {
        let l = gpu.limits();
        h.device = Some(l.name.clone());
        h.compute_capability = Some(format!(
            "{}.{}",
            l.compute_capability.0, l.compute_capability.1
        ));
        h.sm_count = Some(l.sm_count);
        h.memory_mib = Some(l.total_mem_bytes as f64 / MIB);
        h.module = Some(gpu.module_selection().to_string());
        h.module_code = Some(gpu.module_code().to_string());
        h.tma = Some((gpu.tma(), gpu.tma_activations()));
        // The loaded module's entry points (the portable module has no `wgmma` rows).
        for &name in gpu.module().entries() {
            let r = gpu
                .function_resources(name)
                .with_context(|| format!("could not read the attributes of kernel {name}"))?;
            h.kernels.push(KernelInfo {
                name,
                registers: r.registers,
                static_smem_bytes: r.static_smem_bytes,
                local_bytes: r.local_bytes,
            });
        }
    }
    Ok(h)
}

/// The notes of the header: the projection benchmark's when `projection`, the gpt-oss layers'
/// when `layers`.
fn notes(args: &BenchArgs, projection: bool, layers: bool) -> Vec<String> {
    let mut notes = if projection {
        projection_notes(args)
    } else {
        Vec::new()
    };
    if layers {
        notes.extend([
            format!("gpt-oss layers: the whole MoE block (MoeBlock::gpt_oss): H = I = {GPT_OSS_HIDDEN}, top_k = {GPT_OSS_TOP_K}, E = 32 (gpt-oss-20b) or 128 (gpt-oss-120b); gate_up [E, 2I, H] with interleaved gate/up rows, down [E, H, I]; activation {}; frozen biases gate_up [E, 2I] and down [E, H]; LoRA r = {RANK}, s = {SCALING} on both projections; x [T, H] in token order, the routing's gates, dy [T, H].", gpt_oss_activation()),
            format!("gpt-oss data: W = randn/√K bf16 (seed {WEIGHT_SEED}, stream 0 gate_up, 1 down), biases {BIAS_SCALE}·randn (seed {BIAS_SEED}), LoRA A, B = 0.01·randn (seed 2), {} routing top-{GPT_OSS_TOP_K} of softmax(logits) renormalised (seed 1), x = randn (seed 3), dy = randn (seed 4).", LAYER_ROUTING.name()),
            format!("gpt-oss timing: per strategy, {} warm-up forward + backward iterations, then {} timed forward passes and {} timed forward + backward passes, each with its routing of the ids (resident on the device), one pair of CUDA events around each; the strategy applies to both projections (ran: A selective, B fused, gate_up/down when they differ).", args.warmup, args.iters, args.iters),
            "gpt-oss FLOPs: both projections' forward (2LKN + 2LKr + 2LrN) and backward terms as above, gate_up K = H, N = 2I, down K = I, N = H, L = T·top_k; the activation is not counted. Peak MiB covers both passes.".into(),
        ]);
    }
    notes
}

/// The projection benchmark's notes (SPEC §8).
fn projection_notes(args: &BenchArgs) -> Vec<String> {
    vec![
        format!("Problem (SPEC §8): K={K}, N={N}, top_k={TOP_K}, r={RANK}, s={SCALING}; x [T, K] in token order, scattered output [T·k, N], no gates."),
        "Data: W_store = randn(E, N, K)/√K bf16 (seed 0), LoRA A, B = 0.01·randn (seed 2), routing top-k of softmax(logits) (seed 1), x = randn (seed 3); our own generator, not torch's stream.".into(),
        "dy: a fixed random [T·k, N] gradient (seed 4) instead of SPEC §8's all ones (loss = out.sum()); constant data is not allowed in our runs and costs the kernels the same.".into(),
        format!("Timing: one pair of CUDA events around each routing of the ids (resident on the device) + forward + backward on the op stream; {} warm-up + {} timed iterations; median (min, max).", args.warmup, args.iters),
        "FLOPs: forward 2LKN + 2LKr + 2LrN; backward dX 2LNK + 2LrK, YB 2LNr, dA 2LrK, dB 2LNr (L = T·k, r = 16 unpadded).".into(),
        "GB/s: (weight traffic + x, out, dy, dx once each + active LoRA twice + dA, dB written) / median time; weight traffic = 2·E_a·stored bytes per expert (bf16 N·K·2, MXFP4 N·K/2 + N·K/32) for bf16 and B, E_a·(MXFP4 bytes + 3·N·K·2) for A (dequantize, write, read twice). GB/s (SPEC): REF's HBM formula, (E_a·N·K·2 for bf16 and A, E_a·MXFP4 bytes for B) + T·K·2, over the median time.".into(),
        "Peak MiB: memory-pool high-water mark (CU_MEMPOOL_ATTR_USED_MEM_HIGH, reset before the configuration's uploads) minus the pool usage before them; it includes the resident weights, inputs and LoRA. Where pools are unavailable: the largest cuMemGetInfo used-memory sample after the forward and after the backward of an untimed iteration, minus the sample before the uploads.".into(),
    ]
}

/// Runs every configuration for every strategy. Weights are generated once per expert count.
fn measure_all(
    gpu: &Runtime,
    args: &BenchArgs,
    configs: &[Config],
    strategies: &[Strategy],
) -> anyhow::Result<Vec<Row>> {
    let mut weights: Option<HostWeights> = None;
    let mut rows = Vec::new();
    let total = configs.len() * strategies.len();
    let mut done = 0;
    for c in configs {
        let shape = c.shape();
        let w: &HostWeights = match &mut weights {
            Some(w) if w.experts == c.experts => w,
            slot => {
                // Free the previous tensor (up to 1 GiB) before drawing the next one.
                *slot = None;
                eprintln!("generating W_store [{}, {N}, {K}] bf16", c.experts);
                let bits =
                    normal_bf16_bits(c.experts * N * K, 1.0 / (K as f32).sqrt(), WEIGHT_SEED, 0);
                slot.insert(HostWeights::new(bits, c.experts, N, K))
            }
        };
        let problem = HostProblem::draw(shape, c.routing, SEEDS)?;
        let active = active_experts(&problem.ids, c.experts);
        for &strategy in strategies {
            done += 1;
            eprintln!(
                "[{done}/{total}] {} {} E={} T={} (active {active}): measuring",
                strategy.label(),
                c.routing.name(),
                c.experts,
                c.tokens
            );
            let row = measure(gpu, args, strategy, c, &problem, w, active).with_context(|| {
                format!(
                    "the {} benchmark failed at {} routing, E = {}, T = {}",
                    strategy.label(),
                    c.routing.name(),
                    c.experts,
                    c.tokens
                )
            })?;
            eprintln!(
                "[{done}/{total}] {} {} E={} T={}: median {:.3} ms ({:.3}–{:.3}), peak {:.1} MiB",
                strategy.label(),
                c.routing.name(),
                c.experts,
                c.tokens,
                row.m.stats.median_ms,
                row.m.stats.min_ms,
                row.m.stats.max_ms,
                row.m.peak_mib()
            );
            rows.push(row);
        }
    }
    Ok(rows)
}

/// Device memory in use (`total − free`), bytes.
fn used_bytes(gpu: &Gpu) -> anyhow::Result<usize> {
    let (free, total) = gpu
        .mem_info()
        .context("could not read the device memory usage")?;
    Ok(total.saturating_sub(free))
}

/// The memory bookkeeping of one measured configuration: the device's used bytes when it started
/// (after a synchronize) and, where the driver's memory pool is watched, its usage and reset peak.
struct MemoryWatch<'g> {
    baseline: usize,
    pool: Option<(PoolWatch<'g>, u64)>,
}

impl<'g> MemoryWatch<'g> {
    /// Synchronizes, then takes the baselines (and resets the pool's peak).
    fn start(gpu: &'g Runtime) -> anyhow::Result<Self> {
        let pool = PoolWatch::new(gpu)?;
        gpu.synchronize()
            .context("the device did not become idle")?;
        let baseline = used_bytes(gpu)?;
        let pool = match pool {
            Some(p) => {
                p.reset_peak()?;
                let used = p.used()?;
                Some((p, used))
            }
            None => None,
        };
        Ok(Self { baseline, pool })
    }

    /// Bytes in use now above the start.
    fn used_since_start(&self, gpu: &Gpu) -> anyhow::Result<usize> {
        Ok(used_bytes(gpu)?.saturating_sub(self.baseline))
    }

    /// MiB of a sampled used-bytes value above the start.
    fn mib_above_start(&self, used: usize) -> f64 {
        used.saturating_sub(self.baseline) as f64 / MIB
    }

    /// The pool's peak above its usage at the start, in MiB (`None` without a watched pool).
    fn pool_peak_mib(&self) -> anyhow::Result<Option<f64>> {
        match &self.pool {
            Some((p, base)) => Ok(Some(p.peak()?.saturating_sub(*base) as f64 / MIB)),
            None => Ok(None),
        }
    }
}

/// Runs `warmup` untimed iterations of `step` (a forward + backward that calls the closure it is
/// given between the passes), then one more that samples the device's used bytes after the
/// forward and after the backward. Returns that iteration's result and the largest sample.
fn warm_up_and_sample<T>(
    gpu: &Runtime,
    warmup: usize,
    step: impl Fn(&mut dyn FnMut() -> anyhow::Result<()>) -> anyhow::Result<T>,
) -> anyhow::Result<(T, usize)> {
    for _ in 0..warmup {
        drop(step(&mut || Ok(()))?);
    }
    gpu.synchronize().context("the warm-up did not complete")?;
    let mut peak_sampled = used_bytes(gpu)?;
    let result = step(&mut || {
        gpu.synchronize()
            .context("the forward pass did not complete")?;
        peak_sampled = peak_sampled.max(used_bytes(gpu)?);
        Ok(())
    })?;
    gpu.synchronize()
        .context("the backward pass did not complete")?;
    peak_sampled = peak_sampled.max(used_bytes(gpu)?);
    Ok((result, peak_sampled))
}

fn measure(
    gpu: &Runtime,
    args: &BenchArgs,
    strategy: Strategy,
    c: &Config,
    problem: &HostProblem,
    w: &HostWeights,
    active: usize,
) -> anyhow::Result<Row> {
    let shape = c.shape();
    let memory = MemoryWatch::start(gpu)?;

    if strategy != Strategy::Bf16 {
        // Quantize (once per weight tensor) before the memory baseline is taken.
        w.mx()?;
    }
    let device = DeviceProblem::upload(gpu, strategy, problem, w)?;
    let resident = memory.used_since_start(gpu)?;
    let (result, peak_sampled) = warm_up_and_sample(gpu, args.warmup, |between| {
        device.forward_backward(gpu, between)
    })?;
    let ran = match (strategy, result.0.strategy) {
        (Strategy::Bf16, _) => "bf16",
        (_, op::Strategy::SelectiveDequant) => "A",
        (_, op::Strategy::Fused) => "B",
        (_, op::Strategy::Auto) => "auto",
    };
    drop(result);

    let timed = time_iterations(gpu, args.iters, || device.forward_backward(gpu, || Ok(())))?;

    let mem = MemoryMib {
        resident: resident as f64 / MIB,
        peak_sampled: memory.mib_above_start(peak_sampled),
        peak_pool: memory.pool_peak_mib()?,
    };
    drop(device);

    let m = Measured::new(args, timed, c.tokens, flops(&shape), mem);
    let seconds = m.seconds();
    let (bytes, spec_bytes) = (
        bytes(strategy, &shape, active),
        spec_bytes(strategy, &shape, active),
    );
    Ok(Row {
        strategy,
        ran,
        routing: c.routing,
        experts: c.experts,
        tokens: c.tokens,
        rows: shape.rows(),
        active_experts: active,
        slots_per_s: shape.rows() as f64 / seconds,
        bytes,
        gb_per_s: bytes / seconds / 1e9,
        spec_bytes,
        spec_gb_per_s: spec_bytes / seconds / 1e9,
        m,
    })
}

/// Times `iters` runs of `body`, each bracketed by its own pair of CUDA events on the op stream
/// (what `body` returns is dropped after the end event is recorded; the events are read after
/// the loop). Returns the per-iteration times in ms and the host wall clock of the whole
/// synchronized loop per iteration.
fn time_iterations<T>(
    gpu: &Runtime,
    iters: usize,
    mut body: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<(Vec<f64>, f64)> {
    let new_event = || {
        gpu.context()
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .context("could not create a CUDA event")
    };
    let events = (0..iters)
        .map(|_| Ok((new_event()?, new_event()?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    gpu.synchronize()
        .context("the device did not become idle")?;
    let wall = std::time::Instant::now();
    for (start, end) in &events {
        start
            .record(gpu.stream())
            .context("could not record a CUDA event")?;
        let result = body()?;
        end.record(gpu.stream())
            .context("could not record a CUDA event")?;
        drop(result);
    }
    gpu.synchronize()
        .context("the timed iterations did not complete")?;
    let wall_ms_per_iter = wall.elapsed().as_secs_f64() * 1e3 / iters as f64;
    let times_ms = events
        .iter()
        .map(|(s, e)| {
            s.elapsed_ms(e)
                .map(f64::from)
                .context("could not read a CUDA event time")
        })
        .collect::<anyhow::Result<Vec<f64>>>()?;
    Ok((times_ms, wall_ms_per_iter))
}

/// Summary of the timed iterations.
#[derive(Debug, serde::Serialize)]
struct Stats {
    median_ms: f64,
    min_ms: f64,
    max_ms: f64,
    mean_ms: f64,
}

/// Median (the mean of the middle two for an even count), minimum, maximum and mean of `times`
/// (at least one: `--iters` is positive).
fn stats(times: &[f64]) -> Stats {
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median_ms = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        0.5 * (sorted[n / 2 - 1] + sorted[n / 2])
    };
    Stats {
        median_ms,
        min_ms: sorted[0],
        max_ms: sorted[n - 1],
        mean_ms: sorted.iter().sum::<f64>() / n as f64,
    }
}

/// Runs every gpt-oss layer configuration for every strategy. Weights are drawn once per layer.
fn measure_layers(
    gpu: &Runtime,
    args: &BenchArgs,
    configs: &[LayerConfig],
    strategies: &[Strategy],
) -> anyhow::Result<Vec<LayerRow>> {
    let mut weights: Option<LayerWeights> = None;
    let mut rows = Vec::new();
    let total = configs.len() * strategies.len();
    let mut done = 0;
    for c in configs {
        let w: &LayerWeights = match &mut weights {
            Some(w) if w.layer == c.layer => w,
            slot => {
                // Free the previous layer's weights (up to 8 GB with their MXFP4 copy) first.
                *slot = None;
                slot.insert(LayerWeights::draw(c.layer))
            }
        };
        let problem = LayerHost::draw(*c);
        let active = active_experts(&problem.ids, c.experts());
        for &strategy in strategies {
            done += 1;
            let what = format!(
                "{} {} T={} (active {active}/{})",
                strategy.label(),
                c.layer.name(),
                c.tokens,
                c.experts()
            );
            eprintln!("[{done}/{total}] {what}: measuring");
            let [fwd, fwd_bwd] = measure_layer(gpu, args, strategy, &problem, w, active)
                .with_context(|| {
                    format!(
                        "the {} benchmark failed at the {} layer, T = {}",
                        strategy.label(),
                        c.layer.name(),
                        c.tokens
                    )
                })?;
            eprintln!(
                "[{done}/{total}] {what}: forward median {:.3} ms, forward + backward median {:.3} ms ({:.3}–{:.3}), peak {:.1} MiB",
                fwd.m.stats.median_ms,
                fwd_bwd.m.stats.median_ms,
                fwd_bwd.m.stats.min_ms,
                fwd_bwd.m.stats.max_ms,
                fwd_bwd.m.peak_mib()
            );
            rows.extend([fwd, fwd_bwd]);
        }
    }
    Ok(rows)
}

/// Measures one gpt-oss layer configuration in one strategy: the forward alone and forward +
/// backward, each `args.iters` times after `args.warmup` forward + backward warm-ups.
fn measure_layer(
    gpu: &Runtime,
    args: &BenchArgs,
    strategy: Strategy,
    problem: &LayerHost,
    w: &LayerWeights,
    active: usize,
) -> anyhow::Result<[LayerRow; 2]> {
    let c = problem.config;
    let memory = MemoryWatch::start(gpu)?;

    if strategy != Strategy::Bf16 {
        // Quantize (once per weight tensor) before the memory baseline is taken.
        w.gate_up.mx()?;
        w.down.mx()?;
    }
    let device = LayerDevice::upload(gpu, strategy, problem, w)?;
    let resident = memory.used_since_start(gpu)?;
    let (result, peak_sampled) = warm_up_and_sample(gpu, args.warmup, |between| {
        device.forward_backward(gpu, between)
    })?;
    let ran = layer_ran(strategy, result.1.strategies());
    drop(result);

    let forward = time_iterations(gpu, args.iters, || device.forward(gpu))?;
    let forward_backward =
        time_iterations(gpu, args.iters, || device.forward_backward(gpu, || Ok(())))?;

    let mem = MemoryMib {
        resident: resident as f64 / MIB,
        peak_sampled: memory.mib_above_start(peak_sampled),
        peak_pool: memory.pool_peak_mib()?,
    };
    drop(device);

    let (flops_forward, flops_backward) = c.flops();
    let row = |pass: Pass, timed: (Vec<f64>, f64), flops: f64| LayerRow {
        strategy,
        ran: ran.clone(),
        layer: c.layer,
        pass,
        experts: c.experts(),
        tokens: c.tokens,
        rows: c.tokens * GPT_OSS_TOP_K, // checked by check_layer_config
        active_experts: active,
        m: Measured::new(args, timed, c.tokens, flops, mem),
    };
    Ok([
        row(Pass::Forward, forward, flops_forward),
        row(
            Pass::ForwardBackward,
            forward_backward,
            flops_forward + flops_backward,
        ),
    ])
}

fn print_header(h: &Header, notes: &[String]) {
    println!("# mxmoe bench");
    println!();
    match &h.device {
        Some(name) => println!(
            "- card: {name} (compute capability {}, {} SMs, {:.0} MiB)",
            h.compute_capability.as_deref().unwrap_or("?"),
            h.sm_count.unwrap_or(0),
            h.memory_mib.unwrap_or(0.0)
        ),
        None => println!("- card: none"),
    }
    if let Some(module) = &h.module {
        println!("- PTX module: {module}");
    }
    if let Some(code) = &h.module_code {
        println!("- module code: {code}");
    }
    if let Some((weights, rows)) = h.tma {
        let how = |tma: bool| if tma { "TMA" } else { "cp.async" };
        println!(
            "- wgmma kernels: weight tiles by {}, grouped activation rows by {} ({}={})",
            how(weights),
            how(rows),
            mxmoe::device::TMA_ENV,
            match (weights, rows) {
                (true, true) => "on",
                (true, false) => "weights",
                (false, false) => "off",
                (false, true) => "activations only (set_tma_activations)",
            }
        );
    }
    println!("- driver: {}", h.driver);
    println!("- commit: {}", h.commit);
    println!("- date: {}", h.date);
    for n in notes {
        println!("- {n}");
    }
    println!();
}

fn print_plan(plan: &[PlanRow]) {
    println!("| routing | E | T | L = T·k | active/E | GFLOP/iter |");
    println!("|---|---:|---:|---:|---:|---:|");
    for p in plan {
        println!(
            "| {} | {} | {} | {} | {}/{} | {:.1} |",
            p.routing.name(),
            p.experts,
            p.tokens,
            p.rows,
            p.active_experts,
            p.experts,
            p.gflop
        );
    }
    println!();
}

fn print_results(rows: &[Row]) {
    println!(
        "| strategy (ran) | routing | E | T | active/E | median ms | min ms | max ms | tokens/s | slots/s | TFLOP/s | GB/s | GB/s (SPEC) | resident MiB | peak MiB |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} ({}) | {} | {} | {} | {}/{} | {:.3} | {:.3} | {:.3} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            r.strategy.label(),
            r.ran,
            r.routing.name(),
            r.experts,
            r.tokens,
            r.active_experts,
            r.experts,
            r.m.stats.median_ms,
            r.m.stats.min_ms,
            r.m.stats.max_ms,
            r.m.tokens_per_s,
            r.slots_per_s,
            r.m.tflops,
            r.gb_per_s,
            r.spec_gb_per_s,
            r.m.resident_mib,
            r.m.peak_mib()
        );
    }
    println!();
}

fn print_layer_plan(plan: &[LayerPlanRow]) {
    println!(
        "| layer | E | H = I | top_k | T | L = T·k | active/E | GFLOP forward | GFLOP forward + backward |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for p in plan {
        println!(
            "| {} | {} | {GPT_OSS_HIDDEN} | {GPT_OSS_TOP_K} | {} | {} | {}/{} | {:.1} | {:.1} |",
            p.layer.name(),
            p.experts,
            p.tokens,
            p.rows,
            p.active_experts,
            p.experts,
            p.gflop_forward,
            p.gflop_forward_backward
        );
    }
    println!();
}

fn print_layer_results(rows: &[LayerRow]) {
    println!(
        "| strategy (ran) | layer | pass | E | T | active/E | median ms | min ms | max ms | tokens/s | TFLOP/s | resident MiB | peak MiB |"
    );
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} ({}) | {} | {} | {} | {} | {}/{} | {:.3} | {:.3} | {:.3} | {:.0} | {:.1} | {:.1} | {:.1} |",
            r.strategy.label(),
            r.ran,
            r.layer.name(),
            r.pass.name(),
            r.experts,
            r.tokens,
            r.active_experts,
            r.experts,
            r.m.stats.median_ms,
            r.m.stats.min_ms,
            r.m.stats.max_ms,
            r.m.tokens_per_s,
            r.m.tflops,
            r.m.resident_mib,
            r.m.peak_mib()
        );
    }
    println!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Args as _;

    #[test]
    fn flop_count_matches_the_spec_terms() {
        let s = Config {
            routing: RoutingKind::Dense,
            experts: 128,
            tokens: 4096,
        }
        .shape();
        let l = 4096.0 * 8.0;
        let expected =
            4.0 * l * 2048.0 * 1024.0 + 6.0 * l * 2048.0 * 16.0 + 6.0 * l * 1024.0 * 16.0;
        assert_eq!(flops(&s), expected);
    }

    #[test]
    fn spec_bytes_match_ref_formula() {
        let s = Config {
            routing: RoutingKind::Dense,
            experts: 128,
            tokens: 4096,
        }
        .shape();
        assert_eq!(
            spec_bytes(Strategy::Bf16, &s, 128),
            (128 * 2048 * 1024 * 2 + 4096 * 2048 * 2) as f64
        );
    }

    /// Parses `mxmoe bench` arguments (everything after the subcommand name).
    fn parse(argv: &[&str]) -> BenchArgs {
        use clap::FromArgMatches as _;
        let cmd = BenchArgs::augment_args(clap::Command::new("bench"));
        let matches = cmd
            .try_get_matches_from(std::iter::once("bench").chain(argv.iter().copied()))
            .unwrap();
        BenchArgs::from_arg_matches(&matches).unwrap()
    }

    #[test]
    fn measured_rows_serialize_flat_with_their_rates() {
        let args = parse(&["--iters", "3", "--warmup", "2"]);
        let mem = MemoryMib {
            resident: 10.0,
            peak_sampled: 12.0,
            peak_pool: None,
        };
        let m = Measured::new(&args, (vec![2.0, 1.0, 4.0], 2.5), 1000, 2e9, mem);
        assert_eq!((m.stats.median_ms, m.seconds()), (2.0, 2e-3));
        assert_eq!((m.tokens_per_s, m.tflops), (5e5, 1.0));
        assert_eq!(m.peak_mib(), 12.0);
        let json = serde_json::to_value(&m).unwrap();
        for key in [
            "warmup",
            "iters",
            "median_ms",
            "min_ms",
            "max_ms",
            "mean_ms",
            "tflops",
            "times_ms",
        ] {
            assert!(json.get(key).is_some(), "{key} in {json}");
        }
        assert_eq!(json["iters"], 3);
    }

    #[test]
    fn shapes_select_projection_regimes_and_gpt_oss_layers() {
        // The default is the projection benchmark alone, as before the layers existed.
        let default = parse(&[]);
        assert_eq!(default.shape, [ShapeArg::All]);
        assert_eq!(configs(&default).len(), 6);
        assert!(layer_configs(&default).is_empty());

        let both = parse(&["--shape", "gpt-oss-120b,gpt-oss-20b"]);
        let layers: Vec<(Layer, usize)> = layer_configs(&both)
            .iter()
            .map(|c| (c.layer, c.tokens))
            .collect();
        assert_eq!(
            layers,
            [(Layer::GptOss20b, 4096), (Layer::GptOss120b, 4096)]
        );
        assert!(configs(&both).is_empty());
        assert_eq!(
            (Layer::GptOss20b.experts(), Layer::GptOss120b.experts()),
            (32, 128)
        );

        let mixed = parse(&["--shape", "dense,gpt-oss-20b", "--tokens", "128,512"]);
        let projection: Vec<(RoutingKind, usize)> = configs(&mixed)
            .iter()
            .map(|c| (c.routing, c.tokens))
            .collect();
        assert_eq!(
            projection,
            [(RoutingKind::Dense, 128), (RoutingKind::Dense, 512)]
        );
        let tokens: Vec<usize> = layer_configs(&mixed).iter().map(|c| c.tokens).collect();
        assert_eq!(tokens, [128, 512]);

        let help = BenchArgs::augment_args(clap::Command::new("bench"))
            .render_long_help()
            .to_string();
        for needle in [
            "gpt-oss-20b",
            "gpt-oss-120b",
            "E = 128, H = I = 2880, top_k = 4",
        ] {
            assert!(help.contains(needle), "`{needle}` not in:\n{help}");
        }
    }

    #[test]
    fn layer_flops_count_both_projections_with_lora() {
        let c = LayerConfig {
            layer: Layer::GptOss120b,
            tokens: 4096,
        };
        let (l, h, i, r) = (4096.0 * 4.0, 2880.0, 2880.0, 16.0);
        let forward = 2.0 * l * h * (2.0 * i)
            + 2.0 * l * h * r
            + 2.0 * l * r * (2.0 * i)
            + 2.0 * l * i * h
            + 2.0 * l * i * r
            + 2.0 * l * r * h;
        let (f, b) = c.flops();
        assert!((f - forward).abs() <= 1e-9 * forward, "{f} vs {forward}");
        // The backward's dX GEMMs match the forward's base GEMMs; LoRA adds 4 rank terms each.
        let base = 2.0 * l * h * (2.0 * i) + 2.0 * l * i * h;
        let lora_bwd =
            4.0 * l * r * h + 4.0 * l * (2.0 * i) * r + 4.0 * l * r * i + 4.0 * l * h * r;
        assert!((b - (base + lora_bwd)).abs() <= 1e-9 * b, "{b}");
        // Same numbers for either layer at the same T: the experts only change the weights.
        let small = LayerConfig {
            layer: Layer::GptOss20b,
            ..c
        };
        assert_eq!(small.flops(), c.flops());
    }

    #[test]
    fn layer_sizes_are_checked_before_anything_is_drawn() {
        let c = LayerConfig {
            layer: Layer::GptOss120b,
            tokens: usize::MAX / 2,
        };
        let e = check_layer_config(&c, Strategy::ALL, None).unwrap_err();
        assert!(
            matches!(
                e.downcast_ref::<mxmoe::Error>(),
                Some(mxmoe::Error::SizeOverflow { .. })
            ),
            "{e:#}"
        );
        assert!(e.to_string().contains("gpt-oss-120b"), "{e:#}");
        let fine = LayerConfig {
            layer: Layer::GptOss20b,
            tokens: 4096,
        };
        check_layer_config(&fine, Strategy::ALL, None).unwrap();
    }

    #[test]
    fn layer_ran_names_each_projection_path() {
        use op::Strategy::{Fused, SelectiveDequant};
        assert_eq!(layer_ran(Strategy::Bf16, (Fused, Fused)), "bf16");
        assert_eq!(layer_ran(Strategy::Mxfp4B, (Fused, Fused)), "B");
        assert_eq!(
            layer_ran(Strategy::Mxfp4A, (SelectiveDequant, SelectiveDequant)),
            "A"
        );
        assert_eq!(
            layer_ran(Strategy::Mxfp4Auto, (SelectiveDequant, Fused)),
            "A/B"
        );
    }

    #[test]
    fn stats_take_the_middle_of_the_sorted_times() {
        let s = stats(&[3.0, 1.0, 2.0, 10.0]);
        assert_eq!(
            (s.median_ms, s.min_ms, s.max_ms, s.mean_ms),
            (2.5, 1.0, 10.0, 4.0)
        );
        assert_eq!(stats(&[5.0, 1.0, 4.0]).median_ms, 4.0);
    }
}
