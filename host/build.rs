//! Builds the kernels' two PTX modules with the same builder as `cargo xtask build-ptx` and hands
//! their paths to the library (`MXMOE_PTX_PATH`: the Hopper module, `MXMOE_PTX_PORTABLE_PATH`:
//! the portable `sm_80` one), so a plain `cargo build` embeds fresh PTX. The two device builds
//! have their own target folders and run side by side.
//!
//! Each module is then assembled into SASS by `ptxas` (`mxmoe_ptx_builder::ptxas`: `$PTXAS`,
//! `$PATH` or the cache folder that `cargo xtask ptx-report` fills; never downloaded here), for
//! the module's own arch: a cubin for `sm_90a` and one for `sm_80`, assembled in parallel, passed
//! as `MXMOE_CUBIN_PATH` / `MXMOE_CUBIN_PORTABLE_PATH` with the arch in `MXMOE_CUBIN_ARCH` /
//! `MXMOE_CUBIN_PORTABLE_ARCH`. Without SASS (no `ptxas`, `MXMOE_SASS=0`, or ptxas failed, each
//! with one `cargo::warning` except the switch) the path names an empty file and the arch is
//! empty; the library then loads the PTX as before. Prebuilt modules (`MXMOE_PTX_FILE`,
//! `MXMOE_PTX_PORTABLE_FILE`) are assembled the same way.
//!
//! `PATH` is not a rerun trigger (it differs between shells and editors, and each rerun rebuilds
//! both modules): after installing a `ptxas` on `PATH`, set `PTXAS` or touch this file.

use std::path::{Path, PathBuf};

use mxmoe_ptx_builder::ptxas::{self, SassPlan};

/// One of the two modules: its arch, its files in `OUT_DIR` and the variables naming them.
struct Module {
    /// `-C target-cpu` of the device build and `ptxas -arch` of its SASS.
    arch: String,
    /// The PTX file name in `OUT_DIR`, when the module is built here.
    ptx_name: &'static str,
    /// The cubin file name in `OUT_DIR` (empty without SASS).
    cubin_name: &'static str,
    /// The prebuilt PTX variable (`MXMOE_PTX_FILE`, `MXMOE_PTX_PORTABLE_FILE`).
    prebuilt_var: &'static str,
    /// The variable the library reads the PTX path from.
    ptx_var: &'static str,
    /// The variable the library reads the cubin path from.
    cubin_var: &'static str,
    /// The variable the library reads the cubin's arch from (empty without SASS).
    arch_var: &'static str,
}

/// What the build made of one module.
struct Built {
    /// The PTX file the library embeds.
    ptx: PathBuf,
    /// Its SASS.
    sass: Sass,
}

/// Whether a module's SASS was made.
enum Sass {
    /// `OUT_DIR/<cubin_name>` holds the cubin for [`Module::arch`].
    Assembled,
    /// SASS is off or there is no `ptxas` (reported once for both modules).
    Skipped,
    /// ptxas failed; its message.
    Failed(String),
}

fn main() {
    let manifest = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let root = manifest
        .parent()
        .expect("host/ lives in the workspace root")
        .to_path_buf();
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cargo = PathBuf::from(std::env::var_os("CARGO").expect("cargo sets CARGO"));
    let arch =
        std::env::var("MXMOE_ARCH").unwrap_or_else(|_| mxmoe_ptx_builder::DEFAULT_ARCH.to_string());

    println!(
        "cargo::rerun-if-changed={}",
        root.join("kernels-gpu/src").display()
    );
    println!(
        "cargo::rerun-if-changed={}",
        root.join("kernels-gpu/Cargo.toml").display()
    );
    println!("cargo::rerun-if-env-changed=MXMOE_ARCH");
    println!("cargo::rerun-if-env-changed=MXMOE_PTX_FILE");
    println!("cargo::rerun-if-env-changed=MXMOE_PTX_PORTABLE_FILE");
    println!("cargo::rerun-if-env-changed={}", ptxas::SASS_ENV);
    for var in ptxas::DISCOVERY_ENV {
        println!("cargo::rerun-if-env-changed={var}");
    }

    let plan = ptxas::sass_plan(
        std::env::var_os(ptxas::SASS_ENV).as_deref(),
        ptxas::discover_from_env,
    );
    match &plan {
        SassPlan::Assemble(ptxas) => println!("cargo::rerun-if-changed={}", ptxas.display()),
        SassPlan::NoPtxas(why) => println!(
            "cargo::warning=no SASS embedded: {why}. The driver JIT-compiles the PTX on the \
             first open of each machine instead; set {}=/path/to/ptxas, or {}=0 to silence this",
            ptxas::PTXAS_ENV,
            ptxas::SASS_ENV
        ),
        SassPlan::Disabled => {}
    }
    let ptxas = match &plan {
        SassPlan::Assemble(p) => Some(p.as_path()),
        SassPlan::Disabled | SassPlan::NoPtxas(_) => None,
    };

    let modules = [
        Module {
            arch,
            ptx_name: "mxmoe.ptx",
            cubin_name: "mxmoe.cubin",
            prebuilt_var: "MXMOE_PTX_FILE",
            ptx_var: "MXMOE_PTX_PATH",
            cubin_var: "MXMOE_CUBIN_PATH",
            arch_var: "MXMOE_CUBIN_ARCH",
        },
        Module {
            arch: mxmoe_ptx_builder::PORTABLE_ARCH.to_string(),
            ptx_name: "mxmoe-portable.ptx",
            cubin_name: "mxmoe-portable.cubin",
            prebuilt_var: "MXMOE_PTX_PORTABLE_FILE",
            ptx_var: "MXMOE_PTX_PORTABLE_PATH",
            cubin_var: "MXMOE_CUBIN_PORTABLE_PATH",
            arch_var: "MXMOE_CUBIN_PORTABLE_ARCH",
        },
    ];
    // Per module, one thread: the PTX (built, or the prebuilt file), then its SASS, so each
    // ptxas starts as soon as its own module is ready and the two run side by side.
    let results = std::thread::scope(|scope| {
        let jobs: Vec<_> = modules
            .iter()
            .map(|m| {
                let (root, out_dir, cargo) = (&root, &out_dir, &cargo);
                scope.spawn(move || build_module(m, root, out_dir, cargo, ptxas))
            })
            .collect();
        jobs.into_iter().map(|j| j.join()).collect::<Vec<_>>()
    });
    for (m, result) in modules.iter().zip(results) {
        let built = match result {
            Ok(Ok(built)) => built,
            Ok(Err(e)) => {
                println!(
                    "cargo::error=building the mxmoe PTX ({}) failed: {e}",
                    m.ptx_var
                );
                std::process::exit(1);
            }
            Err(_) => {
                println!(
                    "cargo::error=building the mxmoe PTX ({}) panicked",
                    m.ptx_var
                );
                std::process::exit(1);
            }
        };
        println!("cargo::rustc-env={}={}", m.ptx_var, built.ptx.display());
        let cubin = out_dir.join(m.cubin_name);
        let sass_arch = match built.sass {
            Sass::Assembled => m.arch.as_str(),
            Sass::Skipped | Sass::Failed(_) => {
                if let Sass::Failed(why) = &built.sass {
                    println!(
                        "cargo::warning=no SASS for the {} PTX: {}; the driver JIT-compiles it",
                        m.arch,
                        one_line(why)
                    );
                }
                // An empty file: the library loads the PTX.
                if let Err(e) = std::fs::write(&cubin, b"") {
                    println!("cargo::error=cannot write {}: {e}", cubin.display());
                    std::process::exit(1);
                }
                ""
            }
        };
        println!("cargo::rustc-env={}={}", m.cubin_var, cubin.display());
        println!("cargo::rustc-env={}={sass_arch}", m.arch_var);
    }
}

/// Builds (or takes the prebuilt) PTX of `m`, then assembles it into `OUT_DIR/<cubin_name>` with
/// `ptxas` when there is one. A PTX failure is the error; a ptxas failure only leaves no SASS.
fn build_module(
    m: &Module,
    root: &Path,
    out_dir: &Path,
    cargo: &Path,
    ptxas: Option<&Path>,
) -> Result<Built, mxmoe_ptx_builder::BuildError> {
    let prebuilt = std::env::var_os(m.prebuilt_var)
        .filter(|f| !f.is_empty())
        .map(PathBuf::from);
    let ptx = match prebuilt {
        Some(file) => {
            println!("cargo::rerun-if-changed={}", file.display());
            file
        }
        None => {
            let b = mxmoe_ptx_builder::PtxBuild {
                target_dir: mxmoe_ptx_builder::device_target_dir(&root.join("target"), &m.arch),
                workspace_root: root.to_path_buf(),
                arch: m.arch.clone(),
                out_file: out_dir.join(m.ptx_name),
                cargo: cargo.to_path_buf(),
            };
            mxmoe_ptx_builder::build_ptx(&b)?.ptx_file
        }
    };
    let sass = match ptxas {
        None => Sass::Skipped,
        Some(ptxas) => match ptxas::assemble(ptxas, &m.arch, &ptx, &out_dir.join(m.cubin_name)) {
            Ok(()) => Sass::Assembled,
            Err(e) => Sass::Failed(e.to_string()),
        },
    };
    Ok(Built { ptx, sass })
}

/// `text` on one line (a `cargo::warning` ends at the first newline), cut after
/// [`WARNING_CHARS`] characters (ptxas may report an error for every entry).
fn one_line(text: &str) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(WARNING_CHARS) {
        Some((cut, _)) => format!("{} …", &line[..cut]),
        None => line,
    }
}

/// The longest ptxas message a warning repeats.
const WARNING_CHARS: usize = 1500;
