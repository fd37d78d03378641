//! GPT-2's byte-level BPE through the `tokenizers` crate, and streaming decode.

use std::path::Path;

use crate::error::{Error, Result};
use crate::request::check_token_ids;

/// The committed GPT-2 tokenizer (`weights/gpt2/tokenizer.json`, built from
/// OpenAI's published vocab and merges; see `weights/gpt2/README.md`),
/// embedded so that every binary works without files or network.
const BUILTIN: &[u8] = include_bytes!("../weights/gpt2/tokenizer.json");

/// GPT-2's `<|endoftext|>`.
pub const EOS_TOKEN: u32 = 50256;

pub struct Gpt2Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Cached: `tokenizers` rebuilds the whole vocabulary map to count it.
    vocab_size: usize,
}

impl Gpt2Tokenizer {
    /// The built-in GPT-2 tokenizer.
    pub fn builtin() -> Self {
        let inner = tokenizers::Tokenizer::from_bytes(BUILTIN).expect("the embedded tokenizer.json parses");
        Self::new(inner)
    }

    /// A `tokenizer.json` from disk.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = crate::files::read_bounded(path, crate::files::TOKENIZER_LIMIT)?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self::new(inner))
    }

    fn new(inner: tokenizers::Tokenizer) -> Self {
        let vocab_size = inner.get_vocab_size(true);
        Gpt2Tokenizer { inner, vocab_size }
    }

    /// Text to ids. `<|endoftext|>` in the text becomes the special token 50256.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids to text; special tokens are kept (so `decode(encode(s)) == s`).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        check_token_ids(ids.iter().copied(), self.vocab_size())?;
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The bytes token `id` stands for. GPT-2's byte-level BPE may split a
    /// UTF-8 character over several tokens, whose bytes alone `decode` can
    /// show only as U+FFFD; these are the bytes themselves (llama-server's
    /// `/tokenize` pieces, OpenAI's logprob `bytes`).
    pub fn token_bytes(&self, id: u32) -> Result<Vec<u8>> {
        check_token_ids([id], self.vocab_size())?;
        let token = self
            .inner
            .id_to_token(id)
            .ok_or_else(|| Error::Tokenizer(format!("token id {id} has no text")))?;
        // As the byte-level decoder reads a token: each character is the
        // byte it stands for, unless one is not (an added token such as
        // `<|endoftext|>` written as plain text), then the text's own bytes.
        Ok(token
            .chars()
            .map(byte_of)
            .collect::<Option<Vec<u8>>>()
            .unwrap_or_else(|| token.into_bytes()))
    }
}

/// GPT-2's byte-level alphabet read backwards (`bytes_to_unicode` in
/// OpenAI's `encoder.py`): the bytes that print (`!`..`~`, `¡`..`¬`,
/// `®`..`ÿ`) stand for themselves; the other 68, in order, are written as
/// U+0100 onwards (a space is `Ġ`, U+0120).
fn byte_of(c: char) -> Option<u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    match u32::from(c) {
        n @ 0..=255 if printable(n as u8) => Some(n as u8),
        n @ 256..=323 => (0..=255u8).filter(|&b| !printable(b)).nth((n - 256) as usize),
        _ => None,
    }
}

/// Turns a stream of token ids into text pieces without ever emitting half a
/// UTF-8 character: a character split over several byte-level tokens decodes
/// to U+FFFD until its last byte arrives. Like candle's `TokenOutputStream`,
/// it re-decodes from a saved offset instead of decoding token by token.
pub struct TextStream<'t> {
    tokenizer: &'t Gpt2Tokenizer,
    ids: Vec<u32>,
    /// `ids[..prefix]` has been emitted; `ids[prefix..]` not yet.
    prefix: usize,
    /// The text of `ids[context..prefix]`, a little context so that merged
    /// pieces (e.g. a leading space) decode as they would in full text.
    context: usize,
}

impl<'t> TextStream<'t> {
    pub fn new(tokenizer: &'t Gpt2Tokenizer) -> Self {
        TextStream {
            tokenizer,
            ids: Vec::new(),
            prefix: 0,
            context: 0,
        }
    }

    /// Adds a token; returns the new text, if a complete piece is ready.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let done = self.tokenizer.decode(&self.ids[self.context..self.prefix])?;
        let all = self.tokenizer.decode(&self.ids[self.context..])?;
        if all.len() > done.len() && !all.ends_with('\u{FFFD}') && all.starts_with(&done) {
            let piece = all[done.len()..].to_string();
            self.context = self.prefix;
            self.prefix = self.ids.len();
            Ok(Some(piece))
        } else {
            Ok(None)
        }
    }

    /// Whatever is still held back (e.g. an incomplete character at the end).
    pub fn finish(&mut self) -> Result<Option<String>> {
        let done = self.tokenizer.decode(&self.ids[self.context..self.prefix])?;
        let all = self.tokenizer.decode(&self.ids[self.context..])?;
        self.prefix = self.ids.len();
        self.context = self.prefix;
        Ok((all.len() > done.len()).then(|| all.get(done.len()..).unwrap_or(&all).to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every token's bytes read as text (lossily) are its decoded text, and
    /// the bytes of a text's tokens, split characters included, are the text.
    #[test]
    fn token_bytes_are_what_decode_reads() {
        let tok = Gpt2Tokenizer::builtin();
        for id in 0..tok.vocab_size() as u32 {
            let bytes = tok.token_bytes(id).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&bytes),
                tok.decode(&[id]).unwrap(),
                "token {id}"
            );
        }
        assert_eq!(tok.token_bytes(220).unwrap(), b" ");
        assert_eq!(tok.token_bytes(EOS_TOKEN).unwrap(), b"<|endoftext|>");
        let text = "na\u{ef}ve \u{1F917} \u{5ABD} caf\u{e9}<|endoftext|>";
        let ids = tok.encode(text).unwrap();
        let split = ids
            .iter()
            .filter(|&&id| std::str::from_utf8(&tok.token_bytes(id).unwrap()).is_err());
        assert!(split.count() > 0, "{ids:?}: no token holds part of a character");
        let joined: Vec<u8> = ids.iter().flat_map(|&id| tok.token_bytes(id).unwrap()).collect();
        assert_eq!(joined, text.as_bytes());
        assert!(tok.token_bytes(tok.vocab_size() as u32).is_err());
    }
}
