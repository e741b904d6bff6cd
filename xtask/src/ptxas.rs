//! A `ptxas` for the gate: the one that [`mxmoe_ptx_builder::ptxas::discover`] finds (`$PTXAS`,
//! `$PATH`, then the cache folder `${XDG_CACHE_HOME:-$HOME/.cache}/mxmoe/nvcc-13.0.88`), else
//! NVIDIA's `nvidia-cuda-nvcc` wheel fetched into that cache folder with
//! `python3 -m pip install --target`, then used. The search itself lives in the builder, which
//! `host/build.rs` shares (it never fetches: no `ptxas`, no SASS).
//!
//! The wheel is installed without its dependencies (the NVVM, CRT and runtime wheels), which
//! `ptxas` does not need, and into a temporary sibling folder that is renamed into place only when
//! complete, so an interrupted install is never mistaken for a good one.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use mxmoe_ptx_builder::ptxas::{self as finder, NVCC_WHEEL_VERSION, Source};

use crate::shell;

/// Returns a usable `ptxas`, installing the pinned wheel first if none is found.
pub fn locate() -> Result<PathBuf> {
    match finder::discover_from_env()? {
        Source::Env(p) | Source::Path(p) | Source::Cache(p) => Ok(p),
        Source::Install { dir, ptxas } => {
            install(&dir)?;
            if !finder::is_executable(&ptxas) {
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
