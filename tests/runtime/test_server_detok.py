"""Streaming detokenisation: incremental (a few tokens decoded per step, never the whole sequence), and still
exact -- UTF-8 characters split over byte tokens, the spaces SentencePiece / byte-level tokens carry only in
context, and stop strings across those boundaries."""
from __future__ import annotations

import numpy as np
import pytest

from rocket_deploy.runtime.engine import Engine, SamplingParams
from rocket_deploy.runtime.server import IncrementalDetokenizer, TextGeneration

TEXT = "héllo → 世界 🎉 naïve café, ok? Ünïcödé ñ 😀😀 end"


@pytest.fixture(scope="module")
def bpe():
    """The byte-level BPE of the tiny test models (GPT-2 style: multi-byte characters are split over tokens)."""
    from rocket_deploy.testing import tiny_tokenizer
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def sentencepiece():
    """A Llama-style tokenizer: ``▁`` marks a space, unknown characters fall back to <0xNN> byte tokens, and the
    decoder strips the leading space of the text."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    pieces = ["<unk>", "<s>", "</s>", "▁Hello", "▁world", "!", "▁the", "▁", "re", "▁pr", "ice", "▁is"]
    vocab = {p: i for i, p in enumerate(pieces)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def sp_ids(tok, words: list[str]) -> list[int]:
    """Token ids for pieces; a piece that is not in the vocabulary is spelled in UTF-8 byte tokens."""
    out = []
    for w in words:
        tid = tok.convert_tokens_to_ids(w)
        if tid != tok.unk_token_id:
            out.append(tid)
        else:
            out += [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in w.encode()]
    return out


class CountingDecode:
    """Wraps a tokenizer; records the length of every ``decode`` call."""

    def __init__(self, tok):
        self.tok, self.lengths = tok, []

    def decode(self, ids, **kw):
        self.lengths.append(len(ids))
        return self.tok.decode(ids, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def stream(tok, ids: list[int]) -> tuple[list[str], CountingDecode]:
    counting = CountingDecode(tok)
    d = IncrementalDetokenizer(counting)
    deltas = [d.push(i) for i in ids]
    deltas.append(d.rest())
    return deltas, counting


def test_byte_level_utf8_split_over_tokens(bpe):
    ids = bpe(TEXT, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in bpe.decode([i]) for i in ids), "the test needs characters split over tokens"
    deltas, counting = stream(bpe, ids)
    assert "".join(deltas) == bpe.decode(ids) == TEXT
    assert not any("\ufffd" in d for d in deltas)              # an incomplete character is never released
    # a window of a few tokens (the last released piece + an incomplete 4-byte character), never the sequence:
    assert max(counting.lengths) <= 8, counting.lengths
    assert len(counting.lengths) <= 2 * len(ids) + 1
    long_ids = bpe(TEXT * 8, add_special_tokens=False)["input_ids"]
    deltas, counting_long = stream(bpe, long_ids)
    assert "".join(deltas) == TEXT * 8
    assert max(counting_long.lengths) == max(counting.lengths)   # does not grow with the length


def test_sentencepiece_spaces_and_byte_fallback(sentencepiece):
    tok = sentencepiece
    words = ["▁Hello", "▁world", "!", "▁the", "▁pr", "ice", "▁is", "▁", "€", "5", "▁", "日本", "▁", "😀",
             "!"]
    ids = sp_ids(tok, words)
    full = tok.decode(ids, skip_special_tokens=True)
    assert full == "Hello world! the price is €5 日本 😀!"
    naive = "".join(tok.decode([i]) for i in ids)
    assert naive != full                                        # per-token decoding loses spaces and characters
    deltas, counting = stream(tok, ids)
    assert "".join(deltas) == full
    assert not any("\ufffd" in d for d in deltas)
    assert deltas[1] == " world"                                # the space comes with its token, not later
    assert max(counting.lengths) <= 6, counting.lengths


def test_special_tokens_are_skipped(sentencepiece):
    tok = sentencepiece
    ids = sp_ids(tok, ["▁Hello", "</s>", "▁world"])
    deltas, _ = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True) == "Hello world"


class ScriptedEngine(Engine):
    """Generates a fixed token sequence (greedy over one-hot logits), then EOS."""

    backend = "scripted"

    def __init__(self, tokenizer, script: list[int]):
        self.tokenizer, self.script = tokenizer, list(script) + [tokenizer.eos_token_id]
        self.vocab = len(tokenizer)

    def forward(self, input_ids, attention_mask, past):
        step = 0 if past is None else past + 1
        logits = np.zeros((1, input_ids.shape[1], self.vocab), np.float32)
        logits[0, -1, self.script[min(step, len(self.script) - 1)]] = 10.0
        return logits, step


def generate(tok, script: list[int], stop=()) -> tuple[list[str], TextGeneration]:
    g = TextGeneration(ScriptedEngine(tok, script), [1], SamplingParams(max_new_tokens=200), tuple(stop))
    out = []
    for _ in range(300):
        out.append(g.step())
        if g.done:
            break
    return out, g


def test_text_generation_equals_full_decode(bpe):
    ids = bpe(TEXT, add_special_tokens=False)["input_ids"]
    deltas, g = generate(bpe, ids)
    assert g.done and g.finish_reason == "stop" and "".join(deltas) == g.text == TEXT   # EOS ends it


def test_stop_string_across_a_split_character(bpe):
    ids = bpe(TEXT, add_special_tokens=False)["input_ids"]
    deltas, g = generate(bpe, ids, stop=["世界", "never"])
    assert g.finish_reason == "stop" and g.text == "".join(deltas) == TEXT[:TEXT.index("世界")]
    deltas, g = generate(bpe, ids, stop=["🎉 na"])
    assert g.text == TEXT[:TEXT.index("🎉")]


def test_stop_string_with_sentencepiece_space(sentencepiece):
    ids = sp_ids(sentencepiece, ["▁Hello", "▁world", "!", "▁the", "▁pr", "ice"])
    deltas, g = generate(sentencepiece, ids, stop=[" the"])
    assert g.text == "".join(deltas) == "Hello world!"
    assert all(" the"[:k] not in d for d in deltas for k in (3, 4))
