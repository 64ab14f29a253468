//! Logging: one slog root logger for the process, written to stderr as human-readable terminal
//! lines or as JSON objects (one per line), filtered by level. Records go through an async drain
//! so a slow terminal never stalls the Raft or storage threads; the drain's queue is bounded and
//! drops (and counts) records rather than grow without limit.

use slog::Drain;

use crate::config::{LogConfig, LogFormat};

/// Holds the async drain's worker; dropping it flushes pending records.
pub struct LoggingGuard {
    _async_guard: slog_async::AsyncGuard,
}

fn level_from_name(name: &str) -> slog::Level {
    match name {
        "trace" => slog::Level::Trace,
        "debug" => slog::Level::Debug,
        "warning" => slog::Level::Warning,
        "error" => slog::Level::Error,
        "critical" => slog::Level::Critical,
        // Config validation admits only the names above and "info".
        _ => slog::Level::Info,
    }
}

/// Builds the root logger described by `config`.
pub fn build_logger(config: &LogConfig) -> (slog::Logger, LoggingGuard) {
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

/// A logger that discards everything, for tests and library users that bring none.
pub fn discard_logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}
