"""The kernels are the package ``scratchnet.kernels``, never a top-level ``kernels``.

The folder kernels/ sits at the top of the repository (it is half of the
design: the hot loops apart from the layers), but PyPI already has a
distribution called ``kernels``. scratchnet therefore imports and installs the
folder as ``scratchnet.kernels``: setup.cfg maps that package onto kernels/,
and in the source tree scratchnet/kernels is a link to it. A ``kernels``
package of someone else's can then sit on the same path without either one
hiding the other.
"""
import configparser
import os
import subprocess
import sys
import textwrap

import scratchnet
from scratchnet import functional, kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_scratchnet_kernels_is_the_kernels_folder():
    assert kernels.__name__ == "scratchnet.kernels"
    here = os.path.realpath(os.path.dirname(kernels.__file__))
    assert os.path.basename(here) == "kernels"
    assert {"reference.py", "cpu.py", "gpu.py"} <= set(os.listdir(here))
    assert functional.kernels is kernels                 # what the layers call
    from scratchnet.kernels import cpu, reference
    assert cpu.__name__ == "scratchnet.kernels.cpu" and reference.__name__ == "scratchnet.kernels.reference"


def test_installs_scratchnet_kernels_and_no_top_level_kernels():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    packages = cfg["options"]["packages"].split()
    assert "scratchnet.kernels" in packages
    assert not any(p == "kernels" or p.startswith("kernels.") for p in packages)
    package_dir = dict(line.split("=") for line in cfg["options"]["package_dir"].strip().splitlines())
    assert {k.strip(): v.strip() for k, v in package_dir.items()} == {"scratchnet.kernels": "kernels"}
    assert "scratchnet.kernels" in cfg["options.package_data"]      # the CUDA sources travel along


def test_a_foreign_kernels_package_neither_hides_nor_is_hidden(tmp_path):
    """A package named ``kernels`` first on the path: scratchnet still runs a convolution
    with its own kernels, and ``import kernels`` still gives the foreign one."""
    foreign = tmp_path / "kernels"
    foreign.mkdir()
    (foreign / "__init__.py").write_text("MARK = 'not scratchnet'\n")
    script = textwrap.dedent("""
        import numpy as np
        import kernels
        from scratchnet import functional
        y, _ = functional.conv2d_forward(np.ones((1, 4, 5, 5)), np.ones((2, 4, 3, 3)), np.zeros(2))
        import scratchnet.kernels
        assert kernels.MARK == 'not scratchnet'
        assert scratchnet.kernels.__name__ == 'scratchnet.kernels'
        print(float(y.sum()))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.path.dirname(scratchnet.__path__[0])]))
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.split()[-1]) == 2 * 9 * 36.0      # 2 filters x 9 outputs x 36 ones
