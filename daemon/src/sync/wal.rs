//! The worker's write-ahead log, append-only: where a commit goes first, so that acknowledging a push
//! costs one sequential write and one `fdatasync`, whatever the number of groups in the
//! batch. SQLite gets the same changes later, many batches folded into one transaction, off
//! the hot path (compaction, in [`super::store_thread`]).
//!
//! A log belongs to one worker slot (`wal-<slot>-<seq>` in the storage directory; slots are
//! unique among live processes, see `metrics::worker_slot`) and is cut into segments of about
//! [`SEGMENT_BYTES`], so that what compaction has folded into SQLite is reclaimed a whole
//! file at a time while appends go on in the newest one.
//!
//! Layout of a segment: [`MAGIC`], then records, then zeros. A record is its payload's
//! length (u32, little endian), an xxh32 checksum of that length and the payload (u32,
//! little endian), and the payload (one encoded [`super::store::Batch`]). A segment is
//! written full of zeros when it is created, and records overwrite them: an `fdatasync`
//! then flushes data blocks only, where an append would also commit the file's new size
//! (140-160 us against 230-350 us per sync on this project's ext4 disk; bench/RESULTS.md,
//! "the write-ahead log", has the loop that measured it).
//!
//! [`scan`] reads records up to the first zero header (the end) or the first record that is
//! short or fails its checksum (a crash in the middle of a write: a torn record), and says
//! where. Everything before it was acknowledged only after its `fdatasync`, so nothing
//! acknowledged is behind it, and the torn record (never acknowledged) is dropped whole.
//!
//! This module is the format and the files; what a payload means is the store's.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh32::Xxh32;

/// The first bytes of every segment: a name and a format version. A file without them is
/// refused, never overwritten.
pub const MAGIC: &[u8; 8] = b"SGWAL\0\0\x01";
/// A record's header: payload length and checksum.
pub const HEADER: usize = 8;
/// Seed of the records' checksum: a record copied from another format does not verify.
const SEED: u32 = 0x5347_4c47;
/// A segment that grew past this gets no more records: the next append opens a new one.
/// Small enough that compaction reclaims space soon under steady load, large enough that a
/// new file (and its directory sync) is rare: at 512 B pushes, one per ~1,500 of them.
pub const SEGMENT_BYTES: u64 = 1 << 20;
/// Segment files start with this, then `<slot>-<seq>`.
const PREFIX: &str = "wal-";

/// What [`scan`] found in a segment's bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct Scan<'a> {
    /// The whole records' payloads, in order.
    pub records: Vec<&'a [u8]>,
    /// Where the last whole record ends: the length the segment is cut to.
    pub valid: usize,
    /// Why the bytes after `valid` are not a record, if there are any.
    pub torn: Option<Torn>,
}

/// Why a segment's tail is not a whole record.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Torn {
    /// Fewer bytes than a header, or than the header says.
    Short,
    /// The checksum does not match: a write that did not finish, or a damaged disk.
    Checksum,
}

/// A file that does not start with [`MAGIC`]: not ours, so not touched.
#[derive(Debug, PartialEq, Eq)]
pub struct NotALog;

/// Reads a segment's bytes: the records up to the first that is not whole. A file shorter
/// than [`MAGIC`] that starts like it is a segment whose creation was cut short: empty.
pub fn scan(bytes: &[u8]) -> Result<Scan<'_>, NotALog> {
    if bytes.len() < MAGIC.len() {
        if MAGIC.starts_with(bytes) {
            let torn = (!bytes.is_empty()).then_some(Torn::Short);
            return Ok(Scan { records: Vec::new(), valid: 0, torn });
        }
        return Err(NotALog);
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err(NotALog);
    }
    let mut records = Vec::new();
    let mut at = MAGIC.len();
    let torn = loop {
        let rest = &bytes[at..];
        if rest.is_empty() {
            break None;
        }
        if rest.len() < HEADER {
            break Some(Torn::Short);
        }
        if rest[..HEADER] == [0; HEADER] {
            // The zeros a segment is created with: no record was written here.
            break None;
        }
        let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        let sum = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
        let Some(payload) = rest.get(HEADER..HEADER + len) else { break Some(Torn::Short) };
        if checksum(&rest[..4], payload) != sum {
            break Some(Torn::Checksum);
        }
        records.push(payload);
        at += HEADER + len;
    };
    Ok(Scan { records, valid: at, torn })
}

/// Fills the header of a record whose payload follows [`HEADER`] zero bytes at the start of
/// `record`. The payload is written in place, so sealing copies nothing.
pub fn seal(record: &mut [u8]) {
    let len = u32::try_from(record.len() - HEADER).expect("a batch is far below 4 GiB");
    record[..4].copy_from_slice(&len.to_le_bytes());
    let sum = checksum(&record[..4], &record[HEADER..]);
    record[4..8].copy_from_slice(&sum.to_le_bytes());
}

fn checksum(len: &[u8], payload: &[u8]) -> u32 {
    let mut h = Xxh32::new(SEED);
    h.update(len);
    h.update(payload);
    h.digest()
}

/// A segment file on disk, as the directory lists it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SegmentFile {
    /// The worker slot that wrote it.
    pub slot: usize,
    /// Its position in the slot's log: records in a lower one are older.
    pub seq: u64,
    pub path: PathBuf,
}

/// The segments in `dir`, of one slot or of all, oldest first within a slot.
pub fn segments(dir: &Path, slot: Option<usize>) -> io::Result<Vec<SegmentFile>> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(parsed) = name.to_str().and_then(parse_name) else { continue };
        if slot.is_none_or(|s| s == parsed.0) {
            found.push(SegmentFile { slot: parsed.0, seq: parsed.1, path: entry.path() });
        }
    }
    found.sort();
    Ok(found)
}

fn parse_name(name: &str) -> Option<(usize, u64)> {
    let (slot, seq) = name.strip_prefix(PREFIX)?.split_once('-')?;
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(slot) || !all_digits(seq) {
        return None;
    }
    Some((slot.parse().ok()?, seq.parse().ok()?))
}

fn segment_path(dir: &Path, slot: usize, seq: u64) -> PathBuf {
    dir.join(format!("{PREFIX}{slot}-{seq:010}"))
}

/// Reads a whole segment file.
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The lock file in the storage directory. Logs are named by worker slot, and replaying
/// them at start assumes no process writes them: so one daemon at a time uses a directory.
const LOCK_FILE: &str = "lock";

/// How the storage directory's lock is held.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Hold {
    /// The supervisor while it replays the logs: no other process of any daemon runs.
    Alone,
    /// Every process of a running daemon (the supervisor after its replay, each worker): a
    /// second daemon's supervisor waits for the last of them (a worker can outlive a
    /// supervisor killed with SIGKILL by a moment) and then refuses.
    Shared,
}

/// Takes the storage directory's lock, waiting up to `wait` for it; the lock lasts as long
/// as the returned file is open (flock(2): it is released when the process dies, however).
pub fn lock(dir: &Path, hold: Hold, wait: std::time::Duration) -> io::Result<File> {
    let file =
        OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(LOCK_FILE))?;
    relock(&file, hold, wait)?;
    Ok(file)
}

/// Changes how a lock taken by [`lock`] is held (the supervisor goes from alone to shared).
pub fn relock(file: &File, hold: Hold, wait: std::time::Duration) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let how = match hold {
        Hold::Alone => libc::LOCK_EX,
        Hold::Shared => libc::LOCK_SH,
    };
    let deadline = std::time::Instant::now() + wait;
    loop {
        // SAFETY: flock on a descriptor this function borrows; no pointers.
        if unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(e);
        }
        if std::time::Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "another syncgate uses this storage directory",
            ));
        }
        // A bounded poll for another process's exit, which has no event we can wait on.
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The log one worker appends to.
pub struct Log {
    /// The storage directory, where new segments go.
    dir: PathBuf,
    /// The worker slot whose log this is.
    slot: usize,
    /// The segments still holding records that compaction has not folded in, oldest first;
    /// appends go to the last.
    segments: VecDeque<Segment>,
    /// The sequence number the next segment gets.
    next_seq: u64,
}

/// One open segment.
struct Segment {
    seq: u64,
    /// Opened for writing at offsets.
    file: File,
    /// Where its records end: the next one is written here.
    len: u64,
}

impl Log {
    /// A log for `slot` in `dir`. The slot's old segments must have been replayed and
    /// removed first ([`segments`]); the first append creates a segment.
    pub fn new(dir: &Path, slot: usize) -> Log {
        Log { dir: dir.to_owned(), slot, segments: VecDeque::new(), next_seq: 0 }
    }

    /// Appends one sealed record and waits until it is on disk; returns the sequence number
    /// of the segment that holds it. On failure the segment is cut back, so the record is
    /// not replayed later: it was never acknowledged.
    pub fn append(&mut self, record: &[u8]) -> io::Result<u64> {
        if self.segments.back().is_none_or(|s| s.len >= SEGMENT_BYTES) {
            self.open_segment()?;
        }
        let segment = self.segments.back_mut().expect("a segment was just opened");
        let written =
            segment.file.write_all_at(record, segment.len).and_then(|()| segment.file.sync_data());
        match written {
            Ok(()) => {
                segment.len += record.len() as u64;
                Ok(segment.seq)
            }
            Err(e) => {
                // Zeros where the record began end the segment there for a scan. If even
                // this fails, the caller fails the batch, and a restart's scan decides.
                let _ = segment.file.write_all_at(&[0; HEADER], segment.len);
                Err(e)
            }
        }
    }

    /// Creates the next segment durably, full of zeros: its magic, its blocks and its
    /// directory entry on disk before any record depends on them.
    ///
    /// A full disk (or a file-size limit, `EFBIG`) cuts the zeros short. The file holds no
    /// record then, and is removed: left there, it would make every later creation fail with
    /// `EEXIST`, and the worker could never commit again, even once space is back. If even
    /// the removal fails, the next creation takes the next name, and the restart's replay
    /// removes this one (a segment of zeros, or of a torn magic, is empty).
    fn open_segment(&mut self) -> io::Result<()> {
        let seq = self.next_seq;
        let path = segment_path(&self.dir, self.slot, seq);
        let mut file = OpenOptions::new().write(true).create_new(true).open(&path)?;
        let mut zeros = vec![0u8; SEGMENT_BYTES as usize];
        zeros[..MAGIC.len()].copy_from_slice(MAGIC);
        let filled = file
            .write_all(&zeros)
            .and_then(|()| file.sync_all())
            .and_then(|()| File::open(&self.dir)?.sync_all());
        if let Err(e) = filled {
            if std::fs::remove_file(&path).is_err() {
                self.next_seq += 1;
            }
            return Err(e);
        }
        self.next_seq += 1;
        self.segments.push_back(Segment { seq, file, len: MAGIC.len() as u64 });
        Ok(())
    }

    /// Every record in segments before `seq` is folded into SQLite: removes those files.
    /// `None`: every record is: removes them all (the next append creates a segment; records
    /// are never written over old ones, which a scan could take for new). A removal lost in
    /// a crash only replays records again, which replay skips.
    pub fn release_before(&mut self, seq: Option<u64>) -> io::Result<()> {
        while let Some(first) = self.segments.front() {
            if seq.is_some_and(|seq| first.seq >= seq) {
                break;
            }
            let gone = self.segments.pop_front().expect("checked");
            std::fs::remove_file(segment_path(&self.dir, self.slot, gone.seq))?;
        }
        Ok(())
    }

    /// Bytes of records on disk, headers included (the `syncgate_log_bytes` gauge).
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len - MAGIC.len() as u64).sum()
    }

    /// Removes every segment: the log is folded in and the worker writes through now (or
    /// exits).
    pub fn remove(mut self) -> io::Result<()> {
        self.release_before(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempDir;

    fn record(payload: &[u8]) -> Vec<u8> {
        let mut r = vec![0; HEADER];
        r.extend_from_slice(payload);
        seal(&mut r);
        r
    }

    fn segment_of(records: &[&[u8]]) -> Vec<u8> {
        let mut bytes = MAGIC.to_vec();
        for r in records {
            bytes.extend_from_slice(&record(r));
        }
        bytes
    }

    #[test]
    fn whole_records_read_back_in_order() {
        let bytes = segment_of(&[b"one", b"", b"three"]);
        let scan = scan(&bytes).unwrap();
        assert_eq!(scan.records, vec![&b"one"[..], b"", b"three"]);
        assert_eq!(scan.valid, bytes.len());
        assert_eq!(scan.torn, None);
    }

    #[test]
    fn a_cut_at_every_offset_of_the_last_record_keeps_exactly_the_whole_ones() {
        let whole = segment_of(&[b"first record", b"second"]);
        let last = record(b"the last record, torn anywhere");
        let mut bytes = whole.clone();
        bytes.extend_from_slice(&last);
        for cut in whole.len()..bytes.len() {
            let scan = scan(&bytes[..cut]).unwrap();
            assert_eq!(scan.records, vec![&b"first record"[..], b"second"], "cut at {cut}");
            assert_eq!(scan.valid, whole.len(), "cut at {cut}");
            let torn = (cut > whole.len()).then_some(Torn::Short);
            assert_eq!(scan.torn, torn, "cut at {cut}");
        }
        assert_eq!(scan(&bytes).unwrap().records.len(), 3);
    }

    #[test]
    fn a_damaged_byte_anywhere_in_a_record_ends_the_log_before_it() {
        let whole = segment_of(&[b"kept"]);
        let last = record(b"damaged");
        for i in 0..last.len() {
            let mut bytes = whole.clone();
            bytes.extend_from_slice(&last);
            bytes[whole.len() + i] ^= 0x40;
            let scan = scan(&bytes).unwrap();
            assert_eq!(scan.records, vec![&b"kept"[..]], "byte {i}");
            assert_eq!(scan.valid, whole.len(), "byte {i}");
            assert!(scan.torn.is_some(), "byte {i}");
        }
    }

    #[test]
    fn a_record_torn_inside_the_zeros_of_a_segment_is_torn_and_zeros_are_the_end() {
        let mut bytes = segment_of(&[b"kept"]);
        let whole = bytes.len();
        let last = record(b"written in part");
        bytes.extend_from_slice(&last[..last.len() - 3]);
        bytes.resize(whole + 64, 0);
        let scan = scan(&bytes).unwrap();
        assert_eq!(scan.records, vec![&b"kept"[..]]);
        assert_eq!((scan.valid, scan.torn), (whole, Some(Torn::Checksum)));
        let mut clean = segment_of(&[b"kept"]);
        clean.resize(whole + 64, 0);
        let scan = super::scan(&clean).unwrap();
        assert_eq!((scan.records.len(), scan.valid, scan.torn), (1, whole, None));
    }

    #[test]
    fn a_file_that_is_not_a_log_is_refused_and_a_torn_magic_is_empty() {
        assert_eq!(scan(b"SQLite format 3\0"), Err(NotALog));
        assert_eq!(scan(b"x"), Err(NotALog));
        let empty = scan(b"").unwrap();
        assert_eq!((empty.valid, empty.torn), (0, None));
        let torn = scan(&MAGIC[..3]).unwrap();
        assert_eq!((torn.records.len(), torn.valid, torn.torn), (0, 0, Some(Torn::Short)));
    }

    #[test]
    fn segments_roll_over_and_are_released_once_folded_in() {
        let dir = TempDir::new();
        std::fs::create_dir_all(&dir.0).unwrap();
        let mut log = Log::new(&dir.0, 3);
        let big = record(&vec![7u8; SEGMENT_BYTES as usize]);
        assert_eq!(log.append(&big).unwrap(), 0);
        assert_eq!(log.append(&record(b"next")).unwrap(), 1, "a full segment gets no more");
        assert_eq!(log.bytes(), (big.len() + HEADER + 4) as u64);
        let files = segments(&dir.0, Some(3)).unwrap();
        assert_eq!(files.iter().map(|f| f.seq).collect::<Vec<_>>(), vec![0, 1]);
        assert!(segments(&dir.0, Some(4)).unwrap().is_empty());

        log.release_before(Some(1)).unwrap();
        assert_eq!(segments(&dir.0, None).unwrap().len(), 1);
        let bytes = read(&files[1].path).unwrap();
        assert_eq!(bytes.len() as u64, SEGMENT_BYTES, "written full of zeros when created");
        let scan = scan(&bytes).unwrap();
        assert_eq!(scan.records, vec![&b"next"[..]]);
        assert_eq!((scan.valid, scan.torn), (MAGIC.len() + HEADER + 4, None), "zeros end it");

        log.release_before(None).unwrap();
        assert_eq!(log.bytes(), 0);
        assert!(segments(&dir.0, None).unwrap().is_empty());
        assert_eq!(log.append(&record(b"again")).unwrap(), 2, "a new segment");
        log.remove().unwrap();
        assert!(segments(&dir.0, None).unwrap().is_empty());
    }

    #[test]
    fn a_directory_is_locked_by_one_daemon_at_a_time() {
        let dir = TempDir::new();
        std::fs::create_dir_all(&dir.0).unwrap();
        let none = std::time::Duration::ZERO;
        let supervisor = lock(&dir.0, Hold::Alone, none).unwrap();
        assert!(lock(&dir.0, Hold::Shared, none).is_err(), "nobody runs while it replays");
        relock(&supervisor, Hold::Shared, none).unwrap();
        let worker = lock(&dir.0, Hold::Shared, none).unwrap();
        drop(supervisor);
        let err = lock(&dir.0, Hold::Alone, none).unwrap_err();
        assert!(err.to_string().contains("another syncgate"), "{err}");
        drop(worker);
        lock(&dir.0, Hold::Alone, none).unwrap();
    }

    #[test]
    fn names_of_other_files_are_ignored() {
        for name in ["wal-", "wal-1", "wal-1-", "wal-x-1", "wal-1-2x", "log-1-2", "syncgate.db"] {
            assert_eq!(parse_name(name), None, "{name}");
        }
        assert_eq!(parse_name("wal-12-0000000003"), Some((12, 3)));
    }
}
