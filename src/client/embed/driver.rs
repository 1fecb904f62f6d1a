//! The queue of read items and the streams that send them: one stream per server address, a bounded window of
//! messages in flight, retries of what may succeed when sent again, and answers handed to the writer.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Code;

use super::EmbedArgs;
use crate::error::{status_reason, Reason};
use crate::pb::{embedder_client::EmbedderClient, EmbedRequest, EmbedResponse, Item, ItemError};

/// One embedded item, as the writer gets it.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Record {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_features: Option<Vec<f32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_features: Option<Vec<f32>>,
    /// The text sent (metadata of the clip-retrieval output).
    #[serde(skip)]
    pub text: Option<String>,
    /// Where the image came from, when known (metadata of the clip-retrieval output).
    #[serde(skip)]
    pub url: Option<String>,
}

/// Why an item failed: a gRPC code name, a reason (the server's, or one of the client's `INPUT_*` reasons) and a
/// message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Problem {
    pub code: &'static str,
    pub reason: String,
    pub message: String,
}

impl Problem {
    pub fn new(code: &'static str, reason: &str, message: impl Into<String>) -> Problem {
        Problem { code, reason: reason.into(), message: message.into() }
    }

    /// A problem the server reported for one item.
    fn from_item(e: &ItemError) -> Problem {
        Problem { code: code_name(Code::from_i32(e.code)), reason: e.reason.clone(), message: e.message.clone() }
    }

    /// A failed call: the status's code, its reason (empty when it carries none, e.g. a transport failure) and
    /// message.
    fn from_status(status: &tonic::Status) -> Problem {
        let mut message = status.message().to_string();
        if message.is_empty() {
            message = status.code().description().to_string();
        }
        Problem { code: code_name(status.code()), reason: status_reason(status).unwrap_or_default(), message }
    }
}

/// One line of the errors.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Failure {
    pub id: String,
    pub code: String,
    pub reason: String,
    pub message: String,
}

impl Failure {
    pub fn new(id: String, p: Problem) -> Failure {
        Failure { id, code: p.code.into(), reason: p.reason, message: p.message }
    }
}

/// What the writer is told, in the order things happen. Every item of a unit comes between its `Start` and the
/// moment the writer has seen `count` items of it, whether `End` comes before or after them.
#[derive(Debug)]
pub(super) enum Event {
    /// A unit (an output partition) begins.
    Start(u64),
    /// Item `pos` of `unit` was embedded.
    Done { unit: u64, pos: u64, record: Record },
    /// Item `pos` of `unit` failed.
    Failed { unit: u64, pos: u64, failure: Failure },
    /// `unit` holds `count` items in all.
    End { unit: u64, count: u64 },
    /// The run is over; `complete`: nothing was left undone. Sent last.
    Finish { complete: bool },
}

/// An item on its way: where it belongs, the message item, and the last retryable problem it met (written if it
/// runs out of attempts).
pub(super) struct Work {
    pub unit: u64,
    pub pos: u64,
    pub item: Item,
    pub url: Option<String>,
    pub last: Option<Problem>,
}

/// A message's worth of items, with the attempts it has had and when it may be sent again.
///
/// Every item read and not yet written lives in exactly one place: a chunk in the queue, or a chunk in one
/// stream's in-flight list. It leaves that place once, to the output or to the errors.
pub(super) struct Chunk {
    pub items: Vec<Work>,
    pub attempts: u32,
    pub not_before: Instant,
    /// Encoded size of the items.
    pub bytes: usize,
}

impl Chunk {
    pub fn new(items: Vec<Work>, attempts: u32) -> Chunk {
        let bytes = items.iter().map(|w| framed_len(&w.item)).sum();
        Chunk { items, attempts, not_before: Instant::now(), bytes }
    }
}

/// Messages sent on one stream and not answered yet, oldest first, each with the items it carried.
type InFlight = VecDeque<Chunk>;

/// Items queued at most (besides the bytes bound): a message's bookkeeping is small, but texts are too.
const MAX_QUEUED_ITEMS: usize = 16_384;
/// Answers handed to the writer and not written yet, at most, before the reader waits.
const MAX_UNWRITTEN: usize = 16_384;

struct QueueState {
    queue: VecDeque<Chunk>,
    bytes: usize,
    items: usize,
    /// Some stream has connected: the reader starts then, so that nothing is failed while no server is there.
    connected: bool,
    /// The run is stopping: the reader reads no further.
    stopped: bool,
}

/// What the reader, the streams and the writer share.
pub(super) struct Shared {
    state: Mutex<QueueState>,
    /// The reader waits here for room in the queue (or for a first connection).
    room: Condvar,
    more: Notify,
    /// Items read and neither written nor failed yet.
    pub pending: AtomicUsize,
    /// Events sent to the writer and not written yet.
    unwritten: AtomicUsize,
    reading_done: AtomicBool,
    read_all: AtomicBool,
    /// Turns true once the input is read and nothing is pending (or the run is aborted).
    pub over: watch::Sender<bool>,
    events: mpsc::UnboundedSender<Event>,
    pub args: EmbedArgs,
}

impl Shared {
    pub fn new(args: EmbedArgs, events: mpsc::UnboundedSender<Event>) -> Shared {
        Shared {
            state: Mutex::new(QueueState {
                queue: VecDeque::new(),
                bytes: 0,
                items: 0,
                connected: false,
                stopped: false,
            }),
            room: Condvar::new(),
            more: Notify::new(),
            pending: AtomicUsize::new(0),
            unwritten: AtomicUsize::new(0),
            reading_done: AtomicBool::new(false),
            read_all: AtomicBool::new(false),
            over: watch::Sender::new(false),
            events,
            args,
        }
    }

    pub fn is_over(&self) -> bool {
        *self.over.borrow()
    }

    /// Whether the reader got to the end of the input.
    pub fn read_all(&self) -> bool {
        self.read_all.load(Ordering::SeqCst)
    }

    /// Reader side: waits until some stream has connected; false if the run stopped first.
    pub fn wait_connected(&self) -> bool {
        let mut st = self.state.lock().unwrap();
        while !st.connected && !st.stopped {
            st = self.room.wait_timeout(st, Duration::from_millis(200)).unwrap().0;
        }
        !st.stopped
    }

    pub fn mark_connected(&self) {
        let mut st = self.state.lock().unwrap();
        if !st.connected {
            st.connected = true;
            self.room.notify_all();
        }
    }

    /// Reader side: queues a chunk of fresh items, waiting while the queue or the writer is full. False (and
    /// nothing queued) if the run stopped meanwhile.
    pub fn push(&self, chunk: Chunk) -> bool {
        let cap = self.args.read_ahead_bytes;
        let mut st = self.state.lock().unwrap();
        loop {
            if st.stopped {
                return false;
            }
            let full = !st.queue.is_empty()
                && (st.bytes + chunk.bytes > cap || st.items + chunk.items.len() > MAX_QUEUED_ITEMS);
            if !full && self.unwritten.load(Ordering::SeqCst) <= MAX_UNWRITTEN {
                break;
            }
            st = self.room.wait_timeout(st, Duration::from_millis(100)).unwrap().0;
        }
        self.pending.fetch_add(chunk.items.len(), Ordering::SeqCst);
        st.bytes += chunk.bytes;
        st.items += chunk.items.len();
        st.queue.push_back(chunk);
        drop(st);
        self.more.notify_waiters();
        true
    }

    /// The first chunk due to be sent.
    fn take(&self) -> Option<Chunk> {
        let mut st = self.state.lock().unwrap();
        let now = Instant::now();
        let i = st.queue.iter().position(|c| c.not_before <= now)?;
        let chunk = st.queue.remove(i)?;
        st.bytes -= chunk.bytes;
        st.items -= chunk.items.len();
        drop(st);
        self.room.notify_one();
        Some(chunk)
    }

    /// Puts chunks back at the head of the queue, in their order, to be sent next.
    fn put_front(&self, chunks: impl DoubleEndedIterator<Item = Chunk>) {
        let mut st = self.state.lock().unwrap();
        for c in chunks.rev() {
            st.bytes += c.bytes;
            st.items += c.items.len();
            st.queue.push_front(c);
        }
        drop(st);
        self.more.notify_waiters();
    }

    /// Counts an attempt for a chunk whose items met a retryable problem (each item's `last`): it goes back to
    /// the queue after a backoff, or its items to the errors once `--retries` attempts are spent.
    fn retry(&self, mut chunk: Chunk) {
        chunk.attempts += 1;
        if chunk.attempts >= self.args.retries {
            for w in chunk.items {
                let mut p = w.last.clone().unwrap_or_else(|| Problem::new("UNAVAILABLE", "", "no answer"));
                p.message = format!("gave up after {} attempts: {}", chunk.attempts, p.message);
                self.fail(w, p);
            }
            return;
        }
        chunk.not_before = Instant::now() + backoff(chunk.attempts);
        let mut st = self.state.lock().unwrap();
        st.bytes += chunk.bytes;
        st.items += chunk.items.len();
        st.queue.push_back(chunk);
        drop(st);
        self.more.notify_waiters();
    }

    fn send(&self, event: Event) {
        self.unwritten.fetch_add(1, Ordering::SeqCst);
        let _ = self.events.send(event);
    }

    /// Reader side: an event about a unit, or an item that failed before it was queued.
    pub fn tell(&self, event: Event) {
        self.send(event);
    }

    /// Writer side: `n` events are written.
    pub fn written(&self, n: usize) {
        // The last event (Finish) is not counted by anyone waiting.
        let _ = self.unwritten.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| Some(u.saturating_sub(n)));
        self.room.notify_one();
    }

    fn fail(&self, w: Work, problem: Problem) {
        let failure = Failure::new(w.item.id, problem);
        self.send(Event::Failed { unit: w.unit, pos: w.pos, failure });
        self.settle();
    }

    fn done(&self, w: Work, image_features: Vec<f32>, text_features: Vec<f32>) {
        let record = Record {
            id: w.item.id,
            image_features: (!image_features.is_empty()).then_some(image_features),
            text_features: (!text_features.is_empty()).then_some(text_features),
            text: w.item.text,
            url: w.url,
        };
        self.send(Event::Done { unit: w.unit, pos: w.pos, record });
        self.settle();
    }

    /// One item is written: counts it, and ends the run with the last one.
    fn settle(&self) {
        let before = self.pending.fetch_sub(1, Ordering::SeqCst);
        assert!(before > 0, "an item was settled twice");
        if before == 1 && self.reading_done.load(Ordering::SeqCst) {
            self.over.send_replace(true);
        }
        self.more.notify_waiters();
    }

    /// The reader has queued everything: the run ends once nothing is pending.
    pub fn finish_reading(&self, all: bool) {
        self.read_all.store(all, Ordering::SeqCst);
        self.reading_done.store(true, Ordering::SeqCst);
        if self.pending.load(Ordering::SeqCst) == 0 {
            self.over.send_replace(true);
        }
        self.more.notify_waiters();
    }

    /// The reader stops at its next item (every server was given up).
    pub fn stop(&self) {
        self.state.lock().unwrap().stopped = true;
        self.room.notify_all();
    }

    /// Ends the run now: the reader stops and the streams end; what is in flight is left unwritten.
    pub fn abort(&self) {
        self.stop();
        self.over.send_replace(true);
        self.more.notify_waiters();
    }

    /// Sleeps for `d`, or less if the run ends meanwhile.
    async fn pause(&self, d: Duration) {
        let mut over = self.over.subscribe();
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = over.wait_for(|o| *o) => {}
        }
    }
}

/// The wait before attempt `attempt + 1`: 100 ms doubled per attempt, at most 10 s.
pub(super) fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((100u64 << attempt.min(7)).min(10_000))
}

/// How long one connection attempt may take.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Encoded size of an item inside an `EmbedRequest` (field tag, length, body).
pub(super) fn framed_len(item: &Item) -> usize {
    let len = prost::Message::encoded_len(item);
    1 + prost::encoding::encoded_len_varint(len as u64) + len
}

/// The message that carries a chunk's items.
fn to_message(shared: &Shared, chunk: &Chunk) -> EmbedRequest {
    EmbedRequest { items: chunk.items.iter().map(|w| w.item.clone()).collect(), normalize: shared.args.normalize }
}

/// What to do about a failed call or a broken stream.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Worth sending again: a retryable server reason, or a transport failure with no reason.
    Retry,
    /// Caused by the message that failed (e.g. over the server's message limit): not retried.
    Permanent,
    /// Every call to this server would fail the same way (wrong API key, not a clipserve server): it is given up.
    Fatal,
}

fn verdict(status: &tonic::Status) -> Verdict {
    if let Some(reason) = status_reason(status) {
        match Reason::parse(&reason) {
            Some(Reason::Unauthenticated) => return Verdict::Fatal,
            Some(r) if r.retryable() => return Verdict::Retry,
            Some(_) => return Verdict::Permanent,
            None => {} // a reason this client does not know: judge by the code
        }
    }
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied | Code::Unimplemented => Verdict::Fatal,
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition | Code::NotFound | Code::AlreadyExists => {
            Verdict::Permanent
        }
        // What a dropped connection or a reset stream looks like (UNAVAILABLE, UNKNOWN, INTERNAL, CANCELLED, ...).
        _ => Verdict::Retry,
    }
}

/// Whether an item error is worth another attempt: a retryable reason, or UNAVAILABLE with no reason.
fn item_retryable(e: &ItemError) -> bool {
    match Reason::parse(&e.reason) {
        Some(r) => r.retryable(),
        None => e.reason.is_empty() && e.code == Code::Unavailable as i32,
    }
}

/// How one stream ended.
enum Ending {
    /// Nothing is pending any more, or the address was retired and its stream drained.
    Finished,
    /// The connection or the stream failed; what was in flight is retried.
    Broke(Problem),
    /// The server refused the oldest message in flight for good; the others are sent again.
    Refused(Problem),
    /// Every call to this server would fail this way.
    Fatal(Problem),
}

/// An error and its causes, on one line.
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        // Some errors repeat their cause in their own message.
        let cause_text = cause.to_string();
        if !s.contains(&cause_text) {
            s = format!("{s}: {cause_text}");
        }
        source = cause.source();
    }
    s
}

/// The TLS settings for an https:// server, from --tls-ca, --tls-cert and --tls-key (read now, so that renewed
/// files are used by new connections); `name` is what the server's certificate is checked against when the URL
/// holds an address resolved from it.
pub(super) fn tls_config(args: &EmbedArgs, name: Option<&str>) -> Result<ClientTlsConfig, Problem> {
    let read = |path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| Problem::new("INVALID_ARGUMENT", "", format!("cannot read {}: {e}", path.display())))
    };
    let ca = args
        .tls_ca
        .as_deref()
        .ok_or_else(|| Problem::new("INVALID_ARGUMENT", "", "an https:// server needs --tls-ca"))?;
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    if let Some(name) = name {
        tls = tls.domain_name(name);
    }
    Ok(tls)
}

/// Drives one server address: streams to it, reconnecting with backoff, until no work is left or `retire` turns
/// true (the address left the server's name). Gives up on it (returning the last problem) after `--retries`
/// failed attempts in a row with nothing answered, or at once when every call would fail. `name` is the server
/// name the address was resolved from (for TLS).
pub(super) async fn drive(
    server: String,
    name: Option<String>,
    shared: Arc<Shared>,
    retire: watch::Receiver<bool>,
) -> Result<(), Problem> {
    let plain = Channel::from_shared(server.clone())
        .map_err(|e| Problem::new("INVALID_ARGUMENT", "", format!("invalid server address: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT);
    let mut failures = 0u32;
    while !shared.is_over() && !*retire.borrow() {
        // TLS files that cannot be read (in the middle of a renewal, say) make a failed attempt like any other.
        let endpoint = if server.starts_with("https://") {
            tls_config(&shared.args, name.as_deref()).and_then(|tls| {
                plain.clone().tls_config(tls).map_err(|e| Problem::new("INVALID_ARGUMENT", "", error_chain(&e)))
            })
        } else {
            Ok(plain.clone())
        };
        let connected = match endpoint {
            Ok(endpoint) => endpoint
                .connect()
                .await
                .map_err(|e| Problem::new("UNAVAILABLE", "", format!("cannot connect: {}", error_chain(&e)))),
            Err(p) => Err(p),
        };
        let (ending, answered) = match connected {
            Ok(channel) => {
                shared.mark_connected();
                session(channel, &shared, retire.clone()).await
            }
            Err(p) => (Ending::Broke(p), false),
        };
        if answered {
            failures = 0;
        }
        match ending {
            Ending::Finished => {}
            Ending::Fatal(p) => {
                tracing::warn!(%server, "giving up on this server: {} {}: {}", p.code, p.reason, p.message);
                return Err(p);
            }
            Ending::Refused(p) => {
                tracing::warn!(%server, "a message was refused ({} {}: {}); its items are not retried", p.code, p.reason, p.message);
            }
            Ending::Broke(p) => {
                failures += 1;
                if failures >= shared.args.retries {
                    tracing::warn!(%server, "giving up on this server after {failures} failed attempts: {}", p.message);
                    return Err(p);
                }
                tracing::warn!(%server, "{} {}; retrying", p.code, p.message);
                shared.pause(backoff(failures)).await;
            }
        }
    }
    Ok(())
}

/// One stream on a connected channel: keeps up to `--window` messages in flight and hands what comes back to the
/// writer. Returns how it ended and whether any answer came; what it had in flight and unanswered is back in the
/// queue (or, for a refused message, in the errors).
async fn session(channel: Channel, shared: &Arc<Shared>, retire: watch::Receiver<bool>) -> (Ending, bool) {
    let mut client =
        EmbedderClient::new(channel).max_decoding_message_size(256 << 20).max_encoding_message_size(usize::MAX);
    let window = shared.args.window.max(1);
    let (tx, rx) = mpsc::channel::<EmbedRequest>(window);
    let in_flight: Arc<Mutex<InFlight>> = Arc::default();
    let slots = Arc::new(tokio::sync::Semaphore::new(window));
    let sender = tokio::spawn(send_messages(shared.clone(), in_flight.clone(), slots.clone(), retire.clone(), tx));
    let (ending, answered) = match client.embed_stream(stream_request(shared, rx)).await {
        Err(status) => (ending_of(&status), false),
        Ok(response) => receive_answers(response.into_inner(), shared, &in_flight, &slots, retire).await,
    };
    sender.abort();
    let _ = sender.await;
    let unanswered: Vec<Chunk> = in_flight.lock().unwrap().drain(..).collect();
    (settle_unanswered(shared, ending, unanswered), answered)
}

/// The stream's sending side: takes work from the queue whenever a window slot is free, until the address
/// retires or nothing is left.
async fn send_messages(
    shared: Arc<Shared>,
    in_flight: Arc<Mutex<InFlight>>,
    slots: Arc<tokio::sync::Semaphore>,
    retire: watch::Receiver<bool>,
    tx: mpsc::Sender<EmbedRequest>,
) {
    loop {
        let permit = slots.clone().acquire_owned().await.expect("semaphore");
        let chunk = loop {
            let notified = shared.more.notified();
            if *retire.borrow() || shared.is_over() {
                break None;
            }
            if let Some(c) = shared.take() {
                break Some(c);
            }
            // Wake up now and then: work comes back from other streams, or after its backoff.
            let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
        };
        let Some(chunk) = chunk else { return };
        // From the take to the push no await: a chunk taken is always either in flight or settled.
        let message = to_message(&shared, &chunk);
        in_flight.lock().unwrap().push_back(chunk);
        permit.forget();
        if tx.send(message).await.is_err() {
            return;
        }
    }
}

/// The stream call, with the API key when one is given.
fn stream_request(shared: &Shared, rx: mpsc::Receiver<EmbedRequest>) -> tonic::Request<ReceiverStream<EmbedRequest>> {
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(key) = &shared.args.api_key {
        if let Ok(v) = format!("Bearer {key}").parse() {
            request.metadata_mut().insert("authorization", v);
        }
    }
    request
}

/// How a stream that failed with `status` ended.
fn ending_of(status: &tonic::Status) -> Ending {
    let p = Problem::from_status(status);
    match verdict(status) {
        Verdict::Retry => Ending::Broke(p),
        Verdict::Permanent => Ending::Refused(p),
        Verdict::Fatal => Ending::Fatal(p),
    }
}

/// The stream's receiving side: matches each answer with the oldest message in flight and settles it, until the
/// stream ends, nothing is left, or the address retires with nothing in flight. Returns how it ended and whether
/// any answer came.
async fn receive_answers(
    mut answers: tonic::Streaming<EmbedResponse>,
    shared: &Arc<Shared>,
    in_flight: &Mutex<InFlight>,
    slots: &tokio::sync::Semaphore,
    mut retire: watch::Receiver<bool>,
) -> (Ending, bool) {
    let mut answered = false;
    let mut over = shared.over.subscribe();
    let mut retiring = false;
    let drained = |in_flight: &Mutex<InFlight>| in_flight.lock().unwrap().is_empty();
    let ending = loop {
        let next = tokio::select! {
            next = answers.next() => next,
            // Nothing is left to answer.
            _ = over.wait_for(|o| *o) => break Ending::Finished,
            // The address is leaving: no new messages; end once the ones in flight are answered.
            _ = retire.wait_for(|r| *r), if !retiring => {
                retiring = true;
                if drained(in_flight) {
                    break Ending::Finished;
                }
                continue;
            }
        };
        match next {
            Some(Ok(answer)) => {
                answered = true;
                slots.add_permits(1);
                let Some(chunk) = in_flight.lock().unwrap().pop_front() else {
                    break Ending::Broke(Problem::new("INTERNAL", "", "an answer for no message"));
                };
                settle_answer(shared, chunk, answer);
                if retiring && drained(in_flight) {
                    break Ending::Finished;
                }
            }
            Some(Err(status)) => break ending_of(&status),
            None if shared.is_over() => break Ending::Finished,
            None => break Ending::Broke(Problem::new("UNAVAILABLE", "", "the stream ended early")),
        }
    };
    (ending, answered)
}

/// Puts back what a stream left `unanswered`, as its `ending` says: sent again elsewhere, retried with an attempt
/// counted, or (a refusal) failed or split to find the refused item. Returns the ending as the caller counts it.
fn settle_unanswered(shared: &Shared, ending: Ending, unanswered: Vec<Chunk>) -> Ending {
    let ending = match ending {
        // A refusal with nothing in flight cannot be pinned on a message: it counts as a failed attempt.
        Ending::Refused(p) if unanswered.is_empty() => Ending::Broke(p),
        e => e,
    };
    match &ending {
        // Nothing is in flight here unless a message was taken as the address retired: it goes to another.
        Ending::Finished | Ending::Fatal(_) => shared.put_front(unanswered.into_iter()),
        Ending::Broke(p) => {
            if !unanswered.is_empty() {
                tracing::warn!(messages = unanswered.len(), "stream broke with messages in flight; sending them again");
            }
            for mut chunk in unanswered {
                for w in &mut chunk.items {
                    w.last = Some(p.clone());
                }
                shared.retry(chunk);
            }
        }
        Ending::Refused(p) => {
            // Answers come in order, so the refusal is the oldest unanswered message's. Alone, its item fails; with
            // others, each is sent once more on its own to find which one it was. The messages after it did
            // nothing wrong: they go first, with no attempt counted.
            let mut chunks = unanswered.into_iter();
            let mut again = Vec::new();
            if let Some(first) = chunks.next() {
                if first.items.len() == 1 {
                    for w in first.items {
                        shared.fail(w, p.clone());
                    }
                } else {
                    again.extend(first.items.into_iter().map(|w| Chunk::new(vec![w], first.attempts)));
                }
            }
            again.extend(chunks);
            shared.put_front(again.into_iter());
        }
    }
    ending
}

/// Hands one answer's embeddings and errors to the writer; retryable item errors go back to the queue as one
/// chunk.
fn settle_answer(shared: &Shared, chunk: Chunk, answer: EmbedResponse) {
    let mut retry = Vec::new();
    let mut embeddings = answer.embeddings.into_iter();
    for mut w in chunk.items {
        // Matched by position (the server answers in order); the id written is the one sent.
        let Some(e) = embeddings.next() else {
            w.last = Some(Problem::new("INTERNAL", "", "the server's answer left this item out"));
            retry.push(w);
            continue;
        };
        match e.error {
            Some(err) if item_retryable(&err) => {
                w.last = Some(Problem::from_item(&err));
                retry.push(w);
            }
            Some(err) => shared.fail(w, Problem::from_item(&err)),
            None => shared.done(w, e.image_features, e.text_features),
        }
    }
    if !retry.is_empty() {
        shared.retry(Chunk::new(retry, chunk.attempts));
    }
}

/// The name of a gRPC code, as the errors file writes it.
pub(super) fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn giving_up_on_an_unreachable_server_takes_under_a_minute_with_default_flags() {
        // A server given up after `retries` failed connections: each may take the connect timeout, with a backoff
        // between them.
        let retries = 8; // the default of --retries
        let waits: Duration = (1..retries).map(backoff).sum();
        assert!(waits + CONNECT_TIMEOUT * retries < Duration::from_secs(60), "{waits:?}");
        assert_eq!(backoff(1), Duration::from_millis(200));
        assert_eq!(backoff(30), Duration::from_secs(10));
    }

    #[test]
    fn only_retryable_reasons_and_transport_failures_are_retried() {
        use crate::error::Error;
        let status = |r: Reason| tonic::Status::from(Error::new(r, "m"));
        assert_eq!(verdict(&status(Reason::QueueFull)), Verdict::Retry);
        assert_eq!(verdict(&status(Reason::ShuttingDown)), Verdict::Retry);
        assert_eq!(verdict(&status(Reason::ImageTooLarge)), Verdict::Permanent);
        assert_eq!(verdict(&status(Reason::RequestTooLarge)), Verdict::Permanent);
        assert_eq!(verdict(&status(Reason::Unauthenticated)), Verdict::Fatal);
        // No reason: a transport failure, unless the code says the message itself was wrong.
        assert_eq!(verdict(&tonic::Status::unavailable("connection refused")), Verdict::Retry);
        assert_eq!(verdict(&tonic::Status::unknown("h2 protocol error")), Verdict::Retry);
        assert_eq!(verdict(&tonic::Status::internal("stream reset")), Verdict::Retry);
        assert_eq!(verdict(&tonic::Status::out_of_range("message length too large")), Verdict::Permanent);
        assert_eq!(verdict(&tonic::Status::unimplemented("no such service")), Verdict::Fatal);

        let item =
            |code: Code, reason: &str| ItemError { code: code as i32, message: "m".into(), reason: reason.into() };
        assert!(item_retryable(&item(Code::ResourceExhausted, "QUEUE_FULL")));
        assert!(item_retryable(&item(Code::Internal, "MODEL_FAILURE")));
        assert!(!item_retryable(&item(Code::ResourceExhausted, "IMAGE_TOO_LARGE")));
        assert!(!item_retryable(&item(Code::ResourceExhausted, "")));
        assert!(!item_retryable(&item(Code::InvalidArgument, "INVALID_IMAGE")));
        assert!(item_retryable(&item(Code::Unavailable, "")));
    }
}
