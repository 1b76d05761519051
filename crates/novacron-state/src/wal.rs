//! The Raft log's files: append-only segments of checksummed frames in `DATA/raft-log/`.
//!
//! Format, version 1. A segment is named after the index of its first frame
//! (`00000000000000000042.seg`) and starts with the magic `NCWAL01\n`. Then frames:
//!
//! | bytes | field                                                     |
//! |-------|-----------------------------------------------------------|
//! | 8     | log index, little-endian                                  |
//! | 4     | payload length, little-endian                             |
//! | 4     | CRC-32 of the twelve bytes above and the payload           |
//! | n     | payload (opaque here; the log store puts a JSON entry in) |
//!
//! Invariants:
//! - Inside a segment, indexes go up by one. An append that does not follow the last index (the
//!   first after a snapshot replaced the whole log) starts a new segment, so every entry of a
//!   segment is below the next segment's first index.
//! - Truncation and purges remove frames from disk; nothing is ever rewritten in place. Only the
//!   last segment can end in a torn frame (a crash during a write): loading cuts it off there. A
//!   bad frame anywhere else is corruption, and loading refuses.
//! - Nothing is durable until [`Wal::sync`] returns; a new or deleted segment is made durable by
//!   syncing the directory too.
//!
//! No thread, no async, no knowledge of Raft: the log store drives it from its flusher thread.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"NCWAL01\n";
const FRAME_HEADER: usize = 16;
/// A frame claiming more than this is garbage, not an entry.
const MAX_PAYLOAD: usize = 64 << 20;
/// A new segment is started once the current one is this big (purges delete whole segments).
pub const SEGMENT_BYTES: u64 = 4 << 20;

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn crc(index: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&index.to_le_bytes());
    h.update(&(payload.len() as u32).to_le_bytes());
    h.update(payload);
    h.finalize()
}

fn encode(out: &mut Vec<u8>, index: u64, payload: &[u8]) {
    out.extend_from_slice(&index.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc(index, payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// One frame decoded from `buf` at `at`: `(index, payload, next offset)`, or `None` when what is
/// there is not a whole, intact frame.
fn decode(buf: &[u8], at: usize) -> Option<(u64, &[u8], usize)> {
    let header = buf.get(at..at + FRAME_HEADER)?;
    let index = u64::from_le_bytes(header[0..8].try_into().ok()?);
    let len = u32::from_le_bytes(header[8..12].try_into().ok()?) as usize;
    let sum = u32::from_le_bytes(header[12..16].try_into().ok()?);
    if len > MAX_PAYLOAD {
        return None;
    }
    let payload = buf.get(at + FRAME_HEADER..at + FRAME_HEADER + len)?;
    (crc(index, payload) == sum).then_some((index, payload, at + FRAME_HEADER + len))
}

/// Frames as `(index, payload)`, in index order.
pub type Frames = Vec<(u64, Vec<u8>)>;

/// The log's segment files. See the module doc.
pub struct Wal {
    dir: PathBuf,
    /// Segment first index → its length, counting frames not written yet.
    segments: BTreeMap<u64, u64>,
    /// The last segment, open for appending; `None` until the first append after opening an
    /// empty log or purging everything.
    file: Option<File>,
    /// Frames for the last segment not written to it yet.
    pending: Vec<u8>,
    /// Every frame on disk or pending: index → (segment, offset).
    positions: BTreeMap<u64, (u64, u64)>,
    dir_dirty: bool,
}

impl Wal {
    /// Opens the log in `dir` (created if missing) and returns every intact frame in order. A
    /// torn frame at the end of the last segment is cut off.
    pub fn open(dir: &Path) -> io::Result<(Self, Frames)> {
        fs::create_dir_all(dir)?;
        let mut names = Vec::new();
        for e in fs::read_dir(dir)? {
            let name = e?.file_name();
            let name = name.to_string_lossy();
            if let Some(first) = name.strip_suffix(".seg") {
                let first: u64 = first
                    .parse()
                    .map_err(|_| invalid(format!("unexpected file {name} in the Raft log")))?;
                names.push(first);
            }
        }
        names.sort_unstable();
        let mut wal = Wal {
            dir: dir.to_path_buf(),
            segments: BTreeMap::new(),
            file: None,
            pending: Vec::new(),
            positions: BTreeMap::new(),
            dir_dirty: false,
        };
        let mut frames = Vec::new();
        for (n, &first) in names.iter().enumerate() {
            let last_segment = n + 1 == names.len();
            let path = wal.path(first);
            let buf = fs::read(&path)?;
            let mut at = MAGIC.len();
            if buf.len() < MAGIC.len() || &buf[..MAGIC.len()] != MAGIC {
                // A crash right after creating the file leaves it (partly) empty.
                if last_segment && MAGIC.starts_with(&buf) {
                    fs::write(&path, MAGIC)?;
                    at = MAGIC.len();
                } else {
                    return Err(invalid(format!(
                        "{} is not a NovaCron log segment (or a newer format)",
                        path.display()
                    )));
                }
            }
            let mut expected: Option<u64> = None;
            while at < buf.len() {
                let Some((index, payload, next)) = decode(&buf, at) else {
                    if !last_segment {
                        return Err(invalid(format!(
                            "{} is corrupt at byte {at} (not the last segment, so not a torn write)",
                            path.display()
                        )));
                    }
                    tracing::warn!(
                        segment = %path.display(),
                        offset = at,
                        dropped = buf.len() - at,
                        "cutting a torn write off the end of the Raft log"
                    );
                    OpenOptions::new()
                        .write(true)
                        .open(&path)?
                        .set_len(at as u64)?;
                    break;
                };
                if index < first || expected.is_some_and(|e| e != index) {
                    return Err(invalid(format!(
                        "{} holds index {index} out of order at byte {at}",
                        path.display()
                    )));
                }
                expected = Some(index + 1);
                wal.positions.insert(index, (first, at as u64));
                frames.push((index, payload.to_vec()));
                at = next;
            }
            wal.segments.insert(first, at as u64);
        }
        if let Some((&first, _)) = wal.segments.last_key_value() {
            wal.file = Some(OpenOptions::new().append(true).open(wal.path(first))?);
        }
        Ok((wal, frames))
    }

    fn path(&self, first: u64) -> PathBuf {
        self.dir.join(format!("{first:020}.seg"))
    }

    fn last_index(&self) -> Option<u64> {
        self.positions.last_key_value().map(|(i, _)| *i)
    }

    /// Adds a frame after the last one (written at the next [`Wal::sync`] or roll).
    pub fn append(&mut self, index: u64, payload: &[u8]) -> io::Result<()> {
        let follows = self.last_index().is_none_or(|l| index == l + 1);
        let full = self
            .segments
            .last_key_value()
            .is_none_or(|(_, len)| *len >= SEGMENT_BYTES);
        if self.file.is_none() || !follows || full {
            self.roll(index)?;
        }
        let (&segment, len) = self
            .segments
            .last_key_value()
            .ok_or_else(|| io::Error::other("no segment after rolling"))?;
        let offset = *len;
        encode(&mut self.pending, index, payload);
        let frame = (FRAME_HEADER + payload.len()) as u64;
        self.segments.insert(segment, offset + frame);
        self.positions.insert(index, (segment, offset));
        Ok(())
    }

    /// Starts a new segment whose first frame will be `index`, after making the current one
    /// durable.
    fn roll(&mut self, index: u64) -> io::Result<()> {
        self.sync()?;
        let path = self.path(index);
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)?;
        f.write_all(MAGIC)?;
        drop(f);
        self.file = Some(OpenOptions::new().append(true).open(&path)?);
        self.segments.insert(index, MAGIC.len() as u64);
        self.dir_dirty = true;
        Ok(())
    }

    fn write_pending(&mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            let f = self
                .file
                .as_mut()
                .ok_or_else(|| io::Error::other("log frames pending without a segment"))?;
            f.write_all(&self.pending)?;
            self.pending.clear();
        }
        Ok(())
    }

    /// Writes pending frames and makes everything so far durable.
    pub fn sync(&mut self) -> io::Result<()> {
        self.write_pending()?;
        if let Some(f) = &self.file {
            f.sync_data()?;
        }
        if self.dir_dirty {
            File::open(&self.dir)?.sync_all()?;
            self.dir_dirty = false;
        }
        Ok(())
    }

    /// Removes the frame at `index` and every later one, durably.
    pub fn truncate_from(&mut self, index: u64) -> io::Result<()> {
        self.write_pending()?;
        let Some((_, &(segment, offset))) = self.positions.range(index..).next() else {
            return Ok(());
        };
        let later: Vec<u64> = self
            .segments
            .range(segment + 1..)
            .map(|(first, _)| *first)
            .collect();
        self.file = None;
        for first in later {
            fs::remove_file(self.path(first))?;
            self.segments.remove(&first);
            self.dir_dirty = true;
        }
        let f = OpenOptions::new().append(true).open(self.path(segment))?;
        f.set_len(offset)?;
        self.file = Some(f);
        self.segments.insert(segment, offset);
        self.positions.split_off(&index);
        self.sync()
    }

    /// Deletes every segment whose frames are all at or below `index`. Frames above it are
    /// kept, so some at or below it may remain (the caller remembers the purge point).
    pub fn purge_upto(&mut self, index: u64) -> io::Result<()> {
        let firsts: Vec<u64> = self.segments.keys().copied().collect();
        let last = self.last_index();
        for (n, first) in firsts.iter().enumerate() {
            let covered = match firsts.get(n + 1) {
                Some(next) => *next <= index + 1,
                // The last segment: only when every frame in it is purged (or it has none, and
                // no frame anywhere is above the purge point).
                None => last.is_none_or(|l| l <= index),
            };
            if !covered {
                break;
            }
            if n + 1 == firsts.len() {
                self.write_pending()?;
                self.file = None;
            }
            fs::remove_file(self.path(*first))?;
            self.segments.remove(first);
            self.dir_dirty = true;
        }
        let keep = self.positions.split_off(&(index + 1));
        self.positions = keep;
        if self.dir_dirty {
            File::open(&self.dir)?.sync_all()?;
            self.dir_dirty = false;
        }
        Ok(())
    }

    /// Segment files on disk (for tests and diagnostics).
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(i: u64) -> Vec<u8> {
        format!("entry {i}").into_bytes()
    }

    fn indexes(frames: &[(u64, Vec<u8>)]) -> Vec<u64> {
        frames.iter().map(|(i, _)| *i).collect()
    }

    fn filled(dir: &Path, range: std::ops::RangeInclusive<u64>) -> Wal {
        let (mut wal, frames) = Wal::open(dir).expect("wal");
        assert!(frames.is_empty());
        for i in range {
            wal.append(i, &payload(i)).expect("wal");
        }
        wal.sync().expect("wal");
        wal
    }

    #[test]
    fn frames_come_back_after_reopening() {
        let dir = tempfile::tempdir().expect("wal");
        drop(filled(dir.path(), 1..=100));
        let (_, frames) = Wal::open(dir.path()).expect("wal");
        assert_eq!(indexes(&frames), (1..=100).collect::<Vec<_>>());
        assert_eq!(frames[41].1, payload(42));
    }

    #[test]
    fn torn_tail_is_cut_and_appends_continue() {
        let dir = tempfile::tempdir().expect("wal");
        drop(filled(dir.path(), 1..=10));
        let seg = dir.path().join(format!("{:020}.seg", 1));
        let len = fs::metadata(&seg).expect("wal").len();
        // Half of the last frame reached the disk.
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .expect("wal")
            .set_len(len - 3)
            .expect("wal");
        let (mut wal, frames) = Wal::open(dir.path()).expect("wal");
        assert_eq!(indexes(&frames), (1..=9).collect::<Vec<_>>());
        wal.append(10, b"again").expect("wal");
        wal.sync().expect("wal");
        let (_, frames) = Wal::open(dir.path()).expect("wal");
        assert_eq!(indexes(&frames), (1..=10).collect::<Vec<_>>());
        assert_eq!(frames[9].1, b"again");
    }

    #[test]
    fn a_flipped_bit_in_the_tail_is_cut_but_in_an_older_segment_refuses() {
        let dir = tempfile::tempdir().expect("wal");
        let mut wal = filled(dir.path(), 1..=5);
        wal.append(7, b"after a gap").expect("wal"); // starts a second segment
        wal.sync().expect("wal");
        assert_eq!(wal.segment_count(), 2);
        drop(wal);
        let last = dir.path().join(format!("{:020}.seg", 7));
        let mut bytes = fs::read(&last).expect("wal");
        let n = bytes.len();
        bytes[n - 1] ^= 1;
        fs::write(&last, &bytes).expect("wal");
        let (_, frames) = Wal::open(dir.path()).expect("wal");
        assert_eq!(indexes(&frames), vec![1, 2, 3, 4, 5]);

        let first = dir.path().join(format!("{:020}.seg", 1));
        let mut bytes = fs::read(&first).expect("wal");
        bytes[MAGIC.len() + FRAME_HEADER] ^= 1;
        fs::write(&first, &bytes).expect("wal");
        let err = Wal::open(dir.path()).err().expect("corruption must refuse");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("corrupt"), "{err}");
    }

    #[test]
    fn truncate_removes_later_frames_and_segments() {
        let dir = tempfile::tempdir().expect("wal");
        let mut wal = filled(dir.path(), 1..=5);
        wal.append(10, b"x").expect("wal");
        wal.append(11, b"y").expect("wal");
        wal.sync().expect("wal");
        wal.truncate_from(4).expect("wal");
        assert_eq!(wal.segment_count(), 1);
        wal.append(4, b"new 4").expect("wal");
        wal.sync().expect("wal");
        drop(wal);
        let (_, frames) = Wal::open(dir.path()).expect("wal");
        assert_eq!(indexes(&frames), vec![1, 2, 3, 4]);
        assert_eq!(frames[3].1, b"new 4");
    }

    #[test]
    fn purge_deletes_only_whole_segments() {
        let dir = tempfile::tempdir().expect("wal");
        let mut wal = filled(dir.path(), 1..=5);
        wal.append(100, b"a").expect("wal");
        wal.append(101, b"b").expect("wal");
        wal.sync().expect("wal");
        wal.purge_upto(100).expect("wal");
        // The first segment is gone; the second still holds 101.
        assert_eq!(wal.segment_count(), 1);
        let (mut wal, frames) = Wal::open(dir.path()).expect("wal");
        assert_eq!(indexes(&frames), vec![100, 101]);
        wal.purge_upto(101).expect("wal");
        assert_eq!(wal.segment_count(), 0);
        wal.append(500, b"after a snapshot").expect("wal");
        wal.sync().expect("wal");
        let (_, frames) = Wal::open(dir.path()).expect("wal");
        assert_eq!(indexes(&frames), vec![500]);
    }

    #[test]
    fn big_logs_roll_into_several_segments() {
        let dir = tempfile::tempdir().expect("wal");
        let (mut wal, _) = Wal::open(dir.path()).expect("wal");
        let big = vec![7u8; 1 << 20];
        for i in 1..=10 {
            wal.append(i, &big).expect("wal");
        }
        wal.sync().expect("wal");
        assert!(wal.segment_count() >= 2, "{}", wal.segment_count());
        wal.purge_upto(6).expect("wal");
        let (_, frames) = Wal::open(dir.path()).expect("wal");
        let kept = indexes(&frames);
        assert_eq!(kept.last(), Some(&10));
        assert!(kept.len() < 10 && kept.len() >= 4, "{kept:?}");
    }
}
