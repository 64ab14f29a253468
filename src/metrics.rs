//! Prometheus metrics of one process (a server or a proxy), rendered in the text exposition
//! format (version 0.0.4) by `GET /metrics`.
//!
//! Counters and histograms that the I/O paths update live in one process-wide [`Metrics`]
//! value ([`global`]): a process runs exactly one server or one proxy, and a global keeps the
//! hot paths free of extra plumbing. Values that already exist elsewhere (Raft role, term and
//! indexes, peer progress, actor restarts) are not copied here; the endpoint reads them when
//! scraped and renders them with [`Exposition`].
//!
//! Series (all prefixed `raftblk_`):
//! - `volume_requests_total{volume,op,result}`, `volume_bytes_total{volume,op}`,
//!   `volume_request_duration_seconds{volume,op}` (histogram): NBD requests that reached a
//!   backend, on the server and on the proxy.
//! - `fsync_duration_seconds` (histogram): checkpoint fdatasyncs of the images (server).
//! - `proxy_cache_lookups_total{result="hit"|"miss"}` (proxy).
//! - Raft and restart series, see `control::metrics`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::RwLock;

/// Upper bounds of the latency histograms' buckets, in seconds (`+Inf` is implicit).
pub const DURATION_BUCKETS_SECONDS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Distinct (volume, operation) series kept; requests beyond are counted under volume
/// `_other`, so a client cycling through export names cannot grow memory without limit.
const VOLUME_SERIES_MAX: usize = 4096;

/// A latency histogram with fixed buckets; lock-free to update.
#[derive(Default)]
pub struct Histogram {
    /// Non-cumulative counts per bucket; the last is `+Inf`.
    buckets: [AtomicU64; DURATION_BUCKETS_SECONDS.len() + 1],
    sum_nanoseconds: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        let bucket = DURATION_BUCKETS_SECONDS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(DURATION_BUCKETS_SECONDS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let nanoseconds = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanoseconds
            .fetch_add(nanoseconds, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// Counters of one (volume, operation).
#[derive(Default)]
pub struct VolumeOpMetrics {
    pub ok_total: AtomicU64,
    pub error_total: AtomicU64,
    pub bytes_total: AtomicU64,
    pub duration: Histogram,
}

/// The process-wide counters and histograms.
#[derive(Default)]
pub struct Metrics {
    volume_ops: RwLock<BTreeMap<(String, &'static str), Arc<VolumeOpMetrics>>>,
    pub fsync_duration: Histogram,
    pub proxy_cache_hits_total: AtomicU64,
    pub proxy_cache_misses_total: AtomicU64,
}

/// The process's metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::default)
}

impl Metrics {
    /// The series of `volume` (an export name; a `@epoch` suffix is dropped) and `op`.
    pub fn volume_op(&self, volume: &str, op: &'static str) -> Arc<VolumeOpMetrics> {
        let volume = volume.split('@').next().unwrap_or(volume);
        if let Some(found) = self.volume_ops.read().get(&(volume.to_string(), op)) {
            return found.clone();
        }
        let mut table = self.volume_ops.write();
        let key = if table.len() >= VOLUME_SERIES_MAX {
            ("_other".to_string(), op)
        } else {
            (volume.to_string(), op)
        };
        table.entry(key).or_default().clone()
    }

    /// Records one finished NBD request.
    pub fn record_request(
        &self,
        volume: &str,
        op: &'static str,
        bytes: u64,
        ok: bool,
        duration: Duration,
    ) {
        let series = self.volume_op(volume, op);
        if ok {
            series.ok_total.fetch_add(1, Ordering::Relaxed);
            series.bytes_total.fetch_add(bytes, Ordering::Relaxed);
        } else {
            series.error_total.fetch_add(1, Ordering::Relaxed);
        }
        series.duration.observe(duration);
    }

    /// Writes the volume, fsync and cache series.
    pub fn render(&self, out: &mut Exposition) {
        let table = self.volume_ops.read();
        out.header(
            "raftblk_volume_requests_total",
            "counter",
            "NBD requests that reached a backend, by volume, operation and result.",
        );
        for ((volume, op), series) in table.iter() {
            for (result, value) in [("ok", &series.ok_total), ("error", &series.error_total)] {
                out.sample(
                    "raftblk_volume_requests_total",
                    &[("volume", volume), ("op", op), ("result", result)],
                    value.load(Ordering::Relaxed) as f64,
                );
            }
        }
        out.header(
            "raftblk_volume_bytes_total",
            "counter",
            "Bytes read, written, trimmed or zeroed by successful NBD requests.",
        );
        for ((volume, op), series) in table.iter() {
            out.sample(
                "raftblk_volume_bytes_total",
                &[("volume", volume), ("op", op)],
                series.bytes_total.load(Ordering::Relaxed) as f64,
            );
        }
        out.header(
            "raftblk_volume_request_duration_seconds",
            "histogram",
            "Time from dispatch to reply of NBD requests.",
        );
        for ((volume, op), series) in table.iter() {
            out.histogram(
                "raftblk_volume_request_duration_seconds",
                &[("volume", volume), ("op", op)],
                &series.duration,
            );
        }
        drop(table);
        out.header(
            "raftblk_fsync_duration_seconds",
            "histogram",
            "Checkpoint fdatasyncs of the volume images.",
        );
        out.histogram("raftblk_fsync_duration_seconds", &[], &self.fsync_duration);
    }

    /// Writes the proxy cache series.
    pub fn render_proxy_cache(&self, out: &mut Exposition) {
        out.header(
            "raftblk_proxy_cache_lookups_total",
            "counter",
            "Read cache lookups of the proxy by result.",
        );
        out.sample(
            "raftblk_proxy_cache_lookups_total",
            &[("result", "hit")],
            self.proxy_cache_hits_total.load(Ordering::Relaxed) as f64,
        );
        out.sample(
            "raftblk_proxy_cache_lookups_total",
            &[("result", "miss")],
            self.proxy_cache_misses_total.load(Ordering::Relaxed) as f64,
        );
    }
}

/// A Prometheus text exposition being written.
#[derive(Default)]
pub struct Exposition {
    text: String,
}

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn escape_label_value(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn format_value(value: f64) -> String {
    if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.to_string()
    } else if value.is_nan() {
        "NaN".to_string()
    } else {
        format!("{value}")
    }
}

impl Exposition {
    pub fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (position, (key, value)) in labels.iter().enumerate() {
                if position > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{key}=\"{}\"", escape_label_value(value));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {}", format_value(value));
    }

    /// A gauge or counter with one sample and no labels, header included.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.header(name, kind, help);
        self.sample(name, &[], value);
    }

    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], histogram: &Histogram) {
        let mut cumulative = 0u64;
        let bucket_name = format!("{name}_bucket");
        for (position, bound) in DURATION_BUCKETS_SECONDS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .enumerate()
        {
            cumulative += histogram.buckets[position].load(Ordering::Relaxed);
            let le = format_value(bound);
            let mut with_le: Vec<(&str, &str)> = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&bucket_name, &with_le, cumulative as f64);
        }
        let sum_seconds = histogram.sum_nanoseconds.load(Ordering::Relaxed) as f64 / 1e9;
        self.sample(&format!("{name}_sum"), labels, sum_seconds);
        // The count equals the +Inf bucket, read from the same loads.
        self.sample(&format!("{name}_count"), labels, cumulative as f64);
    }

    pub fn finish(self) -> String {
        self.text
    }
}

/// The metrics listener of the proxy (`[proxy] metrics_listen`): `GET /metrics` only.
pub async fn serve_proxy_metrics(
    listen: std::net::SocketAddr,
    logger: slog::Logger,
) -> anyhow::Result<std::net::SocketAddr> {
    use anyhow::Context as _;
    let server = actix_web::HttpServer::new(|| {
        actix_web::App::new().route(
            "/metrics",
            actix_web::web::get().to(|| async {
                let mut out = Exposition::default();
                global().render(&mut out);
                global().render_proxy_cache(&mut out);
                actix_web::HttpResponse::Ok()
                    .content_type(CONTENT_TYPE)
                    .body(out.finish())
            }),
        )
    })
    .workers(1)
    .disable_signals()
    .bind(listen)
    .with_context(|| format!("binding the proxy metrics listener to {listen}"))?;
    let address = server
        .addrs()
        .first()
        .copied()
        .context("the metrics listener has no address")?;
    actix_rt::spawn(server.run());
    slog::info!(logger, "proxy metrics listening"; "address" => %address);
    Ok(address)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_labels_escaped() {
        let histogram = Histogram::default();
        histogram.observe(Duration::from_micros(50));
        histogram.observe(Duration::from_millis(3));
        histogram.observe(Duration::from_secs(60));
        let mut out = Exposition::default();
        out.histogram("h", &[("volume", "a\"b")], &histogram);
        let text = out.finish();
        assert!(text.contains("h_bucket{volume=\"a\\\"b\",le=\"0.0001\"} 1\n"));
        assert!(text.contains("h_bucket{volume=\"a\\\"b\",le=\"0.005\"} 2\n"));
        assert!(text.contains("h_bucket{volume=\"a\\\"b\",le=\"10\"} 2\n"));
        assert!(text.contains("h_bucket{volume=\"a\\\"b\",le=\"+Inf\"} 3\n"));
        assert!(text.contains("h_count{volume=\"a\\\"b\"} 3\n"));
    }

    #[test]
    fn export_names_with_epochs_share_the_volume_series() {
        let metrics = Metrics::default();
        metrics.record_request("disk0@7", "write", 4096, true, Duration::from_millis(1));
        metrics.record_request("disk0", "write", 4096, true, Duration::from_millis(1));
        let series = metrics.volume_op("disk0", "write");
        assert_eq!(series.ok_total.load(Ordering::Relaxed), 2);
        assert_eq!(series.bytes_total.load(Ordering::Relaxed), 8192);
    }
}
