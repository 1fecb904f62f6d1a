//! The optional API key (`--api-key`), checked the same way on both transports: the HTTP gateway's scoring
//! routes (`Authorization: Bearer KEY`) and the gRPC Embedder service (`authorization` metadata).

use crate::error::{Error, Reason};

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
            Err(Error::new(Reason::Unauthenticated, "missing or invalid API key"))
        }
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "ApiKey(set)" } else { "ApiKey(none)" })
    }
}

/// The gRPC side of the API key: checks the `authorization` metadata of every Embedder call.
pub fn grpc_interceptor(
    key: ApiKey,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone + Send + Sync + 'static {
    move |request: tonic::Request<()>| {
        let value = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
        key.check(value)?;
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::ApiKey;

    #[test]
    fn api_key() {
        assert!(ApiKey::new(None).check(None).is_ok());
        assert!(ApiKey::new(Some(String::new())).check(None).is_ok());
        let k = ApiKey::new(Some("s3cret".into()));
        assert!(k.check(Some("Bearer s3cret")).is_ok());
        assert!(k.check(Some("s3cret")).is_ok());
        assert!(k.check(Some("Bearer s3cre")).is_err());
        assert!(k.check(Some("Bearer s3cret!")).is_err());
        assert!(k.check(None).is_err());
    }
}
