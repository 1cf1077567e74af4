"""Kill -9 and resume: a run killed at a random moment and resumed from its last checkpoint ends
bitwise where an uninterrupted run ends, with async roots in flight at every checkpoint.

The killed run and its resumption are separate interpreters executing the script below; the
uninterrupted run executes the same script in the test's own process (one torch import less).
Checkpoints are atomic (written to a temporary file, then ``os.replace``), so a kill in the
middle of a save leaves the previous checkpoint intact. Every process must also exit on its own
with roots in flight (timeouts).
"""

from __future__ import annotations

import os
import random
import runpy
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOTAL_STEPS = 60
EVERY = 4

SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import torch
    from torch import nn
    from torch_shampoo import Shampoo

    torch.set_num_threads(1)
    mode, folder, total, every = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    last = os.path.join(folder, "last.pt")

    def batch(t):  # the data of step t, whatever the process
        gen = torch.Generator().manual_seed(10_000 + t)
        return torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 20), nn.Tanh(), nn.Linear(20, 3))
    # Roots every 4 steps, installed 3 steps later (the first, of step 4, at once): at a
    # checkpoint step 4k + 1 > 5 the roots of step 4k are still being computed.
    opt = Shampoo(
        model.parameters(), lr=0.02, block_size=8, momentum=0.5, precondition_frequency=4,
        root_staleness=3, async_roots=True, root_workers=1,
    )
    done = 0
    if mode == "resume":
        sys.stdin.readline()  # started early to overlap its imports: wait for the go
        checkpoint = torch.load(last, weights_only=True)
        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["opt"])
        done = int(checkpoint["step"])
        print("resumed", done, flush=True)
    for t in range(done + 1, total + 1):
        x, y = batch(t)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if t % every == 1 and t > 5:  # the first roots (step 4) are installed at once
            state = opt.state_dict()
            if not any(int(s["pending_due"]) >= 0 for s in state["state"].values()):
                sys.exit(f"no roots in flight at checkpoint step {t}")
            torch.save({"model": model.state_dict(), "opt": state, "step": t}, last + ".tmp")
            os.replace(last + ".tmp", last)
        print("step", t, flush=True)
        if mode == "victim":
            time.sleep(0.005)  # leave the parent time to aim
    torch.save([p.detach() for p in model.parameters()], os.path.join(folder, "final.pt"))
    print("finished", flush=True)
    """
)


def _launch(script: Path, mode: str, folder: Path) -> subprocess.Popen[str]:
    folder.mkdir(exist_ok=True)
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.Popen(
        [sys.executable, str(script), mode, str(folder), str(TOTAL_STEPS), str(EVERY)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _finish(process: subprocess.Popen[str], go: bool = False, timeout: float = 120) -> str:
    out, err = process.communicate("go\n" if go else None, timeout=timeout)
    assert process.returncode == 0, err
    assert "finished" in out
    return out


def _run_in_process(script: Path, folder: Path) -> None:
    """The uninterrupted run: the same script, here (argv and thread count restored)."""
    folder.mkdir()
    argv, threads = sys.argv, torch.get_num_threads()
    sys.argv = [str(script), "plain", str(folder), str(TOTAL_STEPS), str(EVERY)]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="SIGKILL is POSIX-only")
def test_sigkill_at_a_random_step_then_resume_matches_the_uninterrupted_run(
    tmp_path: Path,
) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    aim = random.randrange(3 * EVERY, TOTAL_STEPS - 20)  # after the first checkpoint (step 9)
    victim = _launch(script, "victim", tmp_path / "victim")
    resumed = _launch(script, "resume", tmp_path / "victim")  # imports, then waits for stdin
    assert victim.stdout is not None
    deadline = time.monotonic() + 120
    seen = 0
    for line in victim.stdout:
        if line.startswith("step"):
            seen = int(line.split()[1])
        if seen >= aim or time.monotonic() > deadline:
            break
    os.kill(victim.pid, signal.SIGKILL)
    _, err = victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL, f"not killed (aimed at step {aim}): {err}"
    assert not (tmp_path / "victim" / "final.pt").exists()
    assert (tmp_path / "victim" / "last.pt").exists()

    out = _finish(resumed, go=True)
    resumed_from = int(next(ln for ln in out.splitlines() if ln.startswith("resumed")).split()[1])
    assert resumed_from % EVERY == 1 and EVERY < resumed_from < TOTAL_STEPS
    _run_in_process(script, tmp_path / "plain")

    expected = torch.load(tmp_path / "plain" / "final.pt", weights_only=True)
    final = torch.load(tmp_path / "victim" / "final.pt", weights_only=True)
    assert len(final) == len(expected)
    for i, (a, b) in enumerate(zip(final, expected)):
        assert torch.equal(a, b), (
            f"parameter {i} differs by {(a - b).abs().max()} "
            f"(killed after step {seen}, resumed from step {resumed_from})"
        )
