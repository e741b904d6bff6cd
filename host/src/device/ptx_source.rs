//! Which PTX text [`Gpu::open`](super::Gpu::open) loads.
//!
//! Normally the embedded text of the module the device selected ([`super::select`]): [`PTX`]
//! (Hopper, `sm_90a`) or [`PTX_PORTABLE`] (`sm_80`). In builds with the `ptx-override` cargo feature (off
//! by default; `cargo xtask device-bundle` turns it on for the bundled test binaries so that
//! `cargo xtask mutants` can run them against deliberately broken modules without relinking):
//!
//! - `MXMOE_PTX_OVERRIDE=<file>`: load that PTX file instead of the selected module's text. A
//!   file that cannot be read, that is not PTX, or whose `.target` is not the selected module's
//!   (a Hopper-built mutant on a device that selected the portable module) is an error of
//!   `Gpu::open` (never a silent fallback to the embedded module).
//! - `MXMOE_EXPECT_PTX_FINGERPRINT=<16 hex digits>`: the loaded text (override or embedded) must
//!   have this [`fingerprint`], else `Gpu::open` fails; a runner uses it to prove which module
//!   its suites ran against.
//!
//! Without the feature both variables are ignored. Every override error names
//! `MXMOE_PTX_OVERRIDE` or `MXMOE_EXPECT_PTX_FINGERPRINT`, so a runner can tell a module that did
//! not load from a suite that failed its assertions.
//!
//! An embedded text may be loaded as the SASS assembled from it at build time ([`super::sass`]);
//! an override file never is. Its [`fingerprint`] is the text's either way.

use std::path::PathBuf;
use std::sync::OnceLock;

use kernels_gpu::shared::module::PtxModule;

use super::{PTX, PTX_PORTABLE};
#[cfg(any(test, feature = "ptx-override"))]
use crate::error::Error;
use crate::error::Result;

/// The environment variable naming a PTX file to load instead of the embedded module (only in
/// builds with the `ptx-override` feature).
pub const PTX_OVERRIDE_ENV: &str = "MXMOE_PTX_OVERRIDE";

/// The environment variable holding the [`fingerprint`] (16 hex digits) the loaded PTX must have
/// (only in builds with the `ptx-override` feature).
pub const EXPECT_FINGERPRINT_ENV: &str = "MXMOE_EXPECT_PTX_FINGERPRINT";

/// FNV-1a (64-bit) of the PTX text's bytes: a cheap identity for "which module is this".
/// `cargo xtask mutants` computes the same function for every module it builds.
pub fn fingerprint(text: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    text.bytes()
        .fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

/// The PTX text a device loads, with where it came from.
pub(crate) struct ModuleText {
    /// The text handed to the driver.
    pub(crate) text: &'static str,
    /// The override file, or `None` for the embedded module.
    pub(crate) path: Option<PathBuf>,
    fingerprint: OnceLock<u64>,
}

impl ModuleText {
    fn new(text: &'static str, path: Option<PathBuf>) -> Self {
        Self {
            text,
            path,
            fingerprint: OnceLock::new(),
        }
    }

    /// [`fingerprint`] of the text, computed once.
    pub(crate) fn fingerprint(&self) -> u64 {
        *self.fingerprint.get_or_init(|| fingerprint(self.text))
    }

    /// The operation named in a driver error while loading this text as `module`.
    pub(crate) fn load_op(&self, module: PtxModule) -> String {
        match &self.path {
            None => format!(
                "loading the mxmoe {} PTX module ({})",
                module.name(),
                module.arch()
            ),
            Some(p) => format!(
                "loading the PTX override {} ({PTX_OVERRIDE_ENV})",
                p.display()
            ),
        }
    }
}

/// The embedded text of `module`.
fn embedded(module: PtxModule) -> &'static ModuleText {
    static HOPPER: OnceLock<ModuleText> = OnceLock::new();
    static PORTABLE: OnceLock<ModuleText> = OnceLock::new();
    match module {
        PtxModule::Hopper => HOPPER.get_or_init(|| ModuleText::new(PTX, None)),
        PtxModule::Portable => PORTABLE.get_or_init(|| ModuleText::new(PTX_PORTABLE, None)),
    }
}

/// The text a device that selected `module` loads.
#[cfg(not(feature = "ptx-override"))]
pub(crate) fn module_text(module: PtxModule) -> Result<&'static ModuleText> {
    Ok(embedded(module))
}

/// The text a device that selected `module` loads: the override file when
/// `MXMOE_PTX_OVERRIDE` names one (read once per process; an error is not kept, so every
/// `Gpu::open` reports it again), else the embedded module; then the expected fingerprint.
#[cfg(feature = "ptx-override")]
pub(crate) fn module_text(module: PtxModule) -> Result<&'static ModuleText> {
    static OVERRIDE: OnceLock<Option<ModuleText>> = OnceLock::new();
    let expect = match std::env::var(EXPECT_FINGERPRINT_ENV) {
        Ok(v) => Some(v),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(v)) => {
            return Err(Error::InvalidArgument {
                what: EXPECT_FINGERPRINT_ENV,
                detail: format!("{v:?} is not 16 hex digits"),
            });
        }
    };
    let over = match OVERRIDE.get() {
        Some(o) => o.as_ref(),
        None => {
            let resolved = match std::env::var_os(PTX_OVERRIDE_ENV).filter(|p| !p.is_empty()) {
                None => None,
                Some(p) => {
                    let path = PathBuf::from(p);
                    let text = read_override(&path)?;
                    // Leaked once per process: the module text lives as long as the process.
                    Some(ModuleText::new(
                        Box::leak(text.into_boxed_str()),
                        Some(path),
                    ))
                }
            };
            OVERRIDE.get_or_init(|| resolved).as_ref()
        }
    };
    let m = match over {
        Some(m) => {
            check_target(m, module)?;
            m
        }
        None => embedded(module),
    };
    check_expected(m, expect.as_deref())?;
    Ok(m)
}

/// The `.target` of a PTX text (its first architecture), if it declares one.
#[cfg(any(test, feature = "ptx-override"))]
fn ptx_target(text: &str) -> Option<&str> {
    text.lines().find_map(|l| {
        let rest = l.trim_start().strip_prefix(".target")?;
        rest.split([' ', '\t', ',']).find(|w| !w.is_empty())
    })
}

/// Fails unless the override `m` is built for `module`'s architecture.
#[cfg(any(test, feature = "ptx-override"))]
fn check_target(m: &ModuleText, module: PtxModule) -> Result<()> {
    let target = ptx_target(m.text);
    if target == Some(module.arch()) {
        return Ok(());
    }
    let path = m
        .path
        .as_ref()
        .map_or_else(String::new, |p| p.display().to_string());
    Err(Error::InvalidArgument {
        what: PTX_OVERRIDE_ENV,
        detail: format!(
            "{path} targets {}, but the device selected the {} module ({}); set MXMOE_MODULE \
             to match or build the override for {}",
            target.unwrap_or("no architecture"),
            module.name(),
            module.arch(),
            module.arch()
        ),
    })
}

/// Reads an override file; it must be a PTX module (a `.version` directive).
#[cfg(any(test, feature = "ptx-override"))]
fn read_override(path: &std::path::Path) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::InvalidArgument {
        what: PTX_OVERRIDE_ENV,
        detail: format!("cannot read the PTX override {}: {e}", path.display()),
    })?;
    if !text.lines().any(|l| l.trim_start().starts_with(".version")) {
        return Err(Error::InvalidArgument {
            what: PTX_OVERRIDE_ENV,
            detail: format!(
                "{} is not a PTX module (no `.version` directive)",
                path.display()
            ),
        });
    }
    Ok(text)
}

/// Fails unless `expect` (16 hex digits, optional `0x`) is `None` or `m`'s fingerprint.
#[cfg(any(test, feature = "ptx-override"))]
fn check_expected(m: &ModuleText, expect: Option<&str>) -> Result<()> {
    let Some(want) = expect else {
        return Ok(());
    };
    let digits = want.trim();
    let digits = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
        .unwrap_or(digits);
    let want = u64::from_str_radix(digits, 16).map_err(|e| Error::InvalidArgument {
        what: EXPECT_FINGERPRINT_ENV,
        detail: format!("{want:?} is not 16 hex digits ({e})"),
    })?;
    let got = m.fingerprint();
    if got != want {
        let source = match &m.path {
            None => format!("the embedded module ({PTX_OVERRIDE_ENV} unset)"),
            Some(p) => format!("the PTX override {}", p.display()),
        };
        return Err(Error::InvalidArgument {
            what: EXPECT_FINGERPRINT_ENV,
            detail: format!("{source} has fingerprint {got:016x}, expected {want:016x}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_fnv1a_64() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fingerprint(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fingerprint("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fingerprint("foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn an_expected_fingerprint_must_match() {
        let m = ModuleText::new(".version 8.0\n", None);
        let fp = format!("{:016x}", fingerprint(".version 8.0\n"));
        assert!(check_expected(&m, None).is_ok());
        assert!(check_expected(&m, Some(&fp)).is_ok());
        assert!(check_expected(&m, Some(&format!("0x{fp}\n"))).is_ok());
        let err = check_expected(&m, Some("0123456789abcdef"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(EXPECT_FINGERPRINT_ENV) && err.contains("embedded"),
            "{err}"
        );
        let err = check_expected(&m, Some("not hex")).unwrap_err().to_string();
        assert!(err.contains(EXPECT_FINGERPRINT_ENV), "{err}");
    }

    #[test]
    fn an_override_must_target_the_selected_module() {
        let hopper = ".version 8.0\n.target sm_90a\n.address_size 64\n";
        assert_eq!(ptx_target(hopper), Some("sm_90a"));
        assert_eq!(ptx_target(".target sm_80, debug\n"), Some("sm_80"));
        assert_eq!(ptx_target(".version 8.0\n"), None);
        let m = ModuleText::new(hopper, Some("mutant.ptx".into()));
        assert!(check_target(&m, PtxModule::Hopper).is_ok());
        let err = check_target(&m, PtxModule::Portable)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(PTX_OVERRIDE_ENV) && err.contains("mutant.ptx") && err.contains("sm_80"),
            "{err}"
        );
        // The embedded texts are the two modules.
        assert_eq!(ptx_target(embedded(PtxModule::Hopper).text), Some("sm_90a"));
        assert_eq!(
            ptx_target(embedded(PtxModule::Portable).text),
            Some("sm_80")
        );
    }

    #[test]
    fn an_unreadable_or_non_ptx_override_is_an_error() {
        let dir = std::env::temp_dir().join(format!("mxmoe-ptx-source-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.ptx");
        let err = read_override(&missing).unwrap_err().to_string();
        assert!(
            err.contains(PTX_OVERRIDE_ENV) && err.contains("missing.ptx"),
            "{err}"
        );
        let not_ptx = dir.join("not.ptx");
        std::fs::write(&not_ptx, "hello\n").unwrap();
        let err = read_override(&not_ptx).unwrap_err().to_string();
        assert!(err.contains("not a PTX module"), "{err}");
        let ok = dir.join("ok.ptx");
        std::fs::write(&ok, "//\n.version 8.0\n.target sm_90a\n").unwrap();
        assert!(read_override(&ok).unwrap().contains(".target sm_90a"));
        let m = ModuleText::new(".version 8.0\n", Some(ok.clone()));
        assert!(m.load_op(PtxModule::Hopper).contains(PTX_OVERRIDE_ENV));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
