"""The CPU kernel extension: its operators compute what the core computes, are bound as the
framework expects (schema, autograd, fake tensors: ``torch.library.opcheck``), refuse what the C
code could not read safely, load nothing another user could have written, and the job says which
path it took."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from rnnlm.config import ModelConfig, TrainConfig
from rnnlm.distributed import DistInfo
from rnnlm.errors import FlagError
from rnnlm.extensions import cpu_kernel
from rnnlm.extensions.cpu_kernel import KernelRNNLM, KernelStep, build
from rnnlm.model import RNNLM
from rnnlm.steps import EagerStep
from tests.conftest import job_env, read_train_info, run_job

pytestmark = pytest.mark.integration  # builds the extension with the system's compilers


def _pair(hidden: int, seed: int = 1) -> tuple[RNNLM, KernelRNNLM]:
    """The core's model and the extension's, with the same (seeded) weights."""
    torch.manual_seed(seed)
    core = RNNLM(ModelConfig(28, num_hiddens=hidden))
    kernel = KernelRNNLM(ModelConfig(28, num_hiddens=hidden))
    kernel.load_state_dict(core.state_dict())
    return core, kernel


@pytest.mark.parametrize(("hidden", "batch"), [(256, 32), (13, 5), (40, 1)])
def test_train_loss_op_matches_autograd_through_nn_rnn(
    kernel_cache: Path, hidden: int, batch: int
) -> None:
    """Loss, new state and every parameter's gradient equal the core's (autograd through
    ``nn.RNN``) to round-off: the kernel's products and ``tanh`` are its own. 13 and 40 hidden
    units exercise its partial vectors and panels, one row its smallest split."""
    core, kernel = _pair(hidden)
    x = torch.randint(0, 28, (batch, 9))
    y = torch.randint(0, 28, (batch, 9))
    h0 = torch.randn(1, batch, hidden) * 0.5
    results = []
    for model in (core, kernel):
        loss, state = model(x, h0, y)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        results.append((loss.detach(), state.detach(), grads))
    (l0, s0, g0), (l1, s1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s1, s0, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g0.keys() == {n for n, _ in core.named_parameters()}
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)
    assert l0.item() > 1.0  # a real loss, not a degenerate one


def test_clip_sgd_op_matches_clip_grad_norm_and_sgd(kernel_cache: Path) -> None:
    """The fused step clips to the global L2 norm and updates as ``clip_grad_norm_`` and
    ``torch.optim.SGD`` do, for gradients above and below the threshold."""
    for scale in (5.0, 1e-3):  # clipped, and left alone
        core, kernel = _pair(32)
        steps = [
            cls(model, torch.optim.SGD(model.parameters(), lr=0.5), 1.0)
            for cls, model in ((EagerStep, core), (KernelStep, kernel))
        ]
        for step in steps:
            for p in step.params:
                p.grad = torch.full_like(p, scale)
        norms = [step.clip_and_step() for step in steps]
        torch.testing.assert_close(norms[1], norms[0], rtol=1e-5, atol=0)
        for (name, a), b in zip(core.named_parameters(), kernel.parameters(), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)


def test_one_process_takes_the_gradients_straight_from_the_operator(kernel_cache: Path) -> None:
    """Alone, the step skips autograd (nothing to average); wrapped (as by DDP) it runs through
    autograd. Both compute the same bits: the same loss, norm and updated parameters."""

    class Wrapper(nn.Module):  # stands in for DDP: the step then reaches the model through it
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.module(*args)

    x, y = torch.randint(0, 28, (6, 8)), torch.randint(0, 28, (6, 8))
    results = []
    for wrap in (False, True):
        torch.manual_seed(3)
        module = KernelRNNLM(ModelConfig(28, num_hiddens=32))
        model = Wrapper(module) if wrap else module
        step = KernelStep(model, torch.optim.SGD(module.parameters(), lr=0.5), 1.0)
        with torch.profiler.profile() as profile:
            loss, norm, state = step(x, y, module.begin_state(6))
        ran = {event.name for event in profile.events()}
        assert "rnnlm_cpu::rnn_train_loss" in ran and "rnnlm_cpu::clip_sgd_" in ran
        walked_back = any("Backward" in name and "rnn_train_loss" in name for name in ran)
        assert walked_back is wrap, sorted(ran)
        assert loss.grad_fn is None and not state.requires_grad
        results.append([loss, norm, state, *module.parameters()])
    for alone, through_autograd in zip(*results, strict=True):
        assert torch.equal(alone, through_autograd)


def test_operators_are_bound_as_the_framework_expects(kernel_cache: Path) -> None:
    """``opcheck``: schemas, the registered autograd, fake (shape-only) implementations and
    tracing all hold for both operators."""
    hidden, batch = 13, 5
    ids, targets = torch.randint(0, 28, (batch, 7)), torch.randint(0, 28, (batch, 7))
    params = [p.detach().clone().requires_grad_() for p in _pair(hidden)[1].parameters()]
    ordered = [params[0], params[2], params[1], params[3], params[4], params[5]]  # W_ih, b_ih...
    torch.library.opcheck(torch.ops.rnnlm_cpu.rnn_train_loss.default,
                          (ids, targets, torch.randn(batch, hidden), *ordered))  # fmt: skip
    grads = [torch.randn_like(p) for p in params]
    torch.library.opcheck(
        torch.ops.rnnlm_cpu.clip_sgd_.default, ([p.detach() for p in params], grads, 1.0, 0.1)
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ids": torch.full((4, 6), 28)}, r"ids: an id is outside \[0, 28\)"),
        ({"targets": torch.full((4, 6), -1)}, r"targets: a target is outside \[0, 28\)"),
        ({"ids": torch.zeros(4, 6, dtype=torch.int32)}, r"ids: expected a CPU Long tensor"),
        ({"h0": torch.zeros(4, 7)}, r"h0: expected .* of shape \[4, 16\]"),
    ],
    ids=["id-out-of-range", "negative-target", "int32-ids", "state-shape"],
)
def test_bad_tensors_are_refused_before_the_kernel_reads_them(
    kernel_cache: Path, change: dict[str, torch.Tensor], message: str
) -> None:
    module = KernelRNNLM(ModelConfig(28, num_hiddens=16))
    args = {"ids": torch.zeros(4, 6, dtype=torch.long), "targets": torch.zeros(4, 6,
            dtype=torch.long), "h0": torch.zeros(4, 16), **change}  # fmt: skip
    params = [module.rnn.weight_ih_l0, module.rnn.bias_ih_l0, module.rnn.weight_hh_l0,
              module.rnn.bias_hh_l0, module.linear.weight, module.linear.bias]  # fmt: skip
    with pytest.raises(RuntimeError, match=message):
        torch.ops.rnnlm_cpu.rnn_train_loss(args["ids"], args["targets"], args["h0"], *params)


def test_two_rank_gradients_are_averaged_by_ddp(kernel_cache: Path, tmp_path: Path,
                                                corpus_path: Path) -> None:  # fmt: skip
    """The extension's job on 2 ranks trains exactly like 1 process (DDP averaged the gradients
    its operator produced): the same perplexities, and the job recorded the path it took."""
    args = ["--corpus", str(corpus_path), "--epochs", "3", "--no-tracking", "--cpu-kernel",
            "compiled", "--cache-dir", str(kernel_cache)]  # fmt: skip
    one = run_job([*args, "--output-dir", str(tmp_path / "one")])
    two = run_job([*args, "--output-dir", str(tmp_path / "two")], nproc=2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    a, b = read_train_info(tmp_path / "one"), read_train_info(tmp_path / "two")
    assert a["train_path"] == b["train_path"] == f"cpu-kernel ({build.chosen_isa()})"
    assert b["perplexity_by_epoch"] == pytest.approx(a["perplexity_by_epoch"], rel=1e-5)
    assert "training path: cpu-kernel" in one.stderr


def test_auto_falls_back_to_the_core_and_says_why(corpus_path: Path, tmp_path: Path) -> None:
    args = ["--corpus", str(corpus_path), "--epochs", "1", "--no-tracking", "--cell", "gru",
            "--output-dir", str(tmp_path / "gru")]  # fmt: skip
    proc = run_job(args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_train_info(tmp_path / "gru")["train_path"] == "torch"
    assert "not the CPU kernel: it trains one rnn layer, and this job has --cell gru" in proc.stderr
    refused = run_job([*args, "--cpu-kernel", "compiled"])
    errors = [line for line in refused.stderr.splitlines() if line.startswith("Error")]
    assert refused.returncode == 2 and len(errors) == 1, refused.stderr[-2000:]
    assert errors[0].startswith("Error: --cpu-kernel: the compiled kernel cannot run here")


def test_an_unknown_instruction_set_is_a_one_line_error(
    kernel_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(build.ISA_ENV, "avx1024")
    config = TrainConfig.from_flat({"cpu_kernel": "compiled"})
    with pytest.raises(FlagError, match=r"RNNLM_CPU_CAPABILITY: 'avx1024' is not one of"):
        cpu_kernel.train_spec(config, DistInfo(), kernel_cache)


def test_a_failed_build_falls_back_unless_compiled_is_asked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(build, "HERE", tmp_path / "no-installed-build")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with caplog.at_level(logging.INFO):
        spec = cpu_kernel.train_spec(TrainConfig(), DistInfo(), tmp_path / "cache")
    assert spec.model_class is RNNLM and "no-such-cc, which is not on PATH" in caplog.text
    with pytest.raises(FlagError, match="--cpu-kernel: the compiled kernel cannot run here"):
        cpu_kernel.train_spec(TrainConfig.from_flat({"cpu_kernel": "compiled"}), DistInfo(),
                              tmp_path / "cache")  # fmt: skip


def test_nothing_is_loaded_from_a_cache_others_could_write(
    kernel_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A library is code: a cache folder, or a library in it, that group or others may write is
    refused by ``load`` before anything is loaded from it (no installed build in the way)."""
    monkeypatch.setattr(build, "HERE", tmp_path / "no-installed-build")
    isa = build.chosen_isa()
    shared = tmp_path / "shared-cache"
    (shared / "cpu_kernel").mkdir(parents=True)
    (shared / "cpu_kernel").chmod(0o777)
    with pytest.raises(build.Unavailable, match="cpu_kernel is writable by other users"):
        build.load(shared, isa)
    mine = tmp_path / "my-cache"
    library = build.private_dir(mine / "cpu_kernel") / build.library_name(isa)
    library.write_bytes((kernel_cache / "cpu_kernel" / library.name).read_bytes())
    library.chmod(0o775)  # a group member could have replaced it
    with pytest.raises(build.Unavailable, match=f"{library.name} is writable by other users"):
        build.load(mine, isa)


@pytest.mark.skipif(os.getuid() != 0, reason="giving a file to another user takes root")
def test_nothing_is_loaded_that_another_user_owns(
    kernel_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(build, "HERE", tmp_path / "no-installed-build")
    isa = build.chosen_isa()
    library = build.private_dir(tmp_path / "cache" / "cpu_kernel") / build.library_name(isa)
    library.write_bytes((kernel_cache / "cpu_kernel" / library.name).read_bytes())
    library.chmod(0o700)
    os.chown(library, 12345, 12345)
    with pytest.raises(build.Unavailable, match="belongs to user 12345"):
        build.load(tmp_path / "cache", isa)


STEP_BITS = """
import hashlib, sys, torch
from pathlib import Path
from rnnlm.config import ModelConfig
from rnnlm.extensions.cpu_kernel import KernelRNNLM, build, ops
build.load(Path(sys.argv[1])); ops.register()
torch.manual_seed(0)
module = KernelRNNLM(ModelConfig(28, num_hiddens=40))
x, y = torch.randint(0, 28, (7, 9)), torch.randint(0, 28, (7, 9))
loss, state = module(x, module.begin_state(7), y)
loss.backward()
tensors = [loss, state, *(p.grad for p in module.parameters())]
print(hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in tensors)).hexdigest())
"""


@pytest.mark.skipif(build.supported_isas() != ["avx512", "avx2"], reason="needs a CPU with AVX-512")
def test_avx512_and_avx2_builds_compute_the_same_bits(kernel_cache: Path) -> None:
    digests = set()
    for isa in build.ISAS:
        done = subprocess.run(
            [sys.executable, "-c", STEP_BITS, str(kernel_cache)], capture_output=True,
            text=True, env={**job_env(), build.ISA_ENV: isa}, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        digests.add(done.stdout.strip())
    assert len(digests) == 1


def test_the_models_parameters_are_the_cores(kernel_cache: Path) -> None:
    """Checkpoints and registered models do not depend on the path that trained them."""
    core, kernel = RNNLM(ModelConfig(28)), KernelRNNLM(ModelConfig(28))
    assert list(core.state_dict()) == list(kernel.state_dict())
    assert isinstance(kernel, nn.Module) and isinstance(kernel, RNNLM)
