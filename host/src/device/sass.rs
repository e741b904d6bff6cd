//! The SASS embedded next to each PTX module, and when a device loads it.
//!
//! `host/build.rs` assembles each module's PTX with `ptxas` for the module's own arch (`sm_90a`,
//! `sm_80`) when a `ptxas` is present at build time, and embeds the cubin ([`super::CUBIN`],
//! [`super::CUBIN_PORTABLE`]; empty without SASS). [`Gpu::open`](super::Gpu::open) loads the
//! cubin instead of the PTX text when [`sass_choice`] allows it: the text is the embedded module
//! (not a `MXMOE_PTX_OVERRIDE` file), the cubin is not empty, and its arch runs on the device
//! ([`SassArch::runs_on`]). Then the driver has nothing to JIT-compile. A cubin the driver
//! rejects (a driver older than the `ptxas` that made it) falls back to the PTX text; the result
//! is recorded as a [`ModuleCode`].
//!
//! | module | SASS | loaded on |
//! |---|---|---|
//! | hopper | `sm_90a` | compute capability 9.0 only (arch-specific code) |
//! | portable | `sm_80` | 8.0, 8.6, 8.7, 8.9 (same major, minor at least 0); 9.0 and later JIT the PTX |

use std::fmt;

use kernels_gpu::shared::module::PtxModule;

use super::{CUBIN, CUBIN_ARCH, CUBIN_PORTABLE, CUBIN_PORTABLE_ARCH};

/// A SASS architecture, `sm_<major><minor>` with an optional `a` (architecture-specific
/// features, such as `wgmma` in `sm_90a`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SassArch {
    major: i32,
    minor: i32,
    specific: bool,
}

impl SassArch {
    /// Parses `sm_90a`, `sm_80`, `sm_100`, …: the last digit is the minor version, the ones
    /// before it the major. `None` for anything else (the family-specific `f` suffix included),
    /// which never loads.
    pub fn parse(arch: &str) -> Option<SassArch> {
        let rest = arch.strip_prefix("sm_")?;
        let (digits, specific) = match rest.strip_suffix('a') {
            Some(d) => (d, true),
            None => (rest, false),
        };
        if digits.len() < 2 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let (major, minor) = digits.split_at(digits.len() - 1);
        Some(SassArch {
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
            specific,
        })
    }

    /// The compute capability `(major, minor)` the SASS was compiled for.
    pub fn capability(self) -> (i32, i32) {
        (self.major, self.minor)
    }

    /// Whether the SASS uses architecture-specific features (`sm_90a`).
    pub fn arch_specific(self) -> bool {
        self.specific
    }

    /// Whether a device of `capability` runs this SASS (CUDA C Programming Guide, "Binary
    /// Compatibility"): arch-specific SASS only on exactly its compute capability, other SASS on
    /// the same major version with the same or a higher minor one (`sm_80` on 8.0, 8.6, 8.9; not
    /// on 9.0).
    pub fn runs_on(self, capability: (i32, i32)) -> bool {
        if self.specific {
            capability == (self.major, self.minor)
        } else {
            capability.0 == self.major && capability.1 >= self.minor
        }
    }
}

impl fmt::Display for SassArch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let suffix = if self.specific { "a" } else { "" };
        write!(f, "sm_{}{}{suffix}", self.major, self.minor)
    }
}

/// The embedded cubin of `module` ([`super::CUBIN`] or [`super::CUBIN_PORTABLE`]); empty when
/// the library was built without SASS.
pub fn embedded_cubin(module: PtxModule) -> &'static [u8] {
    match module {
        PtxModule::Hopper => CUBIN,
        PtxModule::Portable => CUBIN_PORTABLE,
    }
}

/// The architecture of `module`'s embedded cubin, or `None` when none is embedded.
pub fn cubin_arch(module: PtxModule) -> Option<SassArch> {
    let (cubin, arch) = match module {
        PtxModule::Hopper => (CUBIN, CUBIN_ARCH),
        PtxModule::Portable => (CUBIN_PORTABLE, CUBIN_PORTABLE_ARCH),
    };
    if cubin.is_empty() {
        None
    } else {
        SassArch::parse(arch)
    }
}

/// Which code of its module a [`Gpu`](super::Gpu) loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModuleCode {
    /// The cubin that `ptxas` assembled at build time from the embedded PTX text: nothing was
    /// JIT-compiled.
    Sass {
        /// The cubin's architecture.
        arch: SassArch,
    },
    /// The PTX text, JIT-compiled by the driver (kept in its compute cache for later opens).
    Ptx {
        /// Why not SASS.
        reason: JitReason,
    },
}

/// Why a device loaded the PTX text rather than SASS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JitReason {
    /// The text is a `MXMOE_PTX_OVERRIDE` file (`ptx-override` builds), which has no SASS.
    Override,
    /// The library was built without SASS for the module (no `ptxas` at build time,
    /// `MXMOE_SASS=0`, or ptxas failed; the build said which).
    NotEmbedded,
    /// The embedded SASS does not run on the device (the portable module's `sm_80` SASS on a
    /// 9.0 or later device).
    OtherArchitecture {
        /// The embedded SASS's architecture.
        sass: SassArch,
        /// The device's compute capability.
        capability: (i32, i32),
    },
    /// The driver refused the SASS (for example a driver older than the `ptxas` that made it).
    SassRejected {
        /// The SASS's architecture.
        sass: SassArch,
        /// The driver's error.
        error: String,
    },
}

impl fmt::Display for ModuleCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModuleCode::Sass { arch } => write!(f, "SASS for {arch} (assembled at build time)"),
            ModuleCode::Ptx { reason } => {
                f.write_str("PTX, JIT-compiled by the driver (")?;
                match reason {
                    JitReason::Override => f.write_str("a PTX override has no SASS")?,
                    JitReason::NotEmbedded => f.write_str("built without SASS")?,
                    JitReason::OtherArchitecture { sass, capability } => write!(
                        f,
                        "the embedded {sass} SASS does not run on compute capability {}.{}",
                        capability.0, capability.1
                    )?,
                    JitReason::SassRejected { sass, error } => {
                        write!(f, "the driver rejected the {sass} SASS: {error}")?
                    }
                }
                f.write_str(")")
            }
        }
    }
}

/// Whether a device of `capability` tries the cubin: `Ok(arch)` when the text is not an
/// `overridden` one, a cubin is embedded (`arch` is its architecture) and it runs on the device;
/// else why the PTX is loaded.
pub fn sass_choice(
    arch: Option<SassArch>,
    overridden: bool,
    capability: (i32, i32),
) -> Result<SassArch, JitReason> {
    if overridden {
        return Err(JitReason::Override);
    }
    let Some(sass) = arch else {
        return Err(JitReason::NotEmbedded);
    };
    if sass.runs_on(capability) {
        Ok(sass)
    } else {
        Err(JitReason::OtherArchitecture { sass, capability })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arch(s: &str) -> SassArch {
        SassArch::parse(s).unwrap()
    }

    #[test]
    fn arch_names_parse_and_print_back() {
        for name in [
            "sm_80", "sm_86", "sm_90", "sm_90a", "sm_100", "sm_100a", "sm_120",
        ] {
            assert_eq!(arch(name).to_string(), name);
        }
        assert_eq!(arch("sm_90a").capability(), (9, 0));
        assert!(arch("sm_90a").arch_specific());
        assert_eq!(arch("sm_120").capability(), (12, 0));
        assert!(!arch("sm_120").arch_specific());
        for bad in [
            "",
            "sm_",
            "sm_8",
            "sm_9x",
            "sm_100f",
            "compute_90a",
            "sm_90aa",
            "90",
        ] {
            assert_eq!(SassArch::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_hopper_sass_runs_on_9_0_only() {
        let hopper = arch(PtxModule::Hopper.arch());
        assert!(hopper.runs_on((9, 0)));
        for cc in [(8, 0), (8, 6), (8, 9), (9, 1), (10, 0), (12, 0)] {
            assert!(!hopper.runs_on(cc), "{cc:?}");
        }
    }

    #[test]
    fn the_portable_sass_runs_on_every_8_x_and_nothing_later() {
        let portable = arch(PtxModule::Portable.arch());
        for cc in [(8, 0), (8, 6), (8, 7), (8, 9)] {
            assert!(portable.runs_on(cc), "{cc:?}");
        }
        for cc in [(7, 5), (9, 0), (10, 0), (12, 0)] {
            assert!(!portable.runs_on(cc), "{cc:?}");
        }
        // Plain SASS runs on later minors of its major only.
        assert!(arch("sm_86").runs_on((8, 9)));
        assert!(!arch("sm_86").runs_on((8, 0)));
    }

    #[test]
    fn the_choice_needs_the_embedded_text_a_cubin_and_a_matching_device() {
        let hopper = Some(arch("sm_90a"));
        let portable = Some(arch("sm_80"));
        assert_eq!(sass_choice(hopper, false, (9, 0)), Ok(arch("sm_90a")));
        assert_eq!(sass_choice(portable, false, (8, 6)), Ok(arch("sm_80")));
        assert_eq!(sass_choice(hopper, true, (9, 0)), Err(JitReason::Override));
        assert_eq!(
            sass_choice(None, false, (9, 0)),
            Err(JitReason::NotEmbedded)
        );
        // The portable module forced on an H100 (or on Blackwell) JIT-compiles its PTX.
        assert_eq!(
            sass_choice(portable, false, (9, 0)),
            Err(JitReason::OtherArchitecture {
                sass: arch("sm_80"),
                capability: (9, 0)
            })
        );
        assert_eq!(
            sass_choice(portable, false, (10, 0)),
            Err(JitReason::OtherArchitecture {
                sass: arch("sm_80"),
                capability: (10, 0)
            })
        );
    }

    #[test]
    fn an_embedded_cubin_has_its_module_arch_and_elf_bytes() {
        for m in PtxModule::ALL {
            let cubin = embedded_cubin(m);
            match cubin_arch(m) {
                // Built with ptxas: the cubin is an ELF file for the module's own arch.
                Some(a) => {
                    assert_eq!(a.to_string(), m.arch(), "{m:?}");
                    assert!(cubin.starts_with(b"\x7fELF"), "{m:?}");
                }
                // Built without: nothing embedded.
                None => assert!(cubin.is_empty(), "{m:?}"),
            }
        }
    }

    #[test]
    fn the_loaded_code_reads_as_a_sentence() {
        assert_eq!(
            ModuleCode::Sass {
                arch: arch("sm_90a")
            }
            .to_string(),
            "SASS for sm_90a (assembled at build time)"
        );
        let jit = ModuleCode::Ptx {
            reason: JitReason::OtherArchitecture {
                sass: arch("sm_80"),
                capability: (9, 0),
            },
        };
        assert_eq!(
            jit.to_string(),
            "PTX, JIT-compiled by the driver (the embedded sm_80 SASS does not run on compute \
             capability 9.0)"
        );
        let rejected = ModuleCode::Ptx {
            reason: JitReason::SassRejected {
                sass: arch("sm_90a"),
                error: "CUDA_ERROR_INVALID_IMAGE".into(),
            },
        };
        assert!(rejected.to_string().contains("rejected the sm_90a SASS"));
    }
}
