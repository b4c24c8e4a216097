//! `husk logs [-f] [--tail N] POD [-c CONTAINER]`, and the log follower that
//! foreground `husk run` uses: reads the CRI log files back into the bytes
//! the containers wrote, across restarts.

use super::{fail, PodView, EXIT_FAILURE, EXIT_USAGE};
use husk_sandbox::cri_log::{self, LogLine, LogReader, Stream, MAX_LINE};
use husk_sandbox::state::{PodPaths, Roots};
use std::io::Write;
use std::time::Duration;

#[derive(clap::Args)]
pub struct LogsArgs {
    /// Keep printing new output until the pod ends.
    #[arg(short, long)]
    follow: bool,
    /// Only the last N lines.
    #[arg(long)]
    tail: Option<usize>,
    /// Prefix each line with its CRI timestamp.
    #[arg(long)]
    timestamps: bool,
    /// The previous instance of a restarted container.
    #[arg(short, long)]
    previous: bool,
    pod: String,
    /// Container (default: the pod's only container; with several, all of them).
    #[arg(short, long)]
    container: Option<String>,
}

struct Track {
    name: String,
    restart: u32,
    reader: LogReader,
}

/// Most bytes one track reads per poll: a pod that floods its log still
/// lets the caller see signals and its end between polls.
const POLL_BUDGET: usize = 4 * 1024 * 1024;

/// Output is gathered and written in blocks of about this size.
const OUT_BLOCK: usize = 1024 * 1024;

/// Where the lines go: gathered, then written in blocks, each stream to
/// its own descriptor, in the order they were read.
pub struct Out {
    pub prefix: bool,
    pub timestamps: bool,
    buf: Vec<u8>,
    stream: Stream,
    /// Whoever read our output went away (a closed pipe).
    pub closed: bool,
}

impl Out {
    fn new(prefix: bool) -> Self {
        Out {
            prefix,
            timestamps: false,
            buf: Vec::with_capacity(OUT_BLOCK + 2 * MAX_LINE),
            stream: Stream::Stdout,
            closed: false,
        }
    }

    /// Writes out what was gathered.
    pub fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        if !self.closed {
            let r = match self.stream {
                Stream::Stdout => {
                    let mut o = std::io::stdout().lock();
                    o.write_all(&self.buf).and_then(|_| o.flush())
                }
                Stream::Stderr => std::io::stderr().lock().write_all(&self.buf),
            };
            if r.is_err() {
                self.closed = true;
            }
        }
        self.buf.clear();
    }

    /// Adds one line to what is written out.
    pub fn emit(&mut self, name: &str, e: LogLine<'_>) {
        if e.stream != self.stream {
            self.flush();
            self.stream = e.stream;
        }
        if self.timestamps {
            self.buf.extend_from_slice(e.timestamp);
            self.buf.push(b' ');
        }
        if self.prefix {
            self.buf.extend_from_slice(name.as_bytes());
            self.buf.extend_from_slice(b" | ");
            self.buf.extend_from_slice(e.text);
            self.buf.push(b'\n');
        } else {
            self.buf.extend_from_slice(e.text);
            if e.full {
                self.buf.push(b'\n');
            }
        }
        if self.buf.len() >= OUT_BLOCK {
            self.flush();
        }
    }
}

/// Follows the log files of some containers of one pod, in bounded memory,
/// across restarts and rotations.
pub struct LogFollower {
    paths: PodPaths,
    tracks: Vec<Track>,
    pub out: Out,
    /// Go on with a container's next instance when it restarted (not for
    /// `--previous`, which shows one instance).
    pub next_instances: bool,
}

impl LogFollower {
    pub fn new(paths: PodPaths, containers: Vec<(String, u32)>, prefix: bool) -> Self {
        let tracks = containers
            .into_iter()
            .map(|(name, restart)| Track {
                reader: LogReader::new(&paths.log_file(&name, restart)),
                name,
                restart,
            })
            .collect();
        LogFollower {
            paths,
            tracks,
            out: Out::new(prefix),
            next_instances: true,
        }
    }

    /// Each track goes on from the current end of its file.
    fn starting_at_end(mut self) -> Self {
        for t in &mut self.tracks {
            t.reader = LogReader::at_end(&self.paths.log_file(&t.name, t.restart));
        }
        self
    }

    /// Reads what is new (a bounded amount per container) and writes it
    /// out. Returns whether anything was read.
    pub fn poll(&mut self) -> bool {
        let mut any = false;
        for t in &mut self.tracks {
            loop {
                let Track { name, reader, .. } = t;
                let out = &mut self.out;
                let n = reader.read_some(POLL_BUDGET, |l| out.emit(name, l));
                any |= n > 0;
                // At its end, an instance that has a successor (the
                // container restarted) is done: on with the next one.
                let next = self.paths.log_file(&t.name, t.restart + 1);
                if n == 0 && self.next_instances && next.exists() {
                    t.restart += 1;
                    t.reader = LogReader::new(&next);
                    continue;
                }
                break;
            }
        }
        self.out.flush();
        any
    }
}

fn latest_restart(paths: &PodPaths, name: &str) -> u32 {
    let mut n = 0;
    while paths.log_file(name, n + 1).exists() {
        n += 1;
    }
    n
}

pub fn run(roots: &Roots, a: LogsArgs) -> i32 {
    let rec = match roots.find_pod(&a.pod) {
        Ok(r) => r,
        Err(e) => return fail(EXIT_FAILURE, e),
    };
    let v = PodView::load(roots, rec);
    let paths = roots.pod(&v.record.id);
    let all: Vec<String> = v
        .record
        .plan
        .all_containers()
        .map(|c| c.name.clone())
        .collect();
    let names = match &a.container {
        Some(c) if all.contains(c) => vec![c.clone()],
        Some(c) => {
            return fail(
                EXIT_USAGE,
                format!(
                    "pod {} has no container {c:?}; it has: {}",
                    v.record.plan.name,
                    all.join(", ")
                ),
            )
        }
        None => all.clone(),
    };
    let prefix = names.len() > 1;
    let tracks: Vec<(String, u32)> = names
        .iter()
        .map(|n| {
            let latest = latest_restart(&paths, n);
            let r = if a.previous {
                latest.saturating_sub(1)
            } else {
                latest
            };
            (n.clone(), r)
        })
        .collect();
    if a.previous && tracks.iter().all(|(n, _)| latest_restart(&paths, n) == 0) {
        return fail(
            EXIT_FAILURE,
            "no previous instance: the container has not restarted",
        );
    }
    let mut f = LogFollower::new(paths.clone(), tracks.clone(), prefix);
    f.out.timestamps = a.timestamps;
    f.next_instances = !a.previous;
    if let Some(n) = a.tail {
        // Only the last n lines of the chosen instances, read from the end.
        for (name, restart) in &tracks {
            for e in cri_log::tail(&paths.log_file(name, *restart), n) {
                f.out.emit(name, e.as_line());
            }
        }
        f.out.flush();
        if !a.follow || f.out.closed {
            return 0;
        }
        // On from what was printed.
        let out = std::mem::replace(&mut f.out, Out::new(prefix));
        f = LogFollower::new(paths.clone(), tracks, prefix).starting_at_end();
        f.out = out;
        f.next_instances = !a.previous;
    } else {
        // What rotation moved aside first, oldest first.
        for (name, restart) in &tracks {
            let path = paths.log_file(name, *restart);
            for old in cri_log::log_files(&path).iter().filter(|p| **p != path) {
                let mut r = LogReader::new(old);
                while r.read_some(POLL_BUDGET, |l| f.out.emit(name, l)) > 0 {}
            }
        }
        while f.poll() {
            if f.out.closed {
                return 0;
            }
        }
        if !a.follow || a.previous {
            return 0;
        }
    }
    loop {
        let done = super::pod_over(roots, &v.record.id);
        let progressed = f.poll();
        if f.out.closed {
            return 0;
        }
        if done {
            while f.poll() {}
            return 0;
        }
        if !progressed {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
