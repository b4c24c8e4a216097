//! Container logs in the CRI format the kubelet reads
//! (`<RFC3339Nano> <stdout|stderr> <F|P> <text>`): one file per container
//! instance holding both streams, a line per write of a full line, long lines
//! split into `P` parts. Also the reader that turns such a file back into
//! the original byte stream.

use std::io::{BufRead, Read, Write};
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
    log: Option<std::sync::Arc<std::sync::Mutex<std::fs::File>>>,
    path: &std::path::Path,
) -> Result<(), String> {
    let Some(log) = log.filter(|_| !path.as_os_str().is_empty()) else {
        return Err(format!("container {id} has no log file"));
    };
    *log.lock().unwrap_or_else(|p| p.into_inner()) = open_log(path)?;
    Ok(())
}

/// Timestamp in the CRI log's RFC3339Nano form.
pub fn timestamp() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// Copies a pipe into the shared log file until EOF, framing each line.
pub fn pump(
    mut src: impl Read,
    stream: Stream,
    sink: Arc<Mutex<std::fs::File>>,
) -> std::io::Result<()> {
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 8192];
    let emit = |text: &[u8], full: bool| -> std::io::Result<()> {
        let mut line = Vec::with_capacity(text.len() + 48);
        line.extend_from_slice(timestamp().as_bytes());
        line.push(b' ');
        line.extend_from_slice(stream.as_str().as_bytes());
        line.extend_from_slice(if full { b" F " } else { b" P " });
        line.extend_from_slice(text);
        line.push(b'\n');
        let mut f = sink.lock().unwrap_or_else(|p| p.into_inner());
        f.write_all(&line)
    };
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        pending.extend_from_slice(&buf[..n]);
        while let Some(i) = pending.iter().position(|b| *b == b'\n') {
            let mut text: Vec<u8> = pending.drain(..=i).collect();
            text.pop();
            for chunk in split_long(&text) {
                emit(chunk.0, chunk.1)?;
            }
        }
        while pending.len() >= MAX_LINE {
            let part: Vec<u8> = pending.drain(..MAX_LINE).collect();
            emit(&part, false)?;
        }
    }
    if !pending.is_empty() {
        // Output that ends without a newline: a partial line, as the kubelet
        // writes it.
        emit(&pending, false)?;
    }
    Ok(())
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
    /// The bytes the container wrote (a full line gets its newline back).
    pub fn raw(&self) -> Vec<u8> {
        let mut v = self.text.clone();
        if self.full {
            v.push(b'\n');
        }
        v
    }
}

/// Parses one CRI log line (without its trailing newline).
pub fn parse_line(line: &[u8]) -> Option<LogEntry> {
    let mut parts = line.splitn(4, |b| *b == b' ');
    let ts = std::str::from_utf8(parts.next()?).ok()?.to_owned();
    let stream = match parts.next()? {
        b"stdout" => Stream::Stdout,
        b"stderr" => Stream::Stderr,
        _ => return None,
    };
    let full = match parts.next()? {
        b"F" => true,
        b"P" => false,
        _ => return None,
    };
    let text = parts.next().unwrap_or(b"").to_vec();
    Some(LogEntry {
        timestamp: ts,
        stream,
        full,
        text,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_lines_and_partials() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let f = Arc::new(Mutex::new(std::fs::File::create(&path).unwrap()));
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
}
