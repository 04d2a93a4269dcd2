"""How the input gradient vanishes as the training temperature T grows.

Usage::

    python experiments/grad_vs_T.py --quick          # a few minutes on 2 CPU cores
    python experiments/grad_vs_T.py                  # the full study (see the README for its time)

What it measures, how, and where the results go: ``scratchnet/study/grad_vs_T.py``
(``--help`` lists the options). This script only runs it, with the command
line's exit codes (``scratchnet/cli``).
"""
from scratchnet.cli import run_script
from scratchnet.study import grad_vs_T

if __name__ == "__main__":
    run_script(grad_vs_T.main)
