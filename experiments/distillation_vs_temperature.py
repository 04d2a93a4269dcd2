"""Does defensive distillation add anything beyond the temperature?

Usage::

    python experiments/distillation_vs_temperature.py --quick    # one seed
    python experiments/distillation_vs_temperature.py            # three seeds

What it measures, how, and where the results go: ``scratchnet/study/distillation.py``
(``--help`` lists the options). This script only runs it, with the command
line's exit codes (``scratchnet/cli``).
"""
from scratchnet.cli import run_script
from scratchnet.study import distillation

if __name__ == "__main__":
    run_script(distillation.main)
