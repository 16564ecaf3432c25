"""Module-level transforms against independent single-sample loops, in float64."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

import torchcurv
from module_cases import CASES, Case, D, Tied, TupleOutput, Untied, cnn, single_objective
from torchcurv import reference
from torchcurv.testing import assert_per_sample_matches_loop, assert_symmetric, assert_trees_close

CASE_IDS = [c.name for c in CASES]


def sample(tree: Any, i: int) -> Any:
    return tree_map(lambda t: t[i], tree)


def loop_oracle(
    model: nn.Module,
    case: Case,
    xs: tuple[torch.Tensor, ...],
    targets: Any,
    *,
    wrt: str,
    output: Any = None,
    loss: Any = None,
    params: Any = None,
    order: int = 2,
) -> Any:
    """Per-sample derivatives by a Python loop over samples and the loop oracle."""
    g = single_objective(model, case, wrt=wrt, output=output, loss=loss, params=params)
    named = dict(model.named_parameters())
    p = {n: named[n].detach() for n in g.chosen}  # type: ignore[attr-defined]
    derivative = reference.hessian if order == 2 else reference.jacobian
    results = []
    for i in range(case.batch):
        xi = tuple(x[i] for x in xs)
        x_diff = xi[0] if len(xi) == 1 else xi
        diff = (
            {"inputs": x_diff, "params": p}
            if wrt == "both"
            else (x_diff if wrt == "inputs" else p)
        )
        target = None if targets is None else targets[i]
        results.append(derivative(lambda d, xi=xi, t=target: g(d, xi, t))(diff))
    flat = [torch.utils._pytree.tree_flatten(r)[0] for r in results]
    spec = torch.utils._pytree.tree_flatten(results[0])[1]
    return torch.utils._pytree.tree_unflatten(
        [torch.stack(z) for z in zip(*flat, strict=False)], spec
    )


def call(fn: Any, case: Case, xs: tuple[torch.Tensor, ...], **kw: Any) -> Any:
    model = case.model()
    inputs = xs[0] if len(xs) == 1 else xs
    return fn(model, inputs, kwargs=case.kwargs, **kw)


@pytest.mark.parametrize("wrt", ["inputs", "params", "both"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_output_hessian_matches_loop_oracle(case: Case, wrt: str) -> None:
    xs = case.inputs()
    H = call(torchcurv.per_sample_hessian, case, xs, wrt=wrt, output=1)
    expected = loop_oracle(case.model(), case, xs, None, wrt=wrt, output=1)
    assert_trees_close(H, expected)


@pytest.mark.parametrize("wrt", ["inputs", "params", "both"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_loss_hessian_matches_loop_oracle_and_is_symmetric(case: Case, wrt: str) -> None:
    xs, y = case.inputs(), case.targets()
    H = call(
        torchcurv.per_sample_hessian,
        case,
        xs,
        wrt=wrt,
        loss=F.cross_entropy,
        targets=y,
        chunk_size=(2, None, 3),
    )
    expected = loop_oracle(case.model(), case, xs, y, wrt=wrt, loss=F.cross_entropy)
    assert_trees_close(H, expected)
    if wrt != "both":  # "both" is checked as a whole below, with to_matrix
        assert_symmetric(H, batch_dims=1) if wrt == "params" else None
    M = torchcurv.to_matrix(H, batch_dims=1)
    assert_symmetric(M, batch_dims=1)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_per_sample_jacobian_matches_loop_oracle(case: Case) -> None:
    xs, y = case.inputs(), case.targets()
    for wrt in ["inputs", "params", "both"]:
        J = call(torchcurv.per_sample_jacobian, case, xs, wrt=wrt)
        assert_trees_close(J, loop_oracle(case.model(), case, xs, None, wrt=wrt, order=1))
    grads = call(
        torchcurv.per_sample_jacobian,
        case,
        xs,
        wrt="params",
        loss=F.cross_entropy,
        targets=y,
        mode="fwd",
        chunk_size=(1, 2),
    )
    assert_trees_close(
        grads, loop_oracle(case.model(), case, xs, y, wrt="params", loss=F.cross_entropy, order=1)
    )


def test_input_hessian_matches_autograd_functional() -> None:
    case = CASES[0]
    model, X = case.model(), case.inputs()[0]
    H = torchcurv.per_sample_hessian(model, X, output=2, mode="rev-over-fwd")
    for i in range(case.batch):
        expected = torch.autograd.functional.hessian(lambda x: model(x[None])[0, 2], X[i])
        assert_trees_close(H[i], expected)


def test_parameter_hessian_matches_autograd_functional() -> None:
    case = CASES[0]
    model, X, y = case.model(), case.inputs()[0], case.targets()
    names = [n for n, _ in model.named_parameters()]
    H = torchcurv.per_sample_hessian(model, X, wrt="params", loss=F.cross_entropy, targets=y)
    values = tuple(p.detach() for p in model.parameters())
    for i in range(case.batch):

        def loss(*ps: torch.Tensor, i: int = i) -> torch.Tensor:
            out = torch.func.functional_call(
                model, dict(zip(names, ps, strict=False)), (X[i : i + 1],)
            )
            return F.cross_entropy(out, y[i : i + 1])

        expected = torch.autograd.functional.hessian(loss, values)
        for a, na in enumerate(names):
            for b, nb in enumerate(names):
                assert_trees_close(H[na][nb][i], expected[a][b])


@pytest.mark.parametrize(
    "selection",
    [["2.*"], "*.bias", ["0.weight", "4.bias"], lambda n, p: p.dim() == 1],
    ids=["glob-list", "glob", "names", "predicate"],
)
def test_parameter_subsets(selection: Any) -> None:
    case = CASES[0]
    xs, y = case.inputs(), case.targets()
    model = case.model()
    H = torchcurv.per_sample_hessian(
        model, xs[0], wrt="params", params=selection, loss=F.cross_entropy, targets=y
    )
    _, chosen = torchcurv.functional(model, selection)
    assert list(H) == list(chosen)
    expected = loop_oracle(
        model, case, xs, y, wrt="params", loss=F.cross_entropy, params=list(chosen)
    )
    assert_trees_close(H, expected)


def test_frozen_parameters_are_not_selected_by_default() -> None:
    model = CASES[4].model()
    _, params = torchcurv.functional(model)
    assert "0.weight" not in params
    assert "0.bias" in params


def test_tied_weights_equal_untied_blocks_summed() -> None:
    torch.manual_seed(2)
    tied = Tied().to(D).eval()
    untied = Untied(tied).to(D).eval()
    X, y = torch.randn(3, 3, dtype=D), torch.randint(0, 2, (3,))
    _, tied_params = torchcurv.functional(tied)
    assert "second.weight" not in tied_params  # one entry for the shared tensor
    Ht = torchcurv.per_sample_hessian(tied, X, wrt="params", loss=F.cross_entropy, targets=y)
    Hu = torchcurv.per_sample_hessian(untied, X, wrt="params", loss=F.cross_entropy, targets=y)
    f, s = "first.weight", "second.weight"
    assert_trees_close(Ht[f][f], Hu[f][f] + Hu[f][s] + Hu[s][f] + Hu[s][s])
    assert_trees_close(Ht[f]["head.bias"], Hu[f]["head.bias"] + Hu[s]["head.bias"])
    gt = torchcurv.per_sample_jacobian(tied, X, wrt="params", loss=F.cross_entropy, targets=y)
    gu = torchcurv.per_sample_jacobian(untied, X, wrt="params", loss=F.cross_entropy, targets=y)
    assert_trees_close(gt[f], gu[f] + gu[s])


def test_seed_case_mnist_cnn_class_2_logit_is_784_by_784() -> None:
    torch.manual_seed(0)
    model = cnn().to(D).eval()
    x = torch.randn(1, 1, 28, 28, dtype=D)
    H = torchcurv.per_sample_hessian(model, x, output=2)
    assert H.shape == (1, 1, 28, 28, 1, 28, 28)
    M = torchcurv.to_matrix(H, like=x[0], batch_dims=1)[0]
    assert M.shape == (784, 784)
    single = torchcurv.hessian(lambda x: model(x)[0, 2])(x)  # 1x1x28x28x1x1x28x28
    assert torchcurv.to_matrix(single).shape == (784, 784)
    expected = reference.hessian(lambda x: model(x)[0, 2])(x)
    assert_trees_close(torchcurv.to_matrix(single), torchcurv.to_matrix(expected))
    assert_trees_close(M, torchcurv.to_matrix(expected))
    assert_symmetric(M)


OUTPUTS = [
    (2, lambda out: out[2]),
    ((1,), lambda out: out[1]),
    (slice(0, 2), lambda out: out[0:2]),
    (lambda out: out.sum(), lambda out: out.sum()),
]


@pytest.mark.parametrize(("output", "select"), OUTPUTS, ids=["int", "tuple", "slice", "callable"])
def test_output_selection(output: Any, select: Any) -> None:
    case = CASES[0]
    model, X = case.model(), case.inputs()[0]
    H = torchcurv.per_sample_hessian(model, X, output=output)
    expected = torch.stack([reference.hessian(lambda x: select(model(x[None])[0]))(x) for x in X])
    assert_trees_close(H, expected)


def test_tuple_output_module_selects_an_element() -> None:
    model = TupleOutput().to(D).eval()
    X = torch.randn(3, 3, dtype=D)
    H = torchcurv.per_sample_hessian(model, X, output=0)
    expected = torch.stack([reference.hessian(lambda x: model(x[None])[0][0])(x) for x in X])
    assert_trees_close(H, expected)


def test_batch_hessian_is_the_mean_of_per_sample_loss_hessians() -> None:
    case = CASES[0]
    model, X, y = case.model(), case.inputs()[0], case.targets()
    H = torchcurv.batch_hessian(model, X, y, loss=F.cross_entropy)
    per_sample = torchcurv.per_sample_hessian(
        model, X, wrt="params", loss=F.cross_entropy, targets=y
    )
    M = torchcurv.to_matrix(H)
    assert M.shape == (sum(p.numel() for p in model.parameters()),) * 2
    assert_trees_close(M, torchcurv.to_matrix(per_sample, batch_dims=1).mean(0))
    fn, params = torchcurv.functional(model)
    expected = reference.hessian(lambda p: F.cross_entropy(fn(p, X), y))(params)
    assert_trees_close(H, expected)
    for mode in ["rev-over-rev", "fwd-over-fwd"]:
        assert_trees_close(
            torchcurv.batch_hessian(model, X, y, loss=F.cross_entropy, mode=mode, chunk_size=7), H
        )


def test_batch_hessian_with_respect_to_inputs_and_both() -> None:
    case = CASES[0]
    model, X, y = case.model(), case.inputs()[0], case.targets()
    Hx = torchcurv.batch_hessian(model, X, y, loss=F.cross_entropy, wrt="inputs")
    assert Hx.shape == (*X.shape, *X.shape)
    assert_trees_close(Hx, reference.hessian(lambda x: F.cross_entropy(model(x), y))(X))
    Hb = torchcurv.batch_hessian(model, X, y, loss=F.cross_entropy, wrt="both")
    assert_symmetric(Hb)


def test_per_sample_equals_loop_over_samples_through_the_harness() -> None:
    case = CASES[0]
    model = case.model()

    def batched(X: torch.Tensor, y: torch.Tensor) -> Any:
        return torchcurv.per_sample_hessian(
            model, X, loss=F.cross_entropy, targets=y, chunk_size=2
        )

    def single(x: torch.Tensor, t: torch.Tensor) -> Any:
        return torchcurv.hessian(lambda x: F.cross_entropy(model(x[None]), t[None]))(x)

    assert_per_sample_matches_loop(batched, single, case.inputs()[0], case.targets())


# --------------------------------------------------------------------------------------
# the user's module is never modified
# --------------------------------------------------------------------------------------


def snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "training": [m.training for m in model.modules()],
    }


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]
    assert all(g is None for g in after["grads"].values())
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_calls_never_modify_the_module(case: Case) -> None:
    model = case.model()
    model.train()  # dropout-free models: training mode differs only for BatchNorm
    model.eval()
    before = snapshot(model)
    xs, y = case.inputs(), case.targets()
    inputs = xs[0] if len(xs) == 1 else xs
    torchcurv.per_sample_hessian(
        model, inputs, wrt="both", loss=F.cross_entropy, targets=y, kwargs=case.kwargs
    )
    torchcurv.per_sample_jacobian(model, inputs, wrt="params", kwargs=case.kwargs)
    torchcurv.batch_hessian(model, inputs, y, loss=F.cross_entropy, kwargs=case.kwargs)
    with pytest.raises(torchcurv.TorchcurvError):
        torchcurv.per_sample_hessian(model, inputs, output=(0, 0, 0, 0), kwargs=case.kwargs)
    assert_unchanged(model, before)


def test_training_mode_batchnorm_module_is_untouched_after_the_refusal() -> None:
    model = CASES[2].model().train()
    before = snapshot(model)
    with pytest.raises(torchcurv.UnsupportedModuleError):
        torchcurv.per_sample_hessian(model, torch.randn(3, 3, dtype=D), output=0)
    assert_unchanged(model, before)


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------

MLP = CASES[0]


def bad_calls() -> list[tuple[str, Any, str]]:
    model, X, y = MLP.model(), MLP.inputs()[0], MLP.targets()
    bn = CASES[2].model().train()
    dropout = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.2)).to(D)
    return [
        (
            "batchnorm-train",
            lambda: torchcurv.per_sample_hessian(bn, X, output=0),
            r"per_sample_hessian: BatchNorm1d at '1' is in training mode.*model\.eval\(\)",
        ),
        (
            "dropout-train",
            lambda: torchcurv.per_sample_jacobian(dropout, X),
            r"per_sample_jacobian: Dropout at '1' is in training mode and randomness='error'.*"
            r"randomness='different'",
        ),
        (
            "params-as-tensor-list",
            lambda: torchcurv.functional(model, list(model.parameters())),
            r"functional: params must list parameter names or glob patterns \(str\), got "
            r"list\[Tensor.*named_parameters\(\)",
        ),
        (
            "unknown-name",
            lambda: torchcurv.functional(model, ["fc9.weight"]),
            r"params names a parameter or pattern that matches nothing, got 'fc9\.weight'\..*"
            r"Available parameters: "
            r"0\.weight, 0\.bias",
        ),
        (
            "predicate-matches-nothing",
            lambda: torchcurv.functional(model, lambda n, p: False),
            r"params is a predicate that matched no parameter",
        ),
        (
            "params-int",
            lambda: torchcurv.functional(model, 3),  # type: ignore[arg-type]
            r"functional: params must be None, names, glob patterns",
        ),
        (
            "not-a-module",
            lambda: torchcurv.functional(lambda x: x),  # type: ignore[arg-type]
            r"functional: module must be a torch\.nn\.Module",
        ),
        (
            "loss-without-targets",
            lambda: torchcurv.per_sample_hessian(model, X, loss=F.cross_entropy),
            r"targets must be given with loss=",
        ),
        (
            "targets-without-loss",
            lambda: torchcurv.per_sample_hessian(model, X, targets=y),
            r"loss must be given with targets=",
        ),
        (
            "output-and-loss",
            lambda: torchcurv.per_sample_hessian(
                model, X, output=0, loss=F.cross_entropy, targets=y
            ),
            r"output cannot be combined with loss=",
        ),
        (
            "output-not-tensor",
            lambda: torchcurv.per_sample_hessian(model, X, output=lambda out: out.tolist()),
            r"output did not produce a tensor",
        ),
        (
            "output-out-of-range",
            lambda: torchcurv.per_sample_hessian(model, X, output=7),
            r"output=7 cannot index the per-sample output.*batch dim removed",
        ),
        (
            "loss-not-scalar",
            lambda: torchcurv.per_sample_hessian(model, X, loss=lambda o, t: o, targets=y),
            r"loss must return a scalar",
        ),
        (
            "wrt-unknown",
            lambda: torchcurv.per_sample_hessian(model, X, wrt="weights"),
            r"wrt must be 'inputs', 'params' or 'both', got 'weights'",
        ),
        (
            "integer-inputs",
            lambda: torchcurv.per_sample_hessian(model, torch.ones(3, 3, dtype=int)),
            r"inputs must be floating-point to be differentiated.*wrt='params'",
        ),
        (
            "batch-mismatch",
            lambda: torchcurv.per_sample_hessian(model, X, loss=F.cross_entropy, targets=y[:2]),
            r"inputs and targets must have the same batch size, got \[2, 3\]",
        ),
        (
            "params-with-wrt-inputs",
            lambda: torchcurv.per_sample_hessian(model, X, params=["0.*"]),
            r"params only applies with wrt='params'",
        ),
        (
            "chunk-tuple-length",
            lambda: torchcurv.per_sample_hessian(model, X, chunk_size=(1, 2)),
            r"chunk_size must be a tuple \(batch, inner, outer\)",
        ),
        (
            "chunk-and-budget",
            lambda: torchcurv.per_sample_hessian(model, X, chunk_size=4, memory_budget="1GiB"),
            r"chunk_size must be 'auto' or None when memory_budget is given",
        ),
        (
            "budget-garbage",
            lambda: torchcurv.per_sample_hessian(model, X, memory_budget="lots"),
            r"memory_budget must be None, a positive number of bytes or a size such as '2GiB'",
        ),
        (
            "mode-unknown",
            lambda: torchcurv.per_sample_hessian(model, X, mode="exact"),
            r"per_sample_hessian: mode must be one of",
        ),
        (
            "randomness-unknown",
            lambda: torchcurv.per_sample_hessian(model, X, randomness="maybe"),
            r"randomness must be one of 'error', 'different', 'same'",
        ),
        (
            "scalar-inputs",
            lambda: torchcurv.per_sample_hessian(model, torch.tensor(1.0)),
            r"inputs must have a leading batch dim",
        ),
    ]


BAD = bad_calls()


@pytest.mark.parametrize(
    ("call_bad", "message"), [(c, m) for _, c, m in BAD], ids=[n for n, _, _ in BAD]
)
def test_bad_input_gives_a_clear_error(call_bad: Any, message: str) -> None:
    with pytest.raises(torchcurv.TorchcurvError, match=message):
        call_bad()
