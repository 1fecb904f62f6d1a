//! MLflow's scoring protocol (`POST /invocations`), as MLflow's own scoring server (`mlflow.pyfunc.scoring_server`,
//! MLflow 2.0 and later) speaks it for a model whose input is a data frame with the columns `image` and `text`.
//!
//! Bodies, by `Content-Type` (`application/json` or `text/csv`, with no parameter but `charset=utf-8`; anything else
//! is 415, as MLflow answers it):
//! - JSON holding exactly one of
//!   - `dataframe_split`: pandas' split orientation, `{"columns": [...], "data": [[...], ...], "index": [...]}`
//!     (what MLflow's client sends for a `DataFrame`; the Azure name `input_data` is taken too),
//!   - `dataframe_records`: pandas' records orientation, `[{"image": ..., "text": ...}, ...]`,
//!   - `instances` or `inputs` (TensorFlow Serving's names): a list of such records, an object of columns
//!     `{"image": [...], "text": [...]}`, or an object of single values `{"image": ..., "text": ...}` for one row,
//!
//!   with optional `"params": {"normalize": true}`;
//! - CSV with a header row naming `image` and/or `text` (an unnamed first column is the index that pandas'
//!   `DataFrame.to_csv()` writes); an empty field is no input, and CSV carries no params (as in MLflow).
//!
//! The answer is `{"predictions": [...]}`, the rows `/score` answers; errors are MLflow's
//! `{"error_code": "BAD_REQUEST", "message": "..."}` with the `reason` of every clipserve error besides.
//!
//! JSON is parsed in one pass by the visitors of [`super::azure`] and the ones here: rows are counted as they are
//! read and parsing stops at the first row past the item limit or text past the character limit; values the
//! request does not use are skipped without being built. CSV is read a record at a time.

use std::borrow::Cow;
use std::fmt;

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Serialize;

use super::azure::{
    bad, finish_frame, normalize_of, others, row_item, text_too_long, too_many_items, Cell, CellSeed, ColumnProblem,
    Ctx, FrameSeed, FrameValue, Params, ParamsSeed, ParseLimits, RowWidth, ScoreRequest,
};
use crate::engine::ItemInput;
use crate::error::{truncate, Error, Kind, Reason};

/// How an `/invocations` body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Media {
    Json,
    Csv,
}

/// What MLflow's client sends.
pub const CONTENT_TYPE_JSON: &str = "application/json";
pub const CONTENT_TYPE_CSV: &str = "text/csv";
const CONTENT_TYPE_PARQUET: &str = "application/vnd.apache.parquet";

/// The encoding of a body from its `Content-Type`, as MLflow's server decides it: `application/json` or
/// `text/csv`, with no parameter but `charset=utf-8` (the older `format=pandas-split` forms are refused, as
/// MLflow 2.0 and later refuse them). An error here is answered with 415.
pub fn media(content_type: Option<&HeaderValue>) -> Result<Media, Error> {
    let expected = format!("send {CONTENT_TYPE_JSON} or {CONTENT_TYPE_CSV}");
    let Some(value) = content_type else {
        return Err(bad(format!("the request has no Content-Type: {expected}")));
    };
    let Ok(value) = value.to_str() else {
        return Err(bad(format!("the Content-Type is not readable: {expected}")));
    };
    let mut parts = value.split(';').map(str::trim);
    let mime = parts.next().unwrap_or_default().to_ascii_lowercase();
    let shown = truncate(value, 128);
    let media = match mime.as_str() {
        CONTENT_TYPE_JSON => Media::Json,
        CONTENT_TYPE_CSV => Media::Csv,
        CONTENT_TYPE_PARQUET => {
            return Err(bad(format!("Parquet bodies are not supported: {expected}")));
        }
        _ => return Err(bad(format!("unsupported Content-Type {shown:?}: {expected}"))),
    };
    let mut unknown = Vec::new();
    for parameter in parts.filter(|p| !p.is_empty()) {
        let (key, value) = parameter.split_once('=').unwrap_or((parameter, ""));
        let (key, value) = (key.trim(), value.trim().trim_matches('"'));
        if key.eq_ignore_ascii_case("charset") {
            if !value.eq_ignore_ascii_case("utf-8") {
                return Err(bad(format!(
                    "unsupported charset {:?}: the scoring server only supports UTF-8",
                    truncate(value, 64)
                )));
            }
        } else {
            unknown.push(truncate(key, 64).into_owned());
        }
    }
    if !unknown.is_empty() {
        return Err(bad(format!(
            "unrecognized Content-Type parameters: {}. Since MLflow 2.0 the input format is named in the body \
             ({{\"dataframe_split\": ...}}, {{\"dataframe_records\": ...}}, {{\"instances\": ...}} or \
             {{\"inputs\": ...}}), not in the Content-Type",
            unknown.join(", ")
        )));
    }
    Ok(media)
}

/// The answer to a scoring call: the rows, in row order.
#[derive(Debug, Serialize)]
pub struct Predictions<R> {
    pub predictions: Vec<R>,
}

/// The MLflow `error_code` of an error. Statuses stay those of clipserve's error table (API.md); the codes are
/// chosen so that MLflow's own table from code to status agrees on what to do: a request that is wrong as a whole
/// is `BAD_REQUEST`, a value in it that cannot be used (image, text, URL, or over a limit) `INVALID_PARAMETER_VALUE`
/// (both 400: do not retry), a full server `RESOURCE_EXHAUSTED` (429), one that cannot serve now
/// `TEMPORARILY_UNAVAILABLE` (503), an expired deadline `DEADLINE_EXCEEDED` (504), a failure `INTERNAL_ERROR` (500).
pub fn error_code(reason: Reason) -> &'static str {
    match reason {
        Reason::MalformedRequest | Reason::RequestTooLarge | Reason::TooManyItems => "BAD_REQUEST",
        other => match other.kind() {
            Kind::InvalidArgument | Kind::TooLarge => "INVALID_PARAMETER_VALUE",
            Kind::Overloaded => "RESOURCE_EXHAUSTED",
            Kind::Unavailable => "TEMPORARILY_UNAVAILABLE",
            Kind::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Kind::Internal => "INTERNAL_ERROR",
            Kind::Unauthenticated => "UNAUTHENTICATED",
            Kind::NotFound => "RESOURCE_DOES_NOT_EXIST",
        },
    }
}

/// An error as `/invocations` answers it: the status of the error table and
/// `{"error_code": ..., "message": ..., "reason": ...}`.
pub fn error_response(e: Error) -> Response {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::json!({
        "error_code": error_code(e.reason()),
        "message": e.message(),
        "reason": e.reason().as_str(),
    });
    (status, Json(body)).into_response()
}

/// The JSON input forms, by key; `input_data` (Azure's name for a split frame) is taken too.
const FORMS: &[&str] = &["dataframe_split", "dataframe_records", "instances", "inputs", "input_data"];
const FORMS_TEXT: &str = r#""dataframe_split", "dataframe_records", "instances" or "inputs""#;
const COLUMNS_TEXT: &str = r#""image" and/or "text""#;

/// Parses a JSON `/invocations` body (its `NaN` tokens are rewritten first, see [`blank_nans`]).
pub fn parse_json(body: &mut [u8], limits: ParseLimits) -> Result<ScoreRequest, Error> {
    parse_json_rows(body, limits, RowWidth::Exact)
}

/// [`parse_json`], with `dataframe_split` rows of the given width.
pub fn parse_json_rows(body: &mut [u8], limits: ParseLimits, rows: RowWidth) -> Result<ScoreRequest, Error> {
    blank_nans(body);
    let ctx = Ctx::new(&[], limits);
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = BodySeed(&ctx).deserialize(&mut de).and_then(|top| de.end().map(|()| top));
    match parsed {
        Ok(top) => finish(top, limits, rows),
        Err(e) => Err(ctx.failed(e)),
    }
}

/// pandas' missing value is `NaN`, which Python's `json` writes and reads but JSON has not: MLflow's client sends
/// it for every missing value of a frame (every `None` of a string column, since pandas 3). Each bare `NaN` outside
/// strings is rewritten in place as `"" ` (an empty string and a space: the same length, and "no input" as null
/// is), in one pass over the body. A body that is not JSON around it stays so, for the parser to refuse.
fn blank_nans(body: &mut [u8]) {
    let mut i = 0;
    loop {
        // Outside strings: the next string or N.
        let Some(at) = memchr::memchr2(b'"', b'N', &body[i..]) else { return };
        i += at;
        if body[i] == b'N' {
            if body[i..].starts_with(b"NaN") {
                body[i..i + 3].copy_from_slice(b"\"\" ");
                i += 3;
            } else {
                i += 1;
            }
            continue;
        }
        // Inside a string: to its closing quote, escaped characters skipped.
        i += 1;
        loop {
            let Some(at) = memchr::memchr2(b'"', b'\\', &body[i..]) else { return };
            i += at;
            if body[i] == b'\\' {
                i = (i + 2).min(body.len());
                continue;
            }
            i += 1;
            break;
        }
    }
}

/// The body as read: only what the request uses. Messages are made in [`finish`], in the order of the checks.
enum Top {
    NotObject,
    Object {
        form: Option<(&'static str, Form)>,
        /// A second input form besides `form`.
        other: Option<&'static str>,
        params: Option<Params>,
        /// The first other keys, to name them when no form is there.
        keys: Vec<String>,
    },
}

enum Form {
    Split(FrameValue),
    Records(Records),
    Tensor(Tensor),
}

enum Records {
    NotList,
    Rows(Vec<Record>),
}

enum Record {
    NotObject,
    Fields { image: Cell, text: Cell, problem: Option<ColumnProblem> },
}

/// `instances` or `inputs`.
enum Tensor {
    Other,
    Records(Vec<Record>),
    Columns { image: Option<Column>, text: Option<Column>, problem: Option<ColumnProblem> },
}

enum Column {
    List(Vec<Cell>),
    One(Cell),
}

/// A column name as written in a message: quoted, cut to 64 bytes.
fn quoted(name: &str) -> String {
    format!("{:?}", truncate(name, 64))
}

/// How many other keys a message names.
const KEYS_SHOWN: usize = 8;

/// The whole body.
struct BodySeed<'c, 'k>(&'c Ctx<'k>);

impl<'de> DeserializeSeed<'de> for BodySeed<'_, '_> {
    type Value = Top;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Top, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for BodySeed<'_, '_> {
    type Value = Top;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    others!('de, Top::NotObject; scalars, null, list);
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Top, A::Error> {
        let (mut form, mut other, mut params, mut keys) = (None::<(&'static str, Form)>, None, None, Vec::new());
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            let Some(&name) = FORMS.iter().find(|f| **f == key) else {
                if key == "params" {
                    params = Some(map.next_value_seed(ParamsSeed)?);
                } else {
                    if keys.len() < KEYS_SHOWN {
                        keys.push(quoted(&key));
                    }
                    map.next_value::<IgnoredAny>()?;
                }
                continue;
            };
            if form.as_ref().is_some_and(|(seen, _)| *seen != name) {
                // Refused in `finish`; only the first form is read.
                other.get_or_insert(name);
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            drop(form.take()); // a repeated key replaces the earlier value: free it before the next one is read
            let ctx = self.0;
            let value = match name {
                "dataframe_split" | "input_data" => Form::Split(map.next_value_seed(FrameSeed(ctx))?),
                "dataframe_records" => Form::Records(map.next_value_seed(RecordsSeed(ctx))?),
                _ => Form::Tensor(map.next_value_seed(TensorSeed(ctx))?),
            };
            form = Some((name, value));
        }
        Ok(Top::Object { form, other, params, keys })
    }
}

/// Rows of records, counted against the item limit as they are read.
fn read_records<'de, A: SeqAccess<'de>>(ctx: &Ctx, mut seq: A) -> Result<Vec<Record>, A::Error> {
    let max = ctx.limits.max_items;
    let mut rows = Vec::new();
    while let Some(row) = seq.next_element_seed(RecordSeed { ctx, row: rows.len() })? {
        if rows.len() == max {
            return Err(ctx.stop(too_many_items(max)));
        }
        rows.push(row);
    }
    Ok(rows)
}

/// `dataframe_records`.
struct RecordsSeed<'c, 'k>(&'c Ctx<'k>);

impl<'de> DeserializeSeed<'de> for RecordsSeed<'_, '_> {
    type Value = Records;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Records, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RecordsSeed<'_, '_> {
    type Value = Records;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of records")
    }
    others!('de, Records::NotList; scalars, null, object);
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Records, A::Error> {
        read_records(self.0, seq).map(Records::Rows)
    }
}

/// One record: `{"image": ..., "text": ...}`.
struct RecordSeed<'c, 'k> {
    ctx: &'c Ctx<'k>,
    row: usize,
}

impl<'de> DeserializeSeed<'de> for RecordSeed<'_, '_> {
    type Value = Record;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Record, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RecordSeed<'_, '_> {
    type Value = Record;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }
    others!('de, Record::NotObject; scalars, null, list);
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Record, A::Error> {
        let (mut image, mut text, mut problem) = (None, None, None);
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            let (slot, is_text) = match &*key {
                "image" => (&mut image, false),
                "text" => (&mut text, true),
                _ => {
                    problem.get_or_insert(ColumnProblem::Unknown(quoted(&key)));
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            let cell = map.next_value_seed(CellSeed { ctx: self.ctx, row: self.row, text: is_text })?;
            if slot.replace(cell).is_some() {
                problem.get_or_insert(ColumnProblem::Twice(quoted(&key)));
            }
        }
        Ok(Record::Fields { image: image.unwrap_or_default(), text: text.unwrap_or_default(), problem })
    }
}

/// `instances` or `inputs`: records, or columns.
struct TensorSeed<'c, 'k>(&'c Ctx<'k>);

impl<'de> DeserializeSeed<'de> for TensorSeed<'_, '_> {
    type Value = Tensor;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Tensor, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TensorSeed<'_, '_> {
    type Value = Tensor;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of records or an object of columns")
    }
    others!('de, Tensor::Other; scalars, null);
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Tensor, A::Error> {
        read_records(self.0, seq).map(Tensor::Records)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Tensor, A::Error> {
        let (mut image, mut text, mut problem) = (None, None, None);
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            let (slot, is_text) = match &*key {
                "image" => (&mut image, false),
                "text" => (&mut text, true),
                _ => {
                    problem.get_or_insert(ColumnProblem::Unknown(quoted(&key)));
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            let column = map.next_value_seed(ColumnSeed { ctx: self.0, text: is_text })?;
            if slot.replace(column).is_some() {
                problem.get_or_insert(ColumnProblem::Twice(quoted(&key)));
            }
        }
        Ok(Tensor::Columns { image, text, problem })
    }
}

/// One column of the columns form: a list of values, counted against the item limit as they are read, or a single
/// value (one row).
struct ColumnSeed<'c, 'k> {
    ctx: &'c Ctx<'k>,
    /// Checked against the text limit.
    text: bool,
}

impl<'de> DeserializeSeed<'de> for ColumnSeed<'_, '_> {
    type Value = Column;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Column, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ColumnSeed<'_, '_> {
    type Value = Column;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of values, or one value")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Column, E> {
        Ok(Column::One(Cell::Other))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Column, E> {
        Ok(Column::One(Cell::Other))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Column, E> {
        Ok(Column::One(Cell::Other))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Column, E> {
        Ok(Column::One(Cell::Other))
    }
    others!('de, Column::One(Cell::Other); object);
    fn visit_unit<E: de::Error>(self) -> Result<Column, E> {
        Ok(Column::One(Cell::Null))
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Column, E> {
        CellSeed { ctx: self.ctx, row: 0, text: self.text }.visit_str(s).map(Column::One)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Column, A::Error> {
        let max = self.ctx.limits.max_items;
        let mut cells = Vec::new();
        while let Some(cell) = seq.next_element_seed(CellSeed { ctx: self.ctx, row: cells.len(), text: self.text })? {
            if cells.len() == max {
                return Err(self.ctx.stop(too_many_items(max)));
            }
            cells.push(cell);
        }
        Ok(Column::List(cells))
    }
}

/// The request, with the first problem found in the order: body, form, params, then the form's own checks.
fn finish(top: Top, limits: ParseLimits, rows: RowWidth) -> Result<ScoreRequest, Error> {
    let Top::Object { form, other, params, keys } = top else {
        return Err(bad(format!("the request body must be a JSON object holding one of {FORMS_TEXT}")));
    };
    let Some((name, form)) = form else {
        let held = if keys.is_empty() { "nothing else".to_string() } else { keys.join(", ") };
        return Err(bad(format!("the request must hold one of {FORMS_TEXT}; it holds {held}")));
    };
    if let Some(other) = other {
        return Err(bad(format!(
            "the request must hold exactly one of {FORMS_TEXT}; it holds both \"{name}\" and \"{other}\""
        )));
    }
    let normalize = normalize_of(params)?;
    let items = match form {
        Form::Split(frame) => finish_frame(name, frame, limits, rows)?,
        Form::Records(Records::NotList) => {
            return Err(bad(format!("{name} must be a list of records {{\"image\": ..., \"text\": ...}}")));
        }
        Form::Records(Records::Rows(rows)) | Form::Tensor(Tensor::Records(rows)) => records(rows, limits)?,
        Form::Tensor(Tensor::Columns { image, text, problem }) => columns(name, image, text, problem, limits)?,
        Form::Tensor(Tensor::Other) => {
            return Err(bad(format!(
                "{name} must be a list of records {{\"image\": ..., \"text\": ...}} or an object of columns \
                 {{\"image\": [...], \"text\": [...]}}"
            )));
        }
    };
    Ok(ScoreRequest { items, normalize })
}

/// The items of a list of records, one per record.
fn records(rows: Vec<Record>, limits: ParseLimits) -> Result<Vec<ItemInput>, Error> {
    let mut items = Vec::with_capacity(rows.len());
    for (r, row) in rows.into_iter().enumerate() {
        let (image, text) = match row {
            Record::NotObject => {
                return Err(bad(format!("row {r}: must be an object with {COLUMNS_TEXT}")));
            }
            Record::Fields { problem: Some(ColumnProblem::Unknown(c)), .. } => {
                return Err(bad(format!("row {r}: unknown column {c}; expected {COLUMNS_TEXT}")));
            }
            Record::Fields { problem: Some(ColumnProblem::Twice(c)), .. } => {
                return Err(bad(format!("row {r}: column {c} appears twice")));
            }
            Record::Fields { image, text, problem: None } => (image, text),
        };
        items.push(row_item(r, r.to_string(), image, text, limits)?);
    }
    Ok(items)
}

/// The items of the columns form: every column a list of the same length, or every column one value (one row).
fn columns(
    name: &str,
    image: Option<Column>,
    text: Option<Column>,
    problem: Option<ColumnProblem>,
    limits: ParseLimits,
) -> Result<Vec<ItemInput>, Error> {
    match problem {
        Some(ColumnProblem::Unknown(c)) => {
            return Err(bad(format!("{name}: unknown column {c}; expected {COLUMNS_TEXT}")));
        }
        Some(ColumnProblem::Twice(c)) => return Err(bad(format!("{name}: column {c} appears twice"))),
        None => {}
    }
    let lists = |column: Option<Column>| match column {
        None => Ok(None),
        Some(Column::List(cells)) => Ok(Some(cells)),
        Some(Column::One(cell)) => Err(cell),
    };
    let (image, text) = match (lists(image), lists(text)) {
        (Ok(None), Ok(None)) => return Err(bad(format!("{name} must name {COLUMNS_TEXT}"))),
        (Ok(image), Ok(text)) => (image, text),
        // Single values: one row.
        (Err(image), Err(text)) => return Ok(vec![row_item(0, "0".into(), image, text, limits)?]),
        (Err(image), Ok(None)) => return Ok(vec![row_item(0, "0".into(), image, Cell::Absent, limits)?]),
        (Ok(None), Err(text)) => return Ok(vec![row_item(0, "0".into(), Cell::Absent, text, limits)?]),
        _ => {
            return Err(bad(format!(
                "{name}: one column is a list and the other a single value; give both as lists of the same length"
            )));
        }
    };
    let rows = match (&image, &text) {
        (Some(i), Some(t)) if i.len() != t.len() => {
            return Err(bad(format!(
                "{name}: the columns differ in length: \"image\" has {} values and \"text\" has {}",
                i.len(),
                t.len()
            )));
        }
        (Some(cells), _) | (None, Some(cells)) => cells.len(),
        (None, None) => 0,
    };
    let mut image = image.map(Vec::into_iter);
    let mut text = text.map(Vec::into_iter);
    let mut items = Vec::with_capacity(rows);
    for r in 0..rows {
        let image = image.as_mut().and_then(Iterator::next).unwrap_or_default();
        let text = text.as_mut().and_then(Iterator::next).unwrap_or_default();
        items.push(row_item(r, r.to_string(), image, text, limits)?);
    }
    Ok(items)
}

/// Parses a CSV `/invocations` body: a header row naming `image` and/or `text` (and, first, an unnamed index
/// column), then one record per row, each with as many fields as the header. Read one record at a time.
pub fn parse_csv(body: &[u8], limits: ParseLimits) -> Result<ScoreRequest, Error> {
    let malformed = |e: csv::Error| bad(format!("malformed CSV: {e}"));
    let mut reader = csv::ReaderBuilder::new().has_headers(false).flexible(true).from_reader(body);
    let mut record = csv::ByteRecord::new();
    if !reader.read_byte_record(&mut record).map_err(malformed)? {
        return Err(bad(format!("the CSV body is empty: it must start with a header row naming {COLUMNS_TEXT}")));
    }
    let (mut index, mut image, mut text) = (None, None, None);
    for (c, field) in record.iter().enumerate() {
        let slot = match field {
            b"image" => &mut image,
            b"text" => &mut text,
            b"" if c == 0 => &mut index,
            _ => {
                let name = quoted(&String::from_utf8_lossy(field));
                return Err(bad(format!("CSV header: unknown column {name}; expected {COLUMNS_TEXT}")));
            }
        };
        if slot.replace(c).is_some() {
            return Err(bad(format!("CSV header: column {:?} appears twice", String::from_utf8_lossy(field))));
        }
    }
    if image.is_none() && text.is_none() {
        return Err(bad(format!("the CSV header row must name {COLUMNS_TEXT}")));
    }
    let width = record.len();
    let max = limits.max_items;
    let mut items = Vec::new();
    while reader.read_byte_record(&mut record).map_err(malformed)? {
        let r = items.len();
        if r == max {
            return Err(too_many_items(max));
        }
        if record.len() != width {
            return Err(bad(format!("row {r}: has {} values for {width} columns", record.len())));
        }
        let field = |column: Option<usize>, name: &str| -> Result<Option<&str>, Error> {
            column
                .map(|c| std::str::from_utf8(&record[c]))
                .transpose()
                .map_err(|_| bad(format!("row {r}: the {name} value is not valid UTF-8")))
        };
        let cell = |value: Option<&str>| value.map_or(Cell::Absent, |s| Cell::Str(s.to_owned()));
        let id = field(index, "index")?.filter(|s| !s.is_empty()).map_or_else(|| r.to_string(), str::to_owned);
        let text = field(text, "text")?;
        // Checked before the text is copied (and again in `row_item`, for every form).
        if let Some(t) = text.filter(|t| t.len() > limits.max_text_chars) {
            let chars = t.chars().count();
            if chars > limits.max_text_chars {
                return Err(text_too_long(r, chars, limits.max_text_chars));
            }
        }
        let (image, text) = (cell(field(image, "image")?), cell(text));
        items.push(row_item(r, id, image, text, limits)?);
    }
    Ok(ScoreRequest { items, normalize: false })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ImageSource;

    fn json(body: &str) -> Result<ScoreRequest, Error> {
        parse_json(&mut body.as_bytes().to_vec(), ParseLimits::NONE)
    }

    fn texts(r: &ScoreRequest) -> Vec<Option<&str>> {
        r.items.iter().map(|i| i.text.as_deref()).collect()
    }

    fn images(r: &ScoreRequest) -> Vec<Option<&str>> {
        r.items
            .iter()
            .map(|i| match &i.image {
                Some(ImageSource::Base64(s) | ImageSource::Url(s)) => Some(s.as_str()),
                Some(ImageSource::Bytes(_)) => Some("<bytes>"),
                None => None,
            })
            .collect()
    }

    fn err(body: &str) -> Error {
        match json(body) {
            Err(e) => e,
            Ok(r) => panic!("expected an error for {body}: {:?}", r.items),
        }
    }

    fn msg(body: &str) -> String {
        let e = err(body);
        assert_eq!(e.reason(), Reason::MalformedRequest, "{e}");
        e.message().into_owned()
    }

    #[test]
    fn every_form_gives_the_same_rows() {
        let want_text = vec![Some("a cat"), None, Some("a dog")];
        let want_image = vec![Some("aGk="), Some("https://example.com/x.png"), None];
        let bodies = [
            r#"{"dataframe_split":{"columns":["image","text"],"index":[0,1,2],
                "data":[["aGk=","a cat"],["https://example.com/x.png",""],[null,"a dog"]]}}"#,
            r#"{"dataframe_records":[{"image":"aGk=","text":"a cat"},{"image":"https://example.com/x.png"},
                {"text":"a dog","image":null}]}"#,
            r#"{"instances":[{"image":"aGk=","text":"a cat"},{"image":"https://example.com/x.png","text":""},
                {"text":"a dog"}]}"#,
            r#"{"instances":{"image":["aGk=","https://example.com/x.png",null],"text":["a cat",null,"a dog"]}}"#,
            r#"{"inputs":{"text":["a cat","","a dog"],"image":["aGk=","https://example.com/x.png",""]}}"#,
            r#"{"inputs":[{"image":"aGk=","text":"a cat"},{"image":"https://example.com/x.png"},{"text":"a dog"}]}"#,
            r#"{"input_data":{"columns":["text","image"],"data":[["a cat","aGk="],["","https://example.com/x.png"],
                ["a dog",""]]}}"#,
        ];
        for body in bodies {
            let r = json(body).unwrap_or_else(|e| panic!("{body}: {e}"));
            assert_eq!(texts(&r), want_text, "{body}");
            assert_eq!(images(&r), want_image, "{body}");
            assert!(matches!(r.items[1].image, Some(ImageSource::Url(_))));
            assert!(!r.normalize);
        }
    }

    #[test]
    fn params_single_values_and_empty_inputs() {
        let r = json(r#"{"params":{"normalize":true},"inputs":{"text":"a cat"}}"#).unwrap();
        assert_eq!(texts(&r), vec![Some("a cat")]);
        assert!(r.normalize);
        let r = json(r#"{"instances":{"image":"aGk=","text":"t"},"params":{"normalize":false,"other":[1]}}"#).unwrap();
        assert_eq!((texts(&r), images(&r)), (vec![Some("t")], vec![Some("aGk=")]));
        assert!(!r.normalize);
        assert!(json(r#"{"dataframe_records":[]}"#).unwrap().items.is_empty());
        assert!(json(r#"{"inputs":{"text":[]}}"#).unwrap().items.is_empty());
        // Keys that are no form are ignored, as MLflow does.
        let r = json(r#"{"model":"x","dataframe_records":[{"text":"a"}],"extra":{"deep":[[1]]}}"#).unwrap();
        assert_eq!(texts(&r), vec![Some("a")]);
        // A repeated form key: the last one wins, as in Python's json.
        let r = json(r#"{"inputs":{"text":["a"]},"inputs":{"text":["b"]}}"#).unwrap();
        assert_eq!(texts(&r), vec![Some("b")]);
    }

    #[test]
    fn malformed_bodies_name_what_is_wrong() {
        assert!(msg("[]").contains("JSON object"));
        assert!(msg("{").contains("malformed JSON"));
        let none = msg(r#"{"data":[],"columns":["text"]}"#);
        assert!(none.contains("one of \"dataframe_split\"") && none.contains("\"data\", \"columns\""), "{none}");
        assert!(msg("{}").contains("holds nothing else"));
        let two = msg(r#"{"inputs":{"text":["a"]},"instances":[{"text":"b"}]}"#);
        assert!(two.contains("exactly one") && two.contains("\"inputs\" and \"instances\""), "{two}");
        assert!(msg(r#"{"dataframe_records":{"text":["a"]}}"#).contains("dataframe_records must be a list"));
        assert!(msg(r#"{"inputs":"a cat"}"#).contains("inputs must be a list of records"));
        assert!(msg(r#"{"instances":null}"#).contains("instances must be"));
        assert!(msg(r#"{"dataframe_records":[{"text":"a"},["b"]]}"#).starts_with("row 1: must be an object"));
        assert!(msg(r#"{"inputs":["a cat"]}"#).starts_with("row 0: must be an object"));
        let unknown = msg(r#"{"dataframe_records":[{"text":"a","caption":"b"}]}"#);
        assert_eq!(unknown, r#"row 0: unknown column "caption"; expected "image" and/or "text""#);
        assert!(msg(r#"{"dataframe_records":[{"text":"a","text":"b"}]}"#).contains("appears twice"));
        assert!(msg(r#"{"dataframe_records":[{"text":5}]}"#).starts_with("row 0: the text value must be a string"));
        assert!(msg(r#"{"inputs":{"picture":["a"]}}"#).contains("inputs: unknown column \"picture\""));
        assert!(msg(r#"{"inputs":{"text":["a"],"text":["b"]}}"#).contains("appears twice"));
        assert!(msg(r#"{"inputs":{}}"#).contains("inputs must name"));
        let ragged = msg(r#"{"inputs":{"text":["a","b"],"image":["aGk="]}}"#);
        assert!(ragged.contains("\"image\" has 1 values and \"text\" has 2"), "{ragged}");
        assert!(msg(r#"{"inputs":{"text":["a","b"],"image":"aGk="}}"#).contains("single value"));
        assert!(msg(r#"{"inputs":{"text":["a",[1]]}}"#).starts_with("row 1: the text value must be a string"));
        assert!(msg(r#"{"inputs":{"text":7}}"#).starts_with("row 0: the text value must be a string"));
        assert!(msg(r#"{"dataframe_split":{"columns":["text"],"data":[["a"]]},"params":5}"#).contains("params"));
        assert!(msg(r#"{"dataframe_split":{"columns":["text"]}}"#).contains("dataframe_split.data is missing"));
        // A syntax error anywhere wins over a problem found before it.
        assert!(msg(r#"{"inputs":{},"instances":[] "#).contains("malformed JSON"));
        // Deep nesting where nothing is built is skipped without recursion.
        let deep = format!(r#"{{"x":{}{}, "inputs":{{"text":["a"]}}}}"#, "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(texts(&json(&deep).unwrap()), vec![Some("a")]);
    }

    #[test]
    fn limits_stop_every_form_where_they_are_passed() {
        let limits = ParseLimits { max_items: 3, max_text_chars: 4 };
        let parse = |body: &str| parse_json(&mut body.as_bytes().to_vec(), limits);
        let over = |body: &str| parse(body).unwrap_err();
        // Row four breaks off into garbage: the limit is found first.
        for body in [
            r#"{"dataframe_records":[{"text":"a"},{"text":"a"},{"text":"a"},{"text":"a"} garbage"#,
            r#"{"instances":[{"text":"a"},{"text":"a"},{"text":"a"},{"text":"a"} garbage"#,
            r#"{"inputs":{"image":["","","","" garbage"#,
        ] {
            let e = over(body);
            assert_eq!(e.reason(), Reason::TooManyItems, "{body}: {e}");
            assert!(e.message().contains("limit of 3 items"), "{e}");
        }
        assert_eq!(parse(r#"{"inputs":{"text":["a","b","c"]}}"#).unwrap().items.len(), 3);
        for body in [
            r#"{"dataframe_records":[{"text":"ok"},{"image":"aGVsbG8gd29ybGQ=","text":"ééééé"}] garbage"#,
            r#"{"inputs":{"text":["ok","ééééé"] garbage"#,
            r#"{"inputs":{"text":"ééééé"} garbage"#,
        ] {
            let e = over(body);
            assert_eq!(e.reason(), Reason::TextTooLong, "{body}: {e}");
            assert!(e.message().contains("text of 5 characters exceeds the limit of 4"), "{e}");
        }
        assert!(parse(r#"{"inputs":{"text":["éééé"],"image":["long image cell"]}}"#).is_ok());
    }

    #[test]
    fn nan_is_a_missing_value() {
        // What MLflow's client sends for a frame with missing values (pandas' to_dict, then Python's json).
        let body =
            r#"{"dataframe_split":{"index":[0,1],"columns":["image","text"],"data":[[NaN,"NaN"],["aGk=",NaN]]}}"#;
        let r = json(body).unwrap();
        assert_eq!((texts(&r), images(&r)), (vec![Some("NaN"), None], vec![None, Some("aGk=")]));
        let r =
            json(r#"{"dataframe_records":[{"image":NaN,"text":"a \"NaN\" \\"},{"text":NaN,"image":"aGk="}]}"#).unwrap();
        assert_eq!((texts(&r), images(&r)), (vec![Some(r#"a "NaN" \"#), None], vec![None, Some("aGk=")]));
        let r = json(r#"{"inputs":{"text":["NaN",NaN],"image":[NaN,"aGk="]}}"#).unwrap();
        assert_eq!((texts(&r), images(&r)), (vec![Some("NaN"), None], vec![None, Some("aGk=")]));
        // Other tokens JSON has not stay malformed; a body cut inside a string or after a backslash is no trouble.
        for body in [r#"{"inputs":{"text":[Infinity]}}"#, r#"{"inputs":{"text":[Nan]}}"#, r#"{"inputs":"\"#, "{\"", "N"]
        {
            assert!(msg(body).contains("malformed JSON"), "{body}");
        }
    }

    fn csv(body: &str) -> Result<ScoreRequest, Error> {
        parse_csv(body.as_bytes(), ParseLimits::NONE)
    }

    #[test]
    fn csv_bodies() {
        // What pandas' to_csv() writes: an unnamed index column first, quoted fields where needed.
        let r = csv("\u{feff},image,text\r\n0,aGk=,\"a cat, sitting\"\r\n1,https://example.com/x.png,\n2,,\"a \"\"dog\"\"\nbarking\"\n\n")
            .unwrap();
        assert_eq!(texts(&r), vec![Some("a cat, sitting"), None, Some("a \"dog\"\nbarking")]);
        assert_eq!(images(&r), vec![Some("aGk="), Some("https://example.com/x.png"), None]);
        assert_eq!(r.items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["0", "1", "2"]);
        assert!(!r.normalize);
        let r = csv("text\na\nb").unwrap();
        assert_eq!(texts(&r), vec![Some("a"), Some("b")]);
        assert!(csv("text,image\n").unwrap().items.is_empty());

        let e = |body: &str| csv(body).unwrap_err().message().into_owned();
        assert!(e("").contains("empty"));
        assert!(e("image,caption\n").contains("unknown column \"caption\""));
        assert!(e("text,,image\n").contains("unknown column \"\""));
        assert!(e("text,text\n").contains("appears twice"));
        assert!(e("\"\"\n0\n").contains("must name"));
        assert!(e(",\n").contains("unknown column \"\""));
        assert_eq!(e("image,text\naGk=,a\naGk=\n"), "row 1: has 1 values for 2 columns");
        let bad_utf8 = parse_csv(b"text\na\xffb\n", ParseLimits::NONE).unwrap_err();
        assert_eq!(bad_utf8.message(), "row 0: the text value is not valid UTF-8");

        let limits = ParseLimits { max_items: 2, max_text_chars: 4 };
        let e = parse_csv(b"text\na\nb\nc\n", limits).unwrap_err();
        assert_eq!(e.reason(), Reason::TooManyItems);
        assert_eq!(parse_csv(b"text\na\nb\n", limits).unwrap().items.len(), 2);
        let e = parse_csv("image,text\n,ok\nlong image,ééééé\n".as_bytes(), limits).unwrap_err();
        assert_eq!(e.message(), "row 1: text: text of 5 characters exceeds the limit of 4");
    }

    #[test]
    fn content_types_as_mlflow_takes_them() {
        let media = |v: Option<&str>| super::media(v.map(|v| HeaderValue::from_str(v).unwrap()).as_ref());
        assert_eq!(media(Some("application/json")).unwrap(), Media::Json);
        assert_eq!(media(Some("application/json; charset=utf-8")).unwrap(), Media::Json);
        assert_eq!(media(Some("Application/JSON;charset=\"UTF-8\"")).unwrap(), Media::Json);
        assert_eq!(media(Some("text/csv")).unwrap(), Media::Csv);
        assert_eq!(media(Some("text/csv; charset=utf-8")).unwrap(), Media::Csv);
        let refused = |v: Option<&str>| media(v).unwrap_err().message().into_owned();
        assert!(refused(Some("application/json; format=pandas-split")).contains("parameters: format"));
        assert!(refused(Some("application/json; charset=latin-1")).contains("only supports UTF-8"));
        assert!(refused(Some("application/x-www-form-urlencoded")).contains("unsupported Content-Type"));
        assert!(refused(Some("application/vnd.apache.parquet")).contains("Parquet"));
        assert!(refused(None).contains("no Content-Type"));
    }

    #[test]
    fn error_codes() {
        let cases = [
            (Reason::MalformedRequest, "BAD_REQUEST"),
            (Reason::RequestTooLarge, "BAD_REQUEST"),
            (Reason::TooManyItems, "BAD_REQUEST"),
            (Reason::InvalidImage, "INVALID_PARAMETER_VALUE"),
            (Reason::EmptyItem, "INVALID_PARAMETER_VALUE"),
            (Reason::TextTooLong, "INVALID_PARAMETER_VALUE"),
            (Reason::QueueFull, "RESOURCE_EXHAUSTED"),
            (Reason::NotReady, "TEMPORARILY_UNAVAILABLE"),
            (Reason::DeadlineExceeded, "DEADLINE_EXCEEDED"),
            (Reason::ModelFailure, "INTERNAL_ERROR"),
            (Reason::Unauthenticated, "UNAUTHENTICATED"),
        ];
        for (reason, code) in cases {
            assert_eq!(error_code(reason), code, "{reason:?}");
        }
    }
}
