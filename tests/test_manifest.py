"""Stage outputs are written atomically: a run killed outright leaves its temporary sibling, and the next run
into the same output removes it (its process gone), saying so."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from dllm_trt.cli import main
from dllm_trt.manifest import remove_abandoned_siblings


def test_a_run_killed_with_sigkill_leaves_nothing_after_the_next_run(tiny_export, tmp_path, capsys):
    out = tmp_path / "opt"
    command = [sys.executable, "-m", "dllm_trt.cli", "optimize", str(tiny_export), "--target", "ort-cpu"]
    command += ["-o", str(out)]
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    sibling = tmp_path / f".opt.tmp-{run.pid}"
    while not sibling.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sibling.exists(), "optimize never started writing"
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    assert sibling.exists() and not out.exists()  # SIGKILL: nothing could clean up

    # --parity none: this test is about the output directory, not the graphs' numbers
    assert main(["optimize", str(tiny_export), "--target", "ort-cpu", "-o", str(out), "--parity", "none"]) == 0
    err = capsys.readouterr().err
    assert f"removed .opt.tmp-{run.pid}, left by a run that was killed" in err
    assert out.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["opt"]


def test_a_sibling_whose_process_still_runs_is_kept(tmp_path):
    mine = tmp_path / f".out.tmp-{os.getppid()}"  # a live process: the test runner's parent
    mine.mkdir()
    assert remove_abandoned_siblings(tmp_path / "out") == [] and mine.exists()
