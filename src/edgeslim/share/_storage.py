"""Compact storage of clustered and pruned models: codebooks, entropy-coded indices and sparse masks.

File layout (``.eslz``): the magic ``b"ESLZ"``, a format version byte, a uint32 header length, the
zlib-compressed JSON header, then the payload. The header lists every state_dict entry of the stripped model
(see :func:`edgeslim.share.strip_clustering`) and how it is stored:

- ``clustered``: float32 codebook + the cluster index of every nonzero weight (a symbol stream) + the sparsity
  mask (a symbol stream of zero-run lengths, Deep Compression's relative indexing), if the layer is sparse;
- ``sparse``: a float tensor that is mostly zeros (e.g. pruned, not clustered): mask + nonzero values;
- ``alias``: a tensor tied to an earlier entry (stored once);
- ``dense``: everything else, concatenated into one compressed block.

Every symbol stream is coded with each codec in :data:`CODECS` (``packed`` fixed-width bits, ``zlib``, ``lzma``,
``huffman``) and the smallest is kept; :class:`StorageReport` records what each codec would have cost.
"""

from __future__ import annotations

import heapq
import io
import json
import lzma
import struct
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeslim.core.errors import ModelError
from edgeslim.core.io import write_bytes
from edgeslim.core.masks import mask_of
from edgeslim.core.registry import Registry
from edgeslim.share._cluster import ClusteredLayer, strip_clustering

MAGIC, VERSION = b"ESLZ", 1
RUN = 255  # mask streams: symbol 0..254 = that many zeros then a nonzero; 255 = 255 zeros, no nonzero
HUFFMAN_MAX_BITS = 15

_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


def _bits(alphabet: int) -> int:
    return max(1, int(np.ceil(np.log2(max(alphabet, 2)))))


def _bytes_of(s: np.ndarray, alphabet: int) -> bytes:
    return s.astype(np.uint8 if alphabet <= 256 else np.uint16).tobytes()


def _from_bytes(b: bytes, alphabet: int) -> np.ndarray:
    return np.frombuffer(b, np.uint8 if alphabet <= 256 else np.uint16).astype(np.int64)


# ---- symbol codecs: encode(symbols, alphabet) -> bytes; decode(bytes, n, alphabet) -> symbols ----------------


@dataclass(frozen=True)
class Codec:
    """A lossless coder of integer symbols in ``[0, alphabet)``."""

    encode: Callable[[np.ndarray, int], bytes]
    decode: Callable[[bytes, int, int], np.ndarray]


CODECS: Registry[Codec] = Registry("storage codec")


def _pack(s: np.ndarray, alphabet: int) -> bytes:
    b = _bits(alphabet)
    return np.packbits(((s[:, None] >> np.arange(b - 1, -1, -1)) & 1).astype(np.uint8)).tobytes()


def _unpack(data: bytes, n: int, alphabet: int) -> np.ndarray:
    b = _bits(alphabet)
    bits = np.unpackbits(np.frombuffer(data, np.uint8))[: n * b].reshape(n, b).astype(np.int64)
    return bits @ (1 << np.arange(b - 1, -1, -1))


CODECS.register("packed")(Codec(_pack, _unpack))
CODECS.register("zlib")(
    Codec(lambda s, a: zlib.compress(_bytes_of(s, a), 9), lambda d, n, a: _from_bytes(zlib.decompress(d), a))
)
CODECS.register("lzma")(
    Codec(
        lambda s, a: lzma.compress(_bytes_of(s, a), lzma.FORMAT_RAW, filters=_LZMA_FILTERS),
        lambda d, n, a: _from_bytes(lzma.decompress(d, lzma.FORMAT_RAW, filters=_LZMA_FILTERS), a),
    )
)


def _huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Code length per symbol (0 = unused), at most :data:`HUFFMAN_MAX_BITS` bits."""
    counts = counts.astype(np.int64)
    while True:
        used = np.flatnonzero(counts)
        lengths = np.zeros(len(counts), np.int64)
        if len(used) == 1:
            lengths[used] = 1
            return lengths
        heap = [(int(counts[s]), int(s), [int(s)]) for s in used]
        heapq.heapify(heap)
        while len(heap) > 1:
            c1, t1, a = heapq.heappop(heap)
            c2, t2, b = heapq.heappop(heap)
            lengths[a + b] += 1
            heapq.heappush(heap, (c1 + c2, min(t1, t2), a + b))
        if lengths.max() <= HUFFMAN_MAX_BITS:
            return lengths
        counts = np.where(counts > 0, (counts + 1) // 2, 0)  # flatten the distribution until codes fit


def _canonical(lengths: np.ndarray) -> np.ndarray:
    """Canonical Huffman codes (as integers) for the given code lengths."""
    codes = np.zeros(len(lengths), np.int64)
    code, prev = 0, 0
    for s in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[s]) - prev
        codes[s], prev = code, int(lengths[s])
        code += 1
    return codes


def _huffman_encode(s: np.ndarray, alphabet: int) -> bytes:
    lengths = _huffman_lengths(np.bincount(s, minlength=alphabet))
    codes = _canonical(lengths)
    table = lengths.astype(np.uint8)
    table = np.pad(table, (0, len(table) % 2))
    head = (table[0::2] << 4 | table[1::2]).astype(np.uint8).tobytes()  # one nibble per symbol
    ln, cd = lengths[s], codes[s]
    j = np.arange(HUFFMAN_MAX_BITS)
    bits = (cd[:, None] >> np.maximum(ln[:, None] - 1 - j, 0)) & 1
    return head + np.packbits(bits[j < ln[:, None]].astype(np.uint8)).tobytes()


def _huffman_decode(data: bytes, n: int, alphabet: int) -> np.ndarray:
    nib = (alphabet + 1) // 2
    raw = np.frombuffer(data[:nib], np.uint8)
    lengths = np.stack([raw >> 4, raw & 15], 1).ravel()[:alphabet].astype(np.int64)
    codes = _canonical(lengths)
    L = HUFFMAN_MAX_BITS
    sym_tab, len_tab = np.zeros(1 << L, np.int64), np.zeros(1 << L, np.int64)
    for s in np.flatnonzero(lengths):  # every L-bit window that starts with the code decodes to s
        lo = int(codes[s]) << (L - int(lengths[s]))
        sym_tab[lo : lo + (1 << (L - int(lengths[s])))] = s
        len_tab[lo : lo + (1 << (L - int(lengths[s])))] = lengths[s]
    bits = np.unpackbits(np.frombuffer(data[nib:], np.uint8))
    total = len(bits)
    padded = np.concatenate([bits, np.zeros(L, np.uint8)]).astype(np.int64)
    window = np.zeros(total, np.int64)
    for j in range(L):
        window = (window << 1) | padded[j : j + total]
    # symbol start positions are the orbit of 0 under p -> p + length(p); collect it by pointer doubling
    nxt = np.append(np.minimum(np.arange(total) + len_tab[window], total), total)
    pos = np.zeros(1, np.int64)
    while len(pos) < n:
        pos = np.concatenate([pos, nxt[pos]])
        nxt = nxt[nxt]
    return sym_tab[window[pos[:n]]]


CODECS.register("huffman")(Codec(_huffman_encode, _huffman_decode))


def _smallest(s: np.ndarray, alphabet: int) -> tuple[str, bytes, dict[str, int]]:
    """Code ``s`` with every codec; return the smallest (name, bytes) and every codec's size."""
    out = {name: CODECS.get(name).encode(s, alphabet) for name in CODECS}
    best = min(out, key=lambda k: len(out[k]))
    return best, out[best], {k: len(v) for k, v in out.items()}


def _blob(b: bytes) -> tuple[str, bytes]:
    """The smallest of raw / zlib / lzma for float bytes."""
    cands = {"raw": b, "zlib": zlib.compress(b, 9), "lzma": lzma.compress(b, lzma.FORMAT_RAW, filters=_LZMA_FILTERS)}
    best = min(cands, key=lambda k: len(cands[k]))
    return best, cands[best]


def _unblob(codec: str, b: bytes) -> bytes:
    if codec == "zlib":
        return zlib.decompress(b)
    if codec == "lzma":
        return lzma.decompress(b, lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    return b


def mask_to_runs(mask: np.ndarray) -> np.ndarray:
    """Mask (flat bool) -> zero-run symbols: each nonzero as the count of zeros before it (< 255), with 255
    standing for 255 zeros and no nonzero; trailing zeros are implied by the tensor size."""
    gaps = np.diff(np.flatnonzero(mask), prepend=-1) - 1
    fill = gaps // RUN
    out = np.full(int(fill.sum()) + len(gaps), RUN, np.int64)
    out[np.cumsum(fill + 1) - 1] = gaps % RUN
    return out


def runs_to_mask(runs: np.ndarray, size: int) -> np.ndarray:
    step = np.where(runs == RUN, RUN, runs + 1)
    mask = np.zeros(size, bool)
    mask[(np.cumsum(step) - 1)[runs != RUN]] = True
    return mask


# ---- the file ---------------------------------------------------------------------------------------------


@dataclass
class StorageReport:
    """Sizes of a compressed model file, measured.

    Attributes:
        path: the file written.
        compressed_bytes: its size on disk.
        dense_bytes: size of ``torch.save`` of the stripped model's FP32 state_dict (measured in memory).
        ratio: ``dense_bytes / compressed_bytes``.
        parts: bytes by kind: ``indices``, ``masks``, ``codebooks``, ``values`` (sparse unclustered weights),
            ``dense`` (everything else), ``header``.
        codec_bytes: for ``indices`` and ``masks``, what every codec would have cost in total and what the
            per-stream smallest (``best``) costs.
        streams: per entry: name, kind and the codec chosen for each stream.
    """

    path: str
    compressed_bytes: int
    dense_bytes: int
    ratio: float
    parts: dict[str, int] = field(default_factory=dict)
    codec_bytes: dict[str, dict[str, int]] = field(default_factory=dict)
    streams: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        best = {k: min((c for c in v if c != "best"), key=v.get) for k, v in self.codec_bytes.items() if v}
        return (
            f"{self.compressed_bytes} bytes vs {self.dense_bytes} dense ({self.ratio:.1f}x); smallest codec: "
            + ", ".join(f"{k} {c}" for k, c in best.items())
        )


def dense_size(model: nn.Module) -> int:
    """Bytes of ``torch.save`` of the stripped model's state_dict (measured in memory)."""
    buf = io.BytesIO()
    torch.save(strip_clustering(model).state_dict(), buf)
    return buf.getbuffer().nbytes


def save_compressed(model: nn.Module, path: str | Path, *, force: bool = False) -> StorageReport:
    """Write ``model`` compactly: codebooks + entropy-coded indices and masks, atomically.

    Args:
        model: a model from :func:`cluster` and/or :func:`magnitude_prune` (any model works; dense tensors are
            stored compressed as they are).
        path: the output file (``.eslz`` by convention); an existing file is refused unless ``force``.

    Returns:
        the :class:`StorageReport` (file size, dense size, which codec won).
    """
    payload = bytearray()
    entries: list[dict[str, Any]] = []
    parts = dict.fromkeys(("indices", "masks", "codebooks", "values", "dense", "header"), 0)
    codec_bytes: dict[str, dict[str, int]] = {"indices": {}, "masks": {}}

    def put(b: bytes, part: str) -> list[int]:
        payload.extend(b)
        parts[part] += len(b)
        return [len(payload) - len(b), len(b)]

    def stream(s: np.ndarray, alphabet: int, part: str) -> dict[str, Any]:
        alphabet = max(int(s.max()) + 1 if len(s) else 0, 2)  # symbols above the largest used cost nothing
        name, b, sizes = _smallest(s, alphabet)
        for k, v in {**sizes, "best": len(b)}.items():
            codec_bytes[part][k] = codec_bytes[part].get(k, 0) + v
        return {"codec": name, "n": len(s), "alphabet": alphabet, "at": put(b, part)}

    special: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if isinstance(m, ClusteredLayer) or mask_of(m) is not None:
            special[f"{name}.weight" if name else "weight"] = m
    state = strip_clustering(model).state_dict()
    seen: dict[tuple, str] = {}
    dense: list[bytes] = []
    dense_at = 0
    for key, t in state.items():
        e: dict[str, Any] = {"name": key, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
        ident = (
            (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.stride()), tuple(t.shape), t.dtype)
            if t.numel()
            else None
        )
        if ident in seen:
            entries.append({**e, "kind": "alias", "of": seen[ident]})
            continue
        if ident:
            seen[ident] = key
        m = special.get(key)
        flat = t.detach().flatten()
        mask = None
        if isinstance(m, ClusteredLayer):
            mask = None if m.weight_mask is None else m.weight_mask.bool().flatten().numpy()
        elif t.dtype == torch.float32 and t.numel() >= 64 and float((flat == 0).float().mean()) >= 0.5:
            mask = (flat != 0).numpy()
        if mask is not None:
            e["mask"] = stream(mask_to_runs(mask), RUN + 1, "masks")
        if isinstance(m, ClusteredLayer):
            idx = m.indices.flatten().long().numpy()
            k = len(m.centroids)
            e.update(
                kind="clustered",
                codebook=put(m.centroids.detach().float().numpy().tobytes(), "codebooks"),
                indices=stream(idx[mask] if mask is not None else idx, k, "indices"),
            )
        elif mask is not None:
            codec, b = _blob(flat.numpy()[mask].tobytes())
            e.update(kind="sparse", values={"codec": codec, "at": put(b, "values")})
        else:
            raw = flat.contiguous().view(torch.uint8).numpy().tobytes()
            e.update(kind="dense", at=[dense_at, len(raw)])
            dense.append(raw)
            dense_at += len(raw)
        entries.append(e)
    codec, blob = _blob(b"".join(dense))
    header = {
        "format": "edgeslim-compressed",
        "version": VERSION,
        "entries": entries,
        "dense": {"codec": codec, "at": put(blob, "dense")},
    }
    head = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    parts["header"] = len(head) + 9
    data = MAGIC + bytes([VERSION]) + struct.pack("<I", len(head)) + head + bytes(payload)
    write_bytes(path, data, force=force)
    dense_bytes = dense_size(model)
    return StorageReport(
        str(path),
        len(data),
        dense_bytes,
        dense_bytes / len(data),
        parts,
        {k: v for k, v in codec_bytes.items() if v},
        [
            {k: v for k, v in e.items() if k in ("name", "kind")}
            | {s: e[s]["codec"] for s in ("indices", "mask", "values") if s in e}
            for e in entries
        ],
    )


def read_compressed(path: str | Path) -> dict[str, torch.Tensor]:
    """The dense state_dict stored in a file written by :func:`save_compressed`."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"compressed model file {str(p)!r} does not exist")
    data = p.read_bytes()
    if data[:4] != MAGIC:
        raise ModelError(f"{str(p)!r} is not an edgeslim compressed model file (written by save_compressed)")
    if data[4] != VERSION:
        raise ModelError(f"{str(p)!r} has format version {data[4]}; this edgeslim reads version {VERSION}")
    try:
        (hlen,) = struct.unpack("<I", data[5:9])
        header = json.loads(zlib.decompress(data[9 : 9 + hlen]))
        body = memoryview(data)[9 + hlen :]

        def get(at: list[int]) -> bytes:
            return bytes(body[at[0] : at[0] + at[1]])

        def symbols(s: dict[str, Any]) -> np.ndarray:
            return CODECS.get(s["codec"]).decode(get(s["at"]), s["n"], s["alphabet"])

        dense = _unblob(header["dense"]["codec"], get(header["dense"]["at"]))
        out: dict[str, torch.Tensor] = {}
        for e in header["entries"]:
            dtype = getattr(torch, e["dtype"])
            shape, size = e["shape"], int(np.prod(e["shape"], dtype=np.int64))
            if e["kind"] == "alias":
                out[e["name"]] = out[e["of"]]
                continue
            if e["kind"] == "dense":
                raw = dense[e["at"][0] : e["at"][0] + e["at"][1]]
                t = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
                out[e["name"]] = t.view(dtype).reshape(shape).clone()
                continue
            mask = runs_to_mask(symbols(e["mask"]), size) if "mask" in e else np.ones(size, bool)
            if e["kind"] == "clustered":
                cents = np.frombuffer(get(e["codebook"]), np.float32)
                vals = cents[symbols(e["indices"])]
            else:
                vals = np.frombuffer(_unblob(e["values"]["codec"], get(e["values"]["at"])), np.float32)
            flat = np.zeros(size, np.float32)
            flat[mask] = vals
            out[e["name"]] = torch.from_numpy(flat).reshape(shape).to(dtype)
    except (KeyError, ValueError, IndexError, zlib.error, lzma.LZMAError, struct.error) as err:
        raise ModelError(f"compressed model file {str(p)!r} is corrupt: {type(err).__name__}: {err}") from None
    return out


def load_compressed(path: str | Path, model: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    """Rebuild a plain model with the exact dense weights stored by :func:`save_compressed`.

    Args:
        path: the file.
        model: a template model (copied, then stripped of clustering/pruning wrappers) or a factory returning
            a fresh model of the same architecture (replay structural steps such as ``factorize`` or
            ``tie_layers`` in the factory).

    Returns:
        the model in eval mode.

    Raises:
        ModelError: a missing or corrupt file, or weights that do not match the model.
    """
    from edgeslim.models import apply_state_dict

    if isinstance(model, nn.Module):
        target = strip_clustering(model)
    elif callable(model):
        target = strip_clustering(model())
    else:
        raise ModelError(f"load_compressed needs a template nn.Module or a factory, got {type(model).__name__}")
    return apply_state_dict(target, read_compressed(path), str(path)).eval()
