"""A real CLIP BPE tokenizer whose merges the project learns itself.

CLIP's tokenizer is byte-level BPE: text is lower-cased, split into words, each word's UTF-8 bytes
are mapped to printable unicode symbols, the last symbol carries the `</w>` end-of-word suffix,
and learned merges join symbols. We learn the merges from the caption grammar plus a list of
common English words (services.tinymodel.words) and keep merging until every corpus word is a
single token, so `dog`, `box`, `toy` work as textual-inversion initialisers and class nouns.

The learner is ours rather than `tokenizers.trainers.BpeTrainer`: that trainer breaks count ties
by ids that depend on hash-map iteration order, and measured here it produced three different
merge lists in four runs on the same corpus. Ours breaks ties lexicographically, so the same
corpus always gives byte-identical vocab.json / merges.txt.
"""

from __future__ import annotations

import json
from collections import defaultdict
from itertools import pairwise
from pathlib import Path

from services.tinymodel.data import caption_words
from services.tinymodel.words import common_words

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
SUFFIX = "</w>"
MODEL_MAX_LENGTH = 77
CAPTION_WORD_COUNT = 100  # caption words dominate merge order; list words only need to complete
LIST_WORD_COUNT = 10

Pair = tuple[str, str]


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable-character table (printable bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


def word_symbols(word: str, byte_map: dict[int, str]) -> list[str]:
    """A word as byte symbols, the last one carrying the end-of-word suffix."""
    symbols = [byte_map[b] for b in word.encode("utf-8")]
    symbols[-1] += SUFFIX
    return symbols


def corpus_word_counts() -> dict[str, int]:
    """Weighted word counts of the tokenizer's training corpus."""
    counts: dict[str, int] = {}
    for word in common_words():
        counts[word] = counts.get(word, 0) + LIST_WORD_COUNT
    for word in caption_words():
        counts[word] = counts.get(word, 0) + CAPTION_WORD_COUNT
    return counts


def _pairs(symbols: list[str]) -> list[Pair]:
    return list(pairwise(symbols))


def _merge_word(symbols: list[str], pair: Pair) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def learn_merges(word_counts: dict[str, int], min_frequency: int = 1) -> list[Pair]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair (ties: smallest pair first)."""
    byte_map = bytes_to_unicode()
    words = [word_symbols(w, byte_map) for w in sorted(word_counts)]
    counts = [word_counts[w] for w in sorted(word_counts)]
    pair_counts: dict[Pair, int] = defaultdict(int)
    where: dict[Pair, set[int]] = defaultdict(set)
    for idx, symbols in enumerate(words):
        for pair in _pairs(symbols):
            pair_counts[pair] += counts[idx]
            where[pair].add(idx)
    merges: list[Pair] = []
    while pair_counts:
        best = min(pair_counts, key=lambda p: (-pair_counts[p], p))
        if pair_counts[best] < min_frequency:
            break
        merges.append(best)
        for idx in sorted(where.pop(best)):
            for pair in _pairs(words[idx]):
                pair_counts[pair] -= counts[idx]
                if pair_counts[pair] <= 0:
                    pair_counts.pop(pair, None)
            words[idx] = _merge_word(words[idx], best)
            for pair in _pairs(words[idx]):
                pair_counts[pair] += counts[idx]
                where[pair].add(idx)
        pair_counts.pop(best, None)
    return merges


def build_vocab(merges: list[Pair]) -> dict[str, int]:
    """CLIP's vocabulary layout: bytes, bytes + `</w>`, merge results in order, then BOS and EOS."""
    symbols = list(bytes_to_unicode().values())
    ordered = [*symbols, *(s + SUFFIX for s in symbols), *("".join(m) for m in merges), BOS, EOS]
    vocab: dict[str, int] = {}
    for token in ordered:
        vocab.setdefault(token, len(vocab))
    return vocab


def tokenizer_config() -> dict[str, object]:
    """tokenizer_config.json as Stable Diffusion 1.x ships it (pad = end-of-text, 77 positions)."""
    return {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }


def write_tokenizer(out_dir: Path) -> dict[str, int]:
    """Learn the merges and write a CLIPTokenizer folder; returns the vocabulary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(corpus_word_counts())
    vocab = build_vocab(merges)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=None) + "\n",
                                        encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (out_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return vocab
