//! The server's counters, gauges and latency histograms, written in Prometheus' text format
//! (`GET /metrics`).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: usize) {
        self.0.fetch_add(n as u64, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, n: usize) {
        self.0.store(n as u64, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Counts of observations at or below each bound, their sum and count (Prometheus' cumulative
/// buckets are made when written).
pub struct Histogram {
    bounds: &'static [f64],
    state: Mutex<(Vec<u64>, f64, u64)>,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, state: Mutex::new((vec![0; bounds.len()], 0.0, 0)) }
    }

    pub fn observe(&self, value: f64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = self.bounds.iter().position(|&b| value <= b) {
            s.0[i] += 1;
        }
        s.1 += value;
        s.2 += 1;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, n) in self.bounds.iter().zip(&s.0) {
            cumulative += n;
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}", s.2, s.1, s.2);
    }
}

const SECONDS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
const ROWS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

pub struct Metrics {
    /// Requests answered, by HTTP status class.
    pub ok: Counter,
    pub client_errors: Counter,
    pub server_errors: Counter,
    pub rejected_queue_full: Counter,
    /// Requests whose client left before the answer ended.
    pub cancelled: Counter,
    pub prompt_tokens: Counter,
    pub completion_tokens: Counter,
    pub queue_depth: Gauge,
    pub running: Gauge,
    pub batch_rows: Histogram,
    pub time_to_first_token: Histogram,
    pub request_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            ok: Counter::default(),
            client_errors: Counter::default(),
            server_errors: Counter::default(),
            rejected_queue_full: Counter::default(),
            cancelled: Counter::default(),
            prompt_tokens: Counter::default(),
            completion_tokens: Counter::default(),
            queue_depth: Gauge::default(),
            running: Gauge::default(),
            batch_rows: Histogram::new(ROWS),
            time_to_first_token: Histogram::new(SECONDS),
            request_seconds: Histogram::new(SECONDS),
        }
    }
}

impl Metrics {
    pub fn first_token(&self, queued_at: Instant) {
        self.time_to_first_token.observe(queued_at.elapsed().as_secs_f64());
    }

    pub fn finished(&self, queued_at: Instant) {
        self.request_seconds.observe(queued_at.elapsed().as_secs_f64());
    }

    /// Everything in Prometheus' text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, labels: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (label, value) in labels {
                let _ = writeln!(out, "{name}{label} {value}");
            }
        };
        counter(
            &mut out,
            "candle_peft_requests_total",
            "Requests answered, by HTTP status class.",
            &[
                ("{status=\"2xx\"}", self.ok.get()),
                ("{status=\"4xx\"}", self.client_errors.get()),
                ("{status=\"429\"}", self.rejected_queue_full.get()),
                ("{status=\"5xx\"}", self.server_errors.get()),
            ],
        );
        counter(&mut out, "candle_peft_requests_cancelled_total", "Requests whose client left before the answer ended.", &[("", self.cancelled.get())]);
        counter(&mut out, "candle_peft_prompt_tokens_total", "Prompt tokens prefilled.", &[("", self.prompt_tokens.get())]);
        counter(&mut out, "candle_peft_generation_tokens_total", "Tokens generated.", &[("", self.completion_tokens.get())]);
        let gauge = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        };
        gauge(&mut out, "candle_peft_queue_depth", "Requests waiting for a place in the batch.", self.queue_depth.get());
        gauge(&mut out, "candle_peft_running_requests", "Requests being decoded.", self.running.get());
        self.batch_rows.write(&mut out, "candle_peft_batch_rows", "Rows of each decoding step's batch.");
        self.time_to_first_token.write(&mut out, "candle_peft_time_to_first_token_seconds", "From the request to its first text.");
        self.request_seconds.write(&mut out, "candle_peft_request_seconds", "From the request to its last token.");
        out
    }
}
