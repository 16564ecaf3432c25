"""to_matrix / from_matrix: documented ordering, round trips, batch dims, errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import torchcurv
from torchcurv.testing import assert_symmetric, assert_trees_close

D = torch.float64


def test_seed_case_shape() -> None:
    H = torch.randn(1, 1, 28, 28, 1, 1, 28, 28)
    assert torchcurv.to_matrix(H).shape == (784, 784)
    assert torchcurv.to_matrix(H.unsqueeze(0).expand(3, *H.shape), batch_dims=1).shape == (
        3,
        784,
        784,
    )


def test_block_ordering_follows_the_pytree_and_row_major_order() -> None:
    x, y = torch.randn(2, dtype=D), torch.randn(3, dtype=D)

    def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x.sum() * y).exp().sum() + (y**3).sum()

    H = torchcurv.hessian(f, argnums=(0, 1))(x, y)
    M = torchcurv.to_matrix(H, like=(x, y))
    flat = lambda v: f(v[:2], v[2:])  # noqa: E731
    assert_trees_close(M, torchcurv.hessian(flat)(torch.cat([x, y])))
    assert_trees_close(torchcurv.to_matrix(H), M)  # square blocks: like inferred
    assert_symmetric(H, like=(x, y))


def test_jacobian_of_a_dict_output_to_matrix() -> None:
    x = torch.randn(3, dtype=D)
    J = torchcurv.jacobian(lambda x: {"a": x**2, "b": x.sum().reshape(1)})(x)
    M = torchcurv.to_matrix(J, like=x)
    assert_trees_close(M, torch.cat([torch.diag(2 * x), torch.ones(1, 3, dtype=D)]))


shapes = st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple)


@given(st.lists(shapes, min_size=1, max_size=3), st.integers(0, 2), st.data())
def test_round_trip_over_random_pytrees(
    leaf_shapes: list[tuple[int, ...]], batch: int, data: st.DataObject
) -> None:
    keys = [f"p{i}" for i in range(len(leaf_shapes))]
    like = {k: torch.zeros(s, dtype=D) for k, s in zip(keys, leaf_shapes, strict=False)}
    n = sum(math.prod(s) for s in leaf_shapes)
    batch_shape = (batch,) if batch else ()
    M = torch.randn(*batch_shape, n, n, dtype=D)
    tree = torchcurv.from_matrix(M, like, batch_dims=len(batch_shape))
    assert list(tree) == keys
    assert all(list(row) == keys for row in tree.values())
    for a, sa in zip(keys, leaf_shapes, strict=False):
        for b, sb in zip(keys, leaf_shapes, strict=False):
            assert tree[a][b].shape == (*batch_shape, *sa, *sb)
    assert torch.equal(torchcurv.to_matrix(tree, like, batch_dims=len(batch_shape)), M)
    rows = data.draw(st.lists(shapes, min_size=1, max_size=2))
    rows_like = tuple(torch.zeros(s, dtype=D) for s in rows)
    m = sum(math.prod(s) for s in rows)
    J = torch.randn(*batch_shape, m, n, dtype=D)
    jac = torchcurv.from_matrix(J, like, rows_like=rows_like, batch_dims=len(batch_shape))
    assert torch.equal(torchcurv.to_matrix(jac, like, batch_dims=len(batch_shape)), J)


BAD = [
    (lambda: torchcurv.to_matrix(None), r"to_matrix: tree must be a tensor or a pytree"),
    (
        lambda: torchcurv.to_matrix(torch.zeros(2, 3)),
        r"to_matrix: like is needed: a diagonal block is not of shape x\.shape \+ x\.shape",
    ),
    (
        lambda: torchcurv.to_matrix([torch.zeros(2, 2)] * 3),
        r"like is needed: the tree is not a square grid",
    ),
    (
        lambda: torchcurv.to_matrix(torch.zeros(2, 3), like=torch.zeros(4)),
        r"to_matrix: tree has a block that does not end in the input shape \(4,\)",
    ),
    (
        lambda: torchcurv.to_matrix(torch.zeros(2, 2), batch_dims=-1),
        r"batch_dims must be a non-negative int",
    ),
    (
        lambda: torchcurv.from_matrix(torch.zeros(3, 3), torch.zeros(2)),
        r"from_matrix: matrix must be 2 x 2 to match the blocks",
    ),
    (
        lambda: torchcurv.from_matrix(torch.zeros(3), torch.zeros(3)),
        r"from_matrix: matrix must be a tensor with 0 batch dim\(s\) and 2 matrix dims",
    ),
]


@pytest.mark.parametrize(("call", "message"), BAD, ids=[f"bad-{i}" for i in range(len(BAD))])
def test_bad_input(call: object, message: str) -> None:
    with pytest.raises(torchcurv.TorchcurvError, match=message):
        call()  # type: ignore[operator]
