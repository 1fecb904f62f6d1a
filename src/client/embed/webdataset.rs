//! Webdataset `.tar` shards, as img2dataset writes them: members `KEY.EXT` grouped by key (consecutive members
//! with the same key make one sample), the image from `jpg`, `jpeg`, `png` or `webp`, the text from `txt`, the
//! source URL from the `url` field of `json`; the key is the id. Read member by member: a shard is never held
//! whole, and only the members used are read.

use std::io::Read;
use std::path::Path;

use super::driver::Problem;
use super::input::{client_reason, io_problem, too_large, Entry, ImageRef, Source};

const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];
/// A `json` member larger than this is not read (it only gives the URL).
const MAX_JSON_BYTES: u64 = 1 << 20;

/// `dir/KEY.EXT` -> (`dir/KEY`, `ext`): the key ends at the first dot of the file name, as webdataset splits
/// members. Names with no key or no extension are not members of a sample.
pub(super) fn split_member(name: &str) -> Option<(String, String)> {
    let name = name.strip_prefix("./").unwrap_or(name);
    let (dir, base) = match name.rfind('/') {
        Some(i) => name.split_at(i + 1),
        None => ("", name),
    };
    let dot = base.find('.')?;
    if dot == 0 || dot + 1 == base.len() {
        return None;
    }
    Some((format!("{dir}{}", &base[..dot]), base[dot + 1..].to_ascii_lowercase()))
}

/// A sample being read.
struct Sample {
    key: String,
    image: Option<Vec<u8>>,
    text: Option<String>,
    url: Option<String>,
    problem: Option<Problem>,
}

impl Sample {
    fn into_entry(self) -> Entry {
        if let Some(p) = self.problem {
            return Entry::Failed(self.key, p);
        }
        if self.image.is_none() && self.text.is_none() {
            let message = "a sample with neither an image (jpg, jpeg, png, webp) nor a text (txt) member";
            return Entry::Failed(self.key, Problem::new("INVALID_ARGUMENT", client_reason::EMPTY, message));
        }
        Entry::Item(Source { id: self.key, image: self.image.map(ImageRef::Bytes), text: self.text, url: self.url })
    }
}

fn cut_short(shard: &Path, detail: String) -> Problem {
    Problem::new(
        "DATA_LOSS",
        client_reason::UNREADABLE,
        format!("{} is cut short or corrupt: {detail}", shard.display()),
    )
}

/// Reads one member whole, if it is at most `limit` bytes; a member shorter than its header says means the shard
/// is cut short.
fn read_member(entry: &mut impl Read, size: u64, limit: u64, shard: &Path, what: &str) -> Result<Vec<u8>, Problem> {
    if size > limit {
        return Err(too_large(what, size, limit as usize));
    }
    let mut buf = Vec::with_capacity(size as usize);
    entry.read_to_end(&mut buf).map_err(|e| cut_short(shard, format!("reading {what}: {e}")))?;
    if buf.len() as u64 != size {
        return Err(cut_short(shard, format!("{what} has {} of its {size} bytes", buf.len())));
    }
    Ok(buf)
}

/// Reads the samples of `shard`, handing each to `emit` (false: stop). A shard that cannot be opened is one
/// failure named after its path; a shard cut short fails the sample being read (or, between samples, one entry
/// named `SHARD#N`, N the samples before the cut) and ends there.
pub(super) fn read(
    shard: &Path,
    limit: usize,
    emit: &mut dyn FnMut(Entry) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let name = shard.display().to_string();
    let file = match std::fs::File::open(shard) {
        Ok(f) => f,
        Err(e) => {
            emit(Entry::Failed(name, io_problem("open", shard, &e)))?;
            return Ok(());
        }
    };
    let mut archive = tar::Archive::new(std::io::BufReader::with_capacity(1 << 20, file));
    let entries = match archive.entries() {
        Ok(e) => e,
        Err(e) => {
            emit(Entry::Failed(name, io_problem("read", shard, &e)))?;
            return Ok(());
        }
    };
    let mut current: Option<Sample> = None;
    let mut samples = 0u64;
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => {
                let problem = cut_short(shard, e.to_string());
                let failed = match current.take() {
                    // The cut may have taken members of this sample: it is not sent.
                    Some(s) => Entry::Failed(s.key, problem),
                    None => Entry::Failed(format!("{name}#{samples}"), problem),
                };
                emit(failed)?;
                return Ok(());
            }
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let member = entry.path().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
        let Some((key, ext)) = split_member(&member) else { continue };
        if current.as_ref().is_some_and(|s| s.key != key) {
            samples += 1;
            if !emit(current.take().expect("a sample").into_entry())? {
                return Ok(());
            }
        }
        let sample = current.get_or_insert(Sample { key, image: None, text: None, url: None, problem: None });
        if sample.problem.is_some() {
            continue;
        }
        let size = entry.size();
        let read = if IMAGE_EXTENSIONS.contains(&ext.as_str()) && sample.image.is_none() {
            read_member(&mut entry, size, limit as u64, shard, &member).map(|b| sample.image = Some(b))
        } else if ext == "txt" && sample.text.is_none() {
            read_member(&mut entry, size, limit as u64, shard, &member).and_then(|b| {
                let text = String::from_utf8(b).map_err(|_| {
                    Problem::new("INVALID_ARGUMENT", client_reason::INVALID_VALUE, format!("{member} is not UTF-8"))
                })?;
                sample.text = Some(text);
                Ok(())
            })
        } else if ext == "json" && size <= MAX_JSON_BYTES {
            read_member(&mut entry, size, MAX_JSON_BYTES, shard, &member).map(|b| {
                sample.url = serde_json::from_slice::<serde_json::Value>(&b)
                    .ok()
                    .and_then(|v| v.get("url")?.as_str().map(str::to_string));
            })
        } else {
            Ok(())
        };
        if let Err(p) = read {
            let broken = p.code == "DATA_LOSS";
            sample.problem = Some(p);
            if broken {
                emit(current.take().expect("a sample").into_entry())?;
                return Ok(());
            }
        }
    }
    if let Some(s) = current {
        emit(s.into_entry())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_split_at_the_first_dot_of_the_file_name() {
        assert_eq!(split_member("000001.jpg"), Some(("000001".into(), "jpg".into())));
        assert_eq!(split_member("./a/b.c/000001.seg.PNG"), Some(("a/b.c/000001".into(), "seg.png".into())));
        assert_eq!(split_member("README"), None);
        assert_eq!(split_member(".hidden"), None);
        assert_eq!(split_member("key."), None);
    }

    fn tar_of(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in members {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn read_all(path: &Path, limit: usize) -> Vec<Entry> {
        let mut out = Vec::new();
        read(path, limit, &mut |e| {
            out.push(e);
            Ok(true)
        })
        .unwrap();
        out
    }

    #[test]
    fn samples_are_grouped_by_key_and_broken_ones_fail_once() {
        let dir = std::env::temp_dir().join(format!("clipserve-wds-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tar = tar_of(&[
            ("a.jpg", b"JPEG"),
            ("a.txt", b"a cat"),
            ("a.json", br#"{"url": "http://x/a.jpg", "caption": "a cat"}"#),
            ("b.txt", b"short"),
            ("c.json", b"{}"),
            ("d.png", b"0123456789"),
            ("e.webp", b"WEBP"),
            ("e.cls", b"3"),
            ("f.txt", b"\xff\xfe"),
        ]);
        let path = dir.join("s.tar");
        std::fs::write(&path, &tar).unwrap();
        let got = read_all(&path, 8);
        let ids: Vec<(String, bool)> = got
            .iter()
            .map(|e| match e {
                Entry::Item(s) => (s.id.clone(), true),
                Entry::Failed(id, _) => (id.clone(), false),
            })
            .collect();
        let want = [("a", true), ("b", true), ("c", false), ("d", false), ("e", true), ("f", false)];
        assert_eq!(ids, want.map(|(k, ok)| (k.to_string(), ok)));
        let Entry::Item(a) = &got[0] else { panic!() };
        assert_eq!(a.image, Some(ImageRef::Bytes(b"JPEG".to_vec())));
        assert_eq!((a.text.as_deref(), a.url.as_deref()), (Some("a cat"), Some("http://x/a.jpg")));
        let reason = |i: usize| match &got[i] {
            Entry::Failed(_, p) => p.reason.clone(),
            _ => panic!(),
        };
        assert_eq!(reason(2), client_reason::EMPTY);
        assert_eq!(reason(3), client_reason::TOO_LARGE, "10 bytes over a limit of 8");
        assert_eq!(reason(5), client_reason::INVALID_VALUE);

        // Cut inside the second sample's text: the first sample is whole, the second fails, nothing follows.
        let cut = dir.join("cut.tar");
        std::fs::write(&cut, &tar[..512 * 7 + 3]).unwrap();
        let got = read_all(&cut, 1 << 20);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(matches!(&got[0], Entry::Item(s) if s.id == "a"));
        assert!(matches!(&got[1], Entry::Failed(id, p) if id == "b" && p.code == "DATA_LOSS"), "{got:?}");

        // Not a tar at all, and a missing shard: one failure each, named after the file.
        let junk = dir.join("junk.tar");
        std::fs::write(&junk, vec![0x41u8; 2000]).unwrap();
        let got = read_all(&junk, 1 << 20);
        assert!(matches!(&got[..], [Entry::Failed(id, _)] if id.ends_with("junk.tar#0")), "{got:?}");
        let got = read_all(&dir.join("missing.tar"), 1 << 20);
        assert!(matches!(&got[..], [Entry::Failed(_, p)] if p.reason == client_reason::NOT_FOUND), "{got:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
