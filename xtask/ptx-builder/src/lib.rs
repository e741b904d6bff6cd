//! Builds `kernels-gpu` into one self-contained PTX module.
//!
//! This crate is the only place that knows the device build recipe. Both `cargo xtask build-ptx`
//! and `host/build.rs` call [`build_ptx`], so the PTX a developer inspects is the PTX the library
//! embeds.
//!
//! The recipe (rustc's own `nvptx64-nvidia-cuda` target, see the rustc platform-support page
//! `src/doc/rustc/src/platform-support/nvptx64-nvidia-cuda.md`):
//!
//! 1. `cargo rustc -p kernels-gpu --profile ptx --target nvptx64-nvidia-cuda -Zbuild-std=core`
//!    with `--emit=llvm-bc`: the kernel crate's bitcode, plus `core` and `compiler_builtins` as
//!    rlibs whose members are bitcode (the nvptx target emits bitcode objects).
//! 2. `llvm-link` of the kernel bitcode with every bitcode member of those rlibs. rustc would do
//!    this step through `llvm-bitcode-linker`, which the pinned channel does not ship.
//! 3. `opt`: internalize everything except the `ptx_kernel` entry points, drop dead code, O3.
//! 4. `llc -mcpu=<arch> -mattr=<ptx_feature(arch)>`: one PTX file.
//! 5. Lint: the module targets the requested arch and has no unresolved `.extern .func`
//!    (a driver JIT cannot load such a module).
//!
//! [`ptxas`] finds `ptxas` and assembles a module into SASS (a cubin): the ptxas gate of
//! `cargo xtask ptx-report` and the SASS that `host/build.rs` embeds next to the PTX use it.

use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

pub mod ptxas;

/// The device target triple.
pub const TARGET: &str = "nvptx64-nvidia-cuda";
/// The PTX ISA feature of a module for `arch`: PTX 8.3 for the Hopper module ([`DEFAULT_ARCH`]:
/// `fence.proxy.tensormap::generic`, which the TMA copies need for tensor maps the host writes),
/// PTX 8.0 otherwise (the first with full sm_90 support; the portable module stays loadable by
/// drivers from CUDA 12.0).
pub fn ptx_feature(arch: &str) -> &'static str {
    if arch == DEFAULT_ARCH {
        "+ptx83"
    } else {
        "+ptx80"
    }
}
/// LLVM's full-unroll threshold for the device build. The MMA loops over a warp's accumulator
/// fragments must unroll completely, or the fragment arrays are indexed at run time and land in
/// local memory (a stack frame in `cargo xtask ptx-report`); the default threshold is too small
/// for the larger warp tiles.
pub const UNROLL_THRESHOLD: u32 = 4000;

/// The default GPU architecture: `sm_90a`, Hopper with its architecture-specific instructions
/// (`wgmma`); such a module loads on compute capability 9.0 devices only (H100, H200).
pub const DEFAULT_ARCH: &str = "sm_90a";

/// The portable module's architecture: `sm_80` PTX, which the driver JIT-compiles for every GPU
/// from compute capability 8.0 on (A100, A10/A40/RTX 30xx, L4/L40S/RTX 40xx, H100/H200, B200,
/// RTX 50xx). The kernels leave out their Hopper-only code (`cfg(target_feature = "sm_90a")`):
/// no `wgmma`, `mbarrier`, `stmatrix`, and `fma.rn.bf16x2` for `mul.rn.bf16x2`.
pub const PORTABLE_ARCH: &str = "sm_80";

/// The cargo target directory of the device build for `arch` under the workspace's `target/`:
/// `target/ptx` for [`DEFAULT_ARCH`], `target/ptx-<arch>` for any other, so the two modules keep
/// their own caches (the kernel crate is built with other flags) and can build at the same time.
pub fn device_target_dir(workspace_target: &Path, arch: &str) -> PathBuf {
    if arch == DEFAULT_ARCH {
        workspace_target.join("ptx")
    } else {
        workspace_target.join(format!("ptx-{arch}"))
    }
}

/// What to build and where.
#[derive(Clone, Debug)]
pub struct PtxBuild {
    /// Workspace root (the folder holding the workspace `Cargo.toml`).
    pub workspace_root: PathBuf,
    /// Cargo target directory for the device build; kept apart from the host build's.
    pub target_dir: PathBuf,
    /// GPU architecture, e.g. `sm_90` or `sm_90a`.
    pub arch: String,
    /// Where the final `.ptx` file goes.
    pub out_file: PathBuf,
    /// The `cargo` executable to run (the pinned nightly's).
    pub cargo: PathBuf,
}

/// What went wrong, as one actionable sentence.
#[derive(Debug)]
pub struct BuildError(pub String);

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BuildError {}

fn err(msg: impl Into<String>) -> BuildError {
    BuildError(msg.into())
}

/// The result of a successful build.
#[derive(Clone, Debug)]
pub struct PtxOutput {
    /// Path of the written PTX file.
    pub ptx_file: PathBuf,
    /// Names of the kernel entry points, sorted.
    pub entries: Vec<String>,
}

/// Environment variables of an outer cargo invocation that must not leak into the nested device
/// build (host flags, wrappers such as clippy-driver, an outer target directory).
const SCRUBBED_ENV: &[&str] = &[
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_BUILD_RUSTC_WRAPPER",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_MAKEFLAGS",
    "MAKEFLAGS",
    "MFLAGS",
    "RUSTDOCFLAGS",
    "CARGO_ENCODED_RUSTDOCFLAGS",
    "CARGO_LLVM_COV",
    "RUSTC",
    "RUSTDOC",
];

fn run(cmd: &mut Command, what: &str) -> Result<String, BuildError> {
    let out = cmd
        .output()
        .map_err(|e| err(format!("could not start {what} ({cmd:?}): {e}")))?;
    if !out.status.success() {
        // Cargo's JSON messages on stdout are noise here; its rendered diagnostics are on stderr.
        let stdout: String = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with("{\"reason\""))
            .map(|l| format!("{l}\n"))
            .collect();
        return Err(err(format!(
            "{what} failed ({}):\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Directory holding llvm-tools' binaries (`llvm-link`, `opt`, `llc`, `llvm-ar`) of the toolchain
/// that `cargo` belongs to.
pub fn llvm_tools_dir(cargo: &Path) -> Result<PathBuf, BuildError> {
    let rustc = cargo.with_file_name(format!("rustc{}", std::env::consts::EXE_SUFFIX));
    let rustc = if rustc.exists() {
        rustc
    } else {
        PathBuf::from("rustc")
    };
    let mut cmd = Command::new(&rustc);
    for v in SCRUBBED_ENV {
        cmd.env_remove(v);
    }
    let sysroot = run(cmd.arg("--print").arg("sysroot"), "rustc --print sysroot")?;
    let host = run(
        Command::new(&rustc).arg("--print").arg("host-tuple"),
        "rustc --print host-tuple",
    )?;
    let dir = Path::new(sysroot.trim())
        .join("lib/rustlib")
        .join(host.trim())
        .join("bin");
    if !dir.join("llvm-link").exists() {
        return Err(err(format!(
            "llvm-tools are missing from the toolchain at {}: run `rustup component add llvm-tools` \
             (rust-toolchain.toml lists it, so a plain rustup install brings it)",
            dir.display()
        )));
    }
    Ok(dir)
}

/// Builds the PTX module described by `b`.
pub fn build_ptx(b: &PtxBuild) -> Result<PtxOutput, BuildError> {
    let tools = llvm_tools_dir(&b.cargo)?;
    let work = b.target_dir.join(format!("link-{}", b.arch));
    fs::create_dir_all(&work).map_err(|e| err(format!("cannot create {}: {e}", work.display())))?;

    // Step 1: compile the kernel crate and core to bitcode.
    let mut cmd = Command::new(&b.cargo);
    for v in SCRUBBED_ENV {
        cmd.env_remove(v);
    }
    cmd.current_dir(&b.workspace_root).args([
        "rustc",
        "--package",
        "kernels-gpu",
        "--lib",
        "--profile",
        "ptx",
        "--target",
        TARGET,
        "-Zbuild-std=core",
        "--message-format=json-render-diagnostics",
        "--target-dir",
    ]);
    cmd.arg(&b.target_dir);
    cmd.args(["--", "-C"])
        .arg(format!("target-cpu={}", b.arch))
        .args(["-C", &format!("target-feature={}", ptx_feature(&b.arch))])
        .args([
            "-C",
            &format!("llvm-args=-unroll-threshold={UNROLL_THRESHOLD}"),
        ])
        .args([
            "-A",
            "unstable-features",
            "-D",
            "warnings",
            "--emit=llvm-bc",
        ]);
    let json = run(&mut cmd, "the device build of kernels-gpu")?;

    let mut rlibs = Vec::new();
    let mut kernel_bc = None;
    for line in json.lines() {
        if !line.contains("\"reason\":\"compiler-artifact\"") {
            continue;
        }
        for file in json_string_array(line, "filenames") {
            let p = PathBuf::from(&file);
            let name = p.file_name().and_then(OsStr::to_str).unwrap_or("");
            if let Some(hash) = name
                .strip_prefix("libkernels_gpu-")
                .and_then(|h| h.strip_suffix(".rmeta").or_else(|| h.strip_suffix(".rlib")))
            {
                // The bitcode sits next to the metadata: deps/kernels_gpu-<hash>.bc.
                kernel_bc = Some(p.with_file_name(format!("kernels_gpu-{hash}.bc")));
            } else if name.starts_with("libkernels_gpu") {
                // The uplifted copy without a hash; the hashed one above is what we read.
            } else if name.ends_with(".rlib") {
                rlibs.push(p);
            }
        }
    }
    let kernel_bc =
        kernel_bc.ok_or_else(|| err("the device build produced no kernels-gpu artifact"))?;
    if !kernel_bc.exists() {
        return Err(err(format!(
            "expected bitcode {} is missing",
            kernel_bc.display()
        )));
    }

    // Step 2: unpack bitcode members of core/compiler_builtins and link everything.
    let mut inputs = vec![kernel_bc];
    for (i, rlib) in rlibs.iter().enumerate() {
        let dir = work.join(format!("rlib{i}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)
            .map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
        run(
            Command::new(tools.join("llvm-ar"))
                .current_dir(&dir)
                .arg("x")
                .arg(rlib),
            "llvm-ar x",
        )?;
        let mut members: Vec<PathBuf> = fs::read_dir(&dir)
            .map_err(|e| err(format!("cannot list {}: {e}", dir.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension() == Some(OsStr::new("o")))
            .collect();
        members.sort();
        inputs.extend(members);
    }
    let linked = work.join("linked.bc");
    run(
        Command::new(tools.join("llvm-link"))
            .args(&inputs)
            .arg("-o")
            .arg(&linked),
        "llvm-link",
    )?;

    // Step 3: keep only the kernel entry points visible, then optimize.
    let text = run(
        Command::new(tools.join("llvm-dis"))
            .arg(&linked)
            .arg("-o")
            .arg("-"),
        "llvm-dis",
    )?;
    let mut entries = kernel_entries(&text);
    entries.sort();
    if entries.is_empty() {
        return Err(err(
            "kernels-gpu defines no `extern \"ptx-kernel\"` entry point",
        ));
    }
    let optimized = work.join("optimized.bc");
    run(
        Command::new(tools.join("opt"))
            .arg(&linked)
            .arg("-passes=internalize,globaldce,default<O3>,globaldce")
            .arg(format!("-unroll-threshold={UNROLL_THRESHOLD}"))
            .arg(format!(
                "-internalize-public-api-list={}",
                entries.join(",")
            ))
            .arg("-o")
            .arg(&optimized),
        "opt",
    )?;

    // Step 4: PTX.
    if let Some(parent) = b.out_file.parent() {
        fs::create_dir_all(parent)
            .map_err(|e| err(format!("cannot create {}: {e}", parent.display())))?;
    }
    run(
        Command::new(tools.join("llc"))
            .arg(&optimized)
            .arg(format!("-mtriple={TARGET}"))
            .arg(format!("-mcpu={}", b.arch))
            .arg(format!("-mattr={}", ptx_feature(&b.arch)))
            .arg("-O3")
            .arg("-o")
            .arg(&b.out_file),
        "llc",
    )?;

    // Step 5: launch bounds, then lint.
    let ptx = fs::read_to_string(&b.out_file)
        .map_err(|e| err(format!("cannot read {}: {e}", b.out_file.display())))?;
    let ptx = apply_launch_bounds(&ptx).map_err(err)?;
    fs::write(&b.out_file, &ptx)
        .map_err(|e| err(format!("cannot write {}: {e}", b.out_file.display())))?;
    check_module(&ptx, &b.arch).map_err(err)?;
    Ok(PtxOutput {
        ptx_file: b.out_file.clone(),
        entries,
    })
}

/// The structural checks every module must pass: the right `.target`, and no unresolved
/// `.extern .func` declaration.
pub fn check_module(ptx: &str, arch: &str) -> Result<(), String> {
    let target_ok = ptx.lines().any(|l| {
        l.trim_start().starts_with(".target") && l.split_whitespace().nth(1) == Some(arch)
    });
    if !target_ok {
        return Err(format!("the PTX module does not declare `.target {arch}`"));
    }
    if let Some(line) = ptx.lines().find(|l| l.contains(".extern .func")) {
        return Err(format!(
            "the PTX module has an unresolved external function (`{}`); a driver JIT cannot load it",
            line.trim()
        ));
    }
    Ok(())
}

/// The PTX comment by which an entry declares its launch bounds (`kernels_gpu::ptx::regs::
/// declare_launch_bounds`): `// mxmoe.launch_bounds <maxntid> <minnctapersm>`.
pub const LAUNCH_BOUNDS_MARKER: &str = "// mxmoe.launch_bounds ";

/// Gives every `.entry` whose body holds launch-bounds markers ([`LAUNCH_BOUNDS_MARKER`]) the
/// directives they declare, `.maxntid T, 1, 1` and `.minnctapersm B`, between its parameter list
/// and its body. rustc emits no launch bounds for `extern "ptx-kernel"` functions; ptxas needs
/// them to know an entry's register count, without which it ignores `setmaxnreg`.
///
/// Fails if an entry's markers disagree or do not parse, if an entry with markers already has a
/// directive, or if a marker lies outside every entry body.
pub fn apply_launch_bounds(ptx: &str) -> Result<String, String> {
    let lines: Vec<&str> = ptx.lines().collect();
    let mut out = String::with_capacity(ptx.len() + 256);
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        if trimmed.contains(LAUNCH_BOUNDS_MARKER.trim_end()) {
            return Err(format!(
                "a launch-bounds marker outside an entry body: `{}`",
                trimmed
            ));
        }
        let is_entry = trimmed.starts_with(".visible .entry ") || trimmed.starts_with(".entry ");
        if !is_entry {
            out.push_str(line);
            out.push('\n');
            i += 1;
            continue;
        }
        let name = trimmed
            .split(".entry ")
            .nth(1)
            .and_then(|r| r.split(['(', ' ']).next())
            .unwrap_or("")
            .to_string();
        // The header runs to the line that opens the body; the body to the `}` in column 0.
        let open = (i..lines.len())
            .find(|&j| lines[j].trim() == "{")
            .ok_or_else(|| format!("`.entry {name}` has no body"))?;
        let close = (open..lines.len())
            .find(|&j| lines[j] == "}")
            .ok_or_else(|| format!("`.entry {name}` has no closing brace"))?;
        let mut bounds: Option<(u32, u32)> = None;
        for body_line in &lines[open..close] {
            let Some(rest) = body_line.trim().strip_prefix(LAUNCH_BOUNDS_MARKER) else {
                continue;
            };
            let numbers: Vec<u32> = rest
                .split_whitespace()
                .map(|w| w.parse::<u32>())
                .collect::<Result<_, _>>()
                .map_err(|_| format!("`.entry {name}`: malformed marker `{}`", body_line.trim()))?;
            let [threads, blocks] = numbers[..] else {
                return Err(format!(
                    "`.entry {name}`: malformed marker `{}`",
                    body_line.trim()
                ));
            };
            if threads == 0 || blocks == 0 {
                return Err(format!("`.entry {name}`: zero launch bound in its marker"));
            }
            match bounds {
                Some(b) if b != (threads, blocks) => {
                    return Err(format!(
                        "`.entry {name}` declares two launch bounds: {b:?} and {:?}",
                        (threads, blocks)
                    ));
                }
                _ => bounds = Some((threads, blocks)),
            }
        }
        let header = &lines[i..open];
        if bounds.is_some()
            && header.iter().any(|l| {
                let t = l.trim_start();
                t.starts_with(".maxntid")
                    || t.starts_with(".reqntid")
                    || t.starts_with(".minnctapersm")
                    || t.starts_with(".maxnreg")
            })
        {
            return Err(format!(
                "`.entry {name}` already has a launch-bounds directive"
            ));
        }
        for l in header {
            out.push_str(l);
            out.push('\n');
        }
        if let Some((threads, blocks)) = bounds {
            out.push_str(&format!(
                ".maxntid {threads}, 1, 1\n.minnctapersm {blocks}\n"
            ));
        }
        for l in &lines[open..=close] {
            out.push_str(l);
            out.push('\n');
        }
        i = close + 1;
    }
    Ok(out)
}

/// Names of the `.entry` functions of a PTX module, in order of appearance.
pub fn ptx_entries(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let rest = l
                .strip_prefix(".visible .entry ")
                .or_else(|| l.strip_prefix(".entry "))?;
            Some(rest.split(['(', ' ']).next()?.to_string())
        })
        .collect()
}

/// Names of the functions defined with the `ptx_kernel` calling convention in LLVM IR text.
fn kernel_entries(ir: &str) -> Vec<String> {
    ir.lines()
        .filter(|l| l.starts_with("define ") && l.contains(" ptx_kernel "))
        .filter_map(|l| {
            let at = l.find('@')?;
            let rest = &l[at + 1..];
            let name = rest.split('(').next()?;
            Some(name.trim_matches('"').to_string())
        })
        .collect()
}

/// Extracts the string elements of a JSON array field from one line of cargo's JSON messages.
/// Cargo's paths contain no escaped quotes on the platforms we build on; backslashes are unescaped.
fn json_string_array(line: &str, field: &str) -> Vec<String> {
    let key = format!("\"{field}\":[");
    let Some(start) = line.find(&key) else {
        return Vec::new();
    };
    let rest = &line[start + key.len()..];
    let Some(end) = rest.find(']') else {
        return Vec::new();
    };
    rest[..end]
        .split(',')
        .map(|s| s.trim().trim_matches('"').replace("\\\\", "\\"))
        .filter(|s| !s.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two entries as llc writes them, the second with two (equal) launch-bounds markers.
    const TWO_ENTRIES: &str = "\
.version 8.0
.target sm_90a
.address_size 64

\t// .globl\tplain
.visible .entry plain(
\t.param .u64 plain_param_0
)                                       // @plain
{
\tret;
}
\t// .globl\tbounded
.visible .entry bounded(
\t.param .align 8 .b8 bounded_param_0[208]
)                                       // @bounded
{
\t.reg .b32 \t%r<4>;
\t// begin inline asm
\t// mxmoe.launch_bounds 384 1
\t// end inline asm
\t// begin inline asm
\t// mxmoe.launch_bounds 384 1
\t// end inline asm
\tret;
}
";

    #[test]
    fn launch_bounds_markers_become_directives_of_their_entry_only() {
        let out = apply_launch_bounds(TWO_ENTRIES).unwrap();
        let want = ")                                       // @bounded\n.maxntid 384, 1, 1\n.minnctapersm 1\n{";
        assert!(out.contains(want), "{out}");
        assert_eq!(out.matches(".maxntid").count(), 1);
        assert!(out.contains(")                                       // @plain\n{"));
        // Nothing else changes.
        assert_eq!(
            out.replace(".maxntid 384, 1, 1\n.minnctapersm 1\n", ""),
            TWO_ENTRIES
        );
        // A module without markers is returned as it was.
        let plain = TWO_ENTRIES.replace("mxmoe.launch_bounds 384 1", "nothing");
        assert_eq!(apply_launch_bounds(&plain).unwrap(), plain);
    }

    #[test]
    fn bad_launch_bounds_markers_are_errors() {
        let two = TWO_ENTRIES.replacen("launch_bounds 384 1", "launch_bounds 256 1", 1);
        assert!(
            apply_launch_bounds(&two)
                .unwrap_err()
                .contains("two launch bounds")
        );
        let garbled = TWO_ENTRIES.replace("launch_bounds 384 1", "launch_bounds 384");
        assert!(
            apply_launch_bounds(&garbled)
                .unwrap_err()
                .contains("malformed")
        );
        let zero = TWO_ENTRIES.replace("launch_bounds 384 1", "launch_bounds 0 1");
        assert!(apply_launch_bounds(&zero).unwrap_err().contains("zero"));
        let already = TWO_ENTRIES.replace(
            ")                                       // @bounded\n",
            ")                                       // @bounded\n.maxnreg 128\n",
        );
        assert!(
            apply_launch_bounds(&already)
                .unwrap_err()
                .contains("already")
        );
        let outside = format!("// mxmoe.launch_bounds 384 1\n{TWO_ENTRIES}");
        assert!(
            apply_launch_bounds(&outside)
                .unwrap_err()
                .contains("outside")
        );
    }

    #[test]
    fn check_module_rejects_extern_func_and_wrong_target() {
        let good = ".version 8.0\n.target sm_90\n.address_size 64\n.visible .entry k(\n)\n{\n}\n";
        assert!(check_module(good, "sm_90").is_ok());
        assert!(
            check_module(good, "sm_80")
                .unwrap_err()
                .contains(".target sm_80")
        );
        let bad = format!("{good}.extern .func foo\n()\n;\n");
        assert!(
            check_module(&bad, "sm_90")
                .unwrap_err()
                .contains("unresolved")
        );
    }

    #[test]
    fn each_arch_has_its_own_device_target_dir() {
        let t = Path::new("/w/target");
        assert_eq!(
            device_target_dir(t, DEFAULT_ARCH),
            Path::new("/w/target/ptx")
        );
        assert_eq!(
            device_target_dir(t, PORTABLE_ARCH),
            Path::new("/w/target/ptx-sm_80")
        );
    }

    #[test]
    fn ptx_entries_lists_visible_entries() {
        let ptx = ".visible .entry alpha(\n.param .u64 a\n)\n.func beta()\n.entry gamma(\n";
        assert_eq!(
            ptx_entries(ptx),
            vec!["alpha".to_string(), "gamma".to_string()]
        );
    }

    #[test]
    fn kernel_entries_reads_ptx_kernel_definitions() {
        let ir = "define ptx_kernel void @k1(ptr %a) #0 {\ndefine internal void @helper() {\n\
                  define dso_local ptx_kernel void @\"k2\"() {\n";
        assert_eq!(kernel_entries(ir), vec!["k1".to_string(), "k2".to_string()]);
    }

    #[test]
    fn json_array_field_is_parsed() {
        let line = r#"{"reason":"compiler-artifact","filenames":["/a/libcore-1.rlib","/a/libcore-1.rmeta"],"x":1}"#;
        assert_eq!(
            json_string_array(line, "filenames"),
            vec!["/a/libcore-1.rlib", "/a/libcore-1.rmeta"]
        );
    }
}
