//! Terminal progress for long work; silent when not on a terminal or under `--cron`.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Clone)]
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A progress display on stderr when `show` is set and stderr is a terminal.
    pub fn new(show: bool, verb: &str) -> Self {
        use std::io::IsTerminal;
        let bar = if show && std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(4));
            let style = ProgressStyle::with_template(&format!(
                "{{spinner}} {verb} [{{elapsed_precise}}] {{binary_bytes}} ({{binary_bytes_per_sec}}) {{msg}}"
            ))
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(250));
            bar
        } else {
            ProgressBar::hidden()
        };
        Progress { bar }
    }

    pub fn add_bytes(&self, n: u64) {
        self.bar.inc(n);
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
    }
}
