"""Text data for causal-LM pre-training: load, tokenize, pack, shuffle, split.

Follows the GaLore paper's pre-training pipeline (Zhao et al., 2024: C4, T5 tokenizer, 256-token
blocks) and nanoGPT's packed-block layout, with an offline default so that everything runs without
a network: the Python standard library's own source files (``*.py`` under
``sysconfig.get_paths()['stdlib']``) tokenized by a byte-level BPE trained with ``tokenizers`` on the
training split and cached on disk.

    from scrimp.training.data import TextDataModule
    dm = TextDataModule(source="stdlib", block_size=128, batch_size=8)
    dm.setup("fit"); batch = next(iter(dm.train_dataloader()))   # {"input_ids": (8, 128) int64}
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import logging
import math
import os
import sysconfig
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)
EOS_TOKEN = "<|endoftext|>"
_CACHE_VERSION = "1"
_TEXT_SUFFIXES = {".txt", ".py", ".md", ".rst", ".text"}
_JSON_SUFFIXES = {".json", ".jsonl"}
_PARQUET_SUFFIXES = {".parquet"}
_SOURCES = ("stdlib", "files", "hub")


def default_cache_dir() -> Path:
    """Where tokenizers and token arrays are cached: ``$SCRIMP_CACHE`` or ``~/.cache/scrimp``."""
    return Path(os.environ.get("SCRIMP_CACHE", Path.home() / ".cache" / "scrimp"))


def stdlib_corpus_files() -> list[Path]:
    """The ``*.py`` files of the running interpreter's standard library, sorted.

    Third-party code that some installs put below the stdlib folder (``site-packages``,
    ``dist-packages``) is left out, so the corpus is the standard library alone.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    excluded = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not excluded & set(p.relative_to(root).parts))


def _stable_unit(key: str) -> float:
    """A number in [0, 1) from a key, the same on every machine and run (the held-out split's hash)."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) / float(16**12)


def split_by_key(keys: Sequence[str], val_fraction: float) -> tuple[list[int], list[int]]:
    """Deterministic train/validation split of documents by the hash of their keys (file paths).

    A document goes to validation when its hash falls below ``val_fraction``; the split of a
    document does not depend on which other documents exist, so adding files never moves one.
    At least one document is held out (the lowest hash) and at least one kept for training.
    """
    units = [_stable_unit(k) for k in keys]
    val = [i for i, u in enumerate(units) if u < val_fraction]
    if not val and len(keys) > 1 and val_fraction > 0:
        val = [int(np.argmin(units))]
    if len(val) == len(keys) and len(keys) > 1:
        val = val[:-1]
    val_set = set(val)
    train = [i for i in range(len(keys)) if i not in val_set]
    return train, sorted(val)


def pack_blocks(docs: Sequence[Sequence[int]], block_size: int, eos_id: int) -> np.ndarray:
    """Concatenate token lists, each followed by EOS, and cut into full ``block_size`` rows.

    The tail that does not fill a block is dropped (as in GPT-2/nanoGPT packing).
    """
    lengths = [len(d) + 1 for d in docs]
    total = sum(lengths)
    dtype = np.int32
    flat = np.empty(total, dtype=dtype)
    pos = 0
    for d in docs:
        flat[pos : pos + len(d)] = d
        flat[pos + len(d)] = eos_id
        pos += len(d) + 1
    n_blocks = total // block_size
    return flat[: n_blocks * block_size].reshape(n_blocks, block_size)


@functools.lru_cache(maxsize=4)
def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffle order of ``n`` training blocks in one epoch: a function of (seed, epoch) only.

    Cached (read-only): drawing it is O(n), about 50 ms at 2M blocks, and every batch needs it.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n)
    order.flags.writeable = False
    return order


def stream_indices(n: int, seed: int, start: int, count: int) -> np.ndarray:
    """Block indices at stream positions ``start .. start+count``; the stream is epoch after epoch."""
    out = np.empty(count, dtype=np.int64)
    pos, filled = start, 0
    while filled < count:
        epoch, offset = divmod(pos, n)
        take = min(n - offset, count - filled)
        out[filled : filled + take] = epoch_permutation(n, seed, epoch)[offset : offset + take]
        filled += take
        pos += take
    return out


class ValShardLoader:
    """One DDP rank's share of the validation blocks, each block counted exactly once over all ranks.

    Rank ``r`` of ``W`` gets blocks r, r + W, r + 2W, ... Every rank must run the same number of
    batches (the forward passes are collective under DDP), so a short share is padded with copies of
    a block that carry ``weight`` 0; the module sums per-row losses times ``weight``. Lightning's
    DistributedSampler pads by repeating real blocks with full weight instead, which biases the
    mean when the count does not divide by ``W``. Not a DataLoader, so Lightning injects no sampler.
    """

    def __init__(self, blocks: np.ndarray, batch_size: int, *, rank: int, world_size: int):
        per_rank = -(-len(blocks) // world_size)
        own = np.arange(rank, len(blocks), world_size)
        pad = per_rank - len(own)
        self.blocks, self.batch_size = blocks, batch_size
        self.index = np.concatenate([own, np.zeros(pad, dtype=own.dtype)])
        self.weight = np.concatenate([np.ones(len(own)), np.zeros(pad)]).astype(np.float32)

    def __len__(self) -> int:
        return -(-len(self.index) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(self.index), self.batch_size):
            rows = self.index[start:start + self.batch_size]
            yield {"input_ids": torch.from_numpy(self.blocks[rows].astype(np.int64)),
                   "weight": torch.from_numpy(self.weight[start:start + self.batch_size])}


class BlockStreamLoader:
    """Training batches from a deterministic, resumable stream of shuffled blocks.

    Global batch ``b`` holds stream positions ``[b*B*W, (b+1)*B*W)`` (B = per-rank batch size,
    W = world size); rank ``r`` takes its ``B`` rows from that range. So a 2-process run sees
    the same global batches as a single process with batch ``2B``, and a run resumed at batch
    ``start_batch`` sees exactly what the uninterrupted run saw from there on.

    One pass over the loader is one Lightning epoch of ``epoch_batches`` batches (default: all
    ``num_batches``). Each pass starts where the stream stands when it begins, ``start_batch``
    or, when given, ``position()`` (the module's batch counter, so that epoch ``e`` of a
    ``max_epochs`` run continues the stream instead of replaying it), and runs to the end of
    that epoch. ``len()`` is the whole epoch's length, as Lightning counts a resumed epoch's
    remaining batches from it.
    """

    def __init__(self, blocks: np.ndarray, batch_size: int, num_batches: int, *, seed: int = 0,
                 start_batch: int = 0, rank: int = 0, world_size: int = 1, epoch_batches: int | None = None,
                 position: Callable[[], int] | None = None):
        self.blocks = blocks
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.seed = seed
        self.start_batch = start_batch
        self.rank = rank
        self.world_size = world_size
        self.epoch_batches = max(int(epoch_batches or num_batches), 1)
        self.position = position

    def __len__(self) -> int:
        return min(self.epoch_batches, self.num_batches)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        n = len(self.blocks)
        global_batch = self.batch_size * self.world_size
        start = self.position() if self.position is not None else self.start_batch
        end = min((start // self.epoch_batches + 1) * self.epoch_batches, self.num_batches)
        for b in range(start, end):
            idx = stream_indices(n, self.seed, b * global_batch + self.rank * self.batch_size, self.batch_size)
            yield {"input_ids": torch.from_numpy(self.blocks[idx].astype(np.int64))}

    # Lightning checks for this interface to call a loader resumable; the position itself comes
    # from the module's batch counter (exact, unlike the loader's own count, which is one batch
    # ahead because Lightning prefetches).
    def state_dict(self) -> dict:
        return {"start_batch": self.start_batch}

    def load_state_dict(self, state: dict) -> None:
        pass


class TextTokenizer:
    """The few things the pipeline needs from a tokenizer, whichever library provides it.

    ``backend`` is a ``tokenizers.Tokenizer`` or a transformers tokenizer; both pickle, so the
    data module can travel to spawned worker processes.
    """

    def __init__(self, backend, eos_id: int, vocab_size: int, fingerprint: str, name: str):
        self.backend, self.eos_id, self.vocab_size = backend, eos_id, vocab_size
        self.fingerprint, self.name = fingerprint, name

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if hasattr(self.backend, "encode_batch"):  # tokenizers.Tokenizer
            return [e.ids for e in self.backend.encode_batch(list(texts))]
        return self.backend(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids))


def train_byte_level_bpe(texts: Sequence[str], vocab_size: int, path: Path) -> None:
    """Train a byte-level BPE (GPT-2 style, ``tokenizers``) on ``texts`` and save it atomically."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)


def load_bpe(path: Path) -> TextTokenizer:
    """A ``TextTokenizer`` from a saved ``tokenizers`` JSON file."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    return TextTokenizer(tok, eos_id=tok.token_to_id(EOS_TOKEN), vocab_size=tok.get_vocab_size(),
                         fingerprint=hashlib.sha256(path.read_bytes()).hexdigest()[:16], name=str(path))


def load_transformers_tokenizer(name: str) -> TextTokenizer:
    """A ``TextTokenizer`` around ``transformers.AutoTokenizer.from_pretrained(name)``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name)
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    if eos is None:
        raise ValueError(f"tokenizer {name!r} has no eos or sep token to separate packed documents")
    return TextTokenizer(tok, eos_id=int(eos), vocab_size=len(tok),
                         fingerprint=hashlib.sha256(f"hf:{name}".encode()).hexdigest()[:16], name=name)


def resolve_data_files(path: str | Sequence[str]) -> list[Path]:
    """Files named by a path, a directory (searched recursively) or a glob; sorted, deduplicated.

    Raises one sentence when a path does not exist or a pattern/directory matches no data file.
    """
    patterns = [path] if isinstance(path, str | os.PathLike) else list(path)
    if not patterns or "???" in map(str, patterns):  # "???": the config's missing-value marker, left unset
        raise ValueError("data.path is not set; give a file, a directory or a glob of text/json/jsonl/parquet files")
    known = _TEXT_SUFFIXES | _JSON_SUFFIXES | _PARQUET_SUFFIXES
    found: set[Path] = set()
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        if any(ch in pattern for ch in "*?["):
            matches = [Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file()]
        elif Path(pattern).is_dir():
            matches = [p for p in Path(pattern).rglob("*") if p.is_file() and p.suffix in known]
        elif Path(pattern).is_file():
            matches = [Path(pattern)]
        else:
            raise ValueError(f"data.path {pattern!r} does not exist")
        if not matches:
            raise ValueError(
                f"data.path {pattern!r} matches no data files (looked for {', '.join(sorted(known))})"
            )
        found.update(p.resolve() for p in matches)
    return sorted(found)


def _builder_for(files: Sequence[Path]) -> str:
    kinds = set()
    for f in files:
        if f.suffix in _JSON_SUFFIXES:
            kinds.add("json")
        elif f.suffix in _PARQUET_SUFFIXES:
            kinds.add("parquet")
        else:
            kinds.add("text")
    if len(kinds) > 1:
        raise ValueError(f"data.path mixes file kinds {sorted(kinds)}; give files of one kind (text, json or parquet)")
    return kinds.pop()


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _first_bad_text_line(path: Path) -> str | None:
    """Where a text file stops being text: a byte that is not UTF-8, or a NUL (a binary file)."""
    data = path.read_bytes()
    nul = data.find(b"\x00")
    try:
        data.decode("utf-8")
        bad = nul if nul >= 0 else None
        reason = "holds a NUL byte (a binary file?)"
    except UnicodeDecodeError as err:
        bad = err.start if nul < 0 else min(err.start, nul)
        reason = "is not UTF-8 text (a binary file?)"
    if bad is None:
        return None
    return f"data file {str(path)!r} {reason} at line {_line_of(data, bad)}"


def _first_bad_json_row(path: Path, text_field: str) -> str | None:
    """The first row of a json/jsonl file that is not an object with a string ``text_field``."""
    raw = path.read_bytes()
    try:
        body = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"data file {str(path)!r} is not UTF-8 text at line {_line_of(raw, err.start)}"
    stripped = body.lstrip()
    if path.suffix == ".json" and stripped.startswith("["):
        try:
            rows = [(i + 1, row) for i, row in enumerate(json.loads(body))]
            what = "element"
        except json.JSONDecodeError as err:
            return f"data file {str(path)!r} is not valid JSON at line {err.lineno} ({err.msg})"
    else:
        rows, what = [], "line"
        for lineno, line in enumerate(body.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as err:
                return f"data file {str(path)!r} line {lineno} is not valid JSON ({err.msg})"
    for number, row in rows:
        if not isinstance(row, dict):
            return f"data file {str(path)!r} {what} {number} is not a JSON object (got {type(row).__name__})"
        value = row.get(text_field)
        if value is not None and not isinstance(value, str):
            return (f"data file {str(path)!r} {what} {number} has {value!r:.40} (a {type(value).__name__}) in "
                    f"data.text_field {text_field!r}, where a string (the document's text) belongs")
    return None


def data_file_error(files: Sequence[Path], builder: str, text_field: str, err: Exception | None) -> ValueError:
    """One sentence naming the file (and line) that ``datasets`` could not read, or that holds a document
    that is not a string; found by reading the files again, only once loading has failed."""
    for path in files:
        if builder == "text":
            found = _first_bad_text_line(path)
        elif builder == "json":
            found = _first_bad_json_row(path, text_field)
        else:
            found = None
        if found:
            return ValueError(found)
    names = ", ".join(repr(str(f)) for f in files[:3]) + (" ..." if len(files) > 3 else "")
    if err is None:
        return ValueError(f"data.text_field {text_field!r} of the data files {names} holds values that are not "
                          "strings; each document must be text")
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return ValueError(f"the data files {names} could not be read as {builder} ({type(err).__name__}: {first:.200})")


@dataclass
class Documents:
    """Raw documents with stable keys (file path or row index) used for the held-out split."""

    texts: list[str]
    keys: list[str]
    identity: str  # what the corpus is, for cache keys


def _file_identity(files: Sequence[Path], root: Path | None = None) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        name = str(f.relative_to(root)) if root else str(f)
        h.update(f"{name}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:16]


def _subset(keys: Sequence[str], max_documents: int | None) -> list[int]:
    """The first ``max_documents`` documents in hash order: a fixed, spread-out slice of the corpus."""
    order = sorted(range(len(keys)), key=lambda i: hashlib.sha256(f"subset:{keys[i]}".encode()).hexdigest())
    return sorted(order[:max_documents]) if max_documents else list(range(len(keys)))


def load_documents(source: str, path=None, hub_name: str | None = None, hub_config: str | None = None,
                   text_field: str = "text", max_documents: int | None = None,
                   streaming: bool = True) -> Documents:
    """Documents of the corpus through ``datasets`` (stdlib files, local files, or a hub dataset)."""
    import datasets

    if source == "stdlib":
        files = stdlib_corpus_files()
        root = Path(sysconfig.get_paths()["stdlib"])
        keys = [str(f.relative_to(root)) for f in files]
        keep = _subset(keys, max_documents)
        files, keys = [files[i] for i in keep], [keys[i] for i in keep]
        ds = datasets.Dataset.from_dict(
            {"text": [f.read_text(encoding="utf-8", errors="replace") for f in files], "key": keys}
        )
        return Documents(list(ds["text"]), list(ds["key"]), f"stdlib:{_file_identity(files, root)}")
    if source == "files":
        if path is None:
            raise ValueError("data.path is required when data.source='files'")
        files = resolve_data_files(path)
        builder = _builder_for(files)
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **kwargs)
            if text_field not in ds.column_names:
                raise ValueError(f"data.text_field {text_field!r} is not a column of {path!r}; columns: "
                                 f"{ds.column_names}")
            texts = list(ds[text_field])  # decodes the strings: a byte that is not UTF-8 fails only here
        except Exception as err:  # noqa: BLE001 - datasets raises many types, none naming the file
            if str(err).startswith("data.text_field"):
                raise
            raise data_file_error(files, builder, text_field, err) from None
        if not all(isinstance(t, str) or t is None for t in texts):
            raise data_file_error(files, builder, text_field, None)
        if builder == "text" and len(texts) == len(files):
            keys = [str(f) for f in files]  # one document per file: split by file
            binary = next((k for k, t in zip(keys, texts) if t and "\x00" in t), None)
            if binary is not None:  # valid UTF-8 but not text: it would train on garbage
                raise ValueError(f"data file {binary!r} holds a NUL byte (a binary file?); give text files only")
        else:
            keys = [str(i) for i in range(len(texts))]
        keep = _subset(keys, max_documents)
        return Documents([texts[i] for i in keep], [keys[i] for i in keep], f"files:{_file_identity(files)}:{text_field}:{max_documents}")
    if source == "hub":
        if not hub_name:
            raise ValueError("data.hub_name is required when data.source='hub'")
        if not max_documents:
            raise ValueError("data.max_documents is required for a hub dataset (a streamed corpus has no end)")
        ds = datasets.load_dataset(hub_name, hub_config, split="train", streaming=streaming)
        texts = []
        for row in ds:
            texts.append(row[text_field])
            if len(texts) >= max_documents:
                break
        keys = [str(i) for i in range(len(texts))]
        return Documents(texts, keys, f"hub:{hub_name}:{hub_config}:{text_field}:{max_documents}")
    raise ValueError(f"data.source {source!r} is not one of {list(_SOURCES)}")


class TextDataModule(L.LightningDataModule):
    """Packed causal-LM blocks from a text corpus, with a fixed held-out validation split.

    Args:
        source: ``"stdlib"`` (default corpus, no download), ``"files"`` (``path``: text, json,
            jsonl or parquet files, a directory, or a glob) or ``"hub"`` (``hub_name``, streamed).
        tokenizer: ``None`` trains a byte-level BPE of ``vocab_size`` on the training split and
            caches it under ``cache_dir``; otherwise a transformers tokenizer name or path.
        block_size, batch_size: rows of ``block_size`` tokens, ``batch_size`` rows per rank.
        val_fraction: share of documents held out (by hash of the file path / row index).
        val_blocks: at most this many validation blocks are evaluated (the first ones, fixed).
        max_documents: use a fixed hash-chosen slice of the corpus (tests, quick runs).
        seed: the shuffle seed of the training stream (the split itself does not depend on it).
    """

    def __init__(self, source: str = "stdlib", path=None, hub_name: str | None = None,
                 hub_config: str | None = None, text_field: str = "text", tokenizer: str | None = None,
                 vocab_size: int = 4096, block_size: int = 128, batch_size: int = 8,
                 val_fraction: float = 0.05, val_blocks: int | None = 64, max_documents: int | None = None,
                 seed: int = 0, cache_dir: str | None = None, num_workers: int = 0, streaming: bool = True):
        super().__init__()
        from scrimp.training.validate import TRAIN_RULES, check_rules

        # The command line's rules, for callers who build the module in Python.
        check_rules({f"data.{k}": v for k, v in dict(
            source=source, block_size=block_size, batch_size=batch_size, vocab_size=vocab_size,
            val_fraction=val_fraction, val_blocks=val_blocks, max_documents=max_documents, seed=seed,
            num_workers=num_workers, text_field=text_field, tokenizer=tokenizer).items()}, TRAIN_RULES)
        if source == "files":
            resolve_data_files(path)  # a missing path is reported before anything is loaded
        self.source, self.path, self.hub_name, self.hub_config = source, path, hub_name, hub_config
        self.text_field, self.tokenizer_name, self.vocab_size = text_field, tokenizer, vocab_size
        self.block_size, self.batch_size, self.val_fraction = block_size, batch_size, val_fraction
        self.val_blocks, self.max_documents, self.seed = val_blocks, max_documents, seed
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.num_workers, self.streaming = num_workers, streaming
        self.tokenizer: TextTokenizer | None = None
        self.train_blocks: np.ndarray | None = None
        self.val_blocks_array: np.ndarray | None = None
        self.stats: dict = {}

    # -- preparation -------------------------------------------------------------------------
    def _tokenizer_for(self, docs: Documents, train_idx: list[int]) -> TextTokenizer:
        if self.tokenizer_name:
            return load_transformers_tokenizer(self.tokenizer_name)
        path = self.cache_dir / "tokenizers" / f"bpe-{docs.identity.replace(':', '-')}-v{self.vocab_size}.json"
        if not path.exists():
            # The first run on a corpus spends tens of seconds here: say so, rather than print nothing.
            log.info("training a byte-level BPE tokenizer (vocab %d) on %d documents; it is cached in %s for later "
                     "runs", self.vocab_size, len(train_idx), path.parent)
            started = time.perf_counter()
            train_byte_level_bpe([docs.texts[i] for i in train_idx], self.vocab_size, path)
            log.info("tokenizer trained in %.1f s", time.perf_counter() - started)
        return load_bpe(path)

    def _encoded(self, tok: TextTokenizer, docs: Documents, idx: list[int], split: str) -> list[np.ndarray]:
        """Token ids of the chosen documents, cached as one flat array plus offsets."""
        key = hashlib.sha256(f"{_CACHE_VERSION}:{docs.identity}:{tok.fingerprint}:{split}:{self.val_fraction}".encode())
        path = self.cache_dir / "tokens" / f"{split}-{key.hexdigest()[:20]}.npz"
        if path.exists():
            with np.load(path) as z:
                flat, offsets = z["flat"], z["offsets"]
        else:
            log.info("tokenizing the %s split (%d documents); the tokens are cached in %s for later runs", split,
                     len(idx), path.parent)
            started = time.perf_counter()
            encoded = tok.encode_batch([docs.texts[i] for i in idx]) if idx else []
            log.info("%s split tokenized in %.1f s", split, time.perf_counter() - started)
            lengths = np.array([len(e) for e in encoded], dtype=np.int64)
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            flat = np.concatenate([np.asarray(e, dtype=np.int32) for e in encoded]) if encoded else np.zeros(0, np.int32)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
            np.savez(tmp, flat=flat, offsets=offsets)
            os.replace(tmp, path)
        return [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]

    def prepare(self) -> None:
        """Load, split, tokenize (cached) and pack; idempotent. Raises on an empty corpus."""
        if self.train_blocks is not None:
            return
        docs = load_documents(self.source, self.path, self.hub_name, self.hub_config, self.text_field,
                              self.max_documents, self.streaming)
        nonempty = [i for i, t in enumerate(docs.texts) if t and t.strip()]
        if not nonempty:
            raise ValueError(f"the corpus (data.source={self.source!r}, data.path={self.path!r}) is empty: it has no text")
        docs = Documents([docs.texts[i] for i in nonempty], [docs.keys[i] for i in nonempty], docs.identity)
        train_idx, val_idx = split_by_key(docs.keys, self.val_fraction)
        if not val_idx:
            raise ValueError("the corpus has a single document; a held-out validation split needs at least two")
        tok = self._tokenizer_for(docs, train_idx)
        self.tokenizer = tok
        train_docs = self._encoded(tok, docs, train_idx, "train")
        val_docs = self._encoded(tok, docs, val_idx, "val")
        self.train_blocks = pack_blocks(train_docs, self.block_size, tok.eos_id)
        val = pack_blocks(val_docs, self.block_size, tok.eos_id)
        if len(val) == 0:  # a tiny held-out split: use it whole as one shorter block
            flat = pack_blocks(val_docs, 1, tok.eos_id).reshape(-1)
            val = flat[None, : min(len(flat), self.block_size)]
        self.val_blocks_array = val[: self.val_blocks] if self.val_blocks else val
        if len(self.train_blocks) == 0:
            raise ValueError(
                f"the corpus is too small: its training split has fewer than data.block_size={self.block_size} tokens"
            )
        self.stats = {
            "documents_train": len(train_idx),
            "documents_val": len(val_idx),
            "tokens_train": int(sum(len(d) + 1 for d in train_docs)),
            "tokens_val": int(sum(len(d) + 1 for d in val_docs)),
            "blocks_train": int(len(self.train_blocks)),
            "blocks_val": int(len(self.val_blocks_array)),
            "vocab_size": tok.vocab_size,
            "tokenizer": tok.name,
        }

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    # -- loaders -------------------------------------------------------------------------------
    def _run_shape(self) -> tuple[int, int, int, int, int]:
        """(start_batch, num_batches, epoch_batches, rank, world_size) from the attached trainer, if any."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            total = math.ceil(len(self.train_blocks) / self.batch_size)
            return 0, total, total, 0, 1
        start = int(getattr(trainer.lightning_module, "batches_seen", 0))
        per_step = trainer.accumulate_grad_batches
        if trainer.max_steps and trainer.max_steps > 0:
            total = trainer.max_steps * per_step
            per_epoch = total  # one Lightning epoch; the stream crosses data epochs by itself
        else:
            per_epoch = max(len(self.train_blocks) // (self.batch_size * trainer.world_size), 1)
            total = per_epoch * max(trainer.max_epochs or 1, 1)
        return start, total, per_epoch, trainer.global_rank, trainer.world_size

    def train_dataloader(self) -> BlockStreamLoader:
        self.prepare()
        start, total, per_epoch, rank, world = self._run_shape()
        module = getattr(getattr(self, "trainer", None), "lightning_module", None)
        position = (lambda: int(module.batches_seen)) if module is not None else None
        return BlockStreamLoader(self.train_blocks, self.batch_size, total, seed=self.seed, start_batch=start,
                                 rank=rank, world_size=world, epoch_batches=per_epoch, position=position)

    def val_dataloader(self) -> DataLoader | ValShardLoader:
        self.prepare()
        _, _, _, rank, world = self._run_shape()
        if world > 1:
            return ValShardLoader(self.val_blocks_array, self.batch_size, rank=rank, world_size=world)
        tensor = torch.from_numpy(self.val_blocks_array.astype(np.int64))
        dataset = [{"input_ids": row} for row in tensor]
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    def describe(self) -> str:
        return json.dumps(self.stats)
