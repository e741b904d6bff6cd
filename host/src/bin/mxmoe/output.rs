//! Every file the CLI writes for a user goes through [`write_atomic`]: the bytes go to a new
//! temporary file in the destination's folder, are flushed to disk (`fsync`), and the temporary
//! file is then renamed over the destination. A failed or interrupted write leaves the old file
//! (or no file) in place, never a truncated one, and an output may name its own input.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context as _, bail};

/// The folder a path's file lives in (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A temporary file beside `path`, created exclusively (a fresh name per call).
fn create_temp(path: &Path) -> anyhow::Result<(PathBuf, File)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let Some(name) = path.file_name() else {
        bail!("{} does not name a file", path.display());
    };
    let dir = parent_dir(path);
    let mut last_error = None;
    for _ in 0..16 {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let temp = dir.join(format!(
            ".{}.mxmoe-tmp-{}-{n}",
            name.to_string_lossy(),
            std::process::id()
        ));
        match OpenOptions::new().write(true).create_new(true).open(&temp) {
            Ok(file) => return Ok((temp, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last_error = Some(e),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("could not create a temporary file in {}", dir.display())
                });
            }
        }
    }
    Err(last_error.map_or_else(
        || anyhow::anyhow!("no free temporary name"),
        anyhow::Error::from,
    ))
    .with_context(|| format!("could not create a temporary file in {}", dir.display()))
}

/// Writes `bytes` to `path` atomically: temporary file in the same folder, `fsync`, rename over
/// `path`, then `fsync` of the folder (best effort). On any error the temporary file is removed
/// and `path` is left as it was.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let (temp, mut file) = create_temp(path)?;
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(anyhow::Error::from)
        .and_then(|()| {
            drop(file);
            fs::rename(&temp, path).map_err(anyhow::Error::from)
        });
    if let Err(e) = written {
        // The temporary file is ours; nothing else can hold its name.
        let _ = fs::remove_file(&temp);
        return Err(e).with_context(|| format!("could not write {}", path.display()));
    }
    if let Ok(dir) = File::open(parent_dir(path)) {
        // Makes the rename itself durable; not every file system supports it, so best effort.
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Fails now if a file cannot be created in `path`'s folder (so a bad `--json` path is found
/// before minutes of work); creates and removes a temporary file, leaving `path` untouched.
pub fn check_writable(path: &Path) -> anyhow::Result<()> {
    let (temp, file) = create_temp(path)?;
    drop(file);
    fs::remove_file(&temp)
        .with_context(|| format!("could not remove the probe file {}", temp.display()))
}

/// Whether two paths name the same existing file (after following links; by device and inode
/// on Unix, so hard links and `./a` versus `a` are caught).
pub fn same_file(a: &Path, b: &Path) -> bool {
    let (Ok(ma), Ok(mb)) = (fs::metadata(a), fs::metadata(b)) else {
        return false;
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt as _;
        ma.dev() == mb.dev() && ma.ino() == mb.ino()
    }
    #[cfg(not(unix))]
    {
        let _ = (ma, mb);
        matches!((fs::canonicalize(a), fs::canonicalize(b)), (Ok(x), Ok(y)) if x == y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "mxmoe-output-{tag}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".mxmoe-tmp-"))
            .collect()
    }

    #[test]
    fn atomic_write_replaces_the_file_and_leaves_no_temporary() {
        let dir = temp_dir("replace");
        let path = dir.join("out.bin");
        fs::write(&path, b"old contents").unwrap();
        write_atomic(&path, b"new").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert!(leftovers(&dir).is_empty());
        check_writable(&path).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert!(leftovers(&dir).is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn failed_atomic_write_keeps_the_old_file() {
        let dir = temp_dir("fail");
        // The destination is a non-empty folder: the rename fails after the data is written.
        let path = dir.join("occupied");
        fs::create_dir_all(path.join("inside")).unwrap();
        let e = write_atomic(&path, b"data").unwrap_err();
        assert!(format!("{e:#}").contains("could not write"), "{e:#}");
        assert!(path.join("inside").is_dir());
        assert!(leftovers(&dir).is_empty());
        // A folder that does not exist fails before anything is written.
        assert!(write_atomic(&dir.join("missing/out.bin"), b"x").is_err());
        assert!(check_writable(&dir.join("missing/out.bin")).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn same_file_sees_through_spellings() {
        let dir = temp_dir("same");
        let a = dir.join("a");
        fs::write(&a, b"1").unwrap();
        assert!(same_file(&a, &dir.join(".").join("a")));
        assert!(!same_file(&a, &dir.join("b")));
        fs::write(dir.join("b"), b"1").unwrap();
        assert!(!same_file(&a, &dir.join("b")));
        fs::remove_dir_all(&dir).unwrap();
    }
}
