"""Robust accuracy against the training temperature T: every attack, and the worst case per image.

Usage::

    python experiments/robustness_vs_T.py --quick        # under 10 minutes on 2 CPU cores
    python experiments/robustness_vs_T.py                # the full study

What it measures, how, and where the results go: ``scratchnet/study/robustness.py``
(``--help`` lists the options). This script only runs it, with the command
line's exit codes (``scratchnet/cli``).
"""
from scratchnet.cli import run_script
from scratchnet.study import robustness

if __name__ == "__main__":
    run_script(robustness.main)
