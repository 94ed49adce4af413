//! Reading and writing the files a run is given or produces: inputs must be regular
//! files read within a bound (a named pipe or device would block or never end), and
//! outputs appear whole or not at all (written to a temporary name, then renamed).

use crate::error::{Error, Result};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// What a file that is not a regular one is, for an error message.
fn kind_of(t: std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a named pipe (FIFO)";
        }
        if t.is_char_device() || t.is_block_device() {
            return "a device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if t.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

/// Refuses anything but a regular file (symbolic links followed): reading a named
/// pipe or a device would block until someone writes to it, or never end.
fn check_regular(path: &Path, meta: &std::fs::Metadata) -> Result<()> {
    if meta.is_file() {
        return Ok(());
    }
    Err(Error::Format {
        path: path.to_path_buf(),
        msg: format!(
            "is {}: data and images must be regular files",
            kind_of(meta.file_type())
        ),
    })
}

/// The bytes of regular file `path`, at most `max` of them (a larger file is an error
/// naming its size). Checked before it is opened, and again once open (opened
/// non-blocking, so a file swapped for a pipe in between cannot hang the open).
pub fn read_regular_file(path: &Path, max: u64) -> Result<Vec<u8>> {
    let io = |e| Error::io(path, e);
    check_regular(path, &std::fs::metadata(path).map_err(io)?)?;
    let mut open = std::fs::OpenOptions::new();
    open.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut open, libc::O_NONBLOCK);
    let file = open.open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    check_regular(path, &meta)?;
    let too_big = |size: u64| Error::Format {
        path: path.to_path_buf(),
        msg: format!("is {size} bytes, over the {max}-byte limit for this kind of file"),
    };
    if meta.len() > max {
        return Err(too_big(meta.len()));
    }
    // bounded even if the file grows while it is read
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > max {
        return Err(too_big(bytes.len() as u64));
    }
    Ok(bytes)
}

/// A temporary name beside `path` (same directory, so the rename cannot cross file
/// systems; hidden, and unique to this process).
fn temp_beside(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or("out".into(), |n| n.to_string_lossy());
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Replaces `path` by `bytes` as a whole: written (and synced, where a full disk
/// shows) under a temporary name, then renamed over it. On failure the temporary file
/// is removed and `path` is left as it was.
pub fn write_replacing(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_beside(path);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    let done = write()
        .map_err(|e| Error::io(&tmp, e))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done
}
