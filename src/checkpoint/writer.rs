//! Writing a checkpoint: snapshot → shard files → index → atomic commit; retention and
//! the `latest` pointer; the background saver.

use super::format::{
    shard_header, Chunk, Group, Index, Layout, TensorEntry, TrainingState, FORMAT, INDEX,
    INDEX_CHECKSUM, VERSION,
};
use crate::dist::{ProcessGroup, MAX_TAG};
use crate::error::{Error, Result};
use crate::optim::OptimizerKind;
use crate::tensor::{DType, Tensor};
use crate::VitConfig;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

/// One tensor of a snapshot: a copy-on-write share of the live tensor
/// ([`Tensor::share`]), so taking it copies nothing and training's next writes leave
/// it unchanged.
#[derive(Clone, Debug)]
pub struct SnapTensor {
    pub name: String,
    pub group: Group,
    pub tensor: Tensor,
}

impl SnapTensor {
    /// The little-endian bytes to write (borrowed for f32 on little-endian hosts).
    pub fn bytes(&self) -> Cow<'_, [u8]> {
        match self.tensor.f32s() {
            Ok(v) if cfg!(target_endian = "little") => Cow::Borrowed(bytemuck::cast_slice(v)),
            _ => Cow::Owned(self.tensor.to_le_bytes()),
        }
    }
}

/// Everything a checkpoint holds, in host memory, independent of the live model.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub model: VitConfig,
    pub optimizer: Option<OptimizerKind>,
    pub training: TrainingState,
    pub layout: Layout,
    /// This rank's tensors (replicas written by one rank only).
    pub rank: usize,
    /// Identifies the run (the same on every rank), so the ranks of a parallel save
    /// meet in one temporary directory that no earlier run can have left.
    pub run: u64,
    /// The number of this save within the run (the same on every rank; with `run`, it
    /// names a parallel save's temporary directory, so two saves never share one).
    pub save: u64,
    pub tensors: Vec<SnapTensor>,
    /// Every rank of a parallel run (`None` on one rank): each stage's writer tells
    /// rank 0 through it that its part is written, so a writer that dies fails the
    /// save at once instead of after a timeout.
    pub group: Option<SaveGroup>,
}

/// The process group of a parallel save.
#[derive(Clone)]
pub struct SaveGroup(pub Arc<dyn ProcessGroup>);

impl std::fmt::Debug for SaveGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SaveGroup(rank {} of {})", self.0.rank(), self.0.world())
    }
}

/// The message tag of save number `save`'s "part written" notices (user tags of the
/// world group are otherwise unused; the save number keeps saves apart).
fn part_tag(save: u64) -> u64 {
    (MAX_TAG >> 1) | (save % (MAX_TAG >> 1))
}

/// How checkpoints are written and kept.
#[derive(Clone, Debug)]
pub struct SaveOptions {
    /// Start a new shard file when the current one would grow past this many bytes
    /// (a tensor larger than this gets a shard of its own).
    pub shard_bytes: u64,
    /// Keep only the newest N committed checkpoints under the root (`None`: keep all).
    pub keep_last: Option<usize>,
    /// Also keep the best checkpoint by a test metric, named by the `best` pointer.
    pub keep_best: Option<BestBy>,
}

/// Which checkpoint is the best: the epoch-end checkpoint whose epoch has the best
/// value of `metric` in the training history (ties: the earliest).
#[derive(Clone, Debug, PartialEq)]
pub struct BestBy {
    pub metric: String,
    /// Higher is better (accuracies); else lower (losses).
    pub maximize: bool,
}

impl BestBy {
    pub fn max(metric: &str) -> BestBy {
        BestBy {
            metric: metric.into(),
            maximize: true,
        }
    }

    pub fn min(metric: &str) -> BestBy {
        BestBy {
            metric: metric.into(),
            maximize: false,
        }
    }

    /// The name of the best committed checkpoint under `root` by `history` (every
    /// epoch so far, each with its `step`): only epochs with a value of the metric
    /// count, and only those whose end was saved. The history of the newest
    /// checkpoint holds every earlier epoch's, so a resumed run finds the same one.
    pub fn best(&self, root: &Path, history: &[BTreeMap<String, f64>]) -> Option<String> {
        let mut best: Option<(f64, String)> = None;
        for epoch in history {
            let (Some(&v), Some(&step)) = (epoch.get(&self.metric), epoch.get("step")) else {
                continue;
            };
            let name = checkpoint_name(step as u64);
            let better = best.as_ref().is_none_or(|(b, _)| match self.maximize {
                true => v > *b,
                false => v < *b,
            });
            if v.is_finite() && better && root.join(&name).join(super::INDEX).is_file() {
                best = Some((v, name));
            }
        }
        best.map(|(_, name)| name)
    }
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            shard_bytes: 2 << 30,
            keep_last: None,
            keep_best: None,
        }
    }
}

/// The directory name of the checkpoint taken after `step` updates.
pub fn checkpoint_name(step: u64) -> String {
    format!("step-{step:010}")
}

/// Whether `name` is one [`checkpoint_name`] makes.
pub fn is_checkpoint_name(name: &str) -> bool {
    name.strip_prefix("step-")
        .is_some_and(|d| d.len() >= 10 && d.bytes().all(|b| b.is_ascii_digit()))
}

/// Fault injection for crash tests: with `FERROVIT_FAULT_SAVE=k` and
/// `FERROVIT_FAULT_STOP_AT_BYTE=n`, save number k (0-based, in this process) stops
/// once n bytes of its files (shards, then the index) are written — or, when n is past
/// the end, after the directory rename and before the `latest` pointer moves — prints
/// `fault: stopped` on stderr and waits to be killed; with `FERROVIT_FAULT_ENOSPC=1`
/// as well, it fails there instead, as on a full disk. `FERROVIT_FAULT_DELETE_AFTER=n`
/// stops retention the same way after it has deleted n files.
struct Fault {
    stop_at: Option<u64>,
    written: u64,
}

static SAVES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static DELETED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn fault_env(k: &str) -> Option<u64> {
    std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok())
}

fn hang(at: &str) -> ! {
    eprintln!("fault: stopped {at}");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}

impl Fault {
    fn for_this_save() -> Fault {
        let n = SAVES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let stop_at = match (
            fault_env("FERROVIT_FAULT_SAVE"),
            fault_env("FERROVIT_FAULT_STOP_AT_BYTE"),
        ) {
            (Some(k), Some(b)) if k == n => Some(b),
            _ => None,
        };
        Fault {
            stop_at,
            written: 0,
        }
    }

    /// Stops here as configured: waits to be killed, or fails as a full disk does.
    fn trip(&self, path: &Path) -> Result<()> {
        if fault_env("FERROVIT_FAULT_ENOSPC") == Some(1) {
            let e = std::io::Error::new(std::io::ErrorKind::StorageFull, "injected: disk full");
            return Err(Error::io(path, e));
        }
        hang(&format!("at byte {}", self.written))
    }

    /// Writes `bytes`, stopping at the fault byte if it falls inside.
    fn write(&mut self, f: &mut std::fs::File, bytes: &[u8], path: &Path) -> Result<()> {
        if let Some(stop) = self.stop_at {
            if self.written + bytes.len() as u64 >= stop && stop >= self.written {
                let k = (stop - self.written) as usize;
                f.write_all(&bytes[..k]).map_err(|e| Error::io(path, e))?;
                let _ = f.flush();
                self.written = stop;
                self.stop_at = None;
                return self.trip(path);
            }
        }
        f.write_all(bytes).map_err(|e| Error::io(path, e))?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn after_commit(&self) {
        if self.stop_at.is_some_and(|s| s > self.written) {
            hang("after the commit");
        }
    }

    /// Counts a file retention deleted, stopping after the configured number.
    fn deleted() {
        let n = DELETED.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        if fault_env("FERROVIT_FAULT_DELETE_AFTER") == Some(n) {
            hang(&format!("after deleting {n} files"));
        }
    }
}

/// Starts writeback of a range just written, so the device writes while the next
/// blocks are copied and the final fsync waits for less (Linux; a no-op elsewhere).
fn start_writeback(f: &std::fs::File, offset: u64, len: usize) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open descriptor and a plain range; failure only means the
        // kernel writes back later, at the fsync.
        unsafe {
            libc::sync_file_range(
                f.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (f, offset, len);
}

fn fsync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Writes the snapshot's tensors into shard files in `dir`; returns the index entries.
fn write_shards(
    snap: &Snapshot,
    dir: &Path,
    opts: &SaveOptions,
    fault: &mut Fault,
) -> Result<BTreeMap<String, TensorEntry>> {
    // Pack tensors into shards in order, each shard at most `shard_bytes` of data.
    let mut shards: Vec<Vec<&SnapTensor>> = vec![Vec::new()];
    let mut size = 0u64;
    for t in &snap.tensors {
        let len = (t.tensor.numel() * t.tensor.dtype().size_in_bytes()) as u64;
        if size > 0 && size + len > opts.shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        if let Some(s) = shards.last_mut() {
            s.push(t);
        }
        size += len;
    }
    let count = shards.len();
    let mut entries = BTreeMap::new();
    for (k, tensors) in shards.iter().enumerate() {
        let file = format!(
            "rank{:05}-{:05}-of-{count:05}.safetensors",
            snap.rank,
            k + 1
        );
        let path = dir.join(&file);
        let meta: Vec<(&str, DType, &[usize])> = tensors
            .iter()
            .map(|t| (t.name.as_str(), t.tensor.dtype(), t.tensor.dims()))
            .collect();
        let (header, ranges) = shard_header(&meta)?;
        let mut f = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        fault.write(&mut f, &header, &path)?;
        let mut pos = header.len() as u64;
        for (t, [s, e]) in tensors.iter().zip(ranges) {
            // checksum each block right before writing it: one pass over the source
            let mut crc = crc32fast::Hasher::new();
            for block in t.bytes().chunks(1 << 20) {
                crc.update(block);
                fault.write(&mut f, block, &path)?;
                start_writeback(&f, pos, block.len());
                pos += block.len() as u64;
            }
            let base = header.len() as u64;
            entries.insert(
                t.name.clone(),
                TensorEntry {
                    dtype: t.tensor.dtype(),
                    shape: t.tensor.dims().to_vec(),
                    group: t.group,
                    chunks: vec![Chunk {
                        file: file.clone(),
                        key: t.name.clone(),
                        start: base + s,
                        end: base + e,
                        offset: 0,
                        crc32: crc.finalize(),
                        rank: snap.rank,
                    }],
                },
            );
        }
        f.sync_all().map_err(|e| Error::io(&path, e))?;
    }
    Ok(entries)
}

/// Saves a snapshot as `root/<name>` with the commit protocol: everything is written
/// into a temporary directory and fsynced, the index's checksum and then the index
/// last; the directory is renamed into place and the root fsynced; then the `latest`
/// pointer is replaced atomically and old checkpoints beyond `keep_last` are removed.
/// A save that fails removes its temporary directory. Returns the checkpoint path.
///
/// In a parallel run every rank calls it with its own snapshot (the root must be on
/// storage all ranks share): the first replica of each stage writes its shards and a
/// part of the index and tells rank 0; rank 0 waits for every part (a writer that
/// dies or fails fails the save at once), then writes the index and commits. Other
/// ranks return once their part is written (before the commit); replicas write
/// nothing.
pub fn save(snap: &Snapshot, root: &Path, name: &str, opts: &SaveOptions) -> Result<PathBuf> {
    super::format::check_file_name(name).map_err(Error::Config)?;
    let layout = &snap.layout;
    let (replica, _) = layout.coords(snap.rank);
    if layout.world > 1 && replica != 0 {
        return Ok(root.join(name)); // its stage's first replica writes the same tensors
    }
    std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    let tmp = if layout.world > 1 {
        root.join(format!(".tmp-{name}-{:016x}-{}", snap.run, snap.save))
    } else {
        let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        tmp
    };
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut fault = Fault::for_this_save();
    let written = write_shards(snap, &tmp, opts, &mut fault);
    let result = if snap.rank == 0 {
        written
            .and_then(|tensors| gather_parts(snap, &tmp, tensors))
            .and_then(|tensors| commit(snap, root, name, &tmp, tensors, &mut fault))
    } else {
        notify_part(snap, &tmp, written).map(|_| root.join(name))
    };
    if result.is_err() && snap.rank == 0 {
        let _ = std::fs::remove_dir_all(&tmp); // nothing of a failed save stays behind
    }
    let dest = result?;
    if snap.rank == 0 {
        fault.after_commit();
        set_latest(root, name)?;
        let best = opts
            .keep_best
            .as_ref()
            .and_then(|b| b.best(root, &snap.training.history));
        if let Some(best) = &best {
            set_pointer(root, BEST, best)?;
        }
        if let Some(keep) = opts.keep_last {
            retain(root, keep, best.as_deref())?;
        }
    }
    Ok(dest)
}

/// Rank 0 of a parallel save: adds every other stage's part to its own entries, in
/// stage order, as each writer reports it written.
fn gather_parts(
    snap: &Snapshot,
    tmp: &Path,
    mut tensors: BTreeMap<String, TensorEntry>,
) -> Result<BTreeMap<String, TensorEntry>> {
    let layout = &snap.layout;
    if layout.world == 1 {
        return Ok(tensors);
    }
    let group = save_group(snap)?;
    for rank in (1..layout.pp).map(|s| layout.rank_of(0, s)) {
        let ok = group.0.recv(rank, part_tag(snap.save)).map_err(|e| {
            Error::Comm(format!(
                "checkpoint {}: no part from rank {rank} ({e}); the checkpoint stays uncommitted",
                tmp.display()
            ))
        })?;
        if ok != [1.0] {
            return Err(Error::Comm(format!(
                "checkpoint {}: rank {rank} failed to write its part; the checkpoint stays uncommitted",
                tmp.display()
            )));
        }
        for (n, e) in read_part(tmp, rank)? {
            if tensors.insert(n.clone(), e).is_some() {
                return Err(Error::Format {
                    path: tmp.to_path_buf(),
                    msg: format!("tensor `{n}` written by two ranks"),
                });
            }
        }
    }
    Ok(tensors)
}

/// A stage writer other than rank 0: publishes its part and tells rank 0 whether it
/// succeeded (so rank 0 never waits on a writer that has given up).
fn notify_part(
    snap: &Snapshot,
    tmp: &Path,
    written: Result<BTreeMap<String, TensorEntry>>,
) -> Result<()> {
    let group = save_group(snap)?;
    let result = written.and_then(|tensors| write_part(tmp, snap.rank, &tensors));
    let flag = if result.is_ok() { 1.0 } else { 0.0 };
    group.0.send(&[flag], 0, part_tag(snap.save))?;
    result
}

fn save_group(snap: &Snapshot) -> Result<&SaveGroup> {
    snap.group.as_ref().ok_or_else(|| {
        Error::Config("a parallel checkpoint save needs its process group (Snapshot::group)".into())
    })
}

/// Writes the index (its checksum first) into `tmp` and renames `tmp` to
/// `root/name`, replacing a checkpoint of that name.
fn commit(
    snap: &Snapshot,
    root: &Path,
    name: &str,
    tmp: &Path,
    tensors: BTreeMap<String, TensorEntry>,
    fault: &mut Fault,
) -> Result<PathBuf> {
    let weight_map = tensors
        .iter()
        .filter(|(_, t)| t.group == Group::Model)
        .map(|(n, t)| (n.clone(), t.chunks[0].file.clone()))
        .collect();
    let index = Index {
        format: FORMAT.into(),
        version: VERSION,
        model: snap.model.clone(),
        optimizer: snap.optimizer,
        training: snap.training.clone(),
        layout: snap.layout.clone(),
        tensors,
        weight_map,
    };
    let json =
        serde_json::to_vec_pretty(&index).map_err(|e| Error::Config(format!("index: {e}")))?;
    let sum_path = tmp.join(INDEX_CHECKSUM);
    let sum = format!("{:08x}\n", crc32fast::hash(&json));
    std::fs::write(&sum_path, sum)
        .and_then(|_| std::fs::File::open(&sum_path)?.sync_all())
        .map_err(|e| Error::io(&sum_path, e))?;
    let index_path = tmp.join(INDEX);
    let mut f = std::fs::File::create(&index_path).map_err(|e| Error::io(&index_path, e))?;
    fault.write(&mut f, &json, &index_path)?;
    f.sync_all().map_err(|e| Error::io(&index_path, e))?;
    fsync_dir(tmp)?;

    let dest = root.join(name);
    if dest.exists() {
        // Replacing a checkpoint of the same name: move the old one aside first, so
        // a crash leaves either the old or the new one committed.
        let old = root.join(format!(".old-{name}-{}", std::process::id()));
        std::fs::rename(&dest, &old).map_err(|e| Error::io(&dest, e))?;
        std::fs::rename(tmp, &dest).map_err(|e| Error::io(&dest, e))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(tmp, &dest).map_err(|e| Error::io(&dest, e))?;
    }
    fsync_dir(root)?;
    Ok(dest)
}

fn part_path(tmp: &Path, rank: usize) -> PathBuf {
    tmp.join(format!(".part-rank{rank:05}.json"))
}

/// A rank's index entries, published atomically (written, fsynced, renamed) once its
/// shards are durable.
fn write_part(tmp: &Path, rank: usize, tensors: &BTreeMap<String, TensorEntry>) -> Result<()> {
    let path = part_path(tmp, rank);
    let partial = path.with_extension("tmp");
    let json =
        serde_json::to_vec(tensors).map_err(|e| Error::Config(format!("index part: {e}")))?;
    std::fs::write(&partial, json)
        .and_then(|_| std::fs::File::open(&partial)?.sync_all())
        .map_err(|e| Error::io(&partial, e))?;
    std::fs::rename(&partial, &path).map_err(|e| Error::io(&path, e))
}

/// Reads and removes a rank's index part (once the rank has reported it written).
fn read_part(tmp: &Path, rank: usize) -> Result<BTreeMap<String, TensorEntry>> {
    let path = part_path(tmp, rank);
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let part = serde_json::from_slice(&bytes).map_err(|e| Error::Format {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
    Ok(part)
}

/// The `latest` pointer: a file naming the newest committed checkpoint, replaced by
/// write-to-temporary + rename.
pub fn set_latest(root: &Path, name: &str) -> Result<()> {
    set_pointer(root, "latest", name)
}

/// The pointer naming the best checkpoint (`SaveOptions::keep_best`).
pub const BEST: &str = "best";

/// A pointer file `root/<pointer>` naming a checkpoint, replaced by write-to-temporary
/// + rename.
fn set_pointer(root: &Path, pointer: &str, name: &str) -> Result<()> {
    let tmp = root.join(format!(".{pointer}.tmp"));
    let path = root.join(pointer);
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(format!("{name}\n").as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    fsync_dir(root)
}

/// Removes all but the newest `keep` committed checkpoints (never the newest one, the
/// one `latest` names, nor `best`). Each is first renamed out of the namespace (to a hidden
/// `.del-…` directory, which is never a checkpoint), so a crash in the middle of the
/// removal cannot leave a half-deleted directory that looks committed.
pub fn retain(root: &Path, keep: usize, best: Option<&str>) -> Result<Vec<PathBuf>> {
    let list = super::list(root)?;
    let kept = [super::read_latest(root), best.map(String::from)];
    let mut removed = Vec::new();
    let n = list.committed.len();
    for p in list.committed.iter().take(n.saturating_sub(keep.max(1))) {
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if kept.iter().any(|k| k.as_deref() == Some(name)) {
            continue;
        }
        let doomed = root.join(format!(".del-{name}-{}", std::process::id()));
        std::fs::rename(p, &doomed).map_err(|e| Error::io(p, e))?;
        fsync_dir(root)?;
        remove_checkpoint_dir(&doomed).map_err(|e| Error::io(&doomed, e))?;
        removed.push(p.clone());
    }
    Ok(removed)
}

/// Removes a checkpoint directory (files only, as the writer makes them; anything
/// else in it goes with `remove_dir_all`).
fn remove_checkpoint_dir(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if std::fs::symlink_metadata(&path)?.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
            Fault::deleted();
        }
    }
    std::fs::remove_dir(dir)
}

/// Saves on a background thread. `save` first waits for the previous save and returns
/// its error if it failed; `wait` does the same at the end. Dropping the saver waits
/// too (logging an error it can no longer return).
#[derive(Debug, Default)]
pub struct AsyncSaver {
    pending: Option<JoinHandle<Result<PathBuf>>>,
}

impl AsyncSaver {
    /// Starts writing `snap`; returns once the previous save has finished (with its
    /// path).
    pub fn save(
        &mut self,
        snap: Snapshot,
        root: PathBuf,
        name: String,
        opts: SaveOptions,
    ) -> Result<Option<PathBuf>> {
        let previous = self.wait()?;
        self.pending = Some(std::thread::spawn(move || save(&snap, &root, &name, &opts)));
        Ok(previous)
    }

    /// Waits for the save in flight, if any; returns its path or its error.
    pub fn wait(&mut self) -> Result<Option<PathBuf>> {
        match self.pending.take() {
            None => Ok(None),
            Some(h) => h
                .join()
                .map_err(|_| Error::Config("the checkpoint writer thread panicked".into()))?
                .map(Some),
        }
    }
}

impl Drop for AsyncSaver {
    fn drop(&mut self) {
        if let Err(e) = self.wait() {
            tracing::error!("checkpoint save failed: {e}");
        }
    }
}
