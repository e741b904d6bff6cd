//! gpt-oss expert weights read straight from a Hugging Face checkpoint folder (GPT_OSS.md §2).
//!
//! A folder holds either `model.safetensors.index.json` (`{"metadata": …, "weight_map":
//! {"tensor name": "shard file name", …}}`) and its shards, or a single `model.safetensors`.
//! [`ShardedCheckpoint::open`] validates the index; [`ShardedCheckpoint::layer_experts`] reads
//! one layer's `mlp.experts.{gate_up,down}_proj_{blocks,scales,bias}` as [`MxWeights`] plus bf16
//! bias bits, never materialising bf16 weights. The MXFP4 layout itself is parsed by
//! [`Checkpoint::read_mx`] (`blocks [E, N, K/32, 16]` is byte-for-byte the packed `[E, N, K/2]`).
//!
//! Every failure is an [`Error::Checkpoint`]: [`CheckpointErrorKind::Shard`] for a missing or
//! unreadable shard or a shard name outside the folder, [`CheckpointErrorKind::Format`] for a
//! malformed index, [`CheckpointErrorKind::Missing`] for a tensor the index does not list or
//! its shard does not hold, [`CheckpointErrorKind::Shape`] for projections that disagree.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use crate::checkpoint::{Checkpoint, CheckpointErrorKind as Kind, CheckpointWriter, escape};
use crate::error::{Error, Result};
use crate::mxfp4::MxWeights;

/// The index file of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The file of an unsharded checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";

fn err(kind: Kind, detail: impl Into<String>) -> Error {
    Error::Checkpoint {
        kind,
        detail: detail.into(),
    }
}

/// A checkpoint folder: the index's tensor → shard map (or one file holding everything).
#[derive(Debug, Clone)]
pub struct ShardedCheckpoint {
    dir: PathBuf,
    /// Tensor name → shard file name; `None` for a single `model.safetensors`.
    weight_map: Option<BTreeMap<String, String>>,
}

/// One layer's experts: `gate_up` is `[E, 2I, H]` (rows interleaved gate, up), `down` is
/// `[E, H, I]`; biases are bf16 bits, `[E, 2I]` and `[E, H]` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct GptOssLayerExperts {
    /// `mlp.experts.gate_up_proj`, `[E, 2I, H]`.
    pub gate_up: MxWeights,
    /// `mlp.experts.gate_up_proj_bias`, bf16 bits `[E, 2I]`.
    pub gate_up_bias: Vec<u16>,
    /// `mlp.experts.down_proj`, `[E, H, I]`.
    pub down: MxWeights,
    /// `mlp.experts.down_proj_bias`, bf16 bits `[E, H]`.
    pub down_bias: Vec<u16>,
}

impl GptOssLayerExperts {
    /// Number of experts E.
    pub fn experts(&self) -> usize {
        self.down.shape().experts()
    }

    /// Hidden size H.
    pub fn hidden(&self) -> usize {
        self.down.shape().n()
    }

    /// Intermediate size I.
    pub fn intermediate(&self) -> usize {
        self.down.shape().k()
    }
}

/// Whether `name` is a relative path that stays inside the folder (only normal components).
fn is_inside(name: &str) -> bool {
    !name.is_empty()
        && !name.contains('\\')
        && Path::new(name)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

impl ShardedCheckpoint {
    /// Opens a checkpoint folder: reads `model.safetensors.index.json` if present (checking that
    /// every shard it names lies inside `dir` and exists), else expects `model.safetensors`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let index_path = dir.join(INDEX_FILE);
        if !index_path.is_file() {
            let single = dir.join(SINGLE_FILE);
            if !single.is_file() {
                return Err(err(
                    Kind::Shard,
                    format!(
                        "`{}` holds neither {INDEX_FILE} nor {SINGLE_FILE}",
                        escape(&dir.display().to_string())
                    ),
                ));
            }
            return Ok(Self {
                dir,
                weight_map: None,
            });
        }
        let text = std::fs::read_to_string(&index_path).map_err(|e| {
            err(
                Kind::Shard,
                format!("cannot read {INDEX_FILE}: {}", escape(&e.to_string())),
            )
        })?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            err(
                Kind::Format,
                format!("{INDEX_FILE} is not JSON: {}", escape(&e.to_string())),
            )
        })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                err(
                    Kind::Format,
                    format!("{INDEX_FILE} has no `weight_map` object"),
                )
            })?;
        let mut weight_map = BTreeMap::new();
        for (name, shard) in map {
            let shard = shard.as_str().ok_or_else(|| {
                err(
                    Kind::Format,
                    format!("{INDEX_FILE} maps `{}` to a non-string shard", escape(name)),
                )
            })?;
            if !is_inside(shard) {
                return Err(err(
                    Kind::Shard,
                    format!(
                        "{INDEX_FILE} maps `{}` to shard `{}`, which is not a relative path inside the checkpoint folder",
                        escape(name),
                        escape(shard)
                    ),
                ));
            }
            weight_map.insert(name.clone(), shard.to_string());
        }
        let shards: BTreeSet<&String> = weight_map.values().collect();
        for shard in shards {
            if !dir.join(shard).is_file() {
                return Err(err(
                    Kind::Shard,
                    format!(
                        "shard `{}` listed in {INDEX_FILE} does not exist",
                        escape(shard)
                    ),
                ));
            }
        }
        Ok(Self {
            dir,
            weight_map: Some(weight_map),
        })
    }

    /// The checkpoint folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The shard file holding tensor `name` (for a single file, `model.safetensors`, whether or
    /// not it holds the tensor); `None` when the index does not list it.
    pub fn shard_of(&self, name: &str) -> Option<&str> {
        match &self.weight_map {
            Some(map) => map.get(name).map(String::as_str),
            None => Some(SINGLE_FILE),
        }
    }

    /// The shard files, sorted and without repeats.
    pub fn shards(&self) -> Vec<&str> {
        match &self.weight_map {
            Some(map) => map
                .values()
                .map(String::as_str)
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
            None => vec![SINGLE_FILE],
        }
    }

    /// The shard of `name`, or [`Kind::Missing`].
    fn require_shard(&self, name: &str) -> Result<&str> {
        self.shard_of(name).ok_or_else(|| {
            err(
                Kind::Missing,
                format!("`{}` is not listed in {INDEX_FILE}", escape(name)),
            )
        })
    }

    /// Layer `layer`'s experts (see [`GptOssLayerExperts`]). Reads each shard involved once.
    pub fn layer_experts(&self, layer: usize) -> Result<GptOssLayerExperts> {
        let base = format!("model.layers.{layer}.mlp.experts");
        let gate_up = format!("{base}.gate_up_proj");
        let down = format!("{base}.down_proj");
        let names: Vec<String> = [&gate_up, &down]
            .iter()
            .flat_map(|p| ["blocks", "scales", "bias"].map(|s| format!("{p}_{s}")))
            .collect();
        let mut files: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
        for name in &names {
            let shard = self.require_shard(name)?;
            if !files.contains_key(shard) {
                let bytes = std::fs::read(self.dir.join(shard)).map_err(|e| {
                    err(
                        Kind::Shard,
                        format!(
                            "cannot read shard `{}`: {}",
                            escape(shard),
                            escape(&e.to_string())
                        ),
                    )
                })?;
                files.insert(shard, bytes);
            }
        }
        let mut parsed: BTreeMap<&str, Checkpoint<'_>> = BTreeMap::new();
        for (shard, bytes) in &files {
            let ck = Checkpoint::parse(bytes).map_err(|e| in_shard(e, shard))?;
            parsed.insert(shard, ck);
        }
        let open = |name: &str| -> Result<(&str, &Checkpoint<'_>)> {
            let shard = self.require_shard(name)?;
            let ck = &parsed[shard];
            if !ck.contains(name) {
                return Err(err(
                    Kind::Missing,
                    format!(
                        "{INDEX_FILE} lists `{}` in shard `{}`, which does not hold it",
                        escape(name),
                        escape(shard)
                    ),
                ));
            }
            Ok((shard, ck))
        };
        let read_mx = |proj: &str| -> Result<MxWeights> {
            let (blocks_name, scales_name) = (format!("{proj}_blocks"), format!("{proj}_scales"));
            let (bs, bck) = open(&blocks_name)?;
            let (ss, sck) = open(&scales_name)?;
            if bs == ss {
                return Ok(bck.read_mx(proj).map_err(|e| in_shard(e, bs))?.0);
            }
            // The pair spans two shards: join the two U8 tensors in a small file of their own.
            let mut w = CheckpointWriter::new();
            w.add_view(blocks_name.as_str(), &bck.view(&blocks_name)?)?;
            w.add_view(scales_name.as_str(), &sck.view(&scales_name)?)?;
            let bytes = w.to_bytes()?;
            Ok(Checkpoint::parse(&bytes)?.read_mx(proj)?.0)
        };
        let read_bias = |name: &str, e: usize, n: usize| -> Result<Vec<u16>> {
            let (shard, ck) = open(name)?;
            let t = ck.read_bf16(name).map_err(|e| in_shard(e, shard))?;
            t.expect_shape(&[Some(e), Some(n)], "(E, N), to match the projection")?;
            Ok(t.data)
        };
        let gate_up_w = read_mx(&gate_up)?;
        let down_w = read_mx(&down)?;
        let (g, d) = (gate_up_w.shape(), down_w.shape());
        if g.experts() != d.experts() || g.n() != 2 * d.k() || d.n() != g.k() {
            return Err(err(
                Kind::Shape,
                format!(
                    "layer {layer}: `{}` is [E, N, K] = [{}, {}, {}] and `{}` is [{}, {}, {}]; expected [E, 2I, H] and [E, H, I]",
                    escape(&gate_up),
                    g.experts(),
                    g.n(),
                    g.k(),
                    escape(&down),
                    d.experts(),
                    d.n(),
                    d.k()
                ),
            ));
        }
        let gate_up_bias = read_bias(&format!("{gate_up}_bias"), g.experts(), g.n())?;
        let down_bias = read_bias(&format!("{down}_bias"), d.experts(), d.n())?;
        Ok(GptOssLayerExperts {
            gate_up: gate_up_w,
            gate_up_bias,
            down: down_w,
            down_bias,
        })
    }
}

/// `e` with the shard named, when it is a checkpoint error.
fn in_shard(e: Error, shard: &str) -> Error {
    match e {
        Error::Checkpoint { kind, detail } => Error::Checkpoint {
            kind,
            detail: format!("shard `{}`: {detail}", escape(shard)),
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mxfp4::quantize_mxfp4_bf16;
    use crate::shared::bf16::f32_to_bf16_bits;

    const E: usize = 4;
    const H: usize = 64;
    const I: usize = 96;
    const GU: &str = "model.layers.0.mlp.experts.gate_up_proj";
    const DN: &str = "model.layers.0.mlp.experts.down_proj";

    fn bits(len: usize, seed: u32) -> Vec<u16> {
        let mut s = seed.wrapping_mul(2_654_435_761) | 1;
        (0..len)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                let u = (s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0;
                f32_to_bf16_bits(u * [0.02f32, 1.0, 7.0][(i / 32) % 3])
            })
            .collect()
    }

    /// A tensor to write: name, shape, dtype-tagged data, shard index.
    enum Data {
        U8(Vec<u8>),
        Bf16(Vec<u16>),
    }

    struct Fixture {
        gate_up: MxWeights,
        down: MxWeights,
        gate_up_bias: Vec<u16>,
        down_bias: Vec<u16>,
    }

    fn fixture(down_k: usize) -> (Fixture, Vec<(String, Vec<usize>, Data)>) {
        let gate_up = quantize_mxfp4_bf16(&bits(E * 2 * I * H, 1), E, 2 * I, H).unwrap();
        let down = quantize_mxfp4_bf16(&bits(E * H * down_k, 2), E, H, down_k).unwrap();
        let gate_up_bias = bits(E * 2 * I, 3);
        let down_bias = bits(E * H, 4);
        let mut t = Vec::new();
        for (p, w) in [(GU, &gate_up), (DN, &down)] {
            let s = w.shape();
            t.push((
                format!("{p}_blocks"),
                vec![s.experts(), s.n(), s.k() / 32, 16],
                Data::U8(w.packed().to_vec()),
            ));
            t.push((
                format!("{p}_scales"),
                vec![s.experts(), s.n(), s.k() / 32],
                Data::U8(w.scales().to_vec()),
            ));
        }
        t.push((
            format!("{GU}_bias"),
            vec![E, 2 * I],
            Data::Bf16(gate_up_bias.clone()),
        ));
        t.push((
            format!("{DN}_bias"),
            vec![E, H],
            Data::Bf16(down_bias.clone()),
        ));
        let f = Fixture {
            gate_up,
            down,
            gate_up_bias,
            down_bias,
        };
        (f, t)
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mxmoe-gpt-oss-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    const SHARDS: [&str; 2] = [
        "model-00000-of-00002.safetensors",
        "model-00001-of-00002.safetensors",
    ];

    /// Writes the tensors alternately into two shards (so gate_up's blocks and scales are in
    /// different files) and an index mapping each to `index_shard(name, actual shard)`.
    fn write(
        dir: &Path,
        tensors: &[(String, Vec<usize>, Data)],
        index_shard: impl Fn(&str, &str) -> String,
    ) {
        let mut writers = [CheckpointWriter::new(), CheckpointWriter::new()];
        let mut map = serde_json::Map::new();
        for (i, (name, shape, data)) in tensors.iter().enumerate() {
            let w = &mut writers[i % 2];
            match data {
                Data::U8(d) => w.add_u8(name.as_str(), shape, d).unwrap(),
                Data::Bf16(d) => w.add_bf16(name.as_str(), shape, d).unwrap(),
            }
            map.insert(name.clone(), index_shard(name, SHARDS[i % 2]).into());
        }
        for (w, shard) in writers.iter().zip(SHARDS) {
            std::fs::write(dir.join(shard), w.to_bytes().unwrap()).unwrap();
        }
        let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
        std::fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
    }

    fn kind(e: &Error) -> Kind {
        match e {
            Error::Checkpoint { kind, .. } => *kind,
            other => panic!("expected a checkpoint error, got {other:?}"),
        }
    }

    fn check(f: &Fixture, got: &GptOssLayerExperts) {
        assert_eq!(got.gate_up, f.gate_up);
        assert_eq!(got.down, f.down);
        assert_eq!(got.gate_up_bias, f.gate_up_bias);
        assert_eq!(got.down_bias, f.down_bias);
        assert_eq!((got.experts(), got.hidden(), got.intermediate()), (E, H, I));
    }

    #[test]
    fn two_shard_checkpoint_loads_the_quantized_bytes() {
        let dir = temp_dir("ok");
        let (f, t) = fixture(I);
        write(&dir, &t, |_, s| s.to_string());
        let ck = ShardedCheckpoint::open(&dir).unwrap();
        assert_eq!(ck.shards(), SHARDS.to_vec());
        assert_eq!(ck.shard_of(&format!("{GU}_scales")), Some(SHARDS[1]));
        check(&f, &ck.layer_experts(0).unwrap());
        // Layer 1 is not in the index.
        let e = ck.layer_experts(1).unwrap_err();
        assert_eq!(kind(&e), Kind::Missing, "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn single_file_checkpoint_loads() {
        let dir = temp_dir("single");
        let (f, t) = fixture(I);
        let mut w = CheckpointWriter::new();
        for (name, shape, data) in &t {
            match data {
                Data::U8(d) => w.add_u8(name.as_str(), shape, d).unwrap(),
                Data::Bf16(d) => w.add_bf16(name.as_str(), shape, d).unwrap(),
            }
        }
        std::fs::write(dir.join(SINGLE_FILE), w.to_bytes().unwrap()).unwrap();
        let ck = ShardedCheckpoint::open(&dir).unwrap();
        check(&f, &ck.layer_experts(0).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_folders_give_typed_errors() {
        let (_, t) = fixture(I);
        // A missing shard.
        let dir = temp_dir("missing");
        write(&dir, &t, |_, s| s.to_string());
        std::fs::remove_file(dir.join(SHARDS[1])).unwrap();
        let e = ShardedCheckpoint::open(&dir).unwrap_err();
        assert_eq!(kind(&e), Kind::Shard, "{e}");
        assert!(e.to_string().contains(SHARDS[1]), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        // An empty folder.
        let dir = temp_dir("empty");
        assert_eq!(
            kind(&ShardedCheckpoint::open(&dir).unwrap_err()),
            Kind::Shard
        );
        std::fs::remove_dir_all(&dir).unwrap();
        // Shard names outside the folder.
        for bad in ["../model.safetensors", "/etc/passwd", "a/../../b", ""] {
            let dir = temp_dir("escape");
            write(&dir, &t, |n, s| {
                if n.ends_with("down_proj_bias") {
                    bad.to_string()
                } else {
                    s.to_string()
                }
            });
            let e = ShardedCheckpoint::open(&dir).unwrap_err();
            assert_eq!(kind(&e), Kind::Shard, "{bad}: {e}");
            std::fs::remove_dir_all(&dir).unwrap();
        }
        // A tensor listed in the wrong shard.
        let dir = temp_dir("wrong");
        let blocks = format!("{DN}_blocks");
        write(&dir, &t, |n, s| {
            if n == blocks {
                SHARDS.iter().find(|&&x| x != s).unwrap().to_string()
            } else {
                s.to_string()
            }
        });
        let e = ShardedCheckpoint::open(&dir)
            .unwrap()
            .layer_experts(0)
            .unwrap_err();
        assert_eq!(kind(&e), Kind::Missing, "{e}");
        assert!(e.to_string().contains(&blocks), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        // A malformed index.
        let dir = temp_dir("json");
        std::fs::write(dir.join(INDEX_FILE), "{\"weight_map\": 3}").unwrap();
        let e = ShardedCheckpoint::open(&dir).unwrap_err();
        assert_eq!(kind(&e), Kind::Format, "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mismatched_projections_give_shape_errors() {
        // down's K = 64 while gate_up's N = 2I = 192.
        let dir = temp_dir("shape");
        let (_, t) = fixture(64);
        write(&dir, &t, |_, s| s.to_string());
        let e = ShardedCheckpoint::open(&dir)
            .unwrap()
            .layer_experts(0)
            .unwrap_err();
        assert_eq!(kind(&e), Kind::Shape, "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        // A bias of the wrong width.
        let dir = temp_dir("bias");
        let (_, mut t) = fixture(I);
        t.last_mut().unwrap().1 = vec![E, H / 2];
        t.last_mut().unwrap().2 = Data::Bf16(vec![0; E * H / 2]);
        write(&dir, &t, |_, s| s.to_string());
        let e = ShardedCheckpoint::open(&dir)
            .unwrap()
            .layer_experts(0)
            .unwrap_err();
        assert_eq!(kind(&e), Kind::Shape, "{e}");
        assert!(e.to_string().contains("down_proj_bias"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
