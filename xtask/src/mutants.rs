//! `cargo xtask mutants`: the mutation run of issue #13 ("a test that can't fail is a defect:
//! prove each suite can fail").
//!
//! Each mutant ([`catalog::MUTANTS`]) is a deliberate defect in `kernels-gpu/src`, written as
//! exact source replacements. `cargo xtask mutants build`:
//!
//! 1. copies the workspace's sources (what `git ls-files` lists, tracked or untracked but not
//!    ignored; no `target/`) to the scratch folder `target/mutants/src`;
//! 2. builds the unmutated module there (`clean`), then for each mutant applies its edits, builds
//!    the PTX with the recipe of `cargo xtask build-ptx` (`mxmoe-ptx-builder`, device target dir
//!    `target/mutants/ptx-target`, kept between runs so `core` is built once) and restores the
//!    edited files;
//! 3. fails if an edit does not match exactly once, a mutant does not build, or its PTX equals
//!    the clean one (a mutant that changes nothing is a defect of this list);
//! 4. writes `<out>/mutants/ptx.tar.xz` (every module; xz with a 64 MiB window, so the nearly
//!    identical modules cost little more than one), `<out>/mutants/manifest.tsv`
//!    (`id  fingerprint  file  suite  description`, the first row `clean`; `suite` is the one
//!    expected to catch the mutant, which the runner tries first) and `<out>/run-mutants.sh`.
//!
//! The bundle's test binaries are built with the `mxmoe/ptx-override` feature
//! (`cargo xtask device-bundle` does that), so `run-mutants.sh` runs them against each module
//! without relinking: `MXMOE_PTX_OVERRIDE=<module>` and `MXMOE_EXPECT_PTX_FINGERPRINT=<FNV-1a 64>`
//! (see `host/src/device/ptx_source.rs`). A mutant is *caught* when its module loaded (the CLI's
//! `mxmoe info` opens the device with it, fingerprint checked) and at least one suite exited
//! non-zero without an override error; a suite that hangs past the per-suite limit counts as
//! caught ("timeout").
//!
//! `cargo xtask mutants list` prints the list, `cargo xtask mutants check` checks that every edit
//! applies to the current sources (also a unit test, so `cargo xtask test` notices a refactor
//! that disarms a mutant).

mod catalog;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use mxmoe_ptx_builder::PtxBuild;

pub use catalog::{MUTANTS, Mutant};

use crate::flags::{self, MutantsCommand};
use crate::shell;

/// Name of the generated runner, next to `run-tests.sh`.
pub const RUN_SCRIPT: &str = "run-mutants.sh";
/// The bundle's subfolder holding the modules and the manifest.
pub const BUNDLE_DIR: &str = "mutants";
/// The archive of every module inside [`BUNDLE_DIR`].
pub const ARCHIVE: &str = "ptx.tar.xz";
/// The manifest inside [`BUNDLE_DIR`].
pub const MANIFEST: &str = "manifest.tsv";
/// The id of the unmutated module (the manifest's first row, the runner's `--baseline`).
pub const CLEAN_ID: &str = "clean";

/// The GPU suites `run-mutants.sh` runs by default, in this order (most sensitive first); a
/// mutant stops at the first suite that fails. `MUTANT_SUITES` overrides the list.
pub const DEFAULT_SUITES: &[&str] = &[
    "gpu_linear",
    "gpu_mxfp4",
    "gpu_nvfp4",
    "gpu_routing",
    "gpu_configs",
    "gpu_moe",
    "gpu_strategy_a",
    "gpu_dequant",
    "gpu_random",
    "gpu_bad_input",
];

/// Runs `cargo xtask mutants <command>`.
pub fn run(root: &Path, flags: &flags::Mutants) -> Result<()> {
    match &flags.command {
        MutantsCommand::List => {
            for m in MUTANTS {
                println!("{:<22} {}", m.id, m.description);
            }
            Ok(())
        }
        MutantsCommand::Check => {
            for m in MUTANTS {
                apply(m, |file| read_source(root, file))
                    .with_context(|| format!("mutant {}", m.id))?;
                println!("{:<22} applies", m.id);
            }
            Ok(())
        }
        MutantsCommand::Build(b) => {
            let out = if b.out.is_absolute() {
                b.out.clone()
            } else {
                root.join(&b.out)
            };
            build(root, &out, &b.arch, &b.only)
        }
    }
}

fn read_source(root: &Path, file: &str) -> Result<String> {
    let path = root.join(file);
    fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
}

/// Applies `m`'s edits to the files `read` returns (paths relative to the workspace root) and
/// returns each edited file's new text. Every `old` must occur exactly once in its file as
/// edited so far.
pub fn apply(
    m: &Mutant,
    mut read: impl FnMut(&str) -> Result<String>,
) -> Result<BTreeMap<&'static str, String>> {
    let mut files: BTreeMap<&'static str, String> = BTreeMap::new();
    for (i, e) in m.edits.iter().enumerate() {
        if !files.contains_key(e.file) {
            files.insert(e.file, read(e.file)?);
        }
        let text = files.get_mut(e.file).expect("inserted above");
        let n = text.matches(e.old).count();
        if n != 1 {
            bail!(
                "edit {} of mutant {} matches {n} times in {} (it must match exactly once; update \
                 xtask/src/mutants/catalog.rs to the current source):\n{}",
                i + 1,
                m.id,
                e.file,
                e.old
            );
        }
        *text = text.replacen(e.old, e.new, 1);
    }
    Ok(files)
}

/// FNV-1a (64-bit) of `text`: the same function as `mxmoe::device::fingerprint`, which checks
/// `MXMOE_EXPECT_PTX_FINGERPRINT`.
pub fn fingerprint(text: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    text.bytes()
        .fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

/// The mutants named in `only` (all when empty), in catalog order.
fn select(only: &[String]) -> Result<Vec<&'static Mutant>> {
    for id in only {
        if !MUTANTS.iter().any(|m| m.id == id) {
            bail!(
                "no mutant `{id}` (see `cargo xtask mutants list`: {})",
                MUTANTS.iter().map(|m| m.id).collect::<Vec<_>>().join(", ")
            );
        }
    }
    Ok(MUTANTS
        .iter()
        .filter(|m| only.is_empty() || only.iter().any(|id| id == m.id))
        .collect())
}

/// One built module.
struct Built {
    id: &'static str,
    suite: &'static str,
    description: &'static str,
    file: String,
    fingerprint: u64,
    seconds: f64,
    changed_entries: usize,
}

/// Builds the clean module and every selected mutant, and writes them, the manifest and the
/// runner into `out` (see the module docs).
pub fn build(root: &Path, out: &Path, arch: &str, only: &[String]) -> Result<()> {
    let selected = select(only)?;
    let base = root.join("target").join("mutants");
    let scratch = base.join("src");
    let target_dir = base.join("ptx-target");
    let stage = base.join("ptx");
    let started = Instant::now();
    let _lock = Lock::take(&base)?;
    copy_sources(root, &scratch)?;
    recreate_dir(&stage)?;

    eprintln!("== mutants: clean module (the scratch copy as is)");
    let t = Instant::now();
    let clean_file = stage.join(format!("{CLEAN_ID}.ptx"));
    build_module(&scratch, &target_dir, arch, &clean_file).context("the clean module")?;
    let clean = fs::read_to_string(&clean_file)
        .with_context(|| format!("cannot read {}", clean_file.display()))?;
    let mut built = vec![Built {
        id: CLEAN_ID,
        suite: "-",
        description: "the unmutated module (baseline; ./run-mutants.sh --baseline)",
        file: format!("{CLEAN_ID}.ptx"),
        fingerprint: fingerprint(&clean),
        seconds: t.elapsed().as_secs_f64(),
        changed_entries: 0,
    }];
    let clean_entries = entry_bodies(&clean);

    let mut failures = Vec::new();
    for m in &selected {
        eprintln!("== mutant {}: {}", m.id, m.description);
        let t = Instant::now();
        let file = format!("{}.ptx", m.id);
        match build_mutant(m, &scratch, &target_dir, arch, &stage.join(&file)) {
            Err(e) => failures.push(format!("{}: {e:#}", m.id)),
            Ok(text) if text == clean => failures.push(format!(
                "{}: the PTX equals the clean module's, so this mutant tests nothing; fix its edits",
                m.id
            )),
            Ok(text) => {
                let mutated = entry_bodies(&text);
                let changed_entries = mutated
                    .iter()
                    .filter(|(name, body)| clean_entries.get(*name) != Some(body))
                    .count();
                built.push(Built {
                    id: m.id,
                    suite: m.suite,
                    description: m.description,
                    file,
                    fingerprint: fingerprint(&text),
                    seconds: t.elapsed().as_secs_f64(),
                    changed_entries,
                })
            }
        }
    }

    println!(
        "{:<22} {:>8}  {:<16}  entries changed",
        "module", "build s", "fingerprint"
    );
    for b in &built {
        println!(
            "{:<22} {:>8.1}  {:016x}  {}",
            b.id, b.seconds, b.fingerprint, b.changed_entries
        );
    }
    if !failures.is_empty() {
        bail!(
            "{} of {} mutants failed:\n{}",
            failures.len(),
            selected.len(),
            failures.join("\n")
        );
    }

    let bundle = out.join(BUNDLE_DIR);
    if !out.join("run-tests.sh").exists() {
        eprintln!(
            "warning: {} holds no device bundle (no run-tests.sh); build one with `cargo xtask \
             device-bundle --mutants`, which also runs this command",
            out.display()
        );
    }
    recreate_dir(&bundle)?;
    let files: Vec<&str> = built.iter().map(|b| b.file.as_str()).collect();
    write_archive(&stage, &files, &bundle.join(ARCHIVE))?;
    let mut manifest = String::new();
    for b in &built {
        let _ = writeln!(
            manifest,
            "{}\t{:016x}\t{}\t{}\t{}",
            b.id, b.fingerprint, b.file, b.suite, b.description
        );
    }
    fs::write(bundle.join(MANIFEST), manifest)
        .with_context(|| format!("cannot write {}", bundle.join(MANIFEST).display()))?;
    let script = out.join(RUN_SCRIPT);
    fs::write(&script, run_script(DEFAULT_SUITES))
        .with_context(|| format!("cannot write {}", script.display()))?;
    shell::make_executable(&script)?;
    let archive_bytes = fs::metadata(bundle.join(ARCHIVE)).map_or(0, |m| m.len());
    println!(
        "{} modules ({} mutants) in {} ({:.2} MiB), {} and {RUN_SCRIPT} written in {:.0} s",
        built.len(),
        built.len() - 1,
        bundle.join(ARCHIVE).display(),
        archive_bytes as f64 / (1024.0 * 1024.0),
        bundle.join(MANIFEST).display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Holds `target/mutants/lock` (this process's id) while a build uses the scratch copy: two
/// builds at once would edit and wipe each other's files.
struct Lock(std::path::PathBuf);

impl Lock {
    fn take(base: &Path) -> Result<Self> {
        use std::io::Write as _;
        fs::create_dir_all(base).with_context(|| format!("cannot create {}", base.display()))?;
        let path = base.join("lock");
        for _ in 0..2 {
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    write!(f, "{}", std::process::id())
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    return Ok(Lock(path));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = fs::read_to_string(&path).unwrap_or_default();
                    let Ok(pid) = holder.trim().parse::<u32>() else {
                        bail!(
                            "{} exists without a process id; remove it if no `cargo xtask \
                             mutants build` is running",
                            path.display()
                        );
                    };
                    if Path::new(&format!("/proc/{pid}")).exists() {
                        bail!(
                            "another mutants build (pid {pid}) is using {}; wait for it (builds \
                             share the scratch copy), or remove {} if that process is not one",
                            base.display(),
                            path.display()
                        );
                    }
                    // The holder is gone: a stale lock.
                    fs::remove_file(&path)
                        .with_context(|| format!("cannot remove {}", path.display()))?;
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create {}", path.display()));
                }
            }
        }
        bail!("cannot take {}", path.display())
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Applies `m` in `scratch`, builds its module into `out_file`, restores the edited files (also
/// on failure) and returns the module's text.
fn build_mutant(
    m: &Mutant,
    scratch: &Path,
    target_dir: &Path,
    arch: &str,
    out_file: &Path,
) -> Result<String> {
    let edited = apply(m, |file| read_source(scratch, file))?;
    let mut originals = Vec::new();
    for file in edited.keys() {
        originals.push((scratch.join(file), read_source(scratch, file)?));
    }
    let result = (|| {
        for (file, text) in &edited {
            let path = scratch.join(file);
            fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        }
        build_module(scratch, target_dir, arch, out_file)?;
        fs::read_to_string(out_file).with_context(|| format!("cannot read {}", out_file.display()))
    })();
    for (path, text) in originals {
        fs::write(&path, text).with_context(|| format!("cannot restore {}", path.display()))?;
    }
    result
}

/// The device build of `cargo xtask build-ptx`, on the scratch workspace.
fn build_module(scratch: &Path, target_dir: &Path, arch: &str, out_file: &Path) -> Result<()> {
    let b = PtxBuild {
        workspace_root: scratch.to_path_buf(),
        target_dir: target_dir.to_path_buf(),
        arch: arch.to_string(),
        out_file: out_file.to_path_buf(),
        cargo: shell::cargo(),
    };
    mxmoe_ptx_builder::build_ptx(&b)?;
    Ok(())
}

/// Replaces `scratch` with a copy of the files `git ls-files` lists (tracked, and untracked
/// files that are not ignored), so the scratch build sees the working tree as it is.
fn copy_sources(root: &Path, scratch: &Path) -> Result<()> {
    let listed = shell::output(
        Command::new("git").current_dir(root).args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ]),
        true,
    )
    .context("listing the workspace's files with git")?;
    recreate_dir(scratch)?;
    let mut copied = 0;
    for rel in listed.stdout.split(|&b| b == 0).filter(|s| !s.is_empty()) {
        let rel = Path::new(std::str::from_utf8(rel).context("a file name is not UTF-8")?);
        let src = root.join(rel);
        if !src.is_file() {
            continue; // deleted in the working tree, or a submodule
        }
        let dest = scratch.join(rel);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        fs::copy(&src, &dest).with_context(|| format!("cannot copy {}", src.display()))?;
        copied += 1;
    }
    if !scratch.join("kernels-gpu/src/lib.rs").is_file() {
        bail!("the scratch copy has no kernels-gpu/src/lib.rs ({copied} files copied)");
    }
    Ok(())
}

fn recreate_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

/// `tar` the `files` of `dir` and compress with `xz -9` (64 MiB window: the modules differ in a
/// few kernels, so each after the first costs little).
fn write_archive(dir: &Path, files: &[&str], archive: &Path) -> Result<()> {
    let tar = archive.with_extension(""); // ptx.tar
    let _ = fs::remove_file(&tar);
    shell::run(
        Command::new("tar")
            .arg("-cf")
            .arg(&tar)
            .arg("-C")
            .arg(dir)
            .args(files),
    )
    .context("tar is needed to pack the modules")?;
    shell::run(Command::new("xz").args(["-9", "-T1", "-f"]).arg(&tar))
        .context("xz is needed to compress the modules")?;
    if !archive.is_file() {
        bail!("xz did not write {}", archive.display());
    }
    Ok(())
}

/// The code of every `.entry` of a PTX module, by name: from its `.entry` line up to the next
/// `.entry`/`.func` or the end, without comments and blank lines (llc's comments carry basic
/// block names and call-sequence numbers that change when an unrelated kernel does).
fn entry_bodies(ptx: &str) -> BTreeMap<&str, String> {
    let mut starts: Vec<(usize, Option<&str>)> = Vec::new();
    let mut at = 0;
    for line in ptx.split_inclusive('\n') {
        let t = line.trim_start();
        let t = t.strip_prefix(".visible ").unwrap_or(t);
        let t = t.strip_prefix(".weak ").unwrap_or(t);
        if let Some(rest) = t.strip_prefix(".entry ") {
            let name = rest
                .split(|c: char| c == '(' || c.is_whitespace())
                .next()
                .unwrap_or("");
            starts.push((at, Some(name)));
        } else if t.starts_with(".func ") {
            starts.push((at, None));
        }
        at += line.len();
    }
    let mut bodies = BTreeMap::new();
    for (i, (start, name)) in starts.iter().enumerate() {
        let end = starts.get(i + 1).map_or(ptx.len(), |(s, _)| *s);
        if let Some(name) = name {
            let code: String = ptx[*start..end]
                .lines()
                .map(|l| l.split("//").next().unwrap_or("").trim_end())
                .filter(|l| !l.is_empty())
                .map(|l| format!("{l}\n"))
                .collect();
            bodies.insert(*name, code);
        }
    }
    bodies
}

/// The text of `run-mutants.sh`, with `suites` as the default suite order.
pub fn run_script(suites: &[&str]) -> String {
    let suites = suites.join(" ");
    format!(
        r#"#!/usr/bin/env bash
# Generated by `cargo xtask mutants build`: the mutation run (issue #13). Every module of
# mutants/{ARCHIVE} is a deliberate defect of the kernels (mutants/{MANIFEST}: id, FNV-1a 64
# fingerprint, file, the suite expected to catch it, description). For each, the bundle's test
# binaries (built with the mxmoe/ptx-override feature) load it through MXMOE_PTX_OVERRIDE, with
# the fingerprint checked through MXMOE_EXPECT_PTX_FINGERPRINT, and the suites run until one
# fails: the mutant's expected suite first, then the others in order.
#
# caught      the module loaded (`mxmoe info` opened the device with it) and a suite failed;
#             "timeout" when a suite ran past MUTANT_SUITE_TIMEOUT (a hang counts as caught)
# SURVIVED    every suite passed: the suites cannot see this defect (it needs a test)
# LOAD ERROR  the module did not load, or a suite failed on the override itself
#
# Usage: ./{RUN_SCRIPT} [--baseline] [mutant-id ...]
#   --baseline            first run the unmutated module through the same path (it must pass)
#   mutant-id ...         only these mutants (default: all)
#   MUTANT_SUITES="..."   suites, in order (default: {suites})
#   MUTANT_SUITE_TIMEOUT  seconds per suite run (default 180)
#   MXMOE_TEST_LOG_DIR    keep the logs there (default: a fresh folder under /tmp, printed)
#   MUTANT_CANARY=0       skip the check that every binary honours MXMOE_PTX_OVERRIDE (done
#                         once per bundle is enough; it runs each suite with a missing module)
#   MUTANT_JOBS=N         run N mutants at a time (default 1; the suites share the GPU, and on a
#                         16-core machine 6 to 8 fit a full run into one 600 s call)
# Exit status: 0 when every mutant was caught, 1 when one survived or did not load, 2 on a
# set-up error.
set -uo pipefail
here="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
export MXMOE_REQUIRE_GPU=1
export MXMOE_GOLDEN="$here/golden/mxfp4_golden_torchao.safetensors"
# The driver JIT-compiles each module once (seconds) and caches it by PTX text; keep them all.
export CUDA_CACHE_MAXSIZE=4294967296
unset CUDA_CACHE_DISABLE MXMOE_PTX_OVERRIDE MXMOE_EXPECT_PTX_FINGERPRINT MXMOE_GEMM_CONFIG
source "$here/commit.env" 2>/dev/null || true

read -r -a suites <<<"${{MUTANT_SUITES:-{suites}}}"
limit="${{MUTANT_SUITE_TIMEOUT:-180}}"
baseline=0
wanted=()
for a in "$@"; do
  case "$a" in
    --baseline) baseline=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    -*) echo "unknown option $a"; exit 2 ;;
    *) wanted+=("$a") ;;
  esac
done

work="$(mktemp -d "${{TMPDIR:-/tmp}}/mxmoe-mutants.XXXXXX")"
logs="${{MXMOE_TEST_LOG_DIR:-$work/logs}}"
mkdir -p "$logs"
archive="$here/{BUNDLE_DIR}/{ARCHIVE}"
manifest="$here/{BUNDLE_DIR}/{MANIFEST}"
if [[ ! -f "$archive" || ! -f "$manifest" ]]; then
  echo "no $archive or $manifest: run \`cargo xtask device-bundle --mutants\`"; exit 2
fi
ids=(); fps=(); files=(); firsts=(); descs=()
while IFS=$'\t' read -r id fp file first desc; do
  [[ -z "$id" ]] && continue
  if [[ $id == {CLEAN_ID} ]]; then
    (( baseline )) || continue
  elif (( ${{#wanted[@]}} > 0 )); then
    hit=0; for w in "${{wanted[@]}}"; do [[ $w == "$id" ]] && hit=1; done
    (( hit )) || continue
  fi
  ids+=("$id"); fps+=("$fp"); files+=("$file"); firsts+=("$first"); descs+=("$desc")
done <"$manifest"
if (( ${{#wanted[@]}} > 0 )); then
  for w in "${{wanted[@]}}"; do
    grep -q "^$w"$'\t' "$manifest" || {{ echo "no mutant $w in $manifest"; exit 2; }}
  done
fi

# The unpacked modules are large; the logs stay.
trap 'rm -f "$work"/*.ptx' EXIT
if command -v xz >/dev/null; then
  xz -dc "$archive" | tar -xf - -C "$work" || {{ echo "cannot unpack $archive"; exit 2; }}
elif command -v python3 >/dev/null; then
  python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2])' \
    "$archive" "$work" || {{ echo "cannot unpack $archive"; exit 2; }}
else
  echo "need xz or python3 to unpack $archive"; exit 2
fi
for b in mxmoe "${{suites[@]}}"; do
  [[ -x "$here/$b" ]] || {{ echo "missing $here/$b"; exit 2; }}
done
if ! "$here/mxmoe" info >"$logs/info.log" 2>&1 || ! grep -q '^devices: [1-9]' "$logs/info.log"; then
  echo "no usable CUDA device:"; cat "$logs/info.log"; exit 2
fi

# Every binary must honour MXMOE_PTX_OVERRIDE (built with the ptx-override feature): with a
# missing module it must fail, naming the variable.
if [[ "${{MUTANT_CANARY:-1}}" == 0 ]]; then canary=(); else canary=(mxmoe "${{suites[@]}}"); fi
(( ${{#canary[@]}} > 0 )) && echo "checking that the binaries honour MXMOE_PTX_OVERRIDE"
for b in "${{canary[@]}}"; do
  if [[ $b == mxmoe ]]; then args=(info); else args=(); fi
  if MXMOE_PTX_OVERRIDE="$work/no-such-module.ptx" timeout -k 10 "$limit" "$here/$b" "${{args[@]}}" \
      >"$logs/canary-$b.log" 2>&1; then
    echo "$b ignores MXMOE_PTX_OVERRIDE: rebuild the bundle with \`cargo xtask device-bundle --mutants\`"
    exit 2
  fi
  if ! grep -q MXMOE_PTX_OVERRIDE "$logs/canary-$b.log"; then
    echo "$b failed with a missing module but never named MXMOE_PTX_OVERRIDE (log $logs/canary-$b.log)"
    exit 2
  fi
done

# Is the bundle's embedded module the clean module the mutants were built from?
clean_fp="$(awk -F '\t' '$1 == "{CLEAN_ID}" {{ print $2 }}' "$manifest")"
if MXMOE_EXPECT_PTX_FINGERPRINT="$clean_fp" "$here/mxmoe" info >"$logs/embedded.log" 2>&1; then
  stale=""
else
  stale="warning: the binaries' embedded PTX is not the mutants' clean module (sources changed between the bundle and the mutants build?)"
  echo "$stale"
fi

echo "logs: $logs"
jobs_max="${{MUTANT_JOBS:-1}}"
[[ "$jobs_max" =~ ^[1-9][0-9]*$ ]] || {{ echo "MUTANT_JOBS must be a positive integer, got $jobs_max"; exit 2; }}
echo "suites: ${{suites[*]}} (each mutant's own suite first; limit ${{limit}} s each; $jobs_max at a time)"

# One module: the load probe, then the suites (its expected suite first) until one fails. Writes
# "<result>\t<seconds>" to $work/result.<i>; runs in the background when MUTANT_JOBS > 1.
run_one() {{
  local i=$1 start=$SECONDS result="" s status
  local id="${{ids[$i]}}" module="$work/${{files[$i]}}" fp="${{fps[$i]}}" first="${{firsts[$i]}}"
  local order=()
  for s in "${{suites[@]}}"; do [[ $s == "$first" ]] && order+=("$s"); done
  for s in "${{suites[@]}}"; do [[ $s == "$first" ]] || order+=("$s"); done
  echo "=== $id: ${{descs[$i]}}"
  # Load probe: opens the device with the module (the JIT result is cached for the suites).
  if ! MXMOE_PTX_OVERRIDE="$module" MXMOE_EXPECT_PTX_FINGERPRINT="$fp" \
      timeout -k 10 600 "$here/mxmoe" info >"$logs/$id.load.log" 2>&1; then
    result="LOAD ERROR (see $id.load.log)"
  else
    for s in "${{order[@]}}"; do
      MXMOE_PTX_OVERRIDE="$module" MXMOE_EXPECT_PTX_FINGERPRINT="$fp" \
        timeout -k 10 "$limit" "$here/$s" >"$logs/$id.$s.log" 2>&1
      status=$?
      if (( status == 0 )); then continue; fi
      if grep -q -e MXMOE_PTX_OVERRIDE -e MXMOE_EXPECT_PTX_FINGERPRINT "$logs/$id.$s.log"; then
        result="LOAD ERROR in $s (see $id.$s.log)"
      elif (( status == 124 || status == 137 )); then
        result="$s (timeout)"
      else
        result="$s"
      fi
      break
    done
    [[ -z "$result" ]] && result="SURVIVED"
  fi
  printf '%s\t%s\n' "$result" "$((SECONDS - start))" >"$work/result.$i"
  echo "    -> $id: $result ($((SECONDS - start)) s)"
}}

for i in "${{!ids[@]}}"; do
  if (( jobs_max > 1 )); then
    while (( $(jobs -rp | wc -l) >= jobs_max )); do wait -n; done
    run_one "$i" &
  else
    run_one "$i"
  fi
done
wait

results=(); secs=(); bad=0
for i in "${{!ids[@]}}"; do
  result="LOAD ERROR (no result: the run was cut short)"; sec=0
  [[ -f "$work/result.$i" ]] && IFS=$'\t' read -r result sec <"$work/result.$i"
  if [[ ${{ids[$i]}} == {CLEAN_ID} ]]; then
    if [[ $result == SURVIVED ]]; then result="baseline: all suites pass"; else result="BASELINE FAILED: $result"; bad=$((bad + 1)); fi
  elif [[ $result == SURVIVED || $result == LOAD* ]]; then
    bad=$((bad + 1))
  fi
  results+=("$result"); secs+=("$sec")
done

echo
printf '| %-22s | %-40s | %7s |\n' mutant "caught by" seconds
printf '|%s|%s|%s|\n' "$(printf -- '-%.0s' {{1..24}})" "$(printf -- '-%.0s' {{1..42}})" "$(printf -- '-%.0s' {{1..9}})"
for i in "${{!ids[@]}}"; do
  printf '| %-22s | %-40s | %7s |\n' "${{ids[$i]}}" "${{results[$i]}}" "${{secs[$i]}}"
done
[[ -n "$stale" ]] && echo "$stale"
echo "commit: ${{MXMOE_COMMIT:-unknown}}; logs: $logs"
if (( bad > 0 )); then
  echo "$bad module(s) survived, failed to load, or failed the baseline"
  exit 1
fi
echo "every mutant was caught"
"#
    )
}

#[cfg(test)]
mod tests {
    use super::catalog::Edit;
    use super::*;
    use crate::project_root;

    #[test]
    fn every_mutant_applies_exactly_once_to_the_current_sources() {
        let root = project_root();
        for m in MUTANTS {
            let edited =
                apply(m, |file| read_source(&root, file)).unwrap_or_else(|e| panic!("{e:#}"));
            for (file, text) in &edited {
                assert_ne!(
                    text,
                    &read_source(&root, file).unwrap(),
                    "mutant {} leaves {file} unchanged",
                    m.id
                );
            }
        }
    }

    #[test]
    fn ids_are_unique_file_names_and_descriptions_are_one_line() {
        let mut seen = std::collections::BTreeSet::new();
        for m in MUTANTS {
            assert!(seen.insert(m.id), "mutant id {} is used twice", m.id);
            assert_ne!(m.id, CLEAN_ID, "`{CLEAN_ID}` names the unmutated module");
            assert!(
                !m.id.is_empty()
                    && m.id
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "mutant id {:?}: lower-case letters, digits and `-` only",
                m.id
            );
            assert!(
                !m.description.is_empty() && !m.description.contains(['\n', '\t']),
                "mutant {}: the description is one line without tabs (it goes into a TSV)",
                m.id
            );
            assert!(!m.edits.is_empty(), "mutant {} has no edits", m.id);
            assert!(
                DEFAULT_SUITES.contains(&m.suite),
                "mutant {}: its suite {} is not one of the runner's default suites",
                m.id,
                m.suite
            );
            for e in m.edits {
                assert!(
                    e.file.starts_with("kernels-gpu/src/"),
                    "mutant {} edits {}: mutants live in kernels-gpu/src only (only the PTX is swapped)",
                    m.id,
                    e.file
                );
                assert_ne!(
                    e.old, e.new,
                    "mutant {}: an edit that changes nothing",
                    m.id
                );
            }
        }
    }

    #[test]
    fn the_issue_13_defects_are_all_listed() {
        let ids: Vec<&str> = MUTANTS.iter().map(|m| m.id).collect();
        for id in [
            "lora-skip-fwd",
            "lora-skip-dx",
            "lora-scale-2pct",
            "nibble-swap",
            "e8m0-one-scale-off",
            "last-ktile-dropped",
            "tail-row-unwritten",
            "routing-reversed",
            "gated-dy-without-gate",
            "dadb-transposed",
            "stage-mismatch-mma",
        ] {
            assert!(ids.contains(&id), "{id} is missing");
        }
    }

    #[test]
    fn apply_rejects_a_snippet_that_is_missing_or_repeated() {
        const M: Mutant = Mutant {
            id: "t",
            suite: "gpu_linear",
            description: "t",
            edits: &[Edit {
                file: "f.rs",
                old: "a",
                new: "b",
            }],
        };
        let err = apply(&M, |_| Ok("xyz".into())).unwrap_err().to_string();
        assert!(err.contains("matches 0 times"), "{err}");
        let err = apply(&M, |_| Ok("a a".into())).unwrap_err().to_string();
        assert!(err.contains("matches 2 times"), "{err}");
        let done = apply(&M, |_| Ok("xay".into())).unwrap();
        assert_eq!(done["f.rs"], "xby");
    }

    #[test]
    fn edits_of_one_file_apply_in_order() {
        const M: Mutant = Mutant {
            id: "t",
            suite: "gpu_linear",
            description: "t",
            edits: &[
                Edit {
                    file: "f.rs",
                    old: "one",
                    new: "two",
                },
                Edit {
                    file: "f.rs",
                    old: "two",
                    new: "three",
                },
            ],
        };
        let mut reads = 0;
        let done = apply(&M, |_| {
            reads += 1;
            Ok("one".into())
        })
        .unwrap();
        assert_eq!(done["f.rs"], "three");
        assert_eq!(reads, 1);
    }

    #[test]
    fn a_second_build_is_refused_while_the_first_holds_the_lock() {
        let base = std::env::temp_dir().join(format!("xtask-mutants-lock-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let first = Lock::take(&base).unwrap();
        let err = Lock::take(&base).err().expect("refused").to_string();
        assert!(err.contains("another mutants build"), "{err}");
        drop(first);
        assert!(!base.join("lock").exists());
        // A lock whose process is gone is taken over.
        fs::write(base.join("lock"), u32::MAX.to_string()).unwrap();
        drop(Lock::take(&base).unwrap());
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn fingerprint_is_fnv1a_64_as_in_the_library() {
        assert_eq!(fingerprint(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fingerprint("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fingerprint("foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn entry_bodies_split_at_entries_and_functions() {
        let ptx = ".version 8.0\n.visible .entry a(\n.param .u64 p\n)\n{\nret; // done\n\n}\n.func f()\n{\n}\n.visible .entry b(\n)\n{\n}\n";
        let bodies = entry_bodies(ptx);
        assert_eq!(bodies.len(), 2);
        assert!(bodies["a"].contains("ret;\n}") && !bodies["a"].contains("done"));
        assert!(bodies["a"].starts_with(".visible .entry a(") && bodies["a"].ends_with("}\n"));
        assert!(!bodies["a"].contains(".func"));
        assert!(bodies["b"].starts_with(".visible .entry b("));
    }

    #[test]
    fn run_script_checks_loading_and_reports_a_table() {
        let s = run_script(DEFAULT_SUITES);
        assert!(s.starts_with("#!/usr/bin/env bash\n"));
        assert!(s.contains("export MXMOE_REQUIRE_GPU=1"));
        assert!(s.contains("export CUDA_CACHE_MAXSIZE="));
        assert!(s.contains(r#"module="$work/${files[$i]}" fp="${fps[$i]}""#));
        assert!(s.contains(r#"MXMOE_PTX_OVERRIDE="$module" MXMOE_EXPECT_PTX_FINGERPRINT="$fp""#));
        assert!(s.contains("MUTANT_SUITES:-gpu_linear gpu_mxfp4"));
        assert!(s.contains("\"caught by\""));
        assert!(s.contains("mutants/ptx.tar.xz"));
        assert!(s.contains("MXMOE_PTX_OVERRIDE=\"$work/no-such-module.ptx\""));
    }

    /// The generated runner against a fake bundle (bash stand-ins for `mxmoe` and two suites
    /// that fail when the module names them): each mutant runs its expected suite first and
    /// stops at the first failure, a mutant no suite sees is reported as surviving (exit 1),
    /// the baseline passes, the canary passes, and all of it with three mutants at a time.
    #[test]
    fn run_script_runs_each_mutant_from_its_own_suite_and_reports_survivors() {
        let dir = std::env::temp_dir().join(format!("mxmoe-run-mutants-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let bundle = dir.join(BUNDLE_DIR);
        let stage = dir.join("stage");
        fs::create_dir_all(&bundle).unwrap();
        fs::create_dir_all(&stage).unwrap();
        let write_exe = |name: &str, text: &str| {
            let path = dir.join(name);
            fs::write(&path, text).unwrap();
            shell::make_executable(&path).unwrap();
        };
        write_exe(
            "mxmoe",
            "#!/usr/bin/env bash\n\
             if [[ -n \"${MXMOE_PTX_OVERRIDE:-}\" && ! -f \"$MXMOE_PTX_OVERRIDE\" ]]; then\n\
             echo \"MXMOE_PTX_OVERRIDE names no file\"; exit 1; fi\n\
             echo \"devices: 1\"\n",
        );
        for suite in ["suite_a", "suite_b"] {
            write_exe(
                suite,
                "#!/usr/bin/env bash\n\
                 [[ -f \"$MXMOE_PTX_OVERRIDE\" ]] || { echo \"MXMOE_PTX_OVERRIDE names no file\"; exit 1; }\n\
                 echo \"$(basename \"$0\") $(basename \"$MXMOE_PTX_OVERRIDE\")\" >>\"$RUNS_LOG\"\n\
                 ! grep -q \"BREAKS $(basename \"$0\")\" \"$MXMOE_PTX_OVERRIDE\"\n",
            );
        }
        // (id, expected suite, module text): m1 is caught by its own suite, m2's expected suite
        // misses it and the other catches it, m3 survives.
        let modules = [
            (CLEAN_ID, "-", "clean"),
            ("m1", "suite_b", "BREAKS suite_b"),
            ("m2", "suite_b", "BREAKS suite_a"),
            ("m3", "suite_a", "nothing"),
        ];
        let mut manifest = String::new();
        for (id, suite, text) in modules {
            fs::write(stage.join(format!("{id}.ptx")), text).unwrap();
            let _ = writeln!(
                manifest,
                "{id}\t{:016x}\t{id}.ptx\t{suite}\tmodule {id}",
                fingerprint(text)
            );
        }
        fs::write(bundle.join(MANIFEST), manifest).unwrap();
        let pack = Command::new("python3")
            .args([
                "-c",
                "import sys, tarfile\n\
                 with tarfile.open(sys.argv[1], 'w:xz') as t:\n\
                 \x20   [t.add(sys.argv[2] + '/' + n, arcname=n) for n in sys.argv[3:]]",
            ])
            .arg(bundle.join(ARCHIVE))
            .arg(&stage)
            .args(modules.iter().map(|(id, _, _)| format!("{id}.ptx")))
            .status()
            .unwrap();
        assert!(pack.success(), "python3 could not write the archive");
        write_exe(RUN_SCRIPT, &run_script(&["suite_a", "suite_b"]));
        for jobs in ["1", "3"] {
            check_fake_run(&dir, jobs);
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    /// One run of the fake bundle in `dir` with `MUTANT_JOBS=jobs` (see the test above).
    fn check_fake_run(dir: &Path, jobs: &str) {
        let runs = dir.join(format!("runs-{jobs}.log"));
        let out = Command::new("bash")
            .arg(dir.join(RUN_SCRIPT))
            .arg("--baseline")
            .env("MUTANT_JOBS", jobs)
            .env("MXMOE_TEST_LOG_DIR", dir.join(format!("logs-{jobs}")))
            .env("RUNS_LOG", &runs)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(1),
            "MUTANT_JOBS={jobs}: one mutant survives:\n{stdout}"
        );
        let row = |id: &str| {
            stdout
                .lines()
                .find(|l| l.starts_with(&format!("| {id:<22} |")))
                .unwrap_or_else(|| panic!("no row for {id}:\n{stdout}"))
                .to_string()
        };
        assert!(
            row(CLEAN_ID).contains("baseline: all suites pass"),
            "{stdout}"
        );
        assert!(row("m1").contains("| suite_b "), "{stdout}");
        assert!(row("m2").contains("| suite_a "), "{stdout}");
        assert!(row("m3").contains("SURVIVED"), "{stdout}");
        let runs = fs::read_to_string(&runs).unwrap();
        let ran = |line: &str| runs.lines().any(|l| l == line);
        assert!(
            ran("suite_b m1.ptx") && !ran("suite_a m1.ptx"),
            "m1 stops at its own suite:\n{runs}"
        );
        assert!(
            ran("suite_b m2.ptx") && ran("suite_a m2.ptx"),
            "m2 tries both:\n{runs}"
        );
        assert!(
            ran("suite_a m3.ptx") && ran("suite_b m3.ptx"),
            "m3 runs every suite:\n{runs}"
        );
    }
}
