//! One error type for every request path, and the one table that maps it to gRPC codes and HTTP statuses.

use tonic::Code;

/// The kind of an error: what the client should do about it, as API.md's status table says. Each [`Reason`]
/// belongs to exactly one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Malformed request, bad base64, undecodable image, empty item, refused URL.
    InvalidArgument,
    /// A request, image or text over a configured limit.
    TooLarge,
    /// The server is over capacity.
    Overloaded,
    /// Not ready yet, or shutting down.
    Unavailable,
    /// The caller's deadline passed before the work ran.
    DeadlineExceeded,
    /// The server failed (the model, or a bug).
    Internal,
    /// Missing or wrong API key.
    Unauthenticated,
    /// The request names something the server does not have (a model).
    NotFound,
}

macro_rules! reasons {
    ($($(#[$doc:meta])* $name:ident = $text:literal, $kind:ident, $retry:literal;)*) => {
        /// The machine-readable reason of an error: stable names, sent as `ErrorInfo.reason` in gRPC status
        /// details, `ItemError.reason` and the `reason` key of HTTP error bodies.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Reason {
            $($(#[$doc])* $name,)*
        }

        impl Reason {
            /// Every reason, for documentation and tests.
            pub const ALL: &'static [Reason] = &[$(Reason::$name,)*];

            /// The stable wire name, e.g. `QUEUE_FULL`.
            pub fn as_str(self) -> &'static str {
                match self { $(Reason::$name => $text,)* }
            }

            /// The kind (and so the gRPC code and HTTP status) of errors with this reason.
            pub fn kind(self) -> Kind {
                match self { $(Reason::$name => Kind::$kind,)* }
            }

            /// True when the same request may succeed if sent again later (or to another replica).
            pub fn retryable(self) -> bool {
                match self { $(Reason::$name => $retry,)* }
            }

            /// The reason with this wire name.
            pub fn parse(name: &str) -> Option<Reason> {
                match name { $($text => Some(Reason::$name),)* _ => None }
            }
        }
    };
}

reasons! {
    /// The request is not valid JSON / protobuf, or not in the expected shape.
    MalformedRequest = "MALFORMED_REQUEST", InvalidArgument, false;
    /// An item has neither an image nor a text.
    EmptyItem = "EMPTY_ITEM", InvalidArgument, false;
    /// An item id longer than the limit.
    IdTooLong = "ID_TOO_LONG", InvalidArgument, false;
    /// An image cell or field that is not valid base64.
    InvalidBase64 = "INVALID_BASE64", InvalidArgument, false;
    /// Bytes that are not an image in a supported format (JPEG, PNG, WebP, GIF, BMP).
    UnsupportedImageFormat = "UNSUPPORTED_IMAGE_FORMAT", InvalidArgument, false;
    /// An image that cannot be decoded: corrupt or truncated.
    InvalidImage = "INVALID_IMAGE", InvalidArgument, false;
    /// A text that cannot be tokenized.
    InvalidText = "INVALID_TEXT", InvalidArgument, false;
    /// An image URL that is malformed, not http(s), or points at an address that is not allowed.
    UrlNotAllowed = "URL_NOT_ALLOWED", InvalidArgument, false;
    /// An image URL that could not be fetched (connection, timeout, HTTP status, not an image).
    UrlFetchFailed = "URL_FETCH_FAILED", InvalidArgument, false;
    /// A request body or message over the byte limit.
    RequestTooLarge = "REQUEST_TOO_LARGE", TooLarge, false;
    /// More items in one request than the per-request limit or the queue capacity.
    TooManyItems = "TOO_MANY_ITEMS", TooLarge, false;
    /// An encoded image over the byte limit.
    ImageTooLarge = "IMAGE_TOO_LARGE", TooLarge, false;
    /// An image whose dimensions are over the pixel limit, or whose aspect ratio cannot be resized.
    ImageDimensionsTooLarge = "IMAGE_DIMENSIONS_TOO_LARGE", TooLarge, false;
    /// An image whose decoding work is over a limit (progressive JPEG scans, frames, metadata).
    ImageTooComplex = "IMAGE_TOO_COMPLEX", TooLarge, false;
    /// A text over the character limit.
    TextTooLong = "TEXT_TOO_LONG", TooLarge, false;
    /// The admission queue is full.
    QueueFull = "QUEUE_FULL", Overloaded, true;
    /// Too many bytes of requests are being read or held at once.
    MemoryBudgetExhausted = "MEMORY_BUDGET_EXHAUSTED", Overloaded, true;
    /// The model is still loading.
    NotReady = "NOT_READY", Unavailable, true;
    /// The server is draining before it exits.
    ShuttingDown = "SHUTTING_DOWN", Unavailable, true;
    /// No model worker can run batches right now (one is being restarted).
    NoModelWorker = "NO_MODEL_WORKER", Unavailable, true;
    /// The caller's deadline passed before the work was done.
    DeadlineExceeded = "DEADLINE_EXCEEDED", DeadlineExceeded, true;
    /// The model failed on the batch holding this item.
    ModelFailure = "MODEL_FAILURE", Internal, true;
    /// A bug: the server panicked while handling this item or call (it is logged and counted).
    InternalPanic = "INTERNAL_PANIC", Internal, false;
    /// Missing or wrong API key.
    Unauthenticated = "UNAUTHENTICATED", Unauthenticated, false;
    /// The request names a model the server does not serve (OpenAI API).
    ModelNotFound = "MODEL_NOT_FOUND", NotFound, false;
    /// Zero-shot labels that cannot be used: none at all, an empty one, or a template without exactly one `{}`.
    InvalidLabels = "INVALID_LABELS", InvalidArgument, false;
    /// More zero-shot labels than `--max-labels`.
    TooManyLabels = "TOO_MANY_LABELS", TooLarge, false;
}

/// What went wrong with a request or an item: a reason (which fixes the kind) and a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    reason: Reason,
    message: String,
}

/// Longest message sent to a client; what a message echoes (ids, URLs) is cut to fit.
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// `s` cut to at most `max` bytes at a character boundary, with `...` when cut.
pub fn truncate(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return s.into();
    }
    let mut end = max.saturating_sub(3);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end]).into()
}

impl Error {
    /// An error with this reason and message.
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Error { reason, message: message.into() }
    }

    /// The machine-readable reason.
    pub fn reason(&self) -> Reason {
        self.reason
    }

    /// The kind, fixed by the reason.
    pub fn kind(&self) -> Kind {
        self.reason.kind()
    }

    /// The gRPC code of this error (API.md's status table).
    pub fn grpc_code(&self) -> Code {
        match self.kind() {
            Kind::InvalidArgument => Code::InvalidArgument,
            Kind::TooLarge | Kind::Overloaded => Code::ResourceExhausted,
            Kind::Unavailable => Code::Unavailable,
            Kind::DeadlineExceeded => Code::DeadlineExceeded,
            Kind::Internal => Code::Internal,
            Kind::Unauthenticated => Code::Unauthenticated,
            Kind::NotFound => Code::NotFound,
        }
    }

    /// The HTTP status of this error (API.md's status table).
    pub fn http_status(&self) -> u16 {
        match self.kind() {
            Kind::InvalidArgument => 400,
            Kind::TooLarge => 413,
            Kind::Overloaded => 429,
            Kind::Unavailable => 503,
            Kind::DeadlineExceeded => 504,
            Kind::Internal => 500,
            Kind::Unauthenticated => 401,
            Kind::NotFound => 404,
        }
    }

    /// The same error with its message prefixed, e.g. by the item it concerns.
    pub fn context(self, prefix: impl std::fmt::Display) -> Error {
        Error { reason: self.reason, message: format!("{prefix}: {}", self.message) }
    }

    /// The message without the kind, cut to [`MAX_MESSAGE_BYTES`].
    pub fn message(&self) -> std::borrow::Cow<'_, str> {
        truncate(&self.message, MAX_MESSAGE_BYTES)
    }
}

/// The `domain` of the `google.rpc.ErrorInfo` in status details.
pub const ERROR_DOMAIN: &str = "clipserve";

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic_types::{ErrorDetails, StatusExt};
        let details = ErrorDetails::with_error_info(
            e.reason.as_str(),
            ERROR_DOMAIN,
            [("retryable".to_string(), e.reason.retryable().to_string())],
        );
        tonic::Status::with_error_details(e.grpc_code(), e.message(), details)
    }
}

/// The reason carried in a status's details (`google.rpc.ErrorInfo`), if any.
pub fn status_reason(status: &tonic::Status) -> Option<String> {
    use tonic_types::StatusExt;
    status.get_details_error_info().map(|info| info.reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_table() {
        let cases = [
            (Reason::InvalidImage, Code::InvalidArgument, 400),
            (Reason::ImageTooLarge, Code::ResourceExhausted, 413),
            (Reason::QueueFull, Code::ResourceExhausted, 429),
            (Reason::ShuttingDown, Code::Unavailable, 503),
            (Reason::DeadlineExceeded, Code::DeadlineExceeded, 504),
            (Reason::ModelFailure, Code::Internal, 500),
            (Reason::Unauthenticated, Code::Unauthenticated, 401),
            (Reason::ModelNotFound, Code::NotFound, 404),
        ];
        for (reason, code, http) in cases {
            let e = Error::new(reason, "x");
            assert_eq!(e.grpc_code(), code);
            assert_eq!(e.http_status(), http);
        }
        let e = Error::new(Reason::ImageTooLarge, "too big").context("item 3");
        assert_eq!(e, Error::new(Reason::ImageTooLarge, "item 3: too big"));
    }

    #[test]
    fn reasons_round_trip_and_ride_in_status_details() {
        for &r in Reason::ALL {
            assert_eq!(Reason::parse(r.as_str()), Some(r));
            let status = tonic::Status::from(Error::new(r, "m"));
            assert_eq!(status_reason(&status).as_deref(), Some(r.as_str()));
        }
        assert!(Reason::QueueFull.retryable() && !Reason::ImageTooLarge.retryable());
    }

    #[test]
    fn long_messages_are_cut() {
        let id = "é".repeat(100_000);
        let e = Error::new(Reason::EmptyItem, format!("item 0 (id {id:?})"));
        assert!(e.message().len() <= MAX_MESSAGE_BYTES);
        assert!(e.message().ends_with("..."));
        assert_eq!(truncate("short", 10), "short");
    }
}
