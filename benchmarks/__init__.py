"""torch_shampoo's benchmark suite: six entry points on one harness (benchmarks/harness.py,
its reports and command line in benchmarks/report.py).

Run each from the repository root; ``--quick`` is a smoke run, every entry point prints markdown
tables and writes JSON to outputs/benchmarks/NAME.json (``--out``):

    python -m benchmarks.step_time     # step() vs Adam, floor, published SOAPs; threads; compile
    python -m benchmarks.train_step    # whole training steps of the demos' models
    python -m benchmarks.convergence   # steps to Adam's loss on the three demos; NG+ grid
    python -m benchmarks.roots         # inverse-root solves; async root staleness/window
    python -m benchmarks.memory        # optimizer state bytes vs Adam; peak of the first steps
    python -m benchmarks.distributed   # roots and state per rank under DDP (gloo)

``--compare PATH_OR_REV`` (step_time, train_step, memory) interleaves another checkout's
torch_shampoo with this one. No thresholds live here: the targets sit beside the figures in docs/.
"""
