"""The config is the source of truth: every field is a flag of the same name, and back."""

from __future__ import annotations

import dataclasses

from rnnlm.config import D2L_TIMEMACHINE_URL, TrainConfig


def test_flags_and_fields_are_one_to_one() -> None:
    from jobs.train import train

    flags = {p.name for p in train.params if p.expose_value}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert flags == fields


def test_defaults_are_the_chapters() -> None:
    c = TrainConfig()
    assert (c.corpus, c.max_tokens, c.batch_size, c.num_steps) == (
        D2L_TIMEMACHINE_URL,
        10_000,
        32,
        35,
    )
    assert (c.cell, c.num_hiddens, c.num_layers, c.lr, c.clip, c.epochs) == (
        "rnn",
        256,
        1,
        1.0,
        1.0,
        500,
    )
    assert (c.sampling, c.preprocess, c.sample_every, c.num_sample_chars) == (
        "sequential",
        "d2l",
        10,
        50,
    )
    assert c.resolved_sha1() == "090b5e7e70c295757f55df93cb0a180b9691891a"
