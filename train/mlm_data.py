"""Masked-LM pretraining data: text → cached token arrays → fixed-length sequences → flat (unpadded) batches.

Axis legend: `n` sequences in a batch, `t` total tokens of a batch (sum of their lengths), `s` one sequence.

Pipeline
  1. `resolve_text_files` turns folders / globs / paths into a sorted list of `.txt`, `.txt.xz`, `.txt.gz` files.
  2. `tokenize_to_cache` tokenizes every document of a source (`TextFiles` or a `DatasetColumn`) once (fast
     tokenizer, batched, a process pool over chunks of documents) into a flat uint16 token array plus document
     offsets, stored under a cache folder whose name is a hash of the input bytes (or the dataset fingerprint),
     the tokenizer and the document format. The cache does not depend on the sequence
     length: cutting into sequences is index arithmetic done at load time.
  3. `TokenSequences` cuts the token stream into `[CLS] ... [SEP]` sequences of at most `max_seq_len` tokens.
  4. `FlatMLMCollator` concatenates a list of sequences into one row — input_ids (1, t), labels (1, t),
     position_ids (1, t), cu_seqlens int32 (n + 1,), max_seqlen int — and masks it. There is never any padding.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import lzma
import os
import shutil
import time
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

TEXT_SUFFIXES = (".txt", ".txt.xz", ".txt.gz")
# Bump when the cached layout or the tokenization rules change, so stale caches are never reused.
CACHE_VERSION = "mlm-tokens-v1"
# Inputs smaller than this (bytes on disk) are tokenized in-process.
SMALL_INPUT_BYTES = 1 << 20


# ----------------------------------------------------------------------------------------------------------------
# Reading text
# ----------------------------------------------------------------------------------------------------------------
def _is_text_file(path: Path) -> bool:
    return path.is_file() and path.name.endswith(TEXT_SUFFIXES)


def resolve_text_files(specs: Sequence[str] | str) -> list[Path]:
    """Expand folders, globs and plain paths into a sorted, de-duplicated list of text files.

    A folder contributes every `*.txt`, `*.txt.xz`, `*.txt.gz` directly inside it. Raises FileNotFoundError naming
    the spec that matched nothing, and ValueError for an existing file that is not a text file.
    """
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise ValueError("No text files given.")
    files: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if _is_text_file(p))
            if not found:
                raise FileNotFoundError(f"No {'/'.join(TEXT_SUFFIXES)} files in folder {spec!r}.")
        elif any(ch in spec for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(spec) if _is_text_file(Path(p)))
            if not found:
                raise FileNotFoundError(f"The pattern {spec!r} matches no {'/'.join(TEXT_SUFFIXES)} file.")
        elif path.is_file():
            if not path.name.endswith(TEXT_SUFFIXES):
                raise ValueError(f"{spec!r} is not a text file (expected one of {', '.join(TEXT_SUFFIXES)}).")
            found = [path]
        else:
            raise FileNotFoundError(f"Text file or folder not found: {spec!r}.")
        files.extend(found)
    unique = sorted({p.resolve() for p in files})
    return unique


def read_text(path: Path) -> str:
    """The UTF-8 text of a .txt, .txt.xz or .txt.gz file. A file that is not valid UTF-8 (or a damaged archive)
    raises ValueError naming the file, and for bad bytes their offset and line in the (decompressed) text."""
    opener = lzma.open if path.name.endswith(".xz") else gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (lzma.LZMAError, gzip.BadGzipFile, EOFError) as err:
        problem = f"{type(err).__name__}: {err}"
        raise ValueError(f"{str(path)!r} is not a readable {path.suffix} archive ({problem}).") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        where = "decompressed " if opener is not open else ""
        raise ValueError(
            f"{str(path)!r} is not UTF-8 text: byte 0x{data[err.start]:02x} at {where}offset {err.start} "
            f"(line {line}) cannot be decoded ({err.reason}). Re-encode the file as UTF-8."
        ) from None


def split_documents(text: str, document_format: str = "auto") -> list[list[str]]:
    """Split a file's text into documents, each a list of non-empty paragraphs (lines).

    `blank_line`: documents are separated by empty lines, one paragraph per line (the shared corpus format).
    `line`: every non-empty line is a document. `auto`: `blank_line` if the text has an empty line between two
    non-empty ones, else `line`.
    """
    if document_format not in ("auto", "blank_line", "line"):
        raise ValueError(f"Unknown document format {document_format!r}; use auto, blank_line or line.")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if document_format == "auto":
        document_format = "blank_line" if "\n\n" in text.strip("\n") else "line"
    if document_format == "line":
        return [[line] for line in text.split("\n") if line.strip()]
    docs = []
    for block in text.split("\n\n"):
        paragraphs = [line for line in block.split("\n") if line.strip()]
        if paragraphs:
            docs.append(paragraphs)
    return docs


# ----------------------------------------------------------------------------------------------------------------
# Tokenizing into a cache
# ----------------------------------------------------------------------------------------------------------------
def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the token ids: the fast tokenizer's full JSON (vocab, normalizer, pre-tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("A fast tokenizer (tokenizers backend) is required for pretraining data preparation.")
    return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()


def _hash_file(path: Path, h) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)


_WORKER_TOKENIZER = None


def _init_worker(tokenizer_json: str) -> None:
    global _WORKER_TOKENIZER
    from tokenizers import Tokenizer

    _WORKER_TOKENIZER = Tokenizer.from_str(tokenizer_json)


def _encode_documents(docs: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize documents (lists of paragraphs) without special tokens.

    Returns (tokens uint32 (sum of lengths,), lengths int64 (len(docs),)). Paragraphs are encoded separately and
    concatenated, which equals encoding the newline-joined document: the BERT pre-tokenizer splits on whitespace.
    """
    paragraphs = [p for doc in docs for p in doc]
    encodings = _WORKER_TOKENIZER.encode_batch(paragraphs, add_special_tokens=False)
    para_lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
    total = int(para_lengths.sum())
    tokens = np.fromiter((i for e in encodings for i in e.ids), dtype=np.uint32, count=total)
    doc_sizes = np.fromiter((len(doc) for doc in docs), dtype=np.int64, count=len(docs))
    para_ends = np.cumsum(para_lengths)
    doc_para_ends = np.cumsum(doc_sizes)
    doc_token_ends = np.where(doc_para_ends > 0, para_ends[np.maximum(doc_para_ends - 1, 0)], 0)
    lengths = np.diff(np.concatenate([[0], doc_token_ends]))
    return tokens, lengths


def _chunks_of_documents(docs: Iterable[list[str]], paragraphs_per_chunk: int) -> Iterator[list[list[str]]]:
    chunk, count = [], 0
    for doc in docs:
        chunk.append(doc)
        count += len(doc)
        if count >= paragraphs_per_chunk:
            yield chunk
            chunk, count = [], 0
    if chunk:
        yield chunk


@dataclass
class TokenizedCorpus:
    """A flat token array and document boundaries: document i is tokens[doc_offsets[i]:doc_offsets[i + 1]]."""

    tokens: np.ndarray  # (total_tokens,) uint16 or uint32, memory-mapped
    doc_offsets: np.ndarray  # (num_docs + 1,) int64
    path: Path | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.doc_offsets[-1])

    @property
    def num_documents(self) -> int:
        return len(self.doc_offsets) - 1


def _load_cache(folder: Path) -> TokenizedCorpus:
    return TokenizedCorpus(
        tokens=np.load(folder / "tokens.npy", mmap_mode="r"),
        doc_offsets=np.load(folder / "doc_offsets.npy"),
        path=folder,
    )


def _write_cache(folder: Path, tokens: np.ndarray, lengths: np.ndarray, meta: dict) -> TokenizedCorpus:
    """Write atomically: fill a private temp folder, then rename it into place (a concurrent writer just loses)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "tokens.npy", tokens)
    np.save(tmp / "doc_offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return _load_cache(folder)


def _tokenize_documents(
    documents: Iterable[list[str]], tokenizer, num_proc: int, paragraphs_per_chunk: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    tokenizer_json = tokenizer.backend_tokenizer.to_str()
    token_parts, length_parts = [], []
    chunks = _chunks_of_documents(documents, paragraphs_per_chunk)
    if num_proc <= 1:
        _init_worker(tokenizer_json)
        results = map(_encode_documents, chunks)
        pool = None
    else:
        # Each worker is single-threaded; the pool gives the parallelism (and also parallelises the Python-side
        # conversion of ids to arrays, which the tokenizers library's own threads would not). Fork where there is
        # fork: a spawned worker would re-import the calling script and its heavy imports. The parent has not used
        # the tokenizers thread pool, and the workers touch neither torch nor CUDA.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        from multiprocessing import get_all_start_methods

        method = "fork" if "fork" in get_all_start_methods() else "spawn"
        pool = get_context(method).Pool(num_proc, initializer=_init_worker, initargs=(tokenizer_json,))
        results = pool.imap(_encode_documents, chunks, chunksize=1)
    try:
        for tokens, lengths in results:
            token_parts.append(tokens)
            length_parts.append(lengths)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    tokens = np.concatenate(token_parts) if token_parts else np.zeros(0, np.uint32)
    lengths = np.concatenate(length_parts) if length_parts else np.zeros(0, np.int64)
    keep = lengths > 0  # documents with no tokens carry nothing
    return tokens, lengths[keep]


def _token_dtype(tokenizer) -> np.dtype:
    return np.dtype(np.uint16) if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


@dataclass
class TextFiles:
    """Documents from text files (see `split_documents` for `document_format`)."""

    files: Sequence[Path]
    document_format: str = "auto"

    def cache_key(self) -> str:
        h = hashlib.sha256(f"files|{self.document_format}".encode())
        for path in self.files:
            h.update(f"|{path.name}|".encode())
            _hash_file(path, h)
        return h.hexdigest()

    def is_small(self) -> bool:
        return sum(p.stat().st_size for p in self.files) < SMALL_INPUT_BYTES

    def documents(self) -> Iterator[list[str]]:
        for path in self.files:
            docs = split_documents(read_text(path), self.document_format)
            if not docs:
                raise ValueError(f"Text file {str(path)!r} is empty (no non-blank line).")
            yield from docs

    def describe(self) -> dict:
        return {"files": [str(p) for p in self.files], "document_format": self.document_format}

    def __str__(self) -> str:
        return ", ".join(map(str, self.files))


@dataclass
class DatasetColumn:
    """Documents from a `datasets.Dataset` column, one per row (empty rows skipped)."""

    dataset: object
    text_column: str = "text"

    def __post_init__(self):
        if self.text_column not in self.dataset.column_names:
            raise ValueError(
                f"Column {self.text_column!r} is not in the dataset; its columns are {self.dataset.column_names}. "
                "Pass the right one with --text-column."
            )
        if len(self.dataset) == 0:
            raise ValueError("The dataset split is empty.")

    def cache_key(self) -> str | None:
        fingerprint = getattr(self.dataset, "_fingerprint", None)
        if fingerprint is None:  # an in-memory dataset without a fingerprint: tokenize every time
            return None
        return hashlib.sha256(f"dataset|{fingerprint}|{self.text_column}".encode()).hexdigest()

    def is_small(self) -> bool:
        return len(self.dataset) < 2000

    def documents(self) -> Iterator[list[str]]:
        for start in range(0, len(self.dataset), 1000):
            for text in self.dataset[start : start + 1000][self.text_column]:
                if text and text.strip():
                    yield [line for line in text.split("\n") if line.strip()]

    def describe(self) -> dict:
        return {"dataset_fingerprint": getattr(self.dataset, "_fingerprint", None), "text_column": self.text_column}

    def __str__(self) -> str:
        return f"column {self.text_column!r} of the dataset"


def tokenize_to_cache(
    source: TextFiles | DatasetColumn, tokenizer, cache_dir: str | os.PathLike, num_proc: int = 1, log=print
) -> TokenizedCorpus:
    """Tokenize the documents of `source` once and cache them; a later call with the same input bytes (or dataset
    fingerprint), tokenizer and document format loads the cache instead."""
    fingerprint = tokenizer_fingerprint(tokenizer)
    key = source.cache_key()
    folder = Path(cache_dir) / hashlib.sha256(f"{CACHE_VERSION}|{fingerprint}|{key}".encode()).hexdigest()[:24]
    if key is not None and (folder / "meta.json").exists():
        log(f"Using cached tokens {folder}")
        return _load_cache(folder)

    start = time.time()
    if source.is_small():
        num_proc = 1  # starting workers would cost more than it saves
    tokens, lengths = _tokenize_documents(source.documents(), tokenizer, num_proc)
    if len(tokens) == 0:
        raise ValueError(f"No tokens in {source}.")
    meta = {
        "version": CACHE_VERSION,
        **source.describe(),
        "num_documents": int(len(lengths)),
        "num_tokens": int(len(tokens)),
        "tokenizer_sha256": fingerprint,
        "seconds": round(time.time() - start, 2),
    }
    corpus = _write_cache(folder, tokens.astype(_token_dtype(tokenizer)), lengths, meta)
    log(f"Tokenized {meta['num_documents']:,} documents, {meta['num_tokens']:,} tokens in {meta['seconds']:.1f}s "
        f"→ {folder}")
    return corpus


# ----------------------------------------------------------------------------------------------------------------
# Sequences
# ----------------------------------------------------------------------------------------------------------------
class TokenSequences(torch.utils.data.Dataset):
    """`[CLS] body [SEP]` sequences of at most `max_seq_len` tokens cut from a tokenized corpus.

    packing="concat" (the MosaicBERT recipe): documents are joined into one stream with a [SEP] after each, and the
    stream is cut every `max_seq_len - 2` tokens, so every sequence but the last is exactly `max_seq_len` long and a
    sequence may span a document boundary. packing="document": each document is cut on its own; a document's last
    piece is shorter (which costs nothing, batches are never padded) and attention never crosses documents.
    """

    def __init__(self, corpus: TokenizedCorpus, max_seq_len: int, cls_token_id: int, sep_token_id: int,
                 packing: str = "concat"):
        if max_seq_len < 3:
            raise ValueError(f"max_seq_len ({max_seq_len}) must be at least 3 ([CLS] token [SEP]).")
        if packing not in ("concat", "document"):
            raise ValueError(f"Unknown packing {packing!r}; use concat or document.")
        self.max_seq_len = max_seq_len
        self.cls_token_id = cls_token_id
        self.sep_token_id = sep_token_id
        self.packing = packing
        body = max_seq_len - 2
        offsets = corpus.doc_offsets
        if packing == "concat":
            # A [SEP] goes before every document start but the first, and after the last document.
            self.tokens = np.insert(np.asarray(corpus.tokens), offsets[1:], sep_token_id)
            self.starts = np.arange(0, len(self.tokens), body, dtype=np.int64)
            self.lengths = np.minimum(body, len(self.tokens) - self.starts)
        else:
            self.tokens = corpus.tokens
            doc_lengths = np.diff(offsets)
            pieces = -(-doc_lengths // body)  # ceil
            doc_of_piece = np.repeat(np.arange(len(doc_lengths)), pieces)
            first_piece = np.concatenate([[0], np.cumsum(pieces)[:-1]])
            piece_in_doc = np.arange(int(pieces.sum())) - first_piece[doc_of_piece]
            self.starts = offsets[doc_of_piece] + piece_in_doc * body
            self.lengths = np.minimum(body, offsets[doc_of_piece + 1] - self.starts)

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def num_tokens(self) -> int:
        """Tokens in all sequences, special tokens included."""
        return int(self.lengths.sum()) + 2 * len(self)

    def __getitem__(self, i: int) -> dict:
        start, length = int(self.starts[i]), int(self.lengths[i])
        ids = np.empty(length + 2, dtype=np.int64)
        ids[0] = self.cls_token_id
        ids[1:-1] = self.tokens[start : start + length]
        ids[-1] = self.sep_token_id
        return {"input_ids": ids}


def mask_tokens(
    input_ids: torch.Tensor,
    special_mask: torch.Tensor,
    mlm_probability: float,
    mask_token_id: int,
    vocab_size: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of a 1-D id tensor: choose each non-special position with probability `mlm_probability`;
    of the chosen, 80% become [MASK], 10% a uniformly random token in [0, vocab_size), 10% stay unchanged.

    Returns (masked input_ids, labels) with labels = original id at chosen positions and -100 elsewhere.
    """
    chosen = torch.rand(input_ids.shape, generator=generator) < mlm_probability
    chosen &= ~special_mask
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    roll = torch.rand(input_ids.shape, generator=generator)
    to_mask = chosen & (roll < 0.8)
    to_random = chosen & (roll >= 0.8) & (roll < 0.9)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, dtype=input_ids.dtype)
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


@dataclass
class FlatMLMCollator:
    """Concatenate sequences into one unpadded row and mask it (unless the examples bring their own labels).

    Output: input_ids (1, t) int64, labels (1, t) int64 (-100 = not predicted), position_ids (1, t) restarting
    at 0 for every sequence, cu_seqlens (n + 1,) int32, max_seqlen python int; t = sum of the sequence lengths.
    """

    mask_token_id: int
    vocab_size: int
    special_token_ids: tuple[int, ...]
    mlm_probability: float = 0.3

    def __post_init__(self):
        if not 0.0 < self.mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1), got {self.mlm_probability}.")
        self._special = torch.tensor(sorted(set(self.special_token_ids)), dtype=torch.long)

    @classmethod
    def from_tokenizer(cls, tokenizer, mlm_probability: float) -> "FlatMLMCollator":
        return cls(
            mask_token_id=tokenizer.mask_token_id,
            vocab_size=len(tokenizer),
            special_token_ids=tuple(tokenizer.all_special_ids),
            mlm_probability=mlm_probability,
        )

    def special_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.isin(input_ids, self._special)

    def mask(self, input_ids: torch.Tensor, generator: torch.Generator | None = None):
        special = self.special_mask(input_ids)
        masked, labels = mask_tokens(
            input_ids, special, self.mlm_probability, self.mask_token_id, self.vocab_size, generator
        )
        if not (labels != -100).any():
            # A batch must predict something, or its loss is undefined: mask one ordinary position.
            candidates = torch.nonzero(~special).flatten()
            if len(candidates):
                pick = candidates[torch.randint(len(candidates), (1,), generator=generator)]
                labels[pick] = input_ids[pick]
                masked[pick] = self.mask_token_id
        return masked, labels

    def __call__(self, examples: list[dict]) -> dict:
        seqs = [torch.as_tensor(e["input_ids"], dtype=torch.long) for e in examples]
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int32)
        input_ids = torch.cat(seqs)
        if "labels" in examples[0]:
            labels = torch.cat([torch.as_tensor(e["labels"], dtype=torch.long) for e in examples])
        else:
            input_ids, labels = self.mask(input_ids)
        cu_seqlens = torch.zeros(len(seqs) + 1, dtype=torch.int32)
        cu_seqlens[1:] = torch.cumsum(lengths, 0)
        # position_ids: (t,) = 0..len-1 for each sequence
        starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths.long())
        position_ids = torch.arange(len(input_ids)) - starts
        return {
            "input_ids": input_ids[None],
            "labels": labels[None],
            "position_ids": position_ids[None],
            "cu_seqlens": cu_seqlens,
            "max_seqlen": int(lengths.max()),
        }


class FixedMaskDataset(torch.utils.data.Dataset):
    """Sequences with a masking that is a pure function of (seed, index): validation numbers are comparable across
    runs and checkpoints. Each item carries its own labels, which FlatMLMCollator then keeps as they are."""

    def __init__(self, sequences: TokenSequences, collator: FlatMLMCollator, mlm_probability: float, seed: int = 0):
        self.sequences = sequences
        self.masker = FlatMLMCollator(
            collator.mask_token_id, collator.vocab_size, collator.special_token_ids, mlm_probability
        )
        self.seed = seed

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> dict:
        ids = torch.as_tensor(self.sequences[i]["input_ids"])
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        masked, labels = self.masker.mask(ids, generator)
        return {"input_ids": masked, "labels": labels}
