//! Terminal progress for long work; silent when not on a terminal or under `--cron`.
//! Once the amount of work is known (or estimated) the line shows a total, a
//! percentage and an ETA. A [`Tally`] lets another thread (the agent daemon) read the
//! same counts and warnings while the work runs.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The bar on screen, so that lines printed from anywhere go above it.
static SHOWN: Mutex<Option<ProgressBar>> = Mutex::new(None);

#[derive(Clone)]
pub struct Progress {
    bar: ProgressBar,
    verb: String,
    tally: Option<Arc<Tally>>,
}

/// Counts and warning lines of running work, for a reader on another thread. Lines
/// are bounded: past `max_lines` unread ones, the newest are counted, not kept.
#[derive(Default)]
pub struct Tally {
    files: AtomicU64,
    bytes: AtomicU64,
    /// 0 while unknown.
    total: AtomicU64,
    lines: Mutex<Lines>,
    max_lines: usize,
}

#[derive(Default)]
struct Lines {
    queue: VecDeque<String>,
    dropped: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub files: u64,
    pub bytes: u64,
    pub total: Option<u64>,
}

impl Tally {
    pub fn new(max_lines: usize) -> Self {
        Tally {
            max_lines,
            ..Tally::default()
        }
    }

    pub fn counts(&self) -> Counts {
        let total = self.total.load(Ordering::Relaxed);
        Counts {
            files: self.files.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            total: (total > 0).then_some(total),
        }
    }

    /// The lines not read yet, and how many were dropped since the last call.
    pub fn take_lines(&self) -> (Vec<String>, u64) {
        let Ok(mut l) = self.lines.lock() else {
            return (Vec::new(), 0);
        };
        let dropped = std::mem::take(&mut l.dropped);
        (l.queue.drain(..).collect(), dropped)
    }

    fn push_line(&self, line: &str) {
        if let Ok(mut l) = self.lines.lock() {
            if l.queue.len() < self.max_lines {
                l.queue.push_back(line.to_string());
            } else {
                l.dropped = l.dropped.saturating_add(1);
            }
        }
    }
}

impl Progress {
    /// A progress display on stderr when `show` is set and stderr is a terminal.
    pub fn new(show: bool, verb: &str) -> Self {
        use std::io::IsTerminal;
        let bar = if show && std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(4));
            bar.set_style(style(&format!(
                "{{spinner}} {verb} [{{elapsed_precise}}] {{binary_bytes}} ({{binary_bytes_per_sec}}) {{wide_msg}}"
            )));
            bar.enable_steady_tick(Duration::from_millis(250));
            if let Ok(mut shown) = SHOWN.lock() {
                *shown = Some(bar.clone());
            }
            bar
        } else {
            ProgressBar::hidden()
        };
        Progress {
            bar,
            verb: verb.to_string(),
            tally: None,
        }
    }

    /// No display; counts and lines go to `tally` (and lines to stderr).
    pub fn tallied(verb: &str, tally: Arc<Tally>) -> Self {
        Progress {
            tally: Some(tally),
            ..Progress::new(false, verb)
        }
    }

    /// Whether anyone reads the totals (callers skip work that only feeds them).
    pub fn is_watched(&self) -> bool {
        self.is_shown() || self.tally.is_some()
    }

    /// Whether anything is drawn (callers skip work that only feeds the display).
    pub fn is_shown(&self) -> bool {
        !self.bar.is_hidden()
    }

    /// The bytes the work will cover, or an estimate; from now on the line shows a
    /// percentage and an ETA. An estimate that turns out low grows with the work.
    pub fn set_total(&self, bytes: u64) {
        if let Some(t) = &self.tally {
            t.total.store(bytes, Ordering::Relaxed);
        }
        if self.bar.is_hidden() {
            return;
        }
        self.bar.set_style(style(&format!(
            "{{spinner}} {} {{bar:20}} {{binary_bytes}}/{{binary_total_bytes}} {{percent}}% ETA {{eta}} ({{binary_bytes_per_sec}}) {{wide_msg}}",
            self.verb
        )));
        self.bar.set_length(bytes.max(self.bar.position()));
        self.bar.tick();
    }

    pub fn add_bytes(&self, n: u64) {
        if let Some(t) = &self.tally {
            t.bytes.fetch_add(n, Ordering::Relaxed);
        }
        self.bar.inc(n);
        if let Some(len) = self.bar.length()
            && self.bar.position() > len
        {
            self.bar.set_length(self.bar.position());
        }
    }

    pub fn add_file(&self) {
        if let Some(t) = &self.tally {
            t.files.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn message(&self, msg: String) {
        self.bar.set_message(msg);
    }

    /// Prints a line above the bar (or plainly when there is none).
    pub fn warn(&self, line: &str) {
        if let Some(t) = &self.tally {
            t.push_line(line);
        }
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.suspend(|| eprintln!("{line}"));
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
        if let Ok(mut shown) = SHOWN.lock()
            && shown.as_ref().is_some_and(|b| b.is_finished())
        {
            *shown = None;
        }
    }
}

/// Takes whatever progress line is on screen away (before a final error is printed).
pub fn clear() {
    let bar = SHOWN.lock().ok().and_then(|mut s| s.take());
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}

/// Prints a line on stderr above whatever progress line is on screen.
pub fn notice(line: &str) {
    let bar = SHOWN.lock().ok().and_then(|s| s.clone());
    match bar {
        Some(bar) if !bar.is_finished() => bar.suspend(|| eprintln!("{line}")),
        _ => eprintln!("{line}"),
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_spinner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tally_sees_counts_and_keeps_a_bounded_number_of_lines() {
        let tally = Arc::new(Tally::new(2));
        let p = Progress::tallied("backup", tally.clone());
        assert!(p.is_watched() && !p.is_shown());
        assert_eq!(tally.counts().total, None);
        p.set_total(100);
        p.add_file();
        p.add_bytes(40);
        p.add_bytes(2);
        for l in ["a", "b", "c", "d"] {
            p.warn(l);
        }
        let c = tally.counts();
        assert_eq!((c.files, c.bytes, c.total), (1, 42, Some(100)));
        assert_eq!(tally.take_lines(), (vec!["a".into(), "b".into()], 2));
        assert_eq!(tally.take_lines(), (vec![], 0), "read lines are gone");
        p.warn("e");
        assert_eq!(tally.take_lines(), (vec!["e".into()], 0));
    }
}
