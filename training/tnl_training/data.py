"""Token shards: tokenize text/JSONL into memory-mapped shards with document offsets.

    python -m tnl_training.data --tokenizer data/tokenizer --out data/shards \\
        [--val-fraction 0.05] [--val-files 'hamlet*' ...] FILE_OR_GLOB [...]

Documents: a ``.txt`` (or any non-JSONL) file is one document; a ``.jsonl`` file holds one
document per line (field ``text``). Each document is stored as ``BOS tokens EOS`` and the
documents of a split are concatenated into a token stream; text that spells a special token
(``<s>``, ``</s>``, ``<pad>``, ``<unk>``: HTML has ``<s>``) is stored as ordinary tokens, so BOS
and EOS mark document boundaries only. Whole documents go to
validation (explicit ``val_files`` and/or a deterministic ``val_fraction`` of documents).

Shard file layout (little-endian), written to a temporary name, fsynced and renamed, so a
crash never leaves a half-written shard under a valid name::

    0   8s  magic b"TNLSHRD1"
    8   u32 format version (1)
    12  u32 token item size in bytes (2: uint16, 4: uint32)
    16  u64 number of tokens N
    24  u64 number of documents D
    32  u32 CRC-32 of the payload (tokens then offsets)
    36  u32 CRC-32 of header bytes 0..35
    40  24 bytes reserved (zero)
    64  tokens   N * itemsize
    ..  offsets  (D + 1) int64 document starts, offsets[0] = 0, offsets[D] = N

``index.json`` (written last, atomically) lists the shards of each split with their sizes
and checksums plus a fingerprint of the inputs; a directory without it is not prepared.
Any mismatch (size, header, checksum, index) raises :class:`DataError` naming the file.

Training rows are windows of ``seq_len + 1`` tokens: the stream of each shard is cut into
non-overlapping windows (consecutive windows share one token), and the order of windows is
a permutation per epoch drawn from ``(seed, epoch)``. The global batch of a step is the
next ``micro * accum * world`` windows after the data cursor; rank ``r`` at micro step
``m`` takes positions ``[(m * world + r) * micro, +micro)``. So a batch is a function of
(seed, cursor, step, rank) only: resuming, or resuming on another world size with the same
global batch, replays exactly the same data.
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import hashlib
import json
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"TNLSHRD1"
VERSION = 1
HEADER_SIZE = 64
_HEAD = struct.Struct("<8sIIQQI")  # magic, version, itemsize, n_tokens, n_docs, payload crc  (36 bytes)
INDEX_NAME = "index.json"
INDEX_FORMAT = 1
#: how document text becomes tokens; part of the shard fingerprint, so shards made before a
#: change are re-tokenized (2: special-token text is spelled in ordinary tokens; 3: so is text
#: that spells a byte piece, such as "<0x41>")
TEXT_ENCODING = 3


class DataError(ValueError):
    """Missing, empty or corrupt training data."""


# ---------------------------------------------------------------------------- shard IO
def _crc(chunks) -> int:
    crc = 0
    for chunk in chunks:
        crc = zlib.crc32(memoryview(chunk).cast("B"), crc)
    return crc & 0xFFFFFFFF


def _atomic_write(path: Path, write) -> None:
    """Write via ``write(fileobj)`` to a temp file next to ``path``, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        try:  # make the rename itself durable
            dfd = os.open(path.parent, os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)
        except OSError:
            pass
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_shard(path: str | os.PathLike, tokens: np.ndarray, doc_offsets: np.ndarray) -> dict:
    """Atomically write one shard; returns its index entry."""
    path = Path(path)
    itemsize = tokens.dtype.itemsize
    if tokens.dtype not in (np.uint16, np.uint32):
        raise ValueError(f"tokens must be uint16 or uint32, got {tokens.dtype}")
    offsets = np.ascontiguousarray(doc_offsets, dtype="<i8")
    tokens = np.ascontiguousarray(tokens, dtype=tokens.dtype.newbyteorder("<"))
    if offsets[0] != 0 or offsets[-1] != len(tokens) or np.any(np.diff(offsets) <= 0):
        raise ValueError("doc_offsets must start at 0, end at len(tokens) and increase strictly")
    payload_crc = _crc([tokens, offsets])
    head = _HEAD.pack(MAGIC, VERSION, itemsize, len(tokens), len(offsets) - 1, payload_crc)
    header = head + struct.pack("<I", zlib.crc32(head) & 0xFFFFFFFF)
    header += b"\0" * (HEADER_SIZE - len(header))

    def write(f):
        f.write(header)
        f.write(tokens.tobytes())
        f.write(offsets.tobytes())

    _atomic_write(path, write)
    return {"file": path.name, "tokens": int(len(tokens)), "docs": int(len(offsets) - 1), "crc32": payload_crc,
            "bytes": HEADER_SIZE + tokens.nbytes + offsets.nbytes}


@dataclass
class Shard:
    path: Path
    tokens: np.ndarray  # memmap
    doc_offsets: np.ndarray  # memmap, int64 [D + 1]

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_docs(self) -> int:
        return int(self.doc_offsets.shape[0] - 1)

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.doc_offsets[i]:self.doc_offsets[i + 1]]


def open_shard(path: str | os.PathLike, verify: bool = True, expect: dict | None = None) -> Shard:
    """Memory-map a shard after checking its header, size and (``verify``) payload checksum."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"shard {path} is missing")
    size = path.stat().st_size
    if size < HEADER_SIZE:
        raise DataError(f"shard {path} is corrupt: {size} bytes is shorter than the {HEADER_SIZE}-byte header")
    with open(path, "rb") as f:
        header = f.read(HEADER_SIZE)
    magic, version, itemsize, n_tokens, n_docs, payload_crc = _HEAD.unpack_from(header)
    (head_crc,) = struct.unpack_from("<I", header, _HEAD.size)
    if magic != MAGIC:
        raise DataError(f"shard {path} is corrupt or not a token shard (bad magic {magic!r})")
    if zlib.crc32(header[:_HEAD.size]) & 0xFFFFFFFF != head_crc:
        raise DataError(f"shard {path} is corrupt: header checksum mismatch")
    if version != VERSION or itemsize not in (2, 4):
        raise DataError(f"shard {path}: unsupported format version {version} / item size {itemsize}")
    want = HEADER_SIZE + n_tokens * itemsize + (n_docs + 1) * 8
    if size != want:
        raise DataError(f"shard {path} is corrupt: {size} bytes on disk, header says {want} (truncated or "
                        "partially written); delete the shard directory and prepare the data again")
    if expect is not None and (expect.get("tokens") != n_tokens or expect.get("docs") != n_docs
                               or expect.get("crc32") != payload_crc):
        raise DataError(f"shard {path} does not match its index entry (tokens/docs/checksum); "
                        "the shard directory is inconsistent, prepare the data again")
    dtype = np.dtype("<u2") if itemsize == 2 else np.dtype("<u4")
    tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(n_tokens,))
    offsets = np.memmap(path, dtype="<i8", mode="r", offset=HEADER_SIZE + n_tokens * itemsize, shape=(n_docs + 1,))
    if verify:
        if _crc([np.asarray(tokens), np.asarray(offsets)]) != payload_crc:
            raise DataError(f"shard {path} is corrupt: payload checksum mismatch; prepare the data again")
    if n_docs and (offsets[0] != 0 or offsets[-1] != n_tokens):
        raise DataError(f"shard {path} is corrupt: document offsets do not span the tokens")
    return Shard(path, tokens, offsets)


# ---------------------------------------------------------------------------- documents
def expand_files(patterns: list[str], base: str | os.PathLike | None = None) -> list[Path]:
    """Expand paths/globs (relative to ``base`` when given and not found as is); missing -> DataError."""
    out: list[Path] = []
    for pattern in patterns:
        candidates = [pattern]
        if base is not None and not os.path.isabs(pattern):
            candidates.append(os.path.join(base, pattern))
        matched: list[str] = []
        for cand in candidates:
            matched = sorted(glob.glob(os.path.expanduser(cand))) if glob.has_magic(cand) else (
                [cand] if os.path.exists(os.path.expanduser(cand)) else [])
            if matched:
                break
        if not matched:
            raise DataError(f"data path {pattern!r} does not exist (no file matches); set data.text_files to "
                            "text or JSONL files, e.g. data.text_files=[my/corpus/*.txt]")
        for m in matched:
            p = Path(os.path.expanduser(m))
            if p.is_dir():
                files = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in (".txt", ".jsonl", ".json"))
                if not files:
                    raise DataError(f"data directory {p} holds no .txt or .jsonl files")
                out.extend(files)
            else:
                out.append(p)
    seen, unique = set(), []
    for p in out:
        key = str(p.resolve())
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def iter_documents(path: Path, text_field: str = "text"):
    """Yield (doc_key, text) for each non-empty document of a file."""
    if path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({err})") from None
                if not isinstance(record, dict) or text_field not in record:
                    raise DataError(f"{path}:{lineno}: JSONL records need a {text_field!r} field")
                text = record[text_field]
                if isinstance(text, str) and text.strip():
                    yield f"{path.name}:{lineno}", text
    else:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if text.strip():
            yield path.name, text


def _is_val(doc_key: str, path: Path, val_patterns: list[str], val_fraction: float, split_seed: int) -> bool:
    for pat in val_patterns:
        if fnmatch.fnmatch(path.name, pat) or fnmatch.fnmatch(str(path), pat) or fnmatch.fnmatch(doc_key, pat):
            return True
    return _split_hash(doc_key, split_seed) < val_fraction


def _split_hash(doc_key: str, split_seed: int) -> float:
    h = hashlib.sha256(f"{split_seed}:{doc_key}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2**64


def fingerprint(files: list[Path], tokenizer_dir: str | os.PathLike, settings: dict) -> str:
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    tok_json = Path(tokenizer_dir) / "tokenizer.json"
    h.update(hashlib.sha256(tok_json.read_bytes()).digest() if tok_json.is_file() else b"-")
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(f"text-encoding {TEXT_ENCODING}".encode())
    return h.hexdigest()


def _special_spellings(tok) -> dict[int, tuple[str, list[int] | None]]:
    """Each special token id -> (its text, the byte-fallback ids that spell that text, or None when
    the tokenizer has no byte pieces for it)."""
    spellings = {}
    for text, token_id in zip(tok.all_special_tokens, tok.all_special_ids):
        byte_ids = tok.convert_tokens_to_ids([f"<0x{b:02X}>" for b in text.encode()])
        missing = any(i is None or i == tok.unk_token_id for i in byte_ids)
        spellings[token_id] = (text, None if missing else byte_ids)
    return spellings


def _byte_piece_spellings(tok) -> dict[int, tuple[str, list[int]]]:
    """Each byte-fallback piece id -> (its text, such as ``<0x41>``, the byte ids that spell that text).

    The fast tokenizer matches such text in a document as the byte piece itself, which decodes to
    the byte (``A``), not to the text that was there."""
    pieces = [f"<0x{b:02X}>" for b in range(256)]
    ids = tok.convert_tokens_to_ids(pieces)
    if any(i is None or i == tok.unk_token_id for i in ids):
        return {}  # no byte fallback
    byte_id = dict(zip(range(256), ids))
    return {i: (piece, [byte_id[b] for b in piece.encode()]) for piece, i in zip(pieces, ids)}


def _spell_out_byte_pieces(ids: list[int], spans, text: str, byte_spellings: dict) -> list[int]:
    """Replace a byte piece that the text spelled out literally (its span reads ``<0x41>``) by the
    bytes of that text. A genuine fallback byte spans the one character it is part of."""
    if spans is None or byte_spellings.keys().isdisjoint(ids):
        return ids
    out = []
    for token_id, (start, stop) in zip(ids, spans):
        spelling = byte_spellings.get(token_id)
        if spelling is not None and text[start:stop] == spelling[0]:
            out.extend(spelling[1])
        else:
            out.append(token_id)
    return out


def encode_documents(tok, texts: list[str], keys: list[str], spellings: dict) -> list[list[int]]:
    """Token ids of each document's text, with no special token in them.

    ``split_special_tokens`` stops the fast tokenizer from matching its added special tokens in
    the text, but a sentencepiece vocabulary holds ``<s>`` etc. as pieces, and the model itself
    still picks them; such ids are replaced by the bytes of their text (byte fallback), which
    decode to the same text."""
    encoded = tok(texts, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=tok.is_fast)
    all_spans = encoded["offset_mapping"] if tok.is_fast else [None] * len(texts)
    byte_spellings = _byte_piece_spellings(tok)
    return [_spell_out_specials(_spell_out_byte_pieces(ids, spans, text, byte_spellings), text, key, spellings)
            for ids, spans, text, key in zip(encoded["input_ids"], all_spans, texts, keys)]


def _spell_out_specials(ids: list[int], text: str, key: str, spellings: dict) -> list[int]:
    if spellings.keys().isdisjoint(ids):
        return ids
    out = []
    for token_id in ids:
        if token_id not in spellings:
            out.append(token_id)
            continue
        literal, byte_ids = spellings[token_id]
        if byte_ids is not None:
            out.extend(byte_ids)
        elif literal in text:
            raise DataError(f"document {key} contains the text {literal!r}, which this tokenizer can only encode as "
                            "its special token; use a tokenizer with byte fallback (python -m tnl_training.tokenizer)")
        else:
            out.append(token_id)  # e.g. the unknown token of a tokenizer without byte fallback
    return out


class _ShardWriter:
    def __init__(self, out_dir: Path, split: str, dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.entries: list[dict] = []
        self._reset()

    def _reset(self):
        self.parts: list[np.ndarray] = []
        self.lengths: list[int] = []
        self.count = 0

    def add(self, ids: np.ndarray):
        self.parts.append(ids.astype(self.dtype, copy=False))
        self.lengths.append(len(ids))
        self.count += len(ids)
        if self.count >= self.shard_tokens:
            self.flush()

    def flush(self):
        if not self.parts:
            return
        tokens = np.concatenate(self.parts)
        offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        name = f"{self.split}-{len(self.entries):05d}.bin"
        self.entries.append(write_shard(self.out_dir / name, tokens, offsets))
        self._reset()


def prepare_shards(files: list[str | os.PathLike], tokenizer_dir: str | os.PathLike, out_dir: str | os.PathLike,
                   val_fraction: float = 0.05, val_files: list[str] | None = None, split_seed: int = 0,
                   shard_tokens: int = 1 << 26, text_field: str = "text", log=print) -> dict:
    """Tokenize ``files`` into ``out_dir`` (train/val shards + index.json); returns the index."""
    from tnl_training.tokenizer import load_tokenizer

    files = [Path(f) for f in files]
    for f in files:
        if not f.is_file():
            raise DataError(f"data file {str(f)!r} does not exist")
    tok = load_tokenizer(tokenizer_dir)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    if bos is None or eos is None:
        raise DataError(f"tokenizer {tokenizer_dir} has no BOS/EOS token")
    vocab = len(tok)
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    val_files = list(val_files or [])
    settings = {"val_fraction": val_fraction, "val_files": val_files, "split_seed": split_seed,
                "text_field": text_field, "shard_tokens": shard_tokens, "format": INDEX_FORMAT}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / INDEX_NAME).unlink(missing_ok=True)  # the directory is "not prepared" until the new index lands
    for old in list(out_dir.glob("train-*.bin")) + list(out_dir.glob("val-*.bin")):
        old.unlink()

    docs: list[tuple[str, Path, str]] = []
    for f in files:
        for key, text in iter_documents(f, text_field):
            docs.append((key, f, text))
    if not docs:
        raise DataError(f"the corpus is empty: no non-empty document in {[str(f) for f in files]}")
    is_val = [_is_val(key, f, val_files, val_fraction, split_seed) for key, f, _ in docs]
    if val_fraction > 0 and not any(is_val) and len(docs) >= 2:
        # small corpora: hold out the single document with the lowest split hash
        is_val[min(range(len(docs)), key=lambda i: _split_hash(docs[i][0], split_seed))] = True
    if all(is_val):
        raise DataError("every document went to validation; lower data.val_fraction or narrow data.val_files")

    writers = {"train": _ShardWriter(out_dir, "train", dtype, shard_tokens),
               "val": _ShardWriter(out_dir, "val", dtype, shard_tokens)}
    spellings = _special_spellings(tok)
    batch = 64
    for start in range(0, len(docs), batch):
        chunk = docs[start:start + batch]
        encoded = encode_documents(tok, [text for _, _, text in chunk], [key for key, _, _ in chunk], spellings)
        for (key, f, _), ids, val in zip(chunk, encoded, is_val[start:start + batch]):
            writers["val" if val else "train"].add(np.asarray([bos, *ids, eos], dtype=np.int64))
    for w in writers.values():
        w.flush()
    index = {
        "format": INDEX_FORMAT,
        "fingerprint": fingerprint(files, tokenizer_dir, settings),
        "vocab_size": vocab, "bos_token_id": bos, "eos_token_id": eos,
        "tokenizer": str(Path(tokenizer_dir).resolve()),
        "settings": settings,
        "sources": [str(f.resolve()) for f in files],
        "val_documents": [key for (key, _, _), v in zip(docs, is_val) if v],
        "splits": {name: w.entries for name, w in writers.items()},
    }
    _atomic_write(out_dir / INDEX_NAME, lambda fh: fh.write(json.dumps(index, indent=1).encode()))
    n = {k: sum(e["tokens"] for e in v) for k, v in index["splits"].items()}
    log(f"tokenized {len(docs)} documents from {len(files)} files into {out_dir}: "
        f"train {n['train']:,} tokens, validation {n['val']:,} tokens ({len(index['val_documents'])} documents)")
    return index


def read_index(shard_dir: str | os.PathLike) -> dict:
    path = Path(shard_dir) / INDEX_NAME
    if not path.is_file():
        raise DataError(f"{shard_dir} holds no prepared token shards (no {INDEX_NAME}); run "
                        "`python -m tnl_training.data` or enable data.prepare_if_missing")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is corrupt: {err}") from None
    if index.get("format") != INDEX_FORMAT:
        raise DataError(f"{path}: unsupported index format {index.get('format')}")
    return index


def open_split(shard_dir: str | os.PathLike, split: str, verify: bool = True) -> list[Shard]:
    index = read_index(shard_dir)
    entries = index["splits"].get(split, [])
    return [open_shard(Path(shard_dir) / e["file"], verify=verify, expect=e) for e in entries]


# ---------------------------------------------------------------------------- sampling
class TokenRows:
    """Fixed-length rows of ``seq_len + 1`` tokens over a split, with a deterministic order."""

    def __init__(self, shards: list[Shard], seq_len: int, seed: int, shuffle: bool = True, name: str = "train"):
        self.shards, self.seq_len, self.seed, self.shuffle = shards, seq_len, seed, shuffle
        self.rows_per_shard = np.array([max(0, (s.num_tokens - 1) // seq_len) for s in shards], dtype=np.int64)
        self.cum = np.concatenate([[0], np.cumsum(self.rows_per_shard)])
        self.num_rows = int(self.cum[-1])
        self.num_tokens = sum(s.num_tokens for s in shards)
        if self.num_rows == 0:
            raise DataError(f"the {name} split has {self.num_tokens} tokens, fewer than one row of "
                            f"seq_len + 1 = {seq_len + 1}; use more text or a shorter seq_len")
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.Generator(np.random.Philox(key=[self.seed & (2**64 - 1), epoch]))
            self._perm = rng.permutation(self.num_rows)
            self._perm_epoch = epoch
        return self._perm

    def row(self, i: int) -> np.ndarray:
        """Row number ``i`` of the (infinite, epoch-permuted) sequence, as int64 [seq_len + 1]."""
        if self.shuffle:
            epoch, pos = divmod(int(i), self.num_rows)
            r = int(self._order(epoch)[pos])
        else:
            r = int(i) % self.num_rows
        s = int(np.searchsorted(self.cum, r, side="right") - 1)
        start = (r - int(self.cum[s])) * self.seq_len
        return np.asarray(self.shards[s].tokens[start:start + self.seq_len + 1], dtype=np.int64)

    def batch(self, cursor: int, micro_step: int, rank: int, world: int, micro: int) -> np.ndarray:
        """Rank ``rank``'s micro-batch ``micro_step`` of the global batch starting at row ``cursor``."""
        first = cursor + (micro_step * world + rank) * micro
        return np.stack([self.row(first + j) for j in range(micro)])


__all__ = ["DataError", "write_shard", "open_shard", "Shard", "prepare_shards", "read_index", "open_split",
           "TokenRows", "expand_files", "fingerprint", "iter_documents"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tnl_training.data",
                                     description="Tokenize text/JSONL files into memory-mapped token shards.")
    parser.add_argument("files", nargs="+", help="text/JSONL files, directories or glob patterns")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory (AutoTokenizer-loadable)")
    parser.add_argument("--out", required=True, help="output shard directory")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="fraction of documents for validation")
    parser.add_argument("--val-files", action="append", default=[], metavar="GLOB",
                        help="file name/glob held out whole for validation (repeat for several)")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--shard-tokens", type=int, default=1 << 26)
    parser.add_argument("--text-field", default="text", help="JSONL field holding the text")
    args = parser.parse_args(argv)
    from tnl_training.tokenizer import TokenizerError

    try:
        files = expand_files(args.files)
        prepare_shards(files, args.tokenizer, args.out, args.val_fraction, args.val_files, args.split_seed,
                       args.shard_tokens, args.text_field)
    except (DataError, TokenizerError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
