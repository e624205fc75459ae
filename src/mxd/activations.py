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

import hashlib
import json
import math
import os
import struct
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from mxd.checks import check_at_least
from mxd.data import SPLITS, DataConfig, iter_documents, token_blocks
from mxd.models import DEFAULT_MODEL, MLPSite, find_mlp, host_mlp, load_model, mlp_activations

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MANIFEST = "manifest.json"
# Fields of the manifest that must agree for a cache to be resumed or reused.
IDENTITY_FIELDS = ("model", "layers", "module_path", "data", "split", "dtype", "model_dtype", "chunk_tokens", "world_size")


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


class CorruptCacheError(ValueError):
    """A chunk of an activation cache is missing, truncated or fails its checksum."""


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


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
    diffs = [f"{k}: cache has {existing.get(k)!r}, requested {wanted[k]!r}" for k in IDENTITY_FIELDS if existing.get(k) != wanted[k]]
    if diffs:
        raise ValueError(f"{where} holds a different harvest ({'; '.join(diffs)}); choose another output folder")


def site_dims(model, site: MLPSite) -> tuple[int, int]:
    """(d_in, d_out) of the MLP at `site`, read from one two-token forward pass."""
    device = next(model.parameters()).device
    x, y = mlp_activations(model, torch.zeros(1, 2, dtype=torch.long, device=device), [site])[site.layer]
    return x.shape[-1], y.shape[-1]


def harvest(cfg: HarvestConfig, model=None, tokenizer=None, progress: bool = True) -> "ActivationCache":
    """Write (x, y) of every layer in `cfg.layers` for up to cfg.max_tokens tokens; resumes if interrupted."""
    rank, world = rank_and_world()
    if model is None:
        model, tokenizer = load_model(cfg.model, dtype=DTYPES[cfg.model_dtype], device=cfg.device)
    sites = [find_mlp(model, layer, cfg.module_path) for layer in cfg.layers]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    ctx = cfg.data.context_len
    d_in, d_out = site_dims(model, sites[0])
    wanted = _manifest_for(cfg, sites, d_in, d_out, world, host_mlp(model, sites[0]))
    if (out / MANIFEST).exists():
        _check_identity(json.loads((out / MANIFEST).read_text()), wanted, out)
    elif rank == 0:
        _write_json_atomic(out / MANIFEST, wanted)
    _barrier()

    shard_path = out / f"shard-{rank:03d}.json"
    shard = json.loads(shard_path.read_text()) if shard_path.exists() else {"rank": rank, "chunks": []}
    _check_chunks(out, shard["chunks"], checksum=False)
    blocks_per_chunk = cfg.chunk_tokens // ctx
    total_blocks = cfg.max_tokens // ctx
    if total_blocks < world:
        raise ValueError(f"max_tokens={cfg.max_tokens} is too small: {world} process(es) need at least {world * ctx} tokens")
    my_blocks = total_blocks // world + (rank < total_blocks % world)
    done_blocks = sum(c["n_tokens"] for c in shard["chunks"]) // ctx

    blocks = islice(token_blocks(iter_documents(cfg.data, cfg.split), tokenizer, ctx), rank, None, world)
    blocks = islice(blocks, done_blocks, my_blocks)  # skip what earlier runs already wrote
    bar = tqdm(total=my_blocks * ctx, initial=done_blocks * ctx, unit="tok", unit_scale=True,
               desc=f"harvest rank {rank}" if world > 1 else "harvest", disable=not progress)
    dtype = DTYPES[cfg.dtype]
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
        tmp = out / (name + ".tmp")
        save_file({"x": xs, "y": ys, "tokens": tokens.to(torch.int32)}, str(tmp))
        os.replace(tmp, out / name)
        shard["chunks"].append(
            {"file": name, "n_tokens": tokens.numel(), "bytes": (out / name).stat().st_size, "sha256": _sha256(out / name)}
        )
        _write_json_atomic(shard_path, shard)
    bar.close()
    if not shard["chunks"]:
        raise ValueError(f"empty corpus: source {cfg.data.source!r} gives no complete block of {ctx} tokens "
                         f"in its {cfg.split} split")
    _barrier()
    cache = ActivationCache(out)  # every shard is finished: the cache is whole
    if rank == 0:
        manifest = json.loads((out / MANIFEST).read_text())
        manifest.update(complete=True, max_tokens=cfg.max_tokens, n_tokens=cache.n_tokens)
        _write_json_atomic(out / MANIFEST, manifest)
        cache.manifest = manifest
    _barrier()
    return cache


def _check_chunks(folder: Path, chunks: list[dict], checksum: bool) -> None:
    """Raise CorruptCacheError naming every chunk that is missing, truncated or (checksum) altered."""
    bad = []
    for chunk in chunks:
        path = folder / chunk["file"]
        if not path.is_file():
            bad.append(f"{chunk['file']} (missing)")
        elif path.stat().st_size != chunk["bytes"]:
            bad.append(f"{chunk['file']} (truncated: {path.stat().st_size} of {chunk['bytes']} bytes)")
        elif checksum and _sha256(path) != chunk["sha256"]:
            bad.append(f"{chunk['file']} (checksum mismatch)")
    if bad:
        raise CorruptCacheError(f"activation cache {folder} has damaged chunks: {', '.join(bad)}")


_ST_DTYPES = {"F32": np.float32, "BF16": np.uint16, "I32": np.int32}  # bf16 is read as raw uint16


def _memmap_tensors(path: Path) -> dict[str, np.memmap]:
    """Memory-map every tensor of a safetensors file (8-byte header length, JSON header, data)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    arrays = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        arrays[name] = np.memmap(path, dtype=_ST_DTYPES[info["dtype"]], mode="r",
                                 offset=8 + header_len + start, shape=tuple(info["shape"]))
    return arrays


class ActivationCache:
    """Reader of a harvested cache: sizes, integrity checks and shuffled (x, y) batches per layer."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path} not found: {self.path} is not an activation cache (run mxd harvest)")
        self.manifest = json.loads(manifest_path.read_text())
        self.chunks = []
        for shard_name in self.manifest["shards"]:
            shard_path = self.path / shard_name
            if shard_path.exists():
                self.chunks += json.loads(shard_path.read_text())["chunks"]
        _check_chunks(self.path, self.chunks, checksum=False)
        if not self.chunks:
            raise ValueError(f"activation cache {self.path} holds no finished chunk yet")
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
        """Check every chunk's SHA-256; raises CorruptCacheError naming the bad ones."""
        _check_chunks(self.path, self.chunks, checksum=True)

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
