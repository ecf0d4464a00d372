//! The memory-mapped segment file: creating, validating and mapping it.
#![allow(unsafe_code)] // the mapping becomes a slice of atomics here, and only here
//!
//! This is the only module of the index with `unsafe`: it turns the mapping into a slice of
//! `AtomicU64`. Everything else works on that slice.

use super::layout::*;
use super::table::Table;
use super::IndexError;
use crate::sync::AtomicU64;
use memmap2::{MmapOptions, MmapRaw};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

/// A mapped segment. Shared (`Arc`) by the writer and the readers of one process.
pub(crate) struct Segment {
    map: MmapRaw,
    shape: Shape,
    path: PathBuf,
    writable: bool,
    /// The exact table's ticks, which only its writer reads: in the writer's memory, not the
    /// segment (empty in a reader's mapping).
    exact_ticks: Box<[AtomicU64]>,
}

impl Segment {
    /// Maps an existing segment file read-only (a reader) or read-write (a writer taking it
    /// over), and validates its header.
    pub(crate) fn open(path: &Path, writable: bool) -> Result<Segment, IndexError> {
        let file =
            OpenOptions::new().read(true).write(writable).open(path).map_err(|e| IndexError::io(path, "open", e))?;
        let len = file.metadata().map_err(|e| IndexError::io(path, "stat", e))?.len();
        if len < (HEADER_WORDS * 8) as u64 {
            return Err(IndexError::Invalid { path: path.into(), why: format!("{len} bytes, too short for a header") });
        }
        let map = map(&file, len as usize, writable, path)?;
        let seg = Segment { map, shape: Shape::new(0, 0, 0), path: path.into(), writable, exact_ticks: Box::default() };
        let shape = seg.validate(len)?;
        Ok(Segment { shape, ..seg })
    }

    /// Creates a fresh segment of `shape` at a temporary path next to `path`, initialises its
    /// header and renames it over `path`, so readers never map a half-made segment. The file has
    /// mode 0600.
    pub(crate) fn create(path: &Path, shape: Shape) -> Result<Segment, IndexError> {
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| IndexError::io(&tmp, "create", e))?;
        let bytes = shape.total_bytes();
        file.set_len(bytes as u64).map_err(|e| IndexError::io(&tmp, "size", e))?;
        let map = map(&file, bytes, true, &tmp)?;
        let seg = Segment { map, shape, path: path.into(), writable: true, exact_ticks: Box::default() };
        let h = |w: usize| seg.word(w);
        h(H_VERSION).store(LAYOUT_VERSION, Relaxed);
        h(H_ENGINE_SLOTS).store(shape.engine_slots as u64, Relaxed);
        h(H_BIT_WORDS).store(shape.bit_words as u64, Relaxed);
        h(H_CAPACITY).store(shape.capacity as u64, Relaxed);
        h(H_TABLE_SLOTS).store(shape.table_slots as u64, Relaxed);
        h(H_APPROX_CAPACITY).store(shape.approx_capacity as u64, Relaxed);
        h(H_APPROX_SLOTS).store(shape.approx_slots as u64, Relaxed);
        h(H_TOTAL_BYTES).store(bytes as u64, Relaxed);
        h(H_CREATED_UNIX_MS).store(unix_ms(), Relaxed);
        h(H_STATE).store(STATE_LIVE, Relaxed);
        h(H_MAGIC).store(MAGIC, Release);
        std::fs::rename(&tmp, path).map_err(|e| IndexError::io(path, "rename a new segment to", e))?;
        Ok(seg)
    }

    fn validate(&self, file_len: u64) -> Result<Shape, IndexError> {
        let bad = |why: String| Err(IndexError::Invalid { path: self.path.clone(), why });
        let magic = self.word(H_MAGIC).load(Acquire);
        if magic != MAGIC {
            return bad(format!("bad magic {magic:#018x}: not a gantry kvindex segment"));
        }
        let version = self.word(H_VERSION).load(Relaxed);
        if version != LAYOUT_VERSION {
            return bad(format!("layout version {version}, this build reads version {LAYOUT_VERSION}"));
        }
        let get = |w: usize| self.word(w).load(Relaxed) as usize;
        let engine_slots = get(H_ENGINE_SLOTS);
        if engine_slots == 0 || engine_slots > MAX_ENGINE_SLOTS {
            return bad(format!("engine_slots {engine_slots} outside 1..={MAX_ENGINE_SLOTS}"));
        }
        let capacity = get(H_CAPACITY);
        let approx_capacity = get(H_APPROX_CAPACITY);
        if capacity == 0 || capacity > 1 << 40 || approx_capacity > 1 << 40 {
            return bad(format!("capacity {capacity} / approx capacity {approx_capacity} out of range"));
        }
        let shape = Shape::new(engine_slots, capacity, approx_capacity);
        let stored = (get(H_BIT_WORDS), get(H_TABLE_SLOTS), get(H_APPROX_SLOTS), get(H_TOTAL_BYTES));
        let expected = (shape.bit_words, shape.table_slots, shape.approx_slots, shape.total_bytes());
        if stored != expected {
            return bad(format!("shape words {stored:?} disagree with {expected:?} derived from the header"));
        }
        if file_len < shape.total_bytes() as u64 || self.map.len() < shape.total_bytes() {
            return bad(format!("truncated: {file_len} bytes on disk, the header says {}", shape.total_bytes()));
        }
        Ok(shape)
    }

    /// Gives the exact table ticks in this process's memory, for its writer.
    pub(crate) fn keep_exact_ticks(&mut self) {
        let n = Table::tick_words(self.shape.table_slots);
        self.exact_ticks = (0..n).map(|_| AtomicU64::new(0)).collect();
    }

    pub(crate) fn shape(&self) -> &Shape {
        &self.shape
    }

    /// Whether this process may store into the mapping (readers flush counters only then).
    pub(crate) fn writable(&self) -> bool {
        self.writable
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// All words of the mapping.
    fn words(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is page-aligned (so 8-byte aligned), at least `len` bytes long and
        // lives as long as `self`. `AtomicU64` has the size and alignment of `u64`, and every
        // access to these bytes, by this process or any other, is atomic, so shared access from
        // many threads and processes is not a data race. A read-only mapping is only ever
        // loaded from (`Segment::open` with `writable = false` is for readers, which never
        // store; see `writable`), and atomic loads of 64 bits from read-only memory are allowed.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr() as *const AtomicU64, self.map.len() / 8) }
    }

    /// Header word `w`.
    #[inline]
    pub(crate) fn word(&self, w: usize) -> &AtomicU64 {
        &self.words()[w]
    }

    /// Engine-table words of `slot`.
    pub(crate) fn engine(&self, slot: usize) -> &[AtomicU64] {
        let start = self.shape.engines_word() + slot * ENGINE_WORDS;
        &self.words()[start..start + ENGINE_WORDS]
    }

    /// The exact table, as readers see it (no ticks).
    #[inline]
    pub(crate) fn exact(&self) -> Table<'_> {
        let s = &self.shape;
        let start = s.table_word();
        let words = &self.words()[start..start + Table::words_for(s.table_slots, s.bit_words, false)];
        Table::new(words, s.table_slots, s.bit_words, false)
    }

    /// The exact table as its writer sees it: with the ticks in the writer's memory (see
    /// [`Segment::keep_exact_ticks`]).
    #[inline]
    pub(crate) fn writer_exact(&self) -> Table<'_> {
        let t = self.exact();
        if self.exact_ticks.is_empty() {
            t
        } else {
            t.with_ticks(&self.exact_ticks)
        }
    }

    /// The approximate table, when the segment has one.
    #[inline]
    pub(crate) fn approx(&self) -> Option<Table<'_>> {
        let s = &self.shape;
        if s.approx_slots == 0 {
            return None;
        }
        let start = s.approx_word();
        let words = &self.words()[start..start + Table::words_for(s.approx_slots, s.bit_words, true)];
        Some(Table::new(words, s.approx_slots, s.bit_words, true))
    }
}

fn map(file: &File, len: usize, writable: bool, path: &Path) -> Result<MmapRaw, IndexError> {
    let mut opts = MmapOptions::new();
    opts.len(len);
    let map = if writable { opts.map_raw(file) } else { opts.map_raw_read_only(file) };
    let map = map.map_err(|e| IndexError::io(path, "mmap", e))?;
    // Lookups touch random buckets of a segment of hundreds of MiB: with 4 KiB pages nearly each
    // one is a TLB miss. Ask for 2 MiB pages; they come where the file system allows them
    // (`/dev/shm` mounted `huge=advise` or `huge=within_size`), and nothing changes elsewhere.
    #[cfg(target_os = "linux")]
    if let Err(e) = map.advise(memmap2::Advice::HugePage) {
        tracing::debug!(path = %path.display(), error = %e, "kvindex: no huge pages for the segment");
    }
    Ok(map)
}

/// How one process maps a segment: its resident bytes, and how many of them sit in 2 MiB pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageUse {
    /// Resident bytes of the process's mappings of the segment.
    pub resident: u64,
    /// Of those, bytes mapped as 2 MiB pages.
    pub huge: u64,
}

impl std::fmt::Display for PageUse {
    /// The `pages` line of `gantry index inspect`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        if self.huge > 0 {
            write!(f, "2 MiB pages for {:.1} of {:.1} MiB resident in the writer", mib(self.huge), mib(self.resident))
        } else {
            let advice = "lookups are faster on a tmpfs mounted huge=advise";
            write!(f, "4 KiB only ({:.1} MiB resident in the writer): {advice}", mib(self.resident))
        }
    }
}

/// How process `pid` maps the segment file `path` (from `/proc/PID/smaps`); None when the
/// process is gone, its smaps cannot be read, or it does not map the file.
pub(crate) fn page_use(pid: u64, path: &Path) -> Option<PageUse> {
    let path = path.canonicalize().ok()?;
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    page_use_in(&smaps, path.to_str()?)
}

/// [`page_use`] over `/proc/PID/smaps` text: of the mappings of file `path` (not of a deleted
/// file once at that path), the one with the most resident bytes (a proxy maps its segment once
/// for the writer and again for its workers: each mapping sees the same pages), its `Rss` and
/// its `ShmemPmdMapped` + `FilePmdMapped`.
fn page_use_in(smaps: &str, path: &str) -> Option<PageUse> {
    let mut best = None::<PageUse>;
    let mut current = None::<PageUse>;
    let keep = |m: Option<PageUse>, best: &mut Option<PageUse>| {
        if let Some(m) = m {
            if best.is_none_or(|b| m.resident > b.resident) {
                *best = Some(m);
            }
        }
    };
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if !first.ends_with(':') {
            // A mapping's header: `START-END PERMS OFFSET DEV INODE [PATH]` (a deleted file's
            // path ends in ` (deleted)`, so it does not match).
            keep(current.take(), &mut best);
            if line.strip_suffix(path).is_some_and(|rest| rest.ends_with(' ')) {
                current = Some(PageUse { resident: 0, huge: 0 });
            }
            continue;
        }
        let Some(u) = current.as_mut() else { continue };
        let bytes = fields.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 1024;
        match first {
            "Rss:" => u.resident += bytes,
            "ShmemPmdMapped:" | "FilePmdMapped:" => u.huge += bytes,
            _ => {}
        }
    }
    keep(current, &mut best);
    best
}

/// Says in the log when the segment at `path`, just taken over by its writer, cannot have or
/// does not have 2 MiB pages, and what to do about it. `reused` is whether the segment was
/// there before (its pages were allocated when it was made).
pub(crate) fn log_page_advice(path: &Path, reused: bool) {
    const WHY: &str = "lookups run 1.1 to 1.4 times as fast on 2 MiB pages";
    if let Some(mount) = small_pages_only(path) {
        let (path, advice) = (path.display(), "mount it with huge=advise");
        tracing::info!(%path, %mount, "kvindex: the segment's tmpfs gives no 2 MiB pages ({WHY}): {advice}");
    } else if reused {
        let own = page_use(u64::from(std::process::id()), path);
        if own.is_some_and(|p| p.huge == 0 && p.resident >= 4 << 20) {
            let advice = "stop its writer and delete the file to have it made again on 2 MiB pages";
            tracing::info!(path = %path.display(), "kvindex: the segment was made with 4 KiB pages ({WHY}): {advice}");
        }
    }
}

/// The mount point of `path`'s file system when it is a tmpfs that gives no huge pages to the
/// segment's `MADV_HUGEPAGE`: mounted without `huge=advise`, `within_size` or `always`, unless
/// the system forces them on every tmpfs, or denies them to all
/// (`/sys/kernel/mm/transparent_hugepage/shmem_enabled`).
fn small_pages_only(path: &Path) -> Option<String> {
    let dir = path.parent()?.canonicalize().ok()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let (mount, fs_type, options) = mount_of(&info, &dir)?;
    if fs_type != "tmpfs" {
        return None;
    }
    let system = std::fs::read_to_string(SHMEM_THP).unwrap_or_default();
    let huge = options.split(',').find_map(|o| o.strip_prefix("huge=")).unwrap_or("never");
    let small = match selected(&system) {
        Some("force") => false,
        Some("deny") => true,
        _ => !matches!(huge, "advise" | "within_size" | "always"),
    };
    small.then_some(mount)
}

/// The system-wide transparent huge page setting for shared memory.
const SHMEM_THP: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

/// The bracketed choice of a sysfs setting such as `always [never] deny force`.
fn selected(setting: &str) -> Option<&str> {
    setting.split_whitespace().find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
}

/// The mount of `/proc/self/mountinfo` text `info` that holds `dir` (the longest mount point
/// that is a prefix of it; the last one listed when mounts are stacked): its mount point, file
/// system type and super options.
fn mount_of<'a>(info: &'a str, dir: &Path) -> Option<(String, &'a str, &'a str)> {
    let mut best: Option<(String, &str, &str)> = None;
    for line in info.lines() {
        // `ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FS_TYPE SOURCE SUPER_OPTIONS`
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let Some(point) = left.split(' ').nth(4) else { continue };
        let mut right = right.split(' ');
        let (Some(fs_type), Some(_source), Some(options)) = (right.next(), right.next(), right.next()) else {
            continue;
        };
        // Mount points escape spaces and the like as octal (`\040`); such a point is not
        // matched, which only skips the hint.
        if dir.starts_with(point) && best.as_ref().is_none_or(|(b, ..)| point.len() >= b.len()) {
            best = Some((point.to_owned(), fs_type, options));
        }
    }
    best
}

pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
25 22 0:23 / /dev/shm rw,relatime - tmpfs tmpfs rw,size=24684096k
30 25 0:27 / /dev/shm rw,relatime - tmpfs tmpfs rw,size=24684096k,huge=advise
31 22 0:28 / /dev/shmem rw,relatime shared:5 - tmpfs tmpfs rw,size=1024k
";

    #[test]
    fn page_use_sums_the_mappings_of_the_segment_only() {
        let smaps = "\
7f0000000000-7f0000400000 rw-s 00000000 00:1b 42                         /dev/shm/seg
Size:               4096 kB
Rss:                4096 kB
ShmemPmdMapped:     2048 kB
FilePmdMapped:         0 kB
VmFlags: rd wr sh mr mw me ms hg
7f0000400000-7f0000401000 rw-p 00000000 00:00 0
Rss:                   4 kB
ShmemPmdMapped:     2048 kB
7f0000500000-7f0000600000 r--s 00000000 00:1b 42                         /dev/shm/seg
Rss:                 100 kB
ShmemPmdMapped:        0 kB
7f0000700000-7f0000800000 rw-s 00000000 00:1b 41                         /dev/shm/seg (deleted)
Rss:                1024 kB
7f0000900000-7f0000a00000 rw-s 00000000 00:1b 43                         /dev/shm/segment
Rss:                1024 kB
";
        assert_eq!(page_use_in(smaps, "/dev/shm/seg"), Some(PageUse { resident: 4096 * 1024, huge: 2048 * 1024 }));
        let reader_first = smaps.replacen("Rss:                 100 kB", "Rss:                8192 kB", 1);
        assert_eq!(page_use_in(&reader_first, "/dev/shm/seg"), Some(PageUse { resident: 8192 * 1024, huge: 0 }));
        assert_eq!(page_use_in(smaps, "/dev/shm/other"), None);
        assert_eq!(page_use_in("", "/dev/shm/seg"), None);
    }

    #[test]
    fn the_system_wide_setting_is_the_bracketed_word() {
        assert_eq!(selected("always within_size advise [never] deny force\n"), Some("never"));
        assert_eq!(selected("always [force]"), Some("force"));
        assert_eq!(selected(""), None);
    }

    #[test]
    fn the_mount_holding_a_path_is_the_longest_and_last_listed() {
        let (point, fs, opts) = mount_of(MOUNTINFO, Path::new("/dev/shm")).unwrap();
        assert_eq!((point.as_str(), fs), ("/dev/shm", "tmpfs"));
        assert!(opts.ends_with("huge=advise"), "the stacked mount listed last wins: {opts}");
        let (point, _, opts) = mount_of(MOUNTINFO, Path::new("/dev/shmem/x")).unwrap();
        assert_eq!((point.as_str(), opts), ("/dev/shmem", "rw,size=1024k"), "optional fields are skipped");
        let (point, fs, _) = mount_of(MOUNTINFO, Path::new("/work/index")).unwrap();
        assert_eq!((point.as_str(), fs), ("/", "ext4"));
        assert_eq!(mount_of("garbage\n\n1 2 3\n", Path::new("/x")), None);
    }
}
