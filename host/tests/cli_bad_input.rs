//! The `mxmoe` command line on bad input: every case gives exit status 2 and one clear error
//! line, and no output file is lost or left truncated. Inputs are built here with the
//! `safetensors` crate in a fresh folder under the system's temporary directory; the binary is
//! run as a user would run it.
//!
//! Without a GPU, the runs use the CPU reference; with one, the cases still hold (the errors are
//! raised before a backend is chosen, or the test names `--cpu`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::Dtype;
use safetensors::tensor::TensorView;

/// The CLI binary: `$MXMOE_BIN`, else the one cargo built for this test, else an `mxmoe` beside
/// the test binary (the layout of a device bundle, whose build-machine paths do not exist).
fn bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MXMOE_BIN") {
        return PathBuf::from(p);
    }
    let built = PathBuf::from(env!("CARGO_BIN_EXE_mxmoe"));
    if built.is_file() {
        return built;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    for dir in exe.ancestors().skip(1).take(3) {
        let candidate = dir.join("mxmoe");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "the mxmoe binary is neither at {} nor beside {}; set MXMOE_BIN",
        built.display(),
        exe.display()
    );
}

/// A fresh, empty folder for one test.
fn scratch(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!("mxmoe-cli-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create the scratch folder");
    dir
}

/// Runs `mxmoe args…`.
fn mxmoe(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("run the mxmoe binary")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts exit status 2 and an error message holding every needle; returns the message.
fn fails(o: &Output, needles: &[&str]) -> String {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(2),
        "stdout: {}\nstderr: {err}",
        stdout(o)
    );
    for needle in needles {
        assert!(err.contains(needle), "`{needle}` not in: {err}");
    }
    err
}

fn succeeds(o: &Output) {
    assert_eq!(
        o.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        stdout(o),
        stderr(o)
    );
}

/// One tensor to write: dtype, shape, little-endian bytes.
type Spec = (Dtype, Vec<usize>, Vec<u8>);

/// A safetensors file of `tensors` and `metadata`.
fn safetensors_file(tensors: &[(&str, Spec)], metadata: &[(&str, &str)]) -> Vec<u8> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, (dtype, shape, data))| {
            let view = TensorView::new(*dtype, shape.clone(), data).expect("a consistent tensor");
            (name.to_string(), view)
        })
        .collect();
    let meta: Option<HashMap<String, String>> = (!metadata.is_empty()).then(|| {
        metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    });
    safetensors::serialize(views, meta).expect("serialize")
}

/// bf16 bytes of `len` small values that differ from each other.
fn bf16(len: usize, seed: u32) -> Vec<u8> {
    (0..len)
        .flat_map(|i| {
            let v = (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0;
            ((v.to_bits() >> 16) as u16).to_le_bytes()
        })
        .collect()
}

fn i32s(values: &[i32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A small valid projection: E = 2, N = 16, K = 64, T = 3, k = 2, dense bf16 weights.
fn projection(extra: &[(&str, Spec)]) -> Vec<u8> {
    let (e, n, k, t, top_k) = (2, 16, 64, 3, 2);
    let mut tensors: Vec<(&str, Spec)> = vec![
        ("w", (Dtype::BF16, vec![e, n, k], bf16(e * n * k, 1))),
        (
            "expert_ids",
            (Dtype::I32, vec![t, top_k], i32s(&[0, 1, 1, 0, 0, -1])),
        ),
        ("x", (Dtype::BF16, vec![t, k], bf16(t * k, 2))),
    ];
    tensors.extend(extra.iter().cloned());
    safetensors_file(&tensors, &[])
}

/// The MXFP4 (torchao layout) version of [`projection`]'s weights, with `scales` as given.
fn mx_projection(scales: Vec<u8>) -> Vec<u8> {
    let (e, n, k, t, top_k) = (2, 16, 64, 3, 2);
    safetensors_file(
        &[
            (
                "w.packed",
                (Dtype::U8, vec![e, n, k / 2], vec![0x21; e * n * k / 2]),
            ),
            ("w.scales", (Dtype::U8, vec![e, n, k / 32], scales)),
            (
                "expert_ids",
                (Dtype::I32, vec![t, top_k], i32s(&[0, 1, 1, 0, 0, -1])),
            ),
            ("x", (Dtype::BF16, vec![t, k], bf16(t * k, 2))),
        ],
        &[],
    )
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write an input file");
    p
}

fn s(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

/// No temporary file of an atomic write is left in `dir`.
fn assert_no_temporaries(dir: &Path) {
    for entry in std::fs::read_dir(dir).expect("list the folder") {
        let name = entry.expect("an entry").file_name();
        let name = name.to_string_lossy();
        assert!(!name.contains(".mxmoe-tmp-"), "left behind: {name}");
    }
}

#[test]
fn run_refuses_an_output_that_is_its_input() {
    let dir = scratch("same");
    let input = projection(&[]);
    let path = write(&dir, "in.safetensors", &input);
    let o = mxmoe(&["run", "--cpu", "--inputs", s(&path), "--out", s(&path)]);
    fails(&o, &["is the --inputs file"]);
    // Another spelling of the same file is caught too.
    let other = dir.join(".").join("in.safetensors");
    let o = mxmoe(&["run", "--cpu", "--inputs", s(&path), "--out", s(&other)]);
    fails(&o, &["is the --inputs file"]);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        input,
        "the input is unchanged"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn quantize_in_place_and_failed_writes_lose_nothing() {
    let dir = scratch("quantize");
    let (e, n, k) = (2, 8, 64);
    let raw = safetensors_file(
        &[("w", (Dtype::BF16, vec![e, n, k], bf16(e * n * k, 3)))],
        &[],
    );
    let path = write(&dir, "model.safetensors", &raw);
    // IN = OUT (documented as allowed): the file is replaced by a complete quantized one.
    succeeds(&mxmoe(&["quantize", s(&path), s(&path)]));
    let quantized = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&quantized).unwrap();
    let mut names = st.names();
    names.sort_unstable();
    assert_eq!(names, ["w.packed", "w.scales"]);
    assert_no_temporaries(&dir);

    // A failing quantization (a truncated input) leaves an existing output untouched.
    let out = write(&dir, "out.safetensors", b"previous results");
    let bad = write(&dir, "bad.safetensors", &raw[..raw.len() - 10]);
    fails(
        &mxmoe(&["quantize", s(&bad), s(&out)]),
        &["truncated", "`w`"],
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"previous results");
    // An output in a folder that does not exist fails without creating anything.
    let missing = dir.join("no-such-folder").join("out.safetensors");
    fails(&mxmoe(&["quantize", s(&path), s(&missing)]), &["could not"]);
    assert_no_temporaries(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn quantize_to_the_other_layout_converts_the_weights() {
    let dir = scratch("layout");
    let (e, n, k) = (2, 8, 64);
    let raw = safetensors_file(
        &[("w", (Dtype::BF16, vec![e, n, k], bf16(e * n * k, 4)))],
        &[],
    );
    let path = write(&dir, "model.safetensors", &raw);
    let torchao = dir.join("torchao.safetensors");
    let gpt_oss = dir.join("gpt-oss.safetensors");
    succeeds(&mxmoe(&["quantize", s(&path), s(&torchao)]));
    let o = mxmoe(&["quantize", s(&torchao), s(&gpt_oss), "--layout", "gpt-oss"]);
    succeeds(&o);
    assert!(stdout(&o).contains("1 converted"), "{}", stdout(&o));
    let a = std::fs::read(&torchao).unwrap();
    let b = std::fs::read(&gpt_oss).unwrap();
    let (a, b) = (
        safetensors::SafeTensors::deserialize(&a).unwrap(),
        safetensors::SafeTensors::deserialize(&b).unwrap(),
    );
    let mut names = b.names();
    names.sort_unstable();
    assert_eq!(names, ["w_blocks", "w_scales"]);
    assert_eq!(b.tensor("w_blocks").unwrap().shape(), [e, n, k / 32, 16]);
    assert_eq!(
        a.tensor("w.packed").unwrap().data(),
        b.tensor("w_blocks").unwrap().data()
    );
    assert_eq!(
        a.tensor("w.scales").unwrap().data(),
        b.tensor("w_scales").unwrap().data()
    );
    let (_, meta) = safetensors::SafeTensors::read_metadata(&std::fs::read(&gpt_oss).unwrap())
        .expect("metadata");
    assert_eq!(meta.metadata().as_ref().unwrap()["mxmoe.layout"], "gpt-oss");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bench_sizes_are_checked_and_its_json_is_written_at_the_end() {
    let dir = scratch("bench");
    let json = write(&dir, "results.json", b"{\"earlier\": true}\n");
    // 2^62 tokens: T·k overflows; named, not wrapped into an empty plan.
    let o = mxmoe(&[
        "bench",
        "--shape",
        "dense",
        "--tokens",
        "4611686018427387904",
        "--json",
        s(&json),
    ]);
    fails(&o, &["T·k", "overflows"]);
    // 10^12 tokens: the routing draw alone needs far more than any machine has.
    let o = mxmoe(&["bench", "--shape", "dense", "--tokens", "1000000000000"]);
    fails(&o, &["logits [1000000000000, 128]", "needs", "available"]);
    // The earlier results survive both failures.
    assert_eq!(
        std::fs::read(&json).unwrap(),
        b"{\"earlier\": true}\n",
        "bench must not truncate --json before it has results"
    );
    assert_no_temporaries(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_requested_device_that_does_not_exist_is_an_error() {
    let dir = scratch("device");
    let input = write(&dir, "in.safetensors", &projection(&[]));
    let out = dir.join("out.safetensors");
    for args in [
        vec![
            "run",
            "--inputs",
            s(&input),
            "--out",
            s(&out),
            "--device",
            "99",
        ],
        vec![
            "bench", "--shape", "dense", "--tokens", "16", "--device", "99",
        ],
        vec!["smoke", "--device", "99"],
    ] {
        fails(&mxmoe(&args), &["--device 99"]);
    }
    assert!(!out.exists(), "no output for a failed run");
    // Without --device, a machine without a GPU falls back to the CPU reference and says so.
    let o = mxmoe(&["run", "--inputs", s(&input), "--out", s(&out)]);
    succeeds(&o);
    let said = stdout(&o);
    assert!(
        said.contains("computed on cuda:0")
            || said.contains("computed with the CPU reference (no CUDA"),
        "{said}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn shapes_the_gpu_refuses_are_refused_on_the_cpu_too() {
    let dir = scratch("dims");
    let (e, k, t, top_k) = (2, 64, 3, 2);
    let file = safetensors_file(
        &[
            ("w", (Dtype::BF16, vec![e, 1, k], bf16(e * k, 5))),
            (
                "expert_ids",
                (Dtype::I32, vec![t, top_k], i32s(&[0, 1, 1, 0, 0, 1])),
            ),
            ("x", (Dtype::BF16, vec![t, k], bf16(t * k, 6))),
        ],
        &[],
    );
    let input = write(&dir, "n1.safetensors", &file);
    let out = dir.join("out.safetensors");
    for extra in [&["--cpu"][..], &[][..]] {
        let mut args = vec!["run", "--inputs", s(&input), "--out", s(&out)];
        args.extend_from_slice(extra);
        fails(
            &mxmoe(&args),
            &["K = 64 and N = 1 must be positive multiples of 8"],
        );
    }
    assert!(!out.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sizes_from_the_file_are_checked_before_allocating() {
    let dir = scratch("size");
    // A few MiB of file whose output is [4194304, 65536] (1 TiB as bf16, more as f32): one token
    // routed to expert 0 in 4194304 slots, N = 65536.
    let (slots, n, k) = (4_194_304usize, 65_536usize, 8usize);
    let file = safetensors_file(
        &[
            ("w", (Dtype::BF16, vec![1, n, k], bf16(n * k, 7))),
            (
                "expert_ids",
                (Dtype::I32, vec![1, slots], vec![0u8; 4 * slots]),
            ),
            ("x", (Dtype::BF16, vec![1, k], bf16(k, 8))),
        ],
        &[],
    );
    let input = write(&dir, "huge.safetensors", &file);
    let out = dir.join("out.safetensors");
    let o = mxmoe(&["run", "--cpu", "--inputs", s(&input), "--out", s(&out)]);
    fails(&o, &["out [4194304, 65536]", "needs", "available"]);
    assert!(!out.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn nan_scales_are_refused_unless_allowed() {
    let dir = scratch("nan");
    // Expert 1, row 3, block 1 holds scale byte 255.
    let mut scales = vec![127u8; 2 * 16 * 2];
    scales[(16 + 3) * 2 + 1] = 255;
    let input = write(&dir, "nan.safetensors", &mx_projection(scales));
    let out = dir.join("out.safetensors");
    let o = mxmoe(&["run", "--cpu", "--inputs", s(&input), "--out", s(&out)]);
    fails(&o, &["`w.scales`", "expert 1", "row 3", "block 1", "NaN"]);
    assert!(!out.exists());
    let o = mxmoe(&[
        "run",
        "--cpu",
        "--allow-nan-scales",
        "--inputs",
        s(&input),
        "--out",
        s(&out),
    ]);
    succeeds(&o);
    // Row 3 of every slot routed to expert 1 is NaN (bf16 NaN: exponent all ones, mantissa set).
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let outv = st.tensor("out").unwrap();
    let vals: Vec<u16> = outv
        .data()
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    let is_nan = |b: u16| b & 0x7F80 == 0x7F80 && b & 0x007F != 0;
    // Slot 1 (token 0, slot 1) goes to expert 1: its column 3 is NaN, column 2 is not.
    assert!(is_nan(vals[16 + 3]), "{:#06x}", vals[16 + 3]);
    assert!(!is_nan(vals[16 + 2]));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tensors_nothing_reads_are_listed_in_a_warning() {
    let dir = scratch("unused");
    // `gate` (a typo for `gates`) and `notes` are never read.
    let input = write(
        &dir,
        "in.safetensors",
        &projection(&[
            ("gate", (Dtype::BF16, vec![3, 2], bf16(6, 9))),
            ("notes", (Dtype::U8, vec![2], vec![1, 2])),
        ]),
    );
    let out = dir.join("out.safetensors");
    let o = mxmoe(&["run", "--cpu", "--inputs", s(&input), "--out", s(&out)]);
    succeeds(&o);
    let err = stderr(&o);
    assert!(err.contains("warning:"), "{err}");
    assert!(err.contains("`gate`") && err.contains("`notes`"), "{err}");
    assert!(!err.contains("`x`") && !err.contains("`w`"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn duplicate_and_strange_names_are_reported_on_one_line() {
    let dir = scratch("names");
    // A header listing `x` twice (safetensors' own parser would blame another tensor).
    let header = r#"{"w":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"x":{"dtype":"U8","shape":[2],"data_offsets":[2,4]},"x":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}}"#;
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header.as_bytes());
    file.extend_from_slice(&[0; 6]);
    let input = write(&dir, "dup.safetensors", &file);
    let out = dir.join("out.safetensors");
    let o = mxmoe(&["run", "--cpu", "--inputs", s(&input), "--out", s(&out)]);
    fails(&o, &["`x` more than once"]);

    // A weight name holding a newline and an ANSI escape is printed escaped, on one line.
    let input = write(&dir, "in.safetensors", &projection(&[]));
    let o = mxmoe(&[
        "run",
        "--cpu",
        "--inputs",
        s(&input),
        "--out",
        s(&out),
        "--weight",
        "v\n\u{1b}[31mred",
    ]);
    let err = fails(&o, &[r"`v\n\u{1b}[31mred.packed`"]);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(!err.contains('\u{1b}'), "{err:?}");

    // Metadata values are escaped too.
    let bad_meta = safetensors_file(
        &[
            ("w", (Dtype::BF16, vec![2, 16, 64], bf16(2 * 16 * 64, 1))),
            ("expert_ids", (Dtype::I32, vec![1, 1], i32s(&[0]))),
            ("x", (Dtype::BF16, vec![1, 64], bf16(64, 2))),
        ],
        &[("input_order", "sorted\n\u{1b}[0m")],
    );
    let input = write(&dir, "meta.safetensors", &bad_meta);
    let o = mxmoe(&["run", "--cpu", "--inputs", s(&input), "--out", s(&out)]);
    let err = fails(&o, &[r"`sorted\n\u{1b}[0m`"]);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
