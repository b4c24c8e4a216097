//! Pull progress: a bar per layer on a terminal (indicatif), plain lines
//! otherwise, nothing with `quiet`.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::HashMap;
use std::io::IsTerminal;

pub struct Progress {
    mode: Mode,
    bars: HashMap<String, ProgressBar>,
    stderr: bool,
}

enum Mode {
    Quiet,
    Lines,
    Bars(MultiProgress),
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

impl Progress {
    /// Bars when stderr is a terminal, lines otherwise; nothing if `quiet`.
    pub fn new(quiet: bool) -> Self {
        let mode = if quiet {
            Mode::Quiet
        } else if std::io::stderr().is_terminal() {
            Mode::Bars(MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
        } else {
            Mode::Lines
        };
        Progress {
            mode,
            bars: HashMap::new(),
            stderr: false,
        }
    }

    /// Plain lines go to stderr (for `husk run`, whose stdout is the
    /// containers').
    pub fn to_stderr(mut self) -> Self {
        self.stderr = true;
        self
    }

    fn line(&self, text: &str) {
        if self.stderr {
            eprintln!("{text}");
        } else {
            println!("{text}");
        }
    }

    pub fn quiet() -> Self {
        Self::new(true)
    }

    pub fn message(&self, text: &str) {
        match &self.mode {
            Mode::Quiet => {}
            Mode::Lines => self.line(text),
            Mode::Bars(m) => {
                let _ = m.println(text);
            }
        }
    }

    /// A layer already in the store.
    pub fn exists(&self, digest: &str) {
        self.message(&format!("{}: Already exists", short(digest)));
    }

    pub fn start(&mut self, digest: &str, size: u64) {
        match &self.mode {
            Mode::Quiet => {}
            Mode::Lines => self.line(&format!("{}: Pulling ({size} bytes)", short(digest))),
            Mode::Bars(m) => {
                let bar = m.add(ProgressBar::new(size));
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix}: {bar:30} {bytes}/{total_bytes} {bytes_per_sec}",
                    )
                    .expect("template"),
                );
                bar.set_prefix(short(digest).to_owned());
                self.bars.insert(digest.to_owned(), bar);
            }
        }
    }

    pub fn advance(&self, digest: &str, done: u64) {
        if let Some(b) = self.bars.get(digest) {
            b.set_position(done);
        }
    }

    pub fn done(&mut self, digest: &str) {
        match self.bars.remove(digest) {
            Some(b) => b.finish_with_message("Pull complete"),
            None => self.message(&format!("{}: Pull complete", short(digest))),
        }
    }
}
