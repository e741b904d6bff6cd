//! Finding `ptxas`, and assembling a PTX module into SASS (a cubin) with it.
//!
//! The one implementation behind `cargo xtask ptx-report` (the ptxas gate, which fetches a pinned
//! `ptxas` when none is found) and `host/build.rs` (which embeds SASS next to the PTX and never
//! downloads anything: no `ptxas`, no SASS). The search order ([`discover`]) is:
//!
//! 1. `$PTXAS`, if set and non-empty (it must name an executable file);
//! 2. `ptxas` on `$PATH` (a CUDA toolkit install);
//! 3. the cache folder `${XDG_CACHE_HOME:-$HOME/.cache}/mxmoe/nvcc-13.0.88` ([`install_dir`]),
//!    holding NVIDIA's `nvidia-cuda-nvcc` wheel unpacked by pip, whose `nvidia/cu13/bin/ptxas`
//!    is a standalone binary;
//! 4. otherwise [`Source::Install`]: where the wheel would go. Only xtask acts on it (it installs
//!    the wheel there with pip); the build takes it as "no ptxas".
//!
//! Both callers assemble with the flags of [`command`] (`-arch=<arch> -O3`), so the registers and
//! spills the gate reports are those of the SASS the library embeds.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{BuildError, err, run};

/// Version of the `nvidia-cuda-nvcc` wheel whose `ptxas` the cache folder holds.
pub const NVCC_WHEEL_VERSION: &str = "13.0.88";

/// Path of `ptxas` inside the unpacked wheel folder.
const PTXAS_IN_WHEEL: &str = "nvidia/cu13/bin/ptxas";

/// The environment variable naming a `ptxas` to use.
pub const PTXAS_ENV: &str = "PTXAS";

/// The environment variables [`discover_from_env`] reads besides `PATH`, for a build script's
/// `cargo::rerun-if-env-changed`.
pub const DISCOVERY_ENV: &[&str] = &[PTXAS_ENV, "XDG_CACHE_HOME", "HOME"];

/// The environment variable that turns the build's SASS off: `MXMOE_SASS=0` ([`sass_plan`]).
pub const SASS_ENV: &str = "MXMOE_SASS";

/// `ptxas`'s optimization level, the same for the gate and the embedded SASS (also ptxas's
/// default).
pub const OPT_LEVEL: &str = "-O3";

/// Where a `ptxas` comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Named by `$PTXAS`.
    Env(PathBuf),
    /// Found on `$PATH`.
    Path(PathBuf),
    /// Already unpacked in the cache folder.
    Cache(PathBuf),
    /// Not present anywhere: the wheel would have to be installed into `dir`, giving `ptxas`.
    Install {
        /// Folder that pip's `--target` fills.
        dir: PathBuf,
        /// The `ptxas` the install provides.
        ptxas: PathBuf,
    },
}

impl Source {
    /// The `ptxas` that is already present, or `None` for [`Source::Install`].
    pub fn present(&self) -> Option<&Path> {
        match self {
            Source::Env(p) | Source::Path(p) | Source::Cache(p) => Some(p),
            Source::Install { .. } => None,
        }
    }
}

/// Decides where `ptxas` comes from, given the environment's answers.
///
/// `env_ptxas` is `$PTXAS`, `on_path` the result of a `$PATH` search, `cache_root` the user's cache
/// folder, and `executable` tells whether a path is an executable file.
pub fn discover(
    env_ptxas: Option<OsString>,
    on_path: Option<PathBuf>,
    cache_root: Option<PathBuf>,
    executable: impl Fn(&Path) -> bool,
) -> Result<Source, BuildError> {
    if let Some(p) = env_ptxas.filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if !executable(&p) {
            return Err(err(format!(
                "{PTXAS_ENV}={} is not an executable file; point it at a ptxas binary or unset it",
                p.display()
            )));
        }
        return Ok(Source::Env(p));
    }
    if let Some(p) = on_path {
        return Ok(Source::Path(p));
    }
    let Some(cache_root) = cache_root else {
        return Err(err(format!(
            "ptxas is not on PATH and neither XDG_CACHE_HOME nor HOME is set; set \
             {PTXAS_ENV}=/path/to/ptxas"
        )));
    };
    let dir = install_dir(&cache_root);
    let ptxas = dir.join(PTXAS_IN_WHEEL);
    if executable(&ptxas) {
        Ok(Source::Cache(ptxas))
    } else {
        Ok(Source::Install { dir, ptxas })
    }
}

/// [`discover`] with this process's environment (`$PTXAS`, `$PATH`, `$XDG_CACHE_HOME`, `$HOME`)
/// and file system.
pub fn discover_from_env() -> Result<Source, BuildError> {
    discover(
        std::env::var_os(PTXAS_ENV),
        find_on_path("ptxas"),
        cache_root(std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME")),
        is_executable,
    )
}

/// The user's cache folder: `$XDG_CACHE_HOME` if set and non-empty, else `$HOME/.cache`.
pub fn cache_root(xdg_cache_home: Option<OsString>, home: Option<OsString>) -> Option<PathBuf> {
    match xdg_cache_home.filter(|p| !p.is_empty()) {
        Some(p) => Some(PathBuf::from(p)),
        None => home
            .filter(|p| !p.is_empty())
            .map(|h| Path::new(&h).join(".cache")),
    }
}

/// The folder the pinned wheel is unpacked into, under `cache_root`.
pub fn install_dir(cache_root: &Path) -> PathBuf {
    cache_root
        .join("mxmoe")
        .join(format!("nvcc-{NVCC_WHEEL_VERSION}"))
}

/// Finds `name` in the folders of `$PATH`, as a shell would.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// Whether `path` is a file this user may execute.
pub fn is_executable(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        path.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    }
    #[cfg(not(unix))]
    {
        path.is_file()
    }
}

/// The `ptxas` command that assembles `ptx` for `arch` into the cubin `out`:
/// `ptxas -arch=<arch> -O3 <ptx> -o <out>`. The gate adds `-v` for its resource report.
pub fn command(ptxas: &Path, arch: &str, ptx: &Path, out: &Path) -> Command {
    let mut cmd = Command::new(ptxas);
    cmd.arg(format!("-arch={arch}"))
        .arg(OPT_LEVEL)
        .arg(ptx)
        .arg("-o")
        .arg(out);
    cmd
}

/// Assembles `ptx` for `arch` into the cubin `out` with [`command`]; the error carries ptxas's
/// output.
pub fn assemble(ptxas: &Path, arch: &str, ptx: &Path, out: &Path) -> Result<(), BuildError> {
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| err(format!("cannot create {}: {e}", parent.display())))?;
    }
    run(
        &mut command(ptxas, arch, ptx, out),
        &format!("ptxas -arch={arch} on {}", ptx.display()),
    )?;
    Ok(())
}

/// What the build does about SASS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SassPlan {
    /// `MXMOE_SASS=0`: no SASS, by request.
    Disabled,
    /// No usable `ptxas`: no SASS. The sentence says why.
    NoPtxas(String),
    /// Assemble every module with this `ptxas`.
    Assemble(PathBuf),
}

/// The build's SASS plan from the value of `MXMOE_SASS` (`switch`; `0` turns SASS off, anything
/// else or unset leaves it on) and the `ptxas` search, which runs only when SASS is on. A
/// `ptxas` that would have to be downloaded counts as none.
pub fn sass_plan(
    switch: Option<&OsStr>,
    discover: impl FnOnce() -> Result<Source, BuildError>,
) -> SassPlan {
    if switch.is_some_and(|v| v.to_str().map(str::trim) == Some("0")) {
        return SassPlan::Disabled;
    }
    match discover() {
        Ok(source) => match source {
            Source::Env(p) | Source::Path(p) | Source::Cache(p) => SassPlan::Assemble(p),
            Source::Install { dir, .. } => SassPlan::NoPtxas(format!(
                "ptxas was not found ({PTXAS_ENV} unset, none on PATH, none in {}; \
                 `cargo xtask ptx-report` fetches it there)",
                dir.display()
            )),
        },
        Err(e) => SassPlan::NoPtxas(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none_executable(_: &Path) -> bool {
        false
    }

    #[test]
    fn env_ptxas_wins_over_path_and_cache() {
        let found = discover(
            Some("/opt/ptxas".into()),
            Some("/usr/bin/ptxas".into()),
            Some("/c".into()),
            |p| p == Path::new("/opt/ptxas"),
        )
        .unwrap();
        assert_eq!(found, Source::Env("/opt/ptxas".into()));
        assert_eq!(found.present(), Some(Path::new("/opt/ptxas")));
    }

    #[test]
    fn env_ptxas_that_is_not_executable_is_an_error() {
        let err = discover(
            Some("/nope".into()),
            Some("/usr/bin/ptxas".into()),
            None,
            none_executable,
        )
        .unwrap_err();
        assert!(err.to_string().contains("PTXAS=/nope"), "{err}");
    }

    #[test]
    fn path_is_used_before_the_cache() {
        let found = discover(
            None,
            Some("/usr/bin/ptxas".into()),
            Some("/c".into()),
            |_| true,
        )
        .unwrap();
        assert_eq!(found, Source::Path("/usr/bin/ptxas".into()));
    }

    #[test]
    fn cache_is_used_when_its_ptxas_exists() {
        let expected = PathBuf::from("/c/mxmoe/nvcc-13.0.88/nvidia/cu13/bin/ptxas");
        let found = discover(None, None, Some("/c".into()), |p| p == expected).unwrap();
        assert_eq!(found, Source::Cache(expected));
    }

    #[test]
    fn missing_cache_asks_for_an_install_into_the_versioned_folder() {
        let found = discover(Some("".into()), None, Some("/c".into()), none_executable).unwrap();
        assert_eq!(
            found,
            Source::Install {
                dir: "/c/mxmoe/nvcc-13.0.88".into(),
                ptxas: "/c/mxmoe/nvcc-13.0.88/nvidia/cu13/bin/ptxas".into(),
            }
        );
        assert_eq!(found.present(), None);
    }

    #[test]
    fn cache_root_prefers_xdg_then_home() {
        assert_eq!(
            cache_root(Some("/x".into()), Some("/h".into())),
            Some("/x".into())
        );
        assert_eq!(
            cache_root(Some("".into()), Some("/h".into())),
            Some("/h/.cache".into())
        );
        assert_eq!(
            cache_root(None, Some("/h".into())),
            Some("/h/.cache".into())
        );
        assert_eq!(cache_root(None, None), None);
    }

    #[test]
    fn the_command_assembles_one_arch_at_o3_into_the_named_cubin() {
        let cmd = command(
            Path::new("/bin/ptxas"),
            "sm_90a",
            Path::new("/o/mxmoe.ptx"),
            Path::new("/o/mxmoe-sm_90a.cubin"),
        );
        assert_eq!(cmd.get_program(), OsStr::new("/bin/ptxas"));
        let args: Vec<&OsStr> = cmd.get_args().collect();
        assert_eq!(
            args,
            [
                "-arch=sm_90a",
                "-O3",
                "/o/mxmoe.ptx",
                "-o",
                "/o/mxmoe-sm_90a.cubin"
            ]
            .map(OsStr::new)
        );
    }

    #[test]
    fn sass_is_off_with_mxmoe_sass_0_and_without_ptxas() {
        let found = || Ok(Source::Path("/usr/bin/ptxas".into()));
        assert_eq!(
            sass_plan(None, found),
            SassPlan::Assemble("/usr/bin/ptxas".into())
        );
        assert_eq!(
            sass_plan(Some(OsStr::new("1")), found),
            SassPlan::Assemble("/usr/bin/ptxas".into())
        );
        // Disabled: the search does not even run (a bad $PTXAS is then no warning).
        assert_eq!(
            sass_plan(Some(OsStr::new("0")), || -> Result<Source, BuildError> {
                panic!("searched for ptxas although MXMOE_SASS=0")
            }),
            SassPlan::Disabled
        );
        // A ptxas that would need a download is none: the build never fetches one.
        let missing = sass_plan(None, || {
            discover(None, None, Some("/c".into()), none_executable)
        });
        match missing {
            SassPlan::NoPtxas(why) => {
                assert!(why.contains("/c/mxmoe/nvcc-13.0.88"), "{why}")
            }
            other => panic!("expected NoPtxas, got {other:?}"),
        }
        // A bad $PTXAS is no ptxas, with the reason.
        let bad = sass_plan(None, || {
            discover(Some("/nope".into()), None, None, none_executable)
        });
        match bad {
            SassPlan::NoPtxas(why) => assert!(why.contains("PTXAS=/nope"), "{why}"),
            other => panic!("expected NoPtxas, got {other:?}"),
        }
    }

    #[test]
    fn a_present_ptxas_writes_a_cubin() {
        let Some(ptxas) = discover_from_env()
            .ok()
            .and_then(|s| s.present().map(Path::to_path_buf))
        else {
            eprintln!("skipped: no ptxas on this machine");
            return;
        };
        let dir = std::env::temp_dir().join(format!("mxmoe-ptxas-ok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ptx = dir.join("k.ptx");
        std::fs::write(
            &ptx,
            ".version 8.0\n.target sm_80\n.address_size 64\n.visible .entry k()\n{\n\tret;\n}\n",
        )
        .unwrap();
        let cubin = dir.join("k.cubin");
        assemble(&ptxas, "sm_80", &ptx, &cubin).unwrap();
        let bytes = std::fs::read(&cubin).unwrap();
        assert!(bytes.starts_with(b"\x7fELF"), "a cubin is an ELF file");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_ptxas_is_an_error_naming_the_step() {
        let dir = std::env::temp_dir().join(format!("mxmoe-ptxas-{}", std::process::id()));
        let missing = dir.join("no-such-ptxas");
        let e = assemble(
            &missing,
            "sm_80",
            &dir.join("m.ptx"),
            &dir.join("out/m.cubin"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("ptxas -arch=sm_80"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
