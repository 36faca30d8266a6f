"""Sample the server with py-spy and list the functions where its time goes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from loadtests.scenarios import BenchmarkError

SAMPLES_PER_SECOND = 250


def start_py_spy(pid: int, seconds: int, output: Path) -> subprocess.Popen:
    """Start py-spy recording, for `seconds`, the stack of whichever thread of pid holds the GIL.

    Sampling only the GIL holder leaves out threads that wait, such as aiosqlite's idle workers,
    which py-spy would otherwise count as busy. py-spy pauses the process for each sample, so a
    scenario measured while it runs is slower.
    """
    py_spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy")
    if py_spy is None:
        raise BenchmarkError(f"--profile needs py-spy: {sys.executable} -m pip install py-spy")
    command = [
        py_spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", str(SAMPLES_PER_SECOND),
        "--gil", "--format", "raw", "--output", str(output),
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish_py_spy(sampler: subprocess.Popen, output: Path, timeout: float) -> None:
    """Wait for py-spy to write its file; raise BenchmarkError if it failed."""
    try:
        sampler_output, _ = sampler.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        sampler.kill()
        sampler_output, _ = sampler.communicate()
    if sampler.returncode != 0 or not output.exists():
        raise BenchmarkError(f"py-spy failed with {sampler.returncode}: {sampler_output.strip()[-2000:]}")


def summarize_profile(path: Path, top: int) -> str:
    """Return the functions with the most inclusive and the most own samples in a collapsed-stack file."""
    inclusive: Counter = Counter()
    own: Counter = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if total == 0:
        return f"\nprofile {path}: no samples"

    # SQLAlchemy runs its synchronous ORM code in greenlets, whose stacks py-spy reports as
    # separate roots, so a function's inclusive share can miss the request that called it.
    lines = [f"\nprofile {path} ({total} samples with the GIL held)", "  inclusive  function"]
    lines += [f"  {count / total:8.1%}  {frame}" for frame, count in inclusive.most_common(top)]
    lines += ["  own        function"]
    lines += [f"  {count / total:8.1%}  {frame}" for frame, count in own.most_common(top)]
    return "\n".join(lines)
