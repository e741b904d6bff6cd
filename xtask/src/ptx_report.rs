//! `cargo xtask ptx-report`: the PTX gate. Our FileCheck, in the spirit of rust-lang/rust's
//! `tests/assembly-llvm/asm/nvptx-*.rs`, plus a resource table from `ptxas -v`.
//!
//! It fails when:
//! - the module does not declare `.target <arch>` or has an unresolved `.extern .func`
//!   ([`mxmoe_ptx_builder::check_module`]);
//! - the `.entry` set differs from [`kernels_gpu::shared::names::ALL`] (missing, extra or
//!   duplicated entries);
//! - a probe kernel lacks the instruction it exists to test ([`REQUIRED_INSTRUCTIONS`]);
//! - ptxas reports register spills or a stack frame (local memory) for an entry that is not in
//!   [`ALLOWED_STACK`].
//!
//! Every problem is listed before the command fails, so one run shows all of them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use kernels_gpu::shared::names;

use crate::ptxas_log::{self, EntryResources};
use crate::{build_ptx, flags, ptxas, shell};

/// Kernels allowed to use local memory (a stack frame or register spills), each with the reason.
///
/// Local memory is slow and usually means a fragment array was indexed dynamically or the
/// register budget was blown; add an entry only with a reason a reviewer can check.
pub const ALLOWED_STACK: &[(&str, &str)] = &[];

/// Instructions that must appear in a probe kernel's own body: (entry, instruction prefix).
///
/// A probe exists to exercise one instruction in isolation; if the compiler lowered it to
/// something else, the probe's parity test would prove nothing about the real kernels.
pub const REQUIRED_INSTRUCTIONS: &[(&str, &str)] = &[
    (names::PROBE_MMA, "ldmatrix.sync.aligned.m8n8.x4"),
    (names::PROBE_MMA, "mma.sync.aligned.m16n8k16"),
    (names::PROBE_CP_ASYNC, "cp.async.cg.shared.global"),
];

/// Runs `cargo xtask ptx-report`.
pub fn run(root: &Path, flags: &flags::PtxReport) -> Result<()> {
    let ptx_file = match &flags.ptx {
        Some(p) => p.clone(),
        None => build_ptx::build(root, &flags.arch, None)?.ptx_file,
    };
    report(root, &ptx_file, &flags.arch)
}

/// Lints `ptx_file`, assembles it with `ptxas -v`, prints the resource table, and fails if any
/// check fails.
pub fn report(root: &Path, ptx_file: &Path, arch: &str) -> Result<()> {
    let ptx = fs::read_to_string(ptx_file)
        .with_context(|| format!("cannot read {}", ptx_file.display()))?;
    let mut problems = lint(&ptx, arch, names::ALL, REQUIRED_INSTRUCTIONS);

    let ptxas = ptxas::locate()?;
    let cubin = cubin_path(root, arch);
    if let Some(parent) = cubin.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let out = shell::output(
        Command::new(&ptxas)
            .arg(format!("-arch={arch}"))
            .arg("-v")
            .arg(ptx_file)
            .arg("-o")
            .arg(&cubin),
        true,
    )
    .context("ptxas rejected the PTX module")?;
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let resources = ptxas_log::parse(&log).context("cannot read the ptxas -v report")?;

    println!();
    println!(
        "{} ({arch}), ptxas: {} [{}]",
        ptx_file.display(),
        ptxas.display(),
        ptxas::version(&ptxas).unwrap_or_else(|| "version unknown".into())
    );
    print!("{}", format_table(&resources, ALLOWED_STACK));
    println!("(smem is static shared memory; dynamic shared memory is set at launch)");

    problems.extend(coverage_problems(
        &mxmoe_ptx_builder::ptx_entries(&ptx),
        &resources,
    ));
    problems.extend(resource_problems(&resources, ALLOWED_STACK));
    if !problems.is_empty() {
        eprintln!();
        for p in &problems {
            eprintln!("ptx-report: {p}");
        }
        bail!(
            "the PTX gate found {} problem(s) in {}",
            problems.len(),
            ptx_file.display()
        );
    }
    println!("ptx-report: {} entries, all checks passed", resources.len());
    Ok(())
}

/// Where ptxas writes the cubin it assembles (kept for inspection with `cuobjdump`).
fn cubin_path(root: &Path, arch: &str) -> PathBuf {
    build_ptx::target_dir(root).join(format!("mxmoe-{arch}.cubin"))
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
                "`{name}` is listed in shared::names::ALL but the PTX has no `.entry {name}`"
            ));
        }
    }
    for (name, count) in &counts {
        if !expected.contains(name) {
            problems.push(format!(
                "the PTX has `.entry {name}`, which shared::names::ALL does not list"
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

/// One sentence per entry that uses local memory without being in `allowed`.
pub fn resource_problems(resources: &[EntryResources], allowed: &[(&str, &str)]) -> Vec<String> {
    resources
        .iter()
        .filter(|r| r.uses_local_memory() && allowed_reason(allowed, &r.name).is_none())
        .map(|r| {
            format!(
                "`{}` uses local memory ({} bytes stack frame, {} bytes spill stores, {} bytes spill \
                 loads); fix the kernel, or add it with a reason to ALLOWED_STACK in xtask/src/ptx_report.rs",
                r.name, r.stack_frame_bytes, r.spill_store_bytes, r.spill_load_bytes
            )
        })
        .collect()
}

/// The reason `name` is allowed local memory, if it is.
fn allowed_reason<'a>(allowed: &[(&str, &'a str)], name: &str) -> Option<&'a str> {
    allowed
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, reason)| *reason)
}

/// The per-kernel table: registers, static smem, stack frame, spills, barriers and a status.
pub fn format_table(resources: &[EntryResources], allowed: &[(&str, &str)]) -> String {
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
        let status = match (r.uses_local_memory(), allowed_reason(allowed, &r.name)) {
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
        assert!(problems[1].contains("`.entry plain`, which shared::names::ALL does not list"));
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
        let problems = resource_problems(&resources, &[("stacky", "a local array, by design")]);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].starts_with("`spilly` uses local memory (8 bytes stack frame"));
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
    fn table_has_one_aligned_row_per_kernel() {
        let table = format_table(
            &[usage("clean", 0, 0), usage("a_longer_name", 16, 4)],
            &[("a_longer_name", "why")],
        );
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("kernel         regs"));
        assert!(lines[1].starts_with("clean            32"));
        assert!(lines[1].ends_with("ok"));
        assert!(lines[2].ends_with("allowed: why"));
    }
}
