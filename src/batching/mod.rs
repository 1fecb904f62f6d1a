//! Per-modality queues and batch formation.
//!
//! Items wait in an image queue and a text queue. A model worker that becomes free calls
//! [`Batcher::next_batch`], which takes whatever is queued in the modality whose oldest item has waited longest, up
//! to the maximum batch size for that modality. There is no timer by default: a free worker never waits while work
//! is queued (`max_batch_delay` can trade latency for fuller batches). Items whose caller has gone away or whose
//! deadline has passed are dropped here, before they reach the model.
//!
//! With a batch delay, a worker that holds a partial batch open *claims* its modality: the other workers leave
//! that queue to it and serve the other one, so one worker waiting for images to pile up never keeps a text
//! waiting while another worker is idle. Every change that may let a worker proceed (new work, a claim released,
//! closing) wakes all waiting workers, each of which looks again at what it may take.

pub mod admission;
pub mod reply;

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{Error, Reason};
use crate::telemetry;

pub use admission::{Admission, AdmissionControl, BudgetPermit, MemoryBudget, Ticket};
pub use reply::{Embedded, ItemTiming, JobReceiver, Reply};

/// A preprocessed image: normalized CHW float32 pixels, `3 * size * size` values.
pub struct ImageInput {
    pub pixels: Vec<f32>,
}

/// A tokenized text: ids including the start and end tokens, not padded.
pub struct TextInput {
    pub ids: Vec<i64>,
}

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Modality {
    Image,
    Text,
}

impl Modality {
    const ALL: [Modality; 2] = [Modality::Image, Modality::Text];

    fn index(self) -> usize {
        self as usize
    }

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
    /// Modalities a worker is holding open for a fuller batch (image, text); only that worker takes from them.
    claimed: [bool; 2],
}

impl Queues {
    /// When the oldest queued item of `modality` was queued, and how many are queued.
    fn head(&self, modality: Modality) -> Option<(Instant, usize)> {
        match modality {
            Modality::Image => self.images.front().map(|j| (j.enqueued_at, self.images.len())),
            Modality::Text => self.texts.front().map(|j| (j.enqueued_at, self.texts.len())),
        }
    }
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
    // An expired item counts as such even when its caller has stopped waiting already: the deadline is why
    // the caller went (a gRPC handler answers DEADLINE_EXCEEDED at the deadline and drops its receivers).
    if job.deadline.is_some_and(|d| d <= now) {
        Fate::Expired
    } else if job.reply.is_closed() {
        Fate::Cancelled
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
        let Some(mut job) = queue.pop_front() else { break };
        popped += 1;
        match fate(&job, now) {
            Fate::Run => {
                metrics::histogram!(telemetry::QUEUE_DURATION, "modality" => modality.as_str())
                    .record(now.duration_since(job.enqueued_at).as_secs_f64());
                job.reply.taken(now);
                batch.push(job);
            }
            Fate::Cancelled => {
                stats.dropped_cancelled += 1;
                metrics::counter!(telemetry::DROPPED_ITEMS, "reason" => "cancelled").increment(1);
            }
            Fate::Expired => {
                stats.dropped_deadline += 1;
                metrics::counter!(telemetry::DROPPED_ITEMS, "reason" => "deadline").increment(1);
                let _ = job.reply.send(Err(Error::new(Reason::DeadlineExceeded, "deadline passed while queued")));
            }
        }
    }
    metrics::gauge!(telemetry::QUEUE_DEPTH, "modality" => modality.as_str()).decrement(popped as f64);
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
        metrics::gauge!(telemetry::QUEUE_DEPTH, "modality" => modality.as_str()).increment(n as f64);
        // Not notify_one: the worker woken could be one holding the other modality open, which would go back to
        // waiting while an idle worker sleeps on.
        self.work.notify_all();
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
        // The modality this worker holds open for a fuller batch, if any.
        let mut mine: Option<Modality> = None;
        loop {
            let now = Instant::now();
            // What this worker may take: queued work that no other worker is holding open.
            let open = |q: &Queues, m: Modality| {
                q.head(m).filter(|_| !q.claimed[m.index()] || mine == Some(m)).map(|(at, len)| (m, at, len))
            };
            let candidates: Vec<(Modality, Instant, usize)> =
                Modality::ALL.iter().filter_map(|&m| open(&q, m)).collect();
            if candidates.is_empty() {
                if let Some(m) = mine.take() {
                    self.release(&mut q, m);
                }
                if q.closed && q.images.is_empty() && q.texts.is_empty() {
                    return None;
                }
                q = self.work.wait(q).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            // A batch is ready when it is full, when its oldest item has waited the whole delay, or when there
            // is no waiting (no delay, or closing).
            let closed = q.closed;
            let remaining = |m: Modality, at: Instant, len: usize| -> Duration {
                if closed || len >= self.max(m) {
                    Duration::ZERO
                } else {
                    self.config.max_batch_delay.saturating_sub(now.duration_since(at))
                }
            };
            let ready = candidates.iter().filter(|&&(m, at, len)| remaining(m, at, len).is_zero()).min_by_key(|c| c.1);
            let Some(&(modality, _, _)) = ready else {
                // Nothing is ready: hold the oldest modality open, and wake when the first one becomes ready.
                let &(oldest, _, _) = candidates.iter().min_by_key(|c| c.1).expect("candidates is not empty");
                if mine != Some(oldest) {
                    if let Some(m) = mine.take() {
                        self.release(&mut q, m);
                    }
                    q.claimed[oldest.index()] = true;
                    mine = Some(oldest);
                }
                let wait = candidates.iter().map(|&(m, at, len)| remaining(m, at, len)).min().unwrap_or_default();
                q = self.work.wait_timeout(q, wait).unwrap_or_else(|p| p.into_inner()).0;
                continue;
            };
            if let Some(m) = mine.take() {
                self.release(&mut q, m);
            }
            let max = self.max(modality);
            let Queues { images, texts, stats, .. } = &mut *q;
            let batch = match modality {
                Modality::Image => Batch::Images(take(images, max, stats, modality)),
                Modality::Text => Batch::Texts(take(texts, max, stats, modality)),
            };
            if batch.is_empty() {
                continue; // everything taken was stale; look again
            }
            metrics::histogram!(telemetry::BATCH_SIZE, "modality" => modality.as_str()).record(batch.len() as f64);
            stats.batches += 1;
            stats.largest_batch = stats.largest_batch.max(batch.len());
            return Some(batch);
        }
    }

    fn max(&self, modality: Modality) -> usize {
        match modality {
            Modality::Image => self.config.max_batch_images,
            Modality::Text => self.config.max_batch_texts,
        }
    }

    /// Gives up a claim: the other workers may take from that queue again.
    fn release(&self, q: &mut Queues, modality: Modality) {
        q.claimed[modality.index()] = false;
        self.work.notify_all();
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

    fn text_job(id: i64) -> (Job<TextInput>, JobReceiver) {
        let (tx, rx) = Reply::channel();
        (Job::new(TextInput { ids: vec![id] }, None, tx), rx)
    }

    fn image_job() -> (Job<ImageInput>, JobReceiver) {
        let (tx, rx) = Reply::channel();
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
        let (tx, mut rx_expired) = Reply::channel();
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

    fn delayed(delay_ms: u64) -> Arc<Batcher> {
        Arc::new(Batcher::new(BatcherConfig {
            max_batch_images: 4,
            max_batch_texts: 4,
            max_batch_delay: Duration::from_millis(delay_ms),
        }))
    }

    /// Starts `n` workers that take batches until the batcher is closed, each batch's "forward pass" taking
    /// `forward`, and report each batch's modality, size and when it was taken.
    fn workers_with_forward(
        b: &Arc<Batcher>,
        n: usize,
        forward: Duration,
    ) -> std::sync::mpsc::Receiver<(Modality, usize, Instant)> {
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..n {
            let (b, tx) = (b.clone(), tx.clone());
            std::thread::spawn(move || {
                while let Some(batch) = b.next_batch() {
                    let modality = if matches!(batch, Batch::Images(_)) { Modality::Image } else { Modality::Text };
                    let _ = tx.send((modality, batch.len(), Instant::now()));
                    std::thread::sleep(forward);
                }
            });
        }
        rx
    }

    fn workers(b: &Arc<Batcher>, n: usize) -> std::sync::mpsc::Receiver<(Modality, usize, Instant)> {
        workers_with_forward(b, n, Duration::ZERO)
    }

    #[test]
    fn a_partial_batch_waits_its_own_delay_not_the_other_modalitys_forward_pass() {
        let b = delayed(300);
        // Both workers are idle when the work comes; a forward pass takes a second.
        let taken = workers_with_forward(&b, 2, Duration::from_millis(1000));
        std::thread::sleep(Duration::from_millis(50));
        let (i, _ri) = image_job();
        b.push_image(i);
        std::thread::sleep(Duration::from_millis(50));
        let (t, _rt) = text_job(1);
        let pushed = Instant::now();
        b.push_text(t);
        let mut text_taken = None;
        for _ in 0..2 {
            let (modality, _, at) = taken.recv_timeout(Duration::from_secs(5)).unwrap();
            if modality == Modality::Text {
                text_taken = Some(at - pushed);
            }
        }
        let waited = text_taken.expect("the text was taken");
        assert!(waited < Duration::from_millis(800), "the text waited {waited:?}: behind the image's forward pass");
        b.close();
    }

    #[test]
    fn a_second_worker_serves_texts_while_the_first_holds_images_open() {
        let b = delayed(500);
        let taken = workers(&b, 2);
        let (i, _ri) = image_job();
        b.push_image(i);
        std::thread::sleep(Duration::from_millis(50)); // one worker now holds the partial image batch open
        let mut rts = Vec::new();
        for k in 0..4 {
            let (t, rt) = text_job(k);
            b.push_text(t); // one at a time: each push wakes the workers
            rts.push(rt);
        }
        let pushed = Instant::now();
        let (first, n, at) = taken.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!((first, n), (Modality::Text, 4), "the full text batch waited for the image batch");
        assert!(at - pushed < Duration::from_millis(250), "the texts were taken after {:?}", at - pushed);
        let (second, n, at) = taken.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!((second, n), (Modality::Image, 1));
        assert!(at - pushed >= Duration::from_millis(350), "the image batch was not held for the delay");
        b.close();
    }

    #[test]
    fn a_held_batch_is_taken_whole_as_soon_as_it_is_full() {
        let b = delayed(2000);
        let taken = workers(&b, 3);
        let mut rxs = Vec::new();
        for _ in 0..4 {
            let (i, rx) = image_job();
            b.push_image(i);
            rxs.push(rx);
            std::thread::sleep(Duration::from_millis(20));
        }
        let (modality, n, _) = taken.recv_timeout(Duration::from_millis(1000)).expect("the full batch waited");
        assert_eq!((modality, n), (Modality::Image, 4), "the batch held open was split between workers");
        b.close();
    }

    #[test]
    fn a_full_batch_goes_before_one_still_filling() {
        let b = delayed(2000);
        let (i, _ri) = image_job();
        b.push_image(i);
        let _rts: Vec<_> = (0..4)
            .map(|k| {
                let (t, rx) = text_job(k);
                b.push_text(t);
                rx
            })
            .collect();
        let start = Instant::now();
        assert!(matches!(b.next_batch(), Some(Batch::Texts(t)) if t.len() == 4));
        assert!(start.elapsed() < Duration::from_millis(500), "waited {:?} for the image to fill", start.elapsed());
    }

    #[test]
    fn the_delay_is_counted_from_the_oldest_item_and_closing_ends_it() {
        let b = delayed(150);
        let (t, _rt) = text_job(1);
        b.push_text(t);
        let start = Instant::now();
        assert!(matches!(b.next_batch(), Some(Batch::Texts(t)) if t.len() == 1));
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(140) && waited < Duration::from_secs(2), "waited {waited:?}");

        let b = delayed(60_000);
        let taken = workers(&b, 2);
        let (i, _ri) = image_job();
        b.push_image(i);
        std::thread::sleep(Duration::from_millis(50));
        b.close();
        let (modality, n, _) = taken.recv_timeout(Duration::from_secs(2)).expect("closing did not end the wait");
        assert_eq!((modality, n), (Modality::Image, 1));
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
