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

/// Whether a symbolic link given as a file is followed (data and images) or refused
/// (a checkpoint's own files, which are never links elsewhere).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Links {
    Follow,
    Refuse,
}

/// Opens `path` for reading if it is a regular file, refusing at once anything else:
/// reading a named pipe or a device would block until someone writes to it, or never
/// end. Checked before it is opened, opened non-blocking (so even a file swapped for a
/// pipe in between cannot hang the open) and checked again once open. Returns the
/// file and its length.
pub fn open_regular(path: &Path, links: Links) -> Result<(std::fs::File, u64)> {
    let refuse = |what: &str| Error::Format {
        path: path.to_path_buf(),
        msg: format!("is {what}: only regular files are read here"),
    };
    // checked before opening too: opening some devices has effects of its own
    let before = match links {
        Links::Follow => std::fs::metadata(path),
        Links::Refuse => std::fs::symlink_metadata(path),
    }
    .map_err(|e| Error::io(path, e))?;
    if before.is_symlink() {
        return Err(refuse("a symbolic link"));
    }
    if !before.is_file() {
        return Err(refuse(kind_of(before.file_type())));
    }
    let mut open = std::fs::OpenOptions::new();
    open.read(true);
    #[cfg(unix)]
    {
        let nofollow = if links == Links::Refuse {
            libc::O_NOFOLLOW
        } else {
            0
        };
        std::os::unix::fs::OpenOptionsExt::custom_flags(&mut open, libc::O_NONBLOCK | nofollow);
    }
    let file = open.open(path).map_err(|e| {
        #[cfg(unix)]
        if e.raw_os_error() == Some(libc::ELOOP) && links == Links::Refuse {
            return refuse("a symbolic link");
        }
        Error::io(path, e)
    })?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(refuse(kind_of(meta.file_type())));
    }
    Ok((file, meta.len()))
}

/// The bytes of regular file `path` (symbolic links followed), at most `max` of them:
/// a larger file is an error naming its size.
pub fn read_regular_file(path: &Path, max: u64) -> Result<Vec<u8>> {
    read_bounded(path, max, Links::Follow)
}

/// [`read_regular_file`], with links followed or refused.
pub fn read_bounded(path: &Path, max: u64, links: Links) -> Result<Vec<u8>> {
    let (file, len) = open_regular(path, links)?;
    let too_big = |size: u64| Error::Format {
        path: path.to_path_buf(),
        msg: format!("is {size} bytes, over the {max}-byte limit for this kind of file"),
    };
    if len > max {
        return Err(too_big(len));
    }
    // bounded even if the file grows while it is read
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
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

/// Checks that `path` may be written by renaming a finished file over it: nothing is
/// there yet, or a regular file. A directory, a symbolic link, a named pipe or a device
/// (`/dev/null`, `/dev/stdout`) would be replaced itself rather than written to, so
/// they are refused, named.
pub fn check_output(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(Error::Config(format!(
            "{}: is a symbolic link; give the file it points to, or a new name",
            crate::text::path(path)
        ))),
        Ok(m) if !m.is_file() => Err(Error::Config(format!(
            "{}: is {}, not a file this could write",
            crate::text::path(path),
            kind_of(m.file_type())
        ))),
        _ => Ok(()),
    }
}

/// Replaces `path` by `bytes` as a whole: written (and synced, where a full disk
/// shows) under a temporary name, then renamed over it. On failure the temporary file
/// is removed and `path` is left as it was.
pub fn write_replacing(path: &Path, bytes: &[u8]) -> Result<()> {
    check_output(path)?;
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
