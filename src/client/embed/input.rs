//! What to embed, read as a stream: the input is cut into units (a tar shard, `--partition-size` rows of a
//! Parquet file, or `--partition-size` consecutive items of a folder or list), this process keeps its own
//! (`--shard`), skips what an earlier run finished, and feeds the rest to the queue as messages of at most
//! `--batch` items and `--max-message-bytes` bytes. Memory holds what is queued, not the input.

use std::collections::HashSet;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

use super::driver::{framed_len, Chunk, Event, Problem, Shared, Work};
use super::{table, webdataset, EmbedArgs};
use crate::inputs::fetch::is_http_url;
use crate::pb::{item::Image, Item};

/// Reasons of the errors the client finds itself, before anything is sent.
pub(super) mod client_reason {
    /// The file does not exist (a missing path, a dangling symlink, a missing shard).
    pub const NOT_FOUND: &str = "INPUT_NOT_FOUND";
    /// The file or folder exists but cannot be read (permissions, I/O error, a symlink loop, a corrupt tar or
    /// Parquet file).
    pub const UNREADABLE: &str = "INPUT_UNREADABLE";
    /// Not a regular file: a FIFO, a socket, a device, a folder named like an image.
    pub const NOT_A_FILE: &str = "INPUT_NOT_A_FILE";
    /// Larger than fits in one message of --max-message-bytes.
    pub const TOO_LARGE: &str = "INPUT_TOO_LARGE";
    /// A line of the input list that cannot be parsed.
    pub const INVALID_LINE: &str = "INPUT_LINE_INVALID";
    /// An item with neither an image nor a text (a webdataset sample with neither, a row whose columns are null).
    pub const EMPTY: &str = "INPUT_EMPTY";
    /// A text that is not UTF-8, or a value of a type the column cannot hold.
    pub const INVALID_VALUE: &str = "INPUT_VALUE_INVALID";
}

/// Where an input item's image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ImageRef {
    Path(PathBuf),
    Url(String),
    Base64(String),
    Bytes(Vec<u8>),
}

/// One item as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Source {
    pub id: String,
    pub image: Option<ImageRef>,
    pub text: Option<String>,
    /// Where the image came from, when the input says (metadata only).
    pub url: Option<String>,
}

/// One entry of the input: an item, or something that failed before it could be sent (named by its id).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Entry {
    Item(Source),
    Failed(String, Problem),
}

impl Entry {
    fn id(&self) -> &str {
        match self {
            Entry::Item(s) => &s.id,
            Entry::Failed(id, _) => id,
        }
    }
}

/// What an earlier run finished, and is not read again.
pub(super) enum Skip {
    /// Ids in a journal or errors file (the small-job formats).
    Ids(HashSet<String>),
    /// Complete partitions (clip-retrieval).
    Units(HashSet<u64>),
}

/// What the reader skipped, and whether it read to the end.
#[derive(Debug, Default)]
pub(super) struct Skipped {
    pub items: u64,
    pub units: u64,
    pub complete: bool,
}

const IMAGE_EXTENSIONS: [&str; 6] = ["jpg", "jpeg", "png", "webp", "gif", "bmp"];

fn has_image_extension(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn image_ref(s: &str, base: &Path) -> ImageRef {
    if is_http_url(s) {
        ImageRef::Url(s.to_string())
    } else if s.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("data:")) {
        ImageRef::Base64(s.to_string())
    } else {
        let p = Path::new(s);
        ImageRef::Path(if p.is_absolute() { p.to_path_buf() } else { base.join(p) })
    }
}

pub(super) fn io_problem(what: &str, path: &Path, e: &std::io::Error) -> Problem {
    let (code, reason) = match e.kind() {
        std::io::ErrorKind::NotFound => ("NOT_FOUND", client_reason::NOT_FOUND),
        std::io::ErrorKind::PermissionDenied => ("PERMISSION_DENIED", client_reason::UNREADABLE),
        _ => ("UNKNOWN", client_reason::UNREADABLE),
    };
    Problem::new(code, reason, format!("cannot {what} {}: {e}", path.display()))
}

/// Reads an image file, refusing what is not a regular file (reading a FIFO would block) or cannot fit in a
/// message.
fn load(path: &Path, limit: usize) -> Result<Vec<u8>, Problem> {
    let meta = std::fs::metadata(path).map_err(|e| io_problem("read", path, &e))?;
    if !meta.is_file() {
        let message = format!("{} is not a regular file", path.display());
        return Err(Problem::new("INVALID_ARGUMENT", client_reason::NOT_A_FILE, message));
    }
    if meta.len() > limit as u64 {
        return Err(too_large(&path.display().to_string(), meta.len(), limit));
    }
    std::fs::read(path).map_err(|e| io_problem("read", path, &e))
}

pub(super) fn too_large(what: &str, len: u64, limit: usize) -> Problem {
    let message = format!("{what} is {len} bytes, over the message limit of {limit} (--max-message-bytes)");
    Problem::new("RESOURCE_EXHAUSTED", client_reason::TOO_LARGE, message)
}

/// The input, understood: its kind and, for sharded inputs, its units.
pub(super) struct Plan {
    kind: Kind,
    args: EmbedArgs,
}

enum Kind {
    /// A folder of images, recursive.
    Folder(PathBuf),
    /// A text file of image paths or URLs.
    List(PathBuf),
    /// A JSONL file of {"id", "image", "text"}.
    Jsonl(PathBuf),
    /// Webdataset shards, one unit each.
    Tar(Shards),
    /// Parquet files, cut into units of rows.
    Parquet(Vec<table::Unit>),
}

/// A list of shard paths: a brace pattern expanded on demand (a range of 10^6 shards takes no memory), or the
/// files a glob matched.
pub(super) enum Shards {
    Braces(Braces),
    Files(Vec<PathBuf>),
}

impl Shards {
    fn len(&self) -> u64 {
        match self {
            Shards::Braces(b) => b.len(),
            Shards::Files(f) => f.len() as u64,
        }
    }

    fn get(&self, i: u64) -> PathBuf {
        match self {
            Shards::Braces(b) => PathBuf::from(b.get(i)),
            Shards::Files(f) => f[i as usize].clone(),
        }
    }

    fn all(&self) -> Vec<PathBuf> {
        (0..self.len()).map(|i| self.get(i)).collect()
    }
}

/// A pattern with `{a,b,c}` and `{000..099}` parts: the cartesian product of its parts, last part fastest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Braces {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Choices(Vec<String>),
    /// Numbers from `start` to `end` inclusive, zero-padded to `width`.
    Range {
        start: u64,
        end: u64,
        width: usize,
    },
}

impl Part {
    fn len(&self) -> u64 {
        match self {
            Part::Literal(_) => 1,
            Part::Choices(c) => c.len() as u64,
            Part::Range { start, end, .. } => end - start + 1,
        }
    }
}

impl Braces {
    /// Parses `s`; braces that hold neither a comma nor a `..` range are kept as they are.
    pub fn parse(s: &str) -> anyhow::Result<Braces> {
        let mut parts = Vec::new();
        let mut rest = s;
        let mut literal = String::new();
        while let Some(open) = rest.find('{') {
            let Some(close) = rest[open..].find('}').map(|c| open + c) else { break };
            let inner = &rest[open + 1..close];
            let part = if let Some((a, b)) = inner.split_once("..") {
                let (start, end): (u64, u64) = match (a.parse(), b.parse()) {
                    (Ok(x), Ok(y)) => (x, y),
                    _ => anyhow::bail!("invalid range {{{inner}}} in {s}: expected {{START..END}} with numbers"),
                };
                anyhow::ensure!(start <= end, "invalid range {{{inner}}} in {s}: the start is past the end");
                let width = if a.starts_with('0') || b.starts_with('0') { a.len().max(b.len()) } else { 0 };
                Some(Part::Range { start, end, width })
            } else if inner.contains(',') {
                Some(Part::Choices(inner.split(',').map(str::to_string).collect()))
            } else {
                None
            };
            match part {
                Some(p) => {
                    literal.push_str(&rest[..open]);
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(p);
                }
                None => literal.push_str(&rest[..=close]),
            }
            rest = &rest[close + 1..];
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        let b = Braces { parts };
        anyhow::ensure!(
            b.parts.iter().try_fold(1u64, |n, p| n.checked_mul(p.len())).is_some_and(|n| n <= 1 << 40),
            "{s} names too many files"
        );
        Ok(b)
    }

    fn has_braces(&self) -> bool {
        self.parts.iter().any(|p| !matches!(p, Part::Literal(_)))
    }

    pub fn len(&self) -> u64 {
        self.parts.iter().map(Part::len).product()
    }

    /// The `i`-th expansion.
    pub fn get(&self, mut i: u64) -> String {
        let mut digits = Vec::with_capacity(self.parts.len());
        for p in self.parts.iter().rev() {
            digits.push(i % p.len());
            i /= p.len();
        }
        let mut s = String::new();
        for (p, d) in self.parts.iter().zip(digits.into_iter().rev()) {
            match p {
                Part::Literal(l) => s.push_str(l),
                Part::Choices(c) => s.push_str(&c[d as usize]),
                Part::Range { start, width, .. } => s.push_str(&format!("{:0width$}", start + d, width = *width)),
            }
        }
        s
    }
}

fn has_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// The shards a pattern names, in order: brace expansions in their order (a missing one is kept: reading it
/// fails, once, in the errors), globs sorted.
fn expand(pattern: &str) -> anyhow::Result<Shards> {
    let braces = Braces::parse(pattern)?;
    if !has_glob(pattern) {
        return Ok(Shards::Braces(braces));
    }
    let mut files = Vec::new();
    for i in 0..braces.len() {
        let p = braces.get(i);
        let mut matched: Vec<PathBuf> = glob::glob(&p)
            .with_context(|| format!("invalid pattern {p}"))?
            .filter_map(Result::ok)
            .filter(|p| !p.is_dir())
            .collect();
        matched.sort();
        files.extend(matched);
    }
    anyhow::ensure!(!files.is_empty(), "no file matches {pattern}");
    Ok(Shards::Files(files))
}

fn extension_of(s: &str) -> String {
    Path::new(s).extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase()
}

impl Plan {
    /// Finds out what `--input` is and, for shards, which units it has.
    pub fn open(args: &EmbedArgs) -> anyhow::Result<Plan> {
        let input = &args.input;
        let text = input.to_string_lossy().into_owned();
        let literal = input.exists();
        let kind = if input.is_dir() {
            Kind::Folder(input.clone())
        } else {
            let shards = if literal {
                Shards::Files(vec![input.clone()])
            } else {
                let shards = expand(&text)?;
                let pattern =
                    matches!(&shards, Shards::Files(_)) || matches!(&shards, Shards::Braces(b) if b.has_braces());
                anyhow::ensure!(pattern, "{} does not exist", input.display());
                shards
            };
            match extension_of(&text).as_str() {
                "tar" => Kind::Tar(shards),
                "parquet" => Kind::Parquet(table::plan(&shards.all(), args)?),
                "jsonl" | "ndjson" if literal => Kind::Jsonl(input.clone()),
                _ if literal => Kind::List(input.clone()),
                other => {
                    anyhow::bail!("{}: a pattern must name .tar or .parquet files, not {other:?}", input.display())
                }
            }
        };
        if let Kind::List(p) | Kind::Jsonl(p) = &kind {
            std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
        }
        Ok(Plan { kind, args: args.clone() })
    }

    /// Units of a sharded input (None: counted while reading).
    fn units(&self) -> Option<u64> {
        match &self.kind {
            Kind::Tar(s) => Some(s.len()),
            Kind::Parquet(u) => Some(u.len() as u64),
            _ => None,
        }
    }

    /// A line for the log: what the input is, and this process's part of it.
    pub fn describe(&self, args: &EmbedArgs, skip: &Skip) -> String {
        let what = match &self.kind {
            Kind::Folder(_) => "a folder of images".to_string(),
            Kind::List(_) => "a list of images".to_string(),
            Kind::Jsonl(_) => "a JSONL list".to_string(),
            Kind::Tar(s) => format!("{} webdataset shards", s.len()),
            Kind::Parquet(u) => {
                let files = u.iter().map(|u| &u.path).collect::<HashSet<_>>().len();
                format!("{files} Parquet files")
            }
        };
        let mut line = format!("{}: {what}", args.input.display());
        if let Some(n) = self.units() {
            let mine = (0..n).filter(|u| args.shard.is_none_or(|s| s.owns(*u)));
            let (mine, done) = match skip {
                Skip::Units(done) => mine.fold((0, 0), |(m, d), u| (m + 1, d + done.contains(&u) as u64)),
                Skip::Ids(_) => (mine.count() as u64, 0),
            };
            line += &format!(", {n} partitions, {mine} for this process");
            if matches!(skip, Skip::Units(_)) {
                line += &format!(" ({done} already complete)");
            }
        }
        if let Skip::Ids(ids) = skip {
            line += &format!("; {} items already done", ids.len());
        }
        if let Some(s) = args.shard {
            line += &format!(" [--shard {}/{}]", s.index, s.count);
        }
        line
    }
}

/// Turns entries into queued messages and tells the writer about units and local failures. Nothing is told
/// before a server has connected, so that a run with no server fails nothing.
struct Feed<'a> {
    shared: &'a Shared,
    room: usize,
    batch: usize,
    chunk: Vec<Work>,
    bytes: usize,
    gated: bool,
    stopped: bool,
}

impl Feed<'_> {
    fn gate(&mut self) -> bool {
        if !self.gated {
            self.gated = true;
            self.stopped = !self.shared.wait_connected();
        }
        !self.stopped
    }

    fn start(&mut self, unit: u64) -> bool {
        self.gate() && {
            self.shared.tell(Event::Start(unit));
            true
        }
    }

    fn end(&mut self, unit: u64, count: u64) {
        self.shared.tell(Event::End { unit, count });
    }

    fn fail(&mut self, unit: u64, pos: u64, id: String, problem: Problem) -> bool {
        self.gate() && {
            self.shared.tell(Event::Failed { unit, pos, failure: super::driver::Failure::new(id, problem) });
            true
        }
    }

    /// Adds an item to the message being formed; false once the run stops.
    fn item(&mut self, unit: u64, pos: u64, s: Source) -> bool {
        if !self.gate() {
            return false;
        }
        let mut url = s.url;
        let image = match s.image {
            None => None,
            Some(ImageRef::Url(u)) => {
                url.get_or_insert_with(|| u.clone());
                Some(Image::ImageUrl(u))
            }
            Some(ImageRef::Base64(b)) => Some(Image::ImageBase64(b)),
            Some(ImageRef::Bytes(b)) => Some(Image::ImageBytes(b)),
            Some(ImageRef::Path(p)) => match load(&p, self.room) {
                Ok(bytes) => Some(Image::ImageBytes(bytes)),
                Err(problem) => return self.fail(unit, pos, s.id, problem),
            },
        };
        if image.is_none() && s.text.is_none() {
            let problem = Problem::new("INVALID_ARGUMENT", client_reason::EMPTY, "neither an image nor a text");
            return self.fail(unit, pos, s.id, problem);
        }
        let item = Item { id: s.id, image, text: s.text };
        let len = framed_len(&item);
        if len > self.room {
            let problem = too_large("the item encoded", len as u64, self.room + 2);
            return self.fail(unit, pos, item.id, problem);
        }
        if !self.chunk.is_empty() && self.bytes + len > self.room && !self.flush() {
            return false;
        }
        self.bytes += len;
        self.chunk.push(Work { unit, pos, item, url, last: None });
        self.chunk.len() < self.batch || self.flush()
    }

    fn flush(&mut self) -> bool {
        if self.chunk.is_empty() {
            return !self.stopped;
        }
        self.bytes = 0;
        let chunk = Chunk::new(std::mem::take(&mut self.chunk), 0);
        self.stopped = !self.shared.push(chunk);
        !self.stopped
    }
}

/// Which entries go on: this process's units, what an earlier run did not finish; in the journal formats, ids
/// must be unique.
struct Filter<'a> {
    args: &'a EmbedArgs,
    skip: &'a Skip,
    seen: Option<HashSet<String>>,
    skipped: Skipped,
}

impl Filter<'_> {
    fn owns(&self, unit: u64) -> bool {
        self.args.shard.is_none_or(|s| s.owns(unit))
    }

    /// Whether this process reads `unit` (counting it as skipped when an earlier run completed it).
    fn takes_unit(&mut self, unit: u64) -> bool {
        if !self.owns(unit) {
            return false;
        }
        if let Skip::Units(done) = self.skip {
            if done.contains(&unit) {
                self.skipped.units += 1;
                return false;
            }
        }
        true
    }

    /// Whether an entry is sent (false: an earlier run wrote it).
    fn takes_entry(&mut self, e: &Entry) -> anyhow::Result<bool> {
        if let Some(seen) = &mut self.seen {
            anyhow::ensure!(
                seen.insert(e.id().to_string()),
                "id {:?} appears twice in {}",
                e.id(),
                self.args.input.display()
            );
        }
        if let Skip::Ids(ids) = self.skip {
            if ids.contains(e.id()) {
                self.skipped.items += 1;
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Reads the whole input (this process's part of it) into the queue. Returns what was skipped; stops early
/// (`complete: false`) when the run stops.
pub(super) fn read(plan: Plan, skip: Skip, shared: &Shared) -> anyhow::Result<Skipped> {
    let args = &plan.args;
    let mut feed = Feed {
        shared,
        // What a message holds besides its items: the `normalize` flag.
        room: args.max_message_bytes.saturating_sub(2),
        batch: args.batch,
        chunk: Vec::new(),
        bytes: 0,
        gated: false,
        stopped: false,
    };
    let journal = matches!(skip, Skip::Ids(_));
    let mut filter = Filter { args, skip: &skip, seen: journal.then(HashSet::new), skipped: Skipped::default() };
    let go_on = match &plan.kind {
        Kind::Folder(root) => read_entries(folder_entries(root).map(Ok), &mut feed, &mut filter, args)?,
        Kind::List(path) | Kind::Jsonl(path) => {
            let jsonl = matches!(plan.kind, Kind::Jsonl(_));
            read_entries(ListEntries::open(path, jsonl)?, &mut feed, &mut filter, args)?
        }
        Kind::Tar(shards) => read_units(shards.len(), &mut feed, &mut filter, |unit, emit| {
            webdataset::read(&shards.get(unit), feed_room(args), emit)
        })?,
        Kind::Parquet(units) => read_units(units.len() as u64, &mut feed, &mut filter, |unit, emit| {
            table::read(&units[unit as usize], args, feed_room(args), emit)
        })?,
    };
    let complete = go_on && feed.flush();
    let mut skipped = filter.skipped;
    skipped.complete = complete;
    Ok(skipped)
}

fn feed_room(args: &EmbedArgs) -> usize {
    args.max_message_bytes.saturating_sub(2)
}

/// A sharded input: each unit read whole, in order, by `read_unit`, which hands each entry to `emit` (false:
/// stop).
fn read_units(
    units: u64,
    feed: &mut Feed,
    filter: &mut Filter,
    read_unit: impl Fn(u64, &mut dyn FnMut(Entry) -> anyhow::Result<bool>) -> anyhow::Result<()>,
) -> anyhow::Result<bool> {
    let (first, step) = filter.args.shard.map_or((0, 1), |s| (s.index, s.count));
    let mut unit = first;
    while unit < units {
        if filter.takes_unit(unit) {
            if !feed.start(unit) {
                return Ok(false);
            }
            let mut pos = 0u64;
            let mut go_on = true;
            read_unit(unit, &mut |entry| {
                if filter.takes_entry(&entry)? {
                    go_on = match entry {
                        Entry::Item(s) => feed.item(unit, pos, s),
                        Entry::Failed(id, p) => feed.fail(unit, pos, id, p),
                    };
                    pos += 1;
                }
                Ok(go_on)
            })?;
            if !go_on {
                return Ok(false);
            }
            feed.end(unit, pos);
        }
        unit += step;
    }
    Ok(true)
}

/// An input read entry by entry: units are `--partition-size` consecutive entries.
fn read_entries(
    entries: impl Iterator<Item = anyhow::Result<Entry>>,
    feed: &mut Feed,
    filter: &mut Filter,
    args: &EmbedArgs,
) -> anyhow::Result<bool> {
    let size = args.partition_size;
    // The unit being read, if this process takes it, and the entries of it sent so far.
    let mut open: Option<(u64, u64)> = None;
    let mut current = None;
    let mut taken = false;
    for (index, entry) in entries.enumerate() {
        let entry = entry?;
        let (unit, pos) = (index as u64 / size, index as u64 % size);
        if current != Some(unit) {
            current = Some(unit);
            if let Some((u, n)) = open.take() {
                feed.end(u, n);
            }
            taken = filter.takes_unit(unit);
            if taken {
                if !feed.start(unit) {
                    return Ok(false);
                }
                open = Some((unit, 0));
            }
        }
        if !taken || !filter.takes_entry(&entry)? {
            continue;
        }
        let go_on = match entry {
            Entry::Item(s) => feed.item(unit, pos, s),
            Entry::Failed(id, p) => feed.fail(unit, pos, id, p),
        };
        if let Some((_, n)) = &mut open {
            *n += 1;
        }
        if !go_on {
            return Ok(false);
        }
    }
    if let Some((u, n)) = open {
        feed.end(u, n);
    }
    Ok(true)
}

/// Every non-folder entry named like an image, in a stable order (each folder's entries sorted by name),
/// followed through symlinks; entries that cannot be examined (a dangling symlink, a loop) are kept too, so that
/// reading them fails with its reason, and a folder that cannot be listed is a failure of its own. Holds one
/// folder's listing at a time.
pub(super) fn folder_entries(root: &Path) -> impl Iterator<Item = Entry> + '_ {
    let id_of = move |p: &Path| p.strip_prefix(root).unwrap_or(p).to_string_lossy().into_owned();
    let mut last: Option<PathBuf> = None;
    walkdir::WalkDir::new(root).follow_links(true).sort_by_file_name().into_iter().filter_map(move |entry| {
        let path = match entry {
            Ok(e) if e.file_type().is_dir() => return None,
            Ok(e) => e.into_path(),
            Err(e) => {
                let path = e.path()?.to_path_buf();
                if !has_image_extension(&path) && std::fs::metadata(&path).is_ok_and(|m| m.is_dir()) {
                    let problem = match e.io_error() {
                        Some(io) => io_problem("list", &path, io),
                        None => Problem::new("UNKNOWN", client_reason::UNREADABLE, format!("cannot list: {e}")),
                    };
                    return Some(Entry::Failed(id_of(&path), problem));
                }
                path
            }
        };
        if !has_image_extension(&path) || last.as_ref() == Some(&path) {
            return None;
        }
        last = Some(path.clone());
        Some(Entry::Item(Source { id: id_of(&path), image: Some(ImageRef::Path(path)), text: None, url: None }))
    })
}

#[derive(Deserialize)]
struct JsonlInput {
    id: Option<serde_json::Value>,
    image: Option<String>,
    text: Option<String>,
}

/// The entries of a list (one image path or URL per line) or of a JSONL file, line by line.
struct ListEntries {
    path: PathBuf,
    base: PathBuf,
    name: String,
    jsonl: bool,
    reader: std::io::BufReader<std::fs::File>,
    line: u64,
    raw: Vec<u8>,
}

impl ListEntries {
    fn open(path: &Path, jsonl: bool) -> anyhow::Result<ListEntries> {
        let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        Ok(ListEntries {
            path: path.to_path_buf(),
            base: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            name: path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            jsonl,
            reader: std::io::BufReader::with_capacity(1 << 20, file),
            line: 0,
            raw: Vec::new(),
        })
    }

    /// The entry of line `n` (None: a blank line).
    fn parse(&self, n: u64) -> Option<Entry> {
        // A line that cannot be read is one failed item, named after its place in the file.
        let place = format!("{}:{n}", self.name);
        let bad = |message: String| Problem::new("INVALID_ARGUMENT", client_reason::INVALID_LINE, message);
        let Ok(line) = std::str::from_utf8(&self.raw) else {
            return Some(Entry::Failed(place, bad(format!("{} line {n} is not UTF-8", self.path.display()))));
        };
        let line = line.trim();
        if line.is_empty() {
            return None;
        }
        if !self.jsonl {
            let image = Some(image_ref(line, &self.base));
            return Some(Entry::Item(Source { id: line.to_string(), image, text: None, url: None }));
        }
        Some(match serde_json::from_str::<JsonlInput>(line) {
            Ok(j) => {
                let id = match j.id {
                    Some(serde_json::Value::String(s)) => s,
                    Some(v) => v.to_string(),
                    None => n.to_string(),
                };
                let image = j.image.as_deref().map(|s| image_ref(s, &self.base));
                Entry::Item(Source { id, image, text: j.text, url: None })
            }
            Err(e) => {
                // Keep the line's own id when it has a readable one, so the failure is found under it.
                let id = serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| match v.get("id")? {
                        serde_json::Value::String(s) => Some(s.clone()),
                        serde_json::Value::Number(x) => Some(x.to_string()),
                        _ => None,
                    })
                    .unwrap_or(place);
                Entry::Failed(id, bad(format!("{} line {n}: {e}", self.path.display())))
            }
        })
    }
}

impl Iterator for ListEntries {
    type Item = anyhow::Result<Entry>;

    fn next(&mut self) -> Option<anyhow::Result<Entry>> {
        loop {
            self.raw.clear();
            match self.reader.read_until(b'\n', &mut self.raw) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => return Some(Err(anyhow::Error::new(e).context(format!("reading {}", self.path.display())))),
            }
            self.line += 1;
            if let Some(entry) = self.parse(self.line) {
                return Some(Ok(entry));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("clipserve-embed-unit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn brace_ranges_and_lists_expand_in_order() {
        let b = Braces::parse("data/{00000..00002}.tar").unwrap();
        assert_eq!(b.len(), 3);
        assert_eq!(
            (0..3).map(|i| b.get(i)).collect::<Vec<_>>(),
            ["data/00000.tar", "data/00001.tar", "data/00002.tar"]
        );
        let b = Braces::parse("{a,b}/part-{8..10}.parquet").unwrap();
        let all: Vec<String> = (0..b.len()).map(|i| b.get(i)).collect();
        assert_eq!(
            all,
            [
                "a/part-8.parquet",
                "a/part-9.parquet",
                "a/part-10.parquet",
                "b/part-8.parquet",
                "b/part-9.parquet",
                "b/part-10.parquet"
            ]
        );
        // Braces with neither a range nor a list are part of the name.
        let b = Braces::parse("x{y}.tar").unwrap();
        assert!(!b.has_braces());
        assert_eq!(b.get(0), "x{y}.tar");
        // A range of a million shards is not expanded up front.
        let b = Braces::parse("/d/{000000..999999}.tar").unwrap();
        assert_eq!((b.len(), b.get(123_456)), (1_000_000, "/d/123456.tar".to_string()));
        assert!(Braces::parse("{5..3}.tar").is_err());
        assert!(Braces::parse("{a..b}.tar").is_err());
    }

    #[test]
    fn a_folder_keeps_every_entry_named_like_an_image() {
        let dir = temp_dir("folder");
        std::fs::write(dir.join("a.png"), b"png").unwrap();
        std::fs::write(dir.join("notes.txt"), b"skipped").unwrap();
        std::os::unix::fs::symlink(dir.join("gone.png"), dir.join("dangling.png")).unwrap();
        std::os::unix::fs::symlink(dir.join("gone.txt"), dir.join("dangling.txt")).unwrap();
        std::os::unix::fs::symlink(dir.join("loop.jpg"), dir.join("loop.jpg")).unwrap();
        let fifo = std::ffi::CString::new(dir.join("pipe.jpg").to_str().unwrap()).unwrap();
        // SAFETY: mkfifo(3) with a valid C string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        std::fs::create_dir(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/b.JPG"), b"jpg").unwrap();

        let items: Vec<Source> = folder_entries(&dir)
            .map(|e| match e {
                Entry::Item(s) => s,
                Entry::Failed(id, p) => panic!("{id}: {p:?}"),
            })
            .collect();
        let ids: Vec<&str> = items.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["a.png", "dangling.png", "loop.jpg", "pipe.jpg", "sub/b.JPG"]);
        let load_of = |id: &str| {
            let Some(ImageRef::Path(p)) = &items.iter().find(|s| s.id == id).unwrap().image else { panic!() };
            load(p, 1 << 20)
        };
        assert_eq!(load_of("a.png").unwrap(), b"png");
        let e = load_of("dangling.png").unwrap_err();
        assert_eq!((e.code, e.reason.as_str()), ("NOT_FOUND", client_reason::NOT_FOUND));
        assert_eq!(load_of("loop.jpg").unwrap_err().reason, client_reason::UNREADABLE);
        assert_eq!(load_of("pipe.jpg").unwrap_err().reason, client_reason::NOT_A_FILE);
        let Some(ImageRef::Path(p)) = &items[0].image else { panic!() };
        assert_eq!(load(p, 2).unwrap_err().reason, client_reason::TOO_LARGE);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_bad_jsonl_line_is_one_failure() {
        let dir = temp_dir("jsonl");
        let input = dir.join("in.jsonl");
        let mut text = b"{\"id\": \"a\", \"text\": \"x\"}\n{\"id\": \"b\", \"image\": 5}\n{not json\n".to_vec();
        text.extend(b"\xff\xfe\n\n{\"text\": \"no id\"}\n");
        std::fs::write(&input, text).unwrap();
        let entries: Vec<Entry> = ListEntries::open(&input, true).unwrap().map(Result::unwrap).collect();
        let ids: Vec<(&str, bool)> = entries.iter().map(|e| (e.id(), matches!(e, Entry::Item(_)))).collect();
        assert_eq!(ids, [("a", true), ("b", false), ("in.jsonl:3", false), ("in.jsonl:4", false), ("6", true)]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
