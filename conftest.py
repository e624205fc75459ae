"""Every Python and shell block of README.md and docs/*.md runs as a test (Sybil).

The blocks of one document run in order, in one workspace folder shared by the whole session, which
stands in for what they expect to exist: `runs/demo/{mxd,transcoder}-k32-seed0` trained by `mxd demo`
on the embedded SmolLM2 at layer 15 exactly as `make demo` does, but on 4,096 tokens; a sparsify and
a SAELens copy of the transcoder under `checkpoints/` and `saes/`; `my_data.csv` for probing.
Python blocks share a namespace per document; a shell block runs with `bash -e` and `mxd` on PATH.

Markers in the Markdown, as HTML comments before a block:
    <!-- skip: next if(not SLOW, "slow: ...") -->   runs only in `make test-all` (pytest without -m "not slow")
    <!-- skip: next "illustration: ..." -->         never runs, with the reason shown in the test report
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sybil import Sybil
from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser, SkipParser

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no Hub here: fail fast instead of retrying
WORKSPACE_TOKENS = 4096
RUN_SLOW = {"value": True}


def pytest_configure(config):
    RUN_SLOW["value"] = "not slow" not in (config.getoption("markexpr", "") or "")


@pytest.fixture(scope="session")
def doc_workspace(tmp_path_factory) -> Path:
    """The folder the documentation's blocks run in (see the module docstring)."""
    from mxd.demo import DemoConfig, run_demo
    from mxd.exchange import write_saelens, write_sparsify
    from mxd.runs import read_run

    root = tmp_path_factory.mktemp("docs")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        run_demo(DemoConfig(train_tokens=WORKSPACE_TOKENS, val_tokens=WORKSPACE_TOKENS // 2))
        transcoder = read_run("runs/demo/transcoder-k32-seed0")
        write_sparsify(transcoder.layer, "checkpoints/sparsify-run/layers.15.mlp")
        write_saelens(transcoder.layer, "saes/l15-topk")
        lines = ["body,topic"] + [f'"{t}",{c}' for c in ("sport", "weather") for t in
                                  (f"The {c} report number {i} says what {c} people expect" for i in range(12))]
        Path("my_data.csv").write_text("\n".join(lines) + "\n")
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def doc_cwd(doc_workspace):
    """Each block runs inside the workspace."""
    cwd = os.getcwd()
    os.chdir(doc_workspace)
    yield doc_workspace
    os.chdir(cwd)


def run_shell_block(example) -> None:
    """A shell block under `bash -e` in the workspace, with this Python's scripts (mxd) first on PATH."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    benchmarks = Path(__file__).parent / "benchmarks"
    if not Path("benchmarks").exists():
        os.symlink(benchmarks, "benchmarks")
    done = subprocess.run(["bash", "-e", "-c", example.parsed], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise AssertionError(f"shell block exited with {done.returncode}:\n{tail}")


def _namespace(namespace: dict) -> None:
    namespace["SLOW"] = RUN_SLOW["value"]


pytest_collect_file = Sybil(
    parsers=[PythonCodeBlockParser(), CodeBlockParser("bash", run_shell_block), SkipParser()],
    patterns=["README.md", "docs/*.md"],
    fixtures=["doc_cwd"],
    setup=_namespace,
).pytest()

