//! The Azure ML `input_data` request (`POST /score`) and MLflow's `dataframe_split` (`POST /invocations`).
//!
//! ```json
//! {"input_data": {"columns": ["image", "text"], "index": [0, 1], "data": [["<url or base64>", "a caption"], ...]},
//!  "params": {"normalize": false}}
//! ```
//! Columns come in either order (or just one of them), `index` is optional, an empty string (or null) means "no
//! input" for that cell. The answer is a JSON list with one object per row, in row order, holding only the keys the
//! row asked for: `image_features`, `text_features`, or both.

use serde::Serialize;
use serde_json::Value;

use crate::engine::{ImageSource, ItemInput, ItemOutput};
use crate::error::{Error, Reason};
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

fn bad(msg: impl Into<String>) -> Error {
    Error::new(Reason::MalformedRequest, msg)
}

/// Parses a `/score` or `/invocations` body; `frame_keys` are the accepted names of the data frame object.
pub fn parse(body: &[u8], frame_keys: &[&str]) -> Result<ScoreRequest, Error> {
    let value: Value = serde_json::from_slice(body).map_err(|e| bad(format!("malformed JSON: {e}")))?;
    let obj = value.as_object().ok_or_else(|| bad("the request body must be a JSON object"))?;
    let (key, frame) = frame_keys
        .iter()
        .find_map(|k| obj.get(*k).map(|v| (*k, v)))
        .ok_or_else(|| bad(format!("the request must hold {:?}", frame_keys.join("\" or \""))))?;
    let normalize = match obj.get("params") {
        None | Some(Value::Null) => false,
        Some(Value::Object(p)) => match p.get("normalize") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(bad("params.normalize must be true or false")),
        },
        Some(_) => return Err(bad("params must be an object")),
    };
    let frame = frame.as_object().ok_or_else(|| bad(format!("{key} must be an object")))?;
    let columns = frame
        .get("columns")
        .ok_or_else(|| bad(format!("{key}.columns is missing")))?
        .as_array()
        .ok_or_else(|| bad(format!("{key}.columns must be a list")))?;
    let mut image_col = None;
    let mut text_col = None;
    for (i, c) in columns.iter().enumerate() {
        let slot = match c.as_str() {
            Some("image") => &mut image_col,
            Some("text") => &mut text_col,
            _ => return Err(bad(format!("{key}.columns: unknown column {c}; expected \"image\" and/or \"text\""))),
        };
        if slot.replace(i).is_some() {
            return Err(bad(format!("{key}.columns: column {c} appears twice")));
        }
    }
    if columns.is_empty() {
        return Err(bad(format!("{key}.columns must name \"image\" and/or \"text\"")));
    }
    let data = frame
        .get("data")
        .ok_or_else(|| bad(format!("{key}.data is missing")))?
        .as_array()
        .ok_or_else(|| bad(format!("{key}.data must be a list of rows")))?;
    let index = match frame.get("index") {
        None | Some(Value::Null) => None,
        Some(Value::Array(ix)) if ix.len() == data.len() => Some(ix),
        Some(Value::Array(ix)) => {
            return Err(bad(format!("{key}.index has {} entries for {} rows", ix.len(), data.len())));
        }
        Some(_) => return Err(bad(format!("{key}.index must be a list"))),
    };
    let mut items = Vec::with_capacity(data.len());
    for (r, row) in data.iter().enumerate() {
        let row = row.as_array().ok_or_else(|| bad(format!("row {r}: must be a list of values")))?;
        if row.len() != columns.len() {
            return Err(bad(format!("row {r}: has {} values for {} columns", row.len(), columns.len())));
        }
        let cell = |col: Option<usize>, name: &str| -> Result<Option<String>, Error> {
            match col.map(|c| &row[c]) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if s.is_empty() => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(bad(format!("row {r}: the {name} value must be a string"))),
            }
        };
        let image =
            cell(image_col, "image")?
                .map(|s| if is_http_url(&s) { ImageSource::Url(s) } else { ImageSource::Base64(s) });
        let text = cell(text_col, "text")?;
        let id = match index.map(|ix| &ix[r]) {
            Some(Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => r.to_string(),
        };
        items.push(ItemInput { id, image, text });
    }
    Ok(ScoreRequest { items, normalize })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;

    const KEYS: &[&str] = &["input_data"];

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
    fn malformed_requests_name_what_is_wrong() {
        assert!(err("{not json").contains("malformed JSON"));
        assert!(err("[]").contains("JSON object"));
        assert!(err(r#"{"data": []}"#).contains("input_data"));
        assert!(err(r#"{"input_data":{"data":[]}}"#).contains("columns is missing"));
        assert!(err(r#"{"input_data":{"columns":["img"],"data":[]}}"#).contains("unknown column"));
        assert!(err(r#"{"input_data":{"columns":["text","text"],"data":[]}}"#).contains("twice"));
        assert!(err(r#"{"input_data":{"columns":[],"data":[]}}"#).contains("must name"));
        assert!(err(r#"{"input_data":{"columns":["text"]}}"#).contains("data is missing"));
        let ragged = err(r#"{"input_data":{"columns":["image","text"],"data":[["","a"],["b"]]}}"#);
        assert!(ragged.starts_with("row 1:"), "{ragged}");
        let typed = err(r#"{"input_data":{"columns":["image","text"],"data":[["",5]]}}"#);
        assert!(typed.starts_with("row 0:") && typed.contains("text"), "{typed}");
        assert!(err(r#"{"input_data":{"columns":["text"],"index":[0,1],"data":[["a"]]}}"#).contains("index"));
        assert!(err(r#"{"input_data":{"columns":["text"],"data":[["a"]]},"params":{"normalize":"yes"}}"#)
            .contains("normalize"));
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(err(&deep).contains("malformed JSON"));
    }
}
