"""Shared test setup: Triton's interpreter on machines without CUDA, tiny checkpoints.

TRITON_INTERPRET must be set before triton is first imported, so it is set here,
at collection, when there is no GPU (CI and developer machines). On a CUDA machine the
kernels compile for real and the CUDA-only tests run.
"""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REAL_RELEASE = Path(__file__).resolve().parents[2] / "shared" / "molmoe-1b-0924"


@pytest.fixture(scope="session")
def real_release_dir() -> Path:
    """The release's config/tokenizer files beside the checkout, or a clean skip."""
    if not (REAL_RELEASE / "tokenizer.json").exists():
        pytest.skip(f"release files not found at {REAL_RELEASE}")
    return REAL_RELEASE


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory) -> Path:
    """A tiny random MolmoE release folder (pytorch_model.bin via torch.save), made once per session."""
    from molmoe_lite.testing import write_tiny_release

    return write_tiny_release(tmp_path_factory.mktemp("tiny-release"), seed=0, fmt="bin")


@pytest.fixture(scope="session")
def tiny_model(tiny_release):
    """The tiny release loaded in float32 on the CPU (shared: tests must not modify it)."""
    from molmoe_lite import load

    return load(tiny_release, device="cpu", dtype="float32")


# ---- the HTTP server (molmoe-lite serve) --------------------------------------------------
SERVE_MODEL = "tiny"
SERVE_CONTEXT = 768


@pytest.fixture(scope="session")
def serve_server(tiny_release, tmp_path_factory):
    """``molmoe-lite serve`` on the tiny release, a real process on a loopback port (shared)."""
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    from molmoe_lite.testing.server_process import ServerProcess

    server = ServerProcess.start(
        tiny_release, "--model-name", SERVE_MODEL, "--max-batch", "4", "--max-context", str(SERVE_CONTEXT),
        "--max-body-mb", "1", log_dir=tmp_path_factory.mktemp("serve-logs"),
    ).wait_ready()
    yield server
    assert server.stop() == 0, server.log()
