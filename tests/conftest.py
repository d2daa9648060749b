import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("CI", "1")  # no progress bars in tests

# tests/unit, tests/cli and tests/e2e share helper modules (tests/fault_run.py, fixtures_layouts.py, ...)
# and some test modules import another's helpers: every test folder is importable by module name
_TESTS = Path(__file__).resolve().parent
for _folder in (_TESTS, _TESTS / "unit", _TESTS / "cli", _TESTS / "e2e"):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def run_sinet(*args, capsys=None) -> tuple[int, str, str]:
    """Run the CLI in-process the way the console script does; returns (exit code, stdout, stderr)."""
    from sinet_cli.app import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return code, out, err


@pytest.fixture
def sinet(capsys):
    return lambda *args: run_sinet(*args, capsys=capsys)


@pytest.fixture
def one_torch_thread():
    """Tiny torch ops: extra threads only contend with other processes on a shared CPU (10x slower)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
