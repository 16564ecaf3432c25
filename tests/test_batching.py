"""per_sample: chunking, randomness, fallbacks and errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchcurv
from torchcurv import reference
from torchcurv._runner import seeded
from torchcurv.testing import assert_per_sample_matches_loop, assert_trees_close

D = torch.float64


def cubic(x: torch.Tensor) -> torch.Tensor:
    return (x**3).sum()


@pytest.mark.parametrize("chunk", [None, 1, 2, 5, 7, "auto"], ids=lambda c: f"chunk({c})")
def test_per_sample_hessian_closed_form_for_every_chunk(chunk: Any) -> None:
    X = torch.randn(5, 3, dtype=D)
    H = torchcurv.per_sample(torchcurv.hessian(cubic), chunk_size=chunk)(X)
    assert_trees_close(H, torch.diag_embed(6 * X))


def test_in_dims_out_dims_and_shared_arguments() -> None:
    X, w = torch.randn(3, 4, dtype=D), torch.randn(4, dtype=D)

    def weighted(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (w * x**3).sum()

    H = torchcurv.per_sample(
        torchcurv.hessian(weighted), in_dims=(1, None), out_dims=2, chunk_size=2
    )(X.T, w)
    assert H.shape == (4, 4, 3)
    assert_trees_close(H.movedim(2, 0), torch.diag_embed(6 * w * X))


def test_pytree_outputs_are_chunked_leaf_by_leaf() -> None:
    X = torch.randn(5, 2, dtype=D)
    out = torchcurv.per_sample(lambda x: {"sum": x.sum(), "double": 2 * x}, chunk_size=2)(X)
    assert_trees_close(out, {"sum": X.sum(1), "double": 2 * X})


def test_matches_a_loop_over_samples() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(D)

    def single(x: torch.Tensor) -> Any:
        return torchcurv.hessian(lambda x: model(x).sum())(x)

    assert_per_sample_matches_loop(
        torchcurv.per_sample(single, chunk_size=3), single, torch.randn(7, 3, dtype=D)
    )


def test_inside_an_enclosing_transform() -> None:
    X = torch.randn(2, 3, 4, dtype=D)
    inner = torchcurv.per_sample(torchcurv.hessian(cubic), chunk_size=2)
    H = torch.vmap(inner)(X)
    assert_trees_close(H, torch.diag_embed(6 * X))


# --------------------------------------------------------------------------------------
# randomness
# --------------------------------------------------------------------------------------


def dropout_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 1)).to(D)


@pytest.mark.parametrize("chunk", [None, (None, 1, 1), (None, None, 3)], ids=str)
@pytest.mark.parametrize("mode", ["fwd-over-rev", "rev-over-rev", "rev-over-fwd", "fwd-over-fwd"])
def test_randomness_different_equals_a_loop_seeded_by_sample_index(mode: str, chunk: Any) -> None:
    model, X = dropout_model(), torch.randn(5, 3, dtype=D)
    torch.manual_seed(7)
    H = torchcurv.per_sample_hessian(model, X, randomness="different", mode=mode, chunk_size=chunk)
    # The rule: one seed s drawn from the global generator; sample i draws its mask from
    # a generator seeded by (s, i), and every row of its Hessian sees that mask.
    torch.manual_seed(7)
    s = int(torch.randint(0, 2**62, ()))
    first, last = model[0], model[3]
    for i in range(5):
        with seeded(s, i, []):
            mask = F.dropout(torch.ones(1, 8, dtype=D), 0.5, training=True)[0]
        expected = reference.hessian(lambda x, m=mask: last(torch.tanh(first(x)) * m))(X[i])
        assert_trees_close(H[i], expected)
    assert model.training  # untouched


@pytest.mark.parametrize("randomness", ["different", "same"])
def test_randomness_does_not_depend_on_the_chunking(randomness: str) -> None:
    model, X = dropout_model(), torch.randn(6, 3, dtype=D)
    results = []
    for chunk in [None, 1, 2, (4, 1, 3), (None, 2, None)]:
        torch.manual_seed(3)
        results.append(
            torchcurv.per_sample_hessian(model, X, randomness=randomness, chunk_size=chunk)
        )
    for other in results[1:]:
        assert_trees_close(other, results[0])  # the same masks; rounding may differ


def test_randomness_same_gives_every_sample_one_mask_whatever_the_chunking() -> None:
    model = dropout_model()
    X = torch.randn(1, 3, dtype=D).expand(4, 3)
    for chunk in [(None, 1, 2), 2, 1, (3, None, None)]:
        H = torchcurv.per_sample_hessian(model, X, randomness="same", chunk_size=chunk)
        for i in range(1, 4):
            # one mask: identical samples agree (up to the rounding of batched kernels,
            # which need not be bit-identical across the rows of a vmapped batch; a
            # different mask changes entries by O(1))
            assert_trees_close(H[i], H[0])
    torch.manual_seed(1)
    different = torchcurv.per_sample_hessian(model, X, randomness="different")
    assert not all(torch.equal(different[i], different[0]) for i in range(1, 4))


def test_randomness_advances_the_global_generator_by_one_draw() -> None:
    model, X = dropout_model(), torch.randn(3, 3, dtype=D)
    torch.manual_seed(5)
    torchcurv.per_sample_hessian(model, X, randomness="different")
    after_call = torch.rand(())
    torch.manual_seed(5)
    torch.randint(0, 2**62, ())
    assert torch.equal(after_call, torch.rand(()))


def test_randomness_error_on_functional_dropout() -> None:
    with pytest.raises(
        torchcurv.TorchcurvError,
        match=r"per_sample: the function called a "
        r"random operation.*randomness='different'",
    ):
        torchcurv.per_sample(lambda x: F.dropout(x, 0.5, training=True))(torch.ones(3, 2))


# --------------------------------------------------------------------------------------
# fallbacks
# --------------------------------------------------------------------------------------


def data_dependent(x: torch.Tensor) -> torch.Tensor:
    return x * 2 if x.sum().item() > 0 else x * 3  # vmap cannot batch .item()


def test_operator_without_batching_rule_falls_back_to_a_loop() -> None:
    X = torch.tensor([[1.0, 2.0], [-3.0, 1.0], [0.5, 0.5]], dtype=D)
    with pytest.warns(
        torchcurv.TorchcurvFallbackWarning,
        match=r"vmap cannot batch an operator.*item.*loop over samples",
    ):
        out = torchcurv.per_sample(data_dependent, chunk_size=2)(X)
    assert_trees_close(out, torch.stack([data_dependent(x) for x in X]))


def test_hessian_of_data_dependent_function_through_the_loop_fallback() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return (x**3).sum() if x.sum().item() > 0 else (x**4).sum()

    X = torch.tensor([[1.0, 2.0], [-3.0, 1.0]], dtype=D)
    with pytest.warns(torchcurv.TorchcurvFallbackWarning):
        H = torchcurv.per_sample(torchcurv.hessian(f, mode="rev-over-rev"))(X)
    assert_trees_close(H, torch.stack([reference.hessian(f)(x) for x in X]))


def test_out_of_memory_retries_with_smaller_chunks() -> None:
    calls = {"n": 0}

    def flaky(x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError(
                "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"
            )
        return x * 2

    X = torch.randn(6, 2, dtype=D)
    with pytest.warns(torchcurv.TorchcurvFallbackWarning, match=r"retrying with chunks of 3"):
        out = torchcurv.per_sample(flaky)(X)
    assert_trees_close(out, 2 * X)


def test_errors_inside_the_function_say_where() -> None:
    def broken(x: torch.Tensor) -> torch.Tensor:
        return x @ torch.ones(5, dtype=D)

    with pytest.raises(
        RuntimeError,
        match=r"per_sample: failed on samples 0:2 of 4 "
        r"\(chunk_size=2\)",
    ):
        torchcurv.per_sample(broken, chunk_size=2)(torch.ones(4, 3, dtype=D))


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------

BAD = [
    (lambda: torchcurv.per_sample(3), r"per_sample: func must be callable"),
    (
        lambda: torchcurv.per_sample(cubic, chunk_size=0),
        r"per_sample: chunk_size must be None, a positive int or 'auto', got 0",
    ),
    (
        lambda: torchcurv.per_sample(cubic, chunk_size="big"),
        r"chunk_size must be None, a positive int or 'auto', got 'big'",
    ),
    (
        lambda: torchcurv.per_sample(cubic, chunk_size=2, memory_budget=10**9),
        r"chunk_size must be 'auto' or None when memory_budget is given",
    ),
    (
        lambda: torchcurv.per_sample(cubic, memory_budget=-1),
        r"memory_budget must be None, a positive number of bytes",
    ),
    (
        lambda: torchcurv.per_sample(cubic, randomness="sometimes"),
        r"per_sample: randomness must be one of 'error', 'different', 'same'",
    ),
    (
        lambda: torchcurv.per_sample(lambda x, y: x, in_dims=(0, 0))(
            torch.ones(2, 1), torch.ones(3, 1)
        ),
        r"in_dims must map at least one tensor, and all mapped tensors must have the same "
        r"batch size, got \[2, 3\]",
    ),
    (
        lambda: torchcurv.per_sample(lambda x: x, in_dims=(0, 1))(torch.ones(2)),
        r"in_dims must have one entry per argument \(1\)",
    ),
    (
        lambda: torchcurv.per_sample(lambda x: x, in_dims=3)(torch.ones(2)),
        r"in_dims maps dim 3 of an argument that has no such dim",
    ),
]


@pytest.mark.parametrize(("call", "message"), BAD, ids=[f"bad-{i}" for i in range(len(BAD))])
def test_bad_input(call: Any, message: str) -> None:
    with pytest.raises(torchcurv.TorchcurvError, match=message):
        call()
