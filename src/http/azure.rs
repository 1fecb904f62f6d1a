//! The Azure ML `input_data` request (`POST /score`), and the data frame in pandas' split orientation that it shares
//! with MLflow's `dataframe_split` (the other MLflow forms are in [`super::mlflow`], built on the visitors here).
//!
//! ```json
//! {"input_data": {"columns": ["image", "text"], "index": [0, 1], "data": [["<url or base64>", "a caption"], ...]},
//!  "params": {"normalize": false}}
//! ```
//! Columns come in either order (or just one of them), `index` is optional, an empty string (or null) means "no
//! input" for that cell. The answer is a JSON list with one object per row, in row order, holding only the keys the
//! row asked for: `image_features`, `text_features`, or both.
//!
//! The body is parsed in one pass by visitors that keep only what the request needs: rows are counted as they are
//! read and parsing stops at the first row past the item limit, or at the first text cell past the character limit
//! (when the columns come before the data, as every client writes them). Values the request does not use are
//! skipped without being built, so the memory a body costs stays close to the inputs it carries.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::engine::{ImageSource, ItemInput, ItemOutput};
use crate::error::{truncate, Error, Reason};
use crate::inputs::fetch::is_http_url;

/// A parsed request: one item per row, in row order.
#[derive(Debug)]
pub struct ScoreRequest {
    pub items: Vec<ItemInput>,
    pub normalize: bool,
}

/// One row of the answer.
#[derive(Debug, Serialize)]
pub struct ScoreRow {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_features: Option<Vec<f32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_features: Option<Vec<f32>>,
}

impl From<ItemOutput> for ScoreRow {
    fn from(o: ItemOutput) -> Self {
        ScoreRow { image_features: o.image_features, text_features: o.text_features }
    }
}

/// One row of the zero-shot answer (`--azure-task zero-shot-image-classification`): the probability of each label,
/// and the labels, in the order the first row's text gave them.
#[derive(Debug, Serialize)]
pub struct ZeroShotRow {
    pub probs: Vec<f32>,
    pub labels: Labels,
}

/// The labels of a zero-shot answer, shared by its rows.
#[derive(Debug, Clone)]
pub struct Labels(pub std::sync::Arc<[String]>);

impl Serialize for Labels {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.as_ref().serialize(serializer)
    }
}

/// One row of the answer of either flavour.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum AnswerRow {
    Embeddings(ScoreRow),
    ZeroShot(ZeroShotRow),
}

/// Limits checked while a body is parsed (413 past them).
#[derive(Debug, Clone, Copy)]
pub struct ParseLimits {
    /// Most rows in one request (`--max-items-per-request`).
    pub max_items: usize,
    /// Longest text cell, in characters (`--max-text-chars`).
    pub max_text_chars: usize,
}

impl ParseLimits {
    /// No limits (tools and fuzzing).
    pub const NONE: ParseLimits = ParseLimits { max_items: usize::MAX, max_text_chars: usize::MAX };
}

pub(super) fn bad(msg: impl Into<String>) -> Error {
    Error::new(Reason::MalformedRequest, msg)
}

pub(super) fn too_many_items(max: usize) -> Error {
    Error::new(Reason::TooManyItems, format!("request exceeds the limit of {max} items per request"))
}

pub(super) fn text_too_long(row: usize, chars: usize, max: usize) -> Error {
    Error::new(Reason::TextTooLong, format!("row {row}: text: text of {chars} characters exceeds the limit of {max}"))
}

/// Parses a `/score` body; `frame_keys` are the accepted names of the data frame object, the first present one
/// wins.
pub fn parse(body: &[u8], frame_keys: &[&str], limits: ParseLimits) -> Result<ScoreRequest, Error> {
    parse_rows(body, frame_keys, limits, RowWidth::Exact)
}

/// How many values a row may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowWidth {
    /// One per column.
    Exact,
    /// At most one per column, the missing ones at the end counting as null: pandas' reading of a split frame, on
    /// which the Azure zero-shot endpoint's own sample request relies (`[image]` rows under `["image", "text"]`).
    AtMost,
}

/// [`parse`], with rows of the given width.
pub fn parse_rows(
    body: &[u8],
    frame_keys: &[&str],
    limits: ParseLimits,
    rows: RowWidth,
) -> Result<ScoreRequest, Error> {
    let ctx = Ctx::new(frame_keys, limits);
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = BodySeed(&ctx).deserialize(&mut de).and_then(|top| de.end().map(|()| top));
    match parsed {
        Ok(top) => finish(top, frame_keys, limits, rows),
        Err(e) => Err(ctx.failed(e)),
    }
}

/// What the visitors share: the limits, and the error that stopped parsing early.
pub(super) struct Ctx<'k> {
    keys: &'k [&'k str],
    pub(super) limits: ParseLimits,
    stop: RefCell<Option<Error>>,
}

impl<'k> Ctx<'k> {
    /// A context for a body whose frame object may have one of the names `keys`.
    pub(super) fn new(keys: &'k [&'k str], limits: ParseLimits) -> Self {
        Ctx { keys, limits, stop: RefCell::new(None) }
    }

    /// Stops parsing: `error` is what the request is answered with.
    pub(super) fn stop<E: de::Error>(&self, error: Error) -> E {
        let msg = error.to_string();
        *self.stop.borrow_mut() = Some(error);
        E::custom(msg)
    }

    /// The answer to a parse that failed with `e`: the error that stopped it, or malformed JSON.
    pub(super) fn failed(&self, e: serde_json::Error) -> Error {
        self.stop.take().unwrap_or_else(|| bad(format!("malformed JSON: {e}")))
    }
}

/// The body as read: only what the request uses. Messages are made in [`finish`], in the order of the checks.
enum Top {
    NotObject,
    Object { frame: Option<(usize, FrameValue)>, params: Option<Params> },
}

pub(super) enum FrameValue {
    NotObject,
    Object(Frame),
}

#[derive(Default)]
pub(super) struct Frame {
    columns: Option<Columns>,
    data: Option<Data>,
    index: Option<Index>,
}

enum Columns {
    NotList,
    /// The positions of the two columns, how many entries there were, and the first bad entry (as written).
    List {
        image: Option<usize>,
        text: Option<usize>,
        len: usize,
        problem: Option<ColumnProblem>,
    },
}

pub(super) enum ColumnProblem {
    Unknown(String),
    Twice(String),
}

enum Data {
    NotList,
    Rows(Vec<Row>),
}

enum Row {
    NotList,
    /// The number of values, and the first two (a row can only be valid with one or two).
    Cells(usize, [Cell; 2]),
}

/// One value of a row, as read.
#[derive(Default)]
pub(super) enum Cell {
    #[default]
    Absent,
    Null,
    Str(String),
    Other,
}

enum Index {
    Null,
    NotList,
    /// The ids of the first entries (as many as there may be rows), and the number of entries.
    List(Vec<String>, usize),
}

pub(super) enum Params {
    Null,
    NotObject,
    Object(Normalize),
}

pub(super) enum Normalize {
    Absent,
    Null,
    Bool(bool),
    Other,
}

/// Visitor methods answering `$out` for the JSON values a visitor does not expect (lists and objects are skipped
/// without being built).
macro_rules! others {
    ($de:lifetime, $out:expr; $($kind:ident),*) => { $( others!(@$kind $de, $out); )* };
    (@scalars $de:lifetime, $out:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> { Ok($out) }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> { Ok($out) }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> { Ok($out) }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> { Ok($out) }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> { Ok($out) }
    };
    (@null $de:lifetime, $out:expr) => {
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> { Ok($out) }
    };
    (@list $de:lifetime, $out:expr) => {
        fn visit_seq<A: SeqAccess<$de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok($out)
        }
    };
    (@object $de:lifetime, $out:expr) => {
        fn visit_map<A: MapAccess<$de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok($out)
        }
    };
}
pub(super) use others;

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
        let (mut frame, mut params) = (None::<(usize, FrameValue)>, None);
        while let Some(key) = map.next_key_seed(KeySeed(self.0.keys))? {
            match key {
                // The first of the frame keys wins; a repeated key replaces the earlier value.
                Key::Frame(i) if frame.as_ref().is_none_or(|(j, _)| i <= *j) => {
                    drop(frame.take()); // free a frame being replaced before the next one is read
                    frame = Some((i, map.next_value_seed(FrameSeed(self.0))?));
                }
                Key::Params => params = Some(map.next_value_seed(ParamsSeed)?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Top::Object { frame, params })
    }
}

enum Key {
    Frame(usize),
    Params,
    Other,
}

/// A key of the body object.
struct KeySeed<'k>(&'k [&'k str]);

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Key;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Key, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = Key;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E: de::Error>(self, key: &str) -> Result<Key, E> {
        Ok(match self.0.iter().position(|k| *k == key) {
            Some(i) => Key::Frame(i),
            None if key == "params" => Key::Params,
            None => Key::Other,
        })
    }
}

/// `params`: only `normalize` is read.
pub(super) struct ParamsSeed;

impl<'de> DeserializeSeed<'de> for ParamsSeed {
    type Value = Params;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Params, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ParamsSeed {
    type Value = Params;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }
    others!('de, Params::NotObject; scalars, list);
    fn visit_unit<E: de::Error>(self) -> Result<Params, E> {
        Ok(Params::Null)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Params, A::Error> {
        let mut normalize = Normalize::Absent;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == "normalize" {
                let value: &RawValue = map.next_value()?;
                normalize = match value.get() {
                    "true" => Normalize::Bool(true),
                    "false" => Normalize::Bool(false),
                    "null" => Normalize::Null,
                    _ => Normalize::Other,
                };
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(Params::Object(normalize))
    }
}

/// The data frame object (`input_data` or `dataframe_split`).
pub(super) struct FrameSeed<'c, 'k>(pub(super) &'c Ctx<'k>);

impl<'de> DeserializeSeed<'de> for FrameSeed<'_, '_> {
    type Value = FrameValue;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<FrameValue, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for FrameSeed<'_, '_> {
    type Value = FrameValue;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }
    others!('de, FrameValue::NotObject; scalars, null, list);
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FrameValue, A::Error> {
        let mut frame = Frame::default();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match &*key {
                "columns" => frame.columns = Some(map.next_value_seed(ColumnsSeed)?),
                "data" => {
                    // With the columns known, a text cell over the limit stops parsing at once.
                    let text = match &frame.columns {
                        Some(Columns::List { text, len, problem: None, .. }) if *len > 0 => *text,
                        _ => None,
                    };
                    drop(frame.data.take());
                    frame.data = Some(map.next_value_seed(DataSeed { ctx: self.0, text })?);
                }
                "index" => {
                    drop(frame.index.take());
                    frame.index = Some(map.next_value_seed(IndexSeed(self.0.limits.max_items))?);
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(FrameValue::Object(frame))
    }
}

/// `columns`: where the image and text columns are.
struct ColumnsSeed;

impl<'de> DeserializeSeed<'de> for ColumnsSeed {
    type Value = Columns;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Columns, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ColumnsSeed {
    type Value = Columns;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list")
    }
    others!('de, Columns::NotList; scalars, null, object);
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Columns, A::Error> {
        let (mut image, mut text, mut len, mut problem) = (None, None, 0, None);
        while let Some(raw) = seq.next_element::<&RawValue>()? {
            len += 1;
            if problem.is_some() {
                continue;
            }
            // Column names are short: anything longer is unknown without being decoded.
            let name = match raw.get() {
                r if r.len() <= 16 => serde_json::from_str::<String>(r).ok(),
                _ => None,
            };
            let slot = match name.as_deref() {
                Some("image") => &mut image,
                Some("text") => &mut text,
                _ => {
                    problem = Some(ColumnProblem::Unknown(truncate(raw.get(), 64).into_owned()));
                    continue;
                }
            };
            if slot.replace(len - 1).is_some() {
                problem = Some(ColumnProblem::Twice(truncate(raw.get(), 64).into_owned()));
            }
        }
        Ok(Columns::List { image, text, len, problem })
    }
}

/// `data`: the rows, counted against the item limit as they are read.
struct DataSeed<'c, 'k> {
    ctx: &'c Ctx<'k>,
    /// The text column, when the columns are already known.
    text: Option<usize>,
}

impl<'de> DeserializeSeed<'de> for DataSeed<'_, '_> {
    type Value = Data;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Data, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for DataSeed<'_, '_> {
    type Value = Data;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of rows")
    }
    others!('de, Data::NotList; scalars, null, object);
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Data, A::Error> {
        let max = self.ctx.limits.max_items;
        let mut rows = Vec::new();
        while let Some(row) = seq.next_element_seed(RowSeed { ctx: self.ctx, row: rows.len(), text: self.text })? {
            if rows.len() == max {
                return Err(self.ctx.stop(too_many_items(max)));
            }
            rows.push(row);
        }
        Ok(Data::Rows(rows))
    }
}

/// One row: its first two values are kept, the rest only counted.
struct RowSeed<'c, 'k> {
    ctx: &'c Ctx<'k>,
    row: usize,
    text: Option<usize>,
}

impl<'de> DeserializeSeed<'de> for RowSeed<'_, '_> {
    type Value = Row;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Row, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RowSeed<'_, '_> {
    type Value = Row;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of values")
    }
    others!('de, Row::NotList; scalars, null, object);
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Row, A::Error> {
        let mut cells: [Cell; 2] = Default::default();
        let mut len = 0;
        loop {
            let more = match cells.get_mut(len) {
                Some(slot) => {
                    let seed = CellSeed { ctx: self.ctx, row: self.row, text: self.text == Some(len) };
                    seq.next_element_seed(seed)?.map(|cell| *slot = cell).is_some()
                }
                None => seq.next_element::<IgnoredAny>()?.is_some(),
            };
            if !more {
                return Ok(Row::Cells(len, cells));
            }
            len += 1;
        }
    }
}

/// One value of a row.
pub(super) struct CellSeed<'c, 'k> {
    pub(super) ctx: &'c Ctx<'k>,
    pub(super) row: usize,
    /// Checked against the text limit.
    pub(super) text: bool,
}

impl<'de> DeserializeSeed<'de> for CellSeed<'_, '_> {
    type Value = Cell;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Cell, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for CellSeed<'_, '_> {
    type Value = Cell;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Cell, E> {
        Ok(Cell::Other)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Cell, E> {
        Ok(Cell::Other)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Cell, E> {
        Ok(Cell::Other)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Cell, E> {
        Ok(Cell::Other)
    }
    others!('de, Cell::Other; list, object);
    fn visit_unit<E: de::Error>(self) -> Result<Cell, E> {
        Ok(Cell::Null)
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Cell, E> {
        let max = self.ctx.limits.max_text_chars;
        if self.text && s.len() > max {
            let chars = s.chars().count();
            if chars > max {
                return Err(self.ctx.stop(text_too_long(self.row, chars, max)));
            }
        }
        Ok(Cell::Str(s.to_owned()))
    }
}

/// `index`: the ids of the rows.
struct IndexSeed(usize);

impl<'de> DeserializeSeed<'de> for IndexSeed {
    type Value = Index;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Index, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for IndexSeed {
    type Value = Index;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list")
    }
    others!('de, Index::NotList; scalars, object);
    fn visit_unit<E: de::Error>(self) -> Result<Index, E> {
        Ok(Index::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Index, A::Error> {
        // Past the item limit the entries are only counted: the request fails either way.
        let mut ids = Vec::new();
        let mut len = 0;
        loop {
            let more = if ids.len() < self.0 {
                seq.next_element::<&RawValue>()?.map(|raw| ids.push(id_of(raw))).is_some()
            } else {
                seq.next_element::<IgnoredAny>()?.is_some()
            };
            if !more {
                return Ok(Index::List(ids, len));
            }
            len += 1;
        }
    }
}

/// The id an index entry gives its row: a string as it is, any other value as compact JSON.
fn id_of(raw: &RawValue) -> String {
    let text = raw.get();
    if text.starts_with('"') {
        if let Ok(s) = serde_json::from_str::<String>(text) {
            return s;
        }
    }
    // Ids are short (the engine refuses long ones); a long entry is not worth rebuilding.
    if text.len() <= 4096 {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(text) {
            return v.to_string();
        }
    }
    text.to_string()
}

/// The request, with the first problem found in the order: body, frame, params, columns, data, index, rows.
fn finish(top: Top, keys: &[&str], limits: ParseLimits, row_width: RowWidth) -> Result<ScoreRequest, Error> {
    let Top::Object { frame, params } = top else {
        return Err(bad("the request body must be a JSON object"));
    };
    let Some((k, frame)) = frame else {
        return Err(bad(format!("the request must hold {:?}", keys.join("\" or \""))));
    };
    let normalize = normalize_of(params)?;
    let items = finish_frame(keys[k], frame, limits, row_width)?;
    Ok(ScoreRequest { items, normalize })
}

/// `params.normalize`: false unless it is `true`.
pub(super) fn normalize_of(params: Option<Params>) -> Result<bool, Error> {
    match params {
        None | Some(Params::Null) => Ok(false),
        Some(Params::Object(Normalize::Absent | Normalize::Null)) => Ok(false),
        Some(Params::Object(Normalize::Bool(b))) => Ok(b),
        Some(Params::Object(Normalize::Other)) => Err(bad("params.normalize must be true or false")),
        Some(Params::NotObject) => Err(bad("params must be an object")),
    }
}

/// The items of the frame object named `key`, with the first problem found in the order: columns, data, index,
/// rows.
pub(super) fn finish_frame(
    key: &str,
    frame: FrameValue,
    limits: ParseLimits,
    row_width: RowWidth,
) -> Result<Vec<ItemInput>, Error> {
    let FrameValue::Object(frame) = frame else {
        return Err(bad(format!("{key} must be an object")));
    };
    let (image_col, text_col, width) = match frame.columns {
        None => return Err(bad(format!("{key}.columns is missing"))),
        Some(Columns::NotList) => return Err(bad(format!("{key}.columns must be a list"))),
        Some(Columns::List { problem: Some(ColumnProblem::Unknown(c)), .. }) => {
            return Err(bad(format!("{key}.columns: unknown column {c}; expected \"image\" and/or \"text\"")));
        }
        Some(Columns::List { problem: Some(ColumnProblem::Twice(c)), .. }) => {
            return Err(bad(format!("{key}.columns: column {c} appears twice")));
        }
        Some(Columns::List { len: 0, .. }) => {
            return Err(bad(format!("{key}.columns must name \"image\" and/or \"text\"")));
        }
        Some(Columns::List { image, text, len, problem: None }) => (image, text, len),
    };
    let rows = match frame.data {
        None => return Err(bad(format!("{key}.data is missing"))),
        Some(Data::NotList) => return Err(bad(format!("{key}.data must be a list of rows"))),
        Some(Data::Rows(rows)) => rows,
    };
    let mut ids = match frame.index {
        None | Some(Index::Null) => None,
        Some(Index::List(ids, len)) if len == rows.len() => Some(ids.into_iter()),
        Some(Index::List(_, len)) => {
            return Err(bad(format!("{key}.index has {len} entries for {} rows", rows.len())));
        }
        Some(Index::NotList) => return Err(bad(format!("{key}.index must be a list"))),
    };
    let mut items = Vec::with_capacity(rows.len());
    for (r, row) in rows.into_iter().enumerate() {
        let Row::Cells(len, mut cells) = row else {
            return Err(bad(format!("row {r}: must be a list of values")));
        };
        if len > width || (len < width && row_width == RowWidth::Exact) {
            return Err(bad(format!("row {r}: has {len} values for {width} columns")));
        }
        let mut take = |col: Option<usize>| col.map(|c| std::mem::take(&mut cells[c])).unwrap_or_default();
        let (image, text) = (take(image_col), take(text_col));
        let id = match ids.as_mut().and_then(Iterator::next) {
            Some(id) => id,
            None => r.to_string(),
        };
        items.push(row_item(r, id, image, text, limits)?);
    }
    Ok(items)
}

/// The item of row `r` from its image and text cells: an empty string or null is no input, anything but a string
/// is refused.
pub(super) fn row_item(r: usize, id: String, image: Cell, text: Cell, limits: ParseLimits) -> Result<ItemInput, Error> {
    let cell = |cell: Cell, name: &str| -> Result<Option<String>, Error> {
        match cell {
            Cell::Absent | Cell::Null => Ok(None),
            Cell::Str(s) if s.is_empty() => Ok(None),
            Cell::Str(s) => Ok(Some(s)),
            Cell::Other => Err(bad(format!("row {r}: the {name} value must be a string"))),
        }
    };
    let image =
        cell(image, "image")?.map(|s| if is_http_url(&s) { ImageSource::Url(s) } else { ImageSource::Base64(s) });
    let text = cell(text, "text")?;
    if let Some(t) = &text {
        let max = limits.max_text_chars;
        if t.len() > max && t.chars().count() > max {
            return Err(text_too_long(r, t.chars().count(), max));
        }
    }
    Ok(ItemInput { id, image, text })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;

    const KEYS: &[&str] = &["input_data"];

    fn parse(body: &[u8], keys: &[&str]) -> Result<ScoreRequest, Error> {
        super::parse(body, keys, ParseLimits::NONE)
    }

    fn err(body: &str) -> String {
        match parse(body.as_bytes(), KEYS) {
            Err(e) if e.kind() == Kind::InvalidArgument => e.message().into_owned(),
            other => panic!("expected a 400 for {body}: {other:?}"),
        }
    }

    #[test]
    fn the_three_azure_samples() {
        let both = r#"{"input_data":{"columns":["image","text"],"index":[0,1],
            "data":[["aGVsbG8=","sample text 1"],["https://example.com/b.png","sample text 2"]]}}"#;
        let r = parse(both.as_bytes(), KEYS).unwrap();
        assert_eq!(r.items.len(), 2);
        assert!(matches!(&r.items[0].image, Some(ImageSource::Base64(s)) if s == "aGVsbG8="));
        assert!(matches!(&r.items[1].image, Some(ImageSource::Url(_))));
        assert_eq!(r.items[1].text.as_deref(), Some("sample text 2"));
        assert!(!r.normalize);

        let text_only = r#"{"input_data":{"columns":["image","text"],"index":[0,1],"data":[["","a"],["","b"]]},
            "params":{"normalize":true}}"#;
        let r = parse(text_only.as_bytes(), KEYS).unwrap();
        assert!(r.items.iter().all(|i| i.image.is_none() && i.text.is_some()));
        assert!(r.normalize);

        // Columns in the other order, no index, one column only.
        let r = parse(br#"{"input_data":{"columns":["text","image"],"data":[["t","aGk="]]}}"#, KEYS).unwrap();
        assert_eq!(r.items[0].text.as_deref(), Some("t"));
        assert!(r.items[0].image.is_some());
        assert_eq!(r.items[0].id, "0");
        let r = parse(br#"{"input_data":{"columns":["text"],"data":[["only text"]]}}"#, KEYS).unwrap();
        assert!(r.items[0].image.is_none());
    }

    #[test]
    fn keys_in_any_order_ids_nulls_and_both_frame_names() {
        // Data before columns, index last, ids from strings and numbers, null and empty cells, escapes.
        let body = br#"{"params":{"other":1,"normalize":false},"input_data":{"data":[[null,"a\"b"],["aGk=",""]],
            "extra":{"x":[1,2]},"columns":["image","text"],"index":["first",7.5]}}"#;
        let r = parse(body, KEYS).unwrap();
        assert_eq!(r.items.len(), 2);
        assert_eq!((r.items[0].id.as_str(), r.items[1].id.as_str()), ("first", "7.5"));
        assert!(r.items[0].image.is_none() && r.items[0].text.as_deref() == Some("a\"b"));
        assert!(r.items[1].image.is_some() && r.items[1].text.is_none());
        // Both frame names on both routes; the first listed wins when both are present.
        let split = br#"{"dataframe_split":{"columns":["text"],"data":[["s"]]}}"#;
        assert_eq!(parse(split, &["input_data", "dataframe_split"]).unwrap().items[0].text.as_deref(), Some("s"));
        let two = br#"{"dataframe_split":{"columns":["text"],"data":[["s"]]},
            "input_data":{"columns":["text"],"data":[["i"]]}}"#;
        let first = |keys: &[&str]| parse(two, keys).unwrap().items[0].text.clone().unwrap();
        assert_eq!(first(&["input_data", "dataframe_split"]), "i");
        assert_eq!(first(&["dataframe_split", "input_data"]), "s");
        // A broken frame under the name that is not used does not matter.
        let unused = br#"{"input_data":{"columns":["text"],"data":[["i"]]},"dataframe_split":5}"#;
        assert!(parse(unused, &["input_data", "dataframe_split"]).is_ok());
    }

    #[test]
    fn malformed_requests_name_what_is_wrong() {
        assert!(err("{not json").contains("malformed JSON"));
        assert!(err("[]").contains("JSON object"));
        assert!(err("[").contains("malformed JSON"));
        assert!(err(r#"{"data": []}"#).contains("input_data"));
        assert!(err(r#"{"input_data":[1]}"#).contains("input_data must be an object"));
        assert!(err(r#"{"input_data":{"data":[]}}"#).contains("columns is missing"));
        assert!(err(r#"{"input_data":{"columns":"text","data":[]}}"#).contains("columns must be a list"));
        assert!(err(r#"{"input_data":{"columns":["img"],"data":[]}}"#).contains("unknown column \"img\""));
        assert!(err(r#"{"input_data":{"columns":[["text"]],"data":[]}}"#).contains("unknown column"));
        assert!(err(r#"{"input_data":{"columns":["text","text"],"data":[]}}"#).contains("twice"));
        assert!(err(r#"{"input_data":{"columns":[],"data":[]}}"#).contains("must name"));
        assert!(err(r#"{"input_data":{"columns":["text"]}}"#).contains("data is missing"));
        assert!(err(r#"{"input_data":{"columns":["text"],"data":{}}}"#).contains("list of rows"));
        let ragged = err(r#"{"input_data":{"columns":["image","text"],"data":[["","a"],["b"]]}}"#);
        assert!(ragged.starts_with("row 1:"), "{ragged}");
        let long = err(r#"{"input_data":{"columns":["text"],"data":[["a"],["b","c","d",4]]}}"#);
        assert_eq!(long, "row 1: has 4 values for 1 columns");
        let typed = err(r#"{"input_data":{"columns":["image","text"],"data":[["",5]]}}"#);
        assert!(typed.starts_with("row 0:") && typed.contains("text"), "{typed}");
        let typed = err(r#"{"input_data":{"columns":["image","text"],"data":[[{"a":1},""]]}}"#);
        assert!(typed.starts_with("row 0:") && typed.contains("image"), "{typed}");
        assert!(err(r#"{"input_data":{"columns":["text"],"data":["a"]}}"#).starts_with("row 0: must be a list"));
        assert!(err(r#"{"input_data":{"columns":["text"],"index":[0,1],"data":[["a"]]}}"#).contains("index"));
        assert!(err(r#"{"input_data":{"columns":["text"],"index":{},"data":[["a"]]}}"#).contains("index must be"));
        assert!(err(r#"{"input_data":{"columns":["text"],"data":[["a"]]},"params":{"normalize":"yes"}}"#)
            .contains("normalize"));
        assert!(err(r#"{"input_data":{"columns":["text"],"data":[["a"]]},"params":[]}"#).contains("params"));
        // A syntax error anywhere wins over a problem found before it.
        assert!(err(r#"{"input_data":{"columns":["text"],"data":[[1]]}"#).contains("malformed JSON"));
        // Deep nesting where nothing is built is skipped without recursion; it is still a 400.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(err(&deep).contains("JSON object"));
        let deep = format!(
            r#"{{"input_data":{{"columns":["text"],"data":[[{}{}]]}}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert!(err(&deep).starts_with("row 0: the text value"));
        assert!(err(&format!("{}{}", "[".repeat(100), "]".repeat(99))).contains("malformed JSON"));
    }

    #[test]
    fn short_rows_are_read_as_nulls_only_when_allowed() {
        // The Azure zero-shot endpoint's sample: labels in the first row, later rows with the image alone.
        let body = br#"{"input_data":{"columns":["image","text"],"index":[0,1],"data":[["aGk=","a, b"],["aGk="]]}}"#;
        assert!(err(std::str::from_utf8(body).unwrap()).contains("row 1: has 1 values for 2 columns"));
        let r = parse_rows(body, KEYS, ParseLimits::NONE, RowWidth::AtMost).unwrap();
        assert_eq!(r.items[0].text.as_deref(), Some("a, b"));
        assert!(r.items[1].image.is_some() && r.items[1].text.is_none());
        let empty = br#"{"input_data":{"columns":["image","text"],"data":[[]]}}"#;
        let r = parse_rows(empty, KEYS, ParseLimits::NONE, RowWidth::AtMost).unwrap();
        assert!(r.items[0].image.is_none() && r.items[0].text.is_none());
        let long = br#"{"input_data":{"columns":["image","text"],"data":[["aGk=","a","b"]]}}"#;
        let e = parse_rows(long, KEYS, ParseLimits::NONE, RowWidth::AtMost).unwrap_err();
        assert_eq!(e.message(), "row 0: has 3 values for 2 columns");
    }

    fn limited(body: &[u8], max_items: usize, max_text_chars: usize) -> Result<ScoreRequest, Error> {
        super::parse(body, KEYS, ParseLimits { max_items, max_text_chars })
    }

    #[test]
    fn limits_stop_the_parse_where_they_are_passed() {
        // Rows past the limit: 413, even though the body breaks off right after the first row too many.
        let mut body = br#"{"input_data":{"columns":["text"],"data":["#.to_vec();
        body.extend(b"[\"a\"],".repeat(5));
        body.extend(b"this is not JSON");
        let e = limited(&body, 4, 100).unwrap_err();
        assert_eq!(e.reason(), Reason::TooManyItems, "{e}");
        assert!(e.message().contains("limit of 4 items"), "{e}");
        assert_eq!(limited(&body[..body.len() - 17], 5, 100).unwrap_err().reason(), Reason::MalformedRequest);
        let exact = br#"{"input_data":{"columns":["text"],"data":[["a"],["b"]]}}"#;
        assert_eq!(limited(exact, 2, 100).unwrap().items.len(), 2);

        // A text over the limit, counted in characters, named by its row; also when the columns come last.
        let e =
            limited(r#"{"input_data":{"columns":["image","text"],"data":[["","ok"],["","ééééé"]]}}"#.as_bytes(), 9, 4)
                .unwrap_err();
        assert_eq!(
            (e.reason(), e.message().into_owned()),
            (Reason::TextTooLong, "row 1: text: text of 5 characters exceeds the limit of 4".into())
        );
        assert!(limited(r#"{"input_data":{"columns":["text"],"data":[["éééé"]]}}"#.as_bytes(), 9, 4).is_ok());
        let late = br#"{"input_data":{"data":[["abcdefgh", "xy"]],"columns":["text","image"]}}"#;
        let e = limited(late, 9, 4).unwrap_err();
        assert_eq!(e.reason(), Reason::TextTooLong);
        assert!(e.message().starts_with("row 0: "));
        // Long image cells are not texts.
        let image = br#"{"input_data":{"columns":["image","text"],"data":[["abcdefgh", "xy"]]}}"#;
        assert!(limited(image, 9, 4).is_ok());
        // A long index is refused as a mismatch without keeping its entries.
        let index =
            format!(r#"{{"input_data":{{"columns":["text"],"data":[["a"]],"index":[{}0]}}}}"#, "0,".repeat(1000));
        assert!(limited(index.as_bytes(), 2, 4).unwrap_err().message().contains("1001 entries for 1 rows"));
    }
}
