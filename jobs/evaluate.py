"""Evaluate a model on a held-out slice, and promote it when it beats the champion.

    python -m jobs.evaluate --model-uri models:/rnnlm-timemachine@candidate --corpus FILE
    python -m jobs.evaluate --model-uri models:/rnnlm-timemachine@candidate --corpus FILE \\
        --promote champion --min-improvement 0.01

The slice is, by default, the validation slice the model's training job held out: the same
corpus (by sha1), the same preprocessing, the same token range (``--max-tokens`` and
``--val-tokens`` of its run) and the same layout (``--batch-size``, ``--num-steps``), so the
figure equals the training job's last ``val_perplexity``. Each flag overrides its part.

The job records one MLflow run (experiment ``--experiment``): the slice as its dataset, the
figures as metrics, the decision as tags. The versions evaluated get tags (``val_perplexity``,
``val_bpc``, ``eval_corpus_sha1``, ``eval_slice``, ``eval_run_id``) that
``MlflowClient.search_model_versions`` can filter on.

``--promote ALIAS`` evaluates the challenger (``--model-uri``) and the version ``ALIAS`` points
at on the same slice, and moves ``ALIAS`` to the challenger only if its perplexity is lower by
the fraction ``--min-improvement``; with no holder yet the challenger takes it. A challenger
that already holds the alias changes nothing. Losing is a normal outcome: exit 0, one line.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import click
import torch

from jobs.common import setup_logging, user_errors
from rnnlm import registry
from rnnlm.artifacts import read_model_dir
from rnnlm.config import D2L_TIMEMACHINE_URL, DataConfig
from rnnlm.dataset import Dataset, load_dataset
from rnnlm.distributed import DistInfo
from rnnlm.errors import FlagError, UserError
from rnnlm.evaluate import evaluate, validation_batches
from rnnlm.model import RNNLM
from rnnlm.tracking import check_server, dataset_inputs, resolve_uri
from rnnlm.vocab import Vocab

log = logging.getLogger("jobs.evaluate")
SLICE_SETTINGS = ("preprocess", "min_freq", "max_tokens", "val_tokens", "batch_size", "num_steps")


@dataclasses.dataclass
class Candidate:
    """A model to evaluate: its weights and vocabulary, and its registered version if any."""

    uri: str
    module: RNNLM
    vocab: Vocab
    version: Any  # its registered version (an MLflow ModelVersion), or None
    settings: dict[str, str]  # its training job's


@click.command(context_settings={"show_default": True, "max_content_width": 100})
@click.option("--model-uri", required=True, help="models:/name@alias, models:/name/N, or a dir.")
@click.option("--corpus", default=D2L_TIMEMACHINE_URL, envvar="RNNLM_CORPUS",
              help="URL or path of the text the slice is cut from.")  # fmt: skip
@click.option("--corpus-sha1", default=None, help="Expected sha1 of the corpus file.")
@click.option("--cache-dir", default=None, envvar="RNNLM_CACHE_DIR", help="The corpus cache.")
@click.option("--max-tokens", type=int, default=None, help="Slice start [default: training's].")
@click.option("--val-tokens", type=int, default=None, help="Slice length [default: training's].")
@click.option("--batch-size", type=int, default=None, help="Rows [default: training's].")
@click.option("--num-steps", type=int, default=None, help="Window [default: training's].")
@click.option("--promote", default=None, help="Move this alias (e.g. champion) if better.")
@click.option("--min-improvement", type=float, default=0.0,
              help="Fraction by which the challenger's perplexity must be lower.")  # fmt: skip
@click.option("--tracking-uri", default=None, envvar="MLFLOW_TRACKING_URI", help="MLflow.")
@click.option("--experiment", default="rnnlm-evaluation", help="Experiment of the eval run.")
@click.option("--device", default="cpu", help="cpu, cuda or cuda:N.")
@click.option("--outage-timeout", type=float, default=120.0,
              help="Seconds an unreachable MLflow server is retried at start.")  # fmt: skip
def main(**flags: Any) -> None:
    """Evaluate a model on a held-out slice; with --promote, move an alias to the better one."""
    with user_errors():
        setup_logging(0, True)
        if not 0 <= flags["min_improvement"] < 1:
            raise FlagError("--min-improvement", "pass a fraction in [0, 1), e.g. 0.01.")
        import mlflow

        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # one line
        uri = resolve_uri(flags["tracking_uri"])
        mlflow.set_tracking_uri(uri)
        check_server(uri, flags["outage_timeout"])
        with tempfile.TemporaryDirectory() as tmp:
            challenger = load_candidate(flags["model_uri"], Path(tmp) / "challenger")
            holder = None
            if flags["promote"]:
                holder = _holder(challenger, flags["promote"])
                if holder is not None and holder.version == challenger.version.version:
                    click.echo(f"version {holder.version} already holds @{flags['promote']}: "
                               "nothing to do")  # fmt: skip
                    return
            data = slice_of(challenger, flags)
            figures = {"challenger": perplexity(challenger, data, flags["device"])}
            champion = None
            if holder is not None:
                champion = load_candidate(f"models:/{holder.name}/{holder.version}",
                                          Path(tmp) / "champion")  # fmt: skip
                figures["champion"] = perplexity(champion, data, flags["device"])
        click.echo(record(challenger, champion, data, figures, flags))


def load_candidate(model_uri: str, where: Path) -> Candidate:
    version = registry.version_of(model_uri)
    module, vocab = read_model_dir(registry.download_model(model_uri, where))
    settings = registry.training_settings(version) if version is not None else {}
    train_json = Path(model_uri) / "train.json"
    if version is None and train_json.is_file():  # a training --output-dir
        import json

        settings = {k: str(v) for k, v in json.loads(train_json.read_text())["config"].items()}
    return Candidate(model_uri, module, vocab, version, settings)


def _holder(challenger: Candidate, alias: str) -> Any | None:
    if challenger.version is None:
        raise FlagError("--promote", f"{challenger.uri} is not a registered version; pass "
                        "models:/NAME/VERSION or models:/NAME@ALIAS.")  # fmt: skip
    return registry.alias_holder(challenger.version.name, alias)


@dataclasses.dataclass
class Slice:
    data: Dataset  # its held-out ids are the slice
    config: DataConfig  # how it was cut and is laid out

    @property
    def name(self) -> str:
        start = self.data.train_ids.numel()
        return f"{self.data.sha1[:10]}[{start}:{start + self.data.val_ids.numel()}]"


def slice_of(candidate: Candidate, flags: dict[str, Any]) -> Slice:
    """The held-out slice: the training job's settings, each flag given overriding its own."""
    trained = {k: candidate.settings[k] for k in SLICE_SETTINGS if k in candidate.settings}
    chosen: dict[str, Any] = {k: int(v) if k != "preprocess" else v for k, v in trained.items()}
    chosen.update({k: flags[k] for k in SLICE_SETTINGS if flags.get(k) is not None})
    config = DataConfig(corpus=flags["corpus"], corpus_sha1=flags["corpus_sha1"],
                        cache_dir=flags["cache_dir"], **chosen)  # fmt: skip
    config.check(1)
    if config.val_tokens == 0:
        raise FlagError("--val-tokens", "the slice is empty; pass the number of tokens.")
    return Slice(load_dataset(config, 0.0), config)


def perplexity(candidate: Candidate, held_out: Slice, device: str) -> float:
    """The candidate's perplexity on the held-out slice, in its own vocabulary."""
    data = held_out.data
    lacking = sorted(set(data.vocab.idx_to_token[1:]) - set(candidate.vocab.token_to_idx))
    used = set(data.val_ids.unique().tolist())
    missing = [t for t in lacking if data.vocab.token_to_idx[t] in used]
    if missing:
        raise UserError(
            f"--model-uri: {candidate.uri}'s vocabulary cannot encode the slice: it lacks "
            f"{missing}; evaluate it on text of its own preprocessing."
        )
    to_model = torch.tensor([candidate.vocab.token_to_idx.get(t, 0)
                             for t in data.vocab.idx_to_token])  # fmt: skip
    ids = to_model[data.val_ids.long()]
    info = DistInfo(device=torch.device(device))
    layout = (held_out.config.batch_size, held_out.config.num_steps)
    return evaluate(candidate.module.to(info.device), validation_batches(ids, *layout), info)


def record(
    challenger: Candidate,
    champion: Candidate | None,
    held_out: Slice,
    figures: dict[str, float],
    flags: dict[str, Any],
) -> str:
    """One evaluation run with the figures and the decision; tags on the versions; the alias
    moved if the challenger wins. Returns the line to print."""
    import mlflow

    alias, ppl = flags["promote"], figures["challenger"]
    decision, reason = "evaluated", f"val_perplexity {ppl:.4f}"
    if alias:
        if champion is None:
            decision, reason = "promoted", f"no @{alias} yet; the first evaluated model takes it"
        else:
            best = figures["champion"] * (1 - flags["min_improvement"])
            better = ppl < best
            decision = "promoted" if better else "kept"
            reason = (f"challenger {ppl:.4f} vs @{alias} version {champion.version.version} "
                      f"{figures['champion']:.4f}; it needed below {best:.4f}")  # fmt: skip
    name, sha1 = held_out.name, held_out.data.sha1
    params = {"model_uri": challenger.uri, "corpus": flags["corpus"], "eval_slice": name,
              "promote": alias or "", "min_improvement": flags["min_improvement"]}  # fmt: skip
    metrics = {"val_perplexity": ppl, "val_bpc": math.log2(ppl)}
    if "champion" in figures:
        metrics |= {"champion_val_perplexity": figures["champion"],
                    "champion_val_bpc": math.log2(figures["champion"])}  # fmt: skip
    run_id = _evaluation_run(flags["experiment"], f"evaluate {challenger.uri}", params, metrics,
                             {"decision": decision, "reason": reason})  # fmt: skip
    inputs = dataset_inputs(flags["corpus"], sha1, held_out.data.val_ids.numel(), "evaluation",
                            name)  # fmt: skip
    mlflow.MlflowClient().log_inputs(run_id, inputs)
    for candidate, key in ((challenger, "challenger"), (champion, "champion")):
        if candidate is not None and candidate.version is not None:
            value = figures[key]
            registry.tag_version(candidate.version, {
                "val_perplexity": f"{value:.6g}", "val_bpc": f"{math.log2(value):.6g}",
                "eval_corpus_sha1": sha1, "eval_slice": name, "eval_run_id": run_id,
            })  # fmt: skip
    if alias and decision == "promoted":
        registry.move_alias(challenger.version, alias)
        registry.tag_version(challenger.version, {"promotion": f"@{alias}: {reason}"})
    elif alias:
        registry.tag_version(challenger.version, {"promotion": f"refused @{alias}: {reason}"})
    return f"{decision}: {reason} (evaluation run {run_id})"


def _evaluation_run(
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    metrics: dict[str, float],
    tags: dict[str, str],
) -> str:
    """A finished run holding the evaluation; its id."""
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run_id: str = client.create_run(experiment_id, run_name=run_name).info.run_id
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
        params=[Param(k, str(v)) for k, v in params.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    client.set_terminated(run_id, "FINISHED")
    return run_id


if __name__ == "__main__":
    main()
