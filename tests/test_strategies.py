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
# today's architectures: normalised, residual, transformer, recurrent, embedding nets
# --------------------------------------------------------------------------------------


def eval_mode(model: nn.Module) -> bool:
    return not any(m.training for m in model.modules())


@given(tcst.normalized_nets(), st.data())
def test_normalized_nets_put_a_norm_after_every_hidden_linear(model: nn.Module, data: Any) -> None:
    assert isinstance(model, nn.Sequential)
    assert eval_mode(model)
    layers = list(model)
    norms = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.RMSNorm)
    assert 2 <= len(linears(model)) <= 3
    for k, layer in enumerate(layers[:-1]):
        if isinstance(layer, nn.Linear):
            assert isinstance(layers[k + 1], norms)
            assert 2 <= layer.out_features <= 6
    for norm in (m for m in model if isinstance(m, nn.GroupNorm)):
        assert norm.num_channels % norm.num_groups == 0
        assert norm.num_channels // norm.num_groups >= 2
    X = data.draw(tcst.inputs_for(model))
    assert model(X).shape == (X.shape[0], linears(model)[-1].out_features)


def test_normalized_nets_reach_every_norm() -> None:
    for kind in (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.RMSNorm):
        net = minimal(
            tcst.normalized_nets(), lambda m, kind=kind: any(isinstance(x, kind) for x in m)
        )
        assert any(isinstance(x, kind) for x in net)
    only_group = minimal(tcst.normalized_nets(norms=["group"], min_width=st.just(4)))
    assert only_group[1].num_groups in (1, 2)
    # Width 1 cannot take a GroupNorm: it falls back to another allowed norm.
    narrow = minimal(tcst.normalized_nets(norms=["group", "rms"], min_width=1, max_width=1))
    assert isinstance(narrow[1], nn.RMSNorm)


@given(tcst.residual_nets(), st.data())
def test_residual_nets_add_their_blocks_to_the_identity(model: nn.Module, data: Any) -> None:
    assert eval_mode(model)
    blocks = [m for m in model if isinstance(m, tcst.ResidualBlock)]
    assert 1 <= len(blocks) <= 2
    X = data.draw(tcst.inputs_for(model))
    assert model(X).shape == (X.shape[0], model[-1].out_features)
    if len(model.input_shape) == 3:
        c, h, w = model.input_shape
        assert 1 <= c <= 4
        assert 2 <= h == w <= 4
    first = blocks[0]
    assert_trees_close(first(X), X + first.body(X))
    assert first.body(X).shape == X.shape


def test_residual_nets_reach_both_kinds() -> None:
    mlp = minimal(tcst.residual_nets())
    assert mlp.input_shape == (1,)
    assert isinstance(mlp[0].body[0], nn.Linear)
    conv = minimal(tcst.residual_nets(), lambda m: len(m.input_shape) == 3)
    assert isinstance(conv[0].body[0], nn.Conv2d)
    assert conv[0].body[0].padding == "same"
    assert "x + body(x)" in repr(conv[0])


@at_most(100)
@given(tcst.transformer_blocks(), st.data())
def test_transformer_blocks_map_sequences_to_features(model: nn.Module, data: Any) -> None:
    assert eval_mode(model)
    block, pool, readout = model
    assert isinstance(block, tcst.MaskedBlock)
    assert isinstance(pool, tcst.MeanOverPositions)
    length, d_model = model.input_shape
    assert 1 <= length <= 3
    assert d_model in (2, 3, 4, 6)
    inner = block.block
    if isinstance(inner, nn.TransformerEncoderLayer):
        assert inner.self_attn.batch_first
        assert inner.dropout.p == 0.0
        assert inner.linear1.out_features <= 4
    else:
        assert isinstance(inner, tcst.AttentionBlock)
        assert inner.attn.dropout == 0.0
    assert block.mask_kind in tcst.MASKS
    if block.mask is None:
        assert block.mask_kind is None
    else:
        assert block.mask.shape == (length, length)
    X = data.draw(tcst.inputs_for(model))
    assert X.shape[1:] == (length, d_model)
    assert model(X).shape == (X.shape[0], readout.out_features)


def test_transformer_blocks_reach_every_variant() -> None:
    def kind_is(kind: type) -> Any:
        return lambda m: isinstance(m[0].block, kind)

    for kind in (nn.TransformerEncoderLayer, tcst.AttentionBlock):
        minimal(tcst.transformer_blocks(), kind_is(kind))
    for norm_first in (True, False):
        net = minimal(tcst.transformer_blocks(norm_first=norm_first))
        assert net[0].block.norm_first is norm_first
    gelu = minimal(tcst.transformer_blocks(kinds=["attention_block"], activations=["gelu"]))
    assert isinstance(gelu[0].block.ff[1], nn.GELU)
    fixed = minimal(tcst.transformer_blocks(masks=["fixed"]), lambda m: m[0].mask.any())
    mask = fixed[0].mask
    assert mask.dtype == torch.bool
    assert not mask.diagonal().any()  # every position may attend to itself
    assert "mask='fixed'" in repr(fixed)


def test_causal_masks_block_the_future() -> None:
    net = minimal(tcst.transformer_blocks(masks=["causal"], min_length=3, out_features=1))
    X = torch.zeros(1, *net.input_shape, dtype=D)
    Y = X.clone()
    Y[0, -1] = 1.0  # a change at the last position
    block = net[0]
    assert_trees_close(block(X)[0, :-1], block(Y)[0, :-1])  # earlier positions cannot see it


@given(tcst.recurrent_nets(), st.data())
def test_recurrent_nets_read_out_the_last_step(model: nn.Module, data: Any) -> None:
    assert isinstance(model, tcst.RecurrentNet)
    assert eval_mode(model)
    rnn = model.rnn
    assert isinstance(rnn, (nn.RNN, nn.GRU, nn.LSTM))
    assert rnn.batch_first
    assert 1 <= rnn.num_layers <= 2
    assert 1 <= rnn.hidden_size <= 3
    length, features = model.input_shape
    assert 1 <= length <= 4
    assert rnn.input_size == features
    X = data.draw(tcst.inputs_for(model))
    states, _ = rnn(X)
    assert_trees_close(model(X), model.readout(states[:, -1]))


def test_recurrent_nets_reach_every_cell() -> None:
    for name, cell in tcst.CELLS.items():
        assert isinstance(minimal(tcst.recurrent_nets(cells=[name])).rnn, cell)
    net = minimal(tcst.recurrent_nets(cells=["lstm"], in_features=2, bias=True))
    assert repr(net.rnn) == "LSTM(2, 1, batch_first=True)"


@given(tcst.embedding_nets(), st.data())
def test_embedding_nets_take_token_ids(model: nn.Module, data: Any) -> None:
    assert eval_mode(model)
    embedding = model[0]
    assert isinstance(embedding, nn.Embedding)
    assert embedding.num_embeddings == model.vocab_size
    assert 2 <= model.vocab_size <= 6
    if embedding.padding_idx is not None:
        assert not embedding.weight[0].any()
    ids = data.draw(tcst.inputs_for(model))
    assert ids.dtype == torch.int64
    assert ids.shape[1:] == model.input_shape
    assert bool(((ids >= 0) & (ids < model.vocab_size)).all())
    assert model(ids).shape == (ids.shape[0], model[-1].out_features)


def test_token_ids_shrink_to_zero_and_reach_the_vocabulary() -> None:
    net = minimal(tcst.embedding_nets(vocab_size=4, min_length=2))
    assert torch.equal(minimal(tcst.inputs_for(net)), torch.zeros(1, 2, dtype=torch.int64))
    top = minimal(tcst.inputs_for(net, dtype=torch.int32), lambda ids: bool(ids.max() == 3))
    assert top.dtype == torch.int32
    mean = minimal(tcst.embedding_nets(), lambda m: isinstance(m[1], tcst.MeanOverPositions))
    assert mean[-1].in_features == mean[0].embedding_dim


ARCHITECTURES = [
    tcst.normalized_nets,
    tcst.residual_nets,
    tcst.transformer_blocks,
    tcst.recurrent_nets,
    tcst.embedding_nets,
]


@given(st.sampled_from(ARCHITECTURES), st.data())
@at_most(50)
def test_architectures_take_strategies_for_arguments_and_dtypes(build: Any, data: Any) -> None:
    model = data.draw(build(out_features=st.just(2), dtype=tcst.dtypes()))
    dtype = next(model.parameters()).dtype
    assert all(p.dtype == dtype for p in model.parameters())
    assert eval_mode(model)
    X = data.draw(tcst.inputs_for(model, batch_size=2))
    assert X.dtype == (torch.int64 if hasattr(model, "vocab_size") else dtype)
    assert model(X).shape == (2, 2)


@pytest.mark.parametrize("build", ARCHITECTURES, ids=lambda build: build.__name__)
def test_architecture_weights_are_deterministic_and_non_trivial(build: Any) -> None:
    a, b = minimal(build(out_features=2)), minimal(build(out_features=2))
    assert repr(a) == repr(b)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    assert all(bool(p.abs().sum() > 0) for p in a.parameters())


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
    (lambda: tcst.normalized_nets(norms=["instance"]), r"normalized_nets: norms=.*'instance'"),
    (lambda: tcst.normalized_nets(min_depth=1), r"normalized_nets: min_depth=1 must be at le"),
    (
        lambda: tcst.normalized_nets(norms=["group"], min_width=1),
        r"normalized_nets: min_width=1 must be at least 2 with norms=\('group',\)",
    ),
    (lambda: tcst.normalized_nets(bias=0), r"normalized_nets: bias=0"),
    (lambda: tcst.residual_nets(kinds=["dense"]), r"residual_nets: kinds=.*'dense'"),
    (lambda: tcst.residual_nets(min_blocks=3), r"residual_nets: min_blocks=3 must be at most"),
    (lambda: tcst.residual_nets(max_size=0), r"residual_nets: max_size=0 must be at least 1"),
    (lambda: tcst.transformer_blocks(masks=["padding"]), r"transformer_blocks: masks=.*'padd"),
    (lambda: tcst.transformer_blocks(activations=["tanh"]), r"transformer_blocks: activat"),
    (lambda: tcst.transformer_blocks(kinds=[]), r"transformer_blocks: kinds=\[\] must be"),
    (lambda: tcst.transformer_blocks(norm_first="pre"), r"transformer_blocks: norm_first='pre'"),
    (lambda: tcst.transformer_blocks(min_heads=0), r"transformer_blocks: min_heads=0 must be"),
    (
        lambda: tcst.transformer_blocks(min_head_dim=4),
        r"transformer_blocks: min_head_dim=4 must be at most max_head_dim=3",
    ),
    (lambda: tcst.transformer_blocks(dtype=torch.int8), r"transformer_blocks: dtype=torch.int8"),
    (lambda: tcst.recurrent_nets(cells=["transformer"]), r"recurrent_nets: cells=.*'transf"),
    (lambda: tcst.recurrent_nets(min_layers=0), r"recurrent_nets: min_layers=0 must be at"),
    (lambda: tcst.recurrent_nets(max_length=0), r"recurrent_nets: max_length=0 must be at"),
    (lambda: tcst.recurrent_nets(in_features=1.5), r"recurrent_nets: in_features=1.5 must be"),
    (lambda: tcst.embedding_nets(vocab_size=0), r"embedding_nets: vocab_size=0 must be at le"),
    (lambda: tcst.embedding_nets(pooling=["max"]), r"embedding_nets: pooling=.*'max'"),
    (lambda: tcst.embedding_nets(padding="yes"), r"embedding_nets: padding='yes'"),
    (
        lambda: tcst.inputs_for(minimal(tcst.embedding_nets()), dtype=torch.float64),
        r"inputs_for: dtype=torch.float64 must be an integer torch.dtype",
    ),
    (
        lambda: tcst.inputs_for(minimal(tcst.embedding_nets()), elements=st.just(1.0)),
        r"inputs_for: elements=.* cannot be used for token ids",
    ),
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
    with pytest.raises(InvalidArgument, match="conv_nets: bias=1"):
        minimal(tcst.conv_nets(bias=st.just(1)))
    with pytest.raises(InvalidArgument, match=r"transformer_blocks: masks=.*'all'"):
        minimal(tcst.transformer_blocks(masks=st.just(["all"])))
    with pytest.raises(InvalidArgument, match="recurrent_nets: bias=2"):
        minimal(tcst.recurrent_nets(bias=st.just(2)))
    with pytest.raises(InvalidArgument, match="embedding_nets: padding=None"):
        minimal(tcst.embedding_nets(padding=st.none()))
    with pytest.raises(InvalidArgument, match="residual_nets: min_blocks=0"):
        minimal(tcst.residual_nets(min_blocks=st.just(0)))
