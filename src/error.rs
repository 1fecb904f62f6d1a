//! One error type for every request path, and the one table that maps it to gRPC codes and HTTP statuses.

use tonic::Code;

/// What went wrong with a request or an item.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Malformed request, bad base64, undecodable image, empty item, refused URL.
    #[error("{0}")]
    InvalidArgument(String),
    /// A request, image or text over a configured limit.
    #[error("{0}")]
    TooLarge(String),
    /// The server is over capacity (its queue is full).
    #[error("{0}")]
    Overloaded(String),
    /// Not ready yet, or shutting down.
    #[error("{0}")]
    Unavailable(String),
    /// The caller's deadline passed before the work ran.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The model failed.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// The gRPC code of this error (API.md's status table).
    pub fn grpc_code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::TooLarge(_) | Error::Overloaded(_) => Code::ResourceExhausted,
            Error::Unavailable(_) => Code::Unavailable,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Internal(_) => Code::Internal,
        }
    }

    /// The HTTP status of this error (API.md's status table).
    pub fn http_status(&self) -> u16 {
        match self {
            Error::InvalidArgument(_) => 400,
            Error::TooLarge(_) => 413,
            Error::Overloaded(_) => 429,
            Error::Unavailable(_) => 503,
            Error::DeadlineExceeded(_) => 504,
            Error::Internal(_) => 500,
        }
    }

    /// The same kind of error with its message prefixed, e.g. by the item it concerns.
    pub fn context(self, prefix: impl std::fmt::Display) -> Error {
        let wrap = |m: String| format!("{prefix}: {m}");
        match self {
            Error::InvalidArgument(m) => Error::InvalidArgument(wrap(m)),
            Error::TooLarge(m) => Error::TooLarge(wrap(m)),
            Error::Overloaded(m) => Error::Overloaded(wrap(m)),
            Error::Unavailable(m) => Error::Unavailable(wrap(m)),
            Error::DeadlineExceeded(m) => Error::DeadlineExceeded(wrap(m)),
            Error::Internal(m) => Error::Internal(wrap(m)),
        }
    }

    /// The message without the kind.
    pub fn message(&self) -> &str {
        match self {
            Error::InvalidArgument(m)
            | Error::TooLarge(m)
            | Error::Overloaded(m)
            | Error::Unavailable(m)
            | Error::DeadlineExceeded(m)
            | Error::Internal(m) => m,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        tonic::Status::new(e.grpc_code(), e.message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_table() {
        let cases = [
            (Error::InvalidArgument("x".into()), Code::InvalidArgument, 400),
            (Error::TooLarge("x".into()), Code::ResourceExhausted, 413),
            (Error::Overloaded("x".into()), Code::ResourceExhausted, 429),
            (Error::Unavailable("x".into()), Code::Unavailable, 503),
            (Error::DeadlineExceeded("x".into()), Code::DeadlineExceeded, 504),
            (Error::Internal("x".into()), Code::Internal, 500),
        ];
        for (e, code, http) in cases {
            assert_eq!(e.grpc_code(), code);
            assert_eq!(e.http_status(), http);
        }
        let e = Error::TooLarge("too big".into()).context("item 3");
        assert_eq!(e, Error::TooLarge("item 3: too big".into()));
    }
}
