"""ProGiDiff core library: prompts, text encoding, model, sampling, proposals, metrics (no MONAI Label here)."""

__version__ = "0.1.0"
