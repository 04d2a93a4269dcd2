"""Attack success rate against the training temperature T, masked and with the fix.

Usage::

    python experiments/attack_vs_T.py --quick        # under 10 minutes on 2 CPU cores
    python experiments/attack_vs_T.py                # the full study

What it measures, how, and where the results go: ``scratchnet/study/attack_vs_T.py``
(``--help`` lists the options). This script only runs it, with the command
line's exit codes (``scratchnet/cli``).
"""
from scratchnet.cli import run_script
from scratchnet.study import attack_vs_T

if __name__ == "__main__":
    run_script(attack_vs_T.main)
