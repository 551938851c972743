"""Stage 1, data: sources → versioned WebDataset shards (ingest), the shard and cohort formats, images, and
the datasets downstream teams train on (``ShardDataset``)."""

from meddiff._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "ShardDataset": "consumer", "ShardMapDataset": "consumer", "open_source": "consumer",
    "IngestConfig": "ingest", "IngestResult": "ingest", "ingest": "ingest",
    "Cohort": "cohorts", "open_cohort": "cohorts", "verify": "cohorts",
    "DatasetVersion": "shards", "open_dataset": "shards", "iter_shard": "shards", "read_card": "shards",
})
