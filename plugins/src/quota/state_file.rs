//! The state file: one domain's local counts of the current hour, written atomically (temp
//! file, fsync, rename) every few seconds and when the plugin is dropped, and read at build.
//!
//! The file is TOML with a `version`; a file that is missing starts empty silently, and one
//! that cannot be read, does not parse, has another version or names another domain starts
//! empty with a warning.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, LazyLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::Deserialize;
use tracing::{info, warn};

use super::store::{Class, ClassCounts};
use super::window::Window;
use crate::limits::quoted_string;
use crate::watched_file::{open_nonblocking, FileStamp};

/// Version written in every state file; files of other versions are ignored.
pub const FORMAT_VERSION: i64 = 1;
/// How often a changed state is written.
pub const SAVE_EVERY: Duration = Duration::from_secs(5);
/// Largest state file that is read.
const MAX_FILE_BYTES: u64 = 256 << 20;

/// One domain's state file and the counters it holds.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    domain: String,
    sets: Vec<(Class, Arc<ClassCounts>)>,
    /// The counters' change number at the last write.
    saved: Mutex<Option<u64>>,
    /// The stamp of the file as this process last read or wrote it. A save merges the file
    /// into the counters only when the file changed since, so that a large file is not parsed
    /// on every write.
    seen: Mutex<Option<FileStamp>>,
    failing: AtomicBool,
}

#[derive(Debug, Deserialize)]
struct FileData {
    version: i64,
    domain: String,
    /// Unix time of the write, in seconds.
    saved_at: u64,
    #[serde(default)]
    counts: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
struct Entry {
    class: String,
    /// The principal; absent for the domain-wide count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    principal: Option<String>,
    hour: u64,
    count: u64,
}

impl StateFile {
    /// Describes the state file at `path` for `domain`'s counter sets; registers it for
    /// [`save_all`].
    pub fn new(path: PathBuf, domain: &str, sets: Vec<(Class, Arc<ClassCounts>)>) -> Arc<Self> {
        let file = Arc::new(Self {
            path,
            domain: domain.to_owned(),
            sets,
            saved: Mutex::new(None),
            seen: Mutex::new(None),
            failing: AtomicBool::new(false),
        });
        let mut all = ALL_FILES.lock();
        all.retain(|weak| weak.strong_count() > 0);
        all.push(Arc::downgrade(&file));
        file
    }

    /// Returns the file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Raises the counters to the counts of `now`'s hour found in the file; returns how many
    /// counts were taken. A missing file takes none.
    ///
    /// # Errors
    ///
    /// Says why the file was ignored; the counters are then left as they were.
    pub fn load(&self, now: SystemTime) -> Result<usize, String> {
        let (data, stamp) = match read_file(&self.path)? {
            Some(read) => read,
            None => return Ok(0),
        };
        *self.seen.lock() = Some(stamp);
        tracing::debug!(file = %self.path.display(), saved_at = data.saved_at,
            entries = data.counts.len(), "read the quota state file");
        if data.domain != self.domain {
            return Err(format!(
                "it holds the counts of domain {:?}; give each domain its own state_file",
                data.domain
            ));
        }
        let hour = Window::at(now).hour;
        let mut taken = 0;
        for entry in data.counts.iter().filter(|e| e.hour == hour) {
            let Some(class) = Class::from_label(&entry.class) else {
                continue;
            };
            if let Some((_, counts)) = self.sets.iter().find(|(c, _)| *c == class) {
                counts.restore(
                    entry.principal.as_deref().map(str::as_bytes),
                    hour,
                    entry.count,
                );
                taken += 1;
            }
        }
        Ok(taken)
    }

    /// Treats the counts as written, so the file is written again only once they change. A
    /// plugin built just to check a config, or one whose file was just read, then leaves the
    /// file as it is, even when the file was damaged.
    pub fn mark_saved(&self) {
        *self.saved.lock() = Some(self.changes());
    }

    /// Writes the counts of `now`'s hour if they changed since the last write; returns
    /// whether it wrote.
    ///
    /// The counters first take the larger of their count and the file's, the same merge as
    /// at start. So when two processes write one file, as an old one that is draining and
    /// its replacement do, neither lowers a count the other wrote, and both count on from
    /// the higher one. Requests that each counted after the other's last write are not added
    /// up: the merge keeps the larger count, not the sum.
    ///
    /// # Errors
    ///
    /// The I/O error of the temp file, its sync or the rename; the previous file stays.
    pub fn save(&self, now: SystemTime) -> std::io::Result<bool> {
        let mut saved = self.saved.lock();
        if *saved == Some(self.changes()) {
            return Ok(false);
        }
        if self.changed_since_seen(now) {
            // A file that cannot be used is replaced, as it would be without the merge.
            let _ = self.load(now);
        }
        let changes = self.changes();
        let text = self.render(now);
        write_atomically(&self.path, text.as_bytes())?;
        *saved = Some(changes);
        *self.seen.lock() = self.stamp();
        Ok(true)
    }

    /// Runs [`Self::save`] and logs the first failure and the recovery.
    pub fn save_logged(&self, now: SystemTime) {
        match self.save(now) {
            Ok(_) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    info!(file = %self.path.display(), "quota state file written again");
                }
            }
            Err(e) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    warn!(file = %self.path.display(), error = %e,
                        "cannot write the quota state file; counts are kept in memory only");
                }
            }
        }
    }

    /// Returns whether the file may differ from what this process last read or wrote: its
    /// stamp changed, or it was modified too recently for the stamp to tell.
    fn changed_since_seen(&self, now: SystemTime) -> bool {
        let current = self.stamp();
        match current {
            Some(stamp) => current != *self.seen.lock() || stamp.is_unsettled(now),
            None => true,
        }
    }

    fn stamp(&self) -> Option<FileStamp> {
        std::fs::metadata(&self.path)
            .ok()
            .map(|meta| FileStamp::of(&meta))
    }

    fn changes(&self) -> u64 {
        self.sets
            .iter()
            .fold(0u64, |sum, (_, counts)| sum.wrapping_add(counts.changes()))
    }

    /// Writes the counts of `now`'s hour as TOML: the fields of [`FileData`], then one
    /// `[[counts]]` table per [`Entry`].
    ///
    /// The text is written directly rather than through `toml::to_string`, which builds a
    /// document tree of every entry first. With 300,000 principals that took about a gigabyte
    /// of memory and over a second of CPU on every write, on a 2 vCPU machine.
    fn render(&self, now: SystemTime) -> String {
        let hour = Window::at(now).hour;
        let saved_at = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut out = String::new();
        let _ = write!(
            out,
            "version = {FORMAT_VERSION}\ndomain = {}\nsaved_at = {saved_at}\n",
            quoted_string(&self.domain)
        );
        for (class, set) in &self.sets {
            for (principal, count) in set.snapshot(hour) {
                // TOML integers end at i64::MAX; a count that high is over any budget.
                let count = count.min(i64::MAX as u64);
                let _ = write!(out, "\n[[counts]]\nclass = \"{}\"\n", class.label());
                if let Some(principal) = principal {
                    let _ = writeln!(out, "principal = {}", quoted_string(&principal));
                }
                let _ = write!(out, "hour = {hour}\ncount = {count}\n");
            }
        }
        out
    }
}

/// Reads a file in exactly the shape that [`StateFile::render`] writes; `None` for anything
/// else, which may still be valid TOML.
fn parse_rendered(text: &str) -> Option<FileData> {
    fn field<'a>(line: Option<&'a str>, key: &str) -> Option<&'a str> {
        line?.strip_prefix(key)?.strip_prefix(" = ")
    }
    let mut lines = text.split('\n');
    let version = field(lines.next(), "version")?.parse().ok()?;
    let domain = parse_quoted_string(field(lines.next(), "domain")?)?;
    let saved_at = field(lines.next(), "saved_at")?.parse().ok()?;
    let mut counts = Vec::new();
    loop {
        match lines.next()? {
            "" => {}
            _ => return None,
        }
        let Some(header) = lines.next() else {
            break;
        };
        if header != "[[counts]]" {
            return None;
        }
        let class = parse_quoted_string(field(lines.next(), "class")?)?;
        let mut line = lines.next();
        let principal = match field(line, "principal") {
            Some(value) => {
                line = lines.next();
                Some(parse_quoted_string(value)?)
            }
            None => None,
        };
        let hour = field(line, "hour")?.parse().ok()?;
        let count = field(lines.next(), "count")?.parse().ok()?;
        counts.push(Entry {
            class,
            principal,
            hour,
            count,
        });
    }
    Some(FileData {
        version,
        domain,
        saved_at,
        counts,
    })
}

/// Reads a TOML basic string as [`quoted_string`] writes it; `None` for other escapes.
fn parse_quoted_string(quoted: &str) -> Option<String> {
    let inner = quoted.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return None,
            '\\' => match chars.next()? {
                '"' => out.push('"'),
                '\\' => out.push('\\'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    let code = u32::from_str_radix(&hex, 16)
                        .ok()
                        .filter(|_| hex.len() == 4)?;
                    out.push(char::from_u32(code)?);
                }
                _ => return None,
            },
            c if c.is_control() && (c as u32) < 0x80 => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

/// Writes every live state file whose counts changed; for a graceful shutdown.
pub fn save_all(now: SystemTime) {
    let files: Vec<Arc<StateFile>> = ALL_FILES.lock().iter().filter_map(Weak::upgrade).collect();
    for file in files {
        file.save_logged(now);
    }
}

static ALL_FILES: LazyLock<Mutex<Vec<Weak<StateFile>>>> = LazyLock::new(Mutex::default);

/// Writes a state file every [`SAVE_EVERY`] on its own thread, and once more when dropped.
#[derive(Debug)]
pub struct Saver {
    file: Arc<StateFile>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Saver {
    /// Starts the thread. If it cannot start, the file is still written on drop.
    pub fn start(file: Arc<StateFile>) -> Self {
        let (stop, stopped) = mpsc::channel::<()>();
        let for_thread = Arc::clone(&file);
        let thread = std::thread::Builder::new()
            .name("quota-state".into())
            .spawn(move || loop {
                let last = !matches!(
                    stopped.recv_timeout(SAVE_EVERY),
                    Err(RecvTimeoutError::Timeout)
                );
                for_thread.save_logged(SystemTime::now());
                if last {
                    return;
                }
            });
        match thread {
            Ok(thread) => Self {
                file,
                stop: Some(stop),
                thread: Some(thread),
            },
            Err(e) => {
                warn!(file = %file.path.display(), error = %e,
                    "cannot start the quota state writer; the file is written only on reload");
                Self {
                    file,
                    stop: None,
                    thread: None,
                }
            }
        }
    }
}

impl Drop for Saver {
    fn drop(&mut self) {
        drop(self.stop.take());
        match self.thread.take() {
            Some(thread) => {
                if thread.join().is_err() {
                    warn!(file = %self.file.path.display(), "the quota state writer panicked");
                }
            }
            None => self.file.save_logged(SystemTime::now()),
        }
    }
}

/// Reads and checks a state file; `Ok(None)` when there is none. Also returns the stamp the
/// file had when it was opened.
fn read_file(path: &Path) -> Result<Option<(FileData, FileStamp)>, String> {
    let file = match open_nonblocking(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read it: {e}")),
    };
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read it: {e}"))?;
    if !meta.is_file() {
        return Err("it is not a regular file; point `state_file` at a file path".into());
    }
    let mut text = String::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read it: {e}"))?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(format!("it is larger than {MAX_FILE_BYTES} bytes"));
    }
    // A file as `render` writes it is read line by line. Any other TOML goes through the
    // `toml` crate, whose document tree takes many times the file's size in memory. The
    // counts are read straight into their types. Only a file that does not fit them is
    // parsed again as a plain table, so that the error can name its version.
    let parsed = parse_rendered(&text).map_or_else(|| toml::from_str::<FileData>(&text), Ok);
    let data = match parsed {
        Ok(data) if data.version == FORMAT_VERSION => data,
        Ok(data) => return Err(version_error(Some(data.version))),
        Err(e) => {
            let table: toml::Table = text
                .parse()
                .map_err(|e: toml::de::Error| format!("it is not valid TOML: {}", e.message()))?;
            let version = table.get("version").and_then(toml::Value::as_integer);
            if version != Some(FORMAT_VERSION) {
                return Err(version_error(version));
            }
            return Err(format!("it does not hold quota counts: {}", e.message()));
        }
    };
    Ok(Some((data, FileStamp::of(&meta))))
}

fn version_error(version: Option<i64>) -> String {
    match version {
        Some(other) => {
            format!("it has format version {other}; this gateway reads version {FORMAT_VERSION}")
        }
        None => "it has no integer `version`".into(),
    }
}

/// Writes `bytes` to a temp file next to `path`, syncs it and renames it over `path`.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().map_or_else(
        || "quota-state".into(),
        |n| n.to_string_lossy().into_owned(),
    );
    let temp = path.with_file_name(format!(
        ".{name}.tmp.{}.{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
        return result;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // The rename is durable once the directory is synced; a failure here loses nothing
        // that the next write would not write again.
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::store::Registry;

    fn file_in(dir: &Path, registry: &Registry) -> StateFile {
        let sets = vec![(Class::Index, registry.counts("primary", Class::Index))];
        StateFile {
            path: dir.join("quota.state"),
            domain: "primary".into(),
            sets,
            saved: Mutex::new(None),
            seen: Mutex::new(None),
            failing: AtomicBool::new(false),
        }
    }

    #[test]
    fn rendered_file_parses_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = Registry::new();
        let now = SystemTime::now();
        let hour = Window::at(now).hour;
        let counts = registry.counts("primary", Class::Index);
        let names = [
            "user:plain",
            "user:quote\"back\\slash",
            "user:tab\tnew\nline\u{7f}bell\u{7}",
            "user:ünïcödé \u{85} ✓",
            "ip:2001:db8::/64",
        ];
        for (i, name) in names.iter().enumerate() {
            for _ in 0..=i {
                counts.add(name.as_bytes(), hour);
            }
        }

        let file = file_in(dir.path(), &registry);
        let text = file.render(now);
        let data: FileData = toml::from_str(&text).expect("parses as TOML");
        let fast = parse_rendered(&text).expect("parses line by line");
        assert_eq!(format!("{fast:?}"), format!("{data:?}"));
        assert_eq!(data.version, FORMAT_VERSION);
        assert_eq!(data.domain, "primary");

        let mut read: Vec<(Option<String>, u64)> = data
            .counts
            .into_iter()
            .inspect(|entry| assert_eq!((entry.class.as_str(), entry.hour), ("index", hour)))
            .map(|entry| (entry.principal, entry.count))
            .collect();
        read.sort();
        let mut expected: Vec<(Option<String>, u64)> = names
            .iter()
            .enumerate()
            .map(|(i, name)| (Some((*name).to_owned()), i as u64 + 1))
            .collect();
        expected.push((None, 15));
        expected.sort();
        assert_eq!(read, expected);
    }

    #[test]
    fn own_write_is_not_read_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = Registry::new();
        let now = SystemTime::now();
        let hour = Window::at(now).hour;
        registry
            .counts("primary", Class::Index)
            .add(b"ip:192.0.2.1", hour);
        let file = file_in(dir.path(), &registry);
        assert!(file.save(now).expect("save"));
        // Later than the stamp's settling time, so that the stamp alone decides.
        let later = now + Duration::from_secs(10);
        assert!(!file.changed_since_seen(later), "own write");

        let other_registry = Registry::new();
        other_registry
            .counts("primary", Class::Index)
            .add(b"ip:192.0.2.2", hour);
        let other = file_in(dir.path(), &other_registry);
        assert!(other.save(now).expect("other save"));
        assert!(file.changed_since_seen(later), "another process's write");
    }
}
