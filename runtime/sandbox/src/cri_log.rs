//! Container logs in the CRI format the kubelet reads
//! (`<RFC3339Nano> <stdout|stderr> <F|P> <text>`): one file per container
//! instance holding both streams, a line per write of a full line, long lines
//! split into `P` parts. Also the reader that turns such a file back into
//! the original byte stream.

use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Longest line part written before it is split with a `P` tag (as the
/// kubelet's 16 KiB).
pub const MAX_LINE: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Size-based rotation of a container's log, as the kubelet's
/// `containerLogMaxSize` and `containerLogMaxFiles`: once the file would
/// grow past `max_size` it becomes `N.log.1` (`.1` becomes `.2`, …) and a
/// new `N.log` starts; at most `max_files` files are kept, the current one
/// included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRotation {
    pub max_size: u64,
    pub max_files: u32,
}

impl Default for LogRotation {
    fn default() -> Self {
        LogRotation {
            max_size: 10 * 1024 * 1024,
            max_files: 5,
        }
    }
}

/// The `n`th rotated file of the log at `path` (`0.log.1` is the newest).
pub fn rotated_path(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// The files of the log at `path`, oldest first: its rotated files, then
/// `path` itself (also when it does not exist yet).
pub fn log_files(path: &Path) -> Vec<PathBuf> {
    let mut old = Vec::new();
    let mut n = 1;
    while rotated_path(path, n).exists() {
        old.push(rotated_path(path, n));
        n += 1;
    }
    old.reverse();
    old.push(path.to_owned());
    old
}

/// A container instance's log file: appended to in whole CRI lines,
/// rotated by size when the pod is not the kubelet's (which rotates its
/// own through ReopenContainerLog).
pub struct LogFile {
    file: std::fs::File,
    path: PathBuf,
    size: u64,
    rotation: Option<LogRotation>,
}

impl LogFile {
    /// Opens (appends to) the log at `path`, making its directory; a new
    /// log is root's only (0600): what a container prints may be secret.
    pub fn open(path: &Path, rotation: Option<LogRotation>) -> Result<Self, String> {
        let file = open_log(path)?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(LogFile {
            file,
            path: path.to_owned(),
            size,
            rotation,
        })
    }

    /// A log that goes nowhere (a CRI container without a log path).
    pub fn discard() -> Result<Self, String> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .map_err(|e| format!("/dev/null: {e}"))?;
        Ok(LogFile {
            file,
            path: PathBuf::new(),
            size: 0,
            rotation: None,
        })
    }

    /// Appends whole lines; rotates first when they would take the file
    /// past its size limit.
    pub fn append(&mut self, mut lines: &[u8]) -> std::io::Result<()> {
        let Some(r) = self.rotation else {
            self.file.write_all(lines)?;
            self.size += lines.len() as u64;
            return Ok(());
        };
        while !lines.is_empty() {
            // As many whole lines as still fit; a file gets at least one.
            let room = r.max_size.saturating_sub(self.size) as usize;
            let fit = if lines.len() <= room {
                lines.len()
            } else {
                match memchr::memrchr(b'\n', &lines[..room]) {
                    Some(i) => i + 1,
                    None if self.size == 0 => memchr::memchr(b'\n', lines)
                        .map(|i| i + 1)
                        .unwrap_or(lines.len()),
                    None => 0,
                }
            };
            if fit == 0 {
                self.rotate(r)?;
                continue;
            }
            self.file.write_all(&lines[..fit])?;
            self.size += fit as u64;
            lines = &lines[fit..];
        }
        Ok(())
    }

    fn rotate(&mut self, r: LogRotation) -> std::io::Result<()> {
        let keep = r.max_files.max(2) - 1;
        match std::fs::remove_file(rotated_path(&self.path, keep)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        for n in (1..keep).rev() {
            match std::fs::rename(rotated_path(&self.path, n), rotated_path(&self.path, n + 1)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        std::fs::rename(&self.path, rotated_path(&self.path, 1))?;
        self.file = open_log(&self.path).map_err(std::io::Error::other)?;
        self.size = 0;
        Ok(())
    }

    /// ReopenContainerLog: opens the log again at its path, after the
    /// kubelet moved the old file away.
    pub fn reopen(&mut self) -> Result<(), String> {
        self.file = open_log(&self.path)?;
        self.size = self.file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(())
    }
}

/// Opens (appends to) a container's CRI log, making its directory; a new
/// log is root's only (0600): what a container prints may be secret.
pub fn open_log(path: &std::path::Path) -> Result<std::fs::File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// ReopenContainerLog: container `id`'s log (`log`, the file its output
/// goes to, at `path`) is opened again at `path`, after the kubelet moved
/// the old file away.
pub fn reopen(
    id: &str,
    log: Option<Arc<Mutex<LogFile>>>,
    path: &std::path::Path,
) -> Result<(), String> {
    let Some(log) = log.filter(|_| !path.as_os_str().is_empty()) else {
        return Err(format!("container {id} has no log file"));
    };
    let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
    log.path = path.to_owned();
    log.reopen()
}

/// Timestamp in the CRI log's RFC3339Nano form.
pub fn timestamp() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// Copies a pipe into the shared log file until EOF, framing each line.
/// What one read brings is framed under one timestamp and written at once,
/// so a chatty container costs one write per read, not one per line.
///
/// The pipe is read to its end also when the log cannot be written (a full
/// disk): the container must not block on its output. The first write
/// error is returned once the pipe ends; the output it hit is lost.
pub fn pump(mut src: impl Read, stream: Stream, sink: Arc<Mutex<LogFile>>) -> std::io::Result<()> {
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut out: Vec<u8> = Vec::with_capacity(96 * 1024);
    let mut failed: Option<std::io::Error> = None;
    let frame = |out: &mut Vec<u8>, ts: &str, text: &[u8], full: bool| {
        out.extend_from_slice(ts.as_bytes());
        out.push(b' ');
        out.extend_from_slice(stream.as_str().as_bytes());
        out.extend_from_slice(if full { b" F " } else { b" P " });
        out.extend_from_slice(text);
        out.push(b'\n');
    };
    let write = |out: &mut Vec<u8>, failed: &mut Option<std::io::Error>| {
        if out.is_empty() {
            return;
        }
        if failed.is_none() {
            let mut f = sink.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = f.append(out) {
                *failed = Some(e);
            }
        }
        out.clear();
    };
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let ts = timestamp();
        pending.extend_from_slice(&buf[..n]);
        let mut start = 0;
        while let Some(i) = memchr::memchr(b'\n', &pending[start..]) {
            let text = &pending[start..start + i];
            for (chunk, full) in split_long(text) {
                frame(&mut out, &ts, chunk, full);
            }
            start += i + 1;
        }
        while pending.len() - start >= MAX_LINE {
            frame(&mut out, &ts, &pending[start..start + MAX_LINE], false);
            start += MAX_LINE;
        }
        pending.drain(..start);
        write(&mut out, &mut failed);
    }
    if !pending.is_empty() {
        // Output that ends without a newline: a partial line, as the kubelet
        // writes it.
        frame(&mut out, &timestamp(), &pending, false);
        write(&mut out, &mut failed);
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn split_long(text: &[u8]) -> Vec<(&[u8], bool)> {
    if text.len() <= MAX_LINE {
        return vec![(text, true)];
    }
    let chunks: Vec<&[u8]> = text.chunks(MAX_LINE).collect();
    let n = chunks.len();
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, c)| (c, i + 1 == n))
        .collect()
}

/// One parsed log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub timestamp: String,
    pub stream: Stream,
    pub full: bool,
    pub text: Vec<u8>,
}

impl LogEntry {
    /// This entry as a borrowed line.
    pub fn as_line(&self) -> LogLine<'_> {
        LogLine {
            timestamp: self.timestamp.as_bytes(),
            stream: self.stream,
            full: self.full,
            text: &self.text,
        }
    }

    /// The bytes the container wrote (a full line gets its newline back).
    pub fn raw(&self) -> Vec<u8> {
        let mut v = self.text.clone();
        if self.full {
            v.push(b'\n');
        }
        v
    }
}

/// One log line, borrowed from the buffer it was read into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLine<'a> {
    pub timestamp: &'a [u8],
    pub stream: Stream,
    pub full: bool,
    pub text: &'a [u8],
}

impl LogLine<'_> {
    pub fn to_entry(&self) -> LogEntry {
        LogEntry {
            timestamp: String::from_utf8_lossy(self.timestamp).into_owned(),
            stream: self.stream,
            full: self.full,
            text: self.text.to_vec(),
        }
    }
}

/// Parses one CRI log line (without its trailing newline), borrowing.
pub fn parse_line_ref(line: &[u8]) -> Option<LogLine<'_>> {
    let sp = memchr::memchr(b' ', line)?;
    let (ts, rest) = (&line[..sp], &line[sp + 1..]);
    let (stream, rest) = if let Some(r) = rest.strip_prefix(b"stdout ") {
        (Stream::Stdout, r)
    } else if let Some(r) = rest.strip_prefix(b"stderr ") {
        (Stream::Stderr, r)
    } else {
        return None;
    };
    let (full, text) = match rest {
        [b'F', b' ', t @ ..] => (true, t),
        [b'P', b' ', t @ ..] => (false, t),
        b"F" => (true, &[][..]),
        b"P" => (false, &[][..]),
        _ => return None,
    };
    // An RFC 3339 time starts with its year (checked whole by whoever
    // reads it as a time: this is the hot path of following a log).
    if !ts.first().is_some_and(u8::is_ascii_digit) {
        return None;
    }
    Some(LogLine {
        timestamp: ts,
        stream,
        full,
        text,
    })
}

/// Parses one CRI log line (without its trailing newline).
pub fn parse_line(line: &[u8]) -> Option<LogEntry> {
    parse_line_ref(line).map(|l| l.to_entry())
}

/// Reads all complete lines of a log file.
pub fn read_all(path: &std::path::Path) -> std::io::Result<Vec<LogEntry>> {
    let f = std::fs::File::open(path)?;
    let mut out = Vec::new();
    for line in std::io::BufReader::new(f).split(b'\n') {
        if let Some(e) = parse_line(&line?) {
            out.push(e);
        }
    }
    Ok(out)
}

/// Longest stretch without a newline a reader keeps: a line the writer
/// framed is at most MAX_LINE plus its header; anything longer is not a
/// CRI log line and is dropped, so a reader's memory stays bounded.
const MAX_PENDING: usize = 4 * MAX_LINE;

/// Reads one container instance's log from a position on, in bounded
/// memory, following it across rotations: it keeps the file it reads open,
/// and when that file is at its end and the path names another file (the
/// writer rotated), it finishes the old one and goes on with the new.
pub struct LogReader {
    path: PathBuf,
    file: Option<std::fs::File>,
    start: u64,
    buf: Vec<u8>,
    /// Bytes of `buf` in use (a partial line at its front).
    len: usize,
}

impl LogReader {
    /// Reads `path` from its beginning.
    pub fn new(path: &Path) -> Self {
        Self::at(path, 0)
    }

    /// Reads `path` from byte `offset` on.
    pub fn at(path: &Path, offset: u64) -> Self {
        LogReader {
            path: path.to_owned(),
            file: None,
            start: offset,
            buf: vec![0; 1024 * 1024],
            len: 0,
        }
    }

    /// Reads `path` from its current end on.
    pub fn at_end(path: &Path) -> Self {
        let end = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        Self::at(path, end)
    }

    /// Reads what is there, up to about `budget` bytes, handing each
    /// complete line to `each`. Returns the bytes read (0: nothing new).
    pub fn read_some(&mut self, budget: usize, mut each: impl FnMut(LogLine<'_>)) -> usize {
        use std::os::unix::fs::MetadataExt;
        if self.file.is_none() {
            let Ok(mut f) = std::fs::File::open(&self.path) else {
                return 0;
            };
            if self.start > 0 && f.seek(SeekFrom::Start(self.start)).is_err() {
                return 0;
            }
            self.file = Some(f);
        }
        let mut total = 0;
        let mut switched = false;
        while total < budget {
            let Some(f) = self.file.as_mut() else { break };
            let n = match f.read(&mut self.buf[self.len..]) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => 0,
            };
            if n == 0 {
                // At the end: rotated away? Then the rest of the old file
                // was read above (the writer renames before it opens anew).
                let ours = f.metadata().ok().map(|m| (m.dev(), m.ino()));
                let now = std::fs::metadata(&self.path)
                    .ok()
                    .map(|m| (m.dev(), m.ino()));
                if switched || now.is_none() || now == ours {
                    break;
                }
                let rest = f.read(&mut self.buf[self.len..]).unwrap_or(0);
                if rest > 0 {
                    total += rest;
                    self.len += rest;
                    self.lines(&mut each);
                    continue;
                }
                self.file = std::fs::File::open(&self.path).ok();
                self.len = 0;
                switched = true;
                continue;
            }
            total += n;
            self.len += n;
            self.lines(&mut each);
        }
        total
    }

    fn lines(&mut self, each: &mut impl FnMut(LogLine<'_>)) {
        let mut start = 0;
        while let Some(i) = memchr::memchr(b'\n', &self.buf[start..self.len]) {
            if let Some(l) = parse_line_ref(&self.buf[start..start + i]) {
                each(l);
            }
            start += i + 1;
        }
        if start == 0 && self.len == self.buf.len() {
            // A buffer without a newline: not a line of ours. Drop it.
            self.len = 0;
            return;
        }
        self.buf.copy_within(start..self.len, 0);
        self.len -= start;
        if self.len > MAX_PENDING {
            self.len = 0;
        }
    }
}

/// The last `n` complete lines of the log at `path` (its rotated files
/// included when it holds fewer), oldest first. Reads from the end: the
/// time it takes grows with `n`, not with the log.
pub fn tail(path: &Path, n: usize) -> Vec<LogEntry> {
    let mut files = log_files(path);
    files.reverse();
    let mut out: Vec<LogEntry> = Vec::new();
    for f in files {
        if out.len() >= n {
            break;
        }
        let mut got = tail_file(&f, n - out.len());
        got.append(&mut out);
        out = got;
    }
    out
}

fn tail_file(path: &Path, n: usize) -> Vec<LogEntry> {
    const BLOCK: u64 = 64 * 1024;
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let Ok(len) = f.metadata().map(|m| m.len()) else {
        return Vec::new();
    };
    if n == 0 || len == 0 {
        return Vec::new();
    }
    // Back from the end until n + 1 newlines are behind us (the last one
    // ends the last line), or the file's start.
    let mut pos = len;
    let mut newlines = 0;
    let mut from = 0;
    let mut end = None;
    let mut block = vec![0u8; BLOCK as usize];
    'back: while pos > 0 {
        let step = pos.min(BLOCK);
        pos -= step;
        let b = &mut block[..step as usize];
        if f.seek(SeekFrom::Start(pos)).is_err() || f.read_exact(b).is_err() {
            return Vec::new();
        }
        for i in memchr::memrchr_iter(b'\n', b) {
            // What follows the last newline is a line still being written.
            end.get_or_insert(pos + i as u64 + 1);
            newlines += 1;
            if newlines == n + 1 {
                from = pos + i as u64 + 1;
                break 'back;
            }
        }
    }
    let Some(end) = end else { return Vec::new() };
    if f.seek(SeekFrom::Start(from)).is_err() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for line in std::io::BufReader::new(f.take(end - from)).split(b'\n') {
        match line {
            Ok(l) => out.extend(parse_line(&l)),
            Err(_) => break,
        }
    }
    let skip = out.len().saturating_sub(n);
    out.drain(..skip);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_lines_and_partials() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let f = Arc::new(Mutex::new(LogFile::open(&path, None).unwrap()));
        let long = "x".repeat(MAX_LINE + 10);
        let input = format!("hello\nworld\n{long}\ntail");
        pump(input.as_bytes(), Stream::Stdout, f).unwrap();
        let entries = read_all(&path).unwrap();
        assert_eq!(entries.len(), 5);
        assert_eq!(entries[0].text, b"hello");
        assert!(entries[0].full);
        assert!(!entries[2].full && entries[3].full);
        assert_eq!(entries[2].text.len() + entries[3].text.len(), MAX_LINE + 10);
        assert!(!entries[4].full);
        let raw: Vec<u8> = entries.iter().flat_map(|e| e.raw()).collect();
        assert_eq!(raw, input.as_bytes());
        assert!(chrono::DateTime::parse_from_rfc3339(&entries[0].timestamp).is_ok());
    }

    fn lines_of(path: &Path) -> Vec<Vec<u8>> {
        let mut r = LogReader::new(path);
        let mut got = Vec::new();
        while r.read_some(1 << 20, |l| got.push(l.text.to_vec())) > 0 {}
        got
    }

    #[test]
    fn rotates_by_size_keeping_max_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c/0.log");
        let rot = LogRotation {
            max_size: 4096,
            max_files: 3,
        };
        let log = Arc::new(Mutex::new(LogFile::open(&path, Some(rot)).unwrap()));
        let input: String = (0..2000).map(|i| format!("line {i:05}\n")).collect();
        // Half one line per read, as a slow writer delivers it, half in
        // reads larger than a whole file.
        let (slow, fast) = input.split_at(input.len() / 2);
        for line in slow.lines() {
            pump(format!("{line}\n").as_bytes(), Stream::Stdout, log.clone()).unwrap();
        }
        pump(fast.as_bytes(), Stream::Stdout, log.clone()).unwrap();
        let files = log_files(&path);
        assert_eq!(files.len(), 3, "{files:?}");
        assert!(!rotated_path(&path, 3).exists());
        for f in &files {
            assert!(std::fs::metadata(f).unwrap().len() <= 4096, "{f:?}");
        }
        // The files, oldest first, hold the newest lines in order.
        let got: Vec<Vec<u8>> = files.iter().flat_map(|f| lines_of(f)).collect();
        let want: Vec<Vec<u8>> = input.lines().map(|l| l.as_bytes().to_vec()).collect();
        assert!(got.len() > 100 && got.len() < want.len());
        assert_eq!(got[..], want[want.len() - got.len()..]);
    }

    #[test]
    fn reader_follows_across_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let rot = LogRotation {
            max_size: 1000,
            max_files: 5,
        };
        let mut log = LogFile::open(&path, Some(rot)).unwrap();
        let mut r = LogReader::new(&path);
        let mut got = Vec::new();
        for i in 0..300 {
            log.append(format!("2026-01-01T00:00:00Z stdout F n{i}\n").as_bytes())
                .unwrap();
            if i % 7 == 0 {
                r.read_some(1 << 20, |l| got.push(l.text.to_vec()));
            }
        }
        while r.read_some(1 << 20, |l| got.push(l.text.to_vec())) > 0 {}
        let want: Vec<Vec<u8>> = (0..300).map(|i| format!("n{i}").into_bytes()).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn tail_reads_the_end_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let rot = LogRotation {
            max_size: 2000,
            max_files: 4,
        };
        let mut log = LogFile::open(&path, Some(rot)).unwrap();
        for i in 0..150 {
            log.append(format!("2026-01-01T00:00:00Z stderr F t{i}\n").as_bytes())
                .unwrap();
        }
        // A line being written is not a line yet.
        log.append(b"2026-01-01T00:00:00Z stdout F half").unwrap();
        let texts = |n| -> Vec<String> {
            tail(&path, n)
                .iter()
                .map(|e| String::from_utf8(e.text.clone()).unwrap())
                .collect()
        };
        assert_eq!(texts(2), ["t148", "t149"]);
        assert!(texts(0).is_empty());
        let current = lines_of(&path).len();
        // More than the current file holds: the rest from the rotated one.
        let many = texts(current + 3);
        assert_eq!(many.len(), current + 3);
        assert_eq!(many.last().unwrap(), "t149");
        assert_eq!(many[0], format!("t{}", 150 - current - 3));
        assert!(tail(&dir.path().join("missing.log"), 5).is_empty());
    }

    #[test]
    fn reader_memory_is_bounded_on_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let mut data = vec![b'x'; 3 << 20];
        data.extend_from_slice(b"\n2026-01-01T00:00:00Z stdout F ok\n");
        std::fs::write(&path, &data).unwrap();
        assert_eq!(lines_of(&path), [b"ok".to_vec()]);
    }
}
