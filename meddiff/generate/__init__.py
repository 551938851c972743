"""Stage 4, generate: class-balanced synthetic cohorts (shards + Parquet manifest + card) from a
trained model, resumable shard by shard; ``regenerate`` recomputes one image exactly. The cohort
format itself (manifest, open, verify) is ``meddiff.data.cohorts``."""

from meddiff._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "CohortSpec": "spec", "CohortResult": "spec", "generate": "cohort", "regenerate": "cohort",
    "plan_cohort": "cohort", "generate_shard": "cohort", "finish_cohort": "cohort",
})
