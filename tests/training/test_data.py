"""Tests of scrimp/training/data.py: corpus, split, packing, deterministic resumable stream, loaders."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from scrimp.training.data import (
    BlockStreamLoader,
    TextDataModule,
    ValShardLoader,
    pack_blocks,
    split_by_key,
    stdlib_corpus_files,
    stream_indices,
)


def test_stdlib_corpus_is_sorted_stdlib_python_without_site_packages():
    files = stdlib_corpus_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    assert len(files) > 100
    assert files == sorted(files)
    assert all(f.suffix == ".py" and root in f.parents for f in files)
    assert not any("site-packages" in f.parts for f in files)
    assert root / "os.py" in files


def test_split_is_deterministic_and_independent_of_other_documents():
    keys = [f"pkg/mod{i}.py" for i in range(400)]
    train, val = split_by_key(keys, 0.1)
    assert sorted(train + val) == list(range(400)) and not set(train) & set(val)
    assert 10 < len(val) < 80  # about 10% by hash
    # Brute force: each half of the corpus, split on its own, puts every file where the whole did.
    val_keys = {keys[i] for i in val}
    half = keys[::2]
    _, half_val = split_by_key(half, 0.1)
    assert {half[i] for i in half_val} == {k for k in half if k in val_keys}


def test_split_keeps_one_document_on_each_side():
    train, val = split_by_key(["a.py", "b.py"], 0.01)
    assert len(train) == 1 and len(val) == 1


def test_pack_blocks_matches_plain_concatenation():
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 50, size=n).tolist() for n in (5, 0, 17, 3, 9)]
    eos = 0
    flat = [t for d in docs for t in [*d, eos]]  # reference: python lists
    blocks = pack_blocks(docs, 7, eos)
    assert blocks.shape == (len(flat) // 7, 7)
    assert blocks.reshape(-1).tolist() == flat[: blocks.size]


def test_stream_is_a_permutation_per_epoch_and_resumes_exactly():
    n = 13
    stream = stream_indices(n, seed=3, start=0, count=3 * n)
    for epoch in range(3):
        assert sorted(stream[epoch * n : (epoch + 1) * n].tolist()) == list(range(n))
    assert not np.array_equal(stream[:n], stream[n : 2 * n])  # reshuffled each epoch
    assert np.array_equal(stream_indices(n, 3, 7, 20), stream[7:27])  # any start position
    assert not np.array_equal(stream_indices(n, 4, 0, n), stream[:n])  # the seed matters


def test_loader_shards_give_the_single_process_global_batches():
    blocks = np.arange(40 * 4).reshape(40, 4)
    single = list(BlockStreamLoader(blocks, batch_size=6, num_batches=10, seed=1))
    ranks = [list(BlockStreamLoader(blocks, batch_size=3, num_batches=10, seed=1, rank=r, world_size=2))
             for r in range(2)]
    for b in range(10):
        joined = np.concatenate([ranks[0][b]["input_ids"].numpy(), ranks[1][b]["input_ids"].numpy()])
        assert np.array_equal(joined, single[b]["input_ids"].numpy())
    resumed = list(BlockStreamLoader(blocks, batch_size=6, num_batches=10, seed=1, start_batch=4))
    assert len(resumed) == 6
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(resumed, single[4:]))


@pytest.mark.parametrize("count,world,batch", [(7, 2, 2), (8, 2, 3), (5, 4, 1), (2, 3, 2), (9, 3, 4)])
def test_val_shards_count_every_block_once_and_run_equal_batches(count, world, batch):
    blocks = np.arange(count * 3).reshape(count, 3)
    shards = [list(ValShardLoader(blocks, batch, rank=r, world_size=world)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # the same number of (collective) forward passes per rank
    assert all(len(ValShardLoader(blocks, batch, rank=r, world_size=world)) == len(shards[r]) for r in range(world))
    counted = {}
    for shard in shards:
        for b in shard:
            for row, w in zip(b["input_ids"].numpy(), b["weight"].numpy()):
                assert w in (0.0, 1.0)
                counted[int(row[0]) // 3] = counted.get(int(row[0]) // 3, 0) + w
    assert {k: v for k, v in counted.items() if v} == {i: 1.0 for i in range(count)}


def _write_corpus(folder: Path, kind: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    texts = [f"def function_{i}(x):\n    return x * {i} + {i * i}\n" * 20 for i in range(12)]
    if kind == "txt":
        for i, t in enumerate(texts):
            (folder / f"doc{i}.txt").write_text(t)
        return folder
    if kind == "jsonl":
        path = folder / "docs.jsonl"
        path.write_text("\n".join(json.dumps({"body": t}) for t in texts))
        return path
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = folder / "docs.parquet"
    pq.write_table(pa.table({"body": texts}), path)
    return path


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_local_files_load_tokenize_and_pack(tmp_path, kind):
    path = _write_corpus(tmp_path / "corpus", kind)
    field = "text" if kind == "txt" else "body"
    dm = TextDataModule(source="files", path=str(path), text_field=field, vocab_size=300, block_size=16,
                        batch_size=2, val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    dm.prepare()
    assert dm.stats["documents_train"] + dm.stats["documents_val"] == 12
    assert dm.stats["documents_val"] >= 1
    assert dm.train_blocks.shape[1] == 16 and dm.train_blocks.max() < dm.tokenizer.vocab_size
    # The tokenizer round-trips the text it was trained on (byte-level BPE is lossless).
    sample = "def function_3(x):\n    return x * 3 + 9\n"
    assert dm.tokenizer.decode(dm.tokenizer.encode_batch([sample])[0]) == sample
    batch = next(iter(dm.train_dataloader()))
    assert tuple(batch["input_ids"].shape) == (2, 16)


def test_cache_is_reused_and_equals_a_clean_build(tmp_path):
    kwargs = dict(source="stdlib", max_documents=12, vocab_size=300, block_size=16, batch_size=2)
    first = TextDataModule(cache_dir=str(tmp_path / "c1"), **kwargs)
    first.prepare()
    tokenizer_file = Path(first.tokenizer.name)
    stamp = tokenizer_file.stat().st_mtime_ns
    again = TextDataModule(cache_dir=str(tmp_path / "c1"), **kwargs)
    again.prepare()
    assert tokenizer_file.stat().st_mtime_ns == stamp  # not retrained
    clean = TextDataModule(cache_dir=str(tmp_path / "c2"), **kwargs)
    clean.prepare()
    assert np.array_equal(again.train_blocks, clean.train_blocks)
    assert np.array_equal(again.val_blocks_array, clean.val_blocks_array)


def test_missing_path_is_one_sentence(tmp_path):
    with pytest.raises(ValueError, match=r"^data.path '.*nowhere' does not exist$"):
        TextDataModule(source="files", path=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="data.path is not set"):  # data=text_files left at its ??? marker
        TextDataModule(source="files", path="???")


def test_glob_matching_nothing_is_one_sentence(tmp_path):
    with pytest.raises(ValueError, match=r"^data.path '.*\*\.jsonl' matches no data files"):
        TextDataModule(source="files", path=str(tmp_path / "*.jsonl"))


def test_empty_corpus_is_one_sentence(tmp_path):
    for i in range(3):
        (tmp_path / f"empty{i}.txt").write_text("  \n")
    dm = TextDataModule(source="files", path=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"^the corpus .* is empty: it has no text$"):
        dm.prepare()


def test_cache_tells_text_fields_apart(tmp_path):
    # Same file, another column: the cached tokens and tokenizer of the first must not be reused.
    path = tmp_path / "docs.jsonl"
    rows = [{"body": f"def function_{i}(x):\n    return x * {i}\n" * 30, "title": f"function {i}"} for i in range(12)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    kwargs = dict(source="files", path=str(path), vocab_size=300, block_size=4, batch_size=2, val_fraction=0.2)
    body = TextDataModule(text_field="body", cache_dir=str(tmp_path / "shared"), **kwargs)
    body.prepare()
    title = TextDataModule(text_field="title", cache_dir=str(tmp_path / "shared"), **kwargs)
    title.prepare()
    clean = TextDataModule(text_field="title", cache_dir=str(tmp_path / "clean"), **kwargs)
    clean.prepare()
    assert title.stats["tokens_train"] == clean.stats["tokens_train"] < body.stats["tokens_train"]
    assert np.array_equal(title.train_blocks, clean.train_blocks)
