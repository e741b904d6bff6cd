//! `cargo xtask device-bundle`: everything a GPU machine needs to run the test suites, in one flat
//! folder, built here so the GPU machine needs no Rust toolchain, no ptxas and no network.
//!
//! The folder holds:
//! - every release test binary of the workspace, named without cargo's hash: integration tests by
//!   their target name (`gpu_parity`), unit tests of a library as `<package>-lib`
//!   (`mxmoe-lib`, `kernels-gpu-lib`), of a binary as `<package>-bin-<target>`;
//! - the release CLI binaries of the `mxmoe` package (`mxmoe`);
//! - `golden/`, a copy of the vendored golden data (`<root>/tests/data/golden` unless `--golden`);
//! - `run-sanitizer.sh`, compute-sanitizer (all four tools) over the small and ragged GPU cases;
//! - `commit.env`, `export MXMOE_COMMIT=<the commit built>` (sourced by the scripts; source it
//!   before `mxmoe bench` so the benchmark records the commit);
//! - `run-tests.sh`, which runs each test binary with `MXMOE_REQUIRE_GPU=1` and
//!   `MXMOE_GOLDEN=<folder>/golden/mxfp4_golden_torchao.safetensors`, prints a pass/fail table,
//!   and exits non-zero if any binary failed. Its arguments go to every test binary (a name
//!   filter, `--nocapture`, `--test-threads=1`); with `MXMOE_TEST_LOG_DIR` set, each binary's
//!   output is also kept in `<dir>/<binary>.log`. The PTX module is chosen by each device's
//!   compute capability unless `MXMOE_MODULE=portable|hopper` is set (the script prints which);
//! - `run-tests-portable.sh`, `run-tests.sh` with `MXMOE_MODULE=portable`: on an H100 it runs
//!   every suite on the portable `sm_80` module; it first checks with `mxmoe info` that the
//!   device loads that module.
//!
//! Every binary is built with the `mxmoe/ptx-override` feature: `Gpu::open` then loads the PTX
//! file named by `MXMOE_PTX_OVERRIDE` instead of the embedded module (unset: the embedded one, as
//! in any build). With `--mutants`, the bundle also gets `mutants/` and `run-mutants.sh`
//! ([`crate::mutants`]), which use that to run the suites against deliberately broken modules.
//!
//! The host-only tooling packages (`xtask`, `mxmoe-ptx-builder`) are left out: their tests need
//! no GPU and run in `cargo xtask test`. Doc tests are not binaries and are not bundled.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{flags, mutants, shell};

/// Packages whose tests are not bundled (host-only tooling).
const EXCLUDED_PACKAGES: &[&str] = &["xtask", "mxmoe-ptx-builder"];

/// The package whose binaries are bundled.
const CLI_PACKAGE: &str = "mxmoe";

/// The golden file the run script points `MXMOE_GOLDEN` at.
const GOLDEN_FILE: &str = "mxfp4_golden_torchao.safetensors";

/// Name of the generated runner.
const RUN_SCRIPT: &str = "run-tests.sh";
/// The runner with the portable module forced.
const PORTABLE_SCRIPT: &str = "run-tests-portable.sh";
/// The compute-sanitizer driver written next to it.
const SANITIZE_SCRIPT: &str = "run-sanitizer.sh";

/// The feature every bundled binary is built with (see the module docs).
const OVERRIDE_FEATURE: &str = "mxmoe/ptx-override";

/// Names the bundle itself uses; no binary may take one.
const RESERVED: &[&str] = &[
    RUN_SCRIPT,
    PORTABLE_SCRIPT,
    SANITIZE_SCRIPT,
    mutants::RUN_SCRIPT,
    mutants::BUNDLE_DIR,
    "golden",
    "commit.env",
];

/// One executable that cargo reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    /// The package it belongs to.
    pub package: String,
    /// The target's first kind (`lib`, `bin`, `test`, `bench`, `example`).
    pub kind: String,
    /// The target's name.
    pub target: String,
    /// Whether it is a test harness (`profile.test`).
    pub test: bool,
    /// Where cargo wrote it.
    pub executable: PathBuf,
}

/// Runs `cargo xtask device-bundle`.
pub fn run(root: &Path, flags: &flags::DeviceBundle) -> Result<()> {
    let out = if flags.out.is_absolute() {
        flags.out.clone()
    } else {
        root.join(&flags.out)
    };
    prepare_out_dir(&out)?;

    let mut test_cmd = Command::new(shell::cargo());
    test_cmd.current_dir(root).args([
        "test",
        "--workspace",
        "--release",
        "--no-run",
        "--features",
        OVERRIDE_FEATURE,
        "--message-format=json-render-diagnostics",
    ]);
    for p in EXCLUDED_PACKAGES {
        test_cmd.args(["--exclude", p]);
    }
    let tests = artifacts(
        &shell::output(&mut test_cmd, false)
            .context("building the release test binaries failed")?
            .stdout,
    )?;
    let bins = artifacts(
        &shell::output(
            Command::new(shell::cargo()).current_dir(root).args([
                "build",
                "--release",
                "--package",
                CLI_PACKAGE,
                "--bins",
                "--features",
                OVERRIDE_FEATURE,
                "--message-format=json-render-diagnostics",
            ]),
            false,
        )
        .context("building the release CLI failed")?
        .stdout,
    )?;

    let test_files = name_tests(tests.iter().filter(|a| a.test))?;
    let bin_files: BTreeMap<String, &Artifact> = bins
        .iter()
        .filter(|a| !a.test && a.kind == "bin")
        .map(|a| (a.target.clone(), a))
        .collect();
    if bin_files.is_empty() {
        bail!("cargo built no binary of package {CLI_PACKAGE}");
    }
    for name in bin_files.keys() {
        if test_files.contains_key(name) || RESERVED.contains(&name.as_str()) {
            bail!("the bundle name `{name}` is used twice; rename the test target");
        }
    }

    let mut total_bytes = 0;
    for (name, artifact) in test_files.iter().chain(&bin_files) {
        let dest = out.join(name);
        fs::copy(&artifact.executable, &dest).with_context(|| {
            format!(
                "cannot copy {} to {}",
                artifact.executable.display(),
                dest.display()
            )
        })?;
        // Symbols are dead weight on the GPU machine and the carry limit is 64 MiB: strip when a
        // `strip` is available (the copy stays usable either way).
        let _ = std::process::Command::new("strip").arg(&dest).status();
        total_bytes += fs::metadata(&dest).map(|m| m.len()).unwrap_or(0);
    }

    let golden_src = match &flags.golden {
        Some(p) => p.clone(),
        None => root.join("tests").join("data").join("golden"),
    };
    let has_golden = copy_golden(&golden_src, &out.join("golden"))?;

    let names: Vec<&str> = test_files.keys().map(String::as_str).collect();
    let sanitizer = out.join(SANITIZE_SCRIPT);
    // The commit the binaries were built from, so `mxmoe bench` on the GPU machine (which has no
    // git checkout) records it: `source commit.env`.
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(root)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let dirty = std::process::Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .current_dir(root)
        .output()
        .ok()
        .is_some_and(|o| !o.stdout.is_empty());
    let commit = if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    };
    fs::write(
        out.join("commit.env"),
        format!("export MXMOE_COMMIT={commit}\n"),
    )
    .with_context(|| format!("cannot write {}", out.join("commit.env").display()))?;
    fs::write(&sanitizer, sanitize_script())
        .with_context(|| format!("cannot write {}", sanitizer.display()))?;
    shell::make_executable(&sanitizer)?;
    let script = out.join(RUN_SCRIPT);
    fs::write(&script, run_script(&names))
        .with_context(|| format!("cannot write {}", script.display()))?;
    shell::make_executable(&script)?;
    let portable = out.join(PORTABLE_SCRIPT);
    fs::write(&portable, portable_script())
        .with_context(|| format!("cannot write {}", portable.display()))?;
    shell::make_executable(&portable)?;

    println!("{}", out.display());
    for name in test_files.keys() {
        println!("  test  {name}");
    }
    for name in bin_files.keys() {
        println!("  bin   {name}");
    }
    if has_golden {
        println!("  data  golden/{GOLDEN_FILE}");
    }
    println!("  run   {RUN_SCRIPT}");
    println!("  run   {PORTABLE_SCRIPT}");
    println!("  run   {SANITIZE_SCRIPT}");
    println!(
        "{} binaries, {:.1} MiB",
        test_files.len() + bin_files.len(),
        total_bytes as f64 / (1024.0 * 1024.0)
    );
    if flags.mutants {
        mutants::build(root, &out, mxmoe_ptx_builder::DEFAULT_ARCH, &[])
            .context("building the mutants into the bundle failed")?;
    }
    Ok(())
}

/// Makes `out` an empty folder. An existing folder is removed only if it is empty or a previous
/// bundle (it holds `run-tests.sh`), so a mistyped `--out` cannot wipe unrelated files.
fn prepare_out_dir(out: &Path) -> Result<()> {
    if out.exists() {
        let empty = fs::read_dir(out)
            .with_context(|| format!("cannot list {}", out.display()))?
            .next()
            .is_none();
        if !empty && !out.join(RUN_SCRIPT).exists() {
            bail!(
                "{} exists and is not a previous device bundle (no {RUN_SCRIPT}); choose another --out or remove it",
                out.display()
            );
        }
        fs::remove_dir_all(out).with_context(|| format!("cannot remove {}", out.display()))?;
    }
    fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))
}

/// Copies the regular files of `src` into `dest`; returns whether the golden file was among them.
/// A missing `src` is a warning: the bundle still runs, and the suites that need the file report it.
fn copy_golden(src: &Path, dest: &Path) -> Result<bool> {
    if !src.join(GOLDEN_FILE).is_file() {
        eprintln!(
            "warning: {} not found; the bundle has no golden data (pass --golden <folder>)",
            src.join(GOLDEN_FILE).display()
        );
        return Ok(false);
    }
    fs::create_dir_all(dest).with_context(|| format!("cannot create {}", dest.display()))?;
    for entry in fs::read_dir(src).with_context(|| format!("cannot list {}", src.display()))? {
        let path = entry?.path();
        if path.is_file() {
            let name = path.file_name().context("a listed file has a name")?;
            fs::copy(&path, dest.join(name))
                .with_context(|| format!("cannot copy {}", path.display()))?;
        }
    }
    Ok(true)
}

/// The executables among cargo's JSON messages (one message per line).
pub fn artifacts(json_lines: &[u8]) -> Result<Vec<Artifact>> {
    let text = String::from_utf8_lossy(json_lines);
    let mut found = Vec::new();
    for line in text.lines().filter(|l| l.starts_with('{')) {
        let msg: Value = serde_json::from_str(line)
            .with_context(|| format!("cargo printed invalid JSON: {line}"))?;
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(executable) = msg["executable"].as_str() else {
            continue;
        };
        let package_id = msg["package_id"]
            .as_str()
            .context("a compiler-artifact message has no package_id")?;
        found.push(Artifact {
            package: package_name(package_id),
            kind: msg["target"]["kind"][0]
                .as_str()
                .unwrap_or("unknown")
                .to_string(),
            target: msg["target"]["name"]
                .as_str()
                .context("an artifact has no target name")?
                .to_string(),
            test: msg["profile"]["test"].as_bool().unwrap_or(false),
            executable: PathBuf::from(executable),
        });
    }
    Ok(found)
}

/// The package name in a cargo package id: `path+file:///w/host#mxmoe@0.1.0` gives `mxmoe`,
/// `path+file:///w/kernels-gpu#0.1.0` gives `kernels-gpu` (the name is left out when it equals
/// the last path segment), and the older `mxmoe 0.1.0 (path+file:///w/host)` gives `mxmoe`.
pub fn package_name(id: &str) -> String {
    if let Some((name, _)) = id.split_once(' ') {
        return name.to_string();
    }
    let (url, fragment) = id.split_once('#').unwrap_or((id, ""));
    if let Some((name, _version)) = fragment.split_once('@') {
        return name.to_string();
    }
    let path = url.split(['?', '#']).next().unwrap_or(url);
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(path)
        .to_string()
}

/// The bundle's file name for a test binary (see the module docs).
pub fn test_file_name(a: &Artifact) -> String {
    match a.kind.as_str() {
        "test" => a.target.clone(),
        "lib" | "rlib" | "dylib" | "cdylib" | "staticlib" | "proc-macro" => {
            format!("{}-lib", a.package)
        }
        kind => format!("{}-{kind}-{}", a.package, a.target),
    }
}

/// Names every test binary, failing on a name used twice or one reserved by the bundle.
fn name_tests<'a>(
    tests: impl Iterator<Item = &'a Artifact>,
) -> Result<BTreeMap<String, &'a Artifact>> {
    let mut named = BTreeMap::new();
    for a in tests {
        let name = test_file_name(a);
        if RESERVED.contains(&name.as_str()) {
            bail!(
                "test target `{}` of {} clashes with the bundle's `{name}`; rename it",
                a.target,
                a.package
            );
        }
        if let Some(other) = named.insert(name.clone(), a) {
            bail!(
                "test binaries of {} and {} would both be named `{name}` in the bundle; rename one target",
                other.package,
                a.package
            );
        }
    }
    Ok(named)
}

/// GPU suites and the small, ragged cases compute-sanitizer runs (it slows kernels ~100×).
const SANITIZED: &[(&str, &str)] = &[
    ("gpu_probes", ""),
    ("gpu_dequant", ""),
    ("gpu_routing", ""),
    ("gpu_linear", "ragged"),
    ("gpu_linear", "dropped"),
    ("gpu_linear", "empty"),
    ("gpu_linear", "spec_small"),
    ("gpu_mxfp4", "small"),
    ("gpu_mxfp4", "ragged"),
    ("gpu_mxfp4", "edge"),
    ("gpu_strategy_a", "dropped"),
    ("gpu_strategy_a", "every_expert"),
    ("gpu_moe", "tiny"),
    ("gpu_bad_input", ""),
    ("gpu_random", "fixed_regressions"),
];

/// The text of `run-sanitizer.sh`: every compute-sanitizer tool over [`SANITIZED`]; exits
/// non-zero on any report. Usage on the GPU machine: `./run-sanitizer.sh [tool ...]`.
pub fn sanitize_script() -> String {
    let mut cases = String::new();
    for (bin, filter) in SANITIZED {
        let _ = writeln!(cases, "  \"{bin} {filter}\"");
    }
    format!(
        r#"#!/usr/bin/env bash
# Generated by `cargo xtask device-bundle`: compute-sanitizer (memcheck, racecheck, synccheck,
# initcheck) over the small and ragged GPU cases. Any report fails the run.
#
# Usage: ./{SANITIZE_SCRIPT} [tool ...]   (default: all four tools)
set -uo pipefail
here="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
export MXMOE_REQUIRE_GPU=1
export MXMOE_GOLDEN="$here/golden/{GOLDEN_FILE}"
tools=("$@")
if [[ ${{#tools[@]}} -eq 0 ]]; then tools=(memcheck racecheck synccheck initcheck); fi
cases=(
{cases})
failed=0
for tool in "${{tools[@]}}"; do
  for c in "${{cases[@]}}"; do
    read -r bin filter <<<"$c"
    if compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 20 "$here/$bin" --test-threads=1 $filter >"/tmp/san-$tool-$bin.log" 2>&1; then
      printf '%-10s %-16s %-14s clean\n' "$tool" "$bin" "${{filter:-all}}"
    else
      printf '%-10s %-16s %-14s FAILED (log /tmp/san-%s-%s.log)\n' "$tool" "$bin" "${{filter:-all}}" "$tool" "$bin"
      grep -m 5 -E "=========" "/tmp/san-$tool-$bin.log"
      failed=$((failed + 1))
    fi
  done
done
if (( failed > 0 )); then echo "$failed sanitizer run(s) failed"; exit 1; fi
echo "compute-sanitizer: no reports"
"#
    )
}

/// The text of `run-tests.sh` for the test binaries `tests`.
pub fn run_script(tests: &[&str]) -> String {
    let width = tests
        .iter()
        .map(|t| t.len())
        .max()
        .unwrap_or(0)
        .max("binary".len());
    let mut list = String::new();
    for t in tests {
        let _ = write!(list, " {t}");
    }
    format!(
        r#"#!/usr/bin/env bash
# Generated by `cargo xtask device-bundle`: runs every test binary of this folder on a GPU
# machine. MXMOE_REQUIRE_GPU=1 turns "skipped: no CUDA device" into a failure.
#
# Usage: ./{RUN_SCRIPT} [test-binary args...]   (a test-name filter, --nocapture, --test-threads=1)
# With MXMOE_TEST_LOG_DIR set, each binary's output is also kept in $MXMOE_TEST_LOG_DIR/<binary>.log.
set -uo pipefail
here="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
export MXMOE_REQUIRE_GPU=1
export MXMOE_GOLDEN="$here/golden/{GOLDEN_FILE}"
source "$here/commit.env" 2>/dev/null || true
echo "PTX module: ${{MXMOE_MODULE:-chosen by compute capability (MXMOE_MODULE unset)}}"

tests=({list} )
results=()
failed=0
for t in "${{tests[@]}}"; do
  echo "=== $t"
  if [[ -n "${{MXMOE_TEST_LOG_DIR:-}}" ]]; then
    mkdir -p "$MXMOE_TEST_LOG_DIR"
    "$here/$t" "$@" 2>&1 | tee "$MXMOE_TEST_LOG_DIR/$t.log"
    status=${{PIPESTATUS[0]}}
  else
    "$here/$t" "$@"
    status=$?
  fi
  if [[ $status -eq 0 ]]; then
    results+=("pass")
  else
    results+=("FAIL (exit $status)")
    failed=$((failed + 1))
  fi
done

echo
printf '%-{width}s  %s\n' binary result
for i in "${{!tests[@]}}"; do
  printf '%-{width}s  %s\n' "${{tests[$i]}}" "${{results[$i]}}"
done
if (( failed > 0 )); then
  echo "$failed of ${{#tests[@]}} test binaries failed"
  exit 1
fi
echo "all ${{#tests[@]}} test binaries passed"
"#
    )
}

/// The text of `run-tests-portable.sh`: `run-tests.sh` with `MXMOE_MODULE=portable`, after
/// checking that `mxmoe info` reports the portable module loaded (a device that cannot load it,
/// or a binary that ignores the variable, stops the run before any suite).
pub fn portable_script() -> String {
    format!(
        r#"#!/usr/bin/env bash
# Generated by `cargo xtask device-bundle`: every test binary with the portable PTX module
# (sm_80, no wgmma rows) forced, MXMOE_MODULE=portable. On an H100/H200 this runs the suites on
# the code path of A100, L40S, RTX 4090, B200 and RTX 5090 (JIT-compiled for the H100).
#
# Usage: ./{PORTABLE_SCRIPT} [test-binary args...]   (as ./{RUN_SCRIPT})
set -uo pipefail
here="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
export MXMOE_MODULE=portable
if ! "$here/mxmoe" info >/tmp/mxmoe-portable-info.$$ 2>&1 \
   || ! grep -q '^  PTX module: *portable ' /tmp/mxmoe-portable-info.$$; then
  echo "the device did not load the portable module:"; cat /tmp/mxmoe-portable-info.$$
  rm -f /tmp/mxmoe-portable-info.$$
  exit 2
fi
grep '^  PTX module:' /tmp/mxmoe-portable-info.$$
rm -f /tmp/mxmoe-portable-info.$$
exec "$here/{RUN_SCRIPT}" "$@"
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESSAGES: &str = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/kernels-gpu#0.1.0","manifest_path":"/w/kernels-gpu/Cargo.toml","target":{"kind":["rlib"],"crate_types":["rlib"],"name":"kernels_gpu","src_path":"/w/kernels-gpu/src/lib.rs","edition":"2024","doc":true,"doctest":true,"test":true},"profile":{"opt_level":"3","debuginfo":0,"debug_assertions":false,"overflow_checks":false,"test":true},"features":[],"filenames":["/w/target/release/deps/kernels_gpu-0123"],"executable":"/w/target/release/deps/kernels_gpu-0123","fresh":true}
{"reason":"compiler-artifact","package_id":"path+file:///w/host#mxmoe@0.1.0","manifest_path":"/w/host/Cargo.toml","target":{"kind":["lib"],"crate_types":["lib"],"name":"mxmoe","src_path":"/w/host/src/lib.rs","edition":"2024","doc":true,"doctest":true,"test":true},"profile":{"opt_level":"3","debuginfo":0,"debug_assertions":false,"overflow_checks":false,"test":false},"features":[],"filenames":["/w/target/release/deps/libmxmoe-77.rlib"],"executable":null,"fresh":true}
{"reason":"compiler-artifact","package_id":"path+file:///w/host#mxmoe@0.1.0","manifest_path":"/w/host/Cargo.toml","target":{"kind":["bin"],"crate_types":["bin"],"name":"mxmoe","src_path":"/w/host/src/bin/mxmoe.rs","edition":"2024","doc":true,"doctest":false,"test":true},"profile":{"opt_level":"3","debuginfo":0,"debug_assertions":false,"overflow_checks":false,"test":true},"features":[],"filenames":["/w/target/release/deps/mxmoe-aa"],"executable":"/w/target/release/deps/mxmoe-aa","fresh":false}
{"reason":"compiler-artifact","package_id":"path+file:///w/tests#mxmoe-tests@0.1.0","manifest_path":"/w/tests/Cargo.toml","target":{"kind":["test"],"crate_types":["bin"],"name":"gpu_parity","src_path":"/w/tests/tests/gpu_parity.rs","edition":"2024","doc":false,"doctest":false,"test":true},"profile":{"opt_level":"3","debuginfo":0,"debug_assertions":false,"overflow_checks":false,"test":true},"features":[],"filenames":["/w/target/release/deps/gpu_parity-bb"],"executable":"/w/target/release/deps/gpu_parity-bb","fresh":false}
{"reason":"build-finished","success":true}
"#;

    #[test]
    fn executables_are_read_from_compiler_artifacts() {
        let found = artifacts(MESSAGES.as_bytes()).unwrap();
        let summary: Vec<(&str, &str, &str, bool)> = found
            .iter()
            .map(|a| {
                (
                    a.package.as_str(),
                    a.kind.as_str(),
                    a.target.as_str(),
                    a.test,
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("kernels-gpu", "rlib", "kernels_gpu", true),
                ("mxmoe", "bin", "mxmoe", true),
                ("mxmoe-tests", "test", "gpu_parity", true),
            ]
        );
        assert_eq!(
            found[2].executable,
            PathBuf::from("/w/target/release/deps/gpu_parity-bb")
        );
    }

    #[test]
    fn test_binaries_are_named_without_hashes() {
        let found = artifacts(MESSAGES.as_bytes()).unwrap();
        let names: Vec<String> = found.iter().map(test_file_name).collect();
        assert_eq!(
            names,
            vec!["kernels-gpu-lib", "mxmoe-bin-mxmoe", "gpu_parity"]
        );
    }

    #[test]
    fn package_names_come_from_all_id_forms() {
        assert_eq!(package_name("path+file:///w/host#mxmoe@0.1.0"), "mxmoe");
        assert_eq!(
            package_name("path+file:///w/kernels-gpu#0.1.0"),
            "kernels-gpu"
        );
        assert_eq!(
            package_name("registry+https://github.com/rust-lang/crates.io-index#half@2.4.1"),
            "half"
        );
        assert_eq!(package_name("mxmoe 0.1.0 (path+file:///w/host)"), "mxmoe");
    }

    #[test]
    fn clashing_test_names_are_rejected() {
        let a = Artifact {
            package: "one".into(),
            kind: "test".into(),
            target: "parity".into(),
            test: true,
            executable: "/a".into(),
        };
        let b = Artifact {
            package: "two".into(),
            ..a.clone()
        };
        let err = name_tests([&a, &b].into_iter()).unwrap_err();
        assert!(err.to_string().contains("both be named `parity`"), "{err}");
    }

    #[test]
    fn run_script_lists_every_binary_and_requires_a_gpu() {
        let script = run_script(&["gpu_parity", "mxmoe-lib"]);
        assert!(script.starts_with("#!/usr/bin/env bash\n"));
        assert!(script.contains("tests=( gpu_parity mxmoe-lib )"));
        assert!(script.contains("export MXMOE_REQUIRE_GPU=1"));
        assert!(
            script
                .contains(r#"export MXMOE_GOLDEN="$here/golden/mxfp4_golden_torchao.safetensors""#)
        );
        assert!(script.contains("printf '%-10s  %s\\n' binary result"));
        assert!(script.contains("echo \"PTX module: ${MXMOE_MODULE:-"));
    }

    #[test]
    fn the_portable_runner_forces_and_checks_the_module() {
        let script = portable_script();
        assert!(script.starts_with("#!/usr/bin/env bash\n"));
        assert!(script.contains("export MXMOE_MODULE=portable\n"));
        assert!(script.contains("grep -q '^  PTX module: *portable '"));
        assert!(script.contains("exec \"$here/run-tests.sh\" \"$@\""));
    }
}
