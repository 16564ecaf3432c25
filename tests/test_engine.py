"""The engine's semantics, fixed once for every engine: results you can train through,
grad modes, empty batches, threads, the auto rule's seams, and `explain`."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchcurv
from torchcurv.testing import assert_trees_close

D = torch.float64
HESSIAN_ENGINES = ["structured", "fwd-over-rev", "rev-over-rev", "rev-over-fwd", "fwd-over-fwd"]


def mlp(width: int = 5, outputs: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, width),
        nn.Tanh(),
        nn.Linear(width, width),
        nn.Softplus(),
        nn.Linear(width, outputs),
    ).to(D)


def loop_input_hessians(
    model: nn.Module, X: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Autograd's double backward, one sample and one row at a time, graph kept."""
    hessians = []
    for x in X:
        x = x.detach().requires_grad_(True)
        y = objective(model(x.unsqueeze(0))[0])
        (g,) = torch.autograd.grad(y, x, create_graph=True)
        rows = [torch.autograd.grad(g[r], x, create_graph=True)[0] for r in range(x.numel())]
        hessians.append(torch.stack(rows))
    return torch.stack(hessians)


# --------------------------------------------------------------------------------------
# results you can train through
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", HESSIAN_ENGINES)
@pytest.mark.parametrize("chunk", [None, (2, 1, 2)], ids=["whole", "chunked"])
def test_gradients_of_input_hessians_equal_the_loop(mode: str, chunk: Any) -> None:
    model, X = mlp(), torch.randn(4, 3, dtype=D)
    weights = torch.randn(4, 3, 3, dtype=D)
    H = torchcurv.per_sample_hessian(
        model, X, output=1, mode=mode, chunk_size=chunk, create_graph=True
    )
    params = list(model.parameters())
    ours = torch.autograd.grad((H * weights).sum(), params, materialize_grads=True)
    expected_H = loop_input_hessians(model, X, lambda out: out[1])
    expected = torch.autograd.grad((expected_H * weights).sum(), params, materialize_grads=True)
    assert_trees_close(H.detach(), expected_H.detach())
    assert_trees_close(list(ours), list(expected))


@pytest.mark.parametrize("mode", HESSIAN_ENGINES)
def test_gradients_flow_to_inputs_that_require_grad(mode: str) -> None:
    model = mlp(outputs=1)
    X = torch.randn(3, 3, dtype=D, requires_grad=True)
    H = torchcurv.per_sample_hessian(model, X, mode=mode, create_graph=True)
    (ours,) = torch.autograd.grad(H.pow(2).sum(), X)
    X2 = X.detach().requires_grad_(True)
    hessians = []
    for i in range(3):
        y = model(X2[i : i + 1])[0, 0]
        (g,) = torch.autograd.grad(y, X2, create_graph=True)
        rows = [torch.autograd.grad(g[i, r], X2, create_graph=True)[0][i] for r in range(3)]
        hessians.append(torch.stack(rows))
    (expected,) = torch.autograd.grad(torch.stack(hessians).pow(2).sum(), X2)
    assert_trees_close(ours, expected)


def test_gradients_of_parameter_hessians_equal_the_loop() -> None:
    model, X = mlp(width=3), torch.randn(3, 3, dtype=D)
    y = torch.tensor([0, 1, 1])
    H = torchcurv.per_sample_hessian(
        model, X, wrt="params", params="4.*", loss=F.cross_entropy, targets=y, create_graph=True
    )
    ours = torch.autograd.grad(H["4.weight"]["4.weight"].sum(), model[0].weight)[0]
    # the loop: last-layer Hessians by double backward, kept differentiable in model[0]
    total = torch.zeros((), dtype=D)
    for i in range(3):
        W = model[4].weight
        loss = F.cross_entropy(model(X[i : i + 1]), y[i : i + 1])
        (g,) = torch.autograd.grad(loss, W, create_graph=True)
        for r in range(W.numel()):
            total = total + torch.autograd.grad(g.reshape(-1)[r], W, create_graph=True)[0].sum()
    expected = torch.autograd.grad(total, model[0].weight)[0]
    assert_trees_close(ours, expected)


@pytest.mark.parametrize("mode", ["structured", "fwd-over-rev"])
def test_default_results_are_detached_and_record_nothing(mode: str) -> None:
    model, X = mlp(), torch.randn(4, 3, dtype=D, requires_grad=True)
    H = torchcurv.per_sample_hessian(model, X, output=0, mode=mode)
    assert not H.requires_grad
    assert H.grad_fn is None
    J = torchcurv.per_sample_jacobian(model, X)
    assert not J.requires_grad


@pytest.mark.parametrize(
    "context", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"]
)
@pytest.mark.parametrize("mode", ["structured", "fwd-over-rev", "rev-over-rev"])
def test_works_under_no_grad_and_inference_mode(context: Any, mode: str) -> None:
    model = mlp()
    X = torch.randn(4, 3, dtype=D)
    expected = torchcurv.per_sample_hessian(model, X, output=1, mode=mode)
    with context():
        X_inner = X.clone()  # an inference tensor under inference_mode
        H = torchcurv.per_sample_hessian(model, X_inner, output=1, mode=mode)
        J = torchcurv.per_sample_jacobian(model, X_inner)
    assert_trees_close(H, expected)
    assert_trees_close(J, torchcurv.per_sample_jacobian(model, X))


@pytest.mark.parametrize(
    "context", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"]
)
def test_create_graph_without_grad_mode_is_a_clear_error(context: Any) -> None:
    model, X = mlp(), torch.randn(2, 3, dtype=D)
    with (
        context(),
        pytest.raises(
            torchcurv.TorchcurvError,
            match=r"per_sample_hessian: create_graph=True needs grad mode",
        ),
    ):
        torchcurv.per_sample_hessian(model, X, create_graph=True)


def test_create_graph_must_be_a_bool() -> None:
    with pytest.raises(torchcurv.TorchcurvError, match=r"create_graph must be a bool"):
        torchcurv.per_sample_hessian(mlp(), torch.randn(2, 3, dtype=D), create_graph="yes")  # type: ignore[arg-type]


def test_create_graph_leaves_the_module_as_it_was() -> None:
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    H = torchcurv.per_sample_hessian(model, torch.randn(2, 3, dtype=D), create_graph=True)
    H.sum().backward()
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])
    assert model[0].weight.grad is not None  # the gradient reached the module


# --------------------------------------------------------------------------------------
# empty batches, coupled samples
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "structured", "fwd-over-rev"])
def test_an_empty_batch_gives_empty_results_of_the_right_shape(mode: str) -> None:
    model = mlp()
    X = torch.zeros(0, 3, dtype=D)
    assert torchcurv.per_sample_hessian(model, X, mode=mode).shape == (0, 2, 3, 3)
    H = torchcurv.per_sample_hessian(model, X, output=0, mode=mode, chunk_size=(None, 1, 1))
    assert H.shape == (0, 3, 3)


def test_empty_batches_for_parameters_jacobians_and_per_sample() -> None:
    model = mlp()
    X, y = torch.zeros(0, 3, dtype=D), torch.zeros(0, dtype=torch.long)
    H = torchcurv.per_sample_hessian(
        model, X, wrt="params", params="4.bias", loss=F.cross_entropy, targets=y
    )
    assert H["4.bias"]["4.bias"].shape == (0, 2, 2)
    assert torchcurv.per_sample_jacobian(model, X).shape == (0, 2, 3)
    f = torchcurv.per_sample(torchcurv.hessian(lambda x: (x**3).sum()), chunk_size="auto")
    assert f(X).shape == (0, 3, 3)


def test_batchnorm_without_running_statistics_is_refused_in_eval_mode() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)).to(D)
    model.eval()
    with pytest.raises(torchcurv.UnsupportedModuleError, match=r"track_running_stats=False"):
        torchcurv.per_sample_hessian(model, torch.randn(4, 3, dtype=D))


# --------------------------------------------------------------------------------------
# threads
# --------------------------------------------------------------------------------------


def test_four_threads_on_two_models_give_correct_results() -> None:
    torch.manual_seed(1)
    models = [
        nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)).to(D),
        nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 2)).to(D),
    ]
    X = torch.randn(6, 4, dtype=D)
    expected = [torchcurv.per_sample_hessian(m, X, mode="fwd-over-rev") for m in models]
    failures: list[str] = []

    def work(k: int) -> None:
        for _ in range(5):
            try:
                got = torchcurv.per_sample_hessian(models[k % 2], X, mode="fwd-over-rev")
                if not torch.allclose(got, expected[k % 2]):
                    failures.append(f"thread {k}: wrong result")
            except Exception as error:
                failures.append(f"thread {k}: {error!r}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


# --------------------------------------------------------------------------------------
# the auto rule's seams
# --------------------------------------------------------------------------------------


def test_auto_on_a_per_sample_input_with_two_dims_selects_like_the_generic_engine() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 4).to(D)
    X = torch.randn(5, 6, 3, dtype=D)
    H = torchcurv.per_sample_hessian(model, X, output=1)
    assert H.shape == (5, 4, 6, 3, 6, 3)
    assert_trees_close(H, torchcurv.per_sample_hessian(model, X, output=1, mode="fwd-over-rev"))
    with pytest.raises(torchcurv.UnsupportedModuleError, match=r"one-dimensional per-sample"):
        torchcurv.per_sample_hessian(model, X, output=1, mode="structured")


def test_global_module_hooks_are_honoured_by_auto_and_refused_by_structured() -> None:
    model, X = mlp(), torch.randn(3, 3, dtype=D)

    def scale(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor | None:
        return out * 1.5 if isinstance(module, nn.Tanh) else None

    handle = nn.modules.module.register_module_forward_hook(scale)
    try:
        hooked = torchcurv.per_sample_hessian(model, X, output=0)
        expected = loop_input_hessians(model, X, lambda out: out[0]).detach()
        with pytest.raises(torchcurv.UnsupportedModuleError, match=r"global module hooks"):
            torchcurv.per_sample_hessian(model, X, output=0, mode="structured")
    finally:
        handle.remove()
    assert_trees_close(hooked, expected)


@pytest.mark.parametrize("mode", ["auto", "structured", "fwd-over-rev"])
def test_bad_targets_are_reported_under_the_public_name(mode: str) -> None:
    model, X = mlp(), torch.randn(4, 3, dtype=D)
    with pytest.raises(torchcurv.TorchcurvError, match=r"^per_sample_hessian: .*targets"):
        torchcurv.per_sample_hessian(
            model, X, loss=F.cross_entropy, targets=torch.zeros(4, 2, dtype=torch.long), mode=mode
        )


# --------------------------------------------------------------------------------------
# explain
# --------------------------------------------------------------------------------------


def test_explain_names_the_engine_and_plan_without_computing() -> None:
    model, X = mlp(), torch.randn(8, 3, dtype=D)
    d = torchcurv.explain(torchcurv.per_sample_hessian, model, X, output=0)
    assert d.engine == "structured"
    assert "predicted faster" in d.why_engine
    assert d.predicted_peak is not None
    assert d.budget is not None
    assert d.predicted_peak <= d.budget
    d = torchcurv.explain(
        torchcurv.per_sample_hessian,
        model,
        X,
        wrt="params",
        loss=F.cross_entropy,
        targets=torch.zeros(8, dtype=torch.long),
        memory_budget="64MiB",
    )
    assert d.engine == "fwd-over-rev"
    assert "does not apply" in d.why_engine
    assert d.basis_sizes == (1, sum(p.numel() for p in model.parameters()))
    assert "per_sample_hessian: engine 'fwd-over-rev'" in str(d)
    d = torchcurv.explain(torchcurv.per_sample_jacobian, model, X, chunk_size=(4, 1))
    assert (d.engine, d.batch_chunk, d.basis_chunks, d.predicted_peak) == ("rev", 4, (1,), None)


def test_explain_refuses_other_functions_and_unknown_options() -> None:
    model, X = mlp(), torch.randn(2, 3, dtype=D)
    with pytest.raises(torchcurv.TorchcurvError, match=r"explain: function must be"):
        torchcurv.explain(torchcurv.hessian, model, X)
    with pytest.raises(torchcurv.TorchcurvError, match=r"explain: options has keywords"):
        torchcurv.explain(torchcurv.per_sample_hessian, model, X, chunk=3)


# --------------------------------------------------------------------------------------
# correct where torch.func is not
# --------------------------------------------------------------------------------------

MODES = ["fwd-over-rev", "rev-over-rev", "rev-over-fwd", "fwd-over-fwd"]


def layer_norm_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 3)).to(D)


@pytest.mark.parametrize("mode", MODES)
def test_layer_norm_parameter_hessians_equal_double_backward(mode: str) -> None:
    # torch.func.hessian gets H["1.weight"]["0.bias"] wrong here (pytorch/pytorch#196700)
    model, X, y = layer_norm_model(), torch.randn(3, 4, dtype=D), torch.tensor([0, 2, 1])
    H = torchcurv.per_sample_hessian(
        model, X, wrt="params", loss=F.cross_entropy, targets=y, mode=mode
    )
    fn, params = torchcurv.functional(model)
    for i in range(3):
        expected = torchcurv.reference.hessian(
            lambda p, i=i: F.cross_entropy(fn(p, X[i : i + 1]), y[i : i + 1])
        )(params)
        got = {a: {b: block[i] for b, block in row.items()} for a, row in H.items()}
        assert_trees_close(got, expected)


@pytest.mark.parametrize("mode", MODES)
def test_function_level_hessians_of_layer_norm_equal_double_backward(mode: str) -> None:
    torch.manual_seed(1)
    x, w = torch.randn(5, dtype=D), torch.randn(5, dtype=D)
    c = torch.randn(5, dtype=D)

    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (c * F.layer_norm(x, (5,), w)).sum()

    H = torchcurv.hessian(f, argnums=(0, 1), mode=mode)(x, w)
    assert_trees_close(H, torchcurv.reference.hessian(f, argnums=(0, 1))(x, w))


def test_auto_falls_back_when_the_structured_engine_cannot_use_the_targets() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 3)).to(D)
    X, y = torch.randn(5, 4, dtype=D), torch.tensor([0, -100, 2, 1, -100])  # ignore_index
    decision = torchcurv.explain(
        torchcurv.per_sample_hessian, model, X, loss=F.cross_entropy, targets=y
    )
    assert decision.engine == "fwd-over-rev"
    assert "values in [-100, 2]" in decision.why_engine
    H = torchcurv.per_sample_hessian(model, X, loss=F.cross_entropy, targets=y)
    for i in range(5):
        expected = torch.autograd.functional.hessian(
            lambda x, i=i: F.cross_entropy(model(x.unsqueeze(0)), y[i : i + 1]), X[i]
        )
        assert_trees_close(H[i], expected)
    assert not H[1].any()  # an ignored sample has no curvature


def test_random_operations_in_a_forward_are_reported_under_the_public_name() -> None:
    class Noisy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (F.dropout(x, 0.5, training=True) ** 2).sum(-1)

    with pytest.raises(
        torchcurv.TorchcurvError,
        match=r"^per_sample_hessian\(Noisy\): .*random operation.*'different'",
    ):
        torchcurv.per_sample_hessian(Noisy(), torch.randn(3, 4, dtype=D), chunk_size=None)


def test_messages_for_mismatched_dtypes_batch_sizes_and_list_chunks() -> None:
    model = nn.Linear(3, 1)
    with pytest.raises(torchcurv.TorchcurvError, match=r"inputs\.to\(torch\.float32\)"):
        torchcurv.per_sample_hessian(model, torch.randn(2, 3, dtype=D))

    class Two(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return (a * b).sum(-1)

    with pytest.raises(torchcurv.TorchcurvError, match=r"must all have the same batch size"):
        torchcurv.per_sample_hessian(Two(), (torch.randn(2, 3), torch.randn(3, 3)))
    with pytest.raises(
        torchcurv.TorchcurvError, match=r"Pass a tuple, e\.g\. chunk_size=\(2, 2, 2\)"
    ):
        torchcurv.per_sample_hessian(model, torch.randn(2, 3), chunk_size=[2, 2, 2])  # type: ignore[arg-type]
