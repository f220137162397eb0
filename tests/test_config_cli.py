"""The config is the source of truth: every setting is a flag of the same name, and back; each
flag's default, help, choices and environment variable are the setting's declaration."""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path
from typing import Any

import click
import pytest

from jobs.flags import config_from_flags, config_options
from jobs.train import train
from rnnlm.config import D2L_TIMEMACHINE_URL, TrainConfig, flag_name, flat_fields
from tests.conftest import run_job


def declared_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is dataclasses.MISSING:
        return f.default_factory()
    return f.default


def options(command: click.Command) -> dict[str, click.Option]:
    return {p.name: p for p in command.params if p.expose_value and isinstance(p, click.Option)}


def test_flags_and_fields_are_one_to_one() -> None:
    sections = [type(getattr(TrainConfig(), f.name)) for f in dataclasses.fields(TrainConfig)]
    declared = [
        f.name for s in sections for f in dataclasses.fields(s) if f.metadata.get("cli", True)
    ]
    # Flat names are what flags, --config files and MLflow's params use: no two sections may
    # declare the same one (the flat view would silently keep only one of them).
    assert len(declared) == len(set(declared))
    flags = options(train)
    assert set(flags) == set(flat_fields()) == set(declared)
    for name, f in flat_fields().items():
        assert flags[name].opts == [flag_name(f)], name
    # ...and back: the flat dict of a config rebuilds the same config.
    config = TrainConfig()
    assert set(config.to_flat()) == set(declared)
    assert TrainConfig.from_flat(config.to_flat()) == config


def test_each_flag_is_its_declaration() -> None:
    """Default, help, choices and environment variable of every flag are the declared ones, so
    no flag can restate a default (or a help text) that then drifts from the config's."""
    flags = options(train)
    for name, f in flat_fields().items():
        flag, default = flags[name], declared_default(f)
        shown = tuple(flag.default) if flag.multiple else flag.default
        assert shown == default and type(shown) is type(default), name
        assert flag.help == f.metadata["help"], name
        assert flag.envvar == f.metadata["envvar"], name
        choices = f.metadata["choices"]
        if choices:
            assert isinstance(flag.type, click.Choice) and tuple(flag.type.choices) == choices
        if isinstance(default, bool):
            assert flag.is_flag, name


def test_a_changed_declaration_changes_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """The options are generated from the declarations, not written beside them: change one
    and the command built from them follows."""
    f = flat_fields()["num_hiddens"]
    monkeypatch.setattr(f, "default", 123)
    monkeypatch.setattr(f, "metadata", types.MappingProxyType({**f.metadata, "help": "Changed."}))
    command = click.command()(config_options(lambda **_: None))
    flag = options(command)["num_hiddens"]
    assert (flag.default, flag.help) == (123, "Changed.")


def test_defaults_are_the_chapters() -> None:
    c = TrainConfig()
    assert (c.data.corpus, c.data.max_tokens, c.data.batch_size, c.data.num_steps) == (
        D2L_TIMEMACHINE_URL,
        10_000,
        32,
        35,
    )
    assert (c.model.cell, c.model.num_hiddens, c.model.num_layers) == ("rnn", 256, 1)
    assert (c.training.lr, c.training.clip, c.training.epochs) == (1.0, 1.0, 500)
    assert (c.data.sampling, c.data.preprocess, c.output.sample_every) == (
        "sequential",
        "d2l",
        10,
    )
    assert c.output.num_sample_chars == 50
    assert c.data.resolved_sha1() == "090b5e7e70c295757f55df93cb0a180b9691891a"


def parse(args: list[str]) -> TrainConfig:
    """The config the job would run with, from its real command line (nothing is run)."""
    with train.make_context("rnnlm-train", args) as ctx:
        return config_from_flags(ctx.params)


def test_config_file_sets_values_and_flags_on_the_line_win(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for f in flat_fields().values():  # settings from the environment would beat the file
        if f.metadata["envvar"]:
            monkeypatch.delenv(f.metadata["envvar"], raising=False)
    settings = {
        "num_hiddens": 16,
        "epochs": 7,
        "lr": 0.5,
        "tracking": False,
        "sample_prefixes": ["the"],
        "cell": "gru",
    }
    path = tmp_path / "job.json"
    path.write_text(json.dumps(settings))
    line = ["--num-hiddens", "32", "--sample-prefix", "a", "--sample-prefix", "b"]
    got = parse(["--config", str(path), *line])
    expected = {**settings, "num_hiddens": 32, "sample_prefixes": ("a", "b")}
    assert got == TrainConfig.from_flat(expected)
    # The flags win wherever they stand on the line: the file is read before them.
    assert parse([*line, "--config", str(path)]) == got
    assert parse(["--config", str(path)]).model.num_hiddens == 16


@pytest.mark.integration
def test_config_file_with_an_unknown_key_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"num_hiddens": 16, "num_hidden": 32}))
    out = tmp_path / "out"
    proc = run_job(["--config", str(path), "--output-dir", str(out)], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert "--config" in errors[0] and "unknown settings ['num_hidden']" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not (tmp_path / "mlflow.db").exists()
