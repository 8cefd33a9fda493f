"""Launching: the ``alit`` command line and Slurm jobs through submitit (the top layer)."""
