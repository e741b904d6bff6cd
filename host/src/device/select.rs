//! Which PTX module a device loads: a pure function of its compute capability and the
//! `MXMOE_MODULE` override, so the rule is tested without a GPU.
//!
//! | compute capability | `MXMOE_MODULE` unset | `portable` | `hopper` |
//! |---|---|---|---|
//! | 9.0 (H100, H200) | Hopper (`sm_90a`) | portable | Hopper |
//! | ≥ 8.0, other | portable (`sm_80`: its SASS on 8.x, else JIT-compiled by the driver) | portable | [`Error::UnsupportedGpu`] |
//! | < 8.0 | [`Error::UnsupportedGpu`] | [`Error::UnsupportedGpu`] | [`Error::UnsupportedGpu`] |
//!
//! Any other value of `MXMOE_MODULE` is an [`Error::InvalidArgument`] naming the variable.

use kernels_gpu::shared::module::PtxModule;

use crate::error::{Error, Result};

/// The environment variable that overrides the module choice: `portable` or `hopper`.
pub const MODULE_ENV: &str = "MXMOE_MODULE";

/// Why a module was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelectionReason {
    /// By the device's compute capability (9.0 → Hopper, else portable).
    ComputeCapability,
    /// Asked for by `MXMOE_MODULE`.
    Environment,
    /// Asked for by the caller ([`Gpu::open_with_module`](super::Gpu::open_with_module)).
    Caller,
}

/// The module a device loads and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModuleSelection {
    /// The module.
    pub module: PtxModule,
    /// Why it was chosen.
    pub reason: SelectionReason,
    /// The device's compute capability `(major, minor)`.
    pub capability: (i32, i32),
}

impl std::fmt::Display for ModuleSelection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (major, minor) = self.capability;
        let why = match self.reason {
            SelectionReason::ComputeCapability => {
                format!("chosen for compute capability {major}.{minor}")
            }
            SelectionReason::Environment => format!("{MODULE_ENV}={}", self.module.name()),
            SelectionReason::Caller => "asked for by the caller".to_string(),
        };
        write!(f, "{} ({}; {why})", self.module.name(), self.module.arch())
    }
}

/// The module device `gpu` with compute `capability` loads, given the value of `MXMOE_MODULE`
/// (`None` or empty: not set).
pub fn select_module(
    gpu: &str,
    capability: (i32, i32),
    env: Option<&str>,
) -> Result<ModuleSelection> {
    let requested = match env.map(str::trim).filter(|v| !v.is_empty()) {
        None => None,
        Some(v) => Some(
            PtxModule::from_name(v).ok_or_else(|| Error::InvalidArgument {
                what: MODULE_ENV,
                detail: format!(
                    "{v:?} is not a module: use {} or {}",
                    PtxModule::Portable.name(),
                    PtxModule::Hopper.name()
                ),
            })?,
        ),
    };
    match requested {
        None => module_for(gpu, capability, SelectionReason::ComputeCapability),
        Some(m) => check_module(gpu, capability, m, SelectionReason::Environment),
    }
}

/// The module chosen by compute capability alone.
fn module_for(
    gpu: &str,
    capability: (i32, i32),
    reason: SelectionReason,
) -> Result<ModuleSelection> {
    let module = if capability == (9, 0) {
        PtxModule::Hopper
    } else {
        PtxModule::Portable
    };
    check_module(gpu, capability, module, reason)
}

/// `module` if a device of `capability` can load it, else [`Error::UnsupportedGpu`].
pub fn check_module(
    gpu: &str,
    capability: (i32, i32),
    module: PtxModule,
    reason: SelectionReason,
) -> Result<ModuleSelection> {
    let unsupported = |detail: String| Error::UnsupportedGpu {
        gpu: gpu.to_string(),
        capability,
        detail,
    };
    if capability.0 < 8 {
        return Err(unsupported(
            "mxmoe needs compute capability 8.0 or later (Ampere: bf16 mma.sync, cp.async, \
             ldmatrix)"
                .into(),
        ));
    }
    if module == PtxModule::Hopper && capability != (9, 0) {
        return Err(unsupported(format!(
            "the hopper module ({}) loads on compute capability 9.0 only (H100, H200); use \
             {MODULE_ENV}=portable or leave it unset",
            module.arch()
        )));
    }
    Ok(ModuleSelection {
        module,
        reason,
        capability,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const H100: &str = "NVIDIA H100 80GB HBM3";

    fn pick(cc: (i32, i32), env: Option<&str>) -> Result<ModuleSelection> {
        select_module("some GPU", cc, env)
    }

    #[test]
    fn capability_picks_the_module() {
        let s = select_module(H100, (9, 0), None).unwrap();
        assert_eq!(s.module, PtxModule::Hopper);
        assert_eq!(s.reason, SelectionReason::ComputeCapability);
        assert_eq!(s.capability, (9, 0));
        for cc in [
            (8, 0),
            (8, 6),
            (8, 7),
            (8, 9),
            (10, 0),
            (10, 3),
            (12, 0),
            (12, 1),
        ] {
            let s = pick(cc, None).unwrap();
            assert_eq!(s.module, PtxModule::Portable, "{cc:?}");
            assert_eq!(s.reason, SelectionReason::ComputeCapability);
        }
        // An empty or blank variable is "not set".
        assert_eq!(pick((9, 0), Some("")).unwrap().module, PtxModule::Hopper);
        assert_eq!(pick((8, 6), Some(" ")).unwrap().module, PtxModule::Portable);
    }

    #[test]
    fn old_gpus_are_a_typed_error_naming_the_gpu_and_capability() {
        for (cc, env) in [
            ((7, 5), None),
            ((7, 0), Some("portable")),
            ((6, 1), Some("hopper")),
        ] {
            match select_module("Tesla T4", cc, env) {
                Err(e @ Error::UnsupportedGpu { .. }) => {
                    let text = e.to_string();
                    assert!(
                        text.contains("Tesla T4")
                            && text.contains(&format!("{}.{}", cc.0, cc.1))
                            && text.contains("8.0"),
                        "{text}"
                    );
                }
                other => panic!("{cc:?} {env:?}: expected UnsupportedGpu, got {other:?}"),
            }
        }
    }

    #[test]
    fn the_environment_overrides_within_what_the_device_can_load() {
        let s = select_module(H100, (9, 0), Some("portable")).unwrap();
        assert_eq!(
            (s.module, s.reason),
            (PtxModule::Portable, SelectionReason::Environment)
        );
        assert_eq!(s.to_string(), "portable (sm_80; MXMOE_MODULE=portable)");
        let s = select_module(H100, (9, 0), Some("hopper")).unwrap();
        assert_eq!(
            (s.module, s.reason),
            (PtxModule::Hopper, SelectionReason::Environment)
        );
        assert_eq!(
            pick((8, 0), Some("portable")).unwrap().module,
            PtxModule::Portable
        );
        for cc in [(8, 0), (8, 9), (10, 0), (12, 0)] {
            match select_module("NVIDIA A100-SXM4-80GB", cc, Some("hopper")) {
                Err(e @ Error::UnsupportedGpu { .. }) => {
                    let text = e.to_string();
                    assert!(
                        text.contains("A100") && text.contains("9.0") && text.contains(MODULE_ENV),
                        "{text}"
                    );
                }
                other => panic!("{cc:?}: expected UnsupportedGpu, got {other:?}"),
            }
        }
    }

    #[test]
    fn an_unknown_module_name_is_an_invalid_argument() {
        for v in ["Hopper", "sm_80", "fast"] {
            match pick((9, 0), Some(v)) {
                Err(Error::InvalidArgument { what, detail }) => {
                    assert_eq!(what, MODULE_ENV);
                    assert!(
                        detail.contains("portable") && detail.contains("hopper"),
                        "{detail}"
                    );
                }
                other => panic!("{v}: expected InvalidArgument, got {other:?}"),
            }
        }
    }

    #[test]
    fn the_reason_is_displayed() {
        let s = select_module(H100, (9, 0), None).unwrap();
        assert_eq!(
            s.to_string(),
            "hopper (sm_90a; chosen for compute capability 9.0)"
        );
        let s = check_module(H100, (9, 0), PtxModule::Portable, SelectionReason::Caller).unwrap();
        assert_eq!(s.to_string(), "portable (sm_80; asked for by the caller)");
    }
}
