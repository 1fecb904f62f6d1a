//! Per-modality queues and batch formation.
//!
//! Items wait in an image queue and a text queue. A model worker that becomes free calls
//! [`Batcher::next_batch`], which takes whatever is queued in the modality whose oldest item has waited longest, up
//! to the maximum batch size for that modality. There is no timer by default: a free worker never waits while work
//! is queued (`max_batch_delay` can trade latency for fuller batches). Items whose caller has gone away or whose
//! deadline has passed are dropped here, before they reach the model.

pub mod admission;

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::error::{Error, Reason};
use crate::metrics as m;

pub use admission::{Admission, AdmissionControl, BudgetPermit, MemoryBudget, Ticket};

/// A preprocessed image: normalized CHW float32 pixels, `3 * size * size` values.
pub struct ImageInput {
    pub pixels: Vec<f32>,
}

/// A tokenized text: ids including the start and end tokens, not padded.
pub struct TextInput {
    pub ids: Vec<i64>,
}

/// Where a job's embedding (or its error) is delivered.
pub type Reply = oneshot::Sender<Result<Vec<f32>, Error>>;

/// One item of one modality, waiting for the model.
pub struct Job<T> {
    pub input: T,
    pub enqueued_at: Instant,
    pub deadline: Option<Instant>,
    pub reply: Reply,
    /// The input's share of admission, released when the job is answered or dropped.
    pub ticket: Option<Ticket>,
}

impl<T> Job<T> {
    /// A job entering its queue now.
    pub fn new(input: T, deadline: Option<Instant>, reply: Reply) -> Self {
        Job { input, enqueued_at: Instant::now(), deadline, reply, ticket: None }
    }

    /// The same job holding its admission ticket.
    pub fn with_ticket(mut self, ticket: Ticket) -> Self {
        self.ticket = Some(ticket);
        self
    }
}

/// Work for one forward pass.
pub enum Batch {
    Images(Vec<Job<ImageInput>>),
    Texts(Vec<Job<TextInput>>),
}

impl Batch {
    /// Number of items in the batch.
    pub fn len(&self) -> usize {
        match self {
            Batch::Images(j) => j.len(),
            Batch::Texts(j) => j.len(),
        }
    }

    /// True for a batch without items (never returned by [`Batcher::next_batch`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Which modality a queue holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Modality {
    Image,
    Text,
}

impl Modality {
    /// `image` or `text`, as used in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Modality::Image => "image",
            Modality::Text => "text",
        }
    }
}

/// Batch formation limits.
#[derive(Debug, Clone)]
pub struct BatcherConfig {
    pub max_batch_images: usize,
    pub max_batch_texts: usize,
    pub max_batch_delay: Duration,
}

/// Counts of items dropped before reaching the model, and batch sizes formed (for metrics and tests).
#[derive(Debug, Default, Clone)]
pub struct BatcherStats {
    pub dropped_cancelled: u64,
    pub dropped_deadline: u64,
    pub batches: u64,
    pub largest_batch: usize,
}

#[derive(Default)]
struct Queues {
    images: VecDeque<Job<ImageInput>>,
    texts: VecDeque<Job<TextInput>>,
    closed: bool,
    stats: BatcherStats,
}

/// The two queues, shared by the request handlers (producers) and the model workers (consumers).
pub struct Batcher {
    queues: Mutex<Queues>,
    work: Condvar,
    config: BatcherConfig,
}

/// What happened to a job taken from the front of a queue.
enum Fate {
    Run,
    Cancelled,
    Expired,
}

fn fate<T>(job: &Job<T>, now: Instant) -> Fate {
    if job.reply.is_closed() {
        Fate::Cancelled
    } else if job.deadline.is_some_and(|d| d <= now) {
        Fate::Expired
    } else {
        Fate::Run
    }
}

/// Pops up to `max` runnable jobs from the front of `queue`, answering or discarding stale ones on the way.
fn take<T>(queue: &mut VecDeque<Job<T>>, max: usize, stats: &mut BatcherStats, modality: Modality) -> Vec<Job<T>> {
    let now = Instant::now();
    let mut batch = Vec::with_capacity(max.min(queue.len()));
    let mut popped = 0usize;
    while batch.len() < max {
        let Some(job) = queue.pop_front() else { break };
        popped += 1;
        match fate(&job, now) {
            Fate::Run => {
                metrics::histogram!(m::QUEUE_DURATION, "modality" => modality.as_str())
                    .record(now.duration_since(job.enqueued_at).as_secs_f64());
                batch.push(job);
            }
            Fate::Cancelled => {
                stats.dropped_cancelled += 1;
                metrics::counter!(m::DROPPED_ITEMS, "reason" => "cancelled").increment(1);
            }
            Fate::Expired => {
                stats.dropped_deadline += 1;
                metrics::counter!(m::DROPPED_ITEMS, "reason" => "deadline").increment(1);
                let _ = job.reply.send(Err(Error::new(Reason::DeadlineExceeded, "deadline passed while queued")));
            }
        }
    }
    metrics::gauge!(m::QUEUE_DEPTH, "modality" => modality.as_str()).decrement(popped as f64);
    batch
}

impl Batcher {
    /// Empty queues with the given limits.
    pub fn new(config: BatcherConfig) -> Self {
        assert!(config.max_batch_images > 0 && config.max_batch_texts > 0, "batch sizes must be positive");
        Batcher { queues: Mutex::new(Queues::default()), work: Condvar::new(), config }
    }

    fn lock(&self) -> MutexGuard<'_, Queues> {
        // A panic while holding this lock cannot leave the queues inconsistent (every mutation is a single
        // VecDeque call), so a poisoned lock is still usable.
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an image; after [`Batcher::close`] the job is answered UNAVAILABLE instead.
    pub fn push_image(&self, job: Job<ImageInput>) {
        self.push_images(vec![job]);
    }

    /// Queues a text; after [`Batcher::close`] the job is answered UNAVAILABLE instead.
    pub fn push_text(&self, job: Job<TextInput>) {
        self.push_texts(vec![job]);
    }

    /// Queues images together, so that a free worker finds all of them.
    pub fn push_images(&self, jobs: Vec<Job<ImageInput>>) {
        self.push(jobs, Modality::Image, |q| &mut q.images);
    }

    /// Queues texts together, so that a free worker finds all of them.
    pub fn push_texts(&self, jobs: Vec<Job<TextInput>>) {
        self.push(jobs, Modality::Text, |q| &mut q.texts);
    }

    fn push<T>(&self, jobs: Vec<Job<T>>, modality: Modality, queue: fn(&mut Queues) -> &mut VecDeque<Job<T>>) {
        let mut q = self.lock();
        if q.closed {
            drop(q);
            for job in jobs {
                let _ = job.reply.send(Err(Error::new(Reason::ShuttingDown, "server is shutting down")));
            }
            return;
        }
        let n = jobs.len();
        let now = Instant::now();
        queue(&mut q).extend(jobs.into_iter().map(|mut j| {
            j.enqueued_at = now;
            j
        }));
        drop(q);
        metrics::gauge!(m::QUEUE_DEPTH, "modality" => modality.as_str()).increment(n as f64);
        if n == 1 {
            self.work.notify_one();
        } else {
            self.work.notify_all();
        }
    }

    /// A copy of the counters.
    pub fn stats(&self) -> BatcherStats {
        self.lock().stats.clone()
    }

    /// Stops accepting work. Workers drain what is queued, then [`Batcher::next_batch`] returns `None`.
    pub fn close(&self) {
        self.lock().closed = true;
        self.work.notify_all();
    }

    /// Blocks until there is work, and returns the next batch; `None` once closed and drained.
    pub fn next_batch(&self) -> Option<Batch> {
        let mut q = self.lock();
        loop {
            let image_head = q.images.front().map(|j| j.enqueued_at);
            let text_head = q.texts.front().map(|j| j.enqueued_at);
            let modality = match (image_head, text_head) {
                (None, None) if q.closed => return None,
                (None, None) => {
                    q = self.work.wait(q).unwrap_or_else(|p| p.into_inner());
                    continue;
                }
                (Some(_), None) => Modality::Image,
                (None, Some(_)) => Modality::Text,
                (Some(i), Some(t)) => {
                    if i <= t {
                        Modality::Image
                    } else {
                        Modality::Text
                    }
                }
            };
            let (queued, max, head) = match modality {
                Modality::Image => (q.images.len(), self.config.max_batch_images, image_head),
                Modality::Text => (q.texts.len(), self.config.max_batch_texts, text_head),
            };
            // Optionally let a partial batch fill up, but never past the oldest item's allowance.
            if !q.closed && queued < max && !self.config.max_batch_delay.is_zero() {
                let waited = head.map(|h| h.elapsed()).unwrap_or_default();
                if waited < self.config.max_batch_delay {
                    let (guard, _) = self
                        .work
                        .wait_timeout(q, self.config.max_batch_delay - waited)
                        .unwrap_or_else(|p| p.into_inner());
                    q = guard;
                    continue;
                }
            }
            let Queues { images, texts, stats, .. } = &mut *q;
            let batch = match modality {
                Modality::Image => Batch::Images(take(images, max, stats, modality)),
                Modality::Text => Batch::Texts(take(texts, max, stats, modality)),
            };
            if batch.is_empty() {
                continue; // everything taken was stale; look again
            }
            metrics::histogram!(m::BATCH_SIZE, "modality" => modality.as_str()).record(batch.len() as f64);
            stats.batches += 1;
            stats.largest_batch = stats.largest_batch.max(batch.len());
            return Some(batch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;
    use std::sync::Arc;

    fn cfg(images: usize, texts: usize) -> BatcherConfig {
        BatcherConfig { max_batch_images: images, max_batch_texts: texts, max_batch_delay: Duration::ZERO }
    }

    fn text_job(id: i64) -> (Job<TextInput>, oneshot::Receiver<Result<Vec<f32>, Error>>) {
        let (tx, rx) = oneshot::channel();
        (Job::new(TextInput { ids: vec![id] }, None, tx), rx)
    }

    fn image_job() -> (Job<ImageInput>, oneshot::Receiver<Result<Vec<f32>, Error>>) {
        let (tx, rx) = oneshot::channel();
        (Job::new(ImageInput { pixels: vec![0.0] }, None, tx), rx)
    }

    #[test]
    fn takes_everything_queued_up_to_the_limit_in_order() {
        let b = Batcher::new(cfg(4, 3));
        let mut rxs = Vec::new();
        for i in 0..5 {
            let (j, rx) = text_job(i);
            b.push_text(j);
            rxs.push(rx);
        }
        let Some(Batch::Texts(first)) = b.next_batch() else { panic!("expected texts") };
        assert_eq!(first.iter().map(|j| j.input.ids[0]).collect::<Vec<_>>(), vec![0, 1, 2]);
        let Some(Batch::Texts(second)) = b.next_batch() else { panic!("expected texts") };
        assert_eq!(second.iter().map(|j| j.input.ids[0]).collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!(b.stats().batches, 2);
        assert_eq!(b.stats().largest_batch, 3);
    }

    #[test]
    fn oldest_modality_goes_first() {
        let b = Batcher::new(cfg(8, 8));
        let (t, _rt) = text_job(1);
        b.push_text(t);
        std::thread::sleep(Duration::from_millis(2));
        let (i, _ri) = image_job();
        b.push_image(i);
        assert!(matches!(b.next_batch(), Some(Batch::Texts(_))));
        assert!(matches!(b.next_batch(), Some(Batch::Images(_))));
    }

    #[test]
    fn cancelled_and_expired_items_never_reach_the_model() {
        let b = Batcher::new(cfg(8, 8));
        let (gone, rx_gone) = text_job(1);
        drop(rx_gone); // the caller went away
        b.push_text(gone);
        let (tx, mut rx_expired) = oneshot::channel();
        b.push_text(Job::new(TextInput { ids: vec![2] }, Some(Instant::now() - Duration::from_millis(1)), tx));
        let (live, _rx_live) = text_job(3);
        b.push_text(live);
        let Some(Batch::Texts(batch)) = b.next_batch() else { panic!("expected texts") };
        assert_eq!(batch.iter().map(|j| j.input.ids[0]).collect::<Vec<_>>(), vec![3]);
        assert!(matches!(rx_expired.try_recv(), Ok(Err(e)) if e.kind() == Kind::DeadlineExceeded));
        let stats = b.stats();
        assert_eq!((stats.dropped_cancelled, stats.dropped_deadline), (1, 1));
    }

    #[test]
    fn close_drains_then_ends_and_refuses_new_work() {
        let b = Arc::new(Batcher::new(cfg(8, 8)));
        let (j, _rx) = image_job();
        b.push_image(j);
        b.close();
        assert!(matches!(b.next_batch(), Some(Batch::Images(_))));
        assert!(b.next_batch().is_none());
        let (late, mut rx) = image_job();
        b.push_image(late);
        assert!(matches!(rx.try_recv(), Ok(Err(e)) if e.kind() == Kind::Unavailable));
    }

    #[test]
    fn a_waiting_worker_wakes_for_new_work() {
        let b = Arc::new(Batcher::new(cfg(8, 8)));
        let worker = {
            let b = b.clone();
            std::thread::spawn(move || b.next_batch().map(|batch| batch.len()))
        };
        std::thread::sleep(Duration::from_millis(20));
        let (j, _rx) = text_job(7);
        b.push_text(j);
        assert_eq!(worker.join().unwrap(), Some(1));
    }

    #[test]
    fn batch_delay_lets_a_batch_fill() {
        let b = Arc::new(Batcher::new(BatcherConfig {
            max_batch_images: 4,
            max_batch_texts: 4,
            max_batch_delay: Duration::from_millis(200),
        }));
        let (j, _r1) = text_job(1);
        b.push_text(j);
        let producer = {
            let b = b.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                let mut rxs = Vec::new();
                for i in 2..5 {
                    let (j, rx) = text_job(i);
                    b.push_text(j);
                    rxs.push(rx);
                }
                rxs
            })
        };
        let batch = b.next_batch().unwrap();
        let _rxs = producer.join().unwrap();
        assert_eq!(batch.len(), 4, "a full batch is taken as soon as it is full");
    }
}
