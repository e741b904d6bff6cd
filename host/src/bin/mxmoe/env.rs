//! Facts about where a run happened, for the headers of `smoke` and `bench` output: the device
//! (through [`mxmoe::device`]), the driver, the source commit and the date.

use std::process::Command;

use mxmoe::Runtime;
use mxmoe::device::{device_count, driver_present};

/// Why no device could be used, when that is a normal outcome (no driver, no device).
#[derive(Clone, Debug)]
pub enum NoGpu {
    /// libcuda could not be loaded.
    NoDriver,
    /// The driver loaded and reports fewer devices than needed.
    NoDevice {
        /// The requested ordinal.
        ordinal: usize,
        /// Devices the driver reports.
        count: usize,
    },
}

impl std::fmt::Display for NoGpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoGpu::NoDriver => write!(f, "no CUDA driver found"),
            NoGpu::NoDevice { count: 0, .. } => write!(f, "no CUDA device found"),
            NoGpu::NoDevice { ordinal, count } => {
                write!(f, "no CUDA device {ordinal} (the driver reports {count})")
            }
        }
    }
}

/// Opens the device to run on. With `requested = Some(n)` (the user named `--device n`), a
/// missing driver or device is an error: the user asked for that device, and falling back to the
/// CPU would hide it. With `None`, device 0 is used when there is one; a missing driver or device
/// is `Ok(Err(NoGpu))` (the caller falls back to CPU-only work and says so). A device that exists
/// but fails to open is an error either way.
pub fn open_gpu(requested: Option<usize>) -> anyhow::Result<Result<Runtime, NoGpu>> {
    use anyhow::Context as _;
    let ordinal = requested.unwrap_or(0);
    let missing = if !driver_present() {
        Some(NoGpu::NoDriver)
    } else {
        let count = device_count().context("could not count CUDA devices")?;
        (ordinal >= count).then_some(NoGpu::NoDevice { ordinal, count })
    };
    match (missing, requested) {
        (Some(no), None) => Ok(Err(no)),
        (Some(no), Some(n)) => {
            let error = match no {
                NoGpu::NoDriver => mxmoe::Error::NoDriver,
                NoGpu::NoDevice { ordinal, count } => mxmoe::Error::NoDevice { ordinal, count },
            };
            Err(error).with_context(|| {
                format!("--device {n} was given, but that device cannot be used (leave --device out to fall back to the CPU)")
            })
        }
        (None, _) => {
            let gpu = Runtime::open(ordinal)
                .with_context(|| format!("could not open CUDA device {ordinal}"))?;
            Ok(Ok(gpu))
        }
    }
}

/// The CUDA driver API version (`cuDriverGetVersion`) as "major.minor", if the driver is present.
pub fn cuda_driver_version() -> Option<String> {
    if !driver_present() {
        return None;
    }
    let mut version: std::ffi::c_int = 0;
    // SAFETY: the driver library is loadable (checked above), so cudarc's dynamic loader resolves
    // the symbol instead of panicking; `cuDriverGetVersion` needs no `cuInit` and only writes one
    // `int` through the pointer, which points at a live local.
    let status = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) };
    (status == cudarc::driver::sys::CUresult::CUDA_SUCCESS)
        .then(|| format!("{}.{}", version / 1000, (version % 1000) / 10))
}

/// The kernel driver's version from `/proc/driver/nvidia/version` (Linux), e.g. "580.159.04":
/// the first word of the first line that looks like a dotted version number (the line reads
/// "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  …" or, for the open modules,
/// "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  …").
pub fn kernel_driver_version() -> Option<String> {
    let text = std::fs::read_to_string("/proc/driver/nvidia/version").ok()?;
    first_version_word(text.lines().next()?)
}

/// The first whitespace-separated word made of digits and at least one dot, with no empty parts.
fn first_version_word(line: &str) -> Option<String> {
    line.split_whitespace()
        .find(|w| {
            w.contains('.')
                && w.split('.')
                    .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(str::to_owned)
}

/// "550.54.15 (CUDA 12.4)", or whichever part is known, or "unknown".
pub fn driver_description() -> String {
    match (kernel_driver_version(), cuda_driver_version()) {
        (Some(k), Some(c)) => format!("{k} (CUDA {c})"),
        (None, Some(c)) => format!("CUDA {c}"),
        (Some(k), None) => k,
        (None, None) => "unknown".into(),
    }
}

/// The source commit: the `MXMOE_COMMIT` environment variable when set (device bundles set it
/// to the commit the binaries were built from: a checkout on the GPU machine may be stale),
/// else `git rev-parse --short HEAD` (with "+dirty" for local changes) when run inside a
/// checkout, else "unknown".
pub fn commit() -> String {
    if let Some(c) = std::env::var("MXMOE_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
    {
        return c.trim().to_owned();
    }
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match git(&["rev-parse", "--short", "HEAD"]).filter(|h| !h.is_empty()) {
        Some(head) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty { format!("{head}+dirty") } else { head }
        }
        None => "unknown".into(),
    }
}

/// The current UTC time as "YYYY-MM-DD HH:MM UTC".
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Bytes as MiB with one decimal.
pub fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

#[cfg(test)]
mod tests {
    use super::{civil_from_days, first_version_word};

    #[test]
    fn driver_version_lines() {
        let proprietary = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024";
        let open = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build  (dvs-builder@U22-I3-AM02-24-3)";
        assert_eq!(
            first_version_word(proprietary).as_deref(),
            Some("550.54.15")
        );
        assert_eq!(first_version_word(open).as_deref(), Some("580.159.04"));
        assert_eq!(first_version_word("no version here: x86_64 ."), None);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
    }
}
