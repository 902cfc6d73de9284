//! How long storage requests are retried, and notices while they are.
//!
//! `object_store` retries each request on refused or dropped connections, timeouts,
//! 5xx and 429 answers, with exponential backoff and jitter. Its defaults give up within
//! seconds; a nightly backup over a flaky uplink should instead ride out an outage of
//! minutes. It reports each retry as a `tracing` event, which [`RetryNotices`] turns into
//! a [`Notice`] for the command line to print.

use std::time::Duration;

use object_store::{BackoffConfig, RetryConfig};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// How long one request keeps being retried unless the config or `--retry-for` says
/// otherwise.
pub const DEFAULT_RETRY_FOR: Duration = Duration::from_secs(10 * 60);
/// The longest pause between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// Retries for up to `window` per request, waiting 1 s, then about twice as long each
/// time, at most a minute. A zero window means one attempt.
/// The window is checked before each pause, so the last pause (at most a minute) and
/// attempt may end after it.
pub fn config(window: Duration) -> RetryConfig {
    let first = FIRST_BACKOFF.min(window);
    // The window is the limit; the count only has to be out of its way. Every pause is
    // at least `first`, so no more than this many fit.
    let max_retries = if window.is_zero() {
        0
    } else {
        (window.as_secs_f64() / first.as_secs_f64()).ceil() as usize + 1
    };
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: first,
            max_backoff: MAX_BACKOFF.min(window.max(FIRST_BACKOFF)),
            base: 2.0,
        },
        max_retries,
        retry_timeout: window,
    }
}

/// One retry about to happen.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    /// What failed, in a few words: "cannot connect", "server error 503 Service Unavailable".
    pub reason: String,
    /// The pause before the next attempt.
    pub wait: Duration,
    /// Which retry of this request it is (1 for the first).
    pub attempt: u64,
    /// object_store's own words, for `--verbose`.
    pub detail: String,
}

impl Notice {
    /// Reads object_store's retry message ("Encountered transport error of kind Connect,
    /// backing off for 1.3 seconds, retry 1 of 10: …"). Other messages are not notices.
    pub fn parse(message: &str) -> Option<Notice> {
        let rest = message.strip_prefix("Encountered ")?;
        let (what, rest) = rest.split_once(", backing off for ")?;
        let (secs, rest) = rest.split_once(" seconds, retry ")?;
        let attempt = rest
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()?;
        let wait = secs
            .parse::<f64>()
            .ok()
            .and_then(|s| Duration::try_from_secs_f64(s).ok())?;
        let reason = if let Some(kind) = what.strip_prefix("transport error of kind ") {
            match kind {
                "Connect" => "cannot connect".to_string(),
                "Timeout" => "timed out".to_string(),
                "Interrupted" => "connection dropped".to_string(),
                other => format!("request failed ({})", other.to_lowercase()),
            }
        } else if let Some(status) = what.strip_prefix("server error with status ") {
            format!("server error {status}")
        } else {
            "the server answered with an error".to_string()
        };
        Some(Notice {
            reason,
            wait,
            attempt,
            detail: message.to_string(),
        })
    }
}

/// A `tracing` subscriber that sees only object_store's retry messages and hands each
/// as a [`Notice`] to a callback. Install it once with
/// `tracing::subscriber::set_global_default`.
pub struct RetryNotices<F> {
    on_notice: F,
}

impl<F: Fn(&Notice) + Send + Sync + 'static> RetryNotices<F> {
    pub fn new(on_notice: F) -> Self {
        RetryNotices { on_notice }
    }
}

struct MessageText(String);

impl Visit for MessageText {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl<F: Fn(&Notice) + Send + Sync + 'static> Subscriber for RetryNotices<F> {
    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        meta.is_event() && meta.target().starts_with("object_store")
    }

    fn event(&self, event: &Event<'_>) {
        let mut text = MessageText(String::new());
        event.record(&mut text);
        if let Some(notice) = Notice::parse(&text.0) {
            (self.on_notice)(&notice);
        }
    }

    // Spans are not used: every one gets the same id and nothing is recorded.
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_messages_become_notices() {
        let n = Notice::parse("Encountered transport error of kind Connect, backing off for 1.5 seconds, retry 3 of 18446744073709551615: error sending request").unwrap();
        assert_eq!(n.reason, "cannot connect");
        assert_eq!(n.wait, Duration::from_millis(1500));
        assert_eq!(n.attempt, 3);
        let n = Notice::parse("Encountered server error with status 503 Service Unavailable, backing off for 0.1 seconds, retry 1 of 4").unwrap();
        assert_eq!(n.reason, "server error 503 Service Unavailable");
        assert_eq!(Notice::parse("Encountered nothing"), None);
        assert_eq!(
            Notice::parse("Encountered x, backing off for NaN seconds, retry 1 of 2"),
            None
        );
    }

    #[test]
    fn the_window_bounds_the_retries() {
        let c = config(Duration::ZERO);
        assert_eq!(c.max_retries, 0);
        let c = config(Duration::from_secs(600));
        assert_eq!(c.retry_timeout, Duration::from_secs(600));
        assert_eq!(c.max_retries, 601);
        assert_eq!(c.backoff.init_backoff, Duration::from_secs(1));
        assert_eq!(c.backoff.max_backoff, Duration::from_secs(60));
        let c = config(Duration::from_millis(300));
        assert_eq!(c.backoff.init_backoff, Duration::from_millis(300));
    }
}
