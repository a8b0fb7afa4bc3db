"""The tiny model's CLIP BPE tokenizer: learned merges, CLIP-compatible files, whole words."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer, CLIPTokenizer, CLIPTokenizerFast

from services.tinymodel.assets import PRETRAINED_DIR
from services.tinymodel.data import caption_words
from services.tinymodel.tokenizer import BOS, EOS, SUFFIX, bytes_to_unicode, write_tokenizer
from services.tinymodel.words import common_words

FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    write_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def tokenizer(tok_dir: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(tok_dir)


@pytest.mark.parametrize("word", ["dog", "box", "toy", "cat", "red", "photo", "sks", "checkered"])
def test_common_words_are_single_tokens(tokenizer: CLIPTokenizer, word: str) -> None:
    # diffusers' textual-inversion recipe refuses an initializer that encodes to more than one id
    ids = tokenizer.encode(word, add_special_tokens=False)
    assert len(ids) == 1
    assert tokenizer.convert_ids_to_tokens(ids) == [word + SUFFIX]


def test_every_corpus_word_is_one_token(tokenizer: CLIPTokenizer) -> None:
    split = {w: tokenizer.tokenize(w) for w in [*common_words(), *caption_words()]}
    assert {w: t for w, t in split.items() if len(t) != 1} == {}


def test_unknown_text_still_encodes_and_round_trips(tokenizer: CLIPTokenizer) -> None:
    text = "A Xylophone-playing zebra, 42 times! naïve café ☃"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert len(ids) > 10  # unseen words fall back to sub-words and bytes
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == text.lower().replace(" ", "")


def test_pads_and_truncates_to_77(tokenizer: CLIPTokenizer) -> None:
    assert tokenizer.model_max_length == 77
    short = tokenizer("a red circle", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(short) == 77
    assert short[:5] == [tokenizer.bos_token_id, *tokenizer.encode("a red circle", add_special_tokens=False),
                         tokenizer.eos_token_id]
    assert set(short[5:]) == {tokenizer.pad_token_id} and tokenizer.pad_token == EOS
    long = tokenizer("dog " * 200, padding="max_length", truncation=True,
                     max_length=tokenizer.model_max_length).input_ids
    assert len(long) == 77 and long[-1] == tokenizer.eos_token_id


def test_vocab_has_clip_layout(tok_dir: Path) -> None:
    vocab = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    symbols = list(bytes_to_unicode().values())
    assert [t for t, i in sorted(vocab.items(), key=lambda kv: kv[1])][:512] == symbols + [s + SUFFIX for s in symbols]
    assert vocab[BOS] == len(vocab) - 2 and vocab[EOS] == len(vocab) - 1
    merges = (tok_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version")
    assert all("".join(m.split(" ")) in vocab for m in merges[1:])


def test_files_are_deterministic_and_match_the_committed_asset(tok_dir: Path, tmp_path: Path) -> None:
    write_tokenizer(tmp_path)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (tok_dir / name).read_bytes(), name
        assert (PRETRAINED_DIR / "tokenizer" / name).read_bytes() == (tok_dir / name).read_bytes(), name


def test_loads_as_fast_and_auto_tokenizer(tok_dir: Path, tokenizer: CLIPTokenizer) -> None:
    text = "a photo of a small blue star on a gray background, top left"
    for cls in (CLIPTokenizerFast, AutoTokenizer):
        other = cls.from_pretrained(tok_dir)
        assert other(text).input_ids == tokenizer(text).input_ids


def _reference_bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word, written out directly: merge the lowest-ranked pair until none."""
    table = bytes_to_unicode()
    symbols = [table[b] for b in word.encode("utf-8")]
    symbols[-1] += SUFFIX
    while len(symbols) > 1:
        pairs = [(ranks.get(p, 1 << 30), i) for i, p in enumerate(itertools.pairwise(symbols))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def test_matches_a_reference_bpe(tok_dir: Path, tokenizer: CLIPTokenizer) -> None:
    lines = (tok_dir / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    ranks = {tuple(line.split(" ")): i for i, line in enumerate(lines)}
    for word in ["dog", "dogs", "redish", "photographs", "zebra", "quixotic", "circles", "sksdog"]:
        assert tokenizer.tokenize(word) == _reference_bpe(word, ranks), word  # type: ignore[arg-type]
