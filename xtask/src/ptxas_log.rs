//! Parser for the resource report that `ptxas -v` writes to stderr.
//!
//! For each kernel entry, ptxas prints (CUDA 13.0 shown):
//!
//! ```text
//! ptxas info    : Compiling entry function 'probe' for 'sm_90'
//! ptxas info    : Function properties for probe
//!     16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
//! ptxas info    : Used 8 registers, used 1 barriers, 16 bytes cumulative stack size, 2048 bytes smem
//! ptxas info    : Compile time = 2.185 ms
//! ```
//!
//! Non-entry `.func` helpers that were not inlined get a `Function properties for <name>` block of
//! their own, without "Compiling entry function"; they are not kernels and are left out of the
//! result. Fields that ptxas omits when zero (`smem`, `cmem[N]`, `cumulative stack size`) read as
//! zero; unknown fields are ignored, so a newer ptxas that adds one still parses.

use std::collections::HashMap;

use anyhow::{Context, Result, bail};

/// Resource usage of one kernel entry, as reported by ptxas.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryResources {
    /// The entry's name (the PTX `.entry` symbol).
    pub name: String,
    /// Registers per thread.
    pub registers: u32,
    /// Named barriers used.
    pub barriers: u32,
    /// Static shared memory, in bytes (dynamic shared memory is not known to ptxas).
    pub smem_bytes: u64,
    /// The entry's own stack frame, in bytes.
    pub stack_frame_bytes: u64,
    /// Stack size including the frames of called functions, in bytes.
    pub cumulative_stack_bytes: u64,
    /// Bytes stored to local memory by register spills.
    pub spill_store_bytes: u64,
    /// Bytes loaded from local memory by register spills.
    pub spill_load_bytes: u64,
}

impl EntryResources {
    /// Whether the entry spills registers or has any stack frame (which lives in local memory).
    pub fn uses_local_memory(&self) -> bool {
        self.spill_store_bytes != 0
            || self.spill_load_bytes != 0
            || self.stack_frame_bytes != 0
            || self.cumulative_stack_bytes != 0
    }
}

/// The numbers of one "N bytes stack frame, N bytes spill stores, N bytes spill loads" line.
#[derive(Debug, Clone, Copy, Default)]
struct FrameLine {
    stack_frame_bytes: u64,
    spill_store_bytes: u64,
    spill_load_bytes: u64,
}

/// The numbers of one "Used N registers, ..." line.
#[derive(Debug, Clone, Copy, Default)]
struct UsedLine {
    registers: Option<u32>,
    barriers: u32,
    smem_bytes: u64,
    cumulative_stack_bytes: u64,
}

/// Parses a `ptxas -v` log into one record per kernel entry, in the order ptxas compiled them.
///
/// Fails if an entry lacks its "Function properties" block or its "Used ... registers" line, or
/// if a number does not parse: a report that silently dropped a kernel would let spills through.
pub fn parse(log: &str) -> Result<Vec<EntryResources>> {
    // Entries in order, with their "Used" line once seen.
    let mut entries: Vec<(String, Option<UsedLine>)> = Vec::new();
    // The entry whose "Used" line comes next, if the last "Compiling" line named an entry.
    let mut current_entry: Option<usize> = None;
    // Frame lines by function name (entries and helpers alike).
    let mut frames: HashMap<String, FrameLine> = HashMap::new();
    // The function whose frame line comes next.
    let mut pending_frame: Option<String> = None;

    for (line_idx, raw) in log.lines().enumerate() {
        let line_no = line_idx + 1;
        let line = raw.trim();
        let Some(message) = ptxas_message(line) else {
            if line.contains("bytes stack frame") {
                let name = pending_frame.take().with_context(|| {
                    format!("line {line_no}: a stack-frame line without a function: {line}")
                })?;
                let frame =
                    parse_frame_line(line).with_context(|| format!("line {line_no}: {line}"))?;
                frames.insert(name, frame);
            }
            continue;
        };
        if let Some(rest) = message.strip_prefix("Compiling entry function '") {
            let name = rest
                .split('\'')
                .next()
                .filter(|n| !n.is_empty())
                .with_context(|| format!("line {line_no}: no entry name in: {line}"))?;
            entries.push((name.to_string(), None));
            current_entry = Some(entries.len() - 1);
        } else if message.starts_with("Compiling ") {
            current_entry = None;
        } else if let Some(name) = message.strip_prefix("Function properties for ") {
            pending_frame = Some(name.trim().trim_matches('\'').to_string());
        } else if let Some(rest) = message.strip_prefix("Used ") {
            let used = parse_used_line(rest).with_context(|| format!("line {line_no}: {line}"))?;
            if let Some(idx) = current_entry.take() {
                entries[idx].1 = Some(used);
            }
        }
    }

    entries
        .into_iter()
        .map(|(name, used)| {
            let used = used.with_context(|| {
                format!("the ptxas log has no \"Used ... registers\" line for entry {name}")
            })?;
            let frame = frames.get(&name).with_context(|| {
                format!("the ptxas log has no \"Function properties\" block for entry {name}")
            })?;
            Ok(EntryResources {
                registers: used.registers.with_context(|| {
                    format!("the ptxas log gives no register count for entry {name}")
                })?,
                barriers: used.barriers,
                smem_bytes: used.smem_bytes,
                cumulative_stack_bytes: used.cumulative_stack_bytes,
                stack_frame_bytes: frame.stack_frame_bytes,
                spill_store_bytes: frame.spill_store_bytes,
                spill_load_bytes: frame.spill_load_bytes,
                name,
            })
        })
        .collect()
}

/// One "wgmma.mma_async instructions are serialized" report of ptxas (C7510–C7520, CUDA 12.x
/// and 13.0): ptxas inserted a wait after every `wgmma` of `function`, so its tensor-core
/// pipeline holds one instruction at a time, e.g.
///
/// ```text
/// ptxas info    : (C7513) Potential Performance Loss: wgmma.mma_async instructions are serialized due to non wgmma instructions defining input registers of a wgmma between start and end of the pipeline stage in the function 'k'
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerializedWgmma {
    /// The function ptxas names (an entry, or a helper `.func`).
    pub function: String,
    /// The diagnostic code, e.g. `C7513` (empty if ptxas printed none).
    pub code: String,
    /// Why, in ptxas's words ("non wgmma instructions defining input registers …").
    pub reason: String,
}

/// Every serialized-`wgmma` report in a `ptxas` log, in log order. Lines that mention the
/// serialization but name no function are reported with an empty `function` rather than
/// dropped, so the gate cannot miss one because its wording changed.
pub fn serialized_wgmma(log: &str) -> Vec<SerializedWgmma> {
    const MARK: &str = "wgmma.mma_async instructions are serialized";
    log.lines()
        .filter_map(|raw| {
            let message = ptxas_message(raw.trim())?;
            let at = message.find(MARK)?;
            let code = message
                .strip_prefix('(')
                .and_then(|m| m.split_once(')'))
                .map(|(c, _)| c.trim().to_string())
                .unwrap_or_default();
            let tail = &message[at + MARK.len()..];
            let (reason, function) = match tail.rsplit_once(" in the function '") {
                Some((reason, name)) => (reason, name.trim_end_matches('\'').to_string()),
                None => (tail, String::new()),
            };
            let reason = reason
                .trim()
                .strip_prefix("due to ")
                .unwrap_or(reason.trim());
            Some(SerializedWgmma {
                function,
                code,
                reason: reason.to_string(),
            })
        })
        .collect()
}

/// The "'setmaxnreg' ignored" reports of a `ptxas` log (C7508: an entry reallocates registers
/// but ptxas does not know its register count at entry), as their messages. ptxas names no
/// function in them.
pub fn ignored_setmaxnreg(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|raw| ptxas_message(raw.trim()))
        .filter(|m| m.contains("'setmaxnreg' ignored"))
        .map(str::to_string)
        .collect()
}

/// The message of a `ptxas <severity> : <message>` line, or `None` for other lines.
fn ptxas_message(line: &str) -> Option<&str> {
    let rest = line.strip_prefix("ptxas")?;
    let (_severity, message) = rest.split_once(':')?;
    Some(message.trim())
}

/// Splits "N words" into the number and the words.
fn number_and_unit(item: &str) -> Result<(u64, &str)> {
    let item = item.trim();
    let (number, unit) = item
        .split_once(' ')
        .with_context(|| format!("expected `<number> <unit>`, got `{item}`"))?;
    let number = number
        .parse()
        .with_context(|| format!("`{number}` is not a number (in `{item}`)"))?;
    Ok((number, unit.trim()))
}

/// Parses "16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads".
fn parse_frame_line(line: &str) -> Result<FrameLine> {
    let mut frame = FrameLine::default();
    let mut seen = 0;
    for item in line.split(',') {
        let (n, unit) = number_and_unit(item)?;
        match unit {
            "bytes stack frame" => frame.stack_frame_bytes = n,
            "bytes spill stores" => frame.spill_store_bytes = n,
            "bytes spill loads" => frame.spill_load_bytes = n,
            _ => continue,
        }
        seen += 1;
    }
    if seen != 3 {
        bail!("expected stack frame, spill stores and spill loads");
    }
    Ok(frame)
}

/// Parses what follows "Used ": "8 registers, used 1 barriers, 16 bytes cumulative stack size,
/// 2048 bytes smem, 384 bytes cmem\[0\]".
fn parse_used_line(rest: &str) -> Result<UsedLine> {
    let mut used = UsedLine::default();
    for item in rest.split(',') {
        let item = item.trim();
        let item = item.strip_prefix("used ").unwrap_or(item);
        let (n, unit) = number_and_unit(item)?;
        match unit {
            "registers" | "register" => {
                used.registers = Some(u32::try_from(n).context("register count out of range")?);
            }
            "barriers" | "barrier" => {
                used.barriers = u32::try_from(n).context("barrier count out of range")?
            }
            "bytes smem" => used.smem_bytes = n,
            "bytes cumulative stack size" => used.cumulative_stack_bytes = n,
            // cmem[N], texture and sampler counts, and anything newer: not gated on.
            _ => {}
        }
    }
    Ok(used)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ptxas -arch=sm_90 -v` (CUDA 13.0.88) on two entries, one calling a non-inlined `.func`
    /// with a local array.
    const TWO_ENTRIES_AND_A_HELPER: &str = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'second' for 'sm_90'
ptxas info    : Function properties for second
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 4 registers, used 0 barriers
ptxas info    : Compile time = 10.688 ms
ptxas info    : Compiling entry function 'probe' for 'sm_90'
ptxas info    : Function properties for probe
    16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 1 barriers, 16 bytes cumulative stack size, 2048 bytes smem
ptxas info    : Compile time = 2.185 ms
ptxas info    : Function properties for helper
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
";

    /// `ptxas -arch=sm_90 -v --maxrregcount=24` (CUDA 13.0.88) on a kernel with 80 live floats.
    const SPILLING: &str = "\
ptxas info    : Overriding maximum register limit 256 for 'spilly' with  24 of maxrregcount option
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'spilly' for 'sm_90'
ptxas info    : Function properties for spilly
    488 bytes stack frame, 488 bytes spill stores, 488 bytes spill loads
ptxas info    : Used 24 registers, used 0 barriers, 488 bytes cumulative stack size
ptxas info    : Compile time = 15.440 ms
";

    /// `ptxas -arch=sm_90a -O3 -v` (CUDA 13.0.88) on a kernel that redefines an accumulator
    /// register between two `wgmma` of one group (the C7511 line), plus the C7513 line it printed
    /// for `mxmoe_gemm_nk_nv_m64n128k64wg2s4` at 604f35b, and the C7519 note that is not a
    /// serialization.
    const SERIALIZED: &str = "\
ptxas info    : (C7519) warpgroup.arrive is injected in around line 19 by compiler to allow use of registers in GMMA in function 'serial'
ptxas info    : (C7511) Potential Performance Loss: wgmma.mma_async instructions are serialized due to insufficient register resources for the wgmma pipeline in the function 'serial'
ptxas info    : (C7513) Potential Performance Loss: wgmma.mma_async instructions are serialized due to non wgmma instructions defining input registers of a wgmma between start and end of the pipeline stage in the function 'mxmoe_gemm_nk_nv_m64n128k64wg2s4'
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'serial' for 'sm_90a'
ptxas info    : Function properties for serial
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 38 registers, used 0 barriers
ptxas info    : Compile time = 3.462 ms
";

    #[test]
    fn serialized_wgmma_reports_are_found_with_code_reason_and_function() {
        let found = serialized_wgmma(SERIALIZED);
        assert_eq!(
            found,
            vec![
                SerializedWgmma {
                    function: "serial".into(),
                    code: "C7511".into(),
                    reason: "insufficient register resources for the wgmma pipeline".into(),
                },
                SerializedWgmma {
                    function: "mxmoe_gemm_nk_nv_m64n128k64wg2s4".into(),
                    code: "C7513".into(),
                    reason: "non wgmma instructions defining input registers of a wgmma \
                             between start and end of the pipeline stage"
                        .into(),
                },
            ]
        );
        // The same log still parses for resources.
        assert_eq!(parse(SERIALIZED).unwrap()[0].registers, 38);
    }

    #[test]
    fn a_serialization_without_a_function_name_is_still_reported() {
        let found = serialized_wgmma(
            "ptxas warning : (C7599) Potential Performance Loss: wgmma.mma_async instructions are serialized for a new reason\n",
        );
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].function, "");
        assert_eq!(found[0].code, "C7599");
        assert_eq!(found[0].reason, "for a new reason");
    }

    #[test]
    fn ignored_setmaxnreg_is_found() {
        // ptxas 13.0.88 on an entry with `setmaxnreg` and no launch bounds.
        let log = "ptxas info    : (C7508) Potential Performance Loss: 'setmaxnreg' ignored; unable to determine register count at entry.\n\
                   ptxas info    : 0 bytes gmem\n";
        let found = ignored_setmaxnreg(log);
        assert_eq!(found.len(), 1);
        assert!(found[0].starts_with("(C7508)"));
        assert!(ignored_setmaxnreg(SERIALIZED).is_empty());
    }

    #[test]
    fn logs_without_serialization_report_nothing() {
        assert!(serialized_wgmma(TWO_ENTRIES_AND_A_HELPER).is_empty());
        assert!(serialized_wgmma(SPILLING).is_empty());
    }

    #[test]
    fn entries_are_parsed_and_helpers_left_out() {
        let entries = parse(TWO_ENTRIES_AND_A_HELPER).unwrap();
        assert_eq!(
            entries,
            vec![
                EntryResources {
                    name: "second".into(),
                    registers: 4,
                    ..Default::default()
                },
                EntryResources {
                    name: "probe".into(),
                    registers: 8,
                    barriers: 1,
                    smem_bytes: 2048,
                    stack_frame_bytes: 16,
                    cumulative_stack_bytes: 16,
                    ..Default::default()
                },
            ]
        );
        assert!(!entries[0].uses_local_memory());
        assert!(entries[1].uses_local_memory());
    }

    #[test]
    fn spills_are_reported() {
        let entries = parse(SPILLING).unwrap();
        assert_eq!(entries.len(), 1);
        let e = &entries[0];
        assert_eq!((e.name.as_str(), e.registers), ("spilly", 24));
        assert_eq!(
            (e.stack_frame_bytes, e.spill_store_bytes, e.spill_load_bytes),
            (488, 488, 488)
        );
        assert!(e.uses_local_memory());
    }

    #[test]
    fn older_ptxas_fields_such_as_cmem_are_ignored() {
        // CUDA 12 prints constant-bank usage and may say "Used 1 register".
        let log = "\
ptxas info    : Compiling entry function 'k' for 'sm_90'
ptxas info    : Function properties for k
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 1 register, 384 bytes cmem[0], 8 bytes cmem[2]
";
        let entries = parse(log).unwrap();
        assert_eq!(
            entries,
            vec![EntryResources {
                name: "k".into(),
                registers: 1,
                ..Default::default()
            }]
        );
    }

    #[test]
    fn properties_before_compiling_line_still_match_by_name() {
        let log = "\
ptxas info    : Function properties for k
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Compiling entry function 'k' for 'sm_90'
ptxas info    : Used 30 registers, used 0 barriers, 8 bytes cumulative stack size
";
        let e = &parse(log).unwrap()[0];
        assert_eq!(
            (e.registers, e.stack_frame_bytes, e.spill_store_bytes),
            (30, 8, 4)
        );
    }

    #[test]
    fn a_used_line_after_a_helper_does_not_overwrite_the_entry() {
        let log = "\
ptxas info    : Compiling entry function 'k' for 'sm_90'
ptxas info    : Function properties for k
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 0 barriers
ptxas info    : Compiling function 'helper' for 'sm_90'
ptxas info    : Used 99 registers
";
        assert_eq!(parse(log).unwrap()[0].registers, 10);
    }

    /// Asserts that `log` does not parse and that the error mentions `needle`.
    #[track_caller]
    fn assert_rejected(log: &str, needle: &str) {
        let err = parse(log).unwrap_err();
        assert!(err.to_string().contains(needle), "{err}");
    }

    #[test]
    fn an_entry_without_its_used_line_is_an_error() {
        let log = "\
ptxas info    : Compiling entry function 'k' for 'sm_90'
ptxas info    : Function properties for k
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
";
        assert_rejected(log, "entry k");
    }

    #[test]
    fn an_entry_without_its_properties_is_an_error() {
        let log = "\
ptxas info    : Compiling entry function 'k' for 'sm_90'
ptxas info    : Used 10 registers, used 0 barriers
";
        assert_rejected(log, "Function properties");
    }

    #[test]
    fn a_garbled_number_is_an_error() {
        let log = "\
ptxas info    : Compiling entry function 'k' for 'sm_90'
ptxas info    : Used many registers
";
        assert!(parse(log).is_err());
    }

    #[test]
    fn an_empty_log_has_no_entries() {
        assert!(parse("ptxas info    : 0 bytes gmem\n").unwrap().is_empty());
    }
}
