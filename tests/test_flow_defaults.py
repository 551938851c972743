"""One source of truth for defaults: flow signatures restate their config dataclasses' defaults, the
stage deployments of prefect.yaml ask for what the pipeline does, every flow parameter has a
description for the UI, and the list commands print whole URIs however narrow the terminal."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def flows_and_configs():
    from flows.detect_anomalies import detect_anomalies
    from flows.evaluate_cohort import evaluate_cohort_flow
    from flows.generate_cohort import generate_cohort
    from flows.generate_shard import generate_shard
    from flows.ingest_dataset import ingest_dataset
    from flows.pipeline import pipeline
    from flows.sweep import sweep
    from flows.train_autoencoder import train_autoencoder
    from flows.train_model import train_model
    from flows.train_part import train_part
    from meddiff.analysis.anomaly import AnomalyConfig
    from meddiff.analysis.sweep import SweepConfig
    from meddiff.data.ingest import IngestConfig
    from meddiff.evaluate import EvalConfig
    from meddiff.generate import CohortSpec
    from meddiff.pipeline import PipelineConfig
    from meddiff.train import TrainConfig
    from meddiff.train.ae_config import AETrainConfig

    return [(ingest_dataset, IngestConfig), (train_model, TrainConfig), (train_part, TrainConfig),
            (train_autoencoder, AETrainConfig), (generate_cohort, CohortSpec), (generate_shard, CohortSpec),
            (evaluate_cohort_flow, EvalConfig), (pipeline, PipelineConfig), (sweep, SweepConfig),
            (detect_anomalies, AnomalyConfig)]


def every_flow() -> list:
    """Every flow object defined in flows/*.py, found by import (a new flow cannot miss these tests)."""
    import importlib

    from prefect import Flow

    found = {}
    for path in sorted((REPO / "flows").glob("*.py")):
        module = importlib.import_module(f"flows.{path.stem}")
        for obj in vars(module).values():
            if isinstance(obj, Flow) and obj.fn.__module__ == module.__name__:
                found[obj.name] = obj
    return list(found.values())


def test_every_flow_has_its_config():
    assert sorted(f.name for f in every_flow()) == sorted(f.name for f, _ in flows_and_configs())


def field_default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


@pytest.mark.parametrize("flow, config", flows_and_configs(), ids=lambda x: getattr(x, "name", x.__name__))
def test_flow_defaults_equal_the_config_dataclass(flow, config):
    fields = {f.name: field_default(f) for f in dataclasses.fields(config)
              if not (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)}
    shared = 0
    for name, p in inspect.signature(flow.fn).parameters.items():
        if flow.name == "train-part" and name == "mode":  # a part is per-class by definition
            continue
        if name in fields and p.default is not inspect.Parameter.empty:
            want = fields[name]
            got = tuple(p.default.split(",")) if isinstance(want, tuple) and isinstance(p.default, str) else p.default
            assert got == want, f"{flow.name}: {name} defaults to {p.default!r}, {config.__name__} to {want!r}"
            shared += 1
    assert shared >= 5, f"{flow.name} shares only {shared} parameters with {config.__name__}"


def test_stage_deployments_ask_for_what_the_pipeline_does():
    """Ingest → train → generate → evaluate by hand (the default deployments) reaches the same
    outputs as pipeline/default: same objective and steps, same request, same evaluation size."""
    from meddiff.pipeline import PipelineConfig

    p = PipelineConfig()
    deps = {d["entrypoint"].split(":")[1]: d.get("parameters") or {}
            for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"] if d["name"] == "default"}
    assert deps["ingest_dataset"]["source"] == p.dataset
    assert deps["train_model"] == {"objective": p.objective, "steps": p.steps}
    assert deps["generate_cohort"] == {"per_class": p.per_class}
    assert deps["evaluate_cohort"] == {"max_images": p.eval_max_images}
    assert deps["pipeline"] == {}  # the flow's defaults are the pipeline's


@pytest.mark.parametrize("flow", every_flow(), ids=lambda f: f.name)
def test_every_flow_parameter_is_described_and_choices_are_listed(flow):
    """train-autoencoder (a default deployment), sweep, detect-anomalies and generate-shard showed a UI form
    without one description, and took kind, preset, mode, objective, split and rank_by as free text."""
    props = flow.parameters.model_dump()["properties"]
    assert all(p.get("description") for p in props.values()), [k for k, p in props.items() if not p.get("description")]
    for choice in ("mode", "objective", "sampler", "preset", "schedule", "prediction", "kind", "split", "rank_by",
                   "colour", "conditioning", "tstr_protocol"):
        if choice in props:
            assert props[choice].get("enum") or "const" in props[choice], f"{flow.name}.{choice} is free text"


def test_list_commands_print_whole_uris(bloodmnist_uri, tiny_conditional_model_uri, session_storage, monkeypatch):
    from typer.testing import CliRunner

    from meddiff.cli import app

    monkeypatch.setenv("COLUMNS", "40")  # a narrow terminal used to cut URIs at the right edge
    runner = CliRunner()
    for args, uri in ((["datasets", "list"], bloodmnist_uri), (["models", "list"], tiny_conditional_model_uri)):
        res = runner.invoke(app, [*args, "--storage", session_storage])
        assert res.exit_code == 0, res.output
        assert uri in res.output, res.output
    models = runner.invoke(app, ["models", "list", "--storage", session_storage]).output
    assert "complete" in models and "bloodmnist" in models


def test_cli_defaults_equal_the_config_dataclass():
    from meddiff.cli.cohorts_cmd import generate
    from meddiff.cli.datasets_cmd import ingest
    from meddiff.cli.pipeline_cmd import pipeline
    from meddiff.cli.train_cmd import train
    from meddiff.data.ingest import IngestConfig
    from meddiff.generate import CohortSpec
    from meddiff.pipeline import PipelineConfig
    from meddiff.train import TrainConfig

    # `meddiff pipeline --per-class` is None on the command line so that --total alone works; it means 50
    allowed = {("pipeline", "per_class")}
    for command, config in ((pipeline, PipelineConfig), (train, TrainConfig), (generate, CohortSpec),
                            (ingest, IngestConfig)):
        fields = {f.name: field_default(f) for f in dataclasses.fields(config)
                  if not (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)}
        shared = 0
        for name, p in inspect.signature(command).parameters.items():
            default = getattr(p.default, "default", p.default)
            if name in fields and (command.__name__, name) not in allowed:
                assert default == fields[name], f"meddiff {command.__name__} --{name}: {default!r} ≠ {fields[name]!r}"
                shared += 1
        assert shared >= 4, (command.__name__, shared)


FLOW_OF_COMMAND = {"ingest": "ingest-dataset", "train": "train-model", "train-autoencoder": "train-autoencoder",
                   "generate": "generate-cohort", "evaluate": "evaluate-cohort", "pipeline": "pipeline",
                   "sweep": "sweep", "anomaly": "detect-anomalies"}
RENAMED = {"real": "real_uri", "channels": "network_channels"}  # CLI option → flow parameter
FLOW_ONLY = {"parallel_classes", "allow_cpu_fallback", "evaluate", "parallel"}  # what only a flow orchestrates


@pytest.mark.parametrize("command", sorted(FLOW_OF_COMMAND))
def test_each_flow_takes_every_option_of_its_command(command):
    """A deployment is how the GPU pool is used, yet train-model lacked 15 of `meddiff train`'s options (lr,
    flips, label dropout, --compile, --run-name, the network overrides, …), train-autoencoder 6, ingest-dataset
    --bit-depth/--window/--shuffle-seed, evaluate-cohort --umap-points, detect-anomalies 2 and sweep --channels;
    the other way round, `meddiff pipeline` lacked the flow's sampler (and both lacked ingest's options)."""
    from typer.main import get_command

    from meddiff.cli import app

    options = {p.name for p in get_command(app).commands[command].params} - {"storage_root"}
    flow = {f.name: f for f in every_flow()}[FLOW_OF_COMMAND[command]]
    takes = set(inspect.signature(flow.fn).parameters)
    assert {RENAMED.get(o, o) for o in options} - takes == set()
    assert takes - {RENAMED.get(o, o) for o in options} - FLOW_ONLY - {"storage_root"} == set()  # pipeline: --sampler
    if command == "train":  # a per-class part on a worker gets what its parent was given
        part = {f.name: f for f in every_flow()}["train-part"]
        assert takes - set(inspect.signature(part.fn).parameters) == {"parallel_classes", "conditioning"}


def test_the_ingest_command_takes_every_ingest_option():
    from meddiff.cli.datasets_cmd import ingest
    from meddiff.data.ingest import IngestConfig

    assert {f.name for f in dataclasses.fields(IngestConfig)} - set(inspect.signature(ingest).parameters) == set()
