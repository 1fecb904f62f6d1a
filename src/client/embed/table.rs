//! Parquet inputs: one item per row, from the columns `--image-column` (default `url`), `--text-column`
//! (default `caption`) and `--id-column` (default `key`), img2dataset's names. An image cell is an http(s) URL,
//! base64 (or a `data:` URI), bytes, or a struct with a `bytes` field (Hugging Face datasets' Image). Files are
//! cut into units of `--partition-size` rows, read a batch of rows at a time, only the row groups and columns
//! needed.

use std::ops::Range;
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, Int64Type, UInt32Type, UInt64Type};
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReaderBuilder, RowSelection, RowSelector};
use parquet::arrow::ProjectionMask;

use super::driver::Problem;
use super::input::{client_reason, io_problem, Entry, ImageRef, Source};
use super::EmbedArgs;
use crate::inputs::fetch::is_http_url;

/// Rows of one file read at a time.
const BATCH_ROWS: usize = 256;

/// `rows` of the Parquet file `path`, or the problem that keeps the file from being read.
#[derive(Debug)]
pub(super) struct Unit {
    pub path: PathBuf,
    pub rows: Range<u64>,
    pub problem: Option<Problem>,
}

/// The columns used, by name.
struct Columns {
    image: Option<String>,
    text: Option<String>,
    id: Option<String>,
    /// A `url` column beside another image column: kept as metadata.
    url: Option<String>,
}

fn open(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<std::fs::File>, Problem> {
    let file = std::fs::File::open(path).map_err(|e| io_problem("open", path, &e))?;
    ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| {
        let message = format!("{} is not a readable Parquet file: {e}", path.display());
        Problem::new("DATA_LOSS", client_reason::UNREADABLE, message)
    })
}

fn is_string(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

fn is_binary(t: &DataType) -> bool {
    matches!(t, DataType::Binary | DataType::LargeBinary | DataType::BinaryView | DataType::FixedSizeBinary(_))
}

fn is_image(t: &DataType) -> bool {
    match t {
        DataType::Struct(fields) => fields.iter().any(|f| f.name() == "bytes" && is_binary(f.data_type())),
        t => is_string(t) || is_binary(t),
    }
}

fn is_id(t: &DataType) -> bool {
    is_string(t) || matches!(t, DataType::Int32 | DataType::Int64 | DataType::UInt32 | DataType::UInt64)
}

/// The columns of a file's schema to read. A column named by a flag must be there, with a usable type; a
/// default name that is absent is left out; at least one of image and text must be there.
fn columns(schema: &arrow_schema::Schema, args: &EmbedArgs, path: &Path) -> Result<Columns, String> {
    let pick = |given: &Option<String>, default: &str, fits: fn(&DataType) -> bool, what: &str| {
        let name = given.as_deref().unwrap_or(default);
        match schema.field_with_name(name) {
            Ok(f) if fits(f.data_type()) => Ok(Some(name.to_string())),
            Ok(f) => Err(format!("{}: column {name:?} is {}, not {what}", path.display(), f.data_type())),
            Err(_) if given.is_some() => Err(format!("{}: no column {name:?}", path.display())),
            Err(_) => Ok(None),
        }
    };
    let image = pick(&args.image_column, "url", is_image, "an image (string, binary, or a struct with bytes)")?;
    let text = pick(&args.text_column, "caption", is_string, "a string")?;
    let id = pick(&args.id_column, "key", is_id, "a string or an integer")?;
    if image.is_none() && text.is_none() {
        return Err(format!(
            "{}: neither the image column {:?} nor the text column {:?} is there (columns: {}); name them with \
             --image-column / --text-column",
            path.display(),
            args.image_column.as_deref().unwrap_or("url"),
            args.text_column.as_deref().unwrap_or("caption"),
            schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ")
        ));
    }
    let url = (image.as_deref() != Some("url"))
        .then(|| schema.field_with_name("url").ok().filter(|f| is_string(f.data_type())).map(|_| "url".to_string()))
        .flatten();
    Ok(Columns { image, text, id, url })
}

/// The units of `files`, in order: `--partition-size` rows each (one for an empty file, one for a file that
/// cannot be read). The first readable file's columns are checked now, so that a wrong flag stops the run before
/// it starts.
pub(super) fn plan(files: &[PathBuf], args: &EmbedArgs) -> anyhow::Result<Vec<Unit>> {
    let size = args.partition_size;
    let mut units = Vec::new();
    let mut checked = false;
    for path in files {
        let builder = match open(path) {
            Ok(b) => b,
            Err(problem) => {
                units.push(Unit { path: path.clone(), rows: 0..0, problem: Some(problem) });
                continue;
            }
        };
        if !checked {
            columns(builder.schema(), args, path).map_err(anyhow::Error::msg)?;
            checked = true;
        }
        let rows = builder.metadata().file_metadata().num_rows().max(0) as u64;
        let mut start = 0;
        loop {
            let end = (start + size).min(rows);
            units.push(Unit { path: path.clone(), rows: start..end, problem: None });
            start = end;
            if start >= rows {
                break;
            }
        }
    }
    Ok(units)
}

/// A string cell (None: null, or not a string column).
fn string_at(a: &dyn Array, i: usize) -> Option<&str> {
    if a.is_null(i) {
        return None;
    }
    match a.data_type() {
        DataType::Utf8 => Some(a.as_string::<i32>().value(i)),
        DataType::LargeUtf8 => Some(a.as_string::<i64>().value(i)),
        DataType::Utf8View => Some(a.as_string_view().value(i)),
        _ => None,
    }
}

fn bytes_at(a: &dyn Array, i: usize) -> Option<&[u8]> {
    if a.is_null(i) {
        return None;
    }
    match a.data_type() {
        DataType::Binary => Some(a.as_binary::<i32>().value(i)),
        DataType::LargeBinary => Some(a.as_binary::<i64>().value(i)),
        DataType::BinaryView => Some(a.as_binary_view().value(i)),
        DataType::FixedSizeBinary(_) => Some(a.as_fixed_size_binary().value(i)),
        _ => None,
    }
}

fn image_at(a: &dyn Array, i: usize) -> Option<ImageRef> {
    if let Some(s) = string_at(a, i) {
        return Some(if is_http_url(s) { ImageRef::Url(s.to_string()) } else { ImageRef::Base64(s.to_string()) });
    }
    if let Some(b) = bytes_at(a, i) {
        return Some(ImageRef::Bytes(b.to_vec()));
    }
    if let DataType::Struct(_) = a.data_type() {
        if a.is_null(i) {
            return None;
        }
        return bytes_at(a.as_struct().column_by_name("bytes")?.as_ref(), i).map(|b| ImageRef::Bytes(b.to_vec()));
    }
    None
}

fn id_at(a: &dyn Array, i: usize) -> Option<String> {
    if a.is_null(i) {
        return None;
    }
    match a.data_type() {
        DataType::Int32 => Some(a.as_primitive::<Int32Type>().value(i).to_string()),
        DataType::Int64 => Some(a.as_primitive::<Int64Type>().value(i).to_string()),
        DataType::UInt32 => Some(a.as_primitive::<UInt32Type>().value(i).to_string()),
        DataType::UInt64 => Some(a.as_primitive::<UInt64Type>().value(i).to_string()),
        _ => string_at(a, i).map(str::to_string),
    }
}

/// The items of one batch of rows; `first` is the file row of its first row.
fn entries(batch: &RecordBatch, cols: &Columns, first: u64, stem: &str) -> Vec<Entry> {
    let col = |name: &Option<String>| name.as_deref().and_then(|n| batch.column_by_name(n)).map(|c| c.as_ref());
    let (image, text, id, url) = (col(&cols.image), col(&cols.text), col(&cols.id), col(&cols.url));
    (0..batch.num_rows())
        .map(|i| {
            let id = id.and_then(|a| id_at(a, i)).unwrap_or_else(|| format!("{stem}:{}", first + i as u64));
            let image = image.and_then(|a| image_at(a, i));
            let text = text.and_then(|a| string_at(a, i)).map(str::to_string);
            let url = url.and_then(|a| string_at(a, i)).map(str::to_string);
            Entry::Item(Source { id, image, text, url })
        })
        .collect()
}

/// Reads one unit, handing each row to `emit` (false: stop). A file that cannot be read is one failure named
/// after its path; rows that cannot be decoded are one failure named `FILE:FIRST-LAST` and end the unit.
pub(super) fn read(
    unit: &Unit,
    args: &EmbedArgs,
    _limit: usize,
    emit: &mut dyn FnMut(Entry) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let path = &unit.path;
    let name = path.display().to_string();
    if let Some(p) = &unit.problem {
        emit(Entry::Failed(name, p.clone()))?;
        return Ok(());
    }
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let builder = match open(path) {
        Ok(b) => b,
        Err(p) => {
            emit(Entry::Failed(name, p))?;
            return Ok(());
        }
    };
    let cols = match columns(builder.schema(), args, path) {
        Ok(c) => c,
        Err(message) => {
            emit(Entry::Failed(name, Problem::new("INVALID_ARGUMENT", client_reason::INVALID_VALUE, message)))?;
            return Ok(());
        }
    };
    if unit.rows.is_empty() {
        return Ok(());
    }
    // The row groups that hold the unit's rows, and the rows to keep within them.
    let mut groups = Vec::new();
    let (mut offset, mut first_group_start, mut group_rows) = (0u64, None, 0u64);
    for (g, meta) in builder.metadata().row_groups().iter().enumerate() {
        let n = meta.num_rows().max(0) as u64;
        if offset < unit.rows.end && offset + n > unit.rows.start {
            groups.push(g);
            first_group_start.get_or_insert(offset);
            group_rows += n;
        }
        offset += n;
    }
    let base = first_group_start.unwrap_or(0);
    let skip_front = (unit.rows.start - base) as usize;
    let take = (unit.rows.end - unit.rows.start) as usize;
    let skip_back = (group_rows as usize).saturating_sub(skip_front + take);
    let selection = RowSelection::from(vec![
        RowSelector::skip(skip_front),
        RowSelector::select(take),
        RowSelector::skip(skip_back),
    ]);
    let wanted: Vec<&str> =
        [&cols.image, &cols.text, &cols.id, &cols.url].into_iter().filter_map(|c| c.as_deref()).collect();
    let schema = builder.parquet_schema();
    let roots: Vec<usize> = (0..schema.root_schema().get_fields().len())
        .filter(|&i| wanted.contains(&schema.root_schema().get_fields()[i].name()))
        .collect();
    let mask = ProjectionMask::roots(schema, roots);
    let reader = builder
        .with_row_groups(groups)
        .with_row_selection(selection)
        .with_projection(mask)
        .with_batch_size(BATCH_ROWS)
        .build();
    let mut row = unit.rows.start;
    let fail_rest = |row: u64, e: String| {
        let message = format!("{name}: rows {row} to {} cannot be read: {e}", unit.rows.end - 1);
        Entry::Failed(
            format!("{name}:{row}-{}", unit.rows.end - 1),
            Problem::new("DATA_LOSS", client_reason::UNREADABLE, message),
        )
    };
    let reader = match reader {
        Ok(r) => r,
        Err(e) => {
            emit(fail_rest(row, e.to_string()))?;
            return Ok(());
        }
    };
    for batch in reader {
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                emit(fail_rest(row, e.to_string()))?;
                return Ok(());
            }
        };
        let n = batch.num_rows() as u64;
        for e in entries(&batch, &cols, row, &stem) {
            if !emit(e)? {
                return Ok(());
            }
        }
        row += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::builder::{BinaryBuilder, StringBuilder};
    use arrow_array::ArrayRef;
    use clap::Parser;

    use super::*;

    fn args(extra: &[&str]) -> EmbedArgs {
        let mut argv = vec!["clipserve", "embed", "--server", "http://x:1", "--input", "i", "--output", "o"];
        argv.extend(extra);
        match crate::cli::Cli::parse_from(argv).command {
            crate::cli::Command::Embed(a) => a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn rows_are_read_by_unit_with_bytes_urls_base64_and_nulls() {
        let dir = std::env::temp_dir().join(format!("clipserve-table-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("part.parquet");
        let mut keys = StringBuilder::new();
        let mut images = BinaryBuilder::new();
        let mut captions = StringBuilder::new();
        for i in 0..10 {
            keys.append_value(format!("k{i}"));
            if i == 3 {
                images.append_null();
            } else {
                images.append_value(format!("img{i}"));
            }
            if i % 2 == 0 {
                captions.append_value(format!("caption {i}"));
            } else {
                captions.append_null();
            }
        }
        let batch = RecordBatch::try_from_iter([
            ("key", Arc::new(keys.finish()) as ArrayRef),
            ("jpg", Arc::new(images.finish()) as ArrayRef),
            ("caption", Arc::new(captions.finish()) as ArrayRef),
        ])
        .unwrap();
        // Row groups of 4 rows, so that units cross them.
        let props = parquet::file::properties::WriterProperties::builder().set_max_row_group_row_count(Some(4)).build();
        let mut w =
            parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), batch.schema(), Some(props))
                .unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();

        // The default image column `url` is absent: a text-only read.
        let a = args(&["--partition-size", "3"]);
        let units = plan(std::slice::from_ref(&path), &a).unwrap();
        assert_eq!(units.iter().map(|u| u.rows.clone()).collect::<Vec<_>>(), [0..3, 3..6, 6..9, 9..10]);
        // An explicit column that is not there stops the run.
        assert!(plan(std::slice::from_ref(&path), &args(&["--image-column", "png"])).is_err());

        let a = args(&["--partition-size", "3", "--image-column", "jpg"]);
        let units = plan(std::slice::from_ref(&path), &a).unwrap();
        let mut got = Vec::new();
        read(&units[1], &a, 1 << 20, &mut |e| {
            got.push(e);
            Ok(true)
        })
        .unwrap();
        let want = [
            Source { id: "k3".into(), image: None, text: None, url: None },
            Source {
                id: "k4".into(),
                image: Some(ImageRef::Bytes(b"img4".to_vec())),
                text: Some("caption 4".into()),
                url: None,
            },
            Source { id: "k5".into(), image: Some(ImageRef::Bytes(b"img5".to_vec())), text: None, url: None },
        ];
        assert_eq!(got, want.map(Entry::Item));

        // A file that is not Parquet is one unit that fails once.
        let junk = dir.join("junk.parquet");
        std::fs::write(&junk, b"not parquet").unwrap();
        let units = plan(&[junk.clone(), path.clone()], &a).unwrap();
        assert_eq!(units.len(), 5);
        let mut got = Vec::new();
        read(&units[0], &a, 1 << 20, &mut |e| {
            got.push(e);
            Ok(true)
        })
        .unwrap();
        assert!(matches!(&got[..], [Entry::Failed(_, p)] if p.reason == client_reason::UNREADABLE), "{got:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn string_images_are_urls_or_base64() {
        let a = arrow_array::StringArray::from(vec![Some("https://x/y.jpg"), Some("aGVsbG8="), None]);
        assert_eq!(image_at(&a, 0), Some(ImageRef::Url("https://x/y.jpg".into())));
        assert_eq!(image_at(&a, 1), Some(ImageRef::Base64("aGVsbG8=".into())));
        assert_eq!(image_at(&a, 2), None);
    }
}
