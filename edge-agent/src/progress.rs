//! Terminal progress for long work; silent when not on a terminal or under `--cron`.
//! Once the amount of work is known (or estimated) the line shows a total, a
//! percentage and an ETA.

use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The bar on screen, so that lines printed from anywhere go above it.
static SHOWN: Mutex<Option<ProgressBar>> = Mutex::new(None);

#[derive(Clone)]
pub struct Progress {
    bar: ProgressBar,
    verb: String,
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
        }
    }

    /// Whether anything is drawn (callers skip work that only feeds the display).
    pub fn is_shown(&self) -> bool {
        !self.bar.is_hidden()
    }

    /// The bytes the work will cover, or an estimate; from now on the line shows a
    /// percentage and an ETA. An estimate that turns out low grows with the work.
    pub fn set_total(&self, bytes: u64) {
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
        self.bar.inc(n);
        if let Some(len) = self.bar.length()
            && self.bar.position() > len
        {
            self.bar.set_length(self.bar.position());
        }
    }

    pub fn message(&self, msg: String) {
        self.bar.set_message(msg);
    }

    /// Prints a line above the bar (or plainly when there is none).
    pub fn warn(&self, line: &str) {
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
