//! `husk logs [-f] [--tail N] POD [-c CONTAINER]`, and the log follower that
//! foreground `husk run` uses: reads the CRI log files back into the bytes
//! the containers wrote, across restarts.

use super::{fail, PodView, EXIT_FAILURE, EXIT_USAGE};
use husk_sandbox::cri_log::{self, LogEntry, Stream};
use husk_sandbox::state::{PodPaths, Roots};
use std::io::{Read, Seek, SeekFrom, Write};
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
    offset: u64,
    pending: Vec<u8>,
}

/// Follows the log files of some containers of one pod.
pub struct LogFollower {
    paths: PodPaths,
    tracks: Vec<Track>,
    pub prefix: bool,
    pub timestamps: bool,
}

impl LogFollower {
    pub fn new(paths: PodPaths, containers: Vec<(String, u32)>, prefix: bool) -> Self {
        LogFollower {
            paths,
            tracks: containers
                .into_iter()
                .map(|(name, restart)| Track {
                    name,
                    restart,
                    offset: 0,
                    pending: Vec::new(),
                })
                .collect(),
            prefix,
            timestamps: false,
        }
    }

    /// Reads what is new and writes it out. Returns whether anything was read.
    pub fn poll(&mut self) -> bool {
        let mut any = false;
        for i in 0..self.tracks.len() {
            loop {
                let (entries, progressed) = self.read_track(i);
                any |= progressed;
                for e in entries {
                    self.emit(&self.tracks[i].name, &e);
                }
                let t = &self.tracks[i];
                let next = self.paths.log_file(&t.name, t.restart + 1);
                if !progressed && next.exists() {
                    let t = &mut self.tracks[i];
                    t.restart += 1;
                    t.offset = 0;
                    t.pending.clear();
                    continue;
                }
                break;
            }
        }
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        any
    }

    fn read_track(&mut self, i: usize) -> (Vec<LogEntry>, bool) {
        let t = &mut self.tracks[i];
        let path = self.paths.log_file(&t.name, t.restart);
        let Ok(mut f) = std::fs::File::open(&path) else {
            return (Vec::new(), false);
        };
        if f.seek(SeekFrom::Start(t.offset)).is_err() {
            return (Vec::new(), false);
        }
        let mut buf = Vec::new();
        let n = f.read_to_end(&mut buf).unwrap_or(0);
        if n == 0 {
            return (Vec::new(), false);
        }
        t.offset += n as u64;
        t.pending.extend_from_slice(&buf);
        let mut out = Vec::new();
        while let Some(pos) = t.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = t.pending.drain(..=pos).collect();
            if let Some(e) = cri_log::parse_line(&line[..line.len() - 1]) {
                out.push(e);
            }
        }
        (out, true)
    }

    pub fn emit(&self, name: &str, e: &LogEntry) {
        let mut bytes = Vec::new();
        if self.timestamps {
            bytes.extend_from_slice(e.timestamp.as_bytes());
            bytes.push(b' ');
        }
        if self.prefix {
            bytes.extend_from_slice(format!("{name} | ").as_bytes());
            bytes.extend_from_slice(&e.text);
            bytes.push(b'\n');
        } else {
            bytes.extend_from_slice(&e.raw());
        }
        let _ = match e.stream {
            Stream::Stdout => std::io::stdout().write_all(&bytes),
            Stream::Stderr => std::io::stderr().write_all(&bytes),
        };
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
    f.timestamps = a.timestamps;
    if let Some(n) = a.tail {
        // Print only the last n lines of the chosen instances.
        for (name, restart) in &tracks {
            let entries = cri_log::read_all(&paths.log_file(name, *restart)).unwrap_or_default();
            let skip = entries.len().saturating_sub(n);
            for e in &entries[skip..] {
                f.emit(name, e);
            }
        }
        if !a.follow {
            return 0;
        }
        // Skip what was printed.
        let mut g = LogFollower::new(paths.clone(), tracks, prefix);
        g.timestamps = a.timestamps;
        for t in g.tracks.iter_mut() {
            t.offset = std::fs::metadata(paths.log_file(&t.name, t.restart))
                .map(|m| m.len())
                .unwrap_or(0);
        }
        f = g;
    } else {
        f.poll();
        if !a.follow || a.previous {
            return 0;
        }
    }
    loop {
        let done = super::pod_over(roots, &v.record.id);
        f.poll();
        if done {
            f.poll();
            return 0;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
