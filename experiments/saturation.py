"""The saturation, in one picture: one test digit seen by networks trained at T = 1, 20, 100.

Usage::

    python experiments/saturation.py --quick     # the models of grad_vs_T.py --quick
    python experiments/saturation.py             # the full study's models

What it measures, how, and where the results go: ``scratchnet/study/saturation.py``
(``--help`` lists the options). This script only runs it, with the command
line's exit codes (``scratchnet/cli``).
"""
from scratchnet.cli import run_script
from scratchnet.study import saturation

if __name__ == "__main__":
    run_script(saturation.main)
