//! Reading a checkpoint: the index, then shards memory-mapped on first use, every
//! header validated, every byte range checksummed before its data is used.

use super::format::{
    check_file_name, parse_shard_header, Chunk, Index, ShardHeader, TensorEntry, INDEX,
    INDEX_CHECKSUM, MAX_INDEX_BYTES,
};
use crate::error::{Error, Result};
use crate::files::{open_regular, read_bounded, Links};
use crate::tensor::{DType, Tensor};
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// A memory-mapped, header-validated shard.
struct Shard {
    map: Arc<Mmap>,
    header: ShardHeader,
}

/// An open checkpoint: the validated index; shards are mapped when first read.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub index: Index,
    files: BTreeMap<String, OnceLock<std::result::Result<Shard, String>>>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .finish()
    }
}

/// What `verify` checked.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub files: usize,
    pub tensors: usize,
    pub bytes: u64,
}

impl Checkpoint {
    /// Opens a committed checkpoint directory (one with `index.json`).
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let index = read_index(dir)?;
        let files = index
            .tensors
            .values()
            .flat_map(|t| t.chunks.iter().map(|c| (c.file.clone(), OnceLock::new())))
            .collect();
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            index,
            files,
        })
    }

    /// Names of the tensors of a group (model weights or optimizer state), sorted.
    pub fn names(&self, group: super::Group) -> Vec<&str> {
        self.index
            .tensors
            .iter()
            .filter(|(_, t)| t.group == group)
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// The stored name of parameter `param` among `weights`: itself, or its EMA
    /// (`ema.<param>`); asking for the EMA of a checkpoint without one is an error
    /// naming the checkpoint.
    pub fn weight_name(&self, param: &str, weights: super::Weights) -> Result<String> {
        match weights {
            super::Weights::Raw => Ok(param.to_string()),
            _ if self.names(super::Group::Ema).is_empty() => Err(Error::Format {
                path: self.dir.clone(),
                msg: "the checkpoint has no EMA of the weights (its run had no --ema-decay): use --weights raw".into(),
            }),
            super::Weights::Ema => Ok(format!("{}{param}", crate::optim::EMA_PREFIX)),
        }
    }

    pub fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.index.tensors.get(name).ok_or_else(|| Error::Format {
            path: self.dir.join(INDEX),
            msg: format!("no tensor `{name}` in the checkpoint"),
        })
    }

    fn shard(&self, file: &str) -> Result<&Shard> {
        let path = self.dir.join(file);
        let cell = self.files.get(file).ok_or_else(|| Error::Format {
            path: path.clone(),
            msg: "not listed in the index".into(),
        })?;
        cell.get_or_init(|| map_shard(&path).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|msg| Error::Message(msg.clone()))
    }

    /// The bytes of one chunk in its shard, after checking the range and dtype against
    /// the shard's header (not yet the checksum).
    fn chunk_range(&self, name: &str, t: &TensorEntry, c: &Chunk) -> Result<&[u8]> {
        let path = self.dir.join(&c.file);
        let bad = |msg: String| Error::Format {
            path: path.clone(),
            msg: format!("tensor `{name}`: {msg}"),
        };
        let shard = self.shard(&c.file)?;
        let h = shard
            .header
            .entries
            .get(&c.key)
            .ok_or_else(|| bad(format!("the shard has no tensor `{}`", c.key)))?;
        let [s, e] = h.data_offsets;
        let (s, e) = (shard.header.data_start + s, shard.header.data_start + e);
        if (s, e) != (c.start, c.end) {
            return Err(bad(format!(
                "index says bytes {}..{}, the shard header says {s}..{e}",
                c.start, c.end
            )));
        }
        if h.dtype != t.dtype.name() {
            return Err(bad(format!(
                "index says dtype {}, the shard header says {}",
                t.dtype, h.dtype
            )));
        }
        // Fault the range in with one call instead of a page fault per 4 KiB (Linux
        // 5.14+; elsewhere, or on failure, pages fault in as they are read).
        #[cfg(target_os = "linux")]
        {
            let page = s as usize & !4095;
            let _ = shard
                .map
                .advise_range(memmap2::Advice::PopulateRead, page, e as usize - page);
        }
        shard
            .map
            .get(s as usize..e as usize)
            .ok_or_else(|| bad(format!("bytes {s}..{e} are outside the file")))
    }

    fn checksum_error(&self, name: &str, c: &Chunk, crc: u32) -> Error {
        Error::Format {
            path: self.dir.join(&c.file),
            msg: format!(
                "tensor `{name}`: checksum mismatch in bytes {}..{}: stored {:08x}, computed {crc:08x} (corrupted data)",
                c.start, c.end, c.crc32
            ),
        }
    }

    /// The bytes of one chunk, checksum verified.
    fn chunk_bytes(&self, name: &str, t: &TensorEntry, c: &Chunk) -> Result<&[u8]> {
        let bytes = self.chunk_range(name, t, c)?;
        let crc = crc32fast::hash(bytes);
        if crc != c.crc32 {
            return Err(self.checksum_error(name, c, crc));
        }
        Ok(bytes)
    }

    /// Copies every chunk of tensor `name` to its place in `dst` (the tensor's bytes),
    /// checksums verified; on an error `dst` may hold part of the data.
    fn copy_chunks(&self, name: &str, t: &TensorEntry, dst: &mut [u8]) -> Result<()> {
        let size = t.dtype.size_in_bytes() as u64;
        for c in &t.chunks {
            // the index's checks keep every chunk inside its tensor; checked again here
            let part = chunk_place(c, size)
                .and_then(|r| dst.get_mut(r))
                .ok_or_else(|| Error::Format {
                    path: self.dir.join(INDEX),
                    msg: format!("tensor `{name}`: a chunk lies outside the tensor"),
                })?;
            self.copy_chunk(name, t, c, part)?;
        }
        Ok(())
    }

    /// Copies a chunk into `dst` (its length) in one pass over the source: tasks of
    /// [`TASK`] bytes in parallel, their CRCs combined in order; on a mismatch `dst`
    /// holds garbage and the error says so.
    fn copy_chunk(&self, name: &str, t: &TensorEntry, c: &Chunk, dst: &mut [u8]) -> Result<()> {
        use rayon::prelude::*;
        let src = self.chunk_range(name, t, c)?;
        let parts: Vec<crc32fast::Hasher> = src
            .par_chunks(TASK)
            .zip(dst.par_chunks_mut(TASK))
            .map(|(s, d)| super::crc_copy::checksum_copy(s, d))
            .collect();
        let mut crc = crc32fast::Hasher::new();
        for p in &parts {
            crc.combine(p);
        }
        let crc = crc.finalize();
        if crc != c.crc32 {
            return Err(self.checksum_error(name, c, crc));
        }
        Ok(())
    }

    /// Reads one tensor (checksums verified) into a new tensor of its dtype.
    pub fn read(&self, name: &str) -> Result<Tensor> {
        let t = self.entry(name)?;
        let dtype = t.dtype;
        if dtype == DType::F32 && cfg!(target_endian = "little") {
            // straight into the tensor's storage: one copy, no zero-fill
            let mut out = Tensor::uninit(t.shape.as_slice(), crate::tensor::Device::Cpu);
            self.read_into(name, &mut out)?;
            return Ok(out);
        }
        let mut bytes = vec![0u8; t.numel() as usize * dtype.size_in_bytes()];
        self.copy_chunks(name, t, &mut bytes)?;
        Tensor::from_le_bytes(&bytes, dtype, t.shape.as_slice())
    }

    /// Reads an F32 tensor into an existing f32 tensor of the same shape (checksums
    /// verified; on an error `dst` may hold part of the data).
    pub fn read_into(&self, name: &str, dst: &mut Tensor) -> Result<()> {
        let t = self.entry(name)?;
        if t.dtype != DType::F32 || t.shape.as_slice() != dst.dims() || cfg!(target_endian = "big")
        {
            return Err(Error::Format {
                path: self.dir.join(INDEX),
                msg: format!(
                    "tensor `{name}` is {} {:?}; cannot read it into f32 {:?}",
                    t.dtype,
                    t.shape,
                    dst.dims()
                ),
            });
        }
        self.copy_chunks(name, t, bytemuck::cast_slice_mut(dst.f32s_mut()?))
    }

    /// A zero-copy view of an F32 tensor stored in one chunk, straight from the page
    /// cache (checksum verified).
    pub fn view_f32(&self, name: &str) -> Result<&[f32]> {
        let t = self.entry(name)?;
        let not = |why: &str| Error::Format {
            path: self.dir.join(INDEX),
            msg: format!("tensor `{name}` cannot be viewed in place: {why}"),
        };
        if t.dtype != DType::F32 {
            return Err(not("not F32"));
        }
        let [c] = t.chunks.as_slice() else {
            return Err(not("stored in several chunks"));
        };
        let bytes = self.chunk_bytes(name, t, c)?;
        if cfg!(target_endian = "big") {
            return Err(not("big-endian host"));
        }
        bytemuck::try_cast_slice(bytes).map_err(|_| not("unaligned data"))
    }

    /// An F32 tensor (stored in one chunk) used in place: its elements are the page
    /// cache's (checksum verified), no copy; it keeps the shard mapped while it lives,
    /// and writing to it copies it first.
    pub fn view(&self, name: &str) -> Result<Tensor> {
        let len = self.view_f32(name)?.len();
        let t = self.entry(name)?;
        let c = &t.chunks[0];
        let map = self.shard(&c.file)?.map.clone();
        let buf = crate::tensor::Buf::mapped(map, c.start as usize, len).ok_or_else(|| {
            Error::Format {
                path: self.dir.join(&c.file),
                msg: format!("tensor `{name}` cannot be viewed in place"),
            }
        })?;
        Tensor::from_buf(buf, t.shape.as_slice())
    }

    /// Checks every shard header, every chunk's bounds and checksum, and that every
    /// shard in the directory's index is readable.
    pub fn verify(&self) -> Result<VerifyReport> {
        let mut report = VerifyReport {
            files: self.files.len(),
            ..VerifyReport::default()
        };
        for (name, t) in &self.index.tensors {
            for c in &t.chunks {
                report.bytes += self.chunk_bytes(name, t, c)?.len() as u64;
            }
            report.tensors += 1;
        }
        Ok(report)
    }
}

/// Bytes per parallel task of a chunk copy (each a CRC to combine).
const TASK: usize = 1 << 20;

/// The bytes chunk `c` fills among its tensor's (of `size`-byte elements).
fn chunk_place(c: &Chunk, size: u64) -> Option<std::ops::Range<usize>> {
    let at = usize::try_from(c.offset.checked_mul(size)?).ok()?;
    let len = usize::try_from(c.end.checked_sub(c.start)?).ok()?;
    Some(at..at.checked_add(len)?)
}

/// Reads, verifies and parses a checkpoint's index: its bytes must match
/// `index.json.crc32` before any of it is used (a version-1 index, written before the
/// checksum existed, is read without one).
pub fn read_index(dir: &Path) -> Result<Index> {
    let path = dir.join(INDEX);
    if !dir.is_dir() {
        let msg = match std::fs::metadata(dir) {
            Ok(_) => "not a directory (a checkpoint is a directory of shards and an index)",
            Err(_) => "checkpoint directory does not exist",
        };
        return Err(Error::Format {
            path: dir.to_path_buf(),
            msg: msg.into(),
        });
    }
    let bytes = read_bounded(&path, MAX_INDEX_BYTES, Links::Refuse).map_err(|e| match e {
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            Error::Format {
                path: dir.to_path_buf(),
                msg: format!("not a committed checkpoint: no {INDEX} (an interrupted save?)"),
            }
        }
        e => e,
    })?;
    let sum_path = dir.join(INDEX_CHECKSUM);
    let checksummed = match read_bounded(&sum_path, 64, Links::Refuse) {
        Ok(text) => {
            let stored = std::str::from_utf8(&text)
                .ok()
                .and_then(|t| u32::from_str_radix(t.trim_end(), 16).ok())
                .ok_or_else(|| Error::Format {
                    path: sum_path.clone(),
                    msg: "not a CRC-32 in hex (corrupted checksum file)".into(),
                })?;
            let crc = crc32fast::hash(&bytes);
            if crc != stored {
                return Err(Error::Format {
                    path,
                    msg: format!(
                        "does not match its checksum in {INDEX_CHECKSUM}: stored {stored:08x}, computed {crc:08x} (the index was corrupted or edited)"
                    ),
                });
            }
            true
        }
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    };
    Index::parse(&bytes, &path, checksummed)
}

fn map_shard(path: &Path) -> Result<Shard> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    check_file_name(name).map_err(|msg| Error::Format {
        path: path.to_path_buf(),
        msg,
    })?;
    let (file, len) = open_regular(path, Links::Refuse)?;
    // SAFETY: the map is read-only; a file changed underneath us by another process
    // can give wrong bytes, which the CRC-32 of every range read then rejects.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let header = parse_shard_header(&map, len, path)?;
    Ok(Shard {
        map: Arc::new(map),
        header,
    })
}
