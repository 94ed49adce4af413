//! Getting the real CIFAR-10: download the binary archive, or extract one already
//! downloaded, into a directory [`Dataset::cifar_dir`](super::Dataset::cifar_dir) reads.
//!
//! The archive is untrusted. It must be a regular file of at most
//! [`MAX_ARCHIVE_BYTES`]; it may hold only the directory `cifar-10-batches-bin/` and the
//! eight known files in it ([`FILES`]), each a regular file, once, of at most its
//! size limit — an unexpected member, a link, a duplicate or a member declaring more
//! bytes is refused from its header, before anything of it is written; at most
//! [`MAX_TAR_BYTES`] are decompressed. Members go into a staging directory inside the
//! target (no path from the archive is ever used); the gzip stream is read to its end,
//! so its CRC-32 and length trailer check the whole archive (and nothing may follow
//! it); the staged files are
//! validated as a data set (sizes, every label byte) and only then renamed into place,
//! one by one. On failure the staging directory is removed and the target is left as
//! it was (a target directory the call created is removed again).
//!
//! A download has timeouts (connecting, and each read: [`Timeouts`]) and the same size
//! limit (a larger `Content-Length` is refused before any byte of the body is read);
//! it goes to a `.part` file, which is extracted before it is renamed to
//! [`ARCHIVE`], and removed on any failure.

use super::Dataset;
use crate::error::{Error, Result};
use crate::files::{open_regular, Links};
use crate::text;
use flate2::bufread::GzDecoder;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

/// Where the CIFAR-10 binary version is published.
pub const URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";
/// The archive's file name.
pub const ARCHIVE: &str = "cifar-10-binary.tar.gz";
/// The directory the archive's files are in.
pub const TOP: &str = "cifar-10-batches-bin";
/// The files the archive holds (under `cifar-10-batches-bin/`); all but the last
/// (`readme.html`) must be there.
pub const FILES: [&str; 8] = [
    "batches.meta.txt",
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
    "test_batch.bin",
    "readme.html",
];
/// The size of a CIFAR-10 binary batch (10,000 records of 3,073 bytes): the most a
/// `*.bin` member may have.
pub const BATCH_BYTES: u64 = 30_730_000;
/// The most `batches.meta.txt` may have (the real one is 61 bytes).
pub const MAX_META_BYTES: u64 = 4 << 10;
/// The most `readme.html` may have (the real one is 88 bytes).
pub const MAX_README_BYTES: u64 = 64 << 10;
/// The largest archive read or downloaded (the real one is 170,052,171 bytes).
pub const MAX_ARCHIVE_BYTES: u64 = 256 << 20;
/// The most bytes decompressed from an archive: every member at its limit, with room
/// for tar headers, padding and the end-of-archive blocks.
pub const MAX_TAR_BYTES: u64 = 6 * BATCH_BYTES + MAX_META_BYTES + MAX_README_BYTES + (1 << 20);

/// The most bytes member `name` (one of [`FILES`]) may have.
fn member_limit(name: &str) -> u64 {
    match name {
        "batches.meta.txt" => MAX_META_BYTES,
        "readme.html" => MAX_README_BYTES,
        _ => BATCH_BYTES,
    }
}

/// How long a download waits: for the connection (name lookup, connecting, TLS,
/// sending the request) and for each read of the response (its headers, then every
/// read of the body: a server that stops sending fails after `idle`, however long a
/// steady download takes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(30),
            idle: Duration::from_secs(60),
        }
    }
}

impl Timeouts {
    /// Both timeouts `secs` seconds (`--timeout`): finite, from 0.1 s to an hour.
    pub fn both(secs: f64) -> Result<Timeouts> {
        if !(0.1..=3600.0).contains(&secs) {
            return Err(Error::Config(format!(
                "--timeout {secs}: must be from 0.1 to 3600 seconds"
            )));
        }
        let d = Duration::from_secs_f64(secs);
        Ok(Timeouts {
            connect: d,
            idle: d,
        })
    }
}

/// Extracts a CIFAR-10 binary archive (`.tar.gz`) into `dir` and validates the result.
/// Returns the train and test sizes. On failure `dir` is left as it was.
pub fn extract(archive: &Path, dir: &Path) -> Result<(usize, usize)> {
    let (file, len) = open_regular(archive, Links::Follow)?;
    if len > MAX_ARCHIVE_BYTES {
        return Err(Error::Format {
            path: archive.to_path_buf(),
            msg: format!(
                "is {len} bytes, over the {MAX_ARCHIVE_BYTES}-byte limit: not the CIFAR-10 binary archive"
            ),
        });
    }
    let created = create_missing_dirs(dir)?;
    let result = extract_through_staging(file, len, archive, dir);
    if result.is_err() {
        remove_dirs(&created);
    }
    result
}

/// Unpacks into a fresh staging directory inside `dir`, validates, moves the files into
/// `dir`; the staging directory is removed in any case.
fn extract_through_staging(
    file: std::fs::File,
    len: u64,
    archive: &Path,
    dir: &Path,
) -> Result<(usize, usize)> {
    let staging = dir.join(format!(".cifar10-extracting-{}", std::process::id()));
    std::fs::create_dir(&staging).map_err(|e| Error::io(&staging, e))?;
    let result = unpack(file, len, archive, &staging).and_then(|()| {
        let sizes = validate(archive, &staging)?;
        commit(&staging, dir)?;
        Ok(sizes)
    });
    let _ = std::fs::remove_dir_all(&staging);
    result
}

/// Creates `dir` with any missing parents; returns the directories it created,
/// outermost first (for [`remove_dirs`]).
fn create_missing_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut missing: Vec<PathBuf> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && std::fs::symlink_metadata(d).is_err())
        .map(Path::to_path_buf)
        .collect();
    missing.reverse();
    if let Err(e) = std::fs::create_dir_all(dir) {
        remove_dirs(&missing);
        return Err(Error::io(dir, e));
    }
    Ok(missing)
}

/// Removes directories [`create_missing_dirs`] created, innermost first, each only if
/// it is empty.
fn remove_dirs(created: &[PathBuf]) {
    for d in created.iter().rev() {
        let _ = std::fs::remove_dir(d);
    }
}

/// A progress bar over `len` bytes (on a terminal only; cleared when dropped).
fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let template =
        format!("{what} [{{bar:30}}] {{bytes}}/{{total_bytes}} {{bytes_per_sec}} eta {{eta}}");
    indicatif::ProgressBar::new(len)
        .with_style(
            indicatif::ProgressStyle::with_template(&template)
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        )
        .with_finish(indicatif::ProgressFinish::AndClear)
}

/// A reader that fails once more than `cap` bytes have come through it.
struct Capped<R> {
    inner: R,
    cap: u64,
    read: u64,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.cap {
            return Err(std::io::Error::other(format!(
                "it decompresses to over {} bytes: not the CIFAR-10 binary archive",
                self.cap
            )));
        }
        Ok(n)
    }
}

/// Why [`copy_at_most`] stopped: a read failed (after so many bytes) or a write did.
enum CopyError {
    Read(std::io::Error, u64),
    Write(std::io::Error),
}

/// Copies `from` into `to` until `from` ends or `limit + 1` bytes have been copied
/// (so a count over `limit` means "too long"). Returns the count.
fn copy_at_most(
    from: impl Read,
    to: &mut std::fs::File,
    limit: u64,
) -> std::result::Result<u64, CopyError> {
    let mut from = from.take(limit.saturating_add(1));
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e, total)),
        };
        to.write_all(&buf[..n]).map_err(CopyError::Write)?;
        total += n as u64;
    }
}

/// Writes the known members of the archive into `staging`, checking each member's
/// header before writing it, the gzip trailer, and that every data file is present.
fn unpack(file: std::fs::File, len: u64, archive: &Path, staging: &Path) -> Result<()> {
    let bad = |msg: String| Error::Format {
        path: archive.to_path_buf(),
        msg,
    };
    let bar = progress_bar(len, "extracting");
    let gz = GzDecoder::new(std::io::BufReader::new(bar.wrap_read(file)));
    let mut tar = tar::Archive::new(Capped {
        inner: gz,
        cap: MAX_TAR_BYTES,
        read: 0,
    });
    let mut found: Vec<&str> = Vec::new();
    let entries = tar
        .entries()
        .map_err(|e| bad(format!("not a tar.gz archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("corrupt archive: {e}")))?;
        let Some(name) = known_member(&entry).map_err(bad)? else {
            continue;
        };
        if found.contains(&name) {
            return Err(bad(format!("member {TOP}/{name} appears twice")));
        }
        write_member(&mut entry, name, &staging.join(name), archive)?;
        found.push(name);
    }
    // Drain the stream to its end: the gzip trailer's CRC-32 checks every byte; and
    // nothing but zero padding (as tape-blocked archives have; Python's gzip skips it
    // too) may follow it.
    let mut stream = tar.into_inner();
    std::io::copy(&mut stream, &mut std::io::sink())
        .map_err(|e| bad(format!("corrupt or truncated archive: {e}")))?;
    if !only_zeros(stream.inner.into_inner()).map_err(|e| Error::io(archive, e))? {
        return Err(bad("data after the end of the gzip stream".into()));
    }
    let missing: Vec<&str> = FILES[..7]
        .iter()
        .copied()
        .filter(|f| !found.contains(f))
        .collect();
    if !missing.is_empty() {
        return Err(bad(format!(
            "not the CIFAR-10 binary archive: missing {}",
            missing.join(", ")
        )));
    }
    Ok(())
}

/// Whether everything `r` has left is zero bytes.
fn only_zeros(mut r: impl Read) -> std::io::Result<bool> {
    let mut buf = [0u8; 1 << 14];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(true),
            Ok(n) if buf[..n].iter().any(|&b| b != 0) => return Ok(false),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// What a tar entry that is not a regular file is, for an error message.
fn entry_kind(t: tar::EntryType) -> String {
    match t {
        t if t.is_dir() => "a directory".into(),
        t if t.is_symlink() => "a symbolic link".into(),
        t if t.is_hard_link() => "a hard link".into(),
        t if t.is_fifo() => "a named pipe (FIFO)".into(),
        t if t.is_character_special() || t.is_block_special() => "a device".into(),
        t => format!("an entry of type {:?}", t.as_byte() as char),
    }
}

/// Which of [`FILES`] `entry` is, from its header alone: `None` for the top directory
/// and pax global headers (nothing to extract), an error message for anything else the
/// CIFAR-10 archive does not hold (another name, another kind of entry than a regular
/// file, more bytes than the file can have).
fn known_member(
    entry: &tar::Entry<impl Read>,
) -> std::result::Result<Option<&'static str>, String> {
    let kind = entry.header().entry_type();
    if kind.is_pax_global_extensions() {
        return Ok(None);
    }
    let path = entry
        .path()
        .map_err(|e| format!("corrupt member name: {e}"))?;
    let shown = text::path(&path);
    let parts: Vec<Component> = path
        .components()
        .filter(|c| *c != Component::CurDir)
        .collect();
    let name = match parts[..] {
        [Component::Normal(top)] if top == TOP && kind.is_dir() => return Ok(None),
        [Component::Normal(top), Component::Normal(name)] if top == TOP => {
            FILES.iter().copied().find(|f| name == *f)
        }
        _ => None,
    };
    let size = entry.size();
    let Some(name) = name else {
        return Err(format!(
            "unexpected member {shown} ({size} bytes): not the CIFAR-10 binary archive, which holds only {TOP}/ and the files {} in it",
            FILES.join(", ")
        ));
    };
    if !(kind.is_file() || kind.is_contiguous()) {
        return Err(format!(
            "member {shown} is {}, not a regular file",
            entry_kind(kind)
        ));
    }
    let limit = member_limit(name);
    if size > limit {
        return Err(format!(
            "member {shown} declares {size} bytes, over the {limit} bytes {name} can have"
        ));
    }
    Ok(Some(name))
}

/// Writes member `name` (its header already checked) to a new file `dest`, at most
/// its limit, checking that exactly the declared bytes arrive.
fn write_member(
    entry: &mut tar::Entry<impl Read>,
    name: &str,
    dest: &Path,
    archive: &Path,
) -> Result<()> {
    let bad = |msg: String| Error::Format {
        path: archive.to_path_buf(),
        msg: format!("member {TOP}/{name}: {msg}"),
    };
    let declared = entry.size();
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .map_err(|e| Error::io(dest, e))?;
    let got = copy_at_most(&mut *entry, &mut out, member_limit(name)).map_err(|e| match e {
        CopyError::Read(e, n) => bad(format!("corrupt or truncated after {n} bytes: {e}")),
        CopyError::Write(e) => Error::io(dest, e),
    })?;
    if got != declared {
        return Err(bad(format!(
            "{got} bytes where its header declares {declared}"
        )));
    }
    out.sync_all().map_err(|e| Error::io(dest, e))
}

/// Reads the staged files as a data set (every record's size and label); an error
/// names the archive and the member.
fn validate(archive: &Path, staging: &Path) -> Result<(usize, usize)> {
    let in_archive = |path: &Path, msg: String| Error::Format {
        path: archive.to_path_buf(),
        msg: format!(
            "member {TOP}/{}: {msg}",
            path.file_name().map_or("?".into(), |n| n.to_string_lossy())
        ),
    };
    let (train, test) = Dataset::cifar_dir(staging).map_err(|e| match e {
        Error::Format { path, msg } => in_archive(&path, msg),
        Error::Io { path, source } => in_archive(&path, source.to_string()),
        e => e,
    })?;
    Ok((train.len(), test.len()))
}

/// Renames the staged files into `dir`, each replacing the file of its name; a
/// directory in the way is found before anything moves.
fn commit(staging: &Path, dir: &Path) -> Result<()> {
    let staged: Vec<&str> = FILES
        .into_iter()
        .filter(|f| staging.join(f).is_file())
        .collect();
    for name in &staged {
        let to = dir.join(name);
        if std::fs::symlink_metadata(&to).is_ok_and(|m| m.is_dir()) {
            return Err(Error::Format {
                path: to,
                msg: "is a directory: the extracted file cannot replace it".into(),
            });
        }
    }
    for name in staged {
        let to = dir.join(name);
        std::fs::rename(staging.join(name), &to).map_err(|e| Error::io(&to, e))?;
    }
    Ok(())
}

/// Downloads `url` to `dir/cifar-10-binary.tar.gz` (through a `.part` file, with a
/// progress bar when stderr is a terminal) and extracts it. Returns the archive path
/// and the train and test sizes. On failure `dir` is left as it was.
pub fn download(url: &str, dir: &Path, timeouts: Timeouts) -> Result<(PathBuf, usize, usize)> {
    let archive = dir.join(ARCHIVE);
    let part = dir.join(format!("{ARCHIVE}.part"));
    // a link (or pipe) left at the .part name would be written through, not replaced
    crate::files::check_output(&part)?;
    let created = create_missing_dirs(dir)?;
    let result = fetch(url, &part, timeouts).and_then(|()| {
        let sizes = extract(&part, dir).map_err(|e| Error::Format {
            path: PathBuf::from(url),
            msg: format!("the download is not a valid CIFAR-10 binary archive: {e}"),
        })?;
        std::fs::rename(&part, &archive).map_err(|e| Error::io(&archive, e))?;
        Ok(sizes)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&part);
        remove_dirs(&created);
    }
    let (train, test) = result?;
    Ok((archive, train, test))
}

/// A network error for a person: a timeout says what the limits were.
fn explain(e: ureq::Error, timeouts: Timeouts) -> String {
    match e {
        ureq::Error::Timeout(_) => format!(
            "{e} (limits: {} s to connect, {} s for each read)",
            timeouts.connect.as_secs_f64(),
            timeouts.idle.as_secs_f64()
        ),
        e => e.to_string(),
    }
}

/// Saves the body of `url` to `part`: at most [`MAX_ARCHIVE_BYTES`], all the bytes
/// the server announced, within the timeouts.
fn fetch(url: &str, part: &Path, timeouts: Timeouts) -> Result<()> {
    let net = |msg: String| Error::Format {
        path: PathBuf::from(url),
        msg,
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_resolve(Some(timeouts.connect))
        .timeout_connect(Some(timeouts.connect))
        .timeout_send_request(Some(timeouts.connect))
        .timeout_recv_response(Some(timeouts.idle))
        .timeout_per_read(Some(timeouts.idle))
        .build()
        .into();
    let response = agent
        .get(url)
        .call()
        .map_err(|e| net(format!("download failed: {}", explain(e, timeouts))))?;
    let len = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(len) = len.filter(|&l| l > MAX_ARCHIVE_BYTES) {
        return Err(net(format!(
            "the server announces {len} bytes, over the {MAX_ARCHIVE_BYTES}-byte limit: not the CIFAR-10 binary archive"
        )));
    }
    let bar = progress_bar(len.unwrap_or(0), "downloading");
    let mut body = response.into_body();
    let reader = bar.wrap_read(body.with_config().limit(MAX_ARCHIVE_BYTES + 1).reader());
    let mut out = std::fs::File::create(part).map_err(|e| Error::io(part, e))?;
    let total = copy_at_most(reader, &mut out, MAX_ARCHIVE_BYTES).map_err(|e| match e {
        CopyError::Read(e, n) => net(format!(
            "download interrupted after {n} bytes: {}",
            explain(e.into(), timeouts)
        )),
        CopyError::Write(e) => Error::io(part, e),
    })?;
    if total > MAX_ARCHIVE_BYTES {
        return Err(net(format!(
            "the server sent over {MAX_ARCHIVE_BYTES} bytes: not the CIFAR-10 binary archive"
        )));
    }
    if let Some(len) = len.filter(|&l| l != total) {
        return Err(net(format!("download incomplete: {total} of {len} bytes")));
    }
    out.sync_all().map_err(|e| Error::io(part, e))
}
