//! CPU preparation of request inputs (decode + preprocess images, tokenize texts) on a fixed pool of threads.
//!
//! Fairness: the pool serves requests round-robin, one input at a time, so a one-item call made while a
//! 1024-item request is being prepared waits for about one input per busy thread, not for the whole request.
//! Each request's prepared inputs are still queued for the model in groups, so they share forward passes
//! instead of trickling into the queue one by one.
//!
//! Every input is checked before and during its work: one whose caller has gone or whose deadline has passed is
//! dropped (its admission ticket with it). A panic while preparing an input fails that input with INTERNAL, is
//! counted (`clipserve_panics_total{stage}`) and logged once; the thread goes on.

use std::cell::Cell;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::batching::{Batcher, BudgetPermit, ImageInput, Job, Reply, TextInput, Ticket};
use crate::cache::{CacheKey, Claim, ContentCache, Parked};
use crate::error::{Error, Reason};
use crate::inputs::image::{decode_base64, ImagePreprocessor, PreprocessMode};
use crate::inputs::text::ClipTokenizer;
use crate::inputs::ImageSource;
use crate::telemetry;

/// Most images of one request prepared before they are queued together.
const IMAGE_GROUP: usize = 32;
/// Most texts of one request prepared before they are queued together.
const TEXT_GROUP: usize = 256;

/// What a unit of work turns into a model input.
pub enum UnitInput {
    Image(ImageSource),
    Text(String),
}

/// One input of one request: its index in the request (for logs), the input, where its answer goes, and its
/// admission ticket.
pub struct Unit {
    pub index: usize,
    pub input: UnitInput,
    pub reply: Reply,
    pub ticket: Ticket,
    /// Bytes of this input held against the memory budget (a fetched body) until it is prepared.
    pub held: BudgetPermit,
    /// Its content cache key, once known (an input handed back by the cache after its leader failed).
    pub key: Option<CacheKey>,
}

/// What preparing needs.
pub struct PrepareContext {
    pub images: ImagePreprocessor,
    pub image_mode: PreprocessMode,
    pub tokenizer: ClipTokenizer,
    pub batcher: Arc<Batcher>,
    /// Testing only: tokenizing exactly this text panics.
    pub inject_panic_on_text: Option<String>,
    /// The content cache, when enabled: inputs found there skip preparation and the model.
    pub cache: Option<Arc<ContentCache>>,
}

/// The inputs of one request, as the pool sees them.
pub struct RequestWork {
    state: Mutex<WorkState>,
    deadline: Option<Instant>,
    /// Bytes of the request's data held against the memory budget; released when the last input is done.
    _budget: BudgetPermit,
}

struct WorkState {
    queued: VecDeque<Unit>,
    /// Inputs not finished yet, including those announced with [`RequestWork::expect`] and not yet added.
    pending: usize,
    in_ring: bool,
    images: Vec<Job<ImageInput>>,
    texts: Vec<Job<TextInput>>,
}

impl RequestWork {
    /// A request whose inputs share `deadline`, holding `budget` until its last input is done.
    pub fn new(deadline: Option<Instant>, budget: BudgetPermit) -> Arc<Self> {
        Arc::new(RequestWork {
            state: Mutex::new(WorkState {
                queued: VecDeque::new(),
                pending: 0,
                in_ring: false,
                images: Vec::new(),
                texts: Vec::new(),
            }),
            deadline,
            _budget: budget,
        })
    }

    fn lock(&self) -> MutexGuard<'_, WorkState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Announces `n` inputs that will be added later (images still being fetched), so that the request's last
    /// group is not queued before they arrive.
    pub fn expect(&self, n: usize) {
        self.lock().pending += n;
    }

    /// An announced input that will not come (its fetch failed and it was answered already).
    pub fn forget(&self, pool: &Preparer) {
        let flush = {
            let mut st = self.lock();
            st.pending -= 1;
            take_groups(&mut st)
        };
        flush.queue(&pool.context.batcher);
    }
}

/// Jobs ready to be queued for the model.
#[derive(Default)]
struct Flush {
    images: Vec<Job<ImageInput>>,
    texts: Vec<Job<TextInput>>,
}

impl Flush {
    fn queue(self, batcher: &Batcher) {
        if !self.images.is_empty() {
            batcher.push_images(self.images);
        }
        if !self.texts.is_empty() {
            batcher.push_texts(self.texts);
        }
    }
}

/// The groups to queue now: full ones, or everything once nothing of the request is pending.
fn take_groups(st: &mut WorkState) -> Flush {
    // `pending` counts queued, running and announced inputs: at 0 nothing more of this request will come.
    let last = st.pending == 0;
    let mut f = Flush::default();
    if st.images.len() >= IMAGE_GROUP || (last && !st.images.is_empty()) {
        f.images = std::mem::take(&mut st.images);
    }
    if st.texts.len() >= TEXT_GROUP || (last && !st.texts.is_empty()) {
        f.texts = std::mem::take(&mut st.texts);
    }
    f
}

struct Ring {
    requests: VecDeque<Arc<RequestWork>>,
    closed: bool,
}

struct Shared {
    ring: Mutex<Ring>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, request: Arc<RequestWork>) {
        self.lock().requests.push_back(request);
        self.wake.notify_one();
    }
}

/// The preparation threads.
pub struct Preparer {
    shared: Arc<Shared>,
    context: Arc<PrepareContext>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

thread_local! {
    /// True while this thread runs work whose panics are caught and logged here (the panic hook stays quiet).
    static GUARDED: Cell<bool> = const { Cell::new(false) };
}

/// True while the current thread runs guarded work: a panic there is reported by whoever catches it.
pub fn in_guarded_work() -> bool {
    GUARDED.with(Cell::get)
}

/// Runs `f`, turning a panic into INTERNAL_PANIC; counts it under `stage` and logs it once with `what`.
pub fn guard<T>(
    stage: &'static str,
    what: impl std::fmt::Display,
    f: impl FnOnce() -> Result<T, Error>,
) -> Result<T, Error> {
    let was = GUARDED.with(|g| g.replace(true));
    let result = catch_unwind(AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(was));
    result.unwrap_or_else(|panic| Err(panicked(stage, what, panic.as_ref())))
}

/// Counts and logs a caught panic, and the error to answer with.
pub fn panicked(stage: &'static str, what: impl std::fmt::Display, panic: &(dyn std::any::Any + Send)) -> Error {
    let text = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into());
    metrics::counter!(telemetry::PANICS, "stage" => stage).increment(1);
    tracing::error!(stage, "panic while handling {what}: {text}");
    Error::new(Reason::InternalPanic, format!("internal error while handling {what} (logged)"))
}

impl Preparer {
    /// Starts `threads` threads (0: one per core).
    pub fn start(threads: usize, context: PrepareContext) -> anyhow::Result<Self> {
        let n = if threads == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) } else { threads };
        let shared = Arc::new(Shared {
            ring: Mutex::new(Ring { requests: VecDeque::new(), closed: false }),
            wake: Condvar::new(),
        });
        if let Some(cache) = &context.cache {
            let pool = Arc::downgrade(&shared);
            cache.set_resubmit(Box::new(move |parked| resubmit(&pool, parked)));
        }
        let context = Arc::new(context);
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            let (shared, context) = (shared.clone(), context.clone());
            handles.push(
                std::thread::Builder::new().name(format!("preprocess-{i}")).spawn(move || work(&shared, &context))?,
            );
        }
        Ok(Preparer { shared, context, threads: Mutex::new(handles) })
    }

    /// Adds inputs of `request` to the pool.
    pub fn add(&self, request: &Arc<RequestWork>, units: impl IntoIterator<Item = Unit>) {
        self.insert(request, units, 0);
    }

    /// Adds one announced input (see [`RequestWork::expect`]).
    pub fn add_expected(&self, request: &Arc<RequestWork>, unit: Unit) {
        self.insert(request, [unit], 1);
    }

    /// Queues `units`, of which `announced` were counted in `pending` already.
    fn insert(&self, request: &Arc<RequestWork>, units: impl IntoIterator<Item = Unit>, announced: usize) {
        let insert = {
            let mut st = request.lock();
            let before = st.queued.len();
            st.queued.extend(units);
            let added = st.queued.len() - before;
            st.pending = st.pending + added - announced;
            let insert = added > 0 && !st.in_ring;
            st.in_ring |= insert;
            insert
        };
        if insert {
            self.shared.push(request.clone());
        }
    }

    /// Stops the threads once the work queued now is done.
    pub fn close(&self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_all();
        for h in self.threads.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            let _ = h.join();
        }
    }
}

/// Queues inputs handed back by the cache (their leader did not finish), each as a request of its own with its
/// caller's deadline; the first one prepared leads in place of the one that failed.
fn resubmit(pool: &Weak<Shared>, parked: Vec<Parked>) {
    let shared = pool.upgrade().filter(|s| !s.lock().closed);
    for Parked { unit, deadline } in parked {
        let Some(shared) = &shared else {
            let _ = unit.reply.send(Err(Error::new(Reason::ShuttingDown, "server is shutting down")));
            continue;
        };
        let request = RequestWork::new(deadline, BudgetPermit::none());
        {
            let mut st = request.lock();
            st.queued.push_back(unit);
            st.pending = 1;
            st.in_ring = true;
        }
        shared.push(request);
    }
}

fn work(shared: &Shared, context: &PrepareContext) {
    loop {
        let request = {
            let mut ring = shared.lock();
            loop {
                if let Some(r) = ring.requests.pop_front() {
                    break r;
                }
                if ring.closed {
                    return;
                }
                ring = shared.wake.wait(ring).unwrap_or_else(|p| p.into_inner());
            }
        };
        let (unit, requeue) = {
            let mut st = request.lock();
            let unit = st.queued.pop_front();
            let requeue = !st.queued.is_empty();
            st.in_ring = requeue;
            (unit, requeue)
        };
        if requeue {
            shared.push(request.clone());
        }
        let Some(unit) = unit else { continue };
        let prepared = prepare(context, unit, request.deadline);
        let flush = {
            let mut st = request.lock();
            st.pending -= 1;
            match prepared {
                Some(Prepared::Image(job)) => st.images.push(job),
                Some(Prepared::Text(job)) => st.texts.push(job),
                None => {}
            }
            take_groups(&mut st)
        };
        flush.queue(&context.batcher);
    }
}

enum Ready {
    Image(ImageInput),
    Text(TextInput),
}

enum Prepared {
    Image(Job<ImageInput>),
    Text(Job<TextInput>),
}

/// Prepares one input: its job for the model, or `None` when it was answered (an error) or dropped.
fn prepare(context: &PrepareContext, unit: Unit, deadline: Option<Instant>) -> Option<Prepared> {
    let Unit { index, input, reply, ticket, held, key } = unit;
    let expired = || deadline.is_some_and(|d| Instant::now() >= d);
    if reply.is_closed() {
        metrics::counter!(telemetry::DROPPED_ITEMS, "reason" => "cancelled").increment(1);
        return None;
    }
    if expired() {
        metrics::counter!(telemetry::DROPPED_ITEMS, "reason" => "deadline").increment(1);
        let _ = reply.send(Err(Error::new(Reason::DeadlineExceeded, "deadline passed before the input was prepared")));
        return None;
    }
    let start = Instant::now();
    // Base64 is decoded first: the cache knows an image by its bytes.
    let input = match input {
        UnitInput::Image(ImageSource::Base64(s)) => {
            match guard("preprocess", format_args!("image of item {index}"), || decode_base64(&s)) {
                Ok(bytes) => UnitInput::Image(ImageSource::Bytes(bytes)),
                Err(e) => {
                    metrics::histogram!(telemetry::PREPROCESS_DURATION, "modality" => "image")
                        .record(start.elapsed().as_secs_f64());
                    let _ = reply.send(Err(e));
                    return None;
                }
            }
        }
        input => input,
    };
    let mut unit = Unit { index, input, reply, ticket, held, key };
    let resumed = match &context.cache {
        Some(cache) => {
            unit = look_up(cache, unit, deadline, start)?;
            Instant::now()
        }
        None => start,
    };
    let Unit { index, input, mut reply, ticket, held, .. } = unit;
    let (modality, result) = {
        let should_stop = || reply.is_closed() || expired();
        match input {
            UnitInput::Image(source) => {
                let r = guard("preprocess", format_args!("image of item {index}"), || {
                    let pixels = match source {
                        ImageSource::Bytes(b) => {
                            context.images.preprocess_mode_until(&b, context.image_mode, &should_stop)
                        }
                        ImageSource::Base64(_) | ImageSource::Url(_) => {
                            Err(Error::new(Reason::InternalPanic, "image was not resolved to its bytes"))
                        }
                    }?;
                    Ok(Ready::Image(ImageInput { pixels }))
                });
                ("image", r)
            }
            UnitInput::Text(text) => {
                let r = guard("tokenize", format_args!("text of item {index}"), || {
                    if context.inject_panic_on_text.as_deref() == Some(text.as_str()) {
                        panic!("injected preprocessing fault");
                    }
                    let ids = context.tokenizer.encode(&text)?;
                    Ok(Ready::Text(TextInput { ids }))
                });
                ("text", r)
            }
        }
    };
    reply.add_preprocess(resumed.elapsed());
    metrics::histogram!(telemetry::PREPROCESS_DURATION, "modality" => modality).record(start.elapsed().as_secs_f64());
    drop(held); // the encoded bytes are gone
    match result {
        Ok(Ready::Image(input)) => Some(Prepared::Image(Job::new(input, deadline, reply).with_ticket(ticket))),
        Ok(Ready::Text(input)) => {
            reply.set_tokens(input.ids.len());
            Some(Prepared::Text(Job::new(input, deadline, reply).with_ticket(ticket)))
        }
        Err(e) => {
            let _ = reply.send(Err(e));
            None // the ticket goes with the unit
        }
    }
}

/// Looks an input up in the content cache (hashing it, unless it was handed back with its key): `None` when it
/// was answered from the cache or parked behind an identical input in flight, else the unit, now leading the
/// computation of its entry. The time spent (since `start`, base64 decoding included) counts as preprocessing.
fn look_up(cache: &Arc<ContentCache>, mut unit: Unit, deadline: Option<Instant>, start: Instant) -> Option<Unit> {
    let counted = unit.key.is_some();
    let key = match (unit.key, &unit.input) {
        (Some(key), _) => Some(key),
        (None, UnitInput::Image(ImageSource::Bytes(bytes))) => Some(CacheKey::image(bytes)),
        (None, UnitInput::Text(text)) => Some(CacheKey::text(text)),
        (None, UnitInput::Image(_)) => None,
    };
    unit.reply.add_preprocess(start.elapsed());
    let Some(key) = key else { return Some(unit) };
    unit.key = Some(key);
    match cache.claim(key, Parked { unit, deadline }, !counted) {
        Claim::Hit(vector, tokens, parked) => {
            let _ = parked.unit.reply.send_cached(vector, tokens);
            None
        }
        Claim::Parked => None,
        Claim::Lead(lead, Parked { mut unit, .. }) => {
            unit.reply.lead(lead);
            Some(unit)
        }
    }
}
