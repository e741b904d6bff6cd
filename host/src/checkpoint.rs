//! Safetensors checkpoints: MXFP4 expert weights in the two layouts users have (SPEC §1.3),
//! typed reads of other tensors by name, and the file quantizer behind `mxmoe quantize`.
//!
//! # MXFP4 layouts
//!
//! Both layouts hold exactly the bytes of an [`MxWeights`] for a weight `W_store [E, N, K]`
//! (block axis K, even k in the low nibble, E8M0 scales with bias 127); only the tensor names and
//! the shape of the code tensor differ:
//!
//! | [`MxLayoutKind`] | codes | scales |
//! |---|---|---|
//! | `Torchao` (torchao / axolotl) | `<name>.packed` u8 `[E, N, K/2]` | `<name>.scales` u8 `[E, N, K/32]` |
//! | `GptOss` (OpenAI gpt-oss) | `<name>_blocks` u8 `[E, N, K/32, 16]` | `<name>_scales` u8 `[E, N, K/32]` |
//!
//! Readers auto-detect the layout ([`Checkpoint::read_mx`]). They also accept torchao's own
//! attribute names `<name>.qdata` (codes) and `<name>.scale` (scales), and scales stored with the
//! safetensors dtype `F8_E8M0` (PyTorch's `float8_e8m0fnu`), whose bytes are the same. Writers
//! ([`CheckpointWriter::add_mx`]) always use the names of the table, dtype `U8`.
//!
//! # Metadata written by [`quantize_file`]
//!
//! The input's `__metadata__` is kept; these keys are added (or replaced):
//! [`META_FORMAT`] = `"mxfp4"`, [`META_LAYOUT`] = `"torchao"` or `"gpt-oss"`,
//! [`META_QUANTIZER`] = [`QUANTIZER_ID`], [`META_VERSION`] = this crate's version,
//! [`META_QUANTIZED`] = a JSON object `{name: {"dtype", "shape", "packed", "scales"}}` naming
//! every quantized tensor, its source dtype and `[E, N, K]`, and the two tensors that replaced it,
//! and, when the caller names it, [`META_SOURCE`] = the input file.
//!
//! # NaN and extreme scales
//!
//! An E8M0 scale byte of 255 is NaN: all 32 weights of its block dequantize to NaN and carry NaN
//! into every output and gradient that reads them (`out`, `dx`, `d_gates`, dA, dB). The readers
//! ([`Checkpoint::read_mx`], [`Checkpoint::read_expert_weights`], [`read_mx`]) reject such
//! weights by default with [`Kind::NanScale`], naming the tensor, expert, row and block;
//! [`Checkpoint::allow_nan_scales`] opts in to torchao's behaviour (accept and propagate).
//! Bytes 253 and 254 (2^126 and 2^127) are finite and accepted, but code × scale overflows the
//! bf16 (and f32) range, about 3.4e38, to ±Inf for codes of magnitude 4 and 6 under byte 253 and
//! of magnitude 2 and more under byte 254, in the kernels and the CPU dequantizer alike; torchao's
//! quantizer writes byte 253 with saturated codes for a block holding an infinite value, so such
//! a weight decodes to ±Inf again. Byte 0 is 2^-127, a bf16 subnormal, kept.
//!
//! # Errors
//!
//! Every malformed input is an [`Error::Checkpoint`] whose `kind` ([`CheckpointErrorKind`]) tells
//! the cases apart and whose `detail` names the tensor, e.g. `tensor dtype: \`x\` is F32,
//! expected BF16`. Truncated files are diagnosed by
//! reading the header directly, so the message names the first tensor whose bytes are missing.
//! Names and metadata taken from a file are escaped in messages ([`escape`]): a control
//! character (a newline, an ANSI escape) is printed as `\n` or `\u{1b}`, so an error stays one
//! line and cannot restyle the terminal.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;

use safetensors::tensor::{SafeTensors, TensorView, View};

pub use safetensors::Dtype;

use crate::error::{Error, Result};
use crate::mxfp4::{MxShape, MxWeights, dequantize_f32, quantize_mxfp4, quantize_mxfp4_bf16};
use crate::nvfp4::{NV_BLOCK, NvShape, NvWeights};
use crate::shared::bf16::{bf16_bits_to_f32, f32_to_bf16_bits};
use crate::shared::mxfp4::{MX_BLOCK, MX_BLOCK_BYTES};

pub use crate::error::CheckpointErrorKind;
use CheckpointErrorKind as Kind;

/// Metadata key: the weight format of quantized tensors (`"mxfp4"`).
pub const META_FORMAT: &str = "mxmoe.format";
/// Metadata key: the MXFP4 layout written ([`MxLayoutKind::name`]).
pub const META_LAYOUT: &str = "mxmoe.layout";
/// Metadata key: which quantizer produced the codes ([`QUANTIZER_ID`]).
pub const META_QUANTIZER: &str = "mxmoe.quantizer";
/// Metadata key: JSON object describing every quantized tensor (see the module documentation).
pub const META_QUANTIZED: &str = "mxmoe.quantized";
/// Metadata key: the mxmoe version that wrote the file.
pub const META_VERSION: &str = "mxmoe.version";
/// Metadata key: the source file of a quantization, when the caller gives one.
pub const META_SOURCE: &str = "mxmoe.source";
/// Value of [`META_QUANTIZER`]: the bit-exact port of torchao v0.17.0's
/// `MXTensor.to_mx(w, float4_e2m1fn_x2, block_size=32)` in FLOOR mode (SPEC §1.4).
pub const QUANTIZER_ID: &str = "torchao-0.17.0 MXTensor.to_mx FLOOR, e2m1, block 32";

fn err(kind: Kind, detail: impl Into<String>) -> Error {
    Error::Checkpoint {
        kind,
        detail: detail.into(),
    }
}

/// `s` with every control character escaped (`\n`, `\t`, `\u{1b}`, …), for names and metadata
/// read from a file and printed in a message: the message stays on one line and cannot carry
/// terminal escape sequences. Other characters are kept as they are.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A shape as `[a, b, c]`.
fn shape_str(shape: &[usize]) -> String {
    format!("{shape:?}")
}

/// Element count of a shape, or `None` on overflow.
fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Bytes of a tensor of `dtype` and `shape`, or `None` on overflow or a partial byte.
fn checked_bytes(dtype: Dtype, shape: &[usize]) -> Option<usize> {
    let bits = checked_numel(shape)?.checked_mul(dtype.bitsize())?;
    bits.is_multiple_of(8).then_some(bits / 8)
}

/// Which of the two MXFP4 checkpoint layouts (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum MxLayoutKind {
    /// torchao / axolotl: `<name>.packed` `[E, N, K/2]` + `<name>.scales` `[E, N, K/32]`.
    #[default]
    Torchao,
    /// gpt-oss: `<name>_blocks` `[E, N, K/32, 16]` + `<name>_scales` `[E, N, K/32]`.
    GptOss,
}

impl MxLayoutKind {
    /// Both layouts.
    pub const ALL: [MxLayoutKind; 2] = [MxLayoutKind::Torchao, MxLayoutKind::GptOss];

    /// The layout's name: `"torchao"` or `"gpt-oss"` (as in [`META_LAYOUT`] and on the command line).
    pub const fn name(self) -> &'static str {
        match self {
            MxLayoutKind::Torchao => "torchao",
            MxLayoutKind::GptOss => "gpt-oss",
        }
    }

    /// The `(codes, scales)` tensor names this layout writes for weight `name`.
    pub fn tensor_names(self, name: &str) -> (String, String) {
        match self {
            MxLayoutKind::Torchao => (format!("{name}.packed"), format!("{name}.scales")),
            MxLayoutKind::GptOss => (format!("{name}_blocks"), format!("{name}_scales")),
        }
    }
}

impl fmt::Display for MxLayoutKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for MxLayoutKind {
    type Err = Error;

    /// Parses `torchao` (or `axolotl`) and `gpt-oss` (or `gpt_oss`, `gptoss`), ignoring case.
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "torchao" | "axolotl" => Ok(MxLayoutKind::Torchao),
            "gpt-oss" | "gpt_oss" | "gptoss" => Ok(MxLayoutKind::GptOss),
            _ => Err(Error::InvalidArgument {
                what: "MXFP4 layout",
                detail: format!(
                    "unknown layout `{}` (expected torchao or gpt-oss)",
                    escape(s)
                ),
            }),
        }
    }
}

/// A tensor read from a checkpoint: its name, stored dtype, shape and (decoded) elements,
/// row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor<T> {
    /// Name in the file.
    pub name: String,
    /// Dtype in the file (before any widening).
    pub dtype: Dtype,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Elements, row-major (`shape.iter().product()` of them).
    pub data: Vec<T>,
}

impl<T> Tensor<T> {
    /// Checks the shape against `expected`, where `None` accepts any extent; `dims` names the
    /// dimensions for the message (for example `"(T, K)"`). Errors with [`Kind::Shape`].
    pub fn expect_shape(&self, expected: &[Option<usize>], dims: &str) -> Result<()> {
        let ok = self.shape.len() == expected.len()
            && self
                .shape
                .iter()
                .zip(expected)
                .all(|(&have, want)| want.is_none_or(|w| w == have));
        if ok {
            return Ok(());
        }
        let want: Vec<String> = expected
            .iter()
            .map(|d| d.map_or_else(|| "?".to_string(), |v| v.to_string()))
            .collect();
        Err(err(
            Kind::Shape,
            format!(
                "`{}` has shape {}, expected [{}] {dims}",
                escape(&self.name),
                shape_str(&self.shape),
                want.join(", ")
            ),
        ))
    }

    /// The two extents of a rank-2 tensor; any other rank errors with [`Kind::Shape`] (`dims`
    /// names the dimensions, for example `"(T, k)"`).
    pub fn dims2(&self, dims: &str) -> Result<(usize, usize)> {
        self.expect_shape(&[None, None], dims)?;
        Ok((self.shape[0], self.shape[1]))
    }

    /// The three extents of a rank-3 tensor; any other rank errors with [`Kind::Shape`].
    pub fn dims3(&self, dims: &str) -> Result<(usize, usize, usize)> {
        self.expect_shape(&[None, None, None], dims)?;
        Ok((self.shape[0], self.shape[1], self.shape[2]))
    }
}

/// Expert weights `W_store [E, N, K]` as a checkpoint stores them: dense or MXFP4.
#[derive(Debug, Clone, PartialEq)]
pub enum StoredWeights {
    /// Dense weights (bf16, f16 or f32 in the file), widened to f32 (exactly, for bf16 and f16).
    Dense(Tensor<f32>),
    /// MXFP4 weights and the layout they were stored in.
    Mx {
        /// The validated container.
        weights: MxWeights,
        /// The layout found in the file.
        layout: MxLayoutKind,
    },
    /// NVFP4 weights stacked `[E, N, K]` ([`Checkpoint::read_nv`]); boxed, so the enum stays
    /// the size of the other variants.
    Nv(Box<NvWeights>),
}

impl StoredWeights {
    /// `(E, N, K)`.
    pub fn dims(&self) -> (usize, usize, usize) {
        match self {
            StoredWeights::Dense(t) => (t.shape[0], t.shape[1], t.shape[2]),
            StoredWeights::Mx { weights, .. } => {
                let s = weights.shape();
                (s.experts(), s.n(), s.k())
            }
            StoredWeights::Nv(w) => {
                let s = w.shape();
                (s.experts(), s.n(), s.k())
            }
        }
    }

    /// The dense values `[E, N, K]` (MXFP4 weights dequantized exactly, SPEC §1.5).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            StoredWeights::Dense(t) => t.data.clone(),
            StoredWeights::Mx { weights, .. } => dequantize_f32(weights),
            StoredWeights::Nv(w) => crate::nvfp4::dequantize_nvfp4_f32(w),
        }
    }

    /// A short description: `"bf16 [8, 256, 512]"` or `"mxfp4 (gpt-oss) [8, 256, 512]"`.
    pub fn describe(&self) -> String {
        let (e, n, k) = self.dims();
        match self {
            StoredWeights::Dense(t) => format!("{} [{e}, {n}, {k}]", t.dtype),
            StoredWeights::Mx { layout, .. } => format!("MXFP4 ({layout}) [{e}, {n}, {k}]"),
            StoredWeights::Nv(w) => match w.tensor_scales() {
                Some(_) => format!("NVFP4 (two-level, {} group(s)) [{e}, {n}, {k}]", w.groups()),
                None => format!("NVFP4 [{e}, {n}, {k}]"),
            },
        }
    }
}

/// A parsed safetensors file, borrowing its bytes: typed, checked reads by tensor name.
pub struct Checkpoint<'a> {
    st: SafeTensors<'a>,
    metadata: BTreeMap<String, String>,
    allow_nan_scales: bool,
}

impl fmt::Debug for Checkpoint<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkpoint")
            .field("tensors", &self.names())
            .field("metadata", &self.metadata)
            .finish()
    }
}

impl<'a> Checkpoint<'a> {
    /// Parses a whole safetensors file. Errors: [`Kind::Truncated`] naming the first tensor whose
    /// data is cut off (or the header), [`Kind::Dtype`] / [`Kind::Shape`] for a header entry whose
    /// dtype is unknown or whose shape disagrees with its byte range, [`Kind::Format`] otherwise.
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        if let Some(name) = duplicate_header_key(bytes) {
            return Err(err(
                Kind::Name,
                format!(
                    "the header lists tensor `{}` more than once; every name must be unique",
                    escape(&name)
                ),
            ));
        }
        let st = SafeTensors::deserialize(bytes).map_err(|e| diagnose(bytes, &e))?;
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| diagnose(bytes, &e))?;
        let metadata = meta
            .metadata()
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        Ok(Self {
            st,
            metadata,
            allow_nan_scales: false,
        })
    }

    /// Whether MXFP4 reads accept the NaN scale byte 255 (default `false`: rejected with
    /// [`Kind::NanScale`]). `true` keeps torchao's behaviour: the blocks dequantize to NaN and
    /// propagate (see the module documentation).
    pub fn allow_nan_scales(mut self, allow: bool) -> Self {
        self.allow_nan_scales = allow;
        self
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names = self.st.names();
        names.sort_unstable();
        names
    }

    /// Whether the file holds a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.st.tensor(name).is_ok()
    }

    /// The `__metadata__` map (empty when the file has none).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// One `__metadata__` value.
    pub fn metadata_value(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }

    /// The raw view of a tensor, or [`Kind::Missing`] naming it (and listing a few present names).
    pub fn view(&self, name: &str) -> Result<TensorView<'a>> {
        self.st.tensor(name).map_err(|_| {
            let names = self.names();
            let shown: Vec<String> = names
                .iter()
                .take(8)
                .map(|n| format!("`{}`", escape(n)))
                .collect();
            let more = if names.len() > shown.len() {
                format!(" and {} more", names.len() - shown.len())
            } else {
                String::new()
            };
            let has = if names.is_empty() {
                "the file holds no tensors".to_string()
            } else {
                format!("the file holds {}{more}", shown.join(", "))
            };
            err(
                Kind::Missing,
                format!("`{}` is not in the file ({has})", escape(name)),
            )
        })
    }

    /// Reads `name` if its dtype is one of `accept`, decoding with `decode`.
    fn read_as<T>(
        &self,
        name: &str,
        accept: &[Dtype],
        expected: &str,
        decode: impl Fn(Dtype, &[u8]) -> Vec<T>,
    ) -> Result<Tensor<T>> {
        let view = self.view(name)?;
        if !accept.contains(&view.dtype()) {
            return Err(err(
                Kind::Dtype,
                format!(
                    "`{}` is {}, expected {expected}",
                    escape(name),
                    view.dtype()
                ),
            ));
        }
        Ok(Tensor {
            name: name.to_string(),
            dtype: view.dtype(),
            shape: view.shape().to_vec(),
            data: decode(view.dtype(), view.data()),
        })
    }

    /// A `U8` tensor.
    pub fn read_u8(&self, name: &str) -> Result<Tensor<u8>> {
        self.read_as(name, &[Dtype::U8], "U8", |_, b| b.to_vec())
    }

    /// A `BF16` tensor as raw bf16 bits.
    pub fn read_bf16(&self, name: &str) -> Result<Tensor<u16>> {
        self.read_as(name, &[Dtype::BF16], "BF16", |_, b| le_u16(b))
    }

    /// An `F32` tensor.
    pub fn read_f32(&self, name: &str) -> Result<Tensor<f32>> {
        self.read_as(name, &[Dtype::F32], "F32", |_, b| le_f32(b))
    }

    /// A floating-point tensor (`BF16`, `F16` or `F32`) widened to f32 (exact).
    pub fn read_float(&self, name: &str) -> Result<Tensor<f32>> {
        self.read_as(
            name,
            &[Dtype::BF16, Dtype::F16, Dtype::F32],
            "BF16, F16 or F32",
            |dtype, b| match dtype {
                Dtype::BF16 => le_u16(b).into_iter().map(bf16_bits_to_f32).collect(),
                Dtype::F16 => le_u16(b)
                    .into_iter()
                    .map(|h| half::f16::from_bits(h).to_f32())
                    .collect(),
                _ => le_f32(b),
            },
        )
    }

    /// An `I32` tensor.
    pub fn read_i32(&self, name: &str) -> Result<Tensor<i32>> {
        self.read_as(name, &[Dtype::I32], "I32", |_, b| {
            b.chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
    }

    /// An `I64` tensor.
    pub fn read_i64(&self, name: &str) -> Result<Tensor<i64>> {
        self.read_as(name, &[Dtype::I64], "I64", |_, b| le_i64(b))
    }

    /// An index tensor stored as `I32` or `I64`, widened to i64.
    pub fn read_index(&self, name: &str) -> Result<Tensor<i64>> {
        self.read_as(name, &[Dtype::I32, Dtype::I64], "I32 or I64", |dtype, b| {
            if dtype == Dtype::I32 {
                b.chunks_exact(4)
                    .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                    .collect()
            } else {
                le_i64(b)
            }
        })
    }

    /// The scale tensor of an MXFP4 weight: `U8` or `F8_E8M0` bytes.
    fn read_scales(&self, name: &str) -> Result<Tensor<u8>> {
        self.read_as(
            name,
            &[Dtype::U8, Dtype::F8_E8M0],
            "U8 or F8_E8M0",
            |_, b| b.to_vec(),
        )
    }

    /// Which layout stores MXFP4 weight `name`, and the `(codes, scales)` tensor names.
    ///
    /// Errors: [`Kind::Missing`] when neither layout's tensors exist, or when one of a pair is
    /// missing (naming the missing one); [`Kind::Name`] when both layouts are present.
    pub fn find_mx(&self, name: &str) -> Result<(MxLayoutKind, String, String)> {
        let first = |suffixes: &[&str]| {
            suffixes
                .iter()
                .map(|s| format!("{name}{s}"))
                .find(|n| self.contains(n))
        };
        let (t_codes, t_scales) = (first(&[".packed", ".qdata"]), first(&[".scales", ".scale"]));
        let (g_codes, g_scales) = (first(&["_blocks"]), first(&["_scales"]));
        let torchao = t_codes.is_some() || t_scales.is_some();
        let gpt_oss = g_codes.is_some() || g_scales.is_some();
        // Names in messages are escaped; the lookups above used the name as given.
        let name = escape(name);
        let pair = |layout: MxLayoutKind, codes: Option<String>, scales: Option<String>| {
            let (want_codes, want_scales) = layout.tensor_names(&name);
            match (codes, scales) {
                (Some(c), Some(s)) => Ok((layout, c, s)),
                (Some(c), None) => Err(err(
                    Kind::Missing,
                    format!(
                        "`{want_scales}` is not in the file (the scales of MXFP4 weight `{name}`, whose codes `{}` are present)",
                        escape(&c)
                    ),
                )),
                (None, Some(s)) => Err(err(
                    Kind::Missing,
                    format!(
                        "`{want_codes}` is not in the file (the codes of MXFP4 weight `{name}`, whose scales `{}` are present)",
                        escape(&s)
                    ),
                )),
                (None, None) => unreachable!("called only when one of the pair exists"),
            }
        };
        match (torchao, gpt_oss) {
            (true, false) => pair(MxLayoutKind::Torchao, t_codes, t_scales),
            (false, true) => pair(MxLayoutKind::GptOss, g_codes, g_scales),
            (true, true) => Err(err(
                Kind::Name,
                format!(
                    "MXFP4 weight `{name}` is stored in both the torchao layout (`{name}.packed`/`.scales`) and the gpt-oss layout (`{name}_blocks`/`_scales`); keep one"
                ),
            )),
            (false, false) => Err(err(
                Kind::Missing,
                format!(
                    "no MXFP4 weight `{name}`: looked for `{name}.packed` + `{name}.scales` (torchao; also `.qdata`/`.scale`) and `{name}_blocks` + `{name}_scales` (gpt-oss)"
                ),
            )),
        }
    }

    /// Reads MXFP4 weight `name` in whichever layout the file uses (see [`Checkpoint::find_mx`]).
    ///
    /// Checks, naming the offending tensor: codes dtype `U8` and scales `U8` or `F8_E8M0`
    /// ([`Kind::Dtype`]); codes rank 3 `[E, N, K/2]` (torchao) or rank 4 `[E, N, K/32, 16]`
    /// (gpt-oss), positive extents, `K` a multiple of 32, scales `[E, N, K/32]` ([`Kind::Shape`]);
    /// no scale byte 255 unless [`Checkpoint::allow_nan_scales`] ([`Kind::NanScale`], naming the
    /// scales tensor, expert, row and block).
    pub fn read_mx(&self, name: &str) -> Result<(MxWeights, MxLayoutKind)> {
        let (layout, codes_name, scales_name) = self.find_mx(name)?;
        let (w, layout) = self.read_mx_pair(layout, &codes_name, &scales_name)?;
        if !self.allow_nan_scales
            && let Some((expert, row, block)) = w.first_nan_scale()
        {
            return Err(err(
                Kind::NanScale,
                format!(
                    "`{}` holds scale byte 255 (E8M0 NaN) at expert {expert}, row {row}, block {block} (k = {} to {}), which makes the block's weights NaN; allow NaN scales explicitly to keep torchao's propagate behaviour",
                    escape(&scales_name),
                    block * MX_BLOCK,
                    block * MX_BLOCK + MX_BLOCK - 1
                ),
            ));
        }
        Ok((w, layout))
    }

    /// Reads and validates one MXFP4 pair found by [`Checkpoint::find_mx`] (any scale bytes).
    fn read_mx_pair(
        &self,
        layout: MxLayoutKind,
        codes_name: &str,
        scales_name: &str,
    ) -> Result<(MxWeights, MxLayoutKind)> {
        let codes = self.read_u8(codes_name)?;
        let scales = self.read_scales(scales_name)?;
        let codes_name = escape(codes_name);
        let (e, n, k) = match layout {
            MxLayoutKind::Torchao => {
                let (e, n, half_k) = codes.dims3("(E, N, K/2)")?;
                let k = 2 * half_k;
                if e == 0 || n == 0 || half_k == 0 || !k.is_multiple_of(MX_BLOCK) {
                    return Err(err(
                        Kind::Shape,
                        format!(
                            "`{codes_name}` has shape {}: expected [E, N, K/2] with positive extents and K = {k} a multiple of {MX_BLOCK}",
                            shape_str(&codes.shape)
                        ),
                    ));
                }
                (e, n, k)
            }
            MxLayoutKind::GptOss => {
                codes.expect_shape(
                    &[None, None, None, Some(MX_BLOCK_BYTES)],
                    "(E, N, K/32, 16)",
                )?;
                let (e, n, blocks) = (codes.shape[0], codes.shape[1], codes.shape[2]);
                if e == 0 || n == 0 || blocks == 0 {
                    return Err(err(
                        Kind::Shape,
                        format!(
                            "`{codes_name}` has shape {}: expected [E, N, K/32, 16] with positive extents",
                            shape_str(&codes.shape)
                        ),
                    ));
                }
                (e, n, blocks * MX_BLOCK)
            }
        };
        scales.expect_shape(
            &[Some(e), Some(n), Some(k / MX_BLOCK)],
            &format!("(E, N, K/32), to match `{codes_name}`"),
        )?;
        let shape = MxShape::new(e, n, k)?;
        Ok((
            MxWeights::from_shape(shape, codes.data, scales.data)?,
            layout,
        ))
    }

    /// Every MXFP4 weight in the file (by codes tensor: `.packed`, `.qdata` or `_blocks`), as
    /// `(name, layout)`, sorted by name. The pairs are not validated here.
    pub fn mx_weights(&self) -> Vec<(String, MxLayoutKind)> {
        let mut found: Vec<(String, MxLayoutKind)> = self
            .names()
            .into_iter()
            .filter_map(|n| {
                if let Some(base) = n
                    .strip_suffix(".packed")
                    .or_else(|| n.strip_suffix(".qdata"))
                {
                    Some((base.to_string(), MxLayoutKind::Torchao))
                } else {
                    n.strip_suffix("_blocks")
                        .map(|base| (base.to_string(), MxLayoutKind::GptOss))
                }
            })
            .collect();
        found.sort();
        found.dedup();
        found
    }

    /// Expert weights `name`: the dense tensor `name` (`BF16`, `F16` or `F32`, `[E, N, K]`) if
    /// present, else MXFP4 weight `name` in either layout. Errors as [`Checkpoint::read_mx`];
    /// [`Kind::Name`] when both a dense and an MXFP4 form exist.
    /// Whether expert weights `name` are stacked NVFP4: `<name>.scales` holds E4M3 bytes.
    pub fn is_nv(&self, name: &str) -> bool {
        self.st
            .tensor(&format!("{name}.scales"))
            .is_ok_and(|t| t.dtype() == Dtype::F8_E4M3)
    }

    /// The tensors of stacked NVFP4 weights `name` present in the file: `<name>.packed`,
    /// `<name>.scales` and, when present, `<name>.tensor_scales`.
    pub fn nv_tensor_names(&self, name: &str) -> Vec<String> {
        let mut v = vec![format!("{name}.packed"), format!("{name}.scales")];
        let t = format!("{name}.tensor_scales");
        if self.contains(&t) {
            v.push(t);
        }
        v
    }

    /// Stacked NVFP4 expert weights `name`: `<name>.packed` U8 `[E, N, K/2]`, `<name>.scales`
    /// F8_E4M3 `[E, N, K/16]` and optionally `<name>.tensor_scales` F32 `[E]` or `[E, G]` (G
    /// tensor-scale groups of N/G rows per expert, e.g. the gate and up halves of a stacked
    /// gate_up). Errors: [`Error::Checkpoint`] for missing tensors, dtypes and shapes;
    /// [`Error::Nv`] for the values (NaN or negative block scales, tensor scales that are not
    /// finite and positive).
    pub fn read_nv(&self, name: &str) -> Result<NvWeights> {
        let packed = self.read_u8(&format!("{name}.packed"))?;
        let (e, n, half) = packed.dims3("(E, N, K/2)")?;
        let k = 2 * half;
        let scale_name = format!("{name}.scales");
        let view = self.view(&scale_name)?;
        if view.dtype() != Dtype::F8_E4M3 {
            return Err(err(
                Kind::Dtype,
                format!(
                    "`{}` is {}, expected F8_E4M3",
                    escape(&scale_name),
                    view.dtype()
                ),
            ));
        }
        if view.shape() != [e, n, k / NV_BLOCK] {
            return Err(err(
                Kind::Shape,
                format!(
                    "`{}` has shape {}, expected [{e}, {n}, {}] (E, N, K/16)",
                    escape(&scale_name),
                    shape_str(view.shape()),
                    k / NV_BLOCK
                ),
            ));
        }
        let shape = NvShape::new(e, n, k)?;
        let ts_name = format!("{name}.tensor_scales");
        let (tensor_scales, groups) = if self.contains(&ts_name) {
            let t = self.read_f32(&ts_name)?;
            let groups = match t.shape[..] {
                [x] if x == e => 1,
                [x, g] if x == e && g > 0 => g,
                _ => {
                    return Err(err(
                        Kind::Shape,
                        format!(
                            "`{}` has shape {}, expected [{e}] or [{e}, G]",
                            escape(&ts_name),
                            shape_str(&t.shape)
                        ),
                    ));
                }
            };
            (Some(t.data), groups)
        } else {
            (None, 1)
        };
        Ok(NvWeights::from_grouped_parts(
            shape,
            packed.data,
            view.data().to_vec(),
            tensor_scales,
            groups,
        )?)
    }

    pub fn read_expert_weights(&self, name: &str) -> Result<StoredWeights> {
        let mx_names = [
            ".packed", ".qdata", ".scales", ".scale", "_blocks", "_scales",
        ];
        if !self.contains(name)
            && !mx_names
                .iter()
                .any(|s| self.contains(&format!("{name}{s}")))
        {
            let name = escape(name);
            return Err(err(
                Kind::Missing,
                format!(
                    "`{name}` is not in the file: looked for a dense `{name}`, `{name}.packed` + `{name}.scales` (torchao; also `.qdata`/`.scale`) and `{name}_blocks` + `{name}_scales` (gpt-oss)"
                ),
            ));
        }
        if !self.contains(name) {
            if self.is_nv(name) {
                return Ok(StoredWeights::Nv(Box::new(self.read_nv(name)?)));
            }
            let (weights, layout) = self.read_mx(name)?;
            return Ok(StoredWeights::Mx { weights, layout });
        }
        if let Ok((layout, codes, _)) = self.find_mx(name) {
            let (name, codes) = (escape(name), escape(&codes));
            return Err(err(
                Kind::Name,
                format!(
                    "expert weight `{name}` is stored both dense (`{name}`) and as MXFP4 ({layout}: `{codes}`); keep one"
                ),
            ));
        }
        let t = self.read_float(name)?;
        let (e, n, k) = t.dims3("(E, N, K)")?;
        if e == 0 || n == 0 || k == 0 {
            return Err(err(
                Kind::Shape,
                format!(
                    "`{}` has shape {}, expected [E, N, K] with positive extents",
                    escape(name),
                    shape_str(&t.shape)
                ),
            ));
        }
        Ok(StoredWeights::Dense(t))
    }
}

fn le_u16(b: &[u8]) -> Vec<u16> {
    b.chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect()
}

fn le_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn le_i64(b: &[u8]) -> Vec<i64> {
    b.chunks_exact(8)
        .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

/// The first tensor name that the header of a safetensors file lists twice, if any. (A JSON
/// object with a repeated key parses, keeping one entry; the other entry's byte range is then
/// unclaimed and safetensors blames a neighbouring tensor.) Files whose header cannot be read are
/// left to [`Checkpoint::parse`]'s own diagnosis.
fn duplicate_header_key(bytes: &[u8]) -> Option<String> {
    use serde::de::{Deserializer as _, IgnoredAny, MapAccess, Visitor};

    struct FirstDuplicate;
    impl<'de> Visitor<'de> for FirstDuplicate {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut seen = std::collections::HashSet::new();
            let mut duplicate = None;
            while let Some(key) = map.next_key::<String>()? {
                map.next_value::<IgnoredAny>()?;
                if duplicate.is_none() && !seen.insert(key.clone()) {
                    duplicate = Some(key);
                }
            }
            Ok(duplicate)
        }
    }

    let declared = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let end = usize::try_from(declared).ok()?.checked_add(8)?;
    let header = bytes.get(8..end)?;
    serde_json::Deserializer::from_slice(header)
        .deserialize_map(FirstDuplicate)
        .ok()
        .flatten()
}

/// Turns a safetensors parse failure into an error naming what is wrong, by reading the header
/// directly (the crate's own errors do not name the tensor of a truncated file).
fn diagnose(bytes: &[u8], error: &safetensors::SafeTensorError) -> Error {
    let total = bytes.len();
    let Some(head) = bytes.get(..8) else {
        return err(
            Kind::Truncated,
            format!(
                "the file has {total} bytes; a safetensors file starts with an 8-byte header length"
            ),
        );
    };
    let declared = u64::from_le_bytes(head.try_into().expect("the slice has 8 bytes"));
    let header_end = usize::try_from(declared)
        .ok()
        .and_then(|n| n.checked_add(8));
    let Some(header) = header_end.and_then(|end| bytes.get(8..end)) else {
        if declared > 100_000_000 {
            return err(
                Kind::Format,
                format!(
                    "the first 8 bytes declare a {declared}-byte header, which is not plausible (is this a safetensors file?)"
                ),
            );
        }
        return err(
            Kind::Truncated,
            format!(
                "the header declares {declared} bytes but only {} follow the length field",
                total - 8
            ),
        );
    };
    let data_len = total - 8 - header.len();
    let entries: serde_json::Map<String, serde_json::Value> = match serde_json::from_slice(header) {
        Ok(m) => m,
        Err(e) => {
            return err(
                Kind::Format,
                format!("the header is not a JSON object ({e}; is this a safetensors file?)"),
            );
        }
    };
    let mut spans = Vec::new();
    for (raw_name, entry) in &entries {
        if raw_name == "__metadata__" {
            continue;
        }
        let name = escape(raw_name);
        let dtype_str = entry.get("dtype").and_then(|d| d.as_str());
        let shape: Option<Vec<usize>> = entry.get("shape").and_then(|s| {
            s.as_array()?
                .iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect()
        });
        let offsets: Option<Vec<usize>> = entry.get("data_offsets").and_then(|s| {
            s.as_array()?
                .iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect()
        });
        let (Some(dtype_str), Some(shape), Some(offsets)) = (dtype_str, shape, offsets) else {
            return err(
                Kind::Format,
                format!("the header entry of tensor `{name}` lacks a dtype, shape or data_offsets"),
            );
        };
        let Ok(dtype) = serde_json::from_value::<Dtype>(serde_json::Value::from(dtype_str)) else {
            return err(
                Kind::Dtype,
                format!(
                    "`{name}` has dtype `{}`, which safetensors does not define",
                    escape(dtype_str)
                ),
            );
        };
        let [start, end] = offsets[..] else {
            return err(
                Kind::Format,
                format!("the data_offsets of tensor `{name}` are not a [start, end] pair"),
            );
        };
        match checked_bytes(dtype, &shape) {
            Some(size) if end >= start && end - start == size => {}
            size => {
                return err(
                    Kind::Shape,
                    format!(
                        "`{name}`: shape {} of dtype {dtype} needs {} bytes, but its data offsets span {start}..{end}",
                        shape_str(&shape),
                        size.map_or_else(
                            || "an impossible number of".to_string(),
                            |s| s.to_string()
                        ),
                    ),
                );
            }
        }
        spans.push((start, end, name));
    }
    spans.sort();
    if let Some((start, end, name)) = spans.iter().find(|(_, end, _)| *end > data_len) {
        return err(
            Kind::Truncated,
            format!(
                "tensor `{name}` needs bytes {start}..{end} of the data section, but the file ends after {data_len} data bytes"
            ),
        );
    }
    err(
        Kind::Format,
        format!("not a valid safetensors file ({error})"),
    )
}

/// An owned tensor waiting to be written.
#[derive(Debug, Clone)]
struct OwnedTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &OwnedTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }

    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Builds a safetensors file in memory: tensors by name (each written once) and `__metadata__`.
#[derive(Debug, Clone, Default)]
pub struct CheckpointWriter {
    tensors: BTreeMap<String, OwnedTensor>,
    metadata: BTreeMap<String, String>,
}

impl CheckpointWriter {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a tensor from its little-endian bytes. Errors: [`Kind::Name`] for an empty name,
    /// `__metadata__` or a name already added; [`Kind::Shape`] when the byte count does not match
    /// `dtype` and `shape`.
    pub fn add_bytes(
        &mut self,
        name: impl Into<String>,
        dtype: Dtype,
        shape: &[usize],
        data: Vec<u8>,
    ) -> Result<()> {
        let name = name.into();
        if name.is_empty() || name == "__metadata__" {
            return Err(err(
                Kind::Name,
                format!(
                    "`{}` cannot name a tensor in a safetensors file",
                    escape(&name)
                ),
            ));
        }
        if self.tensors.contains_key(&name) {
            return Err(err(
                Kind::Name,
                format!("`{}` is written twice", escape(&name)),
            ));
        }
        if checked_bytes(dtype, shape) != Some(data.len()) {
            return Err(err(
                Kind::Shape,
                format!(
                    "`{}`: {} bytes do not make a {dtype} tensor of shape {}",
                    escape(&name),
                    data.len(),
                    shape_str(shape)
                ),
            ));
        }
        self.tensors.insert(
            name,
            OwnedTensor {
                dtype,
                shape: shape.to_vec(),
                data,
            },
        );
        Ok(())
    }

    /// Copies a tensor view (for example from another [`Checkpoint`]) under `name`.
    pub fn add_view(&mut self, name: impl Into<String>, view: &TensorView<'_>) -> Result<()> {
        self.add_bytes(name, view.dtype(), view.shape(), view.data().to_vec())
    }

    /// Adds a `U8` tensor.
    pub fn add_u8(&mut self, name: impl Into<String>, shape: &[usize], data: &[u8]) -> Result<()> {
        self.add_bytes(name, Dtype::U8, shape, data.to_vec())
    }

    /// Adds a `BF16` tensor from raw bf16 bits.
    pub fn add_bf16(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        bits: &[u16],
    ) -> Result<()> {
        let bytes = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        self.add_bytes(name, Dtype::BF16, shape, bytes)
    }

    /// Adds a `BF16` tensor from f32 values, each rounded to the nearest bf16 (ties to even).
    pub fn add_bf16_from_f32(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        values: &[f32],
    ) -> Result<()> {
        let bits: Vec<u16> = values.iter().map(|&v| f32_to_bf16_bits(v)).collect();
        self.add_bf16(name, shape, &bits)
    }

    /// Adds an `F32` tensor.
    pub fn add_f32(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        values: &[f32],
    ) -> Result<()> {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.add_bytes(name, Dtype::F32, shape, bytes)
    }

    /// Adds an `I32` tensor.
    pub fn add_i32(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        values: &[i32],
    ) -> Result<()> {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.add_bytes(name, Dtype::I32, shape, bytes)
    }

    /// Adds an `I64` tensor.
    pub fn add_i64(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        values: &[i64],
    ) -> Result<()> {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.add_bytes(name, Dtype::I64, shape, bytes)
    }

    /// Adds MXFP4 weight `name` in `layout` (tensor names and shapes in the module
    /// documentation; both tensors `U8`).
    pub fn add_mx(&mut self, name: &str, w: &MxWeights, layout: MxLayoutKind) -> Result<()> {
        let s = w.shape();
        let (codes, scales) = layout.tensor_names(name);
        for n in [&codes, &scales] {
            if self.tensors.contains_key(n) {
                return Err(err(Kind::Name, format!("`{}` is written twice", escape(n))));
            }
        }
        let code_shape: Vec<usize> = match layout {
            MxLayoutKind::Torchao => s.packed_shape().to_vec(),
            MxLayoutKind::GptOss => vec![s.experts(), s.n(), s.blocks_per_row(), MX_BLOCK_BYTES],
        };
        self.add_u8(codes, &code_shape, w.packed())?;
        self.add_u8(scales, &s.scales_shape(), w.scales())
    }

    /// Sets a `__metadata__` entry (replacing an earlier value).
    pub fn set_metadata(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.metadata.insert(key.into(), value.into());
    }

    /// Names of the tensors added so far, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }

    /// Serializes the file. (The safetensors format orders tensors by dtype alignment, then
    /// name; the bytes are deterministic.)
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let metadata: Option<HashMap<String, String>> = (!self.metadata.is_empty()).then(|| {
            self.metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        });
        safetensors::serialize(self.tensors.iter().map(|(n, t)| (n.as_str(), t)), metadata)
            .map_err(|e| err(Kind::Format, format!("could not serialize the file ({e})")))
    }
}

/// Reads MXFP4 weight `name` from a safetensors file in either layout (see [`Checkpoint::read_mx`]).
pub fn read_mx(bytes: &[u8], name: &str) -> Result<MxWeights> {
    Ok(Checkpoint::parse(bytes)?.read_mx(name)?.0)
}

/// A safetensors file holding only MXFP4 weight `name` in `layout`, with [`META_FORMAT`] and
/// [`META_LAYOUT`] set.
pub fn write_mx(name: &str, w: &MxWeights, layout: MxLayoutKind) -> Result<Vec<u8>> {
    let mut out = CheckpointWriter::new();
    out.add_mx(name, w, layout)?;
    out.set_metadata(META_FORMAT, "mxfp4");
    out.set_metadata(META_LAYOUT, layout.name());
    out.to_bytes()
}

/// Whether [`quantize_file`] quantizes a tensor of this dtype and shape by default: `BF16` or
/// `F32`, rank 3 `[E, N, K]`, positive extents, `K` a multiple of 32.
pub fn is_quantizable(dtype: Dtype, shape: &[usize]) -> bool {
    matches!(dtype, Dtype::BF16 | Dtype::F32)
        && shape.len() == 3
        && shape.iter().all(|&d| d > 0)
        && shape[2].is_multiple_of(MX_BLOCK)
}

/// The tensors a quantizer run takes: the listed ones, each checked (present, `BF16`/`F32`,
/// `[E, N, K]` with `K` a multiple of `block`, as `quantizable` says), or every quantizable one.
fn select_quantizable(
    ck: &Checkpoint<'_>,
    listed: Option<&[String]>,
    block: usize,
    quantizable: fn(Dtype, &[usize]) -> bool,
) -> Result<BTreeSet<String>> {
    let Some(list) = listed else {
        return Ok(ck
            .names()
            .iter()
            .filter(|n| ck.view(n).is_ok_and(|v| quantizable(v.dtype(), v.shape())))
            .map(|n| n.to_string())
            .collect());
    };
    for name in list {
        let view = ck.view(name)?;
        if !matches!(view.dtype(), Dtype::BF16 | Dtype::F32) {
            return Err(err(
                Kind::Dtype,
                format!(
                    "`{}` is {}; only BF16 and F32 tensors can be quantized",
                    escape(name),
                    view.dtype()
                ),
            ));
        }
        if !quantizable(view.dtype(), view.shape()) {
            return Err(err(
                Kind::Shape,
                format!(
                    "`{}` has shape {}; only [E, N, K] tensors with positive extents and K a multiple of {block} can be quantized",
                    escape(name),
                    shape_str(view.shape())
                ),
            ));
        }
    }
    Ok(list.iter().cloned().collect())
}

/// Checks the tensor names a quantizer run writes, `(input name, its output names)`: each must
/// be new to the input or free (in `consumed`: an input tensor the run replaces), and none may be
/// written twice. Errors: [`Kind::Name`].
fn check_output_names<'n>(
    ck: &Checkpoint<'_>,
    consumed: &BTreeSet<String>,
    outputs: impl Iterator<Item = (&'n String, Vec<String>)>,
) -> Result<()> {
    let mut written = BTreeSet::new();
    for (name, outs) in outputs {
        for out in outs {
            if ck.contains(&out) && !consumed.contains(&out) {
                return Err(err(
                    Kind::Name,
                    format!(
                        "quantizing `{}` would write `{}`, but the input already holds a tensor of that name",
                        escape(name),
                        escape(&out)
                    ),
                ));
            }
            if !written.insert(out.clone()) {
                return Err(err(
                    Kind::Name,
                    format!("`{}` would be written twice", escape(&out)),
                ));
            }
        }
    }
    Ok(())
}

/// Records what a quantizer run wrote in `out`'s metadata: the format, the quantizer and this
/// crate's version, the `record` of quantized tensors ([`META_QUANTIZED`]) and the input's name.
fn stamp_provenance(
    out: &mut CheckpointWriter,
    (format, quantizer): (&str, &str),
    record: serde_json::Map<String, serde_json::Value>,
    source: Option<&str>,
) {
    out.set_metadata(META_FORMAT, format);
    out.set_metadata(META_QUANTIZER, quantizer);
    out.set_metadata(META_VERSION, env!("CARGO_PKG_VERSION"));
    out.set_metadata(
        META_QUANTIZED,
        serde_json::Value::Object(record).to_string(),
    );
    if let Some(source) = source {
        out.set_metadata(META_SOURCE, source);
    }
}

/// What [`quantize_file`] does.
#[derive(Debug, Clone, Default)]
pub struct QuantizeOptions {
    /// The layout to write.
    pub layout: MxLayoutKind,
    /// Quantize exactly these tensors (each must exist and be quantizable) instead of every
    /// quantizable one.
    pub tensors: Option<Vec<String>>,
    /// The input's name, recorded as [`META_SOURCE`].
    pub source: Option<String>,
}

/// One tensor [`quantize_file`] quantized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantizedTensor {
    /// The input tensor's name.
    pub name: String,
    /// Its dtype (`BF16` or `F32`).
    pub dtype: Dtype,
    /// `[E, N, K]`.
    pub shape: [usize; 3],
    /// The codes tensor written.
    pub codes: String,
    /// The scales tensor written.
    pub scales: String,
    /// Bytes of the input tensor.
    pub bytes_in: usize,
    /// Bytes of the two output tensors.
    pub bytes_out: usize,
}

/// The result of [`quantize_file`].
#[derive(Debug, Clone)]
pub struct QuantizeOutput {
    /// The output safetensors file.
    pub bytes: Vec<u8>,
    /// The quantized tensors, sorted by name.
    pub quantized: Vec<QuantizedTensor>,
    /// MXFP4 weights of the input that were stored in the other layout and were converted to
    /// `options.layout` (same bytes, renamed and reshaped), as `(name, layout found)`, sorted.
    pub converted: Vec<(String, MxLayoutKind)>,
    /// The tensors copied unchanged, sorted by name.
    pub copied: Vec<String>,
}

/// Quantizes the selected rank-3 `BF16`/`F32` tensors of a safetensors file to MXFP4 with the
/// torchao FLOOR quantizer (SPEC §1.4) and copies every other tensor unchanged. A tensor `W`
/// becomes the two tensors of `options.layout` (module documentation); the metadata records the
/// layout and provenance.
///
/// MXFP4 weights already in the file and stored in the other layout are converted to
/// `options.layout` (the two layouts hold the same bytes: only the names and the codes tensor's
/// shape change), so [`META_LAYOUT`] is true of every MXFP4 weight written. Their scale bytes are
/// moved as they are (NaN scales included: nothing is dequantized here).
///
/// Work is linear in the number of tensors. The quantization runs on one pool of at most
/// `available_parallelism` threads, shared by all tensors (each job one group of experts).
///
/// Errors: parse errors as [`Checkpoint::parse`]; with `options.tensors`, a listed tensor that is
/// missing ([`Kind::Missing`]), not `BF16`/`F32` ([`Kind::Dtype`]) or not `[E, N, K]` with `K % 32 == 0`
/// ([`Kind::Shape`]); a malformed MXFP4 pair that needs converting (as [`Checkpoint::read_mx`]);
/// [`Kind::Name`] when an output name is already taken by an input tensor.
pub fn quantize_file(input: &[u8], options: &QuantizeOptions) -> Result<QuantizeOutput> {
    let ck = Checkpoint::parse(input)?;
    let names = ck.names();
    let selected = select_quantizable(&ck, options.tensors.as_deref(), MX_BLOCK, is_quantizable)?;

    // MXFP4 weights stored in the other layout: their two tensors are replaced by converted ones.
    let mut conversions = Vec::new();
    let mut consumed: BTreeSet<String> = selected.clone();
    for (base, layout) in ck.mx_weights() {
        if layout == options.layout || selected.contains(&base) {
            continue;
        }
        let (found, codes, scales) = ck.find_mx(&base)?;
        let (w, _) = ck.read_mx_pair(found, &codes, &scales)?;
        consumed.insert(codes);
        consumed.insert(scales);
        conversions.push((base, found, w));
    }

    // Every name written must be new, or free because its input tensor is replaced.
    check_output_names(
        &ck,
        &consumed,
        selected
            .iter()
            .chain(conversions.iter().map(|(base, _, _)| base))
            .map(|name| {
                let (codes, scales) = options.layout.tensor_names(name);
                (name, vec![codes, scales])
            }),
    )?;

    let jobs: Vec<QuantizeJob<'_>> = selected
        .iter()
        .map(|name| {
            let view = ck.view(name)?;
            let [e, n, k] = [view.shape()[0], view.shape()[1], view.shape()[2]];
            Ok(QuantizeJob {
                dtype: view.dtype(),
                bytes: view.data(),
                shape: MxShape::new(e, n, k)?,
            })
        })
        .collect::<Result<_>>()?;
    let mut results = quantize_pool(&jobs).into_iter();

    let mut out = CheckpointWriter::new();
    for (k, v) in ck.metadata() {
        out.set_metadata(k.clone(), v.clone());
    }
    // The provenance record: an earlier quantization's entries are kept (converted ones renamed).
    let mut record = ck
        .metadata_value(META_QUANTIZED)
        .and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok())
        .and_then(|v| match v {
            serde_json::Value::Object(m) => Some(m),
            _ => None,
        })
        .unwrap_or_default();
    let mut quantized = Vec::with_capacity(selected.len());
    let mut copied = Vec::new();
    for name in &names {
        if consumed.contains(*name) {
            continue;
        }
        out.add_view(*name, &ck.view(name)?)?;
        copied.push(name.to_string());
    }
    for (name, job) in selected.iter().zip(&jobs) {
        let w = results
            .next()
            .expect("quantize_pool returns one result per job")?;
        out.add_mx(name, &w, options.layout)?;
        let (codes, scales) = options.layout.tensor_names(name);
        let [e, n, k] = [job.shape.experts(), job.shape.n(), job.shape.k()];
        record.insert(
            name.clone(),
            serde_json::json!({
                "dtype": job.dtype.to_string(),
                "shape": [e, n, k],
                "packed": codes,
                "scales": scales,
            }),
        );
        quantized.push(QuantizedTensor {
            name: name.clone(),
            dtype: job.dtype,
            shape: [e, n, k],
            codes,
            scales,
            bytes_in: job.bytes.len(),
            bytes_out: w.shape().bytes(),
        });
    }
    let mut converted = Vec::with_capacity(conversions.len());
    for (base, found, w) in conversions {
        out.add_mx(&base, &w, options.layout)?;
        if let Some(serde_json::Value::Object(entry)) = record.get_mut(&base) {
            let (codes, scales) = options.layout.tensor_names(&base);
            entry.insert("packed".into(), codes.into());
            entry.insert("scales".into(), scales.into());
        }
        converted.push((base, found));
    }
    out.set_metadata(META_LAYOUT, options.layout.name());
    stamp_provenance(
        &mut out,
        ("mxfp4", QUANTIZER_ID),
        record,
        options.source.as_deref(),
    );
    Ok(QuantizeOutput {
        bytes: out.to_bytes()?,
        quantized,
        converted,
        copied,
    })
}

/// The quantizer [`quantize_file_nvfp4`] records as [`META_QUANTIZER`].
pub const NV_QUANTIZER_ID: &str = "torchao-0.18.0 NVFP4Tensor.to_nvfp4, e2m1, E4M3 block 16";

/// What [`quantize_file_nvfp4`] does.
#[derive(Debug, Clone, Default)]
pub struct NvQuantizeOptions {
    /// Two-level scaling: each expert's per-tensor f32 scale (`amax / 2688`) beside the E4M3
    /// block scales, as ModelOpt exports; single-level (block scales only) otherwise.
    pub two_level: bool,
    /// Quantize exactly these tensors (each must exist and be quantizable) instead of every
    /// quantizable one.
    pub tensors: Option<Vec<String>>,
    /// The input's name, recorded as [`META_SOURCE`].
    pub source: Option<String>,
    /// Write each quantized tensor `{prefix}.{proj}` as one linear per expert,
    /// `{prefix}.{e}.{proj}` in this export's names ([`add_nv_experts`]), instead of the stacked
    /// tensors; needs `two_level`.
    pub export: Option<NvLayout>,
}

/// Whether a tensor of `dtype` and `shape` can be NVFP4-quantized: `BF16` or `F32`, `[E, N, K]`
/// with positive extents and `K` a multiple of 16.
pub fn is_nv_quantizable(dtype: Dtype, shape: &[usize]) -> bool {
    matches!(dtype, Dtype::BF16 | Dtype::F32)
        && shape.len() == 3
        && shape.iter().all(|&d| d > 0)
        && shape[2].is_multiple_of(NV_BLOCK)
}

/// Quantizes the selected rank-3 `BF16`/`F32` tensors of a safetensors file to NVFP4 (torchao
/// 0.18.0's quantizer, `crate::nvfp4::quantize_nvfp4`) and copies every other tensor unchanged.
/// A tensor `W` becomes the stacked tensors [`Checkpoint::read_nv`] reads: `W.packed` U8
/// `[E, N, K/2]`, `W.scales` F8_E4M3 `[E, N, K/16]` and, two-level, `W.tensor_scales` F32 `[E]`;
/// with `options.export`, a tensor `{prefix}.{proj}` becomes one linear per expert,
/// `{prefix}.{e}.{proj}` ([`add_nv_experts`], read back by [`read_nv_experts`]).
/// The metadata records the format and provenance ([`META_FORMAT`] = `nvfp4`). Tensors are
/// quantized one after another on the calling thread.
///
/// Errors: parse errors as [`Checkpoint::parse`]; with `options.tensors`, a listed tensor that is
/// missing, not `BF16`/`F32` or not `[E, N, K]` with `K % 16 == 0`; [`Kind::Name`] when an output
/// name is already taken by an input tensor, or (export) a quantized tensor's name has no
/// `{prefix}.{proj}` form; [`Error::InvalidArgument`] for an export without `two_level`;
/// [`Error::Nv`] for a non-finite value or (two-level) an all-zero expert.
pub fn quantize_file_nvfp4(input: &[u8], options: &NvQuantizeOptions) -> Result<QuantizeOutput> {
    if options.export.is_some() && !options.two_level {
        return Err(Error::InvalidArgument {
            what: "NVFP4 export",
            detail:
                "per-expert exports carry one tensor scale per linear: quantize with two levels"
                    .into(),
        });
    }
    let ck = Checkpoint::parse(input)?;
    let names = ck.names();
    let selected =
        select_quantizable(&ck, options.tensors.as_deref(), NV_BLOCK, is_nv_quantizable)?;
    let split = |name: &str| -> Result<(String, String)> {
        match name.rsplit_once('.') {
            Some((prefix, proj)) if !prefix.is_empty() && !proj.is_empty() => {
                Ok((prefix.to_string(), proj.to_string()))
            }
            _ => Err(err(
                Kind::Name,
                format!(
                    "`{}` has no `<prefix>.<projection>` form to export per expert",
                    escape(name)
                ),
            )),
        }
    };
    let suffixes: &[&str] = if options.two_level {
        &[".packed", ".scales", ".tensor_scales"]
    } else {
        &[".packed", ".scales"]
    };
    let mut outputs = Vec::with_capacity(selected.len());
    for name in &selected {
        let outs = match options.export {
            Some(layout) => {
                let (prefix, proj) = split(name)?;
                let experts = ck.view(name)?.shape()[0];
                nv_export_names(&prefix, experts, &[proj.as_str()], layout)
            }
            None => suffixes.iter().map(|s| format!("{name}{s}")).collect(),
        };
        outputs.push((name, outs));
    }
    check_output_names(&ck, &selected, outputs.into_iter())?;

    let mut out = CheckpointWriter::new();
    for (k, v) in ck.metadata() {
        out.set_metadata(k.clone(), v.clone());
    }
    let mut copied = Vec::new();
    for name in &names {
        if selected.contains(*name) {
            continue;
        }
        out.add_view(*name, &ck.view(name)?)?;
        copied.push(name.to_string());
    }
    let mut record = serde_json::Map::new();
    let mut quantized = Vec::with_capacity(selected.len());
    for name in &selected {
        let t = ck.read_float(name)?;
        let [e, n, k] = [t.shape[0], t.shape[1], t.shape[2]];
        let w = crate::nvfp4::quantize_nvfp4(&t.data, e, n, k, options.two_level)?;
        let mut bytes_out = w.packed().len() + w.scales().len();
        let (codes, scales) = match options.export {
            Some(layout) => {
                let (prefix, proj) = split(name)?;
                add_nv_experts(&mut out, &prefix, &w, &[proj.as_str()], layout)?;
                bytes_out += 4 * e;
                let [c, s, _] = nv_linear_names(&format!("{prefix}.<e>.{proj}"), layout);
                (c, s)
            }
            None => {
                let (codes, scales) = (format!("{name}.packed"), format!("{name}.scales"));
                out.add_u8(codes.clone(), &[e, n, k / 2], w.packed())?;
                out.add_bytes(
                    scales.clone(),
                    Dtype::F8_E4M3,
                    &[e, n, k / NV_BLOCK],
                    w.scales().to_vec(),
                )?;
                if let Some(ts) = w.tensor_scales() {
                    out.add_f32(format!("{name}.tensor_scales"), &[e], ts)?;
                    bytes_out += 4 * ts.len();
                }
                (codes, scales)
            }
        };
        let view = ck.view(name)?;
        record.insert(
            name.clone(),
            serde_json::json!({
                "dtype": view.dtype().to_string(),
                "shape": [e, n, k],
                "packed": codes,
                "scales": scales,
                "two_level": options.two_level,
                "export": options.export.map(|l| l.name()),
            }),
        );
        quantized.push(QuantizedTensor {
            name: name.clone(),
            dtype: view.dtype(),
            shape: [e, n, k],
            codes,
            scales,
            bytes_in: view.data().len(),
            bytes_out,
        });
    }
    stamp_provenance(
        &mut out,
        ("nvfp4", NV_QUANTIZER_ID),
        record,
        options.source.as_deref(),
    );
    Ok(QuantizeOutput {
        bytes: out.to_bytes()?,
        quantized,
        converted: Vec::new(),
        copied,
    })
}

/// One tensor for [`quantize_pool`]: little-endian `BF16` or `F32` bytes of `shape`.
struct QuantizeJob<'a> {
    dtype: Dtype,
    bytes: &'a [u8],
    shape: MxShape,
}

/// Experts per unit of pool work: about 16 MiB of input, at least one expert.
fn experts_per_chunk(shape: MxShape, elem_bytes: usize) -> usize {
    const CHUNK_BYTES: usize = 16 << 20;
    let per_expert = shape.n() * shape.k() * elem_bytes;
    (CHUNK_BYTES / per_expert.max(1)).clamp(1, shape.experts())
}

/// Quantizes every job on one bounded pool of threads (at most `available_parallelism`, and no
/// more than there are chunks). Work is split into chunks of whole experts; blocks never cross an
/// expert, so each result equals one quantizer call over the whole tensor. Results come back in
/// job order.
fn quantize_pool(jobs: &[QuantizeJob<'_>]) -> Vec<Result<MxWeights>> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    // (job, first expert, experts) of every chunk.
    let mut chunks = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        let elem = if job.dtype == Dtype::BF16 { 2 } else { 4 };
        let step = experts_per_chunk(job.shape, elem);
        let mut first = 0;
        while first < job.shape.experts() {
            let count = step.min(job.shape.experts() - first);
            chunks.push((j, first, count));
            first += count;
        }
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(chunks.len())
        .max(1);
    let next = AtomicUsize::new(0);
    let parts: Vec<Mutex<Option<Result<MxWeights>>>> =
        chunks.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let c = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(j, first, count)) = chunks.get(c) else {
                        break;
                    };
                    let job = &jobs[j];
                    let (n, k) = (job.shape.n(), job.shape.k());
                    let elem = if job.dtype == Dtype::BF16 { 2 } else { 4 };
                    let per_expert = n * k * elem;
                    let bytes = &job.bytes[first * per_expert..(first + count) * per_expert];
                    let w = if job.dtype == Dtype::BF16 {
                        quantize_mxfp4_bf16(&le_u16(bytes), count, n, k)
                    } else {
                        quantize_mxfp4(&le_f32(bytes), count, n, k)
                    };
                    *parts[c].lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(w.map_err(Error::from));
                }
            });
        }
    });
    // Chunks are in job order, so one pass over them assembles every job.
    let mut parts = chunks
        .iter()
        .zip(parts)
        .map(|(&(j, _, _), m)| (j, m.into_inner().unwrap_or_else(|p| p.into_inner())))
        .peekable();
    let mut results = Vec::with_capacity(jobs.len());
    for (j, job) in jobs.iter().enumerate() {
        let shape = job.shape;
        let (mut packed, mut scales) = (
            Vec::with_capacity(shape.packed_len()),
            Vec::with_capacity(shape.scales_len()),
        );
        let mut failed = None;
        while let Some((_, part)) = parts.next_if(|(cj, _)| *cj == j) {
            match part {
                Some(Ok(w)) => {
                    let (_, p, s) = w.into_parts();
                    packed.extend_from_slice(&p);
                    scales.extend_from_slice(&s);
                }
                Some(Err(e)) => failed = failed.or(Some(e)),
                None => {
                    failed = failed.or(Some(err(
                        Kind::Format,
                        "a quantizer thread stopped before finishing its chunk",
                    )))
                }
            }
        }
        results.push(match failed {
            Some(e) => Err(e),
            None => MxWeights::from_shape(shape, packed, scales).map_err(Error::from),
        });
    }
    results
}

// ----------------------------------------------------------------------------------------------
// NVFP4 expert exports (issue #17; the container is `crate::nvfp4`).

/// The NVFP4 export a checkpoint's expert linears use (see the module docs for the names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NvLayout {
    /// NVIDIA ModelOpt: `weight`, `weight_scale`, `weight_scale_2` (the tensor scale).
    ModelOpt,
    /// compressed-tensors: `weight_packed`, `weight_scale`, `weight_global_scale` (its
    /// reciprocal is the tensor scale).
    CompressedTensors,
}

impl NvLayout {
    /// `modelopt` or `compressed-tensors` (as recorded in the metadata and on the command line).
    pub fn name(self) -> &'static str {
        match self {
            NvLayout::ModelOpt => "modelopt",
            NvLayout::CompressedTensors => "compressed-tensors",
        }
    }
}

/// One linear's NVFP4 parts as read: `(N, packed [N, K/2], scales [N, K/16], tensor scale)`.
type LinearParts = (usize, Vec<u8>, Vec<u8>, f32);

/// Reads linear `base` (e.g. `model.layers.0.mlp.experts.3.gate_proj`) in either layout, with
/// reduction length `k`.
fn read_nv_linear(ck: &Checkpoint<'_>, base: &str, k: usize) -> Result<(NvLayout, LinearParts)> {
    let layout = if ck.contains(&format!("{base}.weight_packed")) {
        NvLayout::CompressedTensors
    } else {
        NvLayout::ModelOpt
    };
    let [packed_name, scale_name, global_name] = nv_linear_names(base, layout);
    let shape_err = |detail: String| Error::Checkpoint {
        kind: Kind::Shape,
        detail,
    };
    let packed = ck.read_u8(&packed_name)?;
    let n = match packed.shape[..] {
        [n, half] if 2 * half == k => n,
        _ => {
            return Err(shape_err(format!(
                "`{}` is {:?}, expected [N, {}] (N, K/2)",
                escape(&packed.name),
                packed.shape,
                k / 2
            )));
        }
    };
    let view = ck.view(&scale_name)?;
    if view.dtype() != Dtype::F8_E4M3 && view.dtype() != Dtype::U8 {
        return Err(Error::Checkpoint {
            kind: Kind::Dtype,
            detail: format!(
                "`{}` is {}, expected F8_E4M3 (or its bytes as U8)",
                escape(&scale_name),
                view.dtype()
            ),
        });
    }
    if view.shape() != [n, k / NV_BLOCK] {
        return Err(shape_err(format!(
            "`{}` is {:?}, expected [{n}, {}] (N, K/16)",
            escape(&scale_name),
            view.shape(),
            k / NV_BLOCK
        )));
    }
    let global = ck.read_f32(&global_name)?;
    let value = match global.data[..] {
        [v] if global.shape.iter().product::<usize>() == 1 => v,
        _ => {
            return Err(shape_err(format!(
                "`{}` is {:?}, expected one value",
                escape(&global.name),
                global.shape
            )));
        }
    };
    let tensor_scale = match layout {
        NvLayout::ModelOpt => value,
        // compressed-tensors divides the block scale by its global scale.
        NvLayout::CompressedTensors => 1.0 / value,
    };
    Ok((layout, (n, packed.data, view.data().to_vec(), tensor_scale)))
}

/// Reads NVFP4 experts stored one linear per expert and projection — `{prefix}.{e}.{proj}` for
/// `e < experts` and each `proj` of `projections`, as ModelOpt and compressed-tensors export MoE
/// layers (`prefix` = `model.layers.L.mlp.experts`) — and stacks each expert's projections
/// along N: `[E, Σ N_p, K]` with one tensor-scale group per projection. `["gate_proj",
/// "up_proj"]` gives a `gate_up` in the split layout (gate rows first), `["down_proj"]` a
/// `down`. `k` is the reduction length (the linears' input features).
///
/// The tensor scale is ModelOpt's `weight_scale_2`, or `1 / weight_global_scale` for
/// compressed-tensors (whose own dequantization divides by the global scale: the factor can
/// differ from it by one f32 rounding). Errors: [`Error::Checkpoint`] for missing tensors, wrong
/// dtypes or shapes, projections of different N across experts, or a mix of layouts;
/// [`Error::Nv`] for the values (NaN or negative block scales, tensor scales that are not
/// finite and positive, `K % 16`).
pub fn read_nv_experts(
    ck: &Checkpoint<'_>,
    prefix: &str,
    experts: usize,
    projections: &[&str],
    k: usize,
) -> Result<(NvWeights, NvLayout)> {
    if projections.is_empty() {
        return Err(Error::InvalidArgument {
            what: "projections",
            detail: "name at least one projection".into(),
        });
    }
    let mut layout = None;
    let mut widths: Vec<usize> = Vec::new();
    let (mut packed, mut scales, mut tensor_scales) = (Vec::new(), Vec::new(), Vec::new());
    for e in 0..experts {
        for (p, proj) in projections.iter().enumerate() {
            let base = format!("{prefix}.{e}.{proj}");
            let (l, (n, pk, sc, ts)) = read_nv_linear(ck, &base, k)?;
            if *layout.get_or_insert(l) != l {
                return Err(Error::Checkpoint {
                    kind: Kind::Name,
                    detail: format!(
                        "`{}` mixes the ModelOpt and compressed-tensors names",
                        escape(&base)
                    ),
                });
            }
            if e == 0 {
                widths.push(n);
            } else if widths[p] != n {
                return Err(Error::Checkpoint {
                    kind: Kind::Shape,
                    detail: format!(
                        "`{}` has {n} rows, expert 0's `{proj}` {}",
                        escape(&base),
                        widths[p]
                    ),
                });
            }
            packed.extend(pk);
            scales.extend(sc);
            tensor_scales.push(ts);
        }
    }
    // Equal halves only: a group covers N/G rows.
    if widths.iter().any(|&w| w != widths[0]) {
        return Err(Error::Checkpoint {
            kind: Kind::Shape,
            detail: format!("the projections {projections:?} have different row counts {widths:?}"),
        });
    }
    let n: usize = widths.iter().sum();
    let shape = NvShape::new(experts, n, k)?;
    let w = NvWeights::from_grouped_parts(
        shape,
        packed,
        scales,
        Some(tensor_scales),
        projections.len(),
    )?;
    Ok((w, layout.unwrap_or(NvLayout::ModelOpt)))
}

/// The names of one exported linear `base` in `layout`: `(codes, block scales, global scale)`.
fn nv_linear_names(base: &str, layout: NvLayout) -> [String; 3] {
    let (codes, global) = match layout {
        NvLayout::ModelOpt => ("weight", "weight_scale_2"),
        NvLayout::CompressedTensors => ("weight_packed", "weight_global_scale"),
    };
    [
        format!("{base}.{codes}"),
        format!("{base}.weight_scale"),
        format!("{base}.{global}"),
    ]
}

/// Every tensor name [`add_nv_experts`] writes for `experts` experts and `projections`.
pub fn nv_export_names(
    prefix: &str,
    experts: usize,
    projections: &[&str],
    layout: NvLayout,
) -> Vec<String> {
    (0..experts)
        .flat_map(|e| {
            projections
                .iter()
                .flat_map(move |proj| nv_linear_names(&format!("{prefix}.{e}.{proj}"), layout))
        })
        .collect()
}

/// Writes stacked two-level NVFP4 experts `w` `[E, N, K]` as one linear per expert and
/// projection, the inverse of [`read_nv_experts`]: expert `e`'s rows are split into
/// `projections.len()` equal parts, part `p` written as `{prefix}.{e}.{projections[p]}` — codes
/// U8 `[N/P, K/2]`, block scales F8_E4M3 `[N/P, K/16]` and the tensor scale as a scalar F32
/// (ModelOpt's `weight_scale_2`, or compressed-tensors' `weight_global_scale`, its reciprocal).
/// The weights' tensor-scale groups must be one per expert (every part gets it) or one per
/// projection. Errors: [`Error::InvalidArgument`] without tensor scales (single-level weights
/// have no per-linear scale to write), for no projections, `N % P != 0` or groups that match
/// neither rule; the writer's errors (a name written twice).
pub fn add_nv_experts(
    out: &mut CheckpointWriter,
    prefix: &str,
    w: &NvWeights,
    projections: &[&str],
    layout: NvLayout,
) -> Result<()> {
    let invalid = |detail: String| Error::InvalidArgument {
        what: "NVFP4 export",
        detail,
    };
    let Some(tensor_scales) = w.tensor_scales() else {
        return Err(invalid(
            "per-expert exports carry one tensor scale per linear: quantize with two levels".into(),
        ));
    };
    let parts = projections.len();
    let (experts, n, k) = (w.shape().experts(), w.shape().n(), w.shape().k());
    let groups = w.groups();
    if parts == 0 || !n.is_multiple_of(parts) || (groups != 1 && groups != parts) {
        return Err(invalid(format!(
            "{n} rows with {groups} tensor-scale group(s) per expert cannot be split into the \
             projections {projections:?}"
        )));
    }
    let rows = n / parts;
    let (codes_per_row, scales_per_row) = (k / 2, k / NV_BLOCK);
    for e in 0..experts {
        for (p, proj) in projections.iter().enumerate() {
            let first_row = e * n + p * rows;
            let codes = &w.packed()[first_row * codes_per_row..][..rows * codes_per_row];
            let scales = &w.scales()[first_row * scales_per_row..][..rows * scales_per_row];
            let ts = tensor_scales[e * groups + if groups == 1 { 0 } else { p }];
            let global = match layout {
                NvLayout::ModelOpt => ts,
                NvLayout::CompressedTensors => 1.0 / ts,
            };
            let [codes_name, scales_name, global_name] =
                nv_linear_names(&format!("{prefix}.{e}.{proj}"), layout);
            out.add_u8(codes_name, &[rows, codes_per_row], codes)?;
            out.add_bytes(
                scales_name,
                Dtype::F8_E4M3,
                &[rows, scales_per_row],
                scales.to_vec(),
            )?;
            out.add_f32(global_name, &[], &[global])?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic bf16 weights with a spread of magnitudes (several scale exponents).
    fn weights_bf16(len: usize, seed: u64) -> Vec<u16> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                let mag = [0.01f32, 0.3, 2.0, 40.0][(i / 32) % 4];
                f32_to_bf16_bits(u * mag)
            })
            .collect()
    }

    fn bf16_file(name: &str, shape: [usize; 3], bits: &[u16]) -> Vec<u8> {
        let mut w = CheckpointWriter::new();
        w.add_bf16(name, &shape, bits).unwrap();
        w.to_bytes().unwrap()
    }

    fn what(e: &Error) -> Kind {
        match e {
            Error::Checkpoint { kind, .. } => *kind,
            other => panic!("expected a checkpoint error, got {other:?}"),
        }
    }

    /// Asserts an error of kind `kind` whose message mentions `needle` (a tensor name).
    fn assert_err<T: fmt::Debug>(r: Result<T>, kind: Kind, needle: &str) {
        let e = r.expect_err("expected an error");
        let msg = e.to_string();
        assert_eq!(what(&e), kind, "wrong kind: {msg}");
        assert!(msg.contains(needle), "`{needle}` not in: {msg}");
    }

    #[test]
    fn quantize_write_read_round_trips_in_both_layouts() {
        let (e, n, k) = (3, 5, 96);
        let bits = weights_bf16(e * n * k, 1);
        let w = quantize_mxfp4_bf16(&bits, e, n, k).unwrap();
        for layout in MxLayoutKind::ALL {
            let file = write_mx("experts.gate_up_proj", &w, layout).unwrap();
            let ck = Checkpoint::parse(&file).unwrap();
            assert_eq!(ck.metadata_value(META_LAYOUT), Some(layout.name()));
            let (back, found) = ck.read_mx("experts.gate_up_proj").unwrap();
            assert_eq!(found, layout);
            assert_eq!(back, w, "{layout}");
            assert_eq!(read_mx(&file, "experts.gate_up_proj").unwrap(), w);
            assert_eq!(
                ck.mx_weights(),
                vec![("experts.gate_up_proj".to_string(), layout)]
            );
        }
    }

    #[test]
    fn gpt_oss_and_torchao_files_store_the_same_bytes() {
        let (e, n, k) = (2, 4, 64);
        let bits = weights_bf16(e * n * k, 2);
        let input = bf16_file("down_proj", [e, n, k], &bits);
        let files: Vec<Vec<u8>> = MxLayoutKind::ALL
            .iter()
            .map(|&layout| {
                quantize_file(
                    &input,
                    &QuantizeOptions {
                        layout,
                        ..Default::default()
                    },
                )
                .unwrap()
                .bytes
            })
            .collect();
        let torchao = Checkpoint::parse(&files[0]).unwrap();
        let gpt_oss = Checkpoint::parse(&files[1]).unwrap();
        assert_eq!(
            torchao.names(),
            vec!["down_proj.packed", "down_proj.scales"]
        );
        assert_eq!(
            gpt_oss.names(),
            vec!["down_proj_blocks", "down_proj_scales"]
        );
        assert_eq!(
            gpt_oss.view("down_proj_blocks").unwrap().shape(),
            &[e, n, k / 32, 16]
        );
        assert_eq!(
            torchao.view("down_proj.packed").unwrap().data(),
            gpt_oss.view("down_proj_blocks").unwrap().data()
        );
        let a = torchao.read_mx("down_proj").unwrap().0;
        let b = gpt_oss.read_mx("down_proj").unwrap().0;
        assert_eq!(a, b);
        assert_eq!(a, quantize_mxfp4_bf16(&bits, e, n, k).unwrap());
    }

    #[test]
    fn quantize_file_selects_copies_and_records_provenance() {
        let (e, n, k) = (2, 3, 64);
        let w_bits = weights_bf16(e * n * k, 3);
        let w_f32: Vec<f32> = w_bits.iter().map(|&b| bf16_bits_to_f32(b)).collect();
        let mut input = CheckpointWriter::new();
        input.add_bf16("a", &[e, n, k], &w_bits).unwrap();
        input.add_f32("b", &[e, n, k], &w_f32).unwrap();
        input
            .add_bf16("odd_k", &[e, n, 48], &weights_bf16(e * n * 48, 4))
            .unwrap();
        input.add_bf16("rank2", &[n, k], &w_bits[..n * k]).unwrap();
        input.add_i64("ids", &[2], &[0, 1]).unwrap();
        input.set_metadata("format", "pt");
        let input = input.to_bytes().unwrap();

        let all = quantize_file(
            &input,
            &QuantizeOptions {
                source: Some("in.safetensors".into()),
                ..Default::default()
            },
        )
        .unwrap();
        let names: Vec<&str> = all.quantized.iter().map(|q| q.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(all.copied, ["ids", "odd_k", "rank2"]);
        let ck = Checkpoint::parse(&all.bytes).unwrap();
        assert_eq!(ck.metadata_value("format"), Some("pt"));
        assert_eq!(ck.metadata_value(META_FORMAT), Some("mxfp4"));
        assert_eq!(ck.metadata_value(META_LAYOUT), Some("torchao"));
        assert_eq!(ck.metadata_value(META_QUANTIZER), Some(QUANTIZER_ID));
        assert_eq!(ck.metadata_value(META_SOURCE), Some("in.safetensors"));
        let record: serde_json::Value =
            serde_json::from_str(ck.metadata_value(META_QUANTIZED).unwrap()).unwrap();
        assert_eq!(record["a"]["dtype"], "BF16");
        assert_eq!(record["b"]["shape"], serde_json::json!([e, n, k]));
        assert_eq!(record["b"]["packed"], "b.packed");
        // bf16 and f32 inputs of the same values quantize identically.
        assert_eq!(ck.read_mx("a").unwrap().0, ck.read_mx("b").unwrap().0);
        // Unselected tensors are copied byte for byte.
        let src = Checkpoint::parse(&input).unwrap();
        for name in ["ids", "odd_k", "rank2"] {
            assert_eq!(ck.view(name).unwrap(), src.view(name).unwrap());
        }

        let only_b = quantize_file(
            &input,
            &QuantizeOptions {
                layout: MxLayoutKind::GptOss,
                tensors: Some(vec!["b".into()]),
                source: None,
            },
        )
        .unwrap();
        let ck = Checkpoint::parse(&only_b.bytes).unwrap();
        assert!(ck.contains("a") && ck.contains("b_blocks") && !ck.contains("b"));
        assert_eq!(ck.read_expert_weights("a").unwrap().dims(), (e, n, k));

        let opts = |t: &str| QuantizeOptions {
            tensors: Some(vec![t.into()]),
            ..Default::default()
        };
        assert_err(
            quantize_file(&input, &opts("nope")),
            Kind::Missing,
            "`nope`",
        );
        assert_err(quantize_file(&input, &opts("ids")), Kind::Dtype, "`ids`");
        assert_err(
            quantize_file(&input, &opts("odd_k")),
            Kind::Shape,
            "`odd_k`",
        );
        assert_err(
            quantize_file(&input, &opts("rank2")),
            Kind::Shape,
            "`rank2`",
        );
    }

    #[test]
    fn quantize_file_refuses_to_overwrite_an_input_tensor() {
        let bits = weights_bf16(64, 5);
        let mut input = CheckpointWriter::new();
        input.add_bf16("w", &[1, 1, 64], &bits).unwrap();
        input.add_u8("w.scales", &[1], &[0]).unwrap();
        let input = input.to_bytes().unwrap();
        assert_err(
            quantize_file(&input, &QuantizeOptions::default()),
            Kind::Name,
            "`w.scales`",
        );
    }

    /// A valid torchao-layout file for `w` `[2, 3, 64]`, with the given overrides.
    fn mx_file(
        edit: impl FnOnce(&mut BTreeMap<&'static str, (Dtype, Vec<usize>, Vec<u8>)>),
    ) -> Vec<u8> {
        let mut t = BTreeMap::new();
        t.insert(
            "w.packed",
            (Dtype::U8, vec![2, 3, 32], vec![0x21; 2 * 3 * 32]),
        );
        t.insert("w.scales", (Dtype::U8, vec![2, 3, 2], vec![127; 2 * 3 * 2]));
        edit(&mut t);
        let mut w = CheckpointWriter::new();
        for (name, (dtype, shape, data)) in t {
            w.add_bytes(name, dtype, &shape, data).unwrap();
        }
        w.to_bytes().unwrap()
    }

    #[test]
    fn malformed_mx_files_give_errors_naming_the_tensor() {
        // The baseline is valid, also with torchao's attribute names and E8M0 scales.
        assert!(read_mx(&mx_file(|_| {}), "w").is_ok());
        let renamed = mx_file(|t| {
            let p = t.remove("w.packed").unwrap();
            let (_, shape, data) = t.remove("w.scales").unwrap();
            t.insert("w.qdata", p);
            t.insert("w.scale", (Dtype::F8_E8M0, shape, data));
        });
        assert_eq!(
            read_mx(&renamed, "w").unwrap(),
            read_mx(&mx_file(|_| {}), "w").unwrap()
        );

        let missing = mx_file(|t| {
            t.remove("w.scales");
        });
        assert_err(read_mx(&missing, "w"), Kind::Missing, "`w.scales`");
        assert_err(read_mx(&mx_file(|_| {}), "v"), Kind::Missing, "`v.packed`");

        let wrong_dtype = mx_file(|t| {
            t.insert("w.scales", (Dtype::BF16, vec![2, 3, 1], vec![0; 12]));
        });
        assert_err(read_mx(&wrong_dtype, "w"), Kind::Dtype, "`w.scales`");
        let wrong_dtype = mx_file(|t| {
            t.insert("w.packed", (Dtype::I8, vec![2, 3, 32], vec![0; 192]));
        });
        assert_err(read_mx(&wrong_dtype, "w"), Kind::Dtype, "`w.packed`");

        let wrong_shape = mx_file(|t| {
            t.insert("w.scales", (Dtype::U8, vec![2, 3, 3], vec![127; 18]));
        });
        assert_err(read_mx(&wrong_shape, "w"), Kind::Shape, "`w.scales`");
        let odd_k = mx_file(|t| {
            t.insert("w.packed", (Dtype::U8, vec![2, 3, 24], vec![0; 144]));
        });
        assert_err(read_mx(&odd_k, "w"), Kind::Shape, "`w.packed`");
        let rank = mx_file(|t| {
            t.insert("w.packed", (Dtype::U8, vec![6, 32], vec![0; 192]));
        });
        assert_err(read_mx(&rank, "w"), Kind::Shape, "`w.packed`");

        let both = mx_file(|t| {
            t.insert("w_blocks", (Dtype::U8, vec![2, 3, 2, 16], vec![0; 192]));
        });
        assert_err(read_mx(&both, "w"), Kind::Name, "`w`");
    }

    #[test]
    fn malformed_gpt_oss_files_give_errors_naming_the_tensor() {
        let good = |blocks: Vec<usize>, scales: Vec<usize>| {
            let mut w = CheckpointWriter::new();
            let nb = blocks.iter().product();
            let ns = scales.iter().product();
            w.add_bytes("m_blocks", Dtype::U8, &blocks, vec![0x35; nb])
                .unwrap();
            w.add_bytes("m_scales", Dtype::U8, &scales, vec![120; ns])
                .unwrap();
            w.to_bytes().unwrap()
        };
        let ok = read_mx(&good(vec![2, 3, 2, 16], vec![2, 3, 2]), "m").unwrap();
        assert_eq!(ok.shape().k(), 64);
        assert_err(
            read_mx(&good(vec![2, 3, 2, 8], vec![2, 3, 2]), "m"),
            Kind::Shape,
            "`m_blocks`",
        );
        assert_err(
            read_mx(&good(vec![2, 3, 2, 16], vec![2, 3, 1]), "m"),
            Kind::Shape,
            "`m_scales`",
        );
        let mut only_blocks = CheckpointWriter::new();
        only_blocks
            .add_u8("m_blocks", &[1, 1, 1, 16], &[0; 16])
            .unwrap();
        assert_err(
            read_mx(&only_blocks.to_bytes().unwrap(), "m"),
            Kind::Missing,
            "`m_scales`",
        );
    }

    #[test]
    fn truncated_and_corrupt_files_are_diagnosed() {
        let file = mx_file(|_| {});
        // Cut inside the data of the second tensor in file order ("w.scales" sorts after
        // "w.packed"; both are U8).
        let cut = &file[..file.len() - 3];
        assert_err(Checkpoint::parse(cut), Kind::Truncated, "`w.scales`");
        // Cut inside the first tensor: it is the one named.
        let header = 8 + u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
        assert_err(
            Checkpoint::parse(&file[..header + 10]),
            Kind::Truncated,
            "`w.packed`",
        );
        // Cut inside the header, and before the length field ends.
        assert_err(
            Checkpoint::parse(&file[..header - 5]),
            Kind::Truncated,
            "header",
        );
        assert_err(Checkpoint::parse(&file[..5]), Kind::Truncated, "8-byte");
        // Not safetensors at all.
        assert_err(
            Checkpoint::parse(b"\x05\x00\x00\x00\x00\x00\x00\x00hello"),
            Kind::Format,
            "JSON",
        );
        // A header whose shape disagrees with its byte range names the tensor.
        let mut bad = file.clone();
        let text = String::from_utf8(bad[8..header].to_vec()).unwrap();
        let patched = text.replacen("[2,3,2]", "[2,3,3]", 1);
        assert_ne!(text, patched);
        bad[8..header].copy_from_slice(patched.as_bytes());
        assert_err(Checkpoint::parse(&bad), Kind::Shape, "`w.scales`");
    }

    #[test]
    fn typed_reads_check_dtype_and_shape() {
        let mut w = CheckpointWriter::new();
        w.add_bf16_from_f32("x", &[2, 2], &[1.0, -2.5, 0.125, 3.0])
            .unwrap();
        w.add_f32("y", &[3], &[1.0, 2.0, 3.0]).unwrap();
        w.add_i32("ids32", &[2, 1], &[3, -1]).unwrap();
        w.add_i64("ids64", &[2, 1], &[3, -1]).unwrap();
        let f16: Vec<u8> = [1.5f32, -0.25]
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_bits().to_le_bytes())
            .collect();
        w.add_bytes("h", Dtype::F16, &[2], f16).unwrap();
        let bytes = w.to_bytes().unwrap();
        let ck = Checkpoint::parse(&bytes).unwrap();
        let x = ck.read_float("x").unwrap();
        assert_eq!(x.data, [1.0, -2.5, 0.125, 3.0]);
        assert_eq!(x.dtype, Dtype::BF16);
        assert_eq!(x.dims2("(T, K)").unwrap(), (2, 2));
        assert!(x.expect_shape(&[Some(2), None], "(T, K)").is_ok());
        assert_err(
            x.expect_shape(&[None, Some(4)], "(T, K)"),
            Kind::Shape,
            "`x`",
        );
        assert_err(x.dims3("(E, N, K)"), Kind::Shape, "`x`");
        assert_eq!(ck.read_float("h").unwrap().data, [1.5, -0.25]);
        assert_eq!(ck.read_f32("y").unwrap().data, [1.0, 2.0, 3.0]);
        assert_err(ck.read_f32("x"), Kind::Dtype, "`x`");
        assert_err(ck.read_bf16("y"), Kind::Dtype, "`y`");
        assert_eq!(ck.read_index("ids32").unwrap().data, [3, -1]);
        assert_eq!(ck.read_index("ids64").unwrap().data, [3, -1]);
        assert_eq!(ck.read_i32("ids32").unwrap().data, [3, -1]);
        assert_err(ck.read_i64("ids32"), Kind::Dtype, "`ids32`");
        assert_err(ck.read_index("x"), Kind::Dtype, "`x`");
        assert_err(ck.read_float("z"), Kind::Missing, "`z`");

        let mut dup = CheckpointWriter::new();
        dup.add_u8("a", &[1], &[0]).unwrap();
        assert_err(dup.add_u8("a", &[1], &[0]), Kind::Name, "`a`");
        assert_err(dup.add_u8("b", &[2], &[0]), Kind::Shape, "`b`");
    }

    #[test]
    fn expert_weights_are_read_dense_or_mxfp4() {
        let (e, n, k) = (2, 2, 32);
        let bits = weights_bf16(e * n * k, 6);
        let dense = bf16_file("w", [e, n, k], &bits);
        let ck = Checkpoint::parse(&dense).unwrap();
        let StoredWeights::Dense(t) = ck.read_expert_weights("w").unwrap() else {
            panic!("expected dense weights");
        };
        assert_eq!(
            t.data,
            bits.iter()
                .map(|&b| bf16_bits_to_f32(b))
                .collect::<Vec<_>>()
        );

        let mx = quantize_mxfp4_bf16(&bits, e, n, k).unwrap();
        let file = write_mx("w", &mx, MxLayoutKind::GptOss).unwrap();
        let ck = Checkpoint::parse(&file).unwrap();
        let stored = ck.read_expert_weights("w").unwrap();
        assert_eq!(stored.describe(), "MXFP4 (gpt-oss) [2, 2, 32]");
        assert_eq!(stored.to_f32(), dequantize_f32(&mx));

        let mut both = CheckpointWriter::new();
        both.add_bf16("w", &[e, n, k], &bits).unwrap();
        both.add_mx("w", &mx, MxLayoutKind::Torchao).unwrap();
        let both = both.to_bytes().unwrap();
        assert_err(
            Checkpoint::parse(&both).unwrap().read_expert_weights("w"),
            Kind::Name,
            "`w`",
        );
    }

    /// The torchao golden file's `input_bf16` quantized by [`quantize_file`] gives torchao's own
    /// `packed` and `scales` bytes (in both layouts).
    #[test]
    fn quantize_file_matches_torchao_on_the_golden_file() {
        // Found as every golden test finds it: `$MXMOE_GOLDEN` first, else the vendored copy.
        let path = crate::mxfp4::test_support::golden_path();
        let golden = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("could not read the golden file {}: {e}", path.display()));
        let src = Checkpoint::parse(&golden).unwrap();
        let packed = src.read_u8("packed").unwrap();
        let scales = src.read_u8("scales").unwrap();
        for layout in MxLayoutKind::ALL {
            let out = quantize_file(
                &golden,
                &QuantizeOptions {
                    layout,
                    tensors: Some(vec!["input_bf16".into()]),
                    source: None,
                },
            )
            .unwrap();
            let ck = Checkpoint::parse(&out.bytes).unwrap();
            let (w, found) = ck.read_mx("input_bf16").unwrap();
            assert_eq!(found, layout);
            assert_eq!(w.packed(), &packed.data[..], "{layout}");
            assert_eq!(w.scales(), &scales.data[..], "{layout}");
        }
    }

    /// A header with a repeated tensor name, built by hand (no writer produces one).
    fn file_with_header(header: &str, data: &[u8]) -> Vec<u8> {
        let mut f = (header.len() as u64).to_le_bytes().to_vec();
        f.extend_from_slice(header.as_bytes());
        f.extend_from_slice(data);
        f
    }

    #[test]
    fn duplicate_header_names_are_reported_as_duplicates() {
        let header = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]},"a":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}}"#;
        let file = file_with_header(header, &[1, 2, 3, 4, 5, 6]);
        assert_err(Checkpoint::parse(&file), Kind::Name, "`a` more than once");
        // A name with a newline and an ANSI escape is printed escaped, on one line.
        let header = r#"{"x\n\u001b[31my":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"x\n\u001b[31my":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}"#;
        let e = Checkpoint::parse(&file_with_header(header, &[0; 4])).unwrap_err();
        let msg = e.to_string();
        assert!(!msg.contains('\n') && !msg.contains('\u{1b}'), "{msg:?}");
        assert!(msg.contains(r"`x\n\u{1b}[31my`"), "{msg}");
    }

    #[test]
    fn names_and_metadata_in_errors_are_escaped() {
        assert_eq!(escape("plain.name_1"), "plain.name_1");
        assert_eq!(escape("a\nb\u{1b}[0m\t"), r"a\nb\u{1b}[0m\t");
        let mut w = CheckpointWriter::new();
        w.add_u8("bad\nname", &[1], &[0]).unwrap();
        let bytes = w.to_bytes().unwrap();
        let ck = Checkpoint::parse(&bytes).unwrap();
        for e in [
            ck.read_f32("bad\nname").unwrap_err(),
            ck.read_f32("gone\u{1b}").unwrap_err(),
            ck.read_mx("w\r").unwrap_err(),
            ck.read_expert_weights("w\r").unwrap_err(),
        ] {
            let msg = e.to_string();
            assert!(!msg.chars().any(char::is_control), "{msg:?}");
        }
        // The missing-tensor message lists the file's names escaped too.
        let msg = ck.read_f32("gone").unwrap_err().to_string();
        assert!(msg.contains(r"`bad\nname`"), "{msg}");
        // Duplicate names given to the writer.
        let mut dup = CheckpointWriter::new();
        dup.add_u8("t\x07", &[1], &[0]).unwrap();
        let msg = dup.add_u8("t\x07", &[1], &[0]).unwrap_err().to_string();
        assert!(msg.contains(r"`t\u{7}` is written twice"), "{msg}");
    }

    #[test]
    fn nan_scales_are_rejected_unless_allowed() {
        // Expert 1, row 2, block 1 of a [2, 3, 64] weight holds byte 255.
        let file = mx_file(|t| {
            let mut scales = vec![127u8; 2 * 3 * 2];
            scales[(3 + 2) * 2 + 1] = 255;
            t.insert("w.scales", (Dtype::U8, vec![2, 3, 2], scales));
        });
        let ck = Checkpoint::parse(&file).unwrap();
        let e = ck.read_mx("w").unwrap_err();
        assert_eq!(what(&e), Kind::NanScale);
        let msg = e.to_string();
        for needle in ["`w.scales`", "expert 1", "row 2", "block 1", "k = 32 to 63"] {
            assert!(msg.contains(needle), "`{needle}` not in: {msg}");
        }
        assert_err(
            ck.read_expert_weights("w"),
            Kind::NanScale,
            "expert 1, row 2",
        );
        assert_err(read_mx(&file, "w"), Kind::NanScale, "`w.scales`");
        // The explicit opt-in keeps torchao's behaviour: accepted, and NaN after dequantization.
        let ck = Checkpoint::parse(&file).unwrap().allow_nan_scales(true);
        let (w, _) = ck.read_mx("w").unwrap();
        assert!(w.has_nan_scales());
        let dense = dequantize_f32(&w);
        let start = ((3 + 2) * 64) + 32;
        assert!(dense[start..start + 32].iter().all(|v| v.is_nan()));
        assert!(dense[..start].iter().all(|v| v.is_finite()));
        // Bytes 253 and 254 are finite scales and accepted; large codes overflow to infinity.
        let big = mx_file(|t| {
            let mut scales = vec![127u8; 2 * 3 * 2];
            scales[0] = 253;
            scales[1] = 254;
            t.insert("w.scales", (Dtype::U8, vec![2, 3, 2], scales));
            // Codes 0x21: k even = 1 (0.5), k odd = 2 (1.0); 0x76: 6 (4.0) and 7 (6.0).
            let mut packed = vec![0x21u8; 2 * 3 * 32];
            packed[0] = 0x76;
            packed[16] = 0x43; // 1.5 and 2.0
            packed[17] = 0x21;
            t.insert("w.packed", (Dtype::U8, vec![2, 3, 32], packed));
        });
        let w = read_mx(&big, "w").unwrap();
        let dense = dequantize_f32(&w);
        assert_eq!(dense[0], f32::INFINITY, "4 · 2^126 overflows");
        assert_eq!(dense[1], f32::INFINITY, "6 · 2^126 overflows");
        assert_eq!(dense[2], 0.5 * 2f32.powi(126));
        assert_eq!(dense[3], 2f32.powi(126));
        assert_eq!(dense[32], 1.5 * 2f32.powi(127), "1.5 · 2^127 is finite");
        assert_eq!(dense[33], f32::INFINITY, "2 · 2^127 overflows");
        assert_eq!(dense[35], 2f32.powi(127));
    }

    #[test]
    fn quantize_converts_mxfp4_weights_stored_in_the_other_layout() {
        let (e, n, k) = (2, 3, 64);
        let bits = weights_bf16(e * n * k, 9);
        let mx = quantize_mxfp4_bf16(&bits, e, n, k).unwrap();
        let torchao = quantize_file(
            &bf16_file("w", [e, n, k], &bits),
            &QuantizeOptions::default(),
        )
        .unwrap()
        .bytes;
        // Re-quantizing to gpt-oss converts the torchao pair (nothing left to quantize).
        let out = quantize_file(
            &torchao,
            &QuantizeOptions {
                layout: MxLayoutKind::GptOss,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(out.quantized.is_empty());
        assert_eq!(out.converted, [("w".to_string(), MxLayoutKind::Torchao)]);
        assert!(out.copied.is_empty());
        let ck = Checkpoint::parse(&out.bytes).unwrap();
        assert_eq!(ck.names(), ["w_blocks", "w_scales"]);
        assert_eq!(ck.metadata_value(META_LAYOUT), Some("gpt-oss"));
        assert_eq!(ck.read_mx("w").unwrap(), (mx.clone(), MxLayoutKind::GptOss));
        let record: serde_json::Value =
            serde_json::from_str(ck.metadata_value(META_QUANTIZED).unwrap()).unwrap();
        assert_eq!(record["w"]["packed"], "w_blocks");
        assert_eq!(record["w"]["dtype"], "BF16");
        // And back, byte for byte.
        let back = quantize_file(&out.bytes, &QuantizeOptions::default()).unwrap();
        assert_eq!(back.converted, [("w".to_string(), MxLayoutKind::GptOss)]);
        let ck = Checkpoint::parse(&back.bytes).unwrap();
        assert_eq!(ck.read_mx("w").unwrap(), (mx, MxLayoutKind::Torchao));
        // The same layout again converts nothing.
        let same = quantize_file(&torchao, &QuantizeOptions::default()).unwrap();
        assert!(same.converted.is_empty());
        assert_eq!(same.copied, ["w.packed", "w.scales"]);
    }

    #[test]
    fn quantize_file_handles_many_tensors_on_a_bounded_pool() {
        // Many small tensors: each is quantized once, in name order, equal to a direct call.
        let count = 3000;
        let mut input = CheckpointWriter::new();
        let mut expected = BTreeMap::new();
        for i in 0..count {
            let bits = weights_bf16(32, i as u64 + 100);
            let name = format!("t{i:05}");
            input.add_bf16(name.clone(), &[1, 1, 32], &bits).unwrap();
            expected.insert(name, quantize_mxfp4_bf16(&bits, 1, 1, 32).unwrap());
        }
        let started = std::time::Instant::now();
        let out = quantize_file(&input.to_bytes().unwrap(), &QuantizeOptions::default()).unwrap();
        let elapsed = started.elapsed();
        assert_eq!(out.quantized.len(), count);
        let ck = Checkpoint::parse(&out.bytes).unwrap();
        for (name, w) in &expected {
            assert_eq!(&ck.read_mx(name).unwrap().0, w, "{name}");
        }
        // Linear work: thousands of tiny tensors take well under a minute even unoptimized.
        assert!(elapsed.as_secs() < 60, "{elapsed:?}");
        // Experts of one large tensor are split over the pool and reassembled in order.
        let (e, n, k) = (9, 64, 64);
        let bits = weights_bf16(e * n * k, 7);
        let shape = MxShape::new(e, n, k).unwrap();
        assert!(experts_per_chunk(shape, 2) >= 1);
        let jobs = [QuantizeJob {
            dtype: Dtype::BF16,
            bytes: &bits
                .iter()
                .flat_map(|b| b.to_le_bytes())
                .collect::<Vec<_>>(),
            shape,
        }];
        let whole = quantize_mxfp4_bf16(&bits, e, n, k).unwrap();
        assert_eq!(quantize_pool(&jobs).pop().unwrap().unwrap(), whole);
    }

    #[test]
    fn layout_names_parse() {
        for layout in MxLayoutKind::ALL {
            assert_eq!(layout.name().parse::<MxLayoutKind>().unwrap(), layout);
        }
        assert_eq!(
            "GPT_OSS".parse::<MxLayoutKind>().unwrap(),
            MxLayoutKind::GptOss
        );
        assert!("fp8".parse::<MxLayoutKind>().is_err());
    }

    // NVFP4 exports.
    use crate::nvfp4::{NvError, dequantize_nvfp4_f32, quantize_nvfp4};
    /// A checkpoint with `projections` of `experts` experts, each quantized two-level from
    /// `values[proj]` (`[E, n, k]`), written in `layout`'s names.
    fn export(
        layout: NvLayout,
        values: &[Vec<f32>],
        experts: usize,
        n: usize,
        k: usize,
    ) -> Vec<u8> {
        let mut wr = CheckpointWriter::new();
        for (p, v) in values.iter().enumerate() {
            let proj = ["gate_proj", "up_proj"][p];
            let w = quantize_nvfp4(v, experts, n, k, true).unwrap();
            add_nv_experts(&mut wr, "model.layers.0.mlp.experts", &w, &[proj], layout).unwrap();
        }
        wr.to_bytes().unwrap()
    }

    #[test]
    fn per_expert_exports_read_back_stacked_in_both_layouts() {
        let mut rng = crate::test_rng::XorShift::new(11);
        let (e, n, k) = (3, 8, 32);
        // Gate and up at different ranges, so their tensor scales differ.
        let gate = rng.vec(e * n * k, 1.0);
        let up = rng.vec(e * n * k, 30.0);
        for layout in [NvLayout::ModelOpt, NvLayout::CompressedTensors] {
            let bytes = export(layout, &[gate.clone(), up.clone()], e, n, k);
            let ck = Checkpoint::parse(&bytes).unwrap();
            let prefix = "model.layers.0.mlp.experts";
            let (w, got_layout) =
                read_nv_experts(&ck, prefix, e, &["gate_proj", "up_proj"], k).unwrap();
            assert_eq!(got_layout, layout);
            assert_eq!((w.shape().n(), w.groups()), (2 * n, 2));
            // Each stacked expert: its gate rows, then its up rows, each with its own scale.
            let deq = dequantize_nvfp4_f32(&w);
            let g = dequantize_nvfp4_f32(&quantize_nvfp4(&gate, e, n, k, true).unwrap());
            let u = dequantize_nvfp4_f32(&quantize_nvfp4(&up, e, n, k, true).unwrap());
            for x in 0..e {
                let row = |v: &[f32]| v[x * n * k..][..n * k].to_vec();
                let got = &deq[x * 2 * n * k..][..2 * n * k];
                let close = |a: &[f32], b: &[f32]| {
                    a.iter()
                        .zip(b)
                        .all(|(p, q)| (p - q).abs() <= 1e-6 * q.abs().max(1e-30))
                };
                // ModelOpt is bit-exact; compressed-tensors' reciprocal costs up to an f32 ulp.
                assert!(
                    close(&got[..n * k], &row(&g)),
                    "{layout:?} gate of expert {x}"
                );
                assert!(
                    close(&got[n * k..], &row(&u)),
                    "{layout:?} up of expert {x}"
                );
                if layout == NvLayout::ModelOpt {
                    assert_eq!(&got[..n * k], &row(&g)[..]);
                }
            }
            let (down, _) = read_nv_experts(&ck, prefix, e, &["up_proj"], k).unwrap();
            assert_eq!((down.shape().n(), down.groups()), (n, 1));
        }
    }

    #[test]
    fn stacked_experts_export_and_read_back_unchanged() {
        let mut rng = crate::test_rng::XorShift::new(13);
        let (e, n, k) = (3, 8, 32);
        let (gate, up) = (rng.vec(e * n * k, 1.0), rng.vec(e * n * k, 30.0));
        let mut wr = CheckpointWriter::new();
        for (v, proj) in [(&gate, "gate_proj"), (&up, "up_proj")] {
            let w = quantize_nvfp4(v, e, n, k, true).unwrap();
            add_nv_experts(&mut wr, "x", &w, &[proj], NvLayout::ModelOpt).unwrap();
        }
        let bytes = wr.to_bytes().unwrap();
        let ck = Checkpoint::parse(&bytes).unwrap();
        // Two groups per expert (gate, up) read stacked, written back split, read again.
        let (stacked, _) = read_nv_experts(&ck, "x", e, &["gate_proj", "up_proj"], k).unwrap();
        for layout in [NvLayout::ModelOpt, NvLayout::CompressedTensors] {
            let mut wr = CheckpointWriter::new();
            add_nv_experts(&mut wr, "y", &stacked, &["gate_proj", "up_proj"], layout).unwrap();
            let bytes = wr.to_bytes().unwrap();
            let ck = Checkpoint::parse(&bytes).unwrap();
            let mut names = ck.names();
            names.sort_unstable();
            let mut want = nv_export_names("y", e, &["gate_proj", "up_proj"], layout);
            want.sort_unstable();
            assert_eq!(names, want.iter().map(String::as_str).collect::<Vec<_>>());
            let (back, got_layout) =
                read_nv_experts(&ck, "y", e, &["gate_proj", "up_proj"], k).unwrap();
            assert_eq!(got_layout, layout);
            assert_eq!(back.packed(), stacked.packed(), "{layout:?}");
            assert_eq!(back.scales(), stacked.scales(), "{layout:?}");
            let (a, b) = (
                back.tensor_scales().unwrap(),
                stacked.tensor_scales().unwrap(),
            );
            for (x, y) in a.iter().zip(b) {
                // ModelOpt stores the scale; compressed-tensors its reciprocal (one f32 rounding
                // each way).
                assert!(
                    (x - y).abs() <= 2.0 * f32::EPSILON * y.abs(),
                    "{layout:?}: {x} vs {y}"
                );
            }
            if layout == NvLayout::ModelOpt {
                assert_eq!(a, b);
            }
        }
        // One tensor scale per expert: every part gets it.
        let one = quantize_nvfp4(&gate, e, n, k, true).unwrap();
        let mut wr = CheckpointWriter::new();
        add_nv_experts(&mut wr, "z", &one, &["a", "b"], NvLayout::ModelOpt).unwrap();
        let bytes = wr.to_bytes().unwrap();
        let ck = Checkpoint::parse(&bytes).unwrap();
        let (back, _) = read_nv_experts(&ck, "z", e, &["a", "b"], k).unwrap();
        assert_eq!(back.packed(), one.packed());
        assert_eq!(dequantize_nvfp4_f32(&back), dequantize_nvfp4_f32(&one));
    }

    #[test]
    fn exports_that_cannot_be_written_are_typed_errors() {
        let mut rng = crate::test_rng::XorShift::new(14);
        let (e, n, k) = (2, 6, 32);
        let v = rng.vec(e * n * k, 1.0);
        let single = quantize_nvfp4(&v, e, n, k, false).unwrap();
        let two = quantize_nvfp4(&v, e, n, k, true).unwrap();
        let invalid = |w: &NvWeights, projections: &[&str]| {
            let mut wr = CheckpointWriter::new();
            matches!(
                add_nv_experts(&mut wr, "p", w, projections, NvLayout::ModelOpt),
                Err(Error::InvalidArgument {
                    what: "NVFP4 export",
                    ..
                })
            )
        };
        assert!(invalid(&single, &["a"]), "single-level weights");
        assert!(invalid(&two, &[]), "no projections");
        assert!(invalid(&two, &["a", "b", "c", "d"]), "6 rows in 4 parts");
        let mut wr = CheckpointWriter::new();
        add_nv_experts(&mut wr, "p", &two, &["a"], NvLayout::ModelOpt).unwrap();
        assert!(
            add_nv_experts(&mut wr, "p", &two, &["a"], NvLayout::ModelOpt).is_err(),
            "names written twice"
        );
    }

    #[test]
    fn malformed_exports_are_typed_errors() {
        let mut rng = crate::test_rng::XorShift::new(12);
        let (e, n, k) = (2, 4, 32);
        let v = rng.vec(e * n * k, 1.0);
        let bytes = export(NvLayout::ModelOpt, std::slice::from_ref(&v), e, n, k);
        let ck = Checkpoint::parse(&bytes).unwrap();
        let prefix = "model.layers.0.mlp.experts";
        let kind = |r: Result<(NvWeights, NvLayout)>| match r {
            Err(Error::Checkpoint { kind, .. }) => Some(kind),
            _ => None,
        };
        // A third expert that is not in the file; a K that does not match.
        assert_eq!(
            kind(read_nv_experts(&ck, prefix, 3, &["gate_proj"], k)),
            Some(Kind::Missing)
        );
        assert_eq!(
            kind(read_nv_experts(&ck, prefix, 2, &["gate_proj"], 64)),
            Some(Kind::Shape)
        );
        assert!(matches!(
            read_nv_experts(&ck, prefix, 2, &[], k),
            Err(Error::InvalidArgument { .. })
        ));
        // A NaN block scale byte is the container's typed error.
        let mut wr = CheckpointWriter::new();
        let base = format!("{prefix}.0.gate_proj");
        wr.add_u8(format!("{base}.weight"), &[1, 8], &[0; 8])
            .unwrap();
        wr.add_bytes(
            format!("{base}.weight_scale"),
            Dtype::F8_E4M3,
            &[1, 1],
            vec![0x7F],
        )
        .unwrap();
        wr.add_f32(format!("{base}.weight_scale_2"), &[1], &[1.0])
            .unwrap();
        let bytes = wr.to_bytes().unwrap();
        let ck = Checkpoint::parse(&bytes).unwrap();
        assert!(matches!(
            read_nv_experts(&ck, prefix, 1, &["gate_proj"], 16),
            Err(Error::Nv(NvError::BadBlockScale { byte: 0x7F, .. }))
        ));
        // A block scale stored as BF16 is a dtype error, not reinterpreted bytes.
        let mut wr = CheckpointWriter::new();
        wr.add_u8(format!("{base}.weight"), &[1, 8], &[0; 8])
            .unwrap();
        wr.add_bf16(format!("{base}.weight_scale"), &[1, 1], &[0x3F80])
            .unwrap();
        wr.add_f32(format!("{base}.weight_scale_2"), &[1], &[1.0])
            .unwrap();
        let bytes = wr.to_bytes().unwrap();
        let ck = Checkpoint::parse(&bytes).unwrap();
        assert_eq!(
            kind(read_nv_experts(&ck, prefix, 1, &["gate_proj"], 16)),
            Some(Kind::Dtype)
        );
    }

    #[test]
    fn nvfp4_quantize_file_writes_what_read_nv_reads() {
        let mut rng = crate::test_rng::XorShift::new(31);
        let (e, n, k) = (3, 8, 48);
        let w = rng.vec(e * n * k, 2.0);
        let mut f = CheckpointWriter::new();
        f.add_bf16_from_f32("experts.w", &[e, n, k], &w).unwrap();
        f.add_f32("router", &[4, 4], &[0.5; 16]).unwrap();
        f.set_metadata("note", "kept");
        let input = f.to_bytes().unwrap();
        for two_level in [false, true] {
            let options = NvQuantizeOptions {
                two_level,
                ..NvQuantizeOptions::default()
            };
            let out = quantize_file_nvfp4(&input, &options).unwrap();
            assert_eq!(out.copied, vec!["router".to_string()]);
            assert_eq!(out.quantized.len(), 1);
            let ck = Checkpoint::parse(&out.bytes).unwrap();
            assert_eq!(ck.metadata_value(META_FORMAT), Some("nvfp4"));
            assert_eq!(ck.metadata_value("note"), Some("kept"));
            assert!(ck.is_nv("experts.w") && !ck.contains("experts.w"));
            let got = ck.read_nv("experts.w").unwrap();
            let bits: Vec<u16> = w.iter().map(|&v| f32_to_bf16_bits(v)).collect();
            let want = crate::nvfp4::quantize_nvfp4_bf16(&bits, e, n, k, two_level).unwrap();
            assert_eq!(got, want);
            assert!(matches!(
                ck.read_expert_weights("experts.w").unwrap(),
                StoredWeights::Nv(_)
            ));
        }
        // K = 40 is not a multiple of 16: listed, it is an error; unlisted, it is copied.
        let mut f = CheckpointWriter::new();
        f.add_f32("w", &[1, 2, 40], &[1.0; 80]).unwrap();
        let input = f.to_bytes().unwrap();
        let listed = NvQuantizeOptions {
            tensors: Some(vec!["w".into()]),
            ..NvQuantizeOptions::default()
        };
        assert!(matches!(
            quantize_file_nvfp4(&input, &listed),
            Err(Error::Checkpoint {
                kind: Kind::Shape,
                ..
            })
        ));
        let out = quantize_file_nvfp4(&input, &NvQuantizeOptions::default()).unwrap();
        assert_eq!(out.copied, vec!["w".to_string()]);
        // An output name already taken.
        let mut f = CheckpointWriter::new();
        f.add_f32("w", &[1, 2, 32], &[1.0; 64]).unwrap();
        f.add_u8("w.packed", &[1], &[0]).unwrap();
        let input = f.to_bytes().unwrap();
        assert!(matches!(
            quantize_file_nvfp4(&input, &NvQuantizeOptions::default()),
            Err(Error::Checkpoint {
                kind: Kind::Name,
                ..
            })
        ));
        // Two-level with an all-zero expert.
        let mut f = CheckpointWriter::new();
        f.add_f32("w", &[1, 2, 32], &[0.0; 64]).unwrap();
        let input = f.to_bytes().unwrap();
        let two = NvQuantizeOptions {
            two_level: true,
            ..NvQuantizeOptions::default()
        };
        assert!(matches!(
            quantize_file_nvfp4(&input, &two),
            Err(Error::Nv(NvError::ZeroExpert { expert: 0 }))
        ));
    }

    #[test]
    fn nvfp4_quantize_file_exports_per_expert_linears() {
        let mut rng = crate::test_rng::XorShift::new(32);
        let (e, n, k) = (3, 8, 48);
        let w = rng.vec(e * n * k, 2.0);
        let name = "model.layers.0.mlp.experts.down_proj";
        let mut f = CheckpointWriter::new();
        f.add_bf16_from_f32(name, &[e, n, k], &w).unwrap();
        f.add_f32("router", &[4, 4], &[0.5; 16]).unwrap();
        let input = f.to_bytes().unwrap();
        let bits: Vec<u16> = w.iter().map(|&v| f32_to_bf16_bits(v)).collect();
        let want = crate::nvfp4::quantize_nvfp4_bf16(&bits, e, n, k, true).unwrap();
        for layout in [NvLayout::ModelOpt, NvLayout::CompressedTensors] {
            let options = NvQuantizeOptions {
                two_level: true,
                export: Some(layout),
                ..NvQuantizeOptions::default()
            };
            let out = quantize_file_nvfp4(&input, &options).unwrap();
            assert_eq!(out.copied, vec!["router".to_string()]);
            let ck = Checkpoint::parse(&out.bytes).unwrap();
            assert!(!ck.contains(name) && !ck.contains(&format!("{name}.packed")));
            let prefix = "model.layers.0.mlp.experts";
            let (got, got_layout) = read_nv_experts(&ck, prefix, e, &["down_proj"], k).unwrap();
            assert_eq!(got_layout, layout);
            assert_eq!((got.packed(), got.scales()), (want.packed(), want.scales()));
            if layout == NvLayout::ModelOpt {
                assert_eq!(got, want);
            }
            let record = ck.metadata_value(META_QUANTIZED).unwrap();
            assert!(record.contains(layout.name()), "{record}");
        }
        // An export needs two levels; a name without a `<prefix>.<proj>` form cannot be split.
        let single = NvQuantizeOptions {
            export: Some(NvLayout::ModelOpt),
            ..NvQuantizeOptions::default()
        };
        assert!(matches!(
            quantize_file_nvfp4(&input, &single),
            Err(Error::InvalidArgument {
                what: "NVFP4 export",
                ..
            })
        ));
        let mut f = CheckpointWriter::new();
        f.add_f32("w", &[1, 2, 32], &[1.0; 64]).unwrap();
        let input = f.to_bytes().unwrap();
        let export = NvQuantizeOptions {
            two_level: true,
            export: Some(NvLayout::ModelOpt),
            ..NvQuantizeOptions::default()
        };
        assert!(matches!(
            quantize_file_nvfp4(&input, &export),
            Err(Error::Checkpoint {
                kind: Kind::Name,
                ..
            })
        ));
    }
}
