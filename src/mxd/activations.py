"""(x, y) pairs of MLP activations: streamed on the fly, or harvested once into an on-disk cache.

Cache layout (`mxd harvest`):

    CACHE/manifest.json              what was harvested: model, layers, data, split, dtype, shapes, shards
    CACHE/shard-{rank}.json          one per process: its finished chunks (file, tokens, bytes, sha256)
    CACHE/chunk-{rank}-{index}.safetensors
        x      [n_layers, n_tokens, d_in]    the MLP inputs, row r from token r  (fp32 or bf16)
        y      [n_layers, n_tokens, d_out]   the MLP outputs
        tokens [n_blocks, context_len]       the token ids the activations came from (int32)

A chunk is written to a temporary name and renamed, then listed in its shard file (also replaced
atomically), so an interrupted harvest resumes after its last listed chunk. Readers memory-map the
chunks (safetensors' header gives each tensor's offset) and gather shuffled rows across them.
Under torchrun, rank r harvests blocks r, r + world, r + 2·world, ... into its own shard.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from mxd.checks import check_at_least, check_device, check_out
from mxd.data import SPLITS, DataConfig, iter_documents, source_fingerprint, token_blocks
from mxd.files import (DamagedFileError, has_sha256, inside, read_json, remember_verified, save_tensors, sha256,
                       write_json_atomic)
from mxd.models import (DEFAULT_MODEL, MLPSite, check_context_len, check_module_path, find_mlp, host_mlp, load_model,
                        mlp_activations)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MANIFEST = "manifest.json"
# Fields of the manifest that must agree for a cache to be resumed or reused.
IDENTITY_FIELDS = ("model", "layers", "module_path", "data", "split", "dtype", "model_dtype", "chunk_tokens", "world_size",
                   "source_sha256")
# Fields of the manifest each chunk records in its safetensors metadata (checked against the manifest).
CHUNK_IDENTITY = ("model", "layers", "module_path", "data", "split", "dtype", "model_dtype", "source_sha256")
_MANIFEST_FIELDS = ("model", "layers", "data", "split", "context_len", "dtype", "d_in", "d_out", "host_mlp", "shards",
                    "complete")


@dataclass
class HarvestConfig:
    """What `mxd harvest` computes and where it writes it.

    out: folder of the cache (an interrupted harvest there resumes); model: embedded model name,
    local folder or Hub id; layers: MLP sites harvested in one forward pass; module_path: override of
    the MLP module (e.g. "model.layers.{layer}.mlp"); split: "train", "validation" or "test" documents;
    max_tokens: total over all ranks; batch_size: sequences per forward pass; chunk_tokens: tokens
    per chunk file (a multiple of context_len); dtype: storage dtype, fp32 or bf16; model_dtype: the
    dtype the model runs in; device: cpu, cuda or cuda:N.
    """

    out: str = "cache/activations"
    model: str = DEFAULT_MODEL
    layers: list[int] = field(default_factory=lambda: [15])
    module_path: str | None = None
    split: str = "train"
    max_tokens: int = 1_000_000
    batch_size: int = 32
    chunk_tokens: int = 16_384
    dtype: str = "fp32"
    model_dtype: str = "fp32"
    device: str = "cpu"
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self):
        if isinstance(self.data, dict):
            self.data = DataConfig(**self.data)
        check_out(self.out)
        for name in ("dtype", "model_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: valid values are {', '.join(DTYPES)}")
        if self.split not in SPLITS:
            raise ValueError(f"split={self.split!r} is invalid: valid values are {', '.join(SPLITS)}")
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers={self.layers} is invalid: give one or more distinct layer indices")
        check_at_least(self, 1, "max_tokens", "batch_size", "chunk_tokens")
        if self.chunk_tokens % self.data.context_len:
            raise ValueError(
                f"chunk_tokens={self.chunk_tokens} is invalid: must be a multiple of context_len={self.data.context_len}"
            )
        check_module_path(self.module_path)
        check_device(self.device)


class CorruptCacheError(DamagedFileError):
    """A chunk of an activation cache is missing, truncated, fails its checksum or does not match its manifest."""


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _manifest_for(cfg: HarvestConfig, sites: list[MLPSite], d_in: int, d_out: int, world: int, host: dict) -> dict:
    return {
        "format": "mxd-activations-1",
        "model": cfg.model,
        "layers": cfg.layers,
        "module_path": cfg.module_path,
        "mlp_paths": [site.path for site in sites],
        "data": asdict(cfg.data),
        "source_sha256": source_fingerprint(cfg.data),
        "split": cfg.split,
        "context_len": cfg.data.context_len,
        "dtype": cfg.dtype,
        "model_dtype": cfg.model_dtype,
        "d_in": d_in,
        "d_out": d_out,
        "host_mlp": host,
        "chunk_tokens": cfg.chunk_tokens,
        "max_tokens": cfg.max_tokens,
        "world_size": world,
        "shards": [f"shard-{r:03d}.json" for r in range(world)],
        "complete": False,
    }


def _check_identity(existing: dict, wanted: dict, where: Path) -> None:
    """Refuse to extend the cache in `where` unless it was harvested with the same settings from the
    same source files (caches written before sources were fingerprinted are not compared on that)."""
    differs = [k for k in IDENTITY_FIELDS if existing.get(k) != wanted[k]
               and not (k == "source_sha256" and k not in existing)]
    diffs = [f"the files of source {wanted['data']['source']!r} changed since this cache was harvested" if k == "source_sha256"
             else f"{k}: cache has {existing.get(k)!r}, requested {wanted[k]!r}" for k in differs]
    if diffs:
        raise ValueError(f"{where} holds a different harvest ({'; '.join(diffs)}); choose another output folder")


def site_dims(model, site: MLPSite) -> tuple[int, int]:
    """(d_in, d_out) of the MLP at `site`, read from one two-token forward pass."""
    device = next(model.parameters()).device
    x, y = mlp_activations(model, torch.zeros(1, 2, dtype=torch.long, device=device), [site])[site.layer]
    return x.shape[-1], y.shape[-1]


def harvest(cfg: HarvestConfig, model=None, tokenizer=None, progress: bool = True) -> "ActivationCache":
    """Write (x, y) of every layer in `cfg.layers` for up to cfg.max_tokens tokens; resumes if interrupted.

    Everything is checked (model, site, context length, source, an existing cache's settings and
    chunks) before the first file is written, so a refused harvest leaves the folder as it was.
    """
    rank, world = rank_and_world()
    ctx = cfg.data.context_len
    total_blocks = cfg.max_tokens // ctx
    if total_blocks < world:
        raise ValueError(f"max_tokens={cfg.max_tokens} is too small: {world} process(es) need at least {world * ctx} tokens")
    if model is None:
        model, tokenizer = load_model(cfg.model, dtype=DTYPES[cfg.model_dtype], device=cfg.device)
    check_context_len(model, ctx)
    sites = [find_mlp(model, layer, cfg.module_path) for layer in cfg.layers]
    d_in, d_out = site_dims(model, sites[0])
    all_blocks = token_blocks(iter_documents(cfg.data, cfg.split), tokenizer, ctx)
    first = next(all_blocks, None)  # reads the source: an unreadable or too short one fails here
    if first is None:
        raise ValueError(f"empty corpus: source {cfg.data.source!r} gives no complete block of {ctx} tokens "
                         f"in its {cfg.split} split")
    wanted = _manifest_for(cfg, sites, d_in, d_out, world, host_mlp(model, sites[0]))
    out = Path(cfg.out)
    shard_path = out / f"shard-{rank:03d}.json"
    chunks = []
    if (out / MANIFEST).exists():
        existing = read_manifest(out)
        _check_identity(existing, wanted, out)
        chunks = _read_shard(out, shard_path.name, out / MANIFEST)
        _check_chunks(out, chunks, existing)  # no resuming over damage
    _barrier()  # every rank has checked before anything is written
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f".chunk-{rank:03d}-*.tmp-*"):  # left by a harvest killed while writing
        stale.unlink()
    if rank == 0:
        write_json_atomic(out / MANIFEST, wanted)  # complete: false until every shard is finished
    _barrier()

    shard = {"rank": rank, "chunks": chunks}
    blocks_per_chunk = cfg.chunk_tokens // ctx
    my_blocks = total_blocks // world + (rank < total_blocks % world)
    done_blocks = sum(c["n_tokens"] for c in shard["chunks"]) // ctx

    blocks = islice(chain([first], all_blocks), rank, None, world)
    blocks = islice(blocks, done_blocks, my_blocks)  # skip what earlier runs already wrote
    dtype = DTYPES[cfg.dtype]
    metadata = {"mxd": json.dumps({k: wanted[k] for k in CHUNK_IDENTITY})}
    with tqdm(total=my_blocks * ctx, initial=done_blocks * ctx, unit="tok", unit_scale=True,  # closed also on failure
              desc=f"harvest rank {rank}" if world > 1 else "harvest", disable=not progress) as bar:
        while chunk_blocks := list(islice(blocks, blocks_per_chunk)):
            tokens = torch.stack(chunk_blocks)  # [n_blocks, ctx]
            xs = torch.empty(len(cfg.layers), tokens.numel(), d_in, dtype=dtype)
            ys = torch.empty(len(cfg.layers), tokens.numel(), d_out, dtype=dtype)
            for start in range(0, len(tokens), cfg.batch_size):
                batch = tokens[start : start + cfg.batch_size].to(cfg.device)
                captured = mlp_activations(model, batch, sites)
                rows = slice(start * ctx, start * ctx + batch.numel())
                for i, layer in enumerate(cfg.layers):
                    x, y = captured[layer]
                    xs[i, rows] = x.reshape(-1, d_in).to("cpu", dtype)
                    ys[i, rows] = y.reshape(-1, d_out).to("cpu", dtype)
                bar.update(batch.numel())
            name = f"chunk-{rank:03d}-{len(shard['chunks']):06d}.safetensors"
            save_tensors({"x": xs, "y": ys, "tokens": tokens.to(torch.int32)}, out / name, metadata)
            digest = sha256(out / name)
            remember_verified(out / name, digest)
            shard["chunks"].append({"file": name, "n_tokens": tokens.numel(), "bytes": (out / name).stat().st_size,
                                    "sha256": digest})
            write_json_atomic(shard_path, shard)
    if not shard["chunks"]:
        raise ValueError(f"empty corpus: source {cfg.data.source!r} gives this process no complete block of {ctx} "
                         f"tokens in its {cfg.split} split")
    _barrier()
    cache = ActivationCache(out, allow_partial=True)  # every shard is finished: the cache is whole
    if rank == 0:
        manifest = cache.manifest | {"complete": True, "max_tokens": cfg.max_tokens, "n_tokens": cache.n_tokens}
        write_json_atomic(out / MANIFEST, manifest)
        cache.manifest = manifest
    _barrier()
    return cache


# --- reading a cache: the one place that checks manifests, shards and chunks ----------------------


def read_manifest(folder: Path) -> dict:
    """The manifest of the cache in `folder`, checked for its fields and for shard names inside the folder."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {folder} is not an activation cache (run mxd harvest)")
    manifest = read_json(path)
    missing = [k for k in _MANIFEST_FIELDS if k not in manifest] if isinstance(manifest, dict) else ["all"]
    if missing:
        raise CorruptCacheError(f"{path}: not an activation cache manifest (missing fields {missing}); re-harvest")
    if manifest["dtype"] not in DTYPES or not isinstance(manifest["shards"], list):
        raise CorruptCacheError(f"{path}: dtype={manifest['dtype']!r} or shards={manifest['shards']!r} is invalid; re-harvest")
    for name in manifest["shards"]:
        inside(Path(folder), name, str(path))
    return manifest


def _read_shard(folder: Path, name: str, manifest_path: Path) -> list[dict]:
    """The finished chunks one shard file lists ([] before its first chunk), each entry checked."""
    path = inside(folder, name, str(manifest_path))
    if not path.exists():
        return []
    shard = read_json(path)
    chunks = shard.get("chunks") if isinstance(shard, dict) else None
    fields = {"file": str, "n_tokens": int, "bytes": int, "sha256": str}
    if not isinstance(chunks, list) or not all(isinstance(c, dict) and all(isinstance(c.get(k), t) for k, t in fields.items())
                                               for c in chunks):
        raise CorruptCacheError(f"{path}: not a shard file (a list of chunks with {', '.join(fields)}); re-harvest")
    for chunk in chunks:
        inside(folder, chunk["file"], str(path))
    return chunks


def read_cache(folder: str | Path, allow_partial: bool = False) -> tuple[dict, list[dict]]:
    """(manifest, finished chunks) of the cache in `folder`, refusing a cache that is incomplete
    (unless allow_partial), names files outside its folder, or whose chunks are damaged, edited or
    do not match the manifest (see `_check_chunks`)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    chunks = [c for name in manifest["shards"] for c in _read_shard(folder, name, folder / MANIFEST)]
    if not chunks:
        raise ValueError(f"activation cache {folder} holds no finished chunk yet")
    if not manifest["complete"] and not allow_partial:
        raise ValueError(f"activation cache {folder} is incomplete (its harvest was interrupted or is still running: "
                         f"{sum(c['n_tokens'] for c in chunks):,} tokens so far); finish it by running the same mxd "
                         f"harvest again, or pass --allow-partial to use what it holds")
    listed = sum(c["n_tokens"] for c in chunks)
    if manifest["complete"] and manifest.get("n_tokens", listed) != listed:
        raise CorruptCacheError(f"activation cache {folder}: its shards list {listed:,} tokens but {MANIFEST} says "
                                f"{manifest['n_tokens']:,} (edited or mixed with another harvest); re-harvest")
    _check_chunks(folder, chunks, manifest)
    return manifest, chunks


def _chunk_problem(path: Path, chunk: dict, manifest: dict) -> str | None:
    """What is wrong with one chunk file, or None: missing, truncated, checksum, or tensors and
    recorded harvest settings that differ from the manifest's."""
    if not path.is_file():
        return "missing"
    if path.stat().st_size != chunk["bytes"]:
        return f"truncated: {path.stat().st_size} of {chunk['bytes']} bytes"
    if not has_sha256(path, chunk["sha256"]):
        return "checksum mismatch"
    header, _ = _header(path)
    n, ctx, n_layers = chunk["n_tokens"], manifest["context_len"], len(manifest["layers"])
    dtype = {"fp32": "F32", "bf16": "BF16"}[manifest["dtype"]]
    expected = {"x": ([n_layers, n, manifest["d_in"]], dtype), "y": ([n_layers, n, manifest["d_out"]], dtype),
                "tokens": ([n // ctx, ctx], "I32")}
    for name, (shape, kind) in expected.items():
        info = header.get(name, {})
        if info.get("shape") != shape or info.get("dtype") != kind:
            return f"{name} is {info.get('dtype')} {info.get('shape')}, {MANIFEST} implies {kind} {shape}"
    recorded = json.loads(header.get("__metadata__", {}).get("mxd", "null"))  # None: harvested before it was recorded
    differs = [k for k in CHUNK_IDENTITY if recorded is not None and recorded.get(k) != manifest.get(k)]
    if differs:
        short = lambda k, v: f"{v[:12]}..." if k == "source_sha256" and isinstance(v, str) else v  # noqa: E731
        return "harvested with " + ", ".join(f"{k}={short(k, recorded.get(k))!r}" for k in differs) + \
               f", {MANIFEST} says " + ", ".join(f"{k}={short(k, manifest.get(k))!r}" for k in differs)
    return None


def _check_chunks(folder: Path, chunks: list[dict], manifest: dict) -> None:
    """Raise CorruptCacheError naming the chunks that are damaged or do not match the manifest, grouped
    by what is wrong (each chunk's SHA-256 is read once per process while its file is unchanged)."""
    bad: dict[str, list[str]] = {}
    for chunk in chunks:
        if problem := _chunk_problem(folder / chunk["file"], chunk, manifest):
            bad.setdefault(problem, []).append(chunk["file"])
    if bad:
        parts = [names[0] + (f" and {len(names) - 1} more" if len(names) > 1 else "") + f" ({problem})"
                 for problem, names in list(bad.items())[:3]]
        raise CorruptCacheError(f"activation cache {folder} has damaged or mismatched chunks: {', '.join(parts)}"
                                f"{' and more' if len(bad) > 3 else ''}; restore them or harvest again into a new folder")


_ST_DTYPES = {"F32": np.float32, "BF16": np.uint16, "I32": np.int32}  # bf16 is read as raw uint16


def _header(path: Path) -> tuple[dict, int]:
    """(JSON header, its length in bytes) of a safetensors file: an 8-byte little-endian length, the
    header, then the data."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(header_len)), header_len


def _memmap_tensors(path: Path) -> dict[str, np.memmap]:
    """Memory-map every tensor of a safetensors file."""
    header, header_len = _header(path)
    arrays = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        arrays[name] = np.memmap(path, dtype=_ST_DTYPES[info["dtype"]], mode="r",
                                 offset=8 + header_len + start, shape=tuple(info["shape"]))
    return arrays


class ActivationCache:
    """Reader of a harvested cache: sizes, integrity checks and shuffled (x, y) batches per layer.

    Opening it checks the manifest, the shards and every chunk (size, SHA-256, shapes, harvest
    settings; see `read_cache`); an incomplete cache is refused unless `allow_partial`.
    """

    def __init__(self, path: str | Path, allow_partial: bool = False):
        self.path = Path(path)
        self.manifest, self.chunks = read_cache(self.path, allow_partial)
        self._maps = [None] * len(self.chunks)

    @property
    def layers(self) -> list[int]:
        return self.manifest["layers"]

    @property
    def n_tokens(self) -> int:
        return sum(c["n_tokens"] for c in self.chunks)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.manifest["dtype"]]

    def verify(self) -> None:
        """Check every chunk again (opening the cache did; a chunk unchanged since it was verified in
        this process is not read again); raises CorruptCacheError naming the bad ones."""
        _check_chunks(self.path, self.chunks, self.manifest)

    def nonfinite_chunks(self, layer: int) -> list[str]:
        """The chunk files whose x or y rows of `layer` hold a NaN or ±Inf (reads every chunk)."""
        li = self.layers.index(layer)
        bad = []
        for i, chunk in enumerate(self.chunks):
            for name in ("x", "y"):
                rows = np.asarray(self._chunk(i)[name][li])
                finite = np.isfinite(rows) if rows.dtype != np.uint16 else (rows & 0x7F80) != 0x7F80  # bf16 bits
                if not finite.all():
                    bad.append(chunk["file"])
                    break
        return bad

    def check_matches(self, model: str, layer: int) -> None:
        """Raise a clear error unless the cache holds `layer` of `model`."""
        if self.manifest["model"] != model or layer not in self.layers:
            raise ValueError(
                f"activation cache {self.path} holds layers {self.layers} of model {self.manifest['model']!r}, "
                f"not layer {layer} of {model!r}"
            )

    def _chunk(self, i: int) -> dict[str, np.memmap]:
        if self._maps[i] is None:
            self._maps[i] = _memmap_tensors(self.path / self.chunks[i]["file"])
        return self._maps[i]

    def tokens(self, chunk: int) -> Tensor:
        """Token ids of chunk `chunk`: [n_blocks, context_len] int64; activation row r is token r."""
        return torch.from_numpy(np.array(self._chunk(chunk)["tokens"])).long()

    def _gather(self, name: str, layer_index: int, chunk_of: np.ndarray, rows: np.ndarray) -> Tensor:
        """Rows `rows` (chunk-local, grouped by chunk as `chunk_of` says) of tensor `name` -> [len(rows), d].

        Each chunk's rows are copied straight into one preallocated array: no per-chunk pieces to
        concatenate (torch.cat of dozens of small pieces stalls its threads when the other cores are busy).
        """
        starts = np.flatnonzero(np.r_[True, chunk_of[1:] != chunk_of[:-1]])
        first = self._chunk(int(chunk_of[0]))[name]
        out = np.empty((len(rows), first.shape[-1]), dtype=first.dtype)
        for start, end in zip(starts, np.r_[starts[1:], len(rows)]):
            np.take(self._chunk(int(chunk_of[start]))[name][layer_index], rows[start:end], axis=0, out=out[start:end])
        t = torch.from_numpy(out)
        return t.view(torch.bfloat16) if self.dtype == torch.bfloat16 else t

    def batches(self, layer: int, batch_size: int, seed: int = 0, epoch: int = 0, start: int = 0,
                shuffle: bool = True) -> Iterator[tuple[Tensor, Tensor]]:
        """(x, y) batches, each [batch_size, d], over every token of `layer` once (the last may be short).

        Shuffled globally across chunks by (seed, epoch); `start` skips that many batches without
        reading them (to resume).
        """
        li = self.layers.index(layer)
        sizes = np.array([c["n_tokens"] for c in self.chunks])
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        order = np.random.default_rng([seed, epoch]).permutation(self.n_tokens) if shuffle else np.arange(self.n_tokens)
        for b in range(start * batch_size, self.n_tokens, batch_size):
            idx = np.sort(order[b : b + batch_size])
            chunk_of = np.searchsorted(offsets, idx, side="right") - 1  # sorted, so grouped by chunk
            rows = idx - offsets[chunk_of]
            yield self._gather("x", li, chunk_of, rows), self._gather("y", li, chunk_of, rows)

    def n_batches(self, batch_size: int) -> int:
        return math.ceil(self.n_tokens / batch_size)


def stream_activations(
    model, tokenizer, site: MLPSite, data: DataConfig, split: str = "train", batch_size: int = 4096,
    buffer_tokens: int = 262_144, forward_batch: int = 32, seed: int = 0, progress: bool = True,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[tuple[Tensor, Tensor]]:
    """(x, y) batches [batch_size, d] computed on the fly through a shuffling buffer, one pass over the split.

    The buffer holds `buffer_tokens` rows; whenever it is full it is shuffled and its first half is
    served, so consecutive batches mix tokens from many documents. `shard=(r, n)` reads only blocks
    r, r + n, r + 2n, ... (rank r of n). The same arguments give the same batches.
    """
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    blocks = islice(token_blocks(iter_documents(data, split), tokenizer, data.context_len), shard[0], None, shard[1])
    xs: list[Tensor] = []  # pieces of the buffer, [n, d_in] and [n, d_out]
    ys: list[Tensor] = []
    bar = tqdm(unit="tok", unit_scale=True, desc="activations", disable=not progress)

    def shuffled() -> tuple[Tensor, Tensor]:
        perm = torch.randperm(sum(len(x) for x in xs), generator=gen)
        return torch.cat(xs)[perm], torch.cat(ys)[perm]

    def serve(x: Tensor, y: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        for b in range(0, len(x) - len(x) % batch_size, batch_size):
            yield x[b : b + batch_size], y[b : b + batch_size]

    while batch := list(islice(blocks, forward_batch)):
        x, y = mlp_activations(model, torch.stack(batch).to(device), [site])[site.layer]
        xs.append(x.reshape(-1, x.shape[-1]).cpu())
        ys.append(y.reshape(-1, y.shape[-1]).cpu())
        bar.update(len(xs[-1]))
        if sum(len(x) for x in xs) >= buffer_tokens:
            x, y = shuffled()
            half = (len(x) // 2) // batch_size * batch_size
            yield from serve(x[:half], y[:half])
            xs, ys = [x[half:]], [y[half:]]
    if xs:
        yield from serve(*shuffled())
    bar.close()
