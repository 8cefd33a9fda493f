"""Moved to :mod:`tokenizer.lpips` (beside ``tokenizer/losses.py``); this alias keeps the old import path working."""

from tokenizer.lpips import *  # noqa: F403
from tokenizer.lpips import LPIPS, REFERENCE_DISTANCES, load_image, reference_distances  # noqa: F401
