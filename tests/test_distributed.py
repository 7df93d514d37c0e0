"""Two CPU processes under torchrun (gloo) render the same image as one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
from PIL import Image

# fp32: the claim is about summing over ranks; bf16 (auto on CPUs that have it) would add its own
# rounding of features, amplified by 5 L-BFGS steps.
ARGS = ["--weights", "random", "--size", "64", "--iterations", "5", "--tile", "32", "--device", "cpu",
        "--precision", "fp32", "--quiet"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_give_the_one_process_image(tmp_path, content_path, style_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    single, double = tmp_path / "one.png", tmp_path / "two.png"
    one = subprocess.run([sys.executable, "-m", "fastnst", "stylize", str(content_path), str(style_path),
                          "-o", str(single), *ARGS], capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                          f"--master-port={_free_port()}", "-m", "fastnst", "stylize", str(content_path),
                          str(style_path), "-o", str(double), *ARGS],
                         capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr
    a = np.asarray(Image.open(single), dtype=np.int16)
    b = np.asarray(Image.open(double), dtype=np.int16)
    # Sums over ranks run in another order than over tiles: allow one 8-bit level of rounding.
    assert a.shape == b.shape == (48, 64, 3) and np.abs(a - b).max() <= 1
    assert sorted(os.listdir(tmp_path)) == ["one.png", "two.png"]  # rank 1 wrote nothing
