//! Logging: one slog root logger for the process, written to stderr as human-readable terminal
//! lines or as JSON objects (one per line), or to the local syslog socket (`/dev/log`, facility
//! daemon, RFC 3164 through `slog-syslog`), filtered by level. Records go through an async drain
//! so a slow terminal never stalls the Raft or storage threads; the drain's queue is bounded and
//! drops (and counts) records rather than grow without limit.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use slog::Drain;

use crate::config::{LogConfig, LogFormat};

/// Holds the async drain's worker; dropping it flushes pending records.
pub struct LoggingGuard {
    _async_guard: slog_async::AsyncGuard,
}

pub(crate) fn level_from_name(name: &str) -> slog::Level {
    match name {
        "trace" => slog::Level::Trace,
        "debug" => slog::Level::Debug,
        // "warn" is how most tools spell it.
        "warning" | "warn" => slog::Level::Warning,
        "error" => slog::Level::Error,
        "critical" => slog::Level::Critical,
        // Config validation admits only the names above and "info".
        _ => slog::Level::Info,
    }
}

/// Thresholds and the rate limit of the operator warnings, set once per process by
/// [`build_logger`] (defaults before that, e.g. in unit tests).
pub struct OperatorWarnings {
    pub limiter: WarningLimiter,
    pub fsync_slow: Duration,
}

static OPERATOR_WARNINGS: OnceLock<OperatorWarnings> = OnceLock::new();

pub fn operator_warnings() -> &'static OperatorWarnings {
    OPERATOR_WARNINGS.get_or_init(|| OperatorWarnings {
        limiter: WarningLimiter::new(Duration::from_secs(30)),
        fsync_slow: Duration::from_millis(500),
    })
}

/// Records the duration of one checkpoint fdatasync in the metrics, and logs "fsync slow"
/// (rate-limited) above the configured threshold.
pub fn record_fsync(logger: &slog::Logger, duration: Duration) {
    crate::metrics::global().fsync_duration.observe(duration);
    let warnings = operator_warnings();
    if duration > warnings.fsync_slow {
        if let Some(suppressed) = warnings.limiter.admit("fsync slow") {
            slog::warn!(logger, "fsync slow";
                "duration_ms" => duration.as_millis() as u64,
                "threshold_ms" => warnings.fsync_slow.as_millis() as u64,
                "suppressed" => suppressed);
        }
    }
}

/// Builds the root logger described by `config`.
pub fn build_logger(config: &LogConfig) -> (slog::Logger, LoggingGuard) {
    let _ = OPERATOR_WARNINGS.set(OperatorWarnings {
        limiter: WarningLimiter::new(Duration::from_millis(config.warning_interval_ms)),
        fsync_slow: Duration::from_millis(config.fsync_slow_ms),
    });
    let level = level_from_name(&config.level);
    let drain: Box<dyn Drain<Ok = (), Err = slog::Never> + Send> = match config.format {
        LogFormat::Terminal => {
            let decorator = slog_term::TermDecorator::new().stderr().build();
            Box::new(slog_term::FullFormat::new(decorator).build().fuse())
        }
        LogFormat::Json => Box::new(
            slog_json::Json::new(std::io::stderr())
                .add_default_keys()
                .build()
                .fuse(),
        ),
        LogFormat::Syslog => match slog_syslog::SyslogBuilder::new()
            .facility(slog_syslog::Facility::LOG_DAEMON)
            // The crate's own default level depends on its cargo features; filter here instead.
            .level(slog::Level::Trace)
            .unix("/dev/log")
            .start()
        {
            // A record syslog cannot take is dropped: logging must never stop the server.
            Ok(streamer) => Box::new(streamer.ignore_res()),
            Err(error) => {
                eprintln!(
                    "raftblk: cannot open the syslog socket /dev/log ({error}); logging to stderr"
                );
                let decorator = slog_term::PlainDecorator::new(std::io::stderr());
                Box::new(slog_term::FullFormat::new(decorator).build().fuse())
            }
        },
    };
    let (async_drain, async_guard) = slog_async::Async::new(drain)
        .chan_size(4096)
        .overflow_strategy(slog_async::OverflowStrategy::DropAndReport)
        .build_with_guard();
    let drain = async_drain.filter_level(level).fuse();
    let logger = slog::Logger::root(drain, slog::o!("service" => "raftblk"));
    (
        logger,
        LoggingGuard {
            _async_guard: async_guard,
        },
    )
}

/// Rate limit for operator warnings that can repeat (replica lagging, fsync slow, ...): each
/// key is let through at most once per interval, and the next record that passes reports how
/// many were suppressed in between.
pub struct WarningLimiter {
    interval: Duration,
    last: Mutex<HashMap<String, (Instant, u64)>>,
}

/// Distinct keys remembered; beyond, the table is cleared (a burst of distinct warnings then
/// gets logged again, which is the safe direction).
const WARNING_KEYS_MAX: usize = 1024;

impl WarningLimiter {
    pub fn new(interval: Duration) -> Self {
        WarningLimiter {
            interval,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(suppressed)` if a record for `key` should be logged now (with the number of
    /// repeats that were not), `None` if it is a repeat within the interval.
    pub fn admit(&self, key: &str) -> Option<u64> {
        let now = Instant::now();
        let mut last = self.last.lock();
        if last.len() >= WARNING_KEYS_MAX && !last.contains_key(key) {
            last.clear();
        }
        match last.get_mut(key) {
            Some((logged_at, suppressed)) if now.duration_since(*logged_at) < self.interval => {
                *suppressed += 1;
                None
            }
            Some((logged_at, suppressed)) => {
                let count = *suppressed;
                *logged_at = now;
                *suppressed = 0;
                Some(count)
            }
            None => {
                last.insert(key.to_string(), (now, 0));
                Some(0)
            }
        }
    }
}

/// A logger that discards everything, for tests and library users that bring none.
pub fn discard_logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_warnings_are_counted_not_logged() {
        let limiter = WarningLimiter::new(Duration::from_secs(3600));
        assert_eq!(limiter.admit("fsync slow"), Some(0));
        assert_eq!(limiter.admit("fsync slow"), None);
        assert_eq!(limiter.admit("fsync slow"), None);
        assert_eq!(limiter.admit("replica lagging 2"), Some(0));
        let open = WarningLimiter::new(Duration::ZERO);
        assert_eq!(open.admit("x"), Some(0));
        assert_eq!(open.admit("x"), Some(0));
    }
}
