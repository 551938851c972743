"""meddiff: medical image datasets to trustworthy synthetic cohorts."""

__version__ = "0.1.0"
