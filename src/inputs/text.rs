//! CLIP tokenization through the `tokenizers` crate, with the `tokenizer.json` the export script writes.

use std::path::Path;

use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::error::{Error, Reason};

/// CLIP's BPE tokenizer: lowercasing and whitespace cleaning, start/end tokens, truncation to the context length
/// that keeps the end token.
pub struct ClipTokenizer {
    inner: Tokenizer,
    max_chars: usize,
}

impl ClipTokenizer {
    /// Loads `tokenizer.json`; texts longer than `max_chars` characters are refused.
    pub fn load(path: &Path, context_length: usize, max_chars: usize) -> anyhow::Result<Self> {
        let mut inner = Tokenizer::from_file(path).map_err(|e| anyhow::anyhow!("loading {}: {e}", path.display()))?;
        inner
            .with_truncation(Some(TruncationParams {
                max_length: context_length,
                strategy: TruncationStrategy::LongestFirst,
                direction: TruncationDirection::Right,
                stride: 0,
            }))
            .map_err(|e| anyhow::anyhow!("truncation: {e}"))?;
        inner.with_padding(None);
        Ok(ClipTokenizer { inner, max_chars })
    }

    /// Token ids of one text, start and end tokens included, unpadded.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, Error> {
        let chars = text.chars().count();
        if chars > self.max_chars {
            return Err(Error::new(
                Reason::TextTooLong,
                format!("text of {chars} characters exceeds the limit of {}", self.max_chars),
            ));
        }
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::new(Reason::InvalidText, format!("cannot tokenize text: {e}")))?;
        Ok(encoding.get_ids().iter().map(|&id| id as i64).collect())
    }
}
