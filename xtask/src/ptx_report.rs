//! `cargo xtask ptx-report`: the PTX gate. Our FileCheck, in the spirit of rust-lang/rust's
//! `tests/assembly-llvm/asm/nvptx-*.rs`, plus a resource table from `ptxas -v`.
//!
//! It gates both modules ([`PtxModule`]): the Hopper one (`sm_90a`, assembled for `sm_90a`) and
//! the portable one (`sm_80`, assembled for every architecture in [`PORTABLE_TARGETS`], the
//! `ptxas` runs in parallel). It fails when:
//! - the module does not declare `.target <arch>` or has an unresolved `.extern .func`
//!   ([`mxmoe_ptx_builder::check_module`]);
//! - the `.entry` set differs from the module's list ([`PtxModule::entries`]: `names::ALL` or
//!   `names::ALL_PORTABLE`; missing, extra or duplicated entries);
//! - the portable module contains a Hopper-only instruction ([`HOPPER_ONLY_INSTRUCTIONS`]);
//! - a probe kernel lacks the instruction it exists to test ([`REQUIRED_INSTRUCTIONS`]);
//! - ptxas rejects the module for a target, or reports register spills or a stack frame (local
//!   memory) for an entry that is not in [`ALLOWED_STACK`];
//! - ptxas serializes the `wgmma` pipeline of a function ("wgmma.mma_async instructions are
//!   serialized", C7510–C7520): a wait after every tensor-core instruction, which the kernels'
//!   design rules out ([`serialization_problems`]);
//! - an entry reallocates registers (`setmaxnreg`) without launch bounds, ptxas ignored a
//!   `setmaxnreg` (C7508), or such an entry's register count at entry is not the one its
//!   producer/consumer balance is computed from ([`register_budget_problems`]; a smaller count
//!   would leave `setmaxnreg.inc` waiting forever);
//! - on a target, a grouped-GEMM row the tuner would keep (its `smem_plan` within the target's
//!   opt-in shared memory) does not fit once ptxas's static shared memory is added, a layout and
//!   rank have no row that fits at all, or a fixed-shape kernel (LoRA products, Gram) does not
//!   fit ([`smem_problems`]).
//!
//! Every problem is listed before the command fails, so one run shows all of them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use kernels_gpu::shared::module::PtxModule;
use kernels_gpu::shared::names;
use kernels_gpu::shared::tiles::{
    BLayout, GEMM_CONFIG_COUNT, GEMM_CONFIG_NAMES, GEMM_CONFIGS, GRAM_CONFIG, RANK_PADS,
    gram_smem_bytes, lora_down_config, smem_plan,
};

use crate::ptxas_log::{self, EntryResources, SerializedWgmma};
use crate::{build_ptx, flags, ptxas, shell};

/// A kernel allowed to use local memory (a stack frame or register spills): up to a stack frame
/// of `max_frame_bytes` (spills live in the frame), for `reason`. A larger frame fails the gate.
pub struct AllowedStack {
    pub entry: &'static str,
    pub max_frame_bytes: u64,
    pub reason: &'static str,
}

/// Kernels allowed to use local memory, each with its bound and the reason.
///
/// Local memory is slow and usually means a fragment array was indexed dynamically or the
/// register budget was blown; add an entry only with a reason a reviewer can check.
pub const ALLOWED_STACK: &[AllowedStack] = &[
    // The forward MXFP4 layout's persistent rows: two register fragment sets in flight beside
    // the accumulators (208 registers after `setmaxnreg`).
    AllowedStack {
        entry: "mxmoe_gemm_nk_mx_m128n128k64wg2s4",
        max_frame_bytes: 40,
        reason: "values of the tile loop, stored before it and reloaded once per tile outside the k-loop",
    },
    AllowedStack {
        entry: "mxmoe_gemm_nk_mx_m256n128k64wg2s3",
        max_frame_bytes: 16,
        reason: "words of the entry, one reloaded per k-tile (an L1 hit)",
    },
    // The rank-16/32 inlined copies of the LoRA epilogue (`tile::wg::lora_epilogue`) raise
    // the NVFP4 dX kernel's register demand just past its budget.
    AllowedStack {
        entry: "mxmoe_gemm_kn_nv_m128n128k64wg2s4",
        max_frame_bytes: 8,
        reason: "one 64-bit value, stored before the tile loop, reloaded once per tile after the first k-tile's decode, outside the k-loop",
    },
    // The 256-row row holds 128 accumulators per consumer thread (208 registers after
    // `setmaxnreg`); ptxas keeps a few values set up before the tile loop in local memory.
    AllowedStack {
        entry: "mxmoe_gemm_kn_mx_m256n128k64wg2s3",
        max_frame_bytes: 8,
        reason: "one 64-bit value, stored before the tile loop, reloaded once per tile outside the k-loop",
    },
    AllowedStack {
        entry: "mxmoe_gemm_kn_nv_m256n128k64wg2s3",
        max_frame_bytes: 16,
        reason: "words of the entry, one reloaded per k-tile (an L1 hit)",
    },
    AllowedStack {
        entry: "mxmoe_gemm_nk_nv_m256n128k64wg2s3",
        max_frame_bytes: 16,
        reason: "words of the entry, one reloaded per k-tile (an L1 hit)",
    },
];

/// Instructions that must appear in a probe kernel's own body: (entry, instruction prefix).
///
/// A probe exists to exercise one instruction in isolation; if the compiler lowered it to
/// something else, the probe's parity test would prove nothing about the real kernels.
pub const REQUIRED_INSTRUCTIONS: &[(&str, &str)] = &[
    (names::PROBE_MMA, "ldmatrix.sync.aligned.m8n8.x4"),
    (names::PROBE_MMA, "mma.sync.aligned.m16n8k16"),
    (names::PROBE_CP_ASYNC, "cp.async.cg.shared.global"),
];

/// Instruction prefixes that only Hopper (`sm_90`/`sm_90a`) or later has; none may appear in the
/// portable module (ptxas for `sm_80` would reject most of them too, this names the culprit).
pub const HOPPER_ONLY_INSTRUCTIONS: &[&str] = &[
    "wgmma.",
    "mbarrier.",
    "cp.async.mbarrier",
    "cp.async.bulk",
    "setmaxnreg",
    "stmatrix",
    "fence.proxy.async",
    "mul.rn.bf16x2",
];

/// One architecture a module is assembled for, with its opt-in shared memory per block
/// (`cudaDevAttrMaxSharedMemoryPerBlockOptin`, CUDA C Programming Guide, "Technical
/// Specifications per Compute Capability").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    /// `ptxas -arch`.
    pub arch: &'static str,
    /// Opt-in dynamic + static shared memory per block, bytes.
    pub smem_optin: u32,
    /// Example GPUs of the architecture.
    pub gpus: &'static str,
}

/// The Hopper module's one target.
pub const HOPPER_TARGETS: &[Target] = &[Target {
    arch: "sm_90a",
    smem_optin: 232_448,
    gpus: "H100, H200",
}];

/// Every architecture the portable module is checked for.
pub const PORTABLE_TARGETS: &[Target] = &[
    Target {
        arch: "sm_80",
        smem_optin: 166_912,
        gpus: "A100, A30",
    },
    Target {
        arch: "sm_86",
        smem_optin: 101_376,
        gpus: "A10, A40, RTX 30xx, RTX A6000",
    },
    Target {
        arch: "sm_89",
        smem_optin: 101_376,
        gpus: "L4, L40S, RTX 40xx, RTX 6000 Ada",
    },
    Target {
        arch: "sm_90",
        smem_optin: 232_448,
        gpus: "H100, H200 (portable module forced)",
    },
    Target {
        arch: "sm_100",
        smem_optin: 232_448,
        gpus: "B200, GB200",
    },
    Target {
        arch: "sm_120",
        smem_optin: 101_376,
        gpus: "RTX 50xx, RTX PRO 6000 Blackwell",
    },
];

/// The targets `module` is assembled and checked for.
pub fn targets(module: PtxModule) -> &'static [Target] {
    match module {
        PtxModule::Hopper => HOPPER_TARGETS,
        PtxModule::Portable => PORTABLE_TARGETS,
    }
}

/// Runs `cargo xtask ptx-report`: both modules, or the one `--arch` names.
pub fn run(root: &Path, flags: &flags::PtxReport) -> Result<()> {
    let modules: Vec<PtxModule> = match &flags.arch {
        Some(arch) => vec![PtxModule::from_arch(arch).with_context(|| {
            format!(
                "no module is built for {arch}: the modules are {} (hopper) and {} (portable)",
                PtxModule::Hopper.arch(),
                PtxModule::Portable.arch()
            )
        })?],
        None if flags.ptx.is_some() => bail!("--ptx needs --arch (which module the file is)"),
        None => PtxModule::ALL.to_vec(),
    };
    for module in modules {
        let ptx_file = match &flags.ptx {
            Some(p) => p.clone(),
            None => build_ptx::build(root, module.arch(), None)?.ptx_file,
        };
        report(root, &ptx_file, module)?;
    }
    Ok(())
}

/// What `ptxas -v` said about the module for one target.
struct Assembled {
    target: Target,
    resources: Vec<EntryResources>,
    serialized: Vec<SerializedWgmma>,
    ignored_setmaxnreg: Vec<String>,
    seconds: f64,
}

/// Assembles `ptx_file` for every target of `module` (in parallel), returning per target the
/// parsed `ptxas -v` report.
fn assemble(root: &Path, ptx_file: &Path, module: PtxModule) -> Result<Vec<Assembled>> {
    let ptxas = ptxas::locate()?;
    let results: Vec<Result<Assembled>> = std::thread::scope(|scope| {
        let jobs: Vec<_> = targets(module)
            .iter()
            .map(|&target| {
                let ptxas = &ptxas;
                scope.spawn(move || -> Result<Assembled> {
                    let started = std::time::Instant::now();
                    let cubin = cubin_path(root, module, target.arch);
                    if let Some(parent) = cubin.parent() {
                        fs::create_dir_all(parent)
                            .with_context(|| format!("cannot create {}", parent.display()))?;
                    }
                    // The flags of the SASS `host/build.rs` embeds, plus `-v` for the report.
                    let out = shell::output(
                        mxmoe_ptx_builder::ptxas::command(ptxas, target.arch, ptx_file, &cubin)
                            .arg("-v"),
                        true,
                    )
                    .with_context(|| {
                        format!(
                            "ptxas rejected the {} module for {}",
                            module.name(),
                            target.arch
                        )
                    })?;
                    let log = format!(
                        "{}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    );
                    let resources = ptxas_log::parse(&log).with_context(|| {
                        format!("cannot read the ptxas -v report for {}", target.arch)
                    })?;
                    Ok(Assembled {
                        target,
                        resources,
                        serialized: ptxas_log::serialized_wgmma(&log),
                        ignored_setmaxnreg: ptxas_log::ignored_setmaxnreg(&log),
                        seconds: started.elapsed().as_secs_f64(),
                    })
                })
            })
            .collect();
        jobs.into_iter()
            .map(|j| {
                j.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a ptxas thread panicked")))
            })
            .collect()
    });
    let mut assembled = Vec::new();
    for r in results {
        assembled.push(r?);
    }
    Ok(assembled)
}

/// Lints `ptx_file` as `module`, assembles it with `ptxas -v` for each of the module's targets,
/// prints the resource table (first target) and the per-target summaries and shared-memory fit,
/// and fails if any check fails.
pub fn report(root: &Path, ptx_file: &Path, module: PtxModule) -> Result<()> {
    let ptx = fs::read_to_string(ptx_file)
        .with_context(|| format!("cannot read {}", ptx_file.display()))?;
    let mut problems = lint(&ptx, module.arch(), module.entries(), REQUIRED_INSTRUCTIONS);
    if module == PtxModule::Portable {
        problems.extend(forbidden_problems(&ptx, HOPPER_ONLY_INSTRUCTIONS));
    }

    let ptxas = ptxas::locate()?;
    let assembled = assemble(root, ptx_file, module)?;
    let entries = mxmoe_ptx_builder::ptx_entries(&ptx);

    println!();
    println!(
        "{} ({} module, .target {}), ptxas: {} [{}]",
        ptx_file.display(),
        module.name(),
        module.arch(),
        ptxas.display(),
        ptxas::version(&ptxas).unwrap_or_else(|| "version unknown".into())
    );
    if let Some(first) = assembled.first() {
        println!("resources for {}:", first.target.arch);
        print!("{}", format_table(&first.resources, ALLOWED_STACK));
        println!("(smem is static shared memory; dynamic shared memory is set at launch)");
    }
    for a in &assembled {
        let tag = |p: String| format!("{}: {p}", a.target.arch);
        problems.extend(
            coverage_problems(&entries, &a.resources)
                .into_iter()
                .map(tag),
        );
        problems.extend(
            resource_problems(&a.resources, ALLOWED_STACK)
                .into_iter()
                .map(tag),
        );
        problems.extend(serialization_problems(&a.serialized).into_iter().map(tag));
        problems.extend(
            register_budget_problems(&ptx, &a.resources, &a.ignored_setmaxnreg)
                .into_iter()
                .map(tag),
        );
        let (smem, fit) = smem_problems(module, &a.target, &a.resources);
        problems.extend(smem.into_iter().map(tag));
        let max_regs = a.resources.iter().map(|r| r.registers).max().unwrap_or(0);
        let local = a.resources.iter().filter(|r| r.uses_local_memory()).count();
        println!(
            "{:>7} ({}): {} entries, at most {max_regs} registers, {local} with local memory, \
             {} with serialized wgmma, ptxas {:.1} s; rows fitting {} B opt-in shared memory at \
             rank 128: {}",
            a.target.arch,
            a.target.gpus,
            a.resources.len(),
            a.serialized.len(),
            a.seconds,
            a.target.smem_optin,
            fit
        );
    }
    if !problems.is_empty() {
        eprintln!();
        for p in &problems {
            eprintln!("ptx-report: {p}");
        }
        bail!(
            "the PTX gate found {} problem(s) in {} ({} module)",
            problems.len(),
            ptx_file.display(),
            module.name()
        );
    }
    println!(
        "ptx-report: {} module, {} entries, {} target(s), all checks passed",
        module.name(),
        entries.len(),
        assembled.len()
    );
    Ok(())
}

/// Where ptxas writes the cubin it assembles (kept for inspection with `cuobjdump`):
/// `mxmoe-sm_90a.cubin` for the Hopper module, `mxmoe-sm_80-<arch>.cubin` for the portable one.
fn cubin_path(root: &Path, module: PtxModule, arch: &str) -> PathBuf {
    let name = if module.arch() == arch {
        format!("mxmoe-{arch}.cubin")
    } else {
        format!("mxmoe-{}-{arch}.cubin", module.arch())
    };
    build_ptx::target_dir(root, module.arch()).join(name)
}

/// One sentence per line of `ptx` that starts (after indentation) with one of `forbidden`.
pub fn forbidden_problems(ptx: &str, forbidden: &[&str]) -> Vec<String> {
    let mut found: BTreeMap<&str, usize> = BTreeMap::new();
    for line in ptx.lines() {
        let l = line.trim_start();
        if let Some(f) = forbidden.iter().find(|f| l.starts_with(**f)) {
            *found.entry(f).or_default() += 1;
        }
    }
    found
        .into_iter()
        .map(|(f, n)| {
            format!("the portable module contains `{f}` ({n} lines), which needs Hopper or later")
        })
        .collect()
}

/// The grouped-GEMM layouts and their entry names, per table row.
fn gemm_layouts() -> impl Iterator<Item = (BLayout, &'static [&'static str; GEMM_CONFIG_COUNT])> {
    names::GEMM_WEIGHT_LAYOUTS.into_iter().map(|layout| {
        let entries = names::gemm_names(layout).expect("every grouped-GEMM layout has entries");
        (layout, entries)
    })
}

/// Shared-memory checks of `module` on `target`, with ptxas's static shared memory per entry in
/// `resources`. For every grouped-GEMM row the module has, every layout and every padded rank
/// (0 = no LoRA, and each of `RANK_PADS`): the tuner keeps the row when its `smem_plan` is within
/// the opt-in limit (`tune::prune` on the live device), so the launch must fit once the static
/// bytes are added; every layout and rank must keep at least one row; the LoRA products and the
/// Gram kernel (one shape per rank, no alternative) must fit. Returns the problems and, for the
/// summary line, the rows that fit every layout at rank 128 (`m64n128k32w2x2s3 …` or `none`).
pub fn smem_problems(
    module: PtxModule,
    target: &Target,
    resources: &[EntryResources],
) -> (Vec<String>, String) {
    let limit = u64::from(target.smem_optin);
    let static_smem = |name: &str| {
        resources
            .iter()
            .find(|r| r.name == name)
            .map_or(0, |r| r.smem_bytes)
    };
    let mut problems = Vec::new();
    let mut fit_at_max_rank = Vec::new();
    let ranks: Vec<u32> = std::iter::once(0).chain(RANK_PADS).collect();
    for (layout, entry_names) in gemm_layouts() {
        for &r_pad in &ranks {
            let mut kept = 0;
            for (i, c) in GEMM_CONFIGS.iter().enumerate() {
                if !module.has_config(c) {
                    continue;
                }
                let dynamic = u64::from(smem_plan(c, layout, r_pad).total_bytes);
                if dynamic > limit {
                    continue;
                }
                kept += 1;
                let total = dynamic + static_smem(entry_names[i]);
                if total > limit {
                    problems.push(format!(
                        "`{}` at padded rank {r_pad}: the tuner keeps it ({dynamic} B planned \
                         <= {limit} B) but with its static shared memory it needs {total} B",
                        entry_names[i]
                    ));
                }
            }
            if kept == 0 {
                problems.push(format!(
                    "no grouped-GEMM row of the {} module fits {limit} B of shared memory for \
                     {layout:?} at padded rank {r_pad}",
                    module.name()
                ));
            }
        }
    }
    for (i, c) in GEMM_CONFIGS.iter().enumerate() {
        let fits_all = module.has_config(c)
            && gemm_layouts().all(|(layout, entry_names)| {
                u64::from(smem_plan(c, layout, 128).total_bytes) + static_smem(entry_names[i])
                    <= limit
            });
        if fits_all {
            fit_at_max_rank.push(GEMM_CONFIG_NAMES[i]);
        }
    }
    for (i, &r_pad) in RANK_PADS.iter().enumerate() {
        let cfg = lora_down_config(r_pad);
        for (layout, name) in [
            (BLayout::Strided, names::LORA_DOWN[i]),
            (BLayout::NkBf16, names::LORA_DOWN_NK[i]),
            (BLayout::KnBf16, names::LORA_DOWN_KN[i]),
        ] {
            let total = u64::from(smem_plan(&cfg, layout, 0).total_bytes) + static_smem(name);
            if total > limit {
                problems.push(format!(
                    "`{name}` needs {total} B of shared memory, over the {limit} B opt-in limit"
                ));
            }
        }
        let name = names::GRAM[i];
        let total = u64::from(gram_smem_bytes(&GRAM_CONFIG, r_pad)) + static_smem(name);
        if total > limit {
            problems.push(format!(
                "`{name}` needs {total} B of shared memory, over the {limit} B opt-in limit"
            ));
        }
    }
    let fit = if fit_at_max_rank.is_empty() {
        "none".to_string()
    } else {
        fit_at_max_rank.join(" ")
    };
    (problems, fit)
}

/// Text checks of the PTX module: target and externs, the entry set against `expected`, and
/// the `required` instructions per entry. Returns one sentence per problem.
pub fn lint(ptx: &str, arch: &str, expected: &[&str], required: &[(&str, &str)]) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(e) = mxmoe_ptx_builder::check_module(ptx, arch) {
        problems.push(e);
    }

    let entries = mxmoe_ptx_builder::ptx_entries(ptx);
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for e in &entries {
        *counts.entry(e.as_str()).or_default() += 1;
    }
    for name in expected {
        if !counts.contains_key(name) {
            problems.push(format!(
                "`{name}` is listed for the module (shared::names) but the PTX has no `.entry {name}`"
            ));
        }
    }
    for (name, count) in &counts {
        if !expected.contains(name) {
            problems.push(format!(
                "the PTX has `.entry {name}`, which the module's list (shared::names) does not have"
            ));
        }
        if *count > 1 {
            problems.push(format!("the PTX defines `.entry {name}` {count} times"));
        }
    }

    for (entry, instruction) in required {
        match entry_body(ptx, entry) {
            Some(body)
                if body
                    .lines()
                    .any(|l| l.trim_start().starts_with(instruction)) => {}
            Some(_) => problems.push(format!(
                "probe `{entry}` must contain `{instruction}` but its PTX body does not"
            )),
            // A missing entry is already reported above when it is expected.
            None if expected.contains(entry) => {}
            None => problems.push(format!("probe `{entry}` has no `.entry` in the PTX")),
        }
    }
    problems
}

/// The text of entry `name`, from its `.entry` line to the brace that closes its body.
pub fn entry_body<'a>(ptx: &'a str, name: &str) -> Option<&'a str> {
    let mut offset = 0;
    let mut start = None;
    for line in ptx.split_inclusive('\n') {
        let trimmed = line.trim_start();
        let rest = trimmed
            .strip_prefix(".visible .entry ")
            .or_else(|| trimmed.strip_prefix(".entry "));
        if let Some(rest) = rest {
            let decl = rest
                .split(['(', ' ', '\t', '\n', '\r'])
                .next()
                .unwrap_or("");
            if decl == name {
                start = Some(offset);
                break;
            }
        }
        offset += line.len();
    }
    let start = start?;
    let text = &ptx[start..];
    let open = text.find('{')?;
    let mut depth = 0usize;
    for (i, c) in text[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&text[..open + i + 1]);
                }
            }
            _ => {}
        }
    }
    Some(text)
}

/// Entries of the PTX that the ptxas report does not mention (a parser or ptxas surprise that
/// would otherwise let an entry escape the resource gate).
pub fn coverage_problems(ptx_entries: &[String], resources: &[EntryResources]) -> Vec<String> {
    ptx_entries
        .iter()
        .filter(|e| !resources.iter().any(|r| &r.name == *e))
        .map(|e| format!("ptxas -v reported nothing for `.entry {e}`"))
        .collect()
}

/// One sentence per entry that uses local memory without being in `allowed`, or beyond its
/// allowance.
pub fn resource_problems(resources: &[EntryResources], allowed: &[AllowedStack]) -> Vec<String> {
    resources
        .iter()
        .filter(|r| r.uses_local_memory() && allowed_reason(allowed, r).is_none())
        .map(|r| {
            format!(
                "`{}` uses local memory ({} bytes stack frame, {} bytes spill stores, {} bytes spill \
                 loads); fix the kernel, or add it with a bound and a reason to ALLOWED_STACK in \
                 xtask/src/ptx_report.rs",
                r.name, r.stack_frame_bytes, r.spill_store_bytes, r.spill_load_bytes
            )
        })
        .collect()
}

/// One problem per function whose `wgmma` pipeline ptxas serialized. Every `wgmma` kernel keeps
/// a group's instructions back to back (register A fragments defined before `wgmma.fence`, a
/// second fragment set or `wait_group 0` before they are redefined, docs/PERF.md); a
/// serialization means one of them no longer does, and costs the tensor pipe a wait per
/// instruction.
pub fn serialization_problems(serialized: &[SerializedWgmma]) -> Vec<String> {
    serialized
        .iter()
        .map(|s| {
            format!(
                "ptxas serializes the wgmma pipeline of `{}` ({}: {}); keep each group's \
                 instructions back to back (docs/PERF.md, \"wgmma serialized\")",
                if s.function.is_empty() {
                    "<unnamed>"
                } else {
                    &s.function
                },
                if s.code.is_empty() {
                    "no code"
                } else {
                    &s.code
                },
                s.reason
            )
        })
        .collect()
}

/// What the PTX says about one entry's register budget: its launch bounds (`.maxntid T, 1, 1`
/// and `.minnctapersm B`, as `mxmoe_ptx_builder::apply_launch_bounds` writes them) and whether
/// its body reallocates registers (`setmaxnreg`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RegisterBudget {
    /// `.maxntid` (x only).
    pub maxntid: Option<u32>,
    /// `.minnctapersm`.
    pub min_blocks: Option<u32>,
    /// Whether the body holds a `setmaxnreg` instruction.
    pub reallocates: bool,
}

/// [`RegisterBudget`] per `.entry` of `ptx`.
pub fn register_budgets(ptx: &str) -> BTreeMap<String, RegisterBudget> {
    let mut out = BTreeMap::new();
    let mut current: Option<(String, RegisterBudget)> = None;
    for line in ptx.lines() {
        let t = line.trim_start();
        if let Some(rest) = t
            .strip_prefix(".visible .entry ")
            .or_else(|| t.strip_prefix(".entry "))
        {
            if let Some((name, b)) = current.take() {
                out.insert(name, b);
            }
            let name = rest.split(['(', ' ']).next().unwrap_or("").to_string();
            current = Some((name, RegisterBudget::default()));
            continue;
        }
        let Some((_, b)) = current.as_mut() else {
            continue;
        };
        let number = |prefix: &str| -> Option<u32> {
            t.strip_prefix(prefix)?
                .split([',', ' '])
                .find(|w| !w.is_empty())?
                .parse()
                .ok()
        };
        if let Some(n) = number(".maxntid") {
            b.maxntid = Some(n);
        } else if let Some(n) = number(".minnctapersm") {
            b.min_blocks = Some(n);
        } else if t.starts_with("setmaxnreg.") {
            b.reallocates = true;
        }
    }
    if let Some((name, b)) = current.take() {
        out.insert(name, b);
    }
    out
}

/// The register count ptxas gives an entry launched with `maxntid` threads and at least
/// `min_blocks` blocks per SM: the 64K-register file shared out, in steps of 8.
pub const fn entry_registers(maxntid: u32, min_blocks: u32) -> u32 {
    65536 / (maxntid * min_blocks) / 8 * 8
}

/// Problems with the register reallocation of `ptx` on one target: an entry with `setmaxnreg`
/// but no launch bounds, ptxas's "'setmaxnreg' ignored" reports (`ignored`), and an entry with
/// `setmaxnreg` whose register count at entry (`resources`) is not [`entry_registers`] of its
/// bounds — the count `tile::wg`'s producer/consumer split is computed from; with fewer, the
/// consumers' `setmaxnreg.inc` could wait forever for registers the pool never gets.
pub fn register_budget_problems(
    ptx: &str,
    resources: &[EntryResources],
    ignored: &[String],
) -> Vec<String> {
    let mut problems: Vec<String> = ignored
        .iter()
        .map(|m| format!("ptxas ignored a `setmaxnreg` ({m}); give the entry launch bounds"))
        .collect();
    for (name, b) in register_budgets(ptx) {
        if !b.reallocates {
            continue;
        }
        let (Some(threads), Some(blocks)) = (b.maxntid, b.min_blocks) else {
            problems.push(format!(
                "`{name}` reallocates registers (setmaxnreg) without `.maxntid` and \
                 `.minnctapersm` (ptx::regs::declare_launch_bounds)"
            ));
            continue;
        };
        let want = entry_registers(threads, blocks);
        match resources.iter().find(|r| r.name == name) {
            Some(r) if r.registers == want => {}
            Some(r) => problems.push(format!(
                "`{name}` starts with {} registers per thread, not the {want} its `setmaxnreg` \
                 balance assumes for {threads} threads and {blocks} block(s) per SM",
                r.registers
            )),
            None => {} // reported by `coverage_problems`
        }
    }
    problems
}

/// The reason `r` is allowed its local memory, if it is (listed, and its frame within the bound).
fn allowed_reason(allowed: &[AllowedStack], r: &EntryResources) -> Option<&'static str> {
    allowed
        .iter()
        .find(|a| a.entry == r.name && r.stack_frame_bytes <= a.max_frame_bytes)
        .map(|a| a.reason)
}

/// The per-kernel table: registers, static smem, stack frame, spills, barriers and a status.
pub fn format_table(resources: &[EntryResources], allowed: &[AllowedStack]) -> String {
    let header = [
        "kernel",
        "regs",
        "smem B",
        "stack B",
        "spill st B",
        "spill ld B",
        "barriers",
        "status",
    ];
    let mut rows: Vec<[String; 8]> = Vec::new();
    for r in resources {
        let status = match (r.uses_local_memory(), allowed_reason(allowed, r)) {
            (false, _) => "ok".to_string(),
            (true, Some(reason)) => format!("allowed: {reason}"),
            (true, None) => "FAIL: local memory".to_string(),
        };
        rows.push([
            r.name.clone(),
            r.registers.to_string(),
            r.smem_bytes.to_string(),
            r.stack_frame_bytes.to_string(),
            r.spill_store_bytes.to_string(),
            r.spill_load_bytes.to_string(),
            r.barriers.to_string(),
            status,
        ]);
    }
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            // Names and status are left-aligned; numbers right-aligned.
            if i == 0 || i == cells.len() - 1 {
                let _ = write!(text, "{cell:<w$}  ");
            } else {
                let _ = write!(text, "{cell:>w$}  ");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&header);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODULE: &str = "\
.version 8.0
.target sm_90
.address_size 64

\t// .globl\tmma_probe
.visible .entry mma_probe(
\t.param .u64 mma_probe_param_0
)
{
\t.reg .b32 \t%r<20>;
\t// begin inline asm
\t{
\tldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r1, %r2, %r3, %r4}, [%r5];
\t}
\t// end inline asm
\tret;

}
\t// .globl\tplain
.visible .entry plain()
{
\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1, %f2, %f3, %f4}, {%r1, %r2, %r3, %r4}, {%r5, %r6}, {%f1, %f2, %f3, %f4};
\tret;

}
";

    #[test]
    fn a_matching_module_has_no_problems() {
        let required = [("mma_probe", "ldmatrix.sync.aligned.m8n8.x4")];
        assert_eq!(
            lint(MODULE, "sm_90", &["mma_probe", "plain"], &required),
            Vec::<String>::new()
        );
    }

    #[test]
    fn missing_and_extra_entries_are_reported() {
        let problems = lint(MODULE, "sm_90", &["mma_probe", "absent"], &[]);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("no `.entry absent`"));
        assert!(problems[1].contains("`.entry plain`, which the module's list"));
    }

    #[test]
    fn duplicate_entries_are_reported() {
        let doubled = format!("{MODULE}.visible .entry plain()\n{{\n\tret;\n}}\n");
        let problems = lint(&doubled, "sm_90", &["mma_probe", "plain"], &[]);
        assert_eq!(
            problems,
            vec!["the PTX defines `.entry plain` 2 times".to_string()]
        );
    }

    #[test]
    fn wrong_target_and_extern_funcs_are_reported() {
        let problems = lint(MODULE, "sm_80", &["mma_probe", "plain"], &[]);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains(".target sm_80"));
        let with_extern = format!("{MODULE}.extern .func panic()\n;\n");
        let problems = lint(&with_extern, "sm_90", &["mma_probe", "plain"], &[]);
        assert!(
            problems[0].contains("unresolved external function"),
            "{problems:?}"
        );
    }

    #[test]
    fn required_instructions_are_looked_up_in_the_entry_body_only() {
        // `plain` has the mma, `mma_probe` does not: the check must not see across entries.
        let required = [("mma_probe", "mma.sync.aligned.m16n8k16")];
        let problems = lint(MODULE, "sm_90", &["mma_probe", "plain"], &required);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("probe `mma_probe` must contain `mma.sync.aligned.m16n8k16`"));
    }

    #[test]
    fn entry_body_spans_nested_braces() {
        let body = entry_body(MODULE, "mma_probe").unwrap();
        assert!(body.starts_with(".visible .entry mma_probe("));
        assert!(body.ends_with("\tret;\n\n}"));
        assert!(!body.contains("plain"));
        assert!(entry_body(MODULE, "mma").is_none());
    }

    fn usage(name: &str, stack: u64, spill: u64) -> EntryResources {
        EntryResources {
            name: name.into(),
            registers: 32,
            stack_frame_bytes: stack,
            cumulative_stack_bytes: stack,
            spill_store_bytes: spill,
            spill_load_bytes: spill,
            ..Default::default()
        }
    }

    #[test]
    fn local_memory_fails_unless_allowed() {
        let resources = [
            usage("clean", 0, 0),
            usage("stacky", 16, 0),
            usage("spilly", 8, 8),
        ];
        let allow = |entry, max_frame_bytes| AllowedStack {
            entry,
            max_frame_bytes,
            reason: "a local array, by design",
        };
        let problems = resource_problems(&resources, &[allow("stacky", 16)]);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].starts_with("`spilly` uses local memory (8 bytes stack frame"));
        // A frame past the entry's bound fails like an unlisted one.
        let problems = resource_problems(&resources, &[allow("stacky", 8), allow("spilly", 8)]);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].starts_with("`stacky` uses local memory (16 bytes stack frame"));
    }

    #[test]
    fn register_budgets_are_checked_against_the_entry_count() {
        let ptx = "\
.visible .entry a(
)
.maxntid 384, 1, 1
.minnctapersm 1
{
\tsetmaxnreg.dec.sync.aligned.u32 96;
}
.visible .entry b(
)
{
\tsetmaxnreg.inc.sync.aligned.u32 200;
}
.visible .entry c(
)
{
\tret;
}
";
        let budgets = register_budgets(ptx);
        assert_eq!(
            budgets["a"],
            RegisterBudget {
                maxntid: Some(384),
                min_blocks: Some(1),
                reallocates: true
            }
        );
        assert!(budgets["b"].reallocates && budgets["b"].maxntid.is_none());
        assert_eq!(budgets["c"], RegisterBudget::default());
        assert_eq!(entry_registers(384, 1), 168);
        assert_eq!(entry_registers(256, 2), 128);
        let regs = |a: u32| {
            vec![
                EntryResources {
                    name: "a".into(),
                    registers: a,
                    ..EntryResources::default()
                },
                EntryResources {
                    name: "b".into(),
                    registers: 168,
                    ..EntryResources::default()
                },
                EntryResources {
                    name: "c".into(),
                    registers: 20,
                    ..EntryResources::default()
                },
            ]
        };
        let ok = register_budget_problems(ptx, &regs(168), &[]);
        assert_eq!(ok.len(), 1, "{ok:?}");
        assert!(ok[0].starts_with("`b` reallocates registers"));
        let low = register_budget_problems(ptx, &regs(128), &["(C7508) x".into()]);
        assert_eq!(low.len(), 3, "{low:?}");
        assert!(low[0].contains("ignored a `setmaxnreg` ((C7508) x)"));
        assert!(low[1].contains("`a` starts with 128 registers per thread, not the 168"));
    }

    #[test]
    fn every_serialized_wgmma_is_a_problem() {
        let serialized = vec![
            SerializedWgmma {
                function: "k".into(),
                code: "C7513".into(),
                reason: "non wgmma instructions defining input registers".into(),
            },
            SerializedWgmma {
                function: String::new(),
                code: String::new(),
                reason: "something new".into(),
            },
        ];
        let problems = serialization_problems(&serialized);
        assert_eq!(problems.len(), 2);
        assert!(problems[0].starts_with(
            "ptxas serializes the wgmma pipeline of `k` (C7513: non wgmma instructions"
        ));
        assert!(problems[1].contains("`<unnamed>` (no code: something new)"));
        assert!(serialization_problems(&[]).is_empty());
    }

    #[test]
    fn entries_missing_from_the_ptxas_report_are_reported() {
        let problems = coverage_problems(&["a".into(), "b".into()], &[usage("a", 0, 0)]);
        assert_eq!(
            problems,
            vec!["ptxas -v reported nothing for `.entry b`".to_string()]
        );
    }

    #[test]
    fn hopper_only_instructions_are_found_by_line() {
        let ptx = "\t// wgmma.fence in a comment is fine\n\twgmma.fence.sync.aligned;\n\
                   \twgmma.commit_group.sync.aligned;\n\tmul.rn.bf16x2 %r1, %r2, %r3;\n\
                   \tfma.rn.bf16x2 %r1, %r2, %r3, %r4;\n";
        assert_eq!(
            forbidden_problems(ptx, HOPPER_ONLY_INSTRUCTIONS),
            vec![
                "the portable module contains `mul.rn.bf16x2` (1 lines), which needs Hopper or later"
                    .to_string(),
                "the portable module contains `wgmma.` (2 lines), which needs Hopper or later"
                    .to_string(),
            ]
        );
        assert!(
            forbidden_problems("\tmma.sync.aligned.m16n8k16;\n", HOPPER_ONLY_INSTRUCTIONS)
                .is_empty()
        );
    }

    #[test]
    fn shared_memory_is_checked_per_target() {
        let sm86 = PORTABLE_TARGETS[1];
        assert_eq!(sm86.arch, "sm_86");
        // No static shared memory: the rows that fit are exactly the tuner's survivors.
        let (problems, fit) = smem_problems(PtxModule::Portable, &sm86, &[]);
        assert_eq!(problems, Vec::<String>::new());
        assert!(!fit.contains("wg"), "{fit}");
        // Static shared memory that pushes a kept row over the limit is reported.
        let big = EntryResources {
            name: names::GEMM_NK[2].into(),
            smem_bytes: 100_000,
            ..Default::default()
        };
        let (problems, _) = smem_problems(PtxModule::Portable, &sm86, &[big]);
        assert!(
            problems
                .iter()
                .any(|p| p.contains(names::GEMM_NK[2]) && p.contains("tuner keeps it")),
            "{problems:?}"
        );
        // A target too small for every row (and the fixed-shape kernels) is reported.
        let tiny = Target {
            arch: "sm_00",
            smem_optin: 16 * 1024,
            gpus: "none",
        };
        let (problems, fit) = smem_problems(PtxModule::Portable, &tiny, &[]);
        assert_eq!(fit, "none");
        assert!(problems.iter().any(|p| p.contains("no grouped-GEMM row")));
        assert!(problems.iter().any(|p| p.contains(names::GRAM[3])));
        // The Hopper module's rows include wgmma ones.
        let (problems, fit) = smem_problems(PtxModule::Hopper, &HOPPER_TARGETS[0], &[]);
        assert!(
            problems.is_empty() && fit.contains("wg2s4"),
            "{problems:?} {fit}"
        );
    }

    #[test]
    fn every_portable_target_is_listed_once() {
        let archs: Vec<&str> = PORTABLE_TARGETS.iter().map(|t| t.arch).collect();
        assert_eq!(
            archs,
            ["sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120"]
        );
        assert_eq!(targets(PtxModule::Hopper)[0].arch, PtxModule::Hopper.arch());
        assert_eq!(
            targets(PtxModule::Portable)[0].arch,
            PtxModule::Portable.arch()
        );
    }

    #[test]
    fn table_has_one_aligned_row_per_kernel() {
        let table = format_table(
            &[usage("clean", 0, 0), usage("a_longer_name", 16, 4)],
            &[AllowedStack {
                entry: "a_longer_name",
                max_frame_bytes: 16,
                reason: "why",
            }],
        );
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("kernel         regs"));
        assert!(lines[1].starts_with("clean            32"));
        assert!(lines[1].ends_with("ok"));
        assert!(lines[2].ends_with("allowed: why"));
    }
}
