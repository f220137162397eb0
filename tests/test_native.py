"""The compiled recurrence (rnnlm/native): accurate, row-independent, built once, and a job
that cannot build it says so (``--cpu-kernel compiled``) or carries on without it (``auto``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rnnlm import native
from rnnlm.config import ModelConfig
from rnnlm.loop import SGD, CompiledStep, EagerStep, clip_gradients, default_step
from rnnlm.model import RNNLM, CompiledLinear, CompiledLinearCrossEntropy, CompiledTanhRecurrence
from tests.conftest import job_env, read_train_info, run_job
from tests.test_bad_input import assert_refused

pytestmark = pytest.mark.skipif(
    native.why_unavailable() is not None, reason=f"compiled kernel: {native.why_unavailable()}"
)


ISAS = native.supported_isas() if native.why_unavailable() is None else []


@pytest.fixture(scope="module", params=ISAS)
def kernel(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> native.TanhRecurrenceKernel:
    """Each instruction set this CPU has: the tests below hold for every build."""
    return native.load(tmp_path_factory.mktemp("cache"), request.param)


def test_tanh_within_two_ulp(kernel: native.TanhRecurrenceKernel) -> None:
    """One step from h_0 = 0 with W_hh = 0 and b_hh = 0 is tanh(pre), against float64."""
    x = torch.linspace(-12, 12, 400_000).reshape(1, -1, 8)
    hs = torch.zeros(2, *x.shape[1:])
    kernel.forward(x, torch.zeros(8, 8), torch.zeros(8), hs)
    exact = torch.tanh(x.reshape(-1).double())
    ulp = (torch.nextafter(exact.float(), torch.tensor(2.0)) - exact.float()).double().abs()
    assert ((hs[1].reshape(-1).double() - exact).abs() / ulp).max() <= 2.0
    assert torch.equal(hs[1].reshape(-1)[[0, -1]], torch.tensor([-1.0, 1.0]))
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-30, 50, -50])
    hs = torch.zeros(2, 1, 8)
    kernel.forward(special.reshape(1, 1, 8), torch.zeros(8, 8), torch.zeros(8), hs)
    # NaN must stay NaN: the job's divergence check (--lr) relies on it.
    torch.testing.assert_close(hs[1, 0], torch.tanh(special), equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("hidden", [256, 37])  # 37: a partial panel and a partial vector
def test_rows_split_across_ranks_change_no_bit(
    kernel: native.TanhRecurrenceKernel, hidden: int
) -> None:
    """What 2 ranks compute on 16 rows each, 32 ranks on 1 row each, ranks of 9, 12 and 13
    rows, and 3 or more threads on their shares, equals the 32-row result of one thread bit for
    bit: outputs
    and the gradients of the inputs and of h_0. (Every element is one chain of fused
    multiply-adds in the same order, whatever register tile of 1-6 (AVX-512: 1-8) rows its row
    falls in; the runs below use every tile size.)"""
    torch.manual_seed(0)
    steps, batch = 35, 32
    pre = torch.randn(steps, batch, hidden)
    h0 = torch.randn(batch, hidden) * 0.5
    w_hh, b_hh = torch.randn(hidden, hidden) * hidden**-0.5, torch.randn(hidden) * 0.1
    grad_out = torch.randn(steps, batch, hidden)

    def run(rows: slice) -> tuple[torch.Tensor, ...]:
        p = pre[:, rows].clone().requires_grad_(True)
        h = h0[rows].clone().requires_grad_(True)
        out, last = CompiledTanhRecurrence.apply(kernel, p, h, w_hh, b_hh)
        (out * grad_out[:, rows]).sum().add(last.sum()).backward()
        assert p.grad is not None and h.grad is not None
        return out.detach(), last.detach(), p.grad, h.grad

    try:
        kernel.threads = 1
        whole = run(slice(None))
        halves = [run(slice(0, 16)), run(slice(16, 32))]
        singles = [run(slice(i, i + 1)) for i in range(batch)]  # 32 ranks of one row
        # Ranks of 9, 12 and 13 rows. AVX2: tiles of 6+3, 6+6, 6+6+1; AVX-512: 8+1, 8+4, 8+5
        partial = [run(slice(0, rows)) for rows in (9, 12, 13)]
        kernel.threads = 3  # 11 + 11 + 10 rows. AVX2: 6+5, 6+4; AVX-512: 8+3, 8+2
        three = run(slice(None))
        kernel.threads = 5  # 7 + 7 + 6 + 6 + 6 rows, one run per OpenMP thread: tiles of 7, 6
        threaded = run(slice(None))
        kernel.threads = 64  # capped at one row per thread
        capped = run(slice(None))
    finally:
        kernel.threads = None
    for part, name in enumerate(["outputs", "last state", "d pre", "d h0"]):
        joined = torch.cat([halves[0][part], halves[1][part]], dim=-2)
        assert torch.equal(joined, whole[part]), name
        assert torch.equal(torch.cat([s[part] for s in singles], dim=-2), whole[part]), name
        for rows, result in zip((9, 12, 13), partial, strict=True):
            assert torch.equal(result[part], whole[part][..., :rows, :]), name
        assert torch.equal(three[part], whole[part]), name
        assert torch.equal(threaded[part], whole[part]), name
        assert torch.equal(capped[part], whole[part]), name


@pytest.mark.skipif(len(ISAS) < 2, reason="this CPU has one of the instruction sets")
@pytest.mark.parametrize("hidden", [256, 37])
def test_instruction_sets_compute_the_same_bits(tmp_path: Path, hidden: int) -> None:
    """The AVX-512 build (16-float vectors, tiles of 8 rows) and the AVX2 build (8-float
    vectors, tiles of 6 rows) give the same outputs and gradients, bit for bit, the weight
    gradient included."""
    torch.manual_seed(2)
    steps, batch = 35, 32
    pre, h0 = torch.randn(steps, batch, hidden), torch.randn(batch, hidden) * 0.5
    w_hh, b_hh = torch.randn(hidden, hidden) * hidden**-0.5, torch.randn(hidden) * 0.1
    grad_out = torch.randn(steps, batch, hidden)
    head, targets = torch.randn(28, hidden) * hidden**-0.5, torch.randint(0, 28, (steps * batch,))
    results = []
    for isa in ISAS:
        kernel = native.load(tmp_path, isa)
        assert kernel.isa == isa
        p, h, b = (t.clone().requires_grad_(True) for t in (pre, h0, b_hh))
        out, last = CompiledTanhRecurrence.apply(kernel, p, h, w_hh, b)
        (out * grad_out).sum().add(last.sum()).backward()
        grad_w = kernel.matmul(grad_out.reshape(-1, hidden).t(), pre.reshape(-1, hidden))
        x, w = (t.clone().requires_grad_(True) for t in (out.detach().reshape(-1, hidden), head))
        loss = CompiledLinearCrossEntropy.apply(kernel, x, w, torch.zeros(28), targets)
        loss.backward()
        stepped = [t.detach().clone().requires_grad_(True) for t in (w, x)]
        for leaf, grad in zip(stepped, (w.grad, x.grad), strict=True):
            leaf.grad = grad.clone()
        norm = kernel.clip_sgd(stepped, 0.5, lr=1.0)
        recurrence = [out.detach(), last.detach(), p.grad, h.grad, b.grad, grad_w]
        results.append([*recurrence, loss, x.grad, norm, *(t.detach() for t in stepped)])
    names = ["outputs", "last state", "d pre", "d h0", "d b_hh", "weight grad", "loss", "d x"]
    names += ["norm", "stepped w", "stepped x"]
    for part, name in enumerate(names):
        assert all(torch.equal(r[part], results[0][part]) for r in results), name


def test_products_match_float64(kernel: native.TanhRecurrenceKernel) -> None:
    """The kernel's own matrix products: one step from h_0 with pre = 0 and b_hh = 0 is
    tanh(h_0 W_hh^T), and its backward dh_0 = (g * (1 - h_1^2)) W_hh, against float64."""
    torch.manual_seed(1)
    for batch, hidden in [(32, 256), (7, 37), (1, 5)]:
        h0 = torch.randn(batch, hidden)
        w_hh = torch.randn(hidden, hidden) * hidden**-0.5
        hs = torch.zeros(2, batch, hidden)
        hs[0] = h0
        kernel.forward(torch.zeros(1, batch, hidden), w_hh, torch.zeros(hidden), hs)
        exact = torch.tanh(h0.double() @ w_hh.double().T)
        torch.testing.assert_close(hs[1].double(), exact, rtol=0, atol=1e-6)
        grad = torch.randn(1, batch, hidden)
        dh, dz = torch.zeros(batch, hidden), torch.empty(1, batch, hidden)
        kernel.backward(hs[1:], grad, w_hh, dh, dz)
        exact_dz = grad.double() * (1 - hs[1].double() ** 2)
        torch.testing.assert_close(dz.double(), exact_dz, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(dh.double(), dz[0].double() @ w_hh.double(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("rows, hidden", [(1120, 256), (75, 37)])
def test_weight_gradient_matches_float64(
    kernel: native.TanhRecurrenceKernel, rows: int, hidden: int
) -> None:
    """``dz^T @ h`` against float64, and the same bits on 1, 3 or 16 threads (each thread takes
    whole column panels; an element is one chain over the rows in order)."""
    torch.manual_seed(3)
    dz, h = torch.randn(rows, hidden) * 0.1, torch.tanh(torch.randn(rows, hidden))
    exact = dz.double().T @ h.double()
    by_threads = []
    try:
        for threads in (1, 3, 16):
            kernel.threads = threads
            by_threads.append(kernel.matmul(dz.t(), h))
    finally:
        kernel.threads = None
    torch.testing.assert_close(by_threads[0].double(), exact, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(grad, by_threads[0]) for grad in by_threads)


def test_product_blocked_along_the_inner_dimension_changes_no_bit(
    kernel: native.TanhRecurrenceKernel,
) -> None:
    """:meth:`matmul` takes the inner dimension a block at a time (its tiles resume from the
    partial sums); the recurrence's backward multiplies by ``W_hh`` in one unblocked chain. With
    601 hidden units (several blocks, and a last panel narrower than a tile) both give the same
    bits for ``dh_0 = dz_0 @ W_hh``."""
    torch.manual_seed(5)
    batch, hidden = 9, 601
    w_hh = torch.randn(hidden, hidden) * hidden**-0.5
    outs, grad = torch.tanh(torch.randn(1, batch, hidden)), torch.randn(1, batch, hidden)
    dh, dz = torch.zeros(batch, hidden), torch.empty(1, batch, hidden)
    kernel.backward(outs, grad, w_hh, dh, dz)
    assert torch.equal(kernel.matmul(dz[0], w_hh), dh)


@pytest.mark.parametrize("rows, features, out", [(1120, 256, 28), (70, 37, 5)])
def test_output_layer_matches_the_framework(
    kernel: native.TanhRecurrenceKernel, rows: int, features: int, out: int
) -> None:
    """:class:`CompiledLinear` (the kernel's three products) against ``F.linear``: outputs and
    the gradients of the input, the weight and the bias, against float64 and torch's float32."""
    torch.manual_seed(4)
    x = torch.tanh(torch.randn(rows, features))
    weight, bias = torch.randn(out, features) * features**-0.5, torch.randn(out) * 0.1
    grad = torch.randn(rows, out) / rows

    def run(fn: object, dtype: torch.dtype) -> list[torch.Tensor]:
        leaves = [t.to(dtype, copy=True).requires_grad_(True) for t in (x, weight, bias)]
        y = fn(*leaves)  # type: ignore[operator]
        y.backward(grad.to(dtype))
        return [y.detach(), *(t.grad for t in leaves)]

    ours = run(lambda *args: CompiledLinear.apply(kernel, *args), torch.float32)
    framework = run(torch.nn.functional.linear, torch.float32)
    exact = run(torch.nn.functional.linear, torch.float64)
    for name, a, b, e in zip(
        ["output", "d x", "d weight", "d bias"], ours, framework, exact, strict=True
    ):
        ours_err, framework_err = (a.double() - e).abs().max(), (b.double() - e).abs().max()
        assert ours_err <= 2 * framework_err + 1e-7, (name, ours_err, framework_err)


@pytest.mark.parametrize("rows, features, classes", [(1120, 256, 28), (70, 37, 5)])
def test_output_layer_and_loss_in_one_call(
    kernel: native.TanhRecurrenceKernel, rows: int, features: int, classes: int
) -> None:
    """:class:`CompiledLinearCrossEntropy` against ``F.cross_entropy(F.linear(...))``: the loss
    and the gradients of the input, the weight and the bias, against float64 and torch's
    float32; the same bits on 3 threads; an upstream gradient other than 1 scales them."""
    torch.manual_seed(5)
    x = torch.tanh(torch.randn(rows, features))
    weight, bias = torch.randn(classes, features) * 2 * features**-0.5, torch.randn(classes)
    targets = torch.randint(0, classes, (rows,))

    def run(fn: object, dtype: torch.dtype, upstream: float = 1.0) -> list[torch.Tensor]:
        leaves = [t.to(dtype, copy=True).requires_grad_(True) for t in (x, weight, bias)]
        loss = fn(*leaves)  # type: ignore[operator]
        (loss * upstream).backward()
        return [loss.detach(), *(t.grad for t in leaves)]

    def framework(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(torch.nn.functional.linear(x, w, b), targets)

    def compiled(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return CompiledLinearCrossEntropy.apply(kernel, x, w, b, targets)

    ours = run(compiled, torch.float32)
    exact = run(framework, torch.float64)
    names = ["loss", "d x", "d weight", "d bias"]
    for name, a, b, e in zip(names, ours, run(framework, torch.float32), exact, strict=True):
        ours_err, framework_err = (a.double() - e).abs().max(), (b.double() - e).abs().max()
        assert ours_err <= 2 * framework_err + 1e-7, (name, ours_err, framework_err)
    try:
        kernel.threads = 3
        for name, three, one in zip(names, run(compiled, torch.float32), ours, strict=True):
            assert torch.equal(three, one), name
    finally:
        kernel.threads = None
    scaled = run(compiled, torch.float32, upstream=2.5)
    for name, a, b in zip(names[1:], scaled[1:], ours[1:], strict=True):
        assert torch.equal(a, b * 2.5), name
    with torch.no_grad():  # no gradients asked for: the same loss
        assert torch.equal(compiled(x, weight, bias), ours[0])


def test_output_layer_and_loss_refuse_and_propagate(kernel: native.TanhRecurrenceKernel) -> None:
    """A target outside the classes raises; a NaN or infinite logit makes the loss NaN, as in
    the framework (the job's divergence check relies on it)."""
    x, weight, bias = torch.randn(12, 8), torch.randn(5, 8), torch.zeros(5)
    targets = torch.randint(0, 5, (12,))
    with pytest.raises(IndexError, match=r"outside \[0, 5\)"):
        CompiledLinearCrossEntropy.apply(kernel, x, weight, bias, torch.full((12,), 5))
    for row, column, value in [(3, 2, float("nan")), (7, 0, float("inf")), (0, 4, -float("inf"))]:
        bad = x.clone()
        bad[row] = 0
        bias_bad = bias.clone()
        bias_bad[column] = value
        loss = CompiledLinearCrossEntropy.apply(kernel, bad, weight, bias_bad, targets)
        expected = torch.nn.functional.cross_entropy(bad @ weight.T + bias_bad, targets)
        torch.testing.assert_close(loss, expected, equal_nan=True)


def test_training_loss_equals_the_logits_loss(kernel: native.TanhRecurrenceKernel) -> None:
    """``model(x, state, targets)``, the job's training call, computes the cross-entropy of
    ``model(x, state)``'s logits: the loss and every parameter's gradient, to round-off."""
    torch.manual_seed(6)
    model = RNNLM(ModelConfig(28))
    model.kernel = kernel
    x, y = torch.randint(0, 28, (8, 35)), torch.randint(0, 28, (8, 35))
    results = []
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        if fused:
            loss, _ = model(x, model.begin_state(8), y)
        else:
            logits, _ = model(x, model.begin_state(8))
            loss = torch.nn.functional.cross_entropy(logits, y.T.reshape(-1))
        loss.backward()
        results.append([loss.detach(), *(p.grad for p in model.parameters())])
    for fused, separate in zip(*results, strict=True):
        torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("max_norm", [1.0, 1e6])  # clipping at work, and not
def test_clipping_and_sgd_in_one_call(kernel: native.TanhRecurrenceKernel, max_norm: float) -> None:
    """``clip_sgd`` against the framework's way (``clip_gradients``, then ``SGD.step``): the
    norm, the clipped gradients and the new parameters, to round-off; autograd sees the
    parameters change; a gradient it cannot take leaves everything as it was."""
    torch.manual_seed(8)
    shapes = [(28, 256), (256, 256), (256,), (256,), (28, 256), (28,), (3,)]
    params = [torch.randn(shape) for shape in shapes]
    grads = [torch.randn(shape) * 0.3 for shape in shapes]

    def leaves() -> list[torch.Tensor]:
        out = []
        for p, g in zip(params, grads, strict=True):
            leaf = p.clone().requires_grad_(True)
            leaf.grad = g.clone()
            out.append(leaf)
        return out

    ours, theirs = leaves(), leaves()
    versions = [p._version for p in ours]
    norm = kernel.clip_sgd(ours, max_norm, lr=0.5)
    expected = clip_gradients(theirs, max_norm)
    SGD(theirs, lr=0.5).step()
    assert norm is not None
    torch.testing.assert_close(norm, expected)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.grad, b.grad)
        torch.testing.assert_close(a.detach(), b.detach())
    assert all(p._version > v for p, v in zip(ours, versions, strict=True))
    poisoned = leaves()  # a NaN gradient spreads to every parameter, as with the framework
    poisoned[2].grad[0] = float("nan")
    assert kernel.clip_sgd(poisoned, max_norm, lr=0.5).isnan()  # type: ignore[union-attr]
    assert all(p.isnan().all() for p in poisoned)
    strided = leaves()
    strided[1].grad = strided[1].grad.t()
    before = [p.detach().clone() for p in strided]
    assert kernel.clip_sgd(strided, max_norm, lr=0.5) is None
    assert all(torch.equal(p.detach(), b) for p, b in zip(strided, before, strict=True))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_averaging_over_ranks_in_the_clipping_call(
    kernel: native.TanhRecurrenceKernel, world: int
) -> None:
    """``average_clip_sgd`` on every rank's gradients (rows of shared slots, padded) computes
    what DDP's pre-divided all-reduce in rank order and then ``clip_sgd`` compute, bit for bit:
    the norm, the averaged and clipped gradients, the new parameters."""
    torch.manual_seed(9)
    shapes = [(28, 256), (256, 256), (256,), (256,), (28, 256), (28,), (3,)]
    total = sum(torch.Size(shape).numel() for shape in shapes)
    slots = torch.randn(world, total + 5) * 0.3
    params = [torch.randn(shape) for shape in shapes]

    def leaves() -> list[torch.Tensor]:
        return [p.clone().requires_grad_(True) for p in params]

    ours, theirs = leaves(), leaves()
    sizes = [p.numel() for p in params]
    averaged = torch.div(slots[0, :total], world)  # DDP's hook: divide, then sum in rank order
    for rank in range(1, world):
        averaged += torch.div(slots[rank, :total], world)
    for leaf, grad in zip(theirs, averaged.split(sizes), strict=True):
        leaf.grad = grad.view_as(leaf).clone()
    for leaf, view in zip(ours, torch.zeros(total).split(sizes), strict=True):
        leaf.grad = view.view_as(leaf)  # one flat buffer, as CompiledStep's
    norm = kernel.average_clip_sgd(slots, ours, 0.5, lr=0.5)
    expected = kernel.clip_sgd(theirs, 0.5, lr=0.5)
    assert expected is not None and torch.equal(norm, expected)
    for a, b in zip(ours, theirs, strict=True):
        assert a.grad is not None and b.grad is not None
        assert torch.equal(a.grad, b.grad) and torch.equal(a.detach(), b.detach())
    with pytest.raises(ValueError, match="slots must be float32 CPU rows"):
        kernel.average_clip_sgd(slots[:, : total - 1], ours, 0.5, lr=0.5)


@pytest.mark.parametrize(
    "vocab, hidden, rows, threads",
    [(28, 256, 32, 2), (5, 37, 3, 1), (70, 64, 9, 3)],  # 70: b_ih's sum in two levels
)
def test_compiled_step_computes_the_eager_steps_bits(
    kernel: native.TanhRecurrenceKernel, vocab: int, hidden: int, rows: int, threads: int
) -> None:
    """The whole step in one kernel call, outside autograd, against :class:`EagerStep` on the
    same kernel (autograd through the compiled layers): every step's loss, gradient norm and
    carried state, and the gradients and weights after it, bit for bit, over 12 steps with
    clipping at work in some of them."""

    def model() -> RNNLM:
        torch.manual_seed(3)
        module = RNNLM(ModelConfig(vocab, num_hiddens=hidden))
        module.kernel = kernel
        return module

    eager_model, compiled_model = model(), model()
    eager = EagerStep(eager_model, eager_model, SGD(eager_model.parameters(), 1.0), 0.05)
    compiled = default_step(
        compiled_model, compiled_model, SGD(compiled_model.parameters(), 1.0), 0.05
    )
    assert isinstance(compiled, CompiledStep)
    generator = torch.Generator().manual_seed(4)
    states = [eager_model.begin_state(rows), compiled_model.begin_state(rows)]
    clipped = 0
    try:
        kernel.threads = threads
        for _ in range(12):
            x, y = (torch.randint(0, vocab, (rows, 35), generator=generator) for _ in range(2))
            (loss_a, norm_a, states[0]), (loss_b, norm_b, states[1]) = (
                step(x, y, state.detach())
                for step, state in zip((eager, compiled), states, strict=True)
            )
            assert torch.equal(loss_a, loss_b) and torch.equal(norm_a, norm_b)
            assert torch.equal(states[0], states[1])
            pairs = zip(eager_model.named_parameters(), compiled_model.parameters(), strict=True)
            for (name, a), b in pairs:
                assert torch.equal(a.grad, b.grad), f"gradient of {name}"  # type: ignore[arg-type]
                assert torch.equal(a.detach(), b.detach()), name
            clipped += bool(norm_a > 0.05)
    finally:
        kernel.threads = None
    assert clipped > 0


def test_compiled_step_refuses_ids_and_targets_outside_the_vocabulary(
    kernel: native.TanhRecurrenceKernel,
) -> None:
    """Refused before anything is written: weights and state stay as they were."""
    torch.manual_seed(5)
    module = RNNLM(ModelConfig(28, num_hiddens=16))
    module.kernel = kernel
    step = CompiledStep(module, SGD(module.parameters(), 1.0), 1.0)
    before = [p.detach().clone() for p in module.parameters()]
    good = torch.randint(0, 28, (4, 6))
    bad = good.clone()
    bad[2, 3] = 28
    with pytest.raises(IndexError, match=r"an id is outside \[0, 28\)"):
        step(bad, good, module.begin_state(4))
    with pytest.raises(IndexError, match=r"a target is outside \[0, 28\)"):
        step(good, bad, module.begin_state(4))
    assert all(torch.equal(p, b) for p, b in zip(module.parameters(), before, strict=True))
    two_layers = RNNLM(ModelConfig(28, num_hiddens=16, num_layers=2))
    two_layers.kernel = kernel
    assert not CompiledStep.can_run(two_layers, SGD(two_layers.parameters(), 1.0))
    assert isinstance(
        default_step(two_layers, two_layers, SGD(two_layers.parameters(), 1.0), 1.0), EagerStep
    )


def test_prepared_calls_refuse_moved_storage(kernel: native.TanhRecurrenceKernel) -> None:
    """The calls set up once for a step write through the pointers they gathered: a parameter
    or gradient given new storage since is refused, with nothing written."""
    torch.manual_seed(6)
    module = RNNLM(ModelConfig(28, num_hiddens=16))
    module.kernel = kernel
    step = CompiledStep(module, SGD(module.parameters(), 1.0), 1.0)
    x = torch.randint(0, 28, (4, 6))
    step(x, x, module.begin_state(4))
    weight = module.linear.weight
    weight.data = weight.data.clone()  # the old storage may be freed and reused
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match="storage moved"):
        step(x, x, module.begin_state(4))
    assert all(torch.equal(p, b) for p, b in zip(module.parameters(), before, strict=True))
    clip = native.ClipSGDCall.of(kernel, list(module.parameters()))
    assert clip is not None
    weight.grad = weight.grad.clone()  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="storage moved"):
        clip.clip_sgd(1.0, 0.5)


def test_lookup_inside_the_recurrence(kernel: native.TanhRecurrenceKernel) -> None:
    """Given ids, the kernel looks the first layer's inputs up in the table itself: the same
    bits as looking them up first (``F.embedding``) for the outputs and every other gradient,
    and the table's gradient as the framework's embedding backward computes it, to round-off."""
    torch.manual_seed(7)
    steps, batch, vocab, hidden = 35, 16, 28, 64
    ids = torch.randint(0, vocab, (steps, batch))
    table, h0 = torch.randn(vocab, hidden), torch.randn(batch, hidden) * 0.5
    w_hh, b_hh = torch.randn(hidden, hidden) * hidden**-0.5, torch.randn(hidden) * 0.1
    grad_out = torch.randn(steps, batch, hidden)
    results = []
    for lookup_inside in (True, False):
        leaves = [t.clone().requires_grad_(True) for t in (table, h0, w_hh, b_hh)]
        tab, h, w, b = leaves
        if lookup_inside:
            out, last = CompiledTanhRecurrence.apply(kernel, tab, h, w, b, ids)
        else:
            pre = torch.nn.functional.embedding(ids, tab)
            out, last = CompiledTanhRecurrence.apply(kernel, pre, h, w, b)
        (out * grad_out).sum().add(last.sum()).backward()
        results.append([out.detach(), last.detach(), *(t.grad for t in leaves)])
    names = ["outputs", "last", "d table", "d h0", "d w_hh", "d b_hh"]
    for name, inside, outside in zip(names, *results, strict=True):
        if name == "d table":
            torch.testing.assert_close(inside, outside, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(inside, outside), name
    try:  # rows split over 3 threads, the sums' columns too: the same bits
        kernel.threads = 3
        leaves = [t.clone().requires_grad_(True) for t in (table, h0, w_hh, b_hh)]
        out3, last3 = CompiledTanhRecurrence.apply(kernel, *leaves, ids)
        (out3 * grad_out).sum().add(last3.sum()).backward()
    finally:
        kernel.threads = None
    threaded = [out3, last3, *(t.grad for t in leaves)]
    for name, three, one in zip(names, threaded, results[0], strict=True):
        assert torch.equal(three, one), name
    beyond = ids.clone()
    beyond[3, 4] = vocab
    with pytest.raises(IndexError, match=r"outside \[0, 28\)"):
        CompiledTanhRecurrence.apply(kernel, table, h0, w_hh, b_hh, beyond)


def test_capability_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(native.ISA_ENV, raising=False)
    assert native.chosen_isa() == ISAS[0]  # the widest this CPU has
    monkeypatch.setenv(native.ISA_ENV, " AVX2 ")
    assert native.chosen_isa() == "avx2"
    for wrong in ["sse4", *(isa for isa in native.ISAS if isa not in ISAS)]:
        monkeypatch.setenv(native.ISA_ENV, wrong)
        with pytest.raises(native.UnsupportedCapability, match=", ".join(ISAS)):
            native.chosen_isa()


def test_unknown_capability_stops_the_job(corpus_path: Path, tmp_path: Path) -> None:
    """A capability that cannot run is a user error: one line naming the variable and what
    this CPU has, whatever --cpu-kernel (auto here) would otherwise fall back to."""
    out = tmp_path / "out"
    proc = run_job(
        ["--corpus", str(corpus_path), "--output-dir", str(out), "--epochs", "1", "--no-tracking"],
        env=job_env(RNNLM_CPU_CAPABILITY="sse4"),
        cwd=tmp_path,
    )
    assert_refused(proc, native.ISA_ENV, "'sse4'", ", ".join(ISAS), out=out)


def test_built_once_per_source_version(tmp_path: Path) -> None:
    first = native.build(tmp_path, "avx2")
    assert first.name == native.library_name("avx2") and first.exists()
    assert native.library_name("avx2").startswith("tanh_recurrence-avx2-")
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no partial file left


@pytest.mark.parametrize(
    "flags", [["--cell", "gru"], ["--num-steps", "1"]], ids=["other-cell", "one-step"]
)
def test_compiled_refused_where_it_would_not_run(
    corpus_path: Path, tmp_path: Path, flags: list[str]
) -> None:
    out = tmp_path / "out"
    proc = run_job(
        ["--corpus", str(corpus_path), "--output-dir", str(out), "--epochs", "1", *flags,
         "--cpu-kernel", "compiled", "--no-tracking"],
        cwd=tmp_path,
    )  # fmt: skip
    assert_refused(proc, "--cpu-kernel", " ".join(flags), "auto or torch", out=out)


@pytest.mark.skipif(
    native.SOURCE.with_name(native.library_name(native.chosen_isa())).exists(),
    reason="a build ships next to the source (python -m rnnlm.native): no compiler is needed",
)
def test_without_a_compiler(corpus_path: Path, tmp_path: Path) -> None:
    """``compiled`` stops with one line; ``auto`` warns and trains on the framework's ops."""
    env = job_env(CC=str(tmp_path / "no-such-cc"), RNNLM_CACHE_DIR=str(tmp_path / "cache"))
    common = ["--corpus", str(corpus_path), "--epochs", "2", "--no-tracking"]
    out = tmp_path / "refused"
    proc = run_job([*common, "--output-dir", str(out), "--cpu-kernel", "compiled"], env=env)
    assert_refused(proc, "--cpu-kernel", "no C compiler", "auto or torch", out=out)

    out = tmp_path / "auto"
    proc = run_job([*common, "--output-dir", str(out)], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "recurrence on the framework's operations" in proc.stderr
    assert "no C compiler" in proc.stderr
    assert len(read_train_info(out)["perplexity_by_epoch"]) == 2
