"""Token shards: tokenize text/JSONL into memory-mapped shards with document offsets.

    python -m tnl_training.data --tokenizer data/tokenizer --out data/shards \\
        [--val-fraction 0.05] [--val-files 'hamlet*' ...] [--errors strict|replace] [--workers N] \\
        FILE_OR_GLOB [...]

Documents: a ``.txt`` (or any non-JSONL) file is one document; a ``.jsonl`` file holds one
document per line (field ``text``). Each document is stored as ``BOS tokens EOS`` and the
documents of a split are concatenated into a token stream; text that spells a special token
(``<s>``, ``</s>``, ``<pad>``, ``<unk>``: HTML has ``<s>``) is stored as ordinary tokens, so BOS
and EOS mark document boundaries only. Whole documents go to
validation (explicit ``val_files`` and/or a deterministic ``val_fraction`` of documents).

Memory stays bounded whatever the file sizes: files are read in blocks, a long document is
tokenized in pieces of at most :data:`PIECE_CHARS` characters cut at spaces (so that its tokens
equal whole-document tokenization: see :func:`cut_mode`), and tokens are written to the shard
as they come. Text must be UTF-8: an undecodable byte, or a NUL byte (a binary file), is an
error naming the file and byte offset unless ``errors="replace"`` (then U+FFFD).

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
from array import array
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
#: that spells a byte piece, such as "<0x41>"; 4: long documents are tokenized in pieces, and
#: text is decoded strictly unless errors="replace")
TEXT_ENCODING = 4


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
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _shard_header(itemsize: int, n_tokens: int, n_docs: int, payload_crc: int) -> bytes:
    head = _HEAD.pack(MAGIC, VERSION, itemsize, n_tokens, n_docs, payload_crc)
    header = head + struct.pack("<I", zlib.crc32(head) & 0xFFFFFFFF)
    return header + b"\0" * (HEADER_SIZE - len(header))


def _fsync_dir(directory: Path) -> None:
    try:  # make a rename durable
        dfd = os.open(directory, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
    except OSError:
        pass


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
    header = _shard_header(itemsize, len(tokens), len(offsets) - 1, payload_crc)

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


# ---------------------------------------------------------------------------- reading text
#: how undecodable bytes in training text are handled: "strict" (an error naming the file and byte
#: offset; the default) or "replace" (each undecodable byte becomes U+FFFD)
TEXT_ERRORS = ("strict", "replace")
#: bytes read from a text file at a time
READ_BYTES = 1 << 20


def _check_errors(errors: str) -> None:
    if errors not in TEXT_ERRORS:
        raise DataError(f"errors must be 'strict' or 'replace', got {errors!r}")


def _complete_utf8(buf: bytes) -> int:
    """Length of the longest prefix of ``buf`` that does not end inside a UTF-8 sequence."""
    for back in range(1, min(4, len(buf)) + 1):
        byte = buf[-back]
        if byte & 0xC0 == 0x80:  # a continuation byte: look further back for its lead byte
            continue
        need = 1 if byte < 0xC0 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
        return len(buf) - back if need > back else len(buf)
    return len(buf)


def _undecodable(path, offset: int, raw: bytes, reason: str, error_class, what: str = "") -> Exception:
    shown = raw[:4].hex(" ")
    return error_class(
        f"{path}{what}: not UTF-8 text: the bytes at byte offset {offset} ({shown}) cannot be decoded ({reason}); "
        "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8), leave it out of the corpus, or set "
        "data.errors=replace (--errors replace) to replace undecodable bytes by U+FFFD")


def _decode(chunk: bytes, offset: int, path, errors: str, error_class, what: str = "") -> str:
    """``chunk`` (which starts at byte ``offset`` of ``path``) as text; a NUL byte means a binary file."""
    if errors == "replace":
        return chunk.decode("utf-8", "replace")
    nul = chunk.find(b"\0")
    if nul >= 0:
        raise error_class(
            f"{path}{what} is binary, not text: a NUL byte at byte offset {offset + nul}; leave it out of the "
            "corpus (or set data.errors=replace (--errors replace) to read it as text anyway)")
    try:
        return chunk.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _undecodable(path, offset + err.start, chunk[err.start:], err.reason, error_class, what) from None


def iter_text(path: str | os.PathLike, errors: str = "strict", block_bytes: int = READ_BYTES,
              error_class=None):
    """Yield a UTF-8 text file as ``(byte_offset, text)`` blocks of about ``block_bytes``, never cut
    inside a character, holding one block in memory. ``errors="strict"`` raises ``error_class``
    (default :class:`DataError`) naming the file and the byte offset of the first undecodable byte
    (or NUL byte: a binary file); ``"replace"`` turns undecodable bytes into U+FFFD. Line ends
    ``\\r\\n`` and ``\\r`` read as ``\\n``, as ``open(path, encoding="utf-8")`` reads them."""
    error_class = error_class or DataError
    _check_errors(errors)
    offset, pending = 0, b""
    with open(path, "rb") as f:
        while True:
            data = f.read(block_bytes)
            buf = pending + data if pending else data
            if not buf:
                return
            cut = len(buf)
            if data:  # more may follow: keep back a character's first bytes, or a "\r" before a possible "\n"
                cut = _complete_utf8(buf)
                if cut and buf[cut - 1] == 0x0D:
                    cut -= 1
            chunk, pending = (buf, b"") if cut == len(buf) else (buf[:cut], buf[cut:])
            if chunk:
                text = _decode(chunk, offset, path, errors, error_class)
                if "\r" in text:
                    text = text.replace("\r\n", "\n").replace("\r", "\n")
                yield offset, text
                offset += len(chunk)
            if not data:
                return


def iter_lines(path: str | os.PathLike, errors: str = "strict", max_chars: int = 4096, error_class=None):
    """The non-blank lines of a text file without their newline, streamed; a line longer than
    ``max_chars`` comes out in pieces cut at spaces (or every ``max_chars`` characters)."""
    carry = ""
    for _, block in iter_text(path, errors, error_class=error_class):
        lines = (carry + block).split("\n")
        carry = lines.pop()
        for line in lines:
            yield from _line_pieces(line, max_chars)
        if len(carry) > max_chars:  # a very long line: give out all but its last piece now
            pieces = list(_line_pieces(carry, max_chars, keep_blank=True))
            carry = pieces.pop()
            yield from (p for p in pieces if p.strip())
    yield from _line_pieces(carry, max_chars)


def _line_pieces(line: str, max_chars: int, keep_blank: bool = False):
    start = 0
    while len(line) - start > max_chars:
        cut = line.rfind(" ", start + max_chars // 2, start + max_chars)
        cut = start + max_chars if cut <= start else cut
        if line[start:cut].strip():
            yield line[start:cut]
        start = cut
    if keep_blank or line[start:].strip():
        yield line[start:]


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


def _is_jsonl(path: Path) -> bool:
    return path.suffix in (".jsonl", ".json")


def _iter_records(path: Path, text_field: str, errors: str):
    """``(doc_key, text)`` of each non-empty JSONL record, one line in memory at a time."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode(raw, offset, path, errors, DataError, what=f" (line {lineno})")
            offset += len(raw)
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
                if not text.isascii():
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError:  # a "\ud800" escape: a lone surrogate, not a character
                        if errors == "strict":
                            raise DataError(f"{path}:{lineno}: the {text_field!r} field holds an unpaired surrogate "
                                            "escape (such as \\ud800), which is not text; fix the record, or set "
                                            "data.errors=replace (--errors replace)") from None
                        text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
                yield f"{path.name}:{lineno}", text


def _has_text(path: Path, errors: str) -> bool:
    """Whether a text file holds anything but whitespace; reads (and so checks the decoding of) all of it."""
    found = False
    for _, block in iter_text(path, errors):
        found = found or (bool(block) and not block.isspace())
    return found


def iter_documents(path: Path, text_field: str = "text", errors: str = "strict"):
    """Yield ``(doc_key, text)`` for each non-empty document of a file (a whole text file is one
    document, so this holds it in memory; :func:`prepare_shards` streams instead)."""
    if _is_jsonl(path):
        yield from _iter_records(path, text_field, errors)
    elif _has_text(path, errors):
        yield path.name, "".join(block for _, block in iter_text(path, errors))


def _is_val(doc_key: str, path: Path, val_patterns: list[str], val_fraction: float, split_seed: int) -> bool:
    for pat in val_patterns:
        if fnmatch.fnmatch(path.name, pat) or fnmatch.fnmatch(str(path), pat) or fnmatch.fnmatch(doc_key, pat):
            return True
    return _split_hash(doc_key, split_seed) < val_fraction


def _split_hash(doc_key: str, split_seed: int) -> float:
    h = hashlib.sha256(f"{split_seed}:{doc_key}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2**64


def shard_settings(val_fraction: float = 0.05, val_files: list[str] | None = None, split_seed: int = 0,
                   text_field: str = "text", shard_tokens: int = 1 << 26, errors: str = "strict") -> dict:
    """The settings that shape the shards (part of their fingerprint)."""
    return {"val_fraction": val_fraction, "val_files": list(val_files or []), "split_seed": split_seed,
            "text_field": text_field, "shard_tokens": shard_tokens, "format": INDEX_FORMAT, "errors": errors}


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


# ---------------------------------------------------------------------------- tokenizing
#: longest piece of a document handed to the tokenizer in one call, in characters. The fast
#: tokenizer's working memory is about 100-250 bytes per character of one call, so a whole file
#: in one call needed gigabytes; pieces keep it to a few hundred MB per batch whatever the file size
PIECE_CHARS = 1 << 16
#: characters and pieces per tokenizer batch (one call, parallel over pieces)
BATCH_CHARS = 1 << 20
BATCH_PIECES = 1024


def _encode_plain(tok, texts: list[str]) -> list[list[int]]:
    return tok(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]


def cut_mode(encode) -> str | None:
    """How a document can be cut at a space so that its pieces' tokens equal the whole document's.

    ``encode(list_of_texts) -> list of id lists``. "drop": cut at a space and leave that space out
    of the next piece (sentencepiece-style tokenizers such as ours, whose normalizer prepends "▁" to
    every input and turns each space into "▁", and whose pre-tokenizer splits before every "▁": the
    prepended "▁" stands for the dropped space, so every pre-token, hence every token, is the same).
    "keep": cut before a space, which starts the next piece (byte-level BPE, GPT-2 style, whose
    pre-tokens start with their space). None: neither holds for this tokenizer; then pieces are cut
    after a newline where possible, and tokens may differ from whole-document tokenization next to
    a cut (the text itself is kept exactly)."""
    probes = ["ORSINO. If music be the food  of love,\nplay on; na\u00efve \u4e2d\u6587 caf\u00e9 \u2603 12345 x",
              "a  b\n\n c\t d  ", "<s> x</s> <0x41> y"]
    cases = []
    for probe in probes:
        for j in [i for i, ch in enumerate(probe) if ch == " " and 0 < i < len(probe) - 1]:
            cases.append((probe, j))
    whole = dict(zip(probes, encode(probes)))
    for mode, skip in (("drop", 1), ("keep", 0)):
        lefts = encode([p[:j] for p, j in cases])
        rights = encode([p[j + skip:] for p, j in cases])
        if all(list(a) + list(b) == list(whole[p]) for (p, _), a, b in zip(cases, lefts, rights)):
            return mode
    return None


def _cut(buf: str, start: int, piece_chars: int, mode: str | None) -> tuple[int, int]:
    """``(end, next_start)`` of the piece of ``buf`` starting at ``start``, which is longer than
    ``piece_chars`` after ``start``. Cut points, best first: a space (when ``mode`` says how cutting
    there keeps tokenization exact) in the second half of the window, a newline, a space, and
    failing all of these (a long run without whitespace) exactly ``piece_chars`` characters on.
    Python strings index characters, so no cut falls inside a UTF-8 sequence; a fixed-size cut can
    still split a run of combining characters, or a word the tokenizer would have kept whole."""
    low, high = start + piece_chars // 2, start + piece_chars
    if mode is not None:
        j = buf.rfind(" ", low, high)
        if j > start:
            return (j, j + 1) if mode == "drop" else (j, j)
    j = buf.rfind("\n", low, high)
    if j >= start:
        return j + 1, j + 1
    j = buf.rfind(" ", low, high)
    if j > start:
        return j, j
    return high, high


def split_document(blocks, mode: str | None, piece_chars: int = PIECE_CHARS):
    """Cut a document, given as an iterable of text blocks, into pieces of at most ``piece_chars``
    characters (see :func:`_cut`), holding at most one block plus one piece in memory."""
    buf, pos = "", 0
    for block in blocks:
        buf = buf[pos:] + block if pos < len(buf) else block
        pos = 0
        # strictly longer than a piece: something always follows a cut, so no piece is empty
        while len(buf) - pos > piece_chars:
            end, nxt = _cut(buf, pos, piece_chars, mode)
            yield buf[pos:end]
            pos = nxt
    if pos < len(buf):
        yield buf[pos:]


class _Encoder:
    """Token ids of pieces of document text, with no special token in them (see :meth:`encode`)."""

    def __init__(self, tok):
        self.tok = tok
        self.backend = None
        if tok.is_fast:
            from tokenizers import Tokenizer

            # a private copy without truncation or padding (tokenizer.json may carry either)
            self.backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
            self.backend.no_truncation()
            self.backend.no_padding()
            self.backend.encode_special_tokens = True  # = split_special_tokens=True
        self.spellings = _special_spellings(tok)
        self.special_ids = np.array(sorted(self.spellings), dtype=np.int64)
        self.byte_spellings = _byte_piece_spellings(tok)

    def raw(self, texts: list[str]) -> list[list[int]]:
        if self.backend is None:
            return _encode_plain(self.tok, texts)
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def encode(self, texts: list[str], keys: list[str]) -> list[np.ndarray]:
        """Token ids of each text, as uint32 arrays.

        ``split_special_tokens`` stops the fast tokenizer from matching its added special tokens in
        the text, but a sentencepiece vocabulary holds ``<s>`` etc. as pieces, and the model itself
        still picks them; such ids are replaced by the bytes of their text (byte fallback), which
        decode to the same text. Likewise a byte piece that the text spelled out (``<0x41>``)."""
        if self.backend is None:
            all_ids, all_spans = _encode_plain(self.tok, texts), [None] * len(texts)
        else:
            encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
            all_ids = [e.ids for e in encodings]
            all_spans = encodings
        out = []
        for ids, spans, text, key in zip(all_ids, all_spans, texts, keys):
            if self.byte_spellings and "<0x" in text and spans is not None:  # only then can a byte piece be literal
                ids = _spell_out_byte_pieces(ids, spans.offsets, text, self.byte_spellings)
            arr = np.array(ids, dtype=np.int64)
            if len(arr) and np.isin(arr, self.special_ids).any():
                arr = np.array(_spell_out_specials(list(ids), text, key, self.spellings), dtype=np.int64)
            out.append(arr.astype(np.uint32))
        return out


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


def encode_documents(tok, texts: list[str], keys: list[str], spellings: dict | None = None) -> list[list[int]]:
    """Token ids of each document's text, with no special token in them (see :meth:`_Encoder.encode`)."""
    return [ids.tolist() for ids in _Encoder(tok).encode(texts, keys)]


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


# Worker processes (--workers N): each loads the tokenizer once and encodes whole batches.
_WORKER_ENCODER: _Encoder | None = None


def _worker_init(tokenizer_dir: str) -> None:
    global _WORKER_ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    from tnl_training.tokenizer import load_tokenizer

    _WORKER_ENCODER = _Encoder(load_tokenizer(tokenizer_dir))


def _worker_encode(texts: list[str], keys: list[str]) -> list[np.ndarray]:
    return _WORKER_ENCODER.encode(texts, keys)


class _ShardWriter:
    """Writes the documents of one split into shards as their tokens arrive, straight into a
    temporary file next to the shard (header written last, then fsync and rename: see
    :func:`write_shard`), holding only the document offsets of the open shard in memory."""

    def __init__(self, out_dir: Path, split: str, dtype, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.entries: list[dict] = []
        self._file, self._tmp = None, None

    def _open(self):
        self.path = self.out_dir / f"{self.split}-{len(self.entries):05d}.bin"
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.out_dir)
        self._file, self._tmp = os.fdopen(fd, "wb"), Path(tmp)
        self._file.write(b"\0" * HEADER_SIZE)
        self._crc, self._count, self._ends = 0, 0, array("q")

    def write(self, ids: np.ndarray) -> None:
        if self._file is None:
            self._open()
        data = np.ascontiguousarray(ids, dtype=self.dtype)
        self._crc = zlib.crc32(memoryview(data).cast("B"), self._crc)
        self._file.write(data.tobytes())
        self._count += len(data)

    def end_document(self) -> None:
        self._ends.append(self._count)
        if self._count >= self.shard_tokens:
            self.finish()

    def finish(self) -> None:
        """Complete the open shard (if any) and move it to its name."""
        if self._file is None:
            return
        offsets = np.concatenate([[0], np.frombuffer(self._ends, dtype=np.int64)]).astype("<i8")
        payload_crc = zlib.crc32(memoryview(offsets).cast("B"), self._crc) & 0xFFFFFFFF
        f = self._file
        f.write(offsets.tobytes())
        f.seek(0)
        f.write(_shard_header(self.dtype.itemsize, self._count, len(self._ends), payload_crc))
        f.flush()
        os.fsync(f.fileno())
        f.close()
        self._file = None
        os.replace(self._tmp, self.path)
        self._tmp = None
        _fsync_dir(self.path.parent)
        self.entries.append({"file": self.path.name, "tokens": self._count, "docs": len(self._ends),
                             "crc32": payload_crc, "bytes": HEADER_SIZE + self._count * self.dtype.itemsize
                             + offsets.nbytes})

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None


def _scan(files: list[Path], text_field: str, errors: str, val_files: list[str], val_fraction: float,
          split_seed: int):
    """First pass, before any tokenizing: reads every file once (so undecodable text, bad JSON and
    an empty corpus are reported in seconds, not after hours of tokenizing) and decides the split.
    Returns ``(indices of the text files that hold text, number of documents, keys of the validation
    documents, ordinal of the fallback validation document or None)``: nothing of corpus size."""
    with_text: set[int] = set()
    n_docs, val_keys = 0, []
    lowest = (2.0, -1, "")
    for i, f in enumerate(files):
        if _is_jsonl(f):
            keys = (key for key, _ in _iter_records(f, text_field, errors))
        elif _has_text(f, errors):
            with_text.add(i)
            keys = iter([f.name])
        else:
            keys = iter(())
        for key in keys:
            if _is_val(key, f, val_files, val_fraction, split_seed):
                val_keys.append(key)
            else:
                lowest = min(lowest, (_split_hash(key, split_seed), n_docs, key))
            n_docs += 1
    fallback = None
    if val_fraction > 0 and not val_keys and n_docs >= 2:
        # small corpora: hold out the single document with the lowest split hash
        fallback = lowest[1]
        val_keys.append(lowest[2])
    return with_text, n_docs, val_keys, fallback


def prepare_shards(files: list[str | os.PathLike], tokenizer_dir: str | os.PathLike, out_dir: str | os.PathLike,
                   val_fraction: float = 0.05, val_files: list[str] | None = None, split_seed: int = 0,
                   shard_tokens: int = 1 << 26, text_field: str = "text", log=print, errors: str = "strict",
                   workers: int = 1) -> dict:
    """Tokenize ``files`` into ``out_dir`` (train/val shards + index.json); returns the index.

    Streams: a text file is read in 1 MiB blocks and tokenized in pieces of at most
    :data:`PIECE_CHARS` characters (:func:`split_document`; one document all the same, with BOS
    before its first piece and EOS after its last), and tokens go to disk as they come, so memory
    stays bounded whatever the file sizes (a JSONL record is held whole while it is tokenized).
    ``errors``: see :data:`TEXT_ERRORS`. ``workers`` > 1 tokenizes in that many processes; the
    shards are byte-identical to ``workers=1``."""
    from tnl_training.tokenizer import load_tokenizer

    _check_errors(errors)
    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    files = [Path(f) for f in files]
    for f in files:
        if not f.is_file():
            raise DataError(f"data file {str(f)!r} does not exist" if not f.exists() else
                            f"data file {str(f)!r} is not a regular file")
    tok = load_tokenizer(tokenizer_dir)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    if bos is None or eos is None:
        raise DataError(f"tokenizer {tokenizer_dir} has no BOS/EOS token")
    vocab = len(tok)
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    val_files = list(val_files or [])
    settings = shard_settings(val_fraction, val_files, split_seed, text_field, shard_tokens, errors)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / INDEX_NAME).unlink(missing_ok=True)  # the directory is "not prepared" until the new index lands
    for old in list(out_dir.glob("train-*.bin")) + list(out_dir.glob("val-*.bin")) + list(
            out_dir.glob(".train-*.bin.*.tmp")) + list(out_dir.glob(".val-*.bin.*.tmp")):
        old.unlink()

    with_text, n_docs, val_keys, fallback = _scan(files, text_field, errors, val_files, val_fraction, split_seed)
    if n_docs == 0:
        raise DataError(f"the corpus is empty: no non-empty document in {[str(f) for f in files]}")
    if len(val_keys) == n_docs:
        raise DataError("every document went to validation; lower data.val_fraction or narrow data.val_files")

    encoder = _Encoder(tok)
    mode = cut_mode(encoder.raw)

    def pieces():
        """``(split, key, text, first, last)`` for every piece of every document, in order."""
        ordinal = 0
        for i, f in enumerate(files):
            if _is_jsonl(f):
                docs = ((key, [text]) for key, text in _iter_records(f, text_field, errors))
            else:
                docs = iter([(f.name, (block for _, block in iter_text(f, errors)))] if i in with_text else [])
            for key, blocks in docs:
                val = ordinal == fallback or _is_val(key, f, val_files, val_fraction, split_seed)
                split = "val" if val else "train"
                previous, count = None, 0
                for text in split_document(blocks, mode):
                    if previous is not None:
                        yield split, key, previous, count == 1, False
                    previous, count = text, count + 1
                yield split, key, previous, count == 1, True
                ordinal += 1

    def batches():
        batch, chars = [], 0
        for item in pieces():
            batch.append(item)
            chars += len(item[2])
            if chars >= BATCH_CHARS or len(batch) >= BATCH_PIECES:
                yield batch
                batch, chars = [], 0
        if batch:
            yield batch

    writers = {"train": _ShardWriter(out_dir, "train", dtype, shard_tokens),
               "val": _ShardWriter(out_dir, "val", dtype, shard_tokens)}
    bos_arr, eos_arr = np.array([bos], dtype=np.uint32), np.array([eos], dtype=np.uint32)

    def write(batch, encoded):
        for (split, _, _, first, last), ids in zip(batch, encoded):
            writer = writers[split]
            if first:
                writer.write(bos_arr)
            writer.write(ids)
            if last:
                writer.write(eos_arr)
                writer.end_document()

    pool = None
    try:
        if workers == 1:
            for batch in batches():
                write(batch, encoder.encode([b[2] for b in batch], [b[1] for b in batch]))
        else:
            import collections
            import multiprocessing

            # spawn: no fork of a process that may hold threads (tokenizers, torch); at most 2 batches per
            # worker in flight, so memory stays bounded however far reading runs ahead of tokenizing
            pool = multiprocessing.get_context("spawn").Pool(workers, _worker_init, (str(tokenizer_dir),))
            pending = collections.deque()
            for batch in batches():
                pending.append((batch, pool.apply_async(_worker_encode, ([b[2] for b in batch],
                                                                         [b[1] for b in batch]))))
                if len(pending) >= 2 * workers:
                    done, result = pending.popleft()
                    write(done, result.get())
            while pending:
                done, result = pending.popleft()
                write(done, result.get())
            pool.close()
        for w in writers.values():
            w.finish()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    index = {
        "format": INDEX_FORMAT,
        "fingerprint": fingerprint(files, tokenizer_dir, settings),
        "vocab_size": vocab, "bos_token_id": bos, "eos_token_id": eos,
        "tokenizer": str(Path(tokenizer_dir).resolve()),
        "settings": settings,
        "sources": [str(f.resolve()) for f in files],
        "val_documents": val_keys,
        "splits": {name: w.entries for name, w in writers.items()},
    }
    _atomic_write(out_dir / INDEX_NAME, lambda fh: fh.write(json.dumps(index, indent=1).encode()))
    n = {k: sum(e["tokens"] for e in v) for k, v in index["splits"].items()}
    log(f"tokenized {n_docs} documents from {len(files)} files into {out_dir}: "
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
           "TokenRows", "expand_files", "fingerprint", "iter_documents", "iter_text", "iter_lines", "shard_settings",
           "split_document", "cut_mode", "TEXT_ERRORS"]


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
    parser.add_argument("--errors", choices=TEXT_ERRORS, default="strict",
                        help="undecodable (non-UTF-8) bytes: strict = stop with the file name and byte offset "
                             "(default); replace = turn them into U+FFFD")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="tokenize in N processes (the shards are identical to --workers 1)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    from tnl_training.tokenizer import TokenizerError

    try:
        files = expand_files(args.files)
        prepare_shards(files, args.tokenizer, args.out, args.val_fraction, args.val_files, args.split_seed,
                       args.shard_tokens, args.text_field, errors=args.errors, workers=args.workers)
    except (DataError, TokenizerError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
