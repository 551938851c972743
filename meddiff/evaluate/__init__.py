"""Stage 5, evaluate: fidelity, diversity, privacy and utility of a cohort against real data,
each metric beside its real-vs-real baseline; report.json + report.html."""

from meddiff._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "EvalConfig": "report", "EvalResult": "report", "evaluate_cohort": "report",
    "headline_rows": "summary", "per_class_table": "summary",
})
