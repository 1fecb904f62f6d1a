//! The OpenAI embeddings API: `POST /v1/embeddings`, `GET /v1/models` and `GET /v1/models/{id}`, in OpenAI's
//! request, answer and error shapes, so that OpenAI clients (the official SDKs, LangChain, LlamaIndex, LiteLLM)
//! work against the server by changing their base URL.
//!
//! ```json
//! {"model": "openai/clip-vit-base-patch32", "input": ["a photo of a cat", "data:image/jpeg;base64,/9j/..."],
//!  "encoding_format": "float"}
//! ```
//! - `input`: a string or a list of strings. An entry that is a `data:image/...;base64,` URI is an image, the
//!   others are texts; `"modality": "image"` makes every entry an image (an `http(s)` URL, a data URI or plain
//!   base64), `"modality": "text"` every entry a text. Token arrays (lists of integers) are refused: CLIP reads
//!   its own BPE ids, which no OpenAI tokenizer produces.
//! - `model`: the served model's id (what `GET /v1/models` lists); absent means that one, any other is 404
//!   `MODEL_NOT_FOUND`.
//! - `encoding_format`: `float` (default) or `base64` (the little-endian float32 bytes, base64-encoded).
//! - `dimensions`: absent, or the model's own dimension (512); anything else is refused.
//! - `user` and unknown keys are ignored.
//!
//! Embeddings are unit-length, as OpenAI's are. `usage` counts the CLIP tokens of the texts (start and end tokens
//! included, after truncation to the context length); images count none. Errors are
//! `{"error": {"message", "type", "param", "code"}}` with the statuses of the README's error table, `code` being
//! the error's reason (`TEXT_TOO_LONG`, `QUEUE_FULL`, ...).
//!
//! The body is parsed in one pass that keeps only the entries and the few scalars the request needs, and stops at
//! the first entry past `--max-items-per-request`.

use std::cell::RefCell;
use std::fmt;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Serialize;

use super::{Failure, HttpState};
use crate::engine::{Admission, EmbedOptions, ImageSource, ItemInput, ItemOutput};
use crate::error::{Error, Kind, Reason};
use crate::inputs::fetch::is_http_url;
use crate::timing::Stages;

/// What a request asks for.
#[derive(Debug)]
pub struct EmbeddingsRequest {
    /// One item per entry, in order.
    pub items: Vec<ItemInput>,
    pub encoding: Encoding,
}

/// How the embeddings are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// JSON numbers.
    Float,
    /// Base64 of the little-endian float32 bytes.
    Base64,
}

/// Which entries are images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Modality {
    /// `data:image/...;base64,` entries are images, the others texts.
    Auto,
    Text,
    Image,
}

/// What the parse is checked against.
#[derive(Debug, Clone)]
pub struct ParseContext {
    /// Most entries in one request.
    pub max_items: usize,
    /// Longest text entry, in characters.
    pub max_text_chars: usize,
    /// The served model's id.
    pub model_id: String,
    /// The served model's embedding dimension.
    pub dim: usize,
}

/// A refusal: the error, and the request parameter it concerns.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub error: Error,
    pub param: Option<&'static str>,
}

fn refusal(reason: Reason, param: &'static str, message: impl Into<String>) -> Refusal {
    Refusal { error: Error::new(reason, message), param: Some(param) }
}

fn malformed(param: &'static str, message: impl Into<String>) -> Refusal {
    refusal(Reason::MalformedRequest, param, message)
}

const TOKEN_ARRAYS: &str = "token arrays are not supported: CLIP reads its own tokenizer's ids, which OpenAI \
    tokenizers do not produce; send the texts as strings (LangChain's OpenAIEmbeddings: \
    check_embedding_ctx_length=False)";

/// Parses a `/v1/embeddings` body.
pub fn parse(body: &[u8], cx: &ParseContext) -> Result<EmbeddingsRequest, Refusal> {
    let stop = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed =
        BodySeed { max_items: cx.max_items, stop: &stop }.deserialize(&mut de).and_then(|top| de.end().map(|()| top));
    match parsed {
        Ok(Some(fields)) => finish(fields, cx),
        Ok(None) => Err(Refusal {
            error: Error::new(Reason::MalformedRequest, "the request body must be a JSON object"),
            param: None,
        }),
        Err(e) => Err(stop.take().unwrap_or_else(|| Refusal {
            error: Error::new(Reason::MalformedRequest, format!("malformed JSON: {e}")),
            param: None,
        })),
    }
}

/// A scalar field as written; lists and objects are skipped without being built.
#[derive(Debug, Default)]
enum Scalar {
    #[default]
    Absent,
    Null,
    Str(String),
    Int(i128),
    Other,
}

/// One entry of `input`.
#[derive(Debug)]
enum Entry {
    Str(String),
    /// An integer: part of a token array.
    Token,
    /// A list (a token array, or something else).
    List,
    Other,
}

#[derive(Debug, Default)]
enum Input {
    #[default]
    Absent,
    One(String),
    List(Vec<Entry>),
    Other,
}

#[derive(Debug, Default)]
struct Fields {
    input: Input,
    model: Scalar,
    encoding_format: Scalar,
    dimensions: Scalar,
    modality: Scalar,
}

struct BodySeed<'s> {
    max_items: usize,
    stop: &'s RefCell<Option<Refusal>>,
}

impl<'de> DeserializeSeed<'de> for BodySeed<'_> {
    type Value = Option<Fields>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

/// Skips the rest of a list without building its values.
fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

/// Skips the rest of an object without building its values.
fn skip_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

impl<'de> Visitor<'de> for BodySeed<'_> {
    type Value = Option<Fields>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        skip_seq(seq).map(|()| None)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = Fields::default();
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "input" => {
                    fields.input = Input::Absent; // free an earlier value first
                    fields.input = map.next_value_seed(InputSeed { max_items: self.max_items, stop: self.stop })?;
                }
                "model" => fields.model = map.next_value_seed(ScalarSeed)?,
                "encoding_format" => fields.encoding_format = map.next_value_seed(ScalarSeed)?,
                "dimensions" => fields.dimensions = map.next_value_seed(ScalarSeed)?,
                "modality" => fields.modality = map.next_value_seed(ScalarSeed)?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Some(fields))
    }
}

struct ScalarSeed;

impl<'de> DeserializeSeed<'de> for ScalarSeed {
    type Value = Scalar;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Scalar, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ScalarSeed {
    type Value = Scalar;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a value")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Scalar, E> {
        Ok(Scalar::Other)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
        Ok(Scalar::Int(v.into()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
        Ok(Scalar::Int(v.into()))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Scalar, E> {
        Ok(Scalar::Other)
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Scalar, E> {
        // Scalars of interest are short; a long one is wrong anyway.
        Ok(if s.len() <= 1024 { Scalar::Str(s.to_owned()) } else { Scalar::Other })
    }
    fn visit_unit<E: de::Error>(self) -> Result<Scalar, E> {
        Ok(Scalar::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Scalar, A::Error> {
        skip_seq(seq).map(|()| Scalar::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Scalar, A::Error> {
        skip_map(map).map(|()| Scalar::Other)
    }
}

struct InputSeed<'s> {
    max_items: usize,
    stop: &'s RefCell<Option<Refusal>>,
}

impl<'de> DeserializeSeed<'de> for InputSeed<'_> {
    type Value = Input;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Input, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for InputSeed<'_> {
    type Value = Input;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string or a list of strings")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Input, E> {
        Ok(Input::Other)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Input, E> {
        Ok(Input::Other)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Input, E> {
        Ok(Input::Other)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Input, E> {
        Ok(Input::Other)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Input, E> {
        Ok(Input::Absent)
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Input, E> {
        Ok(Input::One(s.to_owned()))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Input, A::Error> {
        skip_map(map).map(|()| Input::Other)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Input, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = seq.next_element_seed(EntrySeed)? {
            if entries.len() == self.max_items {
                let e = Error::new(
                    Reason::TooManyItems,
                    format!("request exceeds the limit of {} items per request", self.max_items),
                );
                let msg = e.to_string();
                *self.stop.borrow_mut() = Some(Refusal { error: e, param: Some("input") });
                return Err(de::Error::custom(msg));
            }
            entries.push(entry);
        }
        Ok(Input::List(entries))
    }
}

struct EntrySeed;

impl<'de> DeserializeSeed<'de> for EntrySeed {
    type Value = Entry;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Entry, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for EntrySeed {
    type Value = Entry;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Entry, E> {
        Ok(Entry::Other)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Entry, E> {
        Ok(Entry::Token)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Entry, E> {
        Ok(Entry::Token)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Entry, E> {
        Ok(Entry::Other)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Entry, E> {
        Ok(Entry::Other)
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Entry, E> {
        Ok(Entry::Str(s.to_owned()))
    }
    fn visit_string<E: de::Error>(self, s: String) -> Result<Entry, E> {
        Ok(Entry::Str(s))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Entry, A::Error> {
        skip_seq(seq).map(|()| Entry::List)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Entry, A::Error> {
        skip_map(map).map(|()| Entry::Other)
    }
}

/// True for a `data:image/...;base64,` URI.
fn is_image_data_uri(s: &str) -> bool {
    let head = s.get(..11).map(str::to_ascii_lowercase);
    head.as_deref() == Some("data:image/") && s.split_once(',').is_some_and(|(h, _)| h.ends_with(";base64"))
}

/// Checks the fields, in the order: model, encoding_format, dimensions, modality, input.
fn finish(fields: Fields, cx: &ParseContext) -> Result<EmbeddingsRequest, Refusal> {
    match fields.model {
        Scalar::Absent | Scalar::Null => {}
        Scalar::Str(m) if m == cx.model_id => {}
        Scalar::Str(m) => {
            return Err(refusal(
                Reason::ModelNotFound,
                "model",
                format!(
                    "the model {:?} is not served here; this server serves {:?}",
                    crate::error::truncate(&m, 128),
                    cx.model_id
                ),
            ));
        }
        _ => return Err(malformed("model", "model must be a string")),
    }
    let encoding = match fields.encoding_format {
        Scalar::Absent | Scalar::Null => Encoding::Float,
        Scalar::Str(f) if f == "float" => Encoding::Float,
        Scalar::Str(f) if f == "base64" => Encoding::Base64,
        _ => return Err(malformed("encoding_format", "encoding_format must be \"float\" or \"base64\"")),
    };
    match fields.dimensions {
        Scalar::Absent | Scalar::Null => {}
        Scalar::Int(d) if d == cx.dim as i128 => {}
        Scalar::Int(d) => {
            return Err(malformed(
                "dimensions",
                format!("this model's embeddings have {} dimensions and cannot be shortened; dimensions {d} is not supported", cx.dim),
            ));
        }
        _ => return Err(malformed("dimensions", format!("dimensions must be an integer ({})", cx.dim))),
    }
    let modality = match fields.modality {
        Scalar::Absent | Scalar::Null => Modality::Auto,
        Scalar::Str(m) if m == "text" => Modality::Text,
        Scalar::Str(m) if m == "image" => Modality::Image,
        _ => return Err(malformed("modality", "modality must be \"text\" or \"image\"")),
    };
    let entries = match fields.input {
        Input::Absent => return Err(malformed("input", "input is required: a string or a list of strings")),
        Input::Other => return Err(malformed("input", "input must be a string or a list of strings")),
        Input::One(s) => vec![Entry::Str(s)],
        Input::List(entries) if entries.is_empty() => {
            return Err(malformed("input", "input must not be an empty list"));
        }
        Input::List(entries) => entries,
    };
    if matches!(entries[0], Entry::Token) {
        return Err(malformed("input", format!("input: {TOKEN_ARRAYS}")));
    }
    let mut items = Vec::with_capacity(entries.len());
    for (i, entry) in entries.into_iter().enumerate() {
        let s = match entry {
            Entry::Str(s) => s,
            Entry::List => return Err(malformed("input", format!("input[{i}]: {TOKEN_ARRAYS}"))),
            Entry::Token | Entry::Other => return Err(malformed("input", format!("input[{i}] must be a string"))),
        };
        if s.is_empty() {
            return Err(refusal(Reason::EmptyItem, "input", format!("input[{i}] is an empty string")));
        }
        let image = match modality {
            Modality::Image => true,
            Modality::Text => false,
            Modality::Auto => is_image_data_uri(&s),
        };
        let item = if image {
            let source = if is_http_url(&s) { ImageSource::Url(s) } else { ImageSource::Base64(s) };
            ItemInput { id: String::new(), image: Some(source), text: None }
        } else {
            let max = cx.max_text_chars;
            if s.len() > max && s.chars().count() > max {
                let chars = s.chars().count();
                return Err(refusal(
                    Reason::TextTooLong,
                    "input",
                    format!("input[{i}]: text of {chars} characters exceeds the limit of {max}"),
                ));
            }
            ItemInput { id: String::new(), image: None, text: Some(s) }
        };
        items.push(item);
    }
    Ok(EmbeddingsRequest { items, encoding })
}

/// OpenAI's `type` for an error.
fn error_type(e: &Error) -> &'static str {
    match e.kind() {
        Kind::InvalidArgument | Kind::TooLarge | Kind::NotFound => "invalid_request_error",
        Kind::Unauthenticated => "authentication_error",
        Kind::Overloaded => "rate_limit_error",
        Kind::Unavailable | Kind::DeadlineExceeded | Kind::Internal => "server_error",
    }
}

/// An error in OpenAI's shape, with the status of the README's table: `{"error": {"message", "type", "param",
/// "code"}}`, the code being the error's reason.
fn render(error: &Error, param: Option<&'static str>) -> Response {
    let status = StatusCode::from_u16(error.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::json!({"error": {
        "message": error.message(),
        "type": error_type(error),
        "param": param,
        "code": error.reason().as_str(),
    }});
    (status, Json(body)).into_response()
}

/// An error in OpenAI's shape, concerning no particular parameter (the API key, a caught panic).
pub fn error_response(error: Error) -> Response {
    render(&error, None)
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        render(&self.error, self.param)
    }
}

/// A failure of the body reader in OpenAI's shape, keeping its status (408) and closing the connection when the
/// body was not read to its end.
fn failed(failure: Failure) -> Response {
    let mut response = error_response(failure.error);
    if let Some(status) = failure.status {
        *response.status_mut() = status;
    }
    if failure.close {
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Rejects calls without the API key (when one is configured) before their body is read: OpenAI clients send
/// `Authorization: Bearer KEY`.
pub async fn authorize(State(state): State<HttpState>, request: Request, next: axum::middleware::Next) -> Response {
    let header = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match state.api_key.check(header) {
        Ok(()) => next.run(request).await,
        Err(e) => error_response(e),
    }
}

#[derive(Serialize)]
struct EmbeddingsResponse<'a> {
    object: &'static str,
    data: Vec<Datum>,
    model: &'a str,
    usage: Usage,
}

#[derive(Serialize)]
struct Datum {
    object: &'static str,
    index: usize,
    embedding: Vector,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Vector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: u64,
    total_tokens: u64,
}

/// Base64 of the little-endian float32 bytes (what OpenAI's `encoding_format: "base64"` returns).
pub fn encode_base64(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `POST /v1/embeddings`.
pub async fn embeddings(State(state): State<HttpState>, request: Request) -> Response {
    let arrival = super::arrival(&request);
    match run(&state, request).await {
        Ok((outputs, encoding)) => {
            let stages = Stages::of(outputs.iter().map(|o| &o.timing));
            let prompt_tokens: u64 = outputs.iter().map(|o| o.text_tokens as u64).sum();
            let data = outputs
                .into_iter()
                .enumerate()
                .map(|(index, o)| {
                    let v = o.image_features.or(o.text_features).unwrap_or_default();
                    let embedding = match encoding {
                        Encoding::Float => Vector::Float(v),
                        Encoding::Base64 => Vector::Base64(encode_base64(&v)),
                    };
                    Datum { object: "embedding", index, embedding }
                })
                .collect();
            let body = EmbeddingsResponse {
                object: "list",
                data,
                model: &state.engine.info().model_id,
                usage: Usage { prompt_tokens, total_tokens: prompt_tokens },
            };
            super::with_timing(Json(body).into_response(), arrival, Some(&stages))
        }
        Err(response) => response,
    }
}

async fn run(state: &HttpState, request: Request) -> Result<(Vec<ItemOutput>, Encoding), Response> {
    let (body, budget) = super::read_body(state, request).await.map_err(failed)?;
    let info = state.engine.info();
    let cx = ParseContext {
        max_items: state.engine.limits().max_items_per_request,
        max_text_chars: state.max_text_chars,
        model_id: info.model_id.clone(),
        dim: info.embedding_dim,
    };
    let parsed = super::off_runtime(body, move |body| {
        crate::prepare::guard("http", "a request body", || Ok(parse(&body, &cx)))
            .unwrap_or_else(|e| Err(Refusal { error: e, param: None }))
    })
    .await;
    let request =
        parsed.unwrap_or_else(|e| Err(Refusal { error: e, param: None })).map_err(IntoResponse::into_response)?;
    let options = EmbedOptions {
        normalize: true,
        deadline: None,
        admission: Admission::Reject,
        fail_fast: true,
        budget,
        item_label: |i, _| format!("input[{i}]"),
    };
    let outputs = state.engine.embed(request.items, options).await.map_err(|e| {
        let param = matches!(e.kind(), Kind::InvalidArgument | Kind::TooLarge).then_some("input");
        Refusal { error: e, param }.into_response()
    })?;
    let outputs = outputs
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Refusal { error: e, param: Some("input") }.into_response())?;
    Ok((outputs, request.encoding))
}

#[derive(Serialize)]
struct ModelObject<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

static CREATED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// The `created` time of the model object: when the server started, in Unix seconds.
pub fn created() -> u64 {
    *CREATED
        .get_or_init(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()))
}

fn model_object(state: &HttpState) -> ModelObject<'_> {
    ModelObject { id: &state.engine.info().model_id, object: "model", created: created(), owned_by: "clipserve" }
}

/// `GET /v1/models`: the served model.
pub async fn models(State(state): State<HttpState>) -> Response {
    Json(serde_json::json!({"object": "list", "data": [model_object(&state)]})).into_response()
}

/// `GET /v1/models/{id}`: the served model, or 404.
pub async fn model(State(state): State<HttpState>, Path(id): Path<String>) -> Response {
    if id == state.engine.info().model_id {
        return Json(model_object(&state)).into_response();
    }
    let message = format!("the model {:?} is not served here", crate::error::truncate(&id, 128));
    Refusal { error: Error::new(Reason::ModelNotFound, message), param: Some("model") }.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cx() -> ParseContext {
        ParseContext { max_items: 4, max_text_chars: 30, model_id: "org/clip".into(), dim: 512 }
    }

    fn ok(body: &str) -> EmbeddingsRequest {
        parse(body.as_bytes(), &cx()).unwrap_or_else(|e| panic!("{body}: {e:?}"))
    }

    fn refused(body: &str) -> (Reason, Option<&'static str>, String) {
        let r = parse(body.as_bytes(), &cx()).expect_err(body);
        (r.error.reason(), r.param, r.error.message().into_owned())
    }

    #[test]
    fn strings_lists_and_image_entries() {
        let r = ok(r#"{"input": "a cat", "model": "org/clip"}"#);
        assert_eq!(r.items.len(), 1);
        assert_eq!(r.items[0].text.as_deref(), Some("a cat"));
        assert_eq!(r.encoding, Encoding::Float);

        let r = ok(r#"{"input": ["a", "data:image/png;base64,aGk=", "data:text/plain;base64,aGk="],
                       "encoding_format": "base64", "user": "u", "dimensions": 512, "extra": [1, {"a": 2}]}"#);
        assert_eq!(r.encoding, Encoding::Base64);
        assert!(r.items[0].text.is_some() && r.items[0].image.is_none());
        assert!(matches!(&r.items[1].image, Some(ImageSource::Base64(s)) if s.starts_with("data:image/png")));
        assert!(r.items[2].text.is_some(), "only data:image URIs are images");

        // modality after input (as the OpenAI client's extra_body puts it): URLs and plain base64 are images.
        let r = ok(r#"{"input": ["https://example.com/a.jpg", "aGk=", "data:image/jpeg;base64,aGk="],
                       "modality": "image"}"#);
        assert!(matches!(&r.items[0].image, Some(ImageSource::Url(_))));
        assert!(matches!(&r.items[1].image, Some(ImageSource::Base64(s)) if s == "aGk="));
        assert!(r.items.iter().all(|i| i.text.is_none()));
        // A long image entry is not held to the text limit; "text" makes every entry a text.
        let long = "A".repeat(40);
        assert!(ok(&format!(r#"{{"modality":"image","input":["{long}"]}}"#)).items[0].image.is_some());
        let r = ok(r#"{"input": ["data:image/png;base64,aGk="], "modality": "text"}"#);
        assert!(r.items[0].text.is_some());
        assert_eq!(ok(r#"{"input": "x", "model": null, "encoding_format": null}"#).items.len(), 1);
    }

    #[test]
    fn refusals_name_the_parameter() {
        use Reason::*;
        let cases: &[(&str, Reason, Option<&str>, &str)] = &[
            ("[1]", MalformedRequest, None, "JSON object"),
            ("{", MalformedRequest, None, "malformed JSON"),
            (r#"{"model": "org/clip"}"#, MalformedRequest, Some("input"), "input is required"),
            (r#"{"input": 5}"#, MalformedRequest, Some("input"), "a string or a list"),
            (r#"{"input": []}"#, MalformedRequest, Some("input"), "empty list"),
            (r#"{"input": [1, 2, 3]}"#, MalformedRequest, Some("input"), "token arrays are not supported"),
            (r#"{"input": [[1, 2], [3]]}"#, MalformedRequest, Some("input"), "input[0]: token arrays"),
            (r#"{"input": ["a", null]}"#, MalformedRequest, Some("input"), "input[1] must be a string"),
            (r#"{"input": ["a", ""]}"#, EmptyItem, Some("input"), "input[1] is an empty string"),
            (
                r#"{"input": ["a", "0123456789012345678901234567890"]}"#,
                TextTooLong,
                Some("input"),
                "input[1]: text of 31",
            ),
            (r#"{"input": ["a","b","c","d","e"]}"#, TooManyItems, Some("input"), "limit of 4 items"),
            (r#"{"input": "a", "model": "text-embedding-3-small"}"#, ModelNotFound, Some("model"), "not served"),
            (r#"{"input": "a", "model": 3}"#, MalformedRequest, Some("model"), "model must be a string"),
            (r#"{"input": "a", "encoding_format": "int8"}"#, MalformedRequest, Some("encoding_format"), "base64"),
            (r#"{"input": "a", "dimensions": 256}"#, MalformedRequest, Some("dimensions"), "512 dimensions"),
            (r#"{"input": "a", "dimensions": "512"}"#, MalformedRequest, Some("dimensions"), "an integer"),
            (r#"{"input": "a", "modality": "audio"}"#, MalformedRequest, Some("modality"), "\"text\" or \"image\""),
        ];
        for &(body, reason, param, text) in cases {
            let (r, p, msg) = refused(body);
            assert_eq!((r, p), (reason, param), "{body}: {msg}");
            assert!(msg.contains(text), "{body}: {msg}");
        }
        // Past the item limit the parse stops there, even when the rest is not JSON.
        let (r, _, _) = refused(r#"{"input": ["a","b","c","d","e", garbage"#);
        assert_eq!(r, TooManyItems);
        // Deep nesting inside an ignored value is skipped.
        let deep = format!(r#"{{"input": "a", "x": {}{}}}"#, "[".repeat(10_000), "]".repeat(10_000));
        assert!(parse(deep.as_bytes(), &cx()).is_ok(), "deeply nested unknown keys are skipped");
    }

    #[test]
    fn base64_is_little_endian_float32() {
        let s = encode_base64(&[1.0, -2.5]);
        let bytes = base64::engine::general_purpose::STANDARD.decode(s).unwrap();
        assert_eq!(bytes, [1.0f32.to_le_bytes(), (-2.5f32).to_le_bytes()].concat());
    }
}
