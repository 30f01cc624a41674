"""Document sources, trimming and packing, sharding, resumable streams and the data module's checks."""

from __future__ import annotations

import itertools
import json
import random
from functools import partial
from pathlib import Path

import pytest
import torch
import zstandard
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

import lenscope.datamodules.lens_data as lens_data
from lenscope.datamodules.lens_data import DocumentStream, LensDataModule, seeded_shuffle
from lenscope.datamodules.preprocessing import (
    IGNORE,
    Packer,
    TrimSettings,
    collate,
    keep_for_trimming,
    offset_pairs,
    trim_sample,
)
from lenscope.datamodules.sources import DataSourceError, DocumentSource
from lenscope.errors import ConfigError
from tests.conftest import make_tokenizer, write_corpus

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")

EOS = 2


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def texts_of(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def make_stream(
    path: Path,
    tok,
    *,
    split: str = "train",
    mode: str = "pack",
    seq_len: int = 64,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    holdout_every: int = 10,
    trim: TrimSettings | None = None,
    repeat: bool = False,
    max_docs: int | None = None,
    rank: int = 0,
    world_size: int = 1,
):
    return DocumentStream(
        DocumentSource(str(path)),
        tok,
        split=split,
        mode=mode,
        seq_len=seq_len,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        holdout_every=holdout_every,
        trim=trim or TrimSettings(),
        repeat=repeat,
        max_docs=max_docs,
        rank=rank,
        world_size=world_size,
    )


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


# --- sources --------------------------------------------------------------------------------------


def test_jsonl_source_preserves_order(corpus):
    expected = texts_of(corpus)
    source = DocumentSource(str(corpus))
    assert list(source) == expected
    assert list(source) == expected  # re-iterable, same order
    assert source.skipped.total() == 0


def test_zst_source_equals_plain(tmp_path, corpus):
    data = corpus.read_bytes()
    half = data.index(b"\n", len(data) // 2) + 1
    compressor = zstandard.ZstdCompressor()
    # Two frames, the second written as a stream (no content size in the header).
    stream = compressor.compressobj()
    zst = tmp_path / "corpus.jsonl.zst"
    zst.write_bytes(
        compressor.compress(data[:half]) + stream.compress(data[half:]) + stream.flush()
    )
    assert list(DocumentSource(str(zst))) == texts_of(corpus)


def test_folder_source_reads_files_in_sorted_order(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    write_lines(folder / "b.jsonl", [json.dumps({"text": "w2"}).encode()])
    write_lines(folder / "a.jsonl", [json.dumps({"text": "w1"}).encode()])
    (folder / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "w3"}\n'))
    assert list(DocumentSource(str(folder))) == ["w1", "w2", "w3"]
    assert list(DocumentSource(str(folder / "*.jsonl"))) == ["w1", "w2"]


def test_empty_texts_are_skipped_and_counted(tmp_path):
    path = write_lines(
        tmp_path / "d.jsonl",
        [b'{"text": "w1 w2"}', b'{"text": ""}', b"", b'{"text": "  \\n "}', b'{"text": "w3"}'],
    )
    source = DocumentSource(str(path))  # the default policy: empty texts are not errors
    assert list(source) == ["w1 w2", "w3"]
    assert source.skipped.counts == {"empty text": 2}


BAD_RECORDS = {
    "no text field": (b'{"body": "w1"}', "no 'text' field"),
    "text not a string": (b'{"text": 5}', "'text' is a int, not a string"),
    "invalid json": (b'{"text": "w1"', "not valid JSON"),
    "not an object": (b'["w1"]', "not a JSON object"),
    "invalid utf-8": (b'{"text": "w1 \xff\xfe"}', "not valid UTF-8"),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_record_raises_naming_file_and_line(tmp_path, case):
    bad, message = BAD_RECORDS[case]
    path = write_lines(tmp_path / "d.jsonl", [b'{"text": "w1"}', b"", bad, b'{"text": "w2"}'])
    with pytest.raises(DataSourceError) as info:
        list(DocumentSource(str(path)))
    assert f"{path}:3: " in str(info.value)  # line numbers count blank lines, like an editor
    assert message in str(info.value)
    assert "on_bad_record skip" in str(info.value)


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_record_skipped_and_counted(tmp_path, case):
    bad, message = BAD_RECORDS[case]
    path = write_lines(tmp_path / "d.jsonl", [b'{"text": "w1"}', bad, b'{"text": "w2"}', bad])
    source = DocumentSource(str(path), on_bad_record="skip")
    assert list(source) == ["w1", "w2"]
    assert source.skipped.total() == 2
    assert any(message in reason for reason in source.skipped.counts)


def test_text_field_setting(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [b'{"body": "w1", "text": 3}'])
    assert list(DocumentSource(str(path), text_field="body")) == ["w1"]


def test_unknown_bad_record_policy():
    with pytest.raises(DataSourceError, match="on_bad_record"):
        DocumentSource("x.jsonl", on_bad_record="ignore")


def _zst_corpus(tmp_path: Path, corpus: Path) -> bytes:
    return zstandard.ZstdCompressor().compress(corpus.read_bytes())


def test_truncated_zst_is_refused(tmp_path, corpus):
    data = _zst_corpus(tmp_path, corpus)
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(data[: len(data) - 20])
    with pytest.raises(DataSourceError, match=f"{path} is truncated"):
        list(DocumentSource(str(path)))


def test_garbage_zst_is_refused(tmp_path, corpus):
    path = tmp_path / "junk.jsonl.zst"
    path.write_bytes(b"this is not zstd at all\n" * 10)
    with pytest.raises(DataSourceError, match=f"{path} is not a valid zstd file"):
        list(DocumentSource(str(path)))
    # Damage after a valid frame is refused too, not silently ignored.
    path.write_bytes(_zst_corpus(tmp_path, corpus) + b"trailing garbage")
    with pytest.raises(DataSourceError, match=f"{path} is not a valid zstd file"):
        list(DocumentSource(str(path)))


def test_missing_path_is_refused(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataSourceError, match="no data found"):
        DocumentSource(missing).check()
    with pytest.raises(DataSourceError, match="no data found"):
        list(DocumentSource(missing))
    with pytest.raises(DataSourceError, match="no data found"):
        list(DocumentSource(str(tmp_path / "*.jsonl")))


# --- shuffle --------------------------------------------------------------------------------------


@pytest.mark.parametrize("buffer_size", [1, 7, 100, 1000])
def test_seeded_shuffle_is_a_deterministic_permutation(buffer_size):
    items = list(range(100))
    first = list(seeded_shuffle(iter(items), buffer_size, seed=3))
    assert sorted(first) == items
    assert list(seeded_shuffle(iter(items), buffer_size, seed=3)) == first
    if buffer_size > 1:
        assert first != items
        assert list(seeded_shuffle(iter(items), buffer_size, seed=4)) != first


# --- trimming -------------------------------------------------------------------------------------


def test_trim_filter():
    settings = TrimSettings(max_words=5, max_chars=20)
    assert keep_for_trimming("w1 w2 w3 w4", settings)
    assert not keep_for_trimming("w1 w2 w3 w4 w5", settings)  # fewer than max_words, strictly
    assert not keep_for_trimming("w100 w101 w102 w103", TrimSettings(max_words=50, max_chars=19))
    assert keep_for_trimming("w100 w101 w102 w103", TrimSettings(max_words=50, max_chars=20))


def test_trim_stream_applies_filter(tmp_path, tok):
    path = write_corpus(tmp_path / "c.jsonl", 60, words=(5, 40))
    texts = texts_of(path)
    stream = make_stream(
        path, tok, mode="trim", trim=TrimSettings(max_words=20), holdout_every=1000
    )
    kept = [t for _, t in stream.selected()]
    expected = [t for i, t in enumerate(texts) if i % 1000 != 0 and len(t.split(" ")) < 20]
    assert kept == expected and 0 < len(kept) < len(texts) - 1


def test_trim_sample_positions_and_labels(tok):
    tokens = list(range(10, 40))
    for seed in range(20):
        sample = trim_sample(
            tokens, random.Random(seed), TrimSettings(positions_per_doc=3), seq_len=16
        )
        positions = sample["positions"]
        assert len(positions) == 3 and positions == sorted(set(positions))
        assert 0 <= positions[0] and positions[-1] <= 16 - 2
        assert sample["input_ids"] == tokens[: positions[-1] + 2]
        assert sample["labels"] == [tokens[i + 1] for i in positions]
    assert trim_sample([5], random.Random(0), TrimSettings(), seq_len=16) is None
    # lookahead keeps the tokens after the last label, up to the document's and the sequence's end
    ahead = trim_sample(tokens, random.Random(3), TrimSettings(positions_per_doc=1), seq_len=30, lookahead=3)
    [t] = ahead["positions"]
    assert ahead["input_ids"] == tokens[: min(t + 5, 30)]


def test_offset_pairs_match_t_with_t_plus_k_inside_each_document():
    batch = collate([{"input_ids": [1, 2, 3, 4, 5], "positions": [0, 1, 2, 3, 4], "labels": [2, 3, 4, 5, IGNORE]},
                     {"input_ids": [7, 8, 9], "positions": [1], "labels": [9]}], pad_id=0)
    same = offset_pairs(batch, 0)
    assert same.source.tolist() == same.target.tolist() == list(range(6))
    assert same.next_token.tolist() == [2, 3, 4, 5, IGNORE, 9]  # the labels, read from the tokens
    two = offset_pairs(batch, 1)
    # (row 1, t = 2) is not a read position; (row 0, t = 5) and (row 1, t = 3) are past the ends
    assert two.rows.tolist() == [0, 0, 0, 0, 1] and two.at.tolist() == [1, 2, 3, 4, 2]
    assert two.source.tolist() == [0, 1, 2, 3, 5] and two.target.tolist() == [1, 2, 3, 4, -1]
    assert two.next_token.tolist() == [3, 4, 5, IGNORE, IGNORE]


def test_trim_positions_seeded_per_document(tmp_path, tok):
    path = write_corpus(tmp_path / "c.jsonl", 30)
    settings = TrimSettings(positions_per_doc=2)

    def positions(seed):
        stream = make_stream(path, tok, mode="trim", seed=seed, trim=settings)
        return {
            ordinal: stream._samples(ordinal, text, None)[0]["positions"]
            for ordinal, text in stream.selected()
        }

    first = positions(0)
    assert positions(0) == first
    assert positions(1) != first
    # Per document, not per stream position: the shuffle order does not change a document's positions.
    stream = make_stream(path, tok, mode="trim", seed=0, trim=settings)
    samples = {tuple(s["input_ids"]): s for s in stream}
    for ordinal, text in stream.selected():
        tokens = tok(text)["input_ids"]
        sample = stream._samples(ordinal, text, None)[0]
        assert samples[tuple(sample["input_ids"])]["positions"] == first[ordinal]
        assert sample["labels"] == [tokens[i + 1] for i in sample["positions"]]


# --- packing --------------------------------------------------------------------------------------


def test_packer_loses_nothing():
    rng = random.Random(0)
    docs = [[rng.randrange(4, 200) for _ in range(rng.randint(1, 30))] for _ in range(40)]
    packer = Packer(seq_len=16, eos_id=EOS)
    chunks = [chunk for doc in docs for chunk in packer.add(doc)]
    everything = [t for doc in docs for t in doc + [EOS]]
    assert all(len(c["input_ids"]) == 16 for c in chunks)
    assert [t for c in chunks for t in c["input_ids"]] + packer.buffer == everything
    assert len(packer.buffer) < 16
    for c in chunks:
        assert c["positions"] == list(range(16))
        assert c["labels"] == c["input_ids"][1:] + [IGNORE]


def test_pack_stream_chunks_are_the_eos_joined_documents(tmp_path, tok):
    path = write_corpus(tmp_path / "c.jsonl", 40)
    stream = make_stream(path, tok, seq_len=24)
    docs = [tok(text, add_special_tokens=False)["input_ids"] for _, text in stream.documents()]
    everything = [t for doc in docs for t in doc + [EOS]]
    chunks = [s["input_ids"] for s in stream]
    assert all(len(c) == 24 for c in chunks)
    flat = [t for c in chunks for t in c]
    assert flat == everything[: len(flat)] and len(everything) - len(flat) < 24
    assert flat.count(EOS) >= len(docs) - 1


def test_collate_pads_and_masks():
    batch = collate(
        [
            {"input_ids": [5, 6, 7], "positions": [0, 2], "labels": [6, -100]},
            {"input_ids": [8], "positions": [0], "labels": [9]},
        ],
        pad_id=3,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["positions"].tolist() == [[0, 2], [0, -1]]
    assert batch["labels"].tolist() == [[6, -100], [9, -100]]


# --- splits and sharding --------------------------------------------------------------------------


def test_holdout_split_is_disjoint_from_training(tmp_path, tok):
    path = write_corpus(tmp_path / "c.jsonl", 50)
    train = [o for o, _ in make_stream(path, tok, holdout_every=5).selected()]
    val = [o for o, _ in make_stream(path, tok, split="val", holdout_every=5).selected()]
    assert val == [0, 5, 10, 15, 20, 25, 30, 35, 40, 45]
    assert not set(train) & set(val) and sorted(train + val) == list(range(50))
    val_docs = [
        o for o, _ in make_stream(path, tok, split="val", holdout_every=5, max_docs=4).documents()
    ]
    assert len(val_docs) == 4 and set(val_docs) <= set(val)


def _whole_documents(path, tok, **kwargs):
    """Trim mode with a long context and as many positions as tokens: every sample is one whole
    document, so a sample identifies the document it came from."""
    return make_stream(
        path, tok, mode="trim", seq_len=256, trim=TrimSettings(positions_per_doc=1000), **kwargs
    )


def test_every_document_read_by_exactly_one_slot(tmp_path, tok):
    path = write_corpus(tmp_path / "c.jsonl", 45)
    reference = _whole_documents(path, tok)
    ordinal_of = {tuple(tok(text)["input_ids"]): ordinal for ordinal, text in reference.selected()}
    assert len(ordinal_of) == 40  # documents are distinct

    seen: list[int] = []
    for rank in range(2):
        stream = _whole_documents(path, tok, rank=rank, world_size=2)
        loader = DataLoader(
            stream, batch_size=None, num_workers=2, collate_fn=lambda sample: sample
        )
        per_rank = [ordinal_of[tuple(s["input_ids"])] for s in loader]
        assert len(per_rank) == len(set(per_rank)) == 20  # 40 training documents over 2 ranks
        seen += per_rank
    assert sorted(seen) == sorted(ordinal_of.values())


def test_slot_rule(tmp_path, tok, monkeypatch):
    """The n-th shuffled document goes to slot n mod (world_size × workers), slot = rank × workers + worker."""
    path = write_corpus(tmp_path / "c.jsonl", 45)
    order = [o for o, _ in _whole_documents(path, tok).documents()]
    reference = _whole_documents(path, tok)
    ordinal_of = {tuple(tok(text)["input_ids"]): ordinal for ordinal, text in reference.selected()}
    for rank in range(2):
        for worker in range(2):
            info = type("WorkerInfo", (), {"id": worker, "num_workers": 2})()
            monkeypatch.setattr(lens_data, "get_worker_info", lambda info=info: info)
            stream = _whole_documents(path, tok, rank=rank, world_size=2)
            got = [ordinal_of[tuple(s["input_ids"])] for s in stream]
            assert got == order[rank * 2 + worker :: 4]


def test_empty_slot_in_endless_stream_is_an_error(tmp_path, tok):
    path = write_corpus(tmp_path / "c.jsonl", 4)  # 3 training documents
    stream = make_stream(path, tok, repeat=True, seq_len=8, rank=3, world_size=4)
    with pytest.raises(DataSourceError, match="no samples to worker slot 3 of 4"):
        next(iter(stream))


# --- resume ---------------------------------------------------------------------------------------


def _loader(stream, num_workers, batch_size=3):
    return StatefulDataLoader(
        stream,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=partial(collate, pad_id=3),
    )


def _check_resume(path, tok, num_workers, k, seq_len, batch_size=3, following=5):
    def fresh():
        return make_stream(path, tok, seq_len=seq_len, repeat=True)

    uninterrupted = list(
        itertools.islice(iter(_loader(fresh(), num_workers, batch_size)), k + following)
    )
    loader = _loader(fresh(), num_workers, batch_size)
    it = iter(loader)
    for _ in range(k):
        next(it)
    state = loader.state_dict()
    del it
    resumed_loader = _loader(fresh(), num_workers, batch_size)
    resumed_loader.load_state_dict(state)
    resumed = list(itertools.islice(iter(resumed_loader), following))
    assert len(resumed) == following
    for a, b in zip(uninterrupted[k:], resumed, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["labels"], b["labels"])
    return state


@pytest.mark.parametrize("num_workers", [0, 1])
@pytest.mark.parametrize(
    "k", [2, 5, 9]
)  # 9 batches crosses into the second pass (~23 chunks a pass)
def test_resume_continues_the_stream(tmp_path, tok, num_workers, k):
    """seq_len 64 > any document: each document gives at most one chunk, and the carry-over matters."""
    path = write_corpus(tmp_path / "c.jsonl", 40)
    _check_resume(path, tok, num_workers, k, seq_len=64)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_resume_inside_a_document_with_several_chunks(tmp_path, tok, num_workers):
    path = write_corpus(tmp_path / "c.jsonl", 40)
    _check_resume(path, tok, num_workers, k=1, seq_len=16)  # batch of 3 ends inside a document


@pytest.mark.parametrize("num_workers", [0, 1])
def test_resume_at_the_end_of_a_pass(tmp_path, tok, num_workers):
    path = write_corpus(tmp_path / "c.jsonl", 40)
    per_pass = len(list(make_stream(path, tok, seq_len=64)))
    _check_resume(path, tok, num_workers, k=per_pass, seq_len=64, batch_size=1)


def test_finite_split_is_read_whole_each_time(tmp_path, tok):
    path = write_corpus(tmp_path / "c.jsonl", 40)
    stream = make_stream(path, tok, split="val", holdout_every=2, seq_len=32)
    first = [s["input_ids"] for s in stream]
    assert first and [s["input_ids"] for s in stream] == first


def test_finite_split_is_read_whole_after_a_partial_read(tmp_path, tok):
    path = write_corpus(tmp_path / "c.jsonl", 40)
    stream = make_stream(path, tok, split="val", holdout_every=2, seq_len=32)
    n_batches = len(list(_loader(stream, 0, batch_size=2)))
    partial_read = iter(_loader(stream, 0, batch_size=2))
    next(partial_read)
    del partial_read
    assert len(list(_loader(stream, 0, batch_size=2))) == n_batches


@pytest.mark.parametrize("mode", ["pack", "trim"])
def test_finite_split_gives_every_slot_as_many_samples(tmp_path, tok, mode):
    """Uneven shares are padded with empty samples, so that every rank runs as many validation
    steps (under FSDP each step gathers the blocks: a rank that stopped early would hang the rest)."""
    path = write_corpus(tmp_path / "c.jsonl", 43, words=(5, 90))
    streams = [make_stream(path, tok, split="val", holdout_every=2, mode=mode, seq_len=32, rank=r, world_size=3)
               for r in range(3)]
    for stream in streams:
        stream.pad_shares(workers_per_rank=0)
    shares = [list(stream) for stream in streams]
    real = [[x for x in share if x["positions"]] for share in shares]
    assert len({len(share) for share in shares}) == 1, "every slot hands out as many samples"
    assert len({len(r) for r in real}) > 1, "the test needs uneven shares"
    for share, r in zip(shares, real, strict=True):
        assert share[:len(r)] == r  # the real samples first, untouched
        assert all(x["positions"] == [] and x["labels"] == [] and len(x["input_ids"]) == 1 for x in share[len(r):])
    # One process alone has nothing to pad. Trimmed samples are one per document whichever rank
    # reads it (packing packs each share on its own), so the shares add up to the whole.
    whole = list(make_stream(path, tok, split="val", holdout_every=2, mode=mode, seq_len=32))
    assert all(x["positions"] for x in whole)
    if mode == "trim":
        assert sum(len(r) for r in real) == len(whole)


# --- data module settings -------------------------------------------------------------------------


def test_datamodule_refuses_seq_len_beyond_context(corpus, tok):
    dm = LensDataModule(source=str(corpus), seq_len=512)
    with pytest.raises(ConfigError, match="--data.seq_len is 512 but the model's context is 256"):
        dm.bind(tok, 256)
    dm.bind(tok, 512)  # equal is fine
    assert dm.tokenizer is tok


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"mode": "random"}, "--data.mode"),
        ({"batch_size": 0}, "--data.batch_size"),
        ({"seq_len": 0}, "--data.seq_len"),
        ({"holdout_every": 1}, "--data.holdout_every"),
        ({"num_workers": -1}, "--data.num_workers"),
    ],
)
def test_datamodule_refuses_bad_settings(corpus, kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        LensDataModule(source=str(corpus), **kwargs)


def test_datamodule_streams_batches(corpus, tok):
    dm = LensDataModule(source=str(corpus), seq_len=16, batch_size=4, num_workers=0)
    dm.bind(tok, 256)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 16)
    val = list(dm.val_dataloader())
    assert val and all(b["input_ids"].shape[1] == 16 for b in val)


def test_byte_order_mark_on_the_first_line_is_tolerated(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "w1 w2"}).encode() + b"\n")
    assert list(DocumentSource(str(path))) == ["w1 w2"]


def test_separate_validation_source_uses_both_sources_whole(tmp_path, tok):
    train_path = write_corpus(tmp_path / "train.jsonl", 30, seed=1)
    val_path = write_corpus(tmp_path / "val.jsonl", 7, seed=2)
    dm = LensDataModule(source=str(train_path), val_source=str(val_path), mode="trim", seq_len=200,
                        val_max_docs=None, num_workers=0)
    dm.bind(tok, 256)
    train_docs = [text for _, text in dm._stream("train", 0, 1).selected()]
    val_docs = [text for _, text in dm._stream("val", 0, 1).selected()]
    assert len(train_docs) == 30 and len(val_docs) == 7
    assert not set(train_docs) & set(val_docs)
