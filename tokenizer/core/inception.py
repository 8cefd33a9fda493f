"""TEMPORARY alias: the FID Inception moved to :mod:`sampling.inception` (only evaluation uses it).

It keeps ``slurm/commands/weights.py``'s old lazy import working until that file imports
``sampling.inception`` itself; then delete this module (stage one must not import ``sampling``).
"""

from sampling.inception import *  # noqa: F403
from sampling.inception import fid_feature_extractor  # noqa: F401
