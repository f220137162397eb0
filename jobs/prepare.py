"""Prepare a corpus ahead of training: download it (if a URL), tokenise it once and write its
token ids to the cache, where every later job, restart and rank memory-maps them.

    python -m jobs.prepare --corpus /data/big.txt --cache-dir /cache

It takes the training job's flags (only the data ones matter: ``--corpus``,
``--corpus-sha1``, ``--preprocess``, ``--min-freq``, ``--cache-dir``, ...), so a Kubernetes
init container or Job can run it with the training job's arguments. Preparing is what the
first training job would do anyway; doing it before the training pods start keeps them from
waiting on one another.
"""

from __future__ import annotations

import logging
from typing import Any

import click

from jobs.common import setup_logging, user_errors
from jobs.flags import config_from_flags, config_options
from rnnlm.dataset import load_dataset

log = logging.getLogger("jobs.prepare")


@click.command(context_settings={"show_default": True, "max_content_width": 100})
@config_options
def prepare(**flags: Any) -> None:
    """Prepare the corpus of these (training) flags in the cache."""
    with user_errors():
        setup_logging(0, True)
        config = config_from_flags(flags)
        config.data.check(1)
        data = load_dataset(config.data, config.runtime.outage_timeout)
        click.echo(
            f"prepared {data.path} (sha1 {data.sha1}): vocabulary {len(data.vocab)}, "
            f"{data.num_tokens} tokens"
        )


def main() -> None:
    prepare()


if __name__ == "__main__":
    main()
