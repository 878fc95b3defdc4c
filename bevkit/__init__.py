"""bevkit: shared logic of the FB-OCC / BEVDepth reproduction kit.

One module per concern (see README "Architecture"). Importing the package root is cheap
and never imports torch, so setup.sh can use it before the environment exists.
"""
from pathlib import Path

__version__ = "0.1.0"

#: Repository root (the folder holding setup.sh, fbocc/, bevdepth/).
REPO_ROOT = Path(__file__).resolve().parent.parent
