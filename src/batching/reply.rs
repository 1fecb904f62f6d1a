//! Where an input's answer goes: the caller's channel, the time the input spent in each stage, and, with the
//! content cache, the identical inputs waiting for the same result.

use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::cache::Lead;
use crate::error::Error;

/// Time an item spent in each stage. `queue + preprocess + inference` is its time from admission to answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ItemTiming {
    /// Waiting: for a CPU thread, for the rest of its group, for a model worker, or for an identical input.
    pub queue: Duration,
    /// Fetching, base64 decoding, hashing, decoding and preprocessing, or tokenizing.
    pub preprocess: Duration,
    /// The forward pass of its batch; zero when the embedding came from the cache.
    pub inference: Duration,
    /// True when the embedding came from the content cache or from an identical input in flight.
    pub cached: bool,
}

impl ItemTiming {
    /// Admission to answer.
    pub fn total(&self) -> Duration {
        self.queue + self.preprocess + self.inference
    }
}

/// One input's embedding, as the model (or the cache) gave it.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedded {
    /// The unnormalized embedding.
    pub vector: Vec<f32>,
    /// Tokens the model read for a text (start and end tokens included); 0 for an image.
    pub tokens: u32,
    pub timing: ItemTiming,
}

/// The receiving end of a [`Reply`].
pub type JobReceiver = oneshot::Receiver<Result<Embedded, Error>>;

/// Where one input's embedding (or its error) is delivered. It keeps the input's timings: created at admission,
/// it is told the time spent preparing ([`Reply::add_preprocess`]) and when a model worker took the input
/// ([`Reply::taken`]); what is left of its time when it is answered was spent waiting.
pub struct Reply {
    tx: oneshot::Sender<Result<Embedded, Error>>,
    created: Instant,
    preprocess: Duration,
    taken: Option<Instant>,
    tokens: u32,
    /// Set while this input computes an embedding that identical inputs wait for (see [`crate::cache`]).
    lead: Option<Lead>,
}

impl Reply {
    /// A reply and the receiver its answer arrives on; its clock starts now.
    pub fn channel() -> (Reply, JobReceiver) {
        let (tx, rx) = oneshot::channel();
        let reply =
            Reply { tx, created: Instant::now(), preprocess: Duration::ZERO, taken: None, tokens: 0, lead: None };
        (reply, rx)
    }

    /// True once the caller has stopped waiting.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Adds time spent fetching or preparing the input.
    pub fn add_preprocess(&mut self, spent: Duration) {
        self.preprocess += spent;
    }

    /// The number of tokens of a tokenized text.
    pub fn set_tokens(&mut self, tokens: usize) {
        self.tokens = u32::try_from(tokens).unwrap_or(u32::MAX);
    }

    /// Marks the moment a model worker took the input into a batch.
    pub fn taken(&mut self, at: Instant) {
        self.taken = Some(at);
    }

    /// Makes this input the one whose result identical inputs wait for.
    pub fn lead(&mut self, lead: Lead) {
        self.lead = Some(lead);
    }

    /// Answers with the model's result (or an error). The inputs waiting for the same content get the same answer
    /// (and a successful one is cached). Returns the answer when the caller has gone.
    pub fn send(mut self, result: Result<Vec<f32>, Error>) -> Result<(), Result<Embedded, Error>> {
        let now = Instant::now();
        let inference = self.taken.map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        let timing = self.timing(now, inference, false);
        if let Some(lead) = self.lead.take() {
            lead.finish(result.as_ref().map(|v| (v.as_slice(), self.tokens)).map_err(Error::clone));
        }
        let tokens = self.tokens;
        self.tx.send(result.map(|vector| Embedded { vector, tokens, timing }))
    }

    /// Answers with an embedding that came from the cache or from an identical input: no inference time.
    pub fn send_cached(self, vector: Vec<f32>, tokens: u32) -> Result<(), Result<Embedded, Error>> {
        debug_assert!(self.lead.is_none(), "an input served from the cache leads nothing");
        let timing = self.timing(Instant::now(), Duration::ZERO, true);
        self.tx.send(Ok(Embedded { vector, tokens, timing }))
    }

    fn timing(&self, now: Instant, inference: Duration, cached: bool) -> ItemTiming {
        let total = now.saturating_duration_since(self.created);
        // Clocks read on different threads: keep the parts within the total.
        let inference = inference.min(total);
        let preprocess = self.preprocess.min(total - inference);
        ItemTiming { queue: total - inference - preprocess, preprocess, inference, cached }
    }
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply").field("closed", &self.is_closed()).field("leads", &self.lead.is_some()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Reason;

    #[test]
    fn the_parts_of_an_items_time_add_up() {
        let (mut reply, mut rx) = Reply::channel();
        std::thread::sleep(Duration::from_millis(5));
        reply.add_preprocess(Duration::from_millis(2));
        reply.set_tokens(7);
        std::thread::sleep(Duration::from_millis(5));
        reply.taken(Instant::now());
        std::thread::sleep(Duration::from_millis(5));
        reply.send(Ok(vec![1.0, 2.0])).unwrap();
        let got = rx.try_recv().unwrap().unwrap();
        assert_eq!((got.vector, got.tokens), (vec![1.0, 2.0], 7));
        let t = got.timing;
        assert_eq!(t.preprocess, Duration::from_millis(2));
        assert!(t.inference >= Duration::from_millis(5) && t.queue >= Duration::from_millis(8), "{t:?}");
        assert!(!t.cached);

        let (reply, mut rx) = Reply::channel();
        reply.send_cached(vec![3.0], 2).unwrap();
        let got = rx.try_recv().unwrap().unwrap();
        assert!(got.timing.cached && got.timing.inference.is_zero());

        let (reply, mut rx) = Reply::channel();
        reply.send(Err(Error::new(Reason::InvalidImage, "x"))).unwrap();
        assert!(rx.try_recv().unwrap().is_err());
    }
}
