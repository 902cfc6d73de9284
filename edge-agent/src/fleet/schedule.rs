//! When the next backup is due: pure logic over the policy's schedule, the last run's
//! start and the clock. A run is never closer to the previous one than the minimum
//! gap; a run missed while the agent was stopped happens at once on start, once.

use std::time::{Duration, SystemTime};

use chrono::{DateTime, Local};

#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("cron expression {expr:?}: {reason}")]
    Cron { expr: String, reason: String },
    #[error("a backup interval of zero")]
    ZeroInterval,
}

#[derive(Debug, Clone)]
pub enum Schedule {
    Every(Duration),
    /// Five fields, in the host's local time.
    Cron(Box<croner::Cron>),
}

impl Schedule {
    pub fn cron(expr: &str) -> Result<Self, ScheduleError> {
        wire::message::parse_cron(expr)
            .map(|c| Schedule::Cron(Box::new(c)))
            .map_err(|reason| ScheduleError::Cron {
                expr: expr.to_string(),
                reason,
            })
    }

    pub fn every(d: Duration) -> Result<Self, ScheduleError> {
        if d.is_zero() {
            return Err(ScheduleError::ZeroInterval);
        }
        Ok(Schedule::Every(d))
    }

    pub fn from_wire(s: &wire::message::Schedule) -> Result<Self, ScheduleError> {
        match s {
            wire::message::Schedule::Every { seconds } => {
                Self::every(Duration::from_secs(*seconds))
            }
            wire::message::Schedule::Cron(expr) => Self::cron(expr),
        }
    }

    /// The first time the schedule fires strictly after `t`.
    fn after(&self, t: SystemTime) -> Option<SystemTime> {
        match self {
            Schedule::Every(d) => t.checked_add(*d),
            Schedule::Cron(c) => {
                let local: DateTime<Local> = t.into();
                c.find_next_occurrence(&local, false).ok().map(Into::into)
            }
        }
    }
}

/// When the next run is due. `last_start` is when the previous run started (`None`:
/// never ran, so it is due now); a clock that went backwards past `last_start` makes
/// the run due after the schedule's time from now, not never.
pub fn next_due(
    schedule: &Schedule,
    min_gap: Duration,
    last_start: Option<SystemTime>,
    now: SystemTime,
) -> SystemTime {
    let Some(last) = last_start else {
        return now;
    };
    let base = if last > now { now } else { last };
    let due = schedule.after(base).unwrap_or(now);
    let earliest = base.checked_add(min_gap).unwrap_or(due);
    due.max(earliest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + s)
    }

    #[test]
    fn intervals_count_from_the_last_start_and_respect_the_gap() {
        let every = Schedule::every(Duration::from_secs(600)).unwrap();
        assert_eq!(next_due(&every, Duration::ZERO, None, t(5)), t(5));
        assert_eq!(next_due(&every, Duration::ZERO, Some(t(0)), t(5)), t(600));
        // Missed while stopped: due at once (a time in the past), not once per miss.
        assert!(next_due(&every, Duration::ZERO, Some(t(0)), t(5000)) <= t(5000));
        let gap = Duration::from_secs(900);
        assert_eq!(next_due(&every, gap, Some(t(0)), t(5)), t(900));
        // A clock that jumped back: counted from now.
        assert_eq!(
            next_due(&every, Duration::ZERO, Some(t(10_000)), t(0)),
            t(600)
        );
        assert!(Schedule::every(Duration::ZERO).is_err());
    }

    #[test]
    fn cron_fires_on_its_minutes() {
        let every_5 = Schedule::cron("*/5 * * * *").unwrap();
        let due = next_due(&every_5, Duration::ZERO, Some(t(0)), t(1));
        let secs = due
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert_eq!(secs % 300, 0, "on a multiple of five minutes");
        assert!(due > t(0) && due <= t(300));
        for bad in ["* * * *", "61 * * * *", "a b c d e", "* * * * * *"] {
            assert!(Schedule::cron(bad).is_err(), "{bad}");
        }
    }
}
