//! The decoding loop of the server: one thread that owns the models and runs every request,
//! batched continuously.
//!
//! A request waits in a bounded queue until the loop takes it, at a token boundary: its prompt
//! is prefilled alone, its first token sampled, and its cache row joins the running batch
//! (`KvCache::join` pads the shorter side on the left; the CPU attention skips that padding, so a
//! row's numbers do not depend on who it shares the batch with). Each step then decodes one token
//! for every row, samples each row with its own sampler (its own seed and settings), hands the
//! text that became final to the request, and drops the rows that finished or whose client went
//! away (its receiver closed) before the next step.
//!
//! One batch for every adapter: the model is `Llama::mixed` over the base and the resident
//! adapters (`registry`), told each row's adapter before each forward, so the base's products run
//! once for all rows. Admin commands (load, unload) come through the same queue and are carried
//! out between two steps.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::metrics::Metrics;
use crate::eval::generate::sampling::{Sampler, SamplingConfig};
use crate::eval::generate::stream::TextStream;
use crate::eval::generate::{decode_step, prefill};
use super::registry::{Admin, Registry};
use crate::model::llama::KvCache;
use crate::{Error, Result};

/// Why an answer ended, as OpenAI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// An EOS token or a stop string.
    Stop,
    /// `max_tokens`.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What the loop tells a request, in order: pieces of text, then one `Done` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Text(String),
    Done { finish: Finish, completion_tokens: usize },
    Failed(String),
}

/// What the HTTP side hands the loop.
pub enum Work {
    Job(Job),
    Admin(Admin),
}

/// A request the handlers checked: a known model, a prompt that fits the context.
pub struct Job {
    /// The model's index (0 the base, then the adapters' slots) and its name, which must still
    /// be that index's when the loop takes the request.
    pub model: usize,
    pub model_name: String,
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub eos_token_ids: Vec<u32>,
    pub stop: Vec<String>,
    pub sampling: SamplingConfig,
    pub events: mpsc::UnboundedSender<Event>,
    pub queued_at: Instant,
}

type Decode = Box<dyn Fn(&[u32]) -> Result<String> + Send>;

/// A request being decoded.
struct Row {
    job: Job,
    sampler: Sampler,
    text: TextStream<Decode>,
    /// The prompt and the tokens so far (the repetition penalty reads them).
    seen: Vec<u32>,
    generated: usize,
    /// The token the next step feeds.
    next: u32,
}

impl Row {
    /// Take `token`: send the text it makes final; whether the answer goes on.
    fn push(&mut self, token: u32, metrics: &Metrics) -> Result<bool> {
        self.generated += 1;
        metrics.completion_tokens.inc();
        let done = |row: &mut Row, finish: Finish| {
            let rest = row.text.rest();
            if !rest.is_empty() {
                let _ = row.job.events.send(Event::Text(rest));
            }
            let _ = row.job.events.send(Event::Done { finish, completion_tokens: row.generated });
            metrics.finished(row.job.queued_at);
            Ok(false)
        };
        if self.job.eos_token_ids.contains(&token) {
            return done(self, Finish::Stop);
        }
        self.seen.push(token);
        let (piece, hit) = self.text.push(token)?;
        if !piece.is_empty() {
            if self.generated == 1 {
                metrics.first_token(self.job.queued_at);
            }
            let _ = self.job.events.send(Event::Text(piece));
        }
        if hit {
            return done(self, Finish::Stop);
        }
        if self.generated >= self.job.max_new_tokens {
            return done(self, Finish::Length);
        }
        self.next = token;
        Ok(true)
    }

    fn fail(&self, why: &str) {
        let _ = self.job.events.send(Event::Failed(why.to_string()));
    }
}

/// The running rows and their cache.
#[derive(Default)]
struct Batch {
    cache: KvCache,
    rows: Vec<Row>,
}

impl Batch {
    /// Every row fails with `why`; the batch starts empty again, its cache with it.
    fn fail(&mut self, why: &str) {
        for row in &self.rows {
            row.fail(why);
        }
        *self = Batch::default();
    }
}

pub struct Engine {
    /// The mixed model over the base and the resident adapters.
    pub registry: Registry,
    pub tokenizer: Arc<tokenizers::Tokenizer>,
    /// Rows decoded at once, over all models.
    pub max_batch: usize,
    pub metrics: Arc<Metrics>,
}

impl Engine {
    /// Serve the queue until it is closed and every request taken from it is answered.
    pub fn run(mut self, mut queue: mpsc::Receiver<Work>) {
        let mut batch = Batch::default();
        // Requests taken from the queue and not yet in the batch (no room, or their adapter is
        // waiting for a resident one to finish).
        let mut waiting: std::collections::VecDeque<Job> = std::collections::VecDeque::new();
        loop {
            // Idle: wait for work. Busy: take what is queued, up to the batch size.
            if batch.rows.is_empty() && waiting.is_empty() {
                match queue.blocking_recv() {
                    Some(work) => self.take(work, &mut waiting, &batch),
                    None => return,
                }
            }
            while batch.rows.len() + waiting.len() < self.max_batch {
                match queue.try_recv() {
                    Ok(work) => self.take(work, &mut waiting, &batch),
                    Err(_) => break,
                }
            }
            self.metrics.queue_depth.set(queue.len() + waiting.len());
            // The new rows join one another, then the batch once: its rows are copied once per
            // round, not once per request.
            let mut fresh = Batch::default();
            for _ in 0..waiting.len() {
                let Some(job) = waiting.pop_front() else { break };
                if batch.rows.len() + fresh.rows.len() >= self.max_batch {
                    waiting.push_back(job);
                    continue;
                }
                if !self.registry.is(job.model, &job.model_name) {
                    let _ = job.events.send(Event::Failed(format!("model `{}` was unloaded", job.model_name)));
                    continue;
                }
                let in_use = |m: usize| batch.rows.iter().chain(&fresh.rows).any(|r| r.job.model == m);
                match self.registry.make_resident(job.model, &in_use) {
                    Ok(true) => self.admit(job, &mut fresh),
                    Ok(false) => waiting.push_back(job),
                    Err(e) => {
                        let _ = job.events.send(Event::Failed(format!("loading `{}`: {e}", job.model_name)));
                    }
                }
            }
            if !fresh.rows.is_empty() {
                match batch.cache.join(fresh.cache) {
                    Ok(()) => batch.rows.append(&mut fresh.rows),
                    Err(e) => fresh.rows.iter().for_each(|row| row.fail(&format!("joining the batch: {e}"))),
                }
            }
            self.step(&mut batch);
            self.metrics.running.set(batch.rows.len());
        }
    }

    /// A request waits for its turn; an admin command is carried out now, between two steps.
    fn take(&mut self, work: Work, waiting: &mut std::collections::VecDeque<Job>, batch: &Batch) {
        match work {
            Work::Job(job) => waiting.push_back(job),
            Work::Admin(command) => {
                let in_use = |m: usize| batch.rows.iter().filter(|r| r.job.model == m).count() + waiting.iter().filter(|j| j.model == m).count();
                self.registry.admin(command, &in_use);
            }
        }
    }

    /// Name each row's model for the next forward.
    fn assign(&self, models: impl Iterator<Item = usize>) {
        self.registry.rows.set(models.collect());
    }

    /// Prefill a request alone, sample its first token, and join it to `batch`.
    fn admit(&self, job: Job, batch: &mut Batch) {
        if job.events.is_closed() {
            self.metrics.cancelled.inc();
            return;
        }
        let model = &self.registry.model;
        let tokenizer = self.tokenizer.clone();
        let decode: Decode = Box::new(move |ids: &[u32]| crate::data::tokenize::decode_text(&tokenizer, ids));
        let sampler = match Sampler::new(job.sampling.clone()) {
            Ok(s) => s,
            Err(e) => {
                let _ = job.events.send(Event::Failed(e.to_string()));
                return;
            }
        };
        let text = TextStream::new(decode, job.stop.clone());
        let mut row = Row { seen: job.prompt.clone(), job, sampler, text, generated: 0, next: 0 };
        let mut cache = KvCache::new();
        self.assign(std::iter::once(row.job.model));
        let first = guarded(|| {
            let logits = prefill(model, std::slice::from_ref(&row.job.prompt), 0, &mut cache, row.job.max_new_tokens)?;
            let logits = logits.squeeze(0)?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
            let token = row.sampler.next_token(&logits, &row.seen)?;
            row.push(token, &self.metrics)
        });
        self.metrics.prompt_tokens.add(row.job.prompt.len());
        match first {
            Ok(false) => {}
            Ok(true) => match batch.cache.join(cache) {
                Ok(()) => batch.rows.push(row),
                Err(e) => row.fail(&format!("joining the batch: {e}")),
            },
            Err(e) => row.fail(&e.to_string()),
        }
    }

    /// One token for every row of `batch`; the rows that finished, failed or lost their client
    /// leave it.
    fn step(&self, batch: &mut Batch) {
        let gone: Vec<bool> = batch.rows.iter().map(|r| r.job.events.is_closed()).collect();
        self.metrics.cancelled.add(gone.iter().filter(|&&g| g).count());
        let mut keep: Vec<usize> = (0..batch.rows.len()).filter(|&i| !gone[i]).collect();
        if keep.len() < batch.rows.len() && !self.drop_rows(batch, &keep) {
            return;
        }
        if batch.rows.is_empty() {
            return;
        }
        self.metrics.batch_rows.observe(batch.rows.len() as f64);
        let model = &self.registry.model;
        self.assign(batch.rows.iter().map(|r| r.job.model));
        let tokens: Vec<u32> = batch.rows.iter().map(|r| r.next).collect();
        let (cache, rows, metrics) = (&mut batch.cache, &mut batch.rows, &self.metrics);
        let stepped = guarded(|| {
            let logits = decode_step(model, &tokens, cache)?.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
            keep.clear();
            for (i, (row, logits)) in rows.iter_mut().zip(&logits).enumerate() {
                let token = row.sampler.next_token(logits, &row.seen)?;
                if row.push(token, metrics)? {
                    keep.push(i);
                }
            }
            Ok(())
        });
        match stepped {
            Ok(()) => {
                if keep.len() < batch.rows.len() {
                    self.drop_rows(batch, &keep);
                }
            }
            Err(e) => {
                tracing::error!("decode step failed: {e}");
                batch.fail(&format!("decoding failed: {e}"));
            }
        }
    }

    /// Keep only the rows `keep` (ascending); false, with every kept row failed and the batch
    /// emptied, if the cache could not follow.
    fn drop_rows(&self, batch: &mut Batch, keep: &[usize]) -> bool {
        let mut kept = vec![false; batch.rows.len()];
        keep.iter().for_each(|&i| kept[i] = true);
        let mut i = 0;
        batch.rows.retain(|_| {
            i += 1;
            kept[i - 1]
        });
        if batch.rows.is_empty() {
            *batch = Batch::default();
            return true;
        }
        let idx: Vec<u32> = keep.iter().map(|&i| i as u32).collect();
        match batch.cache.select_rows(&idx) {
            Ok(()) => true,
            Err(e) => {
                batch.fail(&format!("dropping finished rows: {e}"));
                false
            }
        }
    }
}

/// `f`, with a panic inside it turned into an error: one bad request fails, the server goes on.
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => {
            let why = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
            Err(Error::msg(format!("internal error: {}", why.unwrap_or_else(|| "a panic".into()))))
        }
    }
}
