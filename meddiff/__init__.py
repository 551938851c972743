"""meddiff: medical image datasets to trustworthy synthetic cohorts."""

__version__ = "0.1.0"

from meddiff.threads import quiet_wait_policy as _quiet_wait_policy

_quiet_wait_policy()  # OpenMP reads its wait policy once, when torch loads it: set it before anyone imports torch
