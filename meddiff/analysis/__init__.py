"""Stage 6, analysis: jobs built on the stages below — anomaly detection by partial denoising
(``detect_anomalies``) and ablation sweeps over training settings (``run_sweep``)."""

from meddiff._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "AnomalyConfig": "anomaly", "detect_anomalies": "anomaly",
    "SweepConfig": "sweep", "run_sweep": "sweep", "parse_grid": "sweep",
})
