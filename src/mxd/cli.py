"""`mxd` command line: every field of a command's config dataclasses is an option.

    mxd harvest --layers 15 --max-tokens 2000000 --out cache/L15
    torchrun --nproc_per_node=2 -m mxd harvest ...      (each rank harvests a disjoint shard)

Options come from the dataclass fields (`--context-len` for `context_len`, nested dataclasses such
as DataConfig flattened), their help from the "name: text" entries of the class docstring;
`--config FILE.json|yaml` supplies defaults that explicit options override.

Every expected failure (bad option or config value, unreadable or damaged file, a full or read-only
disk) exits with status 2 and one line, `mxd CMD: error: ...`, naming the file or value and what
would be valid; a training run that diverges exits with status 1. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import re
import sys
import types
import typing

import yaml

from mxd.activations import HarvestConfig, harvest
from mxd.evaluate import EvalCommand, evaluate_paths, markdown_table as eval_table
from mxd.report import ReportConfig, write_report
from mxd.sweep import SweepConfig, run_sweep
from mxd.dashboard import InspectConfig, write_dashboard
from mxd.demo import DemoConfig, format_table, run_demo
from mxd.probe import ProbeConfig, markdown_table, run_probe
from mxd.steer import SteerConfig, compare, format_comparison
from mxd.files import read_json, read_text
from mxd.layers import load
from mxd.share import ExportConfig, PushConfig, export, push, write_model_card
from mxd.train import TrainConfig, TrainingDiverged, train_runs


def _field_docs(cls) -> dict[str, str]:
    """{field: help} from "a, b: text; c: text" entries of a dataclass's docstring (after its first line)."""
    body = " ".join((cls.__doc__ or "").split("\n\n", 1)[-1].split())
    docs = {}
    for entry in body.split("; "):
        names, sep, text = entry.partition(": ")
        if sep and re.fullmatch(r"[a-z_0-9, ]+", names.strip()):
            for name in names.split(","):
                docs[name.strip()] = text.strip().rstrip(".")
    return docs


def _parse_optional(inner):
    return lambda s: None if s.lower() in ("none", "null") else inner(s)


POSITIONAL = ("run", "runs", "inputs", "repo_id")  # fields given as positional arguments: mxd eval RUN...


def _add_fields(parser: argparse.ArgumentParser, cls, group_title: str | None = None) -> None:
    """Add one option per field of dataclass `cls` (recursing into nested dataclasses); the fields
    named in POSITIONAL become positional arguments."""
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    group = parser.add_argument_group(group_title or cls.__name__)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            _add_fields(parser, kind)
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        required = default is dataclasses.MISSING
        kwargs = dict(default=None if required else default,
                      help=f"{docs.get(f.name, '')} ({'required' if required else f'default: {default}'})".strip())
        args = typing.get_args(kind)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), kind) if isinstance(kind, types.UnionType) else kind
        is_list = typing.get_origin(base) is list
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif is_list:
            kwargs.update(nargs="+", type=typing.get_args(base)[0])
        else:
            kwargs["type"] = _parse_optional(base) if optional else base
        if f.name in POSITIONAL:  # may also come from --config, so argparse does not insist
            group.add_argument(f.name, metavar=f.name.upper(), **kwargs | {"nargs": "*" if is_list else "?"})
        else:
            group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)


def _build(cls, values: dict):
    """An instance of `cls` from flat option values (nested dataclasses filled from the same values)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], values)
        elif values[f.name] in (None, []) and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"{f.name} is required ({_field_docs(cls).get(f.name, 'see --help')})")
        else:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def _flatten(data: dict) -> dict:
    flat = {}
    for key, value in data.items():
        flat.update(_flatten(value) if isinstance(value, dict) else {key: value})
    return flat


def _read_config_file(path: str) -> dict:
    """The flattened option values of a JSON or YAML file; ValueError naming file and line when it does not parse."""
    if not path.endswith((".yaml", ".yml")):
        data = read_json(path)
    else:
        try:
            data = yaml.safe_load(read_text(path))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
            raise ValueError(f"{path}: invalid YAML{where} ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a JSON/YAML mapping of option names to values")
    return _flatten(data)


def _field_types(cls) -> dict:
    """{field name: type hint} of a config dataclass, nested dataclasses flattened."""
    types_ = {}
    for name, kind in typing.get_type_hints(cls).items():
        types_ |= _field_types(kind) if dataclasses.is_dataclass(kind) else {name: kind}
    return types_


def _typed(value, kind):
    """`value` as type hint `kind` (int, float, str, bool, list[...], X | None), a string converted
    as on the command line; TypeError when it cannot be."""
    if isinstance(kind, types.UnionType):
        if value is None and type(None) in typing.get_args(kind):
            return None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if typing.get_origin(kind) is list:
        if not isinstance(value, list):
            raise TypeError
        return [_typed(v, typing.get_args(kind)[0]) for v in value]
    if isinstance(value, str) and kind in (int, float):
        return kind(value)  # ValueError when it is not a number
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, (float, int) if kind is float else kind):
        raise TypeError
    return value


def _check_config_values(path: str, values: dict, cls) -> dict:
    """The config file's values typed as the fields they set; ValueError naming the first bad one."""
    kinds = _field_types(cls)
    typed = {}
    for name, value in values.items():
        if name not in kinds:  # --config itself
            typed[name] = value
            continue
        try:
            typed[name] = _typed(value, kinds[name])
        except (TypeError, ValueError):
            kind = kinds[name]
            expected = kind.__name__ if isinstance(kind, type) and not typing.get_origin(kind) else str(kind)
            raise ValueError(f"{path}: {name}={value!r} is invalid: expected {expected}") from None
    return typed


def describe_error(e: BaseException) -> str:
    """One line for an expected failure: an OSError as "FILE: reason" (with what to do when the disk
    is full or read-only), anything else as its message."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        fix = {errno.ENOSPC: "free some space and run the command again (it resumes where it stopped; mxd train with --resume)",
               errno.EROFS: "choose a writable folder", errno.EACCES: "choose a folder you can write to",
               errno.ENOTDIR: "a folder in this path is a file"}.get(e.errno)
        text = f"{e.filename}: {e.strerror}" + (f"; {fix}" if fix else "")
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line, without the usage block argparse prints first."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        """Unknown arguments reported by the command's own parser (`mxd train: error: ...`)."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            command = getattr(parsed, "command", None)
            subparsers = next((a for a in self._actions if isinstance(a, argparse._SubParsersAction)), None)
            owner = subparsers.choices[command] if command and subparsers else self
            owner.error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed


def _init_distributed():
    """Join the torchrun process group when launched with WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _cmd_harvest(cfg: HarvestConfig) -> None:
    if cfg.device == "cuda" and "LOCAL_RANK" in os.environ:
        cfg.device = f"cuda:{os.environ['LOCAL_RANK']}"
    cache = harvest(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{cache.n_tokens:,} tokens of layers {cache.layers} in {cache.path} ({len(cache.chunks)} chunks)")


def _cmd_train(cfg: TrainConfig) -> None:
    try:
        runs = train_runs(cfg)
    except KeyboardInterrupt:
        print(f"mxd train: interrupted; checkpoint saved, continue with --resume --out {cfg.out}", file=sys.stderr)
        sys.exit(130)
    if int(os.environ.get("RANK", "0")) == 0 or cfg.placement == "spread":
        for run in runs:
            layer = load(run / "final")
            write_model_card(run)
            print(f"trained {type(layer).__name__} ({layer.param_count():,} parameters, {layer.n_latents:,} latents, "
                  f"k={layer.config.k}) in {run}/final; metrics in {run}/metrics.jsonl")


def _cmd_eval(cfg: EvalCommand) -> None:
    records = evaluate_paths(cfg.runs, cfg.eval, cfg.out, site=cfg.site)
    where = f"{cfg.out}/eval.json and {cfg.out}/eval.md" if cfg.out else "each run's eval.json"
    print(f"\n{records[0]['eval_tokens']:,} held-out tokens of {records[0]['model']}:\n{eval_table(records)}\nresults in {where}")


def _cmd_export(cfg: ExportConfig) -> None:
    print(f"{cfg.format} files in {export(cfg)}")


def _cmd_push(cfg: PushConfig) -> None:
    print(f"pushed {cfg.run} to https://huggingface.co/{cfg.repo_id} ({push(cfg.run, cfg.repo_id, cfg.private)}); "
          f"load it with mxd.load('hf:{cfg.repo_id}')")


def _cmd_sweep(cfg: SweepConfig) -> None:
    records = run_sweep(cfg)
    print(f"\n{eval_table(records)}\nfrontier in {cfg.train.out}/frontier.json; draw it with mxd report {cfg.train.out}")


def _cmd_report(cfg: ReportConfig) -> None:
    print(f"report in {write_report(cfg)}")


def _cmd_demo(cfg: DemoConfig) -> None:
    records, report = run_demo(cfg)
    print(f"\nlayer {cfg.layer} of {cfg.model}, {cfg.train_tokens:,} training tokens, evaluated on "
          f"{records[0]['eval_tokens']:,} held-out tokens (delta_ce, ce_recov in nats / share):\n{format_table(records)}\n"
          f"report: {report}; frontier figure: {report.parent / 'frontier.png'}")


def _cmd_inspect(cfg: InspectConfig) -> None:
    s = write_dashboard(cfg)
    print(f"{s['cards']:,} expert cards ({s['fired']:,} of {s['n_experts']:,} experts fired on {s['n_tokens']:,} tokens) "
          f"in {s['out']} ({s['bytes'] / 1e6:.1f} MB, {s['seconds']:.0f} s)")


def _cmd_probe(cfg: ProbeConfig) -> None:
    summary = run_probe(cfg)
    print(f"\nmean test accuracy over classes (balanced one-vs-rest):\n{markdown_table(summary)}"
          f"records in {cfg.out}/probe.json, table in {cfg.out}/probe.md")


def _cmd_steer(cfg: SteerConfig) -> None:
    print(format_comparison(compare(cfg), cfg.width))


COMMANDS = {
    "harvest": (HarvestConfig, _cmd_harvest, "harvest (x, y) MLP activations into an on-disk cache"),
    "train": (TrainConfig, _cmd_train, "train MxDs or transcoders on a harvested cache or streamed activations"),
    "eval": (EvalCommand, _cmd_eval, "faithfulness of trained runs on held-out text: nmse, fvu, l0, dead, CE, KL"),
    "sweep": (SweepConfig, _cmd_sweep, "train and evaluate a parameter-matched grid (methods x K x seeds)"),
    "report": (ReportConfig, _cmd_report, "figures (frontier, training curves, firing) and a Markdown report"),
    "demo": (DemoConfig, _cmd_demo, "harvest the embedded model, train an MxD and a matched transcoder, compare"),
    "export": (ExportConfig, _cmd_export, "write a run's layer for sparsify or SAELens, or as weights with a standalone reader"),
    "push": (PushConfig, _cmd_push, "upload a run with its model card to the Hugging Face Hub"),
    "inspect": (InspectConfig, _cmd_inspect, "write a static HTML dashboard of a run's experts"),
    "probe": (ProbeConfig, _cmd_probe, "sparse probing of runs on labelled text tasks"),
    "steer": (SteerConfig, _cmd_steer, "generate with an expert's coefficient pushed, next to the unsteered text"),
}


def main(argv: list[str] | None = None) -> None:
    parser = _Parser(prog="mxd", description="Mixture of Decoders and sparse transcoders")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", help="JSON or YAML file of option values (explicit options win)")
        _add_fields(p, cls, f"{name} options")
    args = parser.parse_args(argv)
    cls, run, _ = COMMANDS[args.command]
    sub_parser = sub.choices[args.command]
    try:
        if args.config:
            known = {a.dest for a in sub_parser._actions}
            values = _read_config_file(args.config)
            unknown = sorted(set(values) - known)
            if unknown:
                raise ValueError(f"--config {args.config}: unknown options {unknown}")
            sub_parser.set_defaults(**_check_config_values(args.config, values, cls))
            args = parser.parse_args(argv)
        _init_distributed()
        import transformers

        transformers.utils.logging.disable_progress_bar()  # mxd shows its own progress
        run(_build(cls, vars(args)))
    except (ValueError, OSError, TrainingDiverged) as e:  # bad input, damaged files, full or read-only disks
        print(f"mxd {args.command}: error: {describe_error(e)}", file=sys.stderr)
        sys.exit(1 if isinstance(e, TrainingDiverged) else 2)


if __name__ == "__main__":
    main()
