//! The content cache: embeddings of recent inputs, keyed by modality and a BLAKE3 hash of the input's content
//! (an image's encoded bytes after base64 decoding or URL fetching, a text's UTF-8 bytes), so that repeated inputs
//! (the same label set on every request, the same product photo) skip preprocessing and the model.
//!
//! - Stored: least-recently-used entries, bounded by `--cache-mb`; the unnormalized embedding and, for a text, its
//!   token count. Errors are never stored.
//! - In flight: the first input of a content to reach the cache *leads*: it is prepared and embedded as usual, and
//!   identical inputs that arrive meanwhile (in the same request or in others) are parked with it instead of being
//!   queued again. When the leader is answered, its result is stored and every parked input gets it; its error (a
//!   corrupt image, a failed batch) is theirs too, as it would be had they been in its batch. When the leader does
//!   not finish for reasons of its own (its caller went away, its deadline passed), the parked inputs are handed
//!   back to the CPU pool, where the first of them leads in its place.
//!
//! BLAKE3 is a cryptographic hash: nobody can make two different inputs share an entry, so one client cannot plant
//! an embedding for another client's content.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use lru::LruCache;

use crate::batching::Modality;
use crate::error::{Error, Reason};
use crate::prepare::Unit;
use crate::telemetry;

/// What identifies an input's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey {
    modality: Modality,
    hash: [u8; 32],
}

impl CacheKey {
    /// The key of an encoded image (the file's bytes).
    pub fn image(bytes: &[u8]) -> Self {
        CacheKey { modality: Modality::Image, hash: *blake3::hash(bytes).as_bytes() }
    }

    /// The key of a text.
    pub fn text(text: &str) -> Self {
        CacheKey { modality: Modality::Text, hash: *blake3::hash(text.as_bytes()).as_bytes() }
    }

    /// The modality of the input.
    pub fn modality(&self) -> Modality {
        self.modality
    }
}

/// An input waiting for an identical one to be embedded: its unit of work, kept whole so that it can be prepared
/// itself if the leader does not finish.
pub struct Parked {
    pub unit: Unit,
    pub deadline: Option<Instant>,
}

/// What [`ContentCache::claim`] found.
pub enum Claim {
    /// Stored: the embedding, the text's token count, and the input (to be answered with them).
    Hit(Vec<f32>, u32, Parked),
    /// Neither stored nor in flight: the input is prepared and embedded, and completes the entry through the lead.
    Lead(Lead, Parked),
    /// An identical input is being embedded: this one was parked with it.
    Parked,
}

/// A stored embedding.
struct Stored {
    vector: Box<[f32]>,
    tokens: u32,
}

struct State {
    stored: LruCache<CacheKey, Stored>,
    /// Keys being computed, with the inputs parked on them.
    in_flight: HashMap<CacheKey, Vec<Parked>>,
}

/// Hands parked inputs back to the CPU pool.
pub type Resubmit = Box<dyn Fn(Vec<Parked>) + Send + Sync>;

/// The cache shared by the CPU pool (lookups) and the model workers (results).
pub struct ContentCache {
    state: Mutex<State>,
    /// Most entries stored.
    capacity: usize,
    /// Approximate bytes one entry costs (vector, key, bookkeeping).
    entry_bytes: usize,
    resubmit: OnceLock<Resubmit>,
}

/// The bookkeeping bytes of one entry besides its vector: key and value in the list node, the node's two links,
/// the hash table's slot, and allocator rounding.
const ENTRY_OVERHEAD: usize = std::mem::size_of::<(CacheKey, Stored)>() + 64;

impl ContentCache {
    /// A cache of about `max_bytes` for embeddings of `dim` floats; `None` when that holds no entry (disabled).
    pub fn new(max_bytes: usize, dim: usize) -> Option<Arc<Self>> {
        let entry_bytes = dim * std::mem::size_of::<f32>() + ENTRY_OVERHEAD;
        let capacity = max_bytes / entry_bytes;
        if capacity == 0 {
            return None;
        }
        metrics::gauge!(telemetry::CACHE_BYTES).set(0.0);
        Some(Arc::new(ContentCache {
            // Grown as entries come (a large --cache-mb costs nothing up front); eviction is done here.
            state: Mutex::new(State { stored: LruCache::unbounded(), in_flight: HashMap::new() }),
            capacity,
            entry_bytes,
            resubmit: OnceLock::new(),
        }))
    }

    /// Most entries held.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Sets how parked inputs go back to the CPU pool (once, by the pool).
    pub fn set_resubmit(&self, resubmit: Resubmit) {
        let _ = self.resubmit.set(resubmit);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Looks `key` up for `waiter`: stored, being computed (then `waiter` is parked), or to be computed by it.
    /// `count` records a hit or a miss (false for an input handed back after its leader failed: it was counted).
    pub fn claim(self: &Arc<Self>, key: CacheKey, waiter: Parked, count: bool) -> Claim {
        let modality = key.modality.as_str();
        let claim = {
            let mut st = self.lock();
            if let Some(stored) = st.stored.get(&key) {
                Claim::Hit(stored.vector.to_vec(), stored.tokens, waiter)
            } else if let Some(parked) = st.in_flight.get_mut(&key) {
                parked.push(waiter);
                Claim::Parked
            } else {
                st.in_flight.insert(key, Vec::new());
                Claim::Lead(Lead { cache: self.clone(), key, done: false }, waiter)
            }
        };
        if count {
            let name = if matches!(claim, Claim::Lead(..)) { telemetry::CACHE_MISSES } else { telemetry::CACHE_HITS };
            metrics::counter!(name, "modality" => modality).increment(1);
        }
        claim
    }

    /// Ends the computation of `key`: stores a result, and returns the parked inputs.
    fn complete(&self, key: &CacheKey, result: Option<(&[f32], u32)>) -> Vec<Parked> {
        let mut st = self.lock();
        let parked = st.in_flight.remove(key).unwrap_or_default();
        if let Some((vector, tokens)) = result {
            st.stored.push(*key, Stored { vector: vector.into(), tokens });
            while st.stored.len() > self.capacity {
                st.stored.pop_lru();
            }
            metrics::gauge!(telemetry::CACHE_BYTES).set((st.stored.len() * self.entry_bytes) as f64);
        }
        parked
    }

    /// Entries stored now.
    pub fn len(&self) -> usize {
        self.lock().stored.len()
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The duty of the input that computes an entry: [`Lead::finish`] with its result, or, when dropped unfinished
/// (the input was dropped: its caller went away), the parked inputs go back to the CPU pool.
pub struct Lead {
    cache: Arc<ContentCache>,
    key: CacheKey,
    done: bool,
}

/// True for an error the parked inputs share: one that follows from the content (a corrupt image), the model or
/// the server's state, as it would had they been in the leader's batch; false for one that concerns the leader's
/// own call alone (its deadline passed, or its caller went away, which stops its preparation the same way).
fn shared_with_waiters(e: &Error) -> bool {
    e.reason() != Reason::DeadlineExceeded
}

impl Lead {
    /// Completes the entry with the leader's answer: the parked inputs get its result (which is stored) or its
    /// error; after an error of the leader's own call they go back to the CPU pool.
    pub fn finish(mut self, result: Result<(&[f32], u32), Error>) {
        self.done = true;
        match result {
            Ok((vector, tokens)) => {
                for p in self.cache.complete(&self.key, Some((vector, tokens))) {
                    let _ = p.unit.reply.send_cached(vector.to_vec(), tokens);
                }
            }
            Err(e) if shared_with_waiters(&e) => {
                for p in self.cache.complete(&self.key, None) {
                    let _ = p.unit.reply.send(Err(e.clone()));
                }
            }
            Err(_) => self.hand_back(),
        }
    }

    fn hand_back(&self) {
        let parked = self.cache.complete(&self.key, None);
        if parked.is_empty() {
            return;
        }
        match self.cache.resubmit.get() {
            Some(resubmit) => resubmit(parked),
            None => {
                for p in parked {
                    let _ = p.unit.reply.send(Err(Error::new(Reason::ShuttingDown, "server is shutting down")));
                }
            }
        }
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        if !self.done {
            self.hand_back();
        }
    }
}

/// Bytes of `mib` mebibytes (`--cache-mb`).
pub fn mib(mib: usize) -> usize {
    mib.saturating_mul(1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batching::{Admission, AdmissionControl, BudgetPermit, JobReceiver, Reply};
    use crate::prepare::UnitInput;

    fn waiter(text: &str) -> (Parked, JobReceiver) {
        let (reply, rx) = Reply::channel();
        let admission = AdmissionControl::new(16);
        let ticket = futures::executor::block_on(admission.admit(1, Admission::Reject)).unwrap().pop().unwrap();
        let unit = Unit {
            index: 0,
            input: UnitInput::Text(text.into()),
            reply,
            ticket,
            held: BudgetPermit::none(),
            key: None,
        };
        (Parked { unit, deadline: None }, rx)
    }

    fn lead_of(claim: Claim) -> (Lead, Parked) {
        match claim {
            Claim::Lead(lead, parked) => (lead, parked),
            _ => panic!("expected to lead"),
        }
    }

    #[test]
    fn the_first_leads_the_others_wait_and_the_result_is_stored() {
        let cache = ContentCache::new(1 << 20, 4).unwrap();
        let key = CacheKey::text("a cat");
        assert_ne!(key, CacheKey::text("a dog"));
        let (first, _rx) = waiter("a cat");
        let (lead, _) = lead_of(cache.claim(key, first, true));
        let (second, mut rx2) = waiter("a cat");
        assert!(matches!(cache.claim(key, second, true), Claim::Parked));
        lead.finish(Ok((&[1.0, 2.0, 3.0, 4.0], 3)));
        let got = rx2.try_recv().unwrap().unwrap();
        assert_eq!((got.vector, got.tokens, got.timing.cached), (vec![1.0, 2.0, 3.0, 4.0], 3, true));
        let (third, _rx3) = waiter("a cat");
        assert!(matches!(cache.claim(key, third, true), Claim::Hit(v, 3, _) if v == [1.0, 2.0, 3.0, 4.0]));
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn errors_are_not_stored_and_content_errors_are_shared() {
        let cache = ContentCache::new(1 << 20, 4).unwrap();
        let key = CacheKey::image(b"not an image");
        assert_ne!(key, CacheKey::text("not an image"), "the modality is part of the key");
        let (first, _rx) = waiter("x");
        let (lead, _) = lead_of(cache.claim(key, first, true));
        let (second, mut rx2) = waiter("x");
        assert!(matches!(cache.claim(key, second, true), Claim::Parked));
        lead.finish(Err(Error::new(Reason::InvalidImage, "corrupt")));
        assert_eq!(rx2.try_recv().unwrap().unwrap_err().reason(), Reason::InvalidImage);
        assert!(cache.is_empty());
        // The next one leads again.
        let (third, _rx3) = waiter("x");
        assert!(matches!(cache.claim(key, third, true), Claim::Lead(..)));
    }

    #[test]
    fn a_leader_that_does_not_finish_hands_its_waiters_back() {
        let cache = ContentCache::new(1 << 20, 4).unwrap();
        let handed = Arc::new(Mutex::new(Vec::new()));
        let sink = handed.clone();
        cache.set_resubmit(Box::new(move |parked: Vec<Parked>| sink.lock().unwrap().extend(parked)));
        let key = CacheKey::text("t");
        for leader_fails in [true, false] {
            let (first, _rx) = waiter("t");
            let (lead, _) = lead_of(cache.claim(key, first, true));
            let (second, _rx2) = waiter("t");
            assert!(matches!(cache.claim(key, second, true), Claim::Parked));
            if leader_fails {
                lead.finish(Err(Error::new(Reason::DeadlineExceeded, "late")));
            } else {
                drop(lead); // its caller went away
            }
            let back: Vec<Parked> = std::mem::take(&mut *handed.lock().unwrap());
            assert_eq!(back.len(), 1);
            assert!(matches!(&back[0].unit.input, UnitInput::Text(t) if t == "t"));
        }
    }

    #[test]
    fn least_recently_used_entries_go_first() {
        let dim = 4;
        let entry = dim * 4 + ENTRY_OVERHEAD;
        let cache = ContentCache::new(2 * entry, dim).unwrap();
        assert_eq!(cache.capacity(), 2);
        let store = |text: &str| {
            let (w, _rx) = waiter(text);
            let (lead, _) = lead_of(cache.claim(CacheKey::text(text), w, true));
            lead.finish(Ok((&[0.0; 4], 1)));
        };
        store("a");
        store("b");
        let (w, _rx) = waiter("a");
        assert!(matches!(cache.claim(CacheKey::text("a"), w, true), Claim::Hit(..))); // "a" is now the newest
        store("c");
        assert_eq!(cache.len(), 2);
        let (w, _rx) = waiter("b");
        assert!(matches!(cache.claim(CacheKey::text("b"), w, true), Claim::Lead(..)), "b was evicted");
        assert!(ContentCache::new(0, dim).is_none());
    }
}
