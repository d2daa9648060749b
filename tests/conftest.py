import os

import numpy as np
import pytest

os.environ.setdefault("CI", "1")  # no progress bars in tests


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
