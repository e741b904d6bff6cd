//! Finding `ptxas`, and fetching a pinned one when the machine has none.
//!
//! The order is:
//!
//! 1. `$PTXAS`, if set (it must name an executable file);
//! 2. `ptxas` on `$PATH` (a CUDA toolkit install);
//! 3. the cache folder `${XDG_CACHE_HOME:-$HOME/.cache}/mxmoe/nvcc-13.0.88`, holding NVIDIA's
//!    `nvidia-cuda-nvcc` wheel unpacked by pip, whose `nvidia/cu13/bin/ptxas` is a standalone
//!    binary;
//! 4. otherwise that wheel is installed there with `python3 -m pip install --target`, then used.
//!
//! The wheel is installed without its dependencies (the NVVM, CRT and runtime wheels), which
//! `ptxas` does not need, and into a temporary sibling folder that is renamed into place only when
//! complete, so an interrupted install is never mistaken for a good one.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::shell;

/// Version of the `nvidia-cuda-nvcc` wheel fetched when no `ptxas` is installed.
pub const NVCC_WHEEL_VERSION: &str = "13.0.88";

/// Path of `ptxas` inside the unpacked wheel folder.
const PTXAS_IN_WHEEL: &str = "nvidia/cu13/bin/ptxas";

/// Where a `ptxas` comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Named by `$PTXAS`.
    Env(PathBuf),
    /// Found on `$PATH`.
    Path(PathBuf),
    /// Already unpacked in the cache folder.
    Cache(PathBuf),
    /// Not present anywhere: the wheel must be installed into `dir`, giving `ptxas`.
    Install {
        /// Folder that pip's `--target` fills.
        dir: PathBuf,
        /// The `ptxas` the install provides.
        ptxas: PathBuf,
    },
}

/// Returns a usable `ptxas`, installing the pinned wheel first if none is found.
pub fn locate() -> Result<PathBuf> {
    let source = discover(
        std::env::var_os("PTXAS"),
        shell::find_on_path("ptxas"),
        cache_root(std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME")),
        shell::is_executable,
    )?;
    match source {
        Source::Env(p) | Source::Path(p) | Source::Cache(p) => Ok(p),
        Source::Install { dir, ptxas } => {
            install(&dir)?;
            if !shell::is_executable(&ptxas) {
                bail!(
                    "pip installed nvidia-cuda-nvcc=={NVCC_WHEEL_VERSION} into {} but {} is missing; \
                     delete that folder and retry, or set PTXAS=/path/to/ptxas",
                    dir.display(),
                    ptxas.display()
                );
            }
            Ok(ptxas)
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
) -> Result<Source> {
    if let Some(p) = env_ptxas.filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if !executable(&p) {
            bail!(
                "PTXAS={} is not an executable file; point it at a ptxas binary or unset it",
                p.display()
            );
        }
        return Ok(Source::Env(p));
    }
    if let Some(p) = on_path {
        return Ok(Source::Path(p));
    }
    let Some(cache_root) = cache_root else {
        bail!(
            "ptxas is not on PATH and neither XDG_CACHE_HOME nor HOME is set; set PTXAS=/path/to/ptxas"
        );
    };
    let dir = install_dir(&cache_root);
    let ptxas = dir.join(PTXAS_IN_WHEEL);
    if executable(&ptxas) {
        Ok(Source::Cache(ptxas))
    } else {
        Ok(Source::Install { dir, ptxas })
    }
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

/// Unpacks `nvidia-cuda-nvcc==NVCC_WHEEL_VERSION` into `dir` with pip.
fn install(dir: &Path) -> Result<()> {
    let pip_ok = Command::new("python3")
        .args(["-m", "pip", "--version"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !pip_ok {
        bail!(
            "ptxas was not found and `python3 -m pip` is unavailable to fetch it: install python3 with pip \
             (for example `apt-get install python3-pip`), or install the CUDA toolkit, or set PTXAS=/path/to/ptxas"
        );
    }
    let parent = dir.parent().context("the install folder has a parent")?;
    fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let name = dir
        .file_name()
        .context("the install folder has a name")?
        .to_string_lossy();
    let staging = parent.join(format!("{name}.partial-{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    eprintln!(
        "ptxas not found: fetching nvidia-cuda-nvcc=={NVCC_WHEEL_VERSION} into {} (once)",
        dir.display()
    );
    let installed = shell::run(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-input",
                "--disable-pip-version-check",
            ])
            .args(["--no-deps", "--target"])
            .arg(&staging)
            .arg(format!("nvidia-cuda-nvcc=={NVCC_WHEEL_VERSION}"))
            .env("PIP_REQUIRE_VIRTUALENV", "0")
            .env("PIP_ROOT_USER_ACTION", "ignore"),
    );
    if let Err(e) = installed {
        let _ = fs::remove_dir_all(&staging);
        return Err(e.context("installing ptxas with pip failed; check network access to PyPI, or set PTXAS=/path/to/ptxas"));
    }
    // A folder left by an older, broken install (no ptxas inside) is replaced.
    if dir.exists() {
        fs::remove_dir_all(dir)
            .with_context(|| format!("cannot remove the incomplete {}", dir.display()))?;
    }
    fs::rename(&staging, dir)
        .with_context(|| format!("cannot move {} to {}", staging.display(), dir.display()))?;
    Ok(())
}

/// The last line of `ptxas --version` (for example "Cuda compilation tools, release 13.0, V13.0.88"),
/// or `None` if it cannot be read.
pub fn version(ptxas: &Path) -> Option<String> {
    let out = Command::new(ptxas)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .rev()
        .find(|l| l.contains("release"))
        .map(|l| l.trim().to_string())
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
}
