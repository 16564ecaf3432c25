"""torchcurv.testing.strategies: what each strategy promises, and its argument checks."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from hypothesis import Phase, find, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument, NoSuchExample
from torch import nn

import torchcurv
from torchcurv import reference
from torchcurv.testing import assert_trees_close
from torchcurv.testing import strategies as tcst

D = torch.float64
FIND_SETTINGS = settings(max_examples=1000, phases=[Phase.generate, Phase.shrink], database=None)


def at_most(examples: int) -> settings:
    """The loaded profile's settings, with at most `examples` examples (a cap for slow
    tests that never raises the ``dev`` profile's count)."""
    return settings(max_examples=min(settings.default.max_examples, examples))


def minimal(strategy: st.SearchStrategy[Any], condition: Any = lambda _: True) -> Any:
    """The simplest example satisfying `condition` (`find`, without the explain phase)."""
    return find(strategy, condition, settings=FIND_SETTINGS)


def linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


# --------------------------------------------------------------------------------------
# dtypes, modes, chunk sizes
# --------------------------------------------------------------------------------------


@given(tcst.dtypes())
def test_dtypes_are_the_allowed_floats(dtype: torch.dtype) -> None:
    assert dtype in (torch.float32, torch.float64)


@given(tcst.dtypes(allowed=st.just([torch.float32])))
def test_dtypes_takes_a_strategy_of_allowed(dtype: torch.dtype) -> None:
    assert dtype == torch.float32


def test_dtypes_shrink_to_float64() -> None:
    assert minimal(tcst.dtypes()) == torch.float64


@given(tcst.hessian_modes(), tcst.functions(max_dim=3))
def test_hessian_modes_are_accepted_and_agree(mode: str, f: tcst.TestFunction) -> None:
    assert_trees_close(torchcurv.hessian(f.func, mode=mode)(f.x), f.hessian(f.x))


def test_mode_strategies_cover_every_mode() -> None:
    expected = {"fwd-over-rev", "rev-over-rev", "rev-over-fwd", "fwd-over-fwd", "auto"}
    for mode in expected:
        assert minimal(tcst.hessian_modes(), lambda m, mode=mode: m == mode) == mode
    for mode in ("rev", "fwd", "auto"):
        assert minimal(tcst.jacobian_modes(), lambda m, mode=mode: m == mode) == mode
    assert minimal(tcst.hessian_modes()) == "fwd-over-rev"
    with pytest.raises(NoSuchExample):
        minimal(tcst.hessian_modes(auto=False), lambda m: m == "auto")
    with pytest.raises(NoSuchExample):
        minimal(tcst.jacobian_modes(auto=False), lambda m: m == "auto")


@given(tcst.jacobian_modes(), tcst.functions(max_dim=3))
def test_jacobian_modes_are_accepted(mode: str, f: tcst.TestFunction) -> None:
    assert_trees_close(torchcurv.jacobian(f.func, mode=mode)(f.x), f.gradient(f.x))


@given(st.data(), st.integers(0, 6))
def test_chunk_sizes_are_valid_and_in_range(data: st.DataObject, n: int) -> None:
    chunk = data.draw(tcst.chunk_sizes(n))
    torchcurv.hessian(torch.sin, chunk_size=chunk)  # checks the chunk size when built
    for c in chunk if isinstance(chunk, tuple) else (chunk,):
        assert c is None or 1 <= c <= n + 1
    single = data.draw(tcst.chunk_sizes(n, pairs=False))
    assert single is None or (isinstance(single, int) and 1 <= single <= n + 1)


def test_chunk_sizes_reach_pairs_and_the_oversized_chunk() -> None:
    assert minimal(tcst.chunk_sizes(3)) is None
    assert minimal(tcst.chunk_sizes(3), lambda c: c == 4) == 4
    assert minimal(tcst.chunk_sizes(3), lambda c: isinstance(c, tuple)) == (None, None)
    assert minimal(tcst.chunk_sizes(st.just(2)), lambda c: c == (3, 1)) == (3, 1)


@given(tcst.functions(min_dim=2, max_dim=4), st.data())
def test_chunk_sizes_do_not_change_the_hessian(f: tcst.TestFunction, data: Any) -> None:
    chunk = data.draw(tcst.chunk_sizes(f.dim))
    assert_trees_close(torchcurv.hessian(f.func, chunk_size=chunk)(f.x), f.hessian(f.x))


# --------------------------------------------------------------------------------------
# functions
# --------------------------------------------------------------------------------------


@given(tcst.functions())
def test_function_closed_forms_match_the_oracle(f: tcst.TestFunction) -> None:
    assert f.x.dtype == D
    assert f.x.shape == (f.dim,)
    assert 1 <= f.dim <= 5
    assert f.func(f.x).shape == ()
    assert_trees_close(f.hessian(f.x), reference.hessian(f.func)(f.x))
    assert_trees_close(f.gradient(f.x), reference.jacobian(f.func)(f.x))
    assert f.hessian().shape == (f.dim, f.dim)


@given(tcst.functions(), st.data())
def test_function_closed_forms_hold_at_any_point(f: tcst.TestFunction, data: Any) -> None:
    y = data.draw(tcst.inputs_for((f.dim,), batch_size=1))[0]
    assert_trees_close(f.hessian(y), reference.hessian(f.func)(y))
    assert_trees_close(f.gradient(y), reference.jacobian(f.func)(y))


@given(tcst.functions(dtype=torch.float32))
def test_float32_functions_match_their_closed_forms(f: tcst.TestFunction) -> None:
    assert f.x.dtype == torch.float32
    H = torchcurv.hessian(f.func)(f.x)
    assert H.dtype == torch.float32
    assert_trees_close(H, f.hessian(f.x))


@given(tcst.functions(min_dim=2, max_dim=3, kinds=["quadratic"]))
def test_quadratic_hessian_is_a_plus_a_transpose(f: tcst.TestFunction) -> None:
    A = f.parameters["A"]
    assert f.name == f"quadratic(n={f.dim})"
    assert torch.equal(f.hessian(), A + A.T)


@given(tcst.functions(kinds=["separable"]))
def test_separable_hessian_is_diagonal(f: tcst.TestFunction) -> None:
    H = f.hessian()
    assert torch.equal(H, torch.diag(H.diagonal()))
    assert f.name.startswith(f"separable(n={f.dim}, g=(")


@given(tcst.functions(kinds=["composition"]))
def test_composition_hessian_has_rank_at_most_one(f: tcst.TestFunction) -> None:
    H = f.hessian()
    assert torch.linalg.matrix_rank(H) <= 1
    z = f.parameters["a"] @ f.x.double() + f.parameters["c"]
    assert z.abs() <= 5.0  # exp stays moderate


@given(tcst.functions(min_dim=st.integers(2, 3), max_dim=st.just(3), dtype=tcst.dtypes()))
def test_functions_take_strategies_for_every_argument(f: tcst.TestFunction) -> None:
    assert 2 <= f.dim <= 3
    assert f.x.dtype in (torch.float32, torch.float64)


def test_function_names_and_reprs_are_readable() -> None:
    f = minimal(tcst.functions(min_dim=3, kinds=["quadratic"]))
    assert f.name == "quadratic(n=3)"
    assert repr(f).startswith("quadratic(n=3)[A=[[0.0, 0.0, 0.0], ")
    assert "x=[0.0, 0.0, 0.0]" in repr(f)
    assert "dtype=float64" in repr(f)
    g = minimal(tcst.functions(kinds=["composition"]))
    assert g.name == "composition(n=1, h=sin)"
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.name = "other"  # type: ignore[misc]


def test_function_kinds_are_all_reached() -> None:
    for kind in tcst.FUNCTION_KINDS:
        assert minimal(tcst.functions(), lambda f, kind=kind: f.kind == kind).kind == kind
    for h in ("sin", "exp", "softplus", "tanh", "square"):
        f = minimal(tcst.functions(kinds=["composition"]), lambda f, h=h: f.parameters["h"] == h)
        assert f.name.endswith(f"h={h})")


# --------------------------------------------------------------------------------------
# mlps
# --------------------------------------------------------------------------------------


@given(tcst.mlps(), st.data())
def test_mlps_are_small_eval_mode_float64(model: nn.Module, data: Any) -> None:
    assert isinstance(model, nn.Sequential)
    assert not any(m.training for m in model.modules())
    assert all(p.dtype == D for p in model.parameters())
    layers = linears(model)
    assert 1 <= len(layers) <= 3
    assert all(1 <= layer.out_features <= 8 for layer in layers[:-1])
    assert model.input_shape == (layers[0].in_features,)
    X = data.draw(tcst.inputs_for(model))
    assert X.dtype == D
    assert model(X).shape == (X.shape[0], layers[-1].out_features)


@given(
    tcst.mlps(in_features=3, out_features=2, min_depth=2, max_depth=2, min_width=4, max_width=5)
)
def test_mlp_bounds_are_respected(model: nn.Module) -> None:
    layers = linears(model)
    assert len(layers) == 2
    assert layers[0].in_features == 3
    assert layers[-1].out_features == 2
    assert 4 <= layers[0].out_features <= 5


@given(tcst.mlps(min_depth=2, batch_norm=True, bias=True, activations=["softplus"]))
def test_mlp_batch_norm_has_running_stats_in_eval_mode(model: nn.Module) -> None:
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(norms) == len(linears(model)) - 1 >= 1
    for norm in norms:
        assert not norm.training
        assert norm.running_var is not None
        assert norm.running_mean is not None
        assert bool((norm.running_var >= 0.5).all())
        assert not torch.equal(norm.running_var, torch.ones_like(norm.running_var))
    assert all(layer.bias is not None for layer in linears(model))
    assert all(isinstance(m, (nn.Linear, nn.BatchNorm1d, nn.Softplus)) for m in model)


@given(tcst.mlps(tied=True, batch_norm=st.booleans()), st.data())
def test_tied_mlps_share_one_weight(model: nn.Module, data: Any) -> None:
    assert isinstance(model, tcst.TiedMLP)
    first, second = linears(model)[:2]
    assert first.weight is second.weight
    assert first.weight.shape[0] == first.weight.shape[1] == model.input_shape[0]
    assert len(dict(model.named_parameters())) < sum(
        1 for _ in model.named_parameters(remove_duplicate=False)
    )
    fn, params = torchcurv.functional(model)
    X = data.draw(tcst.inputs_for(model))
    assert_trees_close(fn(params, X), model(X))


@given(tcst.mlps(dtype=torch.float32, bias=False), st.data())
def test_mlp_dtype_carries_to_inputs(model: nn.Module, data: Any) -> None:
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(layer.bias is None for layer in linears(model))
    assert data.draw(tcst.inputs_for(model)).dtype == torch.float32


def test_mlp_weights_are_deterministic_for_a_draw() -> None:
    a = minimal(tcst.mlps(min_depth=2))
    b = minimal(tcst.mlps(min_depth=2))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    assert a(torch.ones(2, *a.input_shape, dtype=D)).abs().sum() > 0  # weights are non-zero


@given(tcst.mlps(in_features=2, min_depth=2, max_depth=2, activations=["tanh"]), st.data())
def test_mlp_input_hessians_match_the_oracle(model: nn.Module, data: Any) -> None:
    x = data.draw(tcst.inputs_for(model, batch_size=1))

    def first_output(x: torch.Tensor) -> torch.Tensor:
        return model(x)[0, 0]

    assert_trees_close(torchcurv.hessian(first_output)(x), reference.hessian(first_output)(x))


# --------------------------------------------------------------------------------------
# conv nets
# --------------------------------------------------------------------------------------


@at_most(100)  # convolutions are the slowest forward passes here
@given(tcst.conv_nets(), st.data())
def test_conv_nets_map_images_to_features(model: nn.Module, data: Any) -> None:
    c, h, w = model.input_shape
    assert 1 <= c <= 2
    assert 6 <= h <= 10
    assert 6 <= w <= 10
    assert not any(m.training for m in model.modules())
    assert isinstance(model[0], nn.Conv2d)
    assert isinstance(model[-1], nn.Linear)
    assert any(isinstance(m, nn.Flatten) for m in model)
    X = data.draw(tcst.inputs_for(model))
    assert X.shape[1:] == (c, h, w)
    assert bool((X.abs() <= 2).all())
    assert model(X).shape == (X.shape[0], model[-1].out_features)


@given(tcst.conv_nets(channels=3, min_size=4, max_size=4, pooling=["max"], out_features=2))
def test_conv_net_bounds_and_pooling(model: nn.Module) -> None:
    assert model.input_shape == (3, 4, 4)
    assert model[-1].out_features == 2
    assert any(isinstance(m, nn.MaxPool2d) for m in model)  # a 4x4 image leaves room to pool


def test_conv_nets_reach_every_pooling() -> None:
    for kind in (nn.MaxPool2d, nn.AvgPool2d):
        minimal(tcst.conv_nets(), lambda m, kind=kind: any(isinstance(x, kind) for x in m))


# --------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------


@given(tcst.inputs_for((2, 3), min_batch=2, max_batch=3))
def test_inputs_for_a_shape(X: torch.Tensor) -> None:
    assert X.shape[1:] == (2, 3)
    assert 2 <= X.shape[0] <= 3
    assert X.dtype == D
    assert bool((X.abs() <= 2).all())


@given(tcst.inputs_for((4,), batch_size=st.just(3), dtype=torch.float32))
def test_inputs_for_a_fixed_batch_and_dtype(X: torch.Tensor) -> None:
    assert X.shape == (3, 4)
    assert X.dtype == torch.float32


@given(tcst.inputs_for((2,), elements=st.sampled_from([0.5, 1.5])))
def test_inputs_for_custom_elements(X: torch.Tensor) -> None:
    assert set(X.flatten().tolist()) <= {0.5, 1.5}


@given(tcst.inputs_for((3, 10, 10), batch_size=4))
def test_large_inputs_stay_in_range(X: torch.Tensor) -> None:
    assert X.shape == (4, 3, 10, 10)
    assert bool((X.abs() <= 2).all())


def test_inputs_shrink_to_zeros() -> None:
    assert torch.equal(minimal(tcst.inputs_for((3,))), torch.zeros(1, 3, dtype=D))
    big = minimal(tcst.inputs_for((2, 8, 8)))
    assert torch.equal(big, torch.zeros(1, 2, 8, 8, dtype=D))


# --------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------

BAD_ARGUMENTS = [
    (lambda: tcst.dtypes(allowed=()), r"dtypes: allowed=\(\)"),
    (
        lambda: tcst.dtypes(allowed=[torch.int64]),
        r"dtypes: allowed=\[torch.int64\] has torch.int64, which is not a floa",
    ),
    (lambda: tcst.hessian_modes(auto="yes"), r"hessian_modes: auto='yes'"),
    (lambda: tcst.jacobian_modes(auto=1), r"jacobian_modes: auto=1"),
    (lambda: tcst.chunk_sizes(-1), r"chunk_sizes: n=-1 must be at least 0"),
    (lambda: tcst.chunk_sizes(2.5), r"chunk_sizes: n=2.5 must be an int"),
    (lambda: tcst.chunk_sizes(3, pairs=None), r"chunk_sizes: pairs=None"),
    (lambda: tcst.functions(min_dim=0), r"functions: min_dim=0 must be at least 1"),
    (lambda: tcst.functions(min_dim=4, max_dim=2), r"functions: min_dim=4 must be at most max_"),
    (lambda: tcst.functions(kinds=["cubic"]), r"functions: kinds=.*unknown entry 'cubic'"),
    (lambda: tcst.functions(kinds=[]), r"functions: kinds=\[\] must be a non-empty"),
    (lambda: tcst.functions(kinds="quadratic"), r"functions: kinds='quadratic'"),
    (lambda: tcst.functions(dtype=torch.int32), r"functions: dtype=torch.int32"),
    (lambda: tcst.mlps(min_depth=0), r"mlps: min_depth=0 must be at least 1"),
    (lambda: tcst.mlps(min_depth=3, max_depth=2), r"mlps: min_depth=3 must be at most max_depth"),
    (lambda: tcst.mlps(min_width=9), r"mlps: min_width=9 must be at most max_width=8"),
    (lambda: tcst.mlps(max_width=-1), r"mlps: max_width=-1 must be at least 1"),
    (lambda: tcst.mlps(in_features=0), r"mlps: in_features=0 must be at least 1"),
    (lambda: tcst.mlps(out_features=True), r"mlps: out_features=True must be an int"),
    (lambda: tcst.mlps(activations=["swish"]), r"mlps: activations=.*unknown entry 'swish'"),
    (lambda: tcst.mlps(bias="no"), r"mlps: bias='no'"),
    (lambda: tcst.mlps(batch_norm=1), r"mlps: batch_norm=1"),
    (lambda: tcst.mlps(tied=True, max_depth=2), r"mlps: max_depth=2 must be at least 3 with"),
    (lambda: tcst.conv_nets(min_size=11), r"conv_nets: min_size=11 must be at most max_size"),
    (lambda: tcst.conv_nets(channels=0), r"conv_nets: channels=0 must be at least 1"),
    (lambda: tcst.conv_nets(max_kernel_size=0), r"conv_nets: max_kernel_size=0"),
    (lambda: tcst.conv_nets(pooling=["lp"]), r"conv_nets: pooling=.*unknown entry 'lp'"),
    (lambda: tcst.conv_nets(activations=["tan"]), r"conv_nets: activations=.*'tan'"),
    (lambda: tcst.inputs_for((3, -1)), r"inputs_for: module_or_shape=\(3, -1\)"),
    (lambda: tcst.inputs_for(nn.Linear(2, 2)), r"inputs_for: module_or_shape='Linear' has no"),
    (lambda: tcst.inputs_for((3,), min_batch=0), r"inputs_for: min_batch=0 must be at least 1"),
    (lambda: tcst.inputs_for((3,), min_batch=5), r"inputs_for: min_batch=5 must be at most"),
    (lambda: tcst.inputs_for((3,), batch_size=0), r"inputs_for: batch_size=0"),
    (lambda: tcst.inputs_for((3,), dtype=torch.int64), r"inputs_for: dtype=torch.int64"),
    (lambda: tcst.inputs_for((3,), elements=1.0), r"inputs_for: elements=1.0"),
]


@pytest.mark.parametrize(
    ("build", "message"),
    BAD_ARGUMENTS,
    ids=[m.split(":")[0] + "-" + str(i) for i, (_, m) in enumerate(BAD_ARGUMENTS)],
)
def test_bad_arguments_raise_invalid_argument_naming_them(build: Any, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        build()


def test_bad_values_drawn_from_strategies_raise_when_drawn() -> None:
    strategy = tcst.functions(min_dim=st.just(0))  # building is fine: values come later
    with pytest.raises(InvalidArgument, match="functions: min_dim=0"):
        minimal(strategy)
    with pytest.raises(InvalidArgument, match="mlps: bias=1"):
        minimal(tcst.mlps(bias=st.just(1)))
