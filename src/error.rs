//! One error type for every request path, and the one table that maps it to gRPC codes and HTTP statuses; and
//! the API key check both transports share.

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
    /// Missing or wrong API key.
    #[error("{0}")]
    Unauthenticated(String),
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
            Error::Unauthenticated(_) => Code::Unauthenticated,
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
            Error::Unauthenticated(_) => 401,
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
            Error::Unauthenticated(m) => Error::Unauthenticated(wrap(m)),
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
            | Error::Internal(m)
            | Error::Unauthenticated(m) => m,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        tonic::Status::new(e.grpc_code(), e.message())
    }
}

/// The optional API key: a bearer token on HTTP, `authorization` metadata on gRPC.
#[derive(Clone, Default)]
pub struct ApiKey(Option<std::sync::Arc<str>>);

impl ApiKey {
    /// `None` (or an empty key) leaves the API open.
    pub fn new(key: Option<String>) -> Self {
        ApiKey(key.filter(|k| !k.is_empty()).map(Into::into))
    }

    /// Checks an `authorization` value (`Bearer KEY`, or the bare key), in constant time for keys of the right
    /// length.
    pub fn check(&self, authorization: Option<&str>) -> Result<(), Error> {
        use subtle::ConstantTimeEq;
        let Some(key) = &self.0 else { return Ok(()) };
        let given = authorization.map(|v| v.strip_prefix("Bearer ").unwrap_or(v).trim()).unwrap_or("");
        if given.as_bytes().ct_eq(key.as_bytes()).into() {
            Ok(())
        } else {
            Err(Error::Unauthenticated("missing or invalid API key".into()))
        }
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "ApiKey(set)" } else { "ApiKey(none)" })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn api_key() {
        use super::ApiKey;
        assert!(ApiKey::new(None).check(None).is_ok());
        assert!(ApiKey::new(Some(String::new())).check(None).is_ok());
        let k = ApiKey::new(Some("s3cret".into()));
        assert!(k.check(Some("Bearer s3cret")).is_ok());
        assert!(k.check(Some("s3cret")).is_ok());
        assert!(k.check(Some("Bearer s3cre")).is_err());
        assert!(k.check(Some("Bearer s3cret!")).is_err());
        assert!(k.check(None).is_err());
    }

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
            (Error::Unauthenticated("x".into()), Code::Unauthenticated, 401),
        ];
        for (e, code, http) in cases {
            assert_eq!(e.grpc_code(), code);
            assert_eq!(e.http_status(), http);
        }
        let e = Error::TooLarge("too big".into()).context("item 3");
        assert_eq!(e, Error::TooLarge("item 3: too big".into()));
    }
}
