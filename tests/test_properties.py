"""Property tests through torchcurv.testing: every equivalent path must agree.

Random smooth functions with closed forms, random MLPs and CNNs, and today's
architectures (transformer blocks, recurrent nets, normalised and residual nets, token
embeddings); every mode, chunk size and dtype; against the loop oracle,
torch.autograd.functional and finite differences.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_map

import torchcurv
from torchcurv import reference
from torchcurv.testing import (
    assert_matches_finite_differences,
    assert_matches_reference,
    assert_per_sample_matches_loop,
    assert_quantities_match_hessian,
    assert_symmetric,
    assert_trees_close,
    check_model,
)
from torchcurv.testing import strategies as tcs

D = torch.float64


def at_most(examples: int) -> settings:
    """The loaded profile's example count, capped (for tests with a costly oracle)."""
    return settings(max_examples=min(settings.default.max_examples, examples))


def first_output(model: nn.Module) -> Any:
    """The scalar function of one sample: the model's first output."""
    return lambda x: model(x.unsqueeze(0))[0, 0]


# --------------------------------------------------------------------------------------
# function transforms (issue: foundation)
# --------------------------------------------------------------------------------------


@given(tcs.functions(dtype=tcs.dtypes()), tcs.hessian_modes(), st.data())
def test_hessian_equals_the_closed_form(fn: tcs.TestFunction, mode: str, data: Any) -> None:
    chunk = data.draw(tcs.chunk_sizes(fn.dim), label="chunk_size")
    H = torchcurv.hessian(fn.func, mode=mode, chunk_size=chunk)(fn.x)
    assert_trees_close(H, fn.hessian())


@given(tcs.functions(), tcs.jacobian_modes(), st.data())
def test_gradient_equals_the_closed_form(fn: tcs.TestFunction, mode: str, data: Any) -> None:
    chunk = data.draw(tcs.chunk_sizes(fn.dim, pairs=False), label="chunk_size")
    J = torchcurv.jacobian(fn.func, mode=mode, chunk_size=chunk)(fn.x)
    assert_trees_close(J, fn.gradient())


@given(tcs.mlps(out_features=1), tcs.hessian_modes(), st.data())
def test_mlp_input_hessian_matches_oracle_and_autograd_functional(
    model: nn.Module, mode: str, data: Any
) -> None:
    x = data.draw(tcs.inputs_for(model, batch_size=1), label="x")[0]
    chunk = data.draw(tcs.chunk_sizes(x.numel()), label="chunk_size")
    f = first_output(model)
    H = assert_matches_reference(torchcurv.hessian, f, x, mode=mode, chunk_size=chunk)
    assert_trees_close(H, torch.autograd.functional.hessian(f, x))
    assert_symmetric(H)


@given(tcs.mlps(), st.data())
def test_all_hessian_modes_agree_on_vector_outputs(model: nn.Module, data: Any) -> None:
    x = data.draw(tcs.inputs_for(model, batch_size=1), label="x")[0]
    f = lambda x: model(x.unsqueeze(0))[0]  # noqa: E731
    expected = torchcurv.hessian(f)(x)
    for mode in ["rev-over-rev", "rev-over-fwd", "fwd-over-fwd", "auto"]:
        chunk = data.draw(tcs.chunk_sizes(x.numel()), label=f"chunk_size[{mode}]")
        assert_trees_close(torchcurv.hessian(f, mode=mode, chunk_size=chunk)(x), expected)


@given(tcs.mlps(out_features=2), tcs.jacobian_modes(), st.data())
def test_mlp_jacobian_matches_oracle(model: nn.Module, mode: str, data: Any) -> None:
    x = data.draw(tcs.inputs_for(model, batch_size=1), label="x")[0]
    chunk = data.draw(tcs.chunk_sizes(x.numel(), pairs=False), label="chunk_size")
    f = lambda x: model(x.unsqueeze(0))[0]  # noqa: E731
    assert_matches_reference(torchcurv.jacobian, f, x, order=1, mode=mode, chunk_size=chunk)


@given(tcs.functions(max_dim=3), tcs.hessian_modes())
@at_most(60)
def test_hessian_matches_finite_differences(fn: tcs.TestFunction, mode: str) -> None:
    H = torchcurv.hessian(fn.func, mode=mode)(fn.x)
    assert_matches_finite_differences(fn.func, H, fn.x)


@given(tcs.functions(max_dim=4), st.data())
def test_pytree_arguments_split_the_same_hessian(fn: tcs.TestFunction, data: Any) -> None:
    k = data.draw(st.integers(0, fn.dim), label="split")
    mode = data.draw(tcs.hessian_modes(), label="mode")

    def split(a: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return fn.func(torch.cat([a, b["rest"]]))

    a, b = fn.x[:k], {"rest": fn.x[k:]}
    H = torchcurv.hessian(split, argnums=(0, 1), mode=mode)(a, b)
    assert_trees_close(torchcurv.to_matrix(H, like=(a, b)), fn.hessian())


@given(tcs.functions(), st.data())
def test_hvp_and_vhp_equal_hessian_times_vector(fn: tcs.TestFunction, data: Any) -> None:
    v = data.draw(tcs.inputs_for((fn.dim,), batch_size=1, dtype=fn.x.dtype), label="v")[0]
    _, (hv,) = torchcurv.hvp(fn.func, (fn.x,), (v,))
    _, (vh,) = torchcurv.vhp(fn.func, (fn.x,), (v,))
    expected = fn.hessian() @ v
    assert_trees_close(hv, expected)
    assert_trees_close(vh, expected)


# --------------------------------------------------------------------------------------
# per-sample over modules (issues: modules, per-sample)
# --------------------------------------------------------------------------------------


def loop_input_hessians(model: nn.Module, X: torch.Tensor, output: int) -> torch.Tensor:
    return torch.stack(
        [reference.hessian(lambda x: model(x.unsqueeze(0))[0, output])(x) for x in X]
    )


@given(tcs.mlps(batch_norm=st.booleans(), tied=st.booleans()), tcs.hessian_modes(), st.data())
def test_per_sample_input_hessians_equal_the_loop(model: nn.Module, mode: str, data: Any) -> None:
    X = data.draw(tcs.inputs_for(model), label="X")
    batch_chunk = data.draw(st.none() | st.integers(1, X.shape[0] + 1), label="batch chunk")
    inner = data.draw(st.none() | st.integers(1, 2), label="inner chunk")
    outer = data.draw(st.none() | st.integers(1, X[0].numel() + 1), label="outer chunk")
    H = torchcurv.per_sample_hessian(
        model, X, output=0, mode=mode, chunk_size=(batch_chunk, inner, outer)
    )
    assert_trees_close(H, loop_input_hessians(model, X, 0))


@given(tcs.conv_nets(max_size=7, max_filters=2), st.data())
@at_most(40)
def test_per_sample_cnn_input_hessians_equal_the_loop(model: nn.Module, data: Any) -> None:
    X = data.draw(tcs.inputs_for(model, max_batch=2), label="X")
    mode = data.draw(tcs.hessian_modes(), label="mode")
    chunk = data.draw(st.sampled_from([None, "auto", (1, None, 5)]), label="chunk_size")
    H = torchcurv.per_sample_hessian(model, X, output=0, mode=mode, chunk_size=chunk)
    assert_trees_close(H, loop_input_hessians(model, X, 0))


@given(
    tcs.mlps(max_width=4, tied=st.booleans(), batch_norm=st.booleans()),
    st.sampled_from(["params", "both"]),
    st.data(),
)
@at_most(80)
def test_per_sample_loss_hessians_equal_the_loop(model: nn.Module, wrt: str, data: Any) -> None:
    X = data.draw(tcs.inputs_for(model, max_batch=3), label="X")
    classes = model(X[:1]).shape[-1]
    y = torch.tensor(
        data.draw(
            st.lists(st.integers(0, classes - 1), min_size=X.shape[0], max_size=X.shape[0]),
            label="targets",
        )
    )
    mode = data.draw(tcs.hessian_modes(), label="mode")
    chunk = data.draw(
        st.sampled_from([None, "auto", 1, (2, None, 3), (None, 1, 1)]), label="chunk_size"
    )
    fn, params = torchcurv.functional(model)

    def single(x: torch.Tensor, t: torch.Tensor) -> Any:
        def loss(diff: Any) -> torch.Tensor:
            p, xi = (diff, x) if wrt == "params" else (diff["params"], diff["inputs"])
            return F.cross_entropy(fn(p, xi.unsqueeze(0)), t.unsqueeze(0))

        return reference.hessian(loss)(
            params if wrt == "params" else {"inputs": x, "params": params}
        )

    def batched(X: torch.Tensor, y: torch.Tensor) -> Any:
        return torchcurv.per_sample_hessian(
            model, X, wrt=wrt, loss=F.cross_entropy, targets=y, mode=mode, chunk_size=chunk
        )

    H = assert_per_sample_matches_loop(batched, single, X, y)
    assert_symmetric(torchcurv.to_matrix(H, batch_dims=1), batch_dims=1)


@given(tcs.mlps(), st.data())
def test_per_sample_jacobians_equal_the_loop(model: nn.Module, data: Any) -> None:
    X = data.draw(tcs.inputs_for(model), label="X")
    mode = data.draw(tcs.jacobian_modes(), label="mode")
    wrt = data.draw(st.sampled_from(["inputs", "params", "both"]), label="wrt")
    fn, params = torchcurv.functional(model)
    J = torchcurv.per_sample_jacobian(model, X, wrt=wrt, mode=mode, chunk_size=(1, None))
    for i, x in enumerate(X):
        diff = (
            {"inputs": x, "params": params}
            if wrt == "both"
            else (x if wrt == "inputs" else params)
        )

        def out(d: Any, x: torch.Tensor = x) -> torch.Tensor:
            if wrt == "inputs":
                return fn(params, d.unsqueeze(0))[0]
            if wrt == "params":
                return fn(d, x.unsqueeze(0))[0]
            return fn(d["params"], d["inputs"].unsqueeze(0))[0]

        assert_trees_close(tree_map(lambda t, i=i: t[i], J), reference.jacobian(out)(diff))


@given(tcs.mlps(out_features=1), st.data())
def test_chunking_never_changes_per_sample_results(model: nn.Module, data: Any) -> None:
    X = data.draw(tcs.inputs_for(model, max_batch=5), label="X")
    dtype_model = model
    expected = torchcurv.per_sample_hessian(dtype_model, X, chunk_size=None)
    chunk = data.draw(
        st.tuples(
            st.none() | st.integers(1, 6),
            st.none() | st.integers(1, 2),
            st.none() | st.integers(1, 9),
        ),
        label="chunk_size",
    )
    assert_trees_close(torchcurv.per_sample_hessian(model, X, chunk_size=chunk), expected)
    budget = data.draw(st.integers(20_000, 2_000_000), label="memory_budget")
    try:
        budgeted = torchcurv.per_sample_hessian(model, X, memory_budget=budget)
    except torchcurv.MemoryBudgetError:
        return
    assert_trees_close(budgeted, expected)


@given(tcs.mlps(out_features=1, dtype=torch.float32), st.data())
def test_float32_agrees_with_float64(model: nn.Module, data: Any) -> None:
    X = data.draw(tcs.inputs_for(model), label="X")
    mode = data.draw(tcs.hessian_modes(), label="mode")
    H32 = torchcurv.per_sample_hessian(model, X, mode=mode, chunk_size=None)
    H64 = torchcurv.per_sample_hessian(model.double(), X.double(), mode=mode, chunk_size=None)
    model.float()
    assert H32.dtype == torch.float32
    assert_trees_close(H32, H64.float())


@given(tcs.mlps(activations=("tanh", "sigmoid", "softplus", "gelu", "silu", "relu")), st.data())
def test_structured_path_equals_the_generic_path(model: nn.Module, data: Any) -> None:
    X = data.draw(tcs.inputs_for(model), label="X")
    m = model(X[:1]).shape[-1]
    kind = data.draw(
        st.sampled_from(["all", "int", "slice", "cross_entropy", "mse"]), label="objective"
    )
    kwargs: dict[str, Any] = {
        "all": {},
        "int": {"output": data.draw(st.integers(0, m - 1), label="output")},
        "slice": {"output": slice(0, data.draw(st.integers(1, m), label="stop"))},
        "cross_entropy": {"loss": F.cross_entropy, "targets": torch.randint(0, m, (X.shape[0],))},
        "mse": {"loss": F.mse_loss, "targets": torch.randn(X.shape[0], m, dtype=X.dtype)},
    }[kind]
    chunk = data.draw(st.sampled_from(["auto", None, 1, (2, None, None)]), label="chunk_size")
    structured = torchcurv.per_sample_hessian(
        model, X, mode="structured", chunk_size=chunk, **kwargs
    )
    generic = torchcurv.per_sample_hessian(
        model, X, mode="fwd-over-rev", chunk_size=None, **kwargs
    )
    assert_trees_close(structured, generic)


def test_structured_mode_refuses_what_it_cannot_compute() -> None:
    cnn = nn.Sequential(nn.Conv2d(1, 1, 3), nn.Flatten(), nn.Linear(16, 1)).double()
    mlp = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X = torch.randn(2, 3, dtype=D)
    for call, reason in [
        (
            lambda: torchcurv.per_sample_hessian(
                cnn, torch.randn(2, 1, 6, 6, dtype=D), mode="structured"
            ),
            r"layer 0 \(Conv2d\) is not supported",
        ),
        (
            lambda: torchcurv.per_sample_hessian(mlp, X, wrt="params", mode="structured"),
            r"inputs only, got wrt='params'",
        ),
        (
            lambda: torchcurv.per_sample_hessian(
                mlp, X, output=lambda o: o.sum(), mode="structured"
            ),
            r"output must be None",
        ),
    ]:
        with pytest.raises(
            torchcurv.UnsupportedModuleError,
            match=r"per_sample_hessian: mode='structured' cannot be used here: .*" + reason,
        ):
            call()


# --------------------------------------------------------------------------------------
# today's architectures (issue 11): per-sample Hessians equal the loop oracle
# --------------------------------------------------------------------------------------

#: "default" leaves the argument out, so per_sample_hessian's defaults are tested too.
ARCHITECTURE_MODES = st.just("default") | tcs.hessian_modes()
ARCHITECTURE_CHUNKS = st.sampled_from(["default", None, 1, (1, None, 2), (None, 2, 3)])


def check_against_the_loop(model: nn.Module, X: torch.Tensor, wrt: str, data: Any) -> None:
    """`check_model` (float64, the loop oracle) with a drawn mode and chunk size."""
    kwargs: dict[str, Any] = {
        "mode": data.draw(ARCHITECTURE_MODES, label="mode"),
        "chunk_size": data.draw(ARCHITECTURE_CHUNKS, label="chunk_size"),
    }
    kwargs = {k: v for k, v in kwargs.items() if v != "default"}
    check_model(model, X, wrt=wrt, output=0, **kwargs)


@given(st.sampled_from(["inputs", "params", "both"]), st.data())
@at_most(60)
def test_transformer_block_hessians_equal_the_loop(wrt: str, data: Any) -> None:
    # Parameter Hessians of a block are large: one head of width 2 keeps them ~60 x 60.
    small = wrt != "inputs"
    model = data.draw(
        tcs.transformer_blocks(
            max_heads=1 if small else 2,
            min_head_dim=2,
            max_head_dim=2,
            max_feedforward=2 if small else 3,
            out_features=st.integers(1, 2),
        ),
        label="model",
    )
    X = data.draw(tcs.inputs_for(model, max_batch=2), label="X")
    # The oracle is autograd's double backward, which torch lacks for the CPU flash
    # kernel: it runs on the math kernel (torchcurv itself needs no flag; see
    # tests/test_architectures.py, which checks it with the default kernels).
    with sdpa_kernel(SDPBackend.MATH):
        check_against_the_loop(model, X, wrt, data)


@given(st.sampled_from(["inputs", "params", "both"]), st.data())
@at_most(150)
def test_recurrent_net_hessians_equal_the_loop(wrt: str, data: Any) -> None:
    small = wrt != "inputs"
    model = data.draw(
        tcs.recurrent_nets(
            in_features=st.integers(1, 2),
            max_hidden=2 if small else 3,
            max_length=3,
            out_features=st.integers(1, 2),
        ),
        label="model",
    )
    X = data.draw(tcs.inputs_for(model, max_batch=3), label="X")
    check_against_the_loop(model, X, wrt, data)


@given(tcs.recurrent_nets(dtype=torch.float32, max_length=3), st.data())
@at_most(40)
def test_float32_recurrent_nets_work_by_default(model: nn.Module, data: Any) -> None:
    # float32 LSTMs on CPU run mkldnn_rnn_layer, which has no forward AD: the default
    # mode must still compute the Hessian (by reverse-over-reverse).
    X = data.draw(tcs.inputs_for(model, max_batch=3), label="X")
    wrt = data.draw(st.sampled_from(["inputs", "params"]), label="wrt")
    H = torchcurv.per_sample_hessian(model, X, output=0, wrt=wrt)
    H64 = torchcurv.per_sample_hessian(
        model.double(), X.double(), output=0, wrt=wrt, mode="rev-over-rev", chunk_size=None
    )
    model.float()
    assert_trees_close(H, tree_map(lambda t: t.float(), H64))


@given(st.sampled_from(["inputs", "params", "both"]), st.data())
@at_most(150)
def test_normalized_net_hessians_equal_the_loop(wrt: str, data: Any) -> None:
    small = wrt != "inputs"
    model = data.draw(
        tcs.normalized_nets(max_width=3 if small else 6, max_depth=2 if small else 3),
        label="model",
    )
    X = data.draw(tcs.inputs_for(model, max_batch=3), label="X")
    check_against_the_loop(model, X, wrt, data)


@given(st.sampled_from(["inputs", "params", "both"]), st.data())
@at_most(100)
def test_residual_net_hessians_equal_the_loop(wrt: str, data: Any) -> None:
    small = wrt != "inputs"
    model = data.draw(
        tcs.residual_nets(max_width=2 if small else 3, max_size=3, out_features=st.integers(1, 2)),
        label="model",
    )
    X = data.draw(tcs.inputs_for(model, max_batch=3), label="X")
    check_against_the_loop(model, X, wrt, data)


@given(tcs.embedding_nets(), st.data())
@at_most(150)
def test_embedding_net_parameter_hessians_equal_the_loop(model: nn.Module, data: Any) -> None:
    # Token ids are integers: only parameter Hessians exist (input Hessians through an
    # embedding are those of the embedded floats, as transformer_blocks draws them).
    ids = data.draw(tcs.inputs_for(model, max_batch=3), label="ids")
    kwargs: dict[str, Any] = {"output": 0}
    if data.draw(st.booleans(), label="cross_entropy"):
        classes = model(ids[:1]).shape[-1]
        targets = data.draw(
            st.lists(st.integers(0, classes - 1), min_size=len(ids), max_size=len(ids)),
            label="targets",
        )
        kwargs = {"loss": F.cross_entropy, "targets": torch.tensor(targets)}
    mode = data.draw(ARCHITECTURE_MODES, label="mode")
    chunk = data.draw(ARCHITECTURE_CHUNKS, label="chunk_size")
    extra = {k: v for k, v in {"mode": mode, "chunk_size": chunk}.items() if v != "default"}
    report = check_model(model, ids, wrt="params", **kwargs, **extra)
    assert "H['0.weight']['0.weight']" in report.blocks


# --------------------------------------------------------------------------------------
# per-sample quantities of the Hessian (issue 24): through the harness's own assertion
# --------------------------------------------------------------------------------------


@given(tcs.mlps(max_width=5, batch_norm=st.booleans(), tied=st.booleans()), st.data())
@at_most(150)
def test_quantities_match_the_full_hessian(model: nn.Module, data: Any) -> None:
    X = data.draw(tcs.inputs_for(model, max_batch=3), label="X")
    m = model(X[:1]).shape[-1]
    kind = data.draw(st.sampled_from(["int", "all", "cross_entropy"]), label="objective")
    options: dict[str, Any] = {
        "int": {"output": data.draw(st.integers(0, m - 1), label="output")},
        "all": {},
        "cross_entropy": {"loss": F.cross_entropy, "targets": torch.randint(0, m, (X.shape[0],))},
    }[kind]
    options["wrt"] = data.draw(st.sampled_from(["inputs", "params", "both"]), label="wrt")
    options["mode"] = data.draw(
        st.sampled_from(["auto", "fwd-over-rev", "rev-over-rev", "rev-over-fwd"]), label="mode"
    )
    options["chunk_size"] = data.draw(st.sampled_from(["auto", None, 1, 2]), label="chunk_size")
    assert_quantities_match_hessian(model, X, **options)


# --------------------------------------------------------------------------------------
# per-sample Gauss-Newton (issue 26): against J^T H J from torch.autograd.functional
# --------------------------------------------------------------------------------------


@given(tcs.mlps(max_width=5, batch_norm=st.booleans(), tied=st.booleans()), st.data())
@at_most(100)
def test_ggn_equals_jt_h_j_and_its_diagonal(model: nn.Module, data: Any) -> None:
    from test_ggn import reference_ggn

    model = model.double()
    X = data.draw(tcs.inputs_for(model, max_batch=3), label="X").double()
    m = model(X[:1]).shape[-1]
    loss = data.draw(st.sampled_from([F.cross_entropy, F.mse_loss]), label="loss")
    B = X.shape[0]
    Y = torch.randint(0, m, (B,)) if loss is F.cross_entropy else torch.randn(B, m).double()
    wrt = data.draw(st.sampled_from(["inputs", "params", "both"]), label="wrt")
    options = {
        "mode": data.draw(st.sampled_from(["auto", "fwd-over-rev", "rev-over-rev"]), label="mode"),
        "chunk_size": data.draw(st.sampled_from(["auto", None, 1, (2, 1)]), label="chunk_size"),
    }
    expected = reference_ggn(model, X, Y, loss, wrt)
    G = torchcurv.per_sample_ggn(model, X, loss=loss, targets=Y, wrt=wrt, **options)
    assert_trees_close(torchcurv.to_matrix(G, batch_dims=1), expected)
    d = torchcurv.per_sample_ggn_diag(model, X, loss=loss, targets=Y, wrt=wrt, **options)
    flat = torch.cat([leaf.reshape(B, -1) for leaf in torch.utils._pytree.tree_leaves(d)], 1)
    assert_trees_close(flat, expected.diagonal(dim1=1, dim2=2))


@given(
    st.one_of(
        tcs.mlps(max_width=5, batch_norm=st.booleans(), tied=st.booleans()),
        tcs.conv_nets(max_size=6, max_filters=2),
    ),
    st.data(),
)
@at_most(100)
def test_parameter_diagonals_equal_the_whole_matrices(model: nn.Module, data: Any) -> None:
    """The structured parameter diagonals (where `"auto"` takes them) against the
    diagonals of the whole per-sample Hessian and Gauss-Newton matrices (rev-over-rev),
    on MLPs and CNNs."""
    from test_ggn import reference_ggn

    model = model.double()
    X = data.draw(tcs.inputs_for(model, max_batch=3), label="X").double()
    m = model(X[:1]).shape[-1]
    loss = data.draw(st.sampled_from([F.cross_entropy, F.mse_loss]), label="loss")
    B = X.shape[0]
    Y = torch.randint(0, m, (B,)) if loss is F.cross_entropy else torch.randn(B, m).double()
    options: dict[str, Any] = {"loss": loss, "targets": Y, "wrt": "params"}
    whole = torchcurv.per_sample_hessian(model, X, mode="rev-over-rev", **options)
    H = torchcurv.to_matrix(whole, batch_dims=1)
    for public, expected in (
        (torchcurv.per_sample_hessian_diag, H),
        (torchcurv.per_sample_ggn_diag, reference_ggn(model, X, Y, loss, "params")),
    ):
        d = public(model, X, **options)
        flat = torch.cat([leaf.reshape(B, -1) for leaf in torch.utils._pytree.tree_leaves(d)], 1)
        assert_trees_close(flat, expected.diagonal(dim1=1, dim2=2))


# --------------------------------------------------------------------------------------
# Taylor mode (issue 25): against the Hessian-vector products, where it has rules
# --------------------------------------------------------------------------------------
@given(
    st.one_of(
        tcs.mlps(max_width=5, batch_norm=st.booleans()),
        tcs.conv_nets(max_size=6, max_filters=2),
        tcs.residual_nets(),
        tcs.normalized_nets(),
        tcs.transformer_blocks(),
    ),
    st.data(),
)
@at_most(150)
def test_taylor_mode_equals_the_hessian_vector_products(model: nn.Module, data: Any) -> None:
    """Laplacians (with coordinates and weights or sigma, shared or per sample) and
    input-Hessian diagonals; a model with an op Taylor mode has no rule for is refused
    by name."""
    model = model.double()
    X = data.draw(tcs.inputs_for(model, max_batch=3), label="X").double()
    n = X[0].numel()
    options: dict[str, Any] = {}
    if data.draw(st.booleans(), label="output 0"):
        options["output"] = 0
    if data.draw(st.booleans(), label="coordinates"):
        coordinates = data.draw(
            st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True), label="coords"
        )
        options["coordinates"] = coordinates
        coefficient = data.draw(
            st.sampled_from(["weights", "per-sample weights", "sigma", "per-sample sigma"]),
            label="coefficient",
        )
        shape = (len(coordinates), data.draw(st.integers(1, 3), label="K"))
        if coefficient.startswith("per-sample"):
            shape = (len(X), *shape)
        if coefficient.endswith("weights"):
            options["weights"] = torch.randn(*shape[:-1], dtype=torch.float64)
        else:
            options["sigma"] = torch.randn(*shape, dtype=torch.float64)
    refused = None
    try:
        got = torchcurv.per_sample_laplacian(model, X, mode="taylor", **options)
    except torchcurv.UnsupportedModuleError as error:
        refused = str(error)
    if refused is not None:
        assert "has no rule for" in refused or "cannot trace" in refused
        event("taylor: refused")
        return
    event("taylor: computed")
    expected = torchcurv.per_sample_laplacian(model, X, mode="rev-over-rev", **options)
    assert_trees_close(got, expected)
    diagonal = torchcurv.per_sample_hessian_diag(model, X, mode="taylor", output=0)
    assert_trees_close(
        diagonal, torchcurv.per_sample_hessian_diag(model, X, mode="rev-over-rev", output=0)
    )
