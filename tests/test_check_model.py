"""`torchcurv.testing.check_model`: passes on right results, names what is wrong."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacfwd, jacrev, vmap
from torch.utils._pytree import tree_map

import torchcurv
from torchcurv import TorchcurvError
from torchcurv.testing import ModelCheckReport, check_model

MODES = ("fwd-over-rev", "rev-over-rev", "rev-over-fwd", "fwd-over-fwd")


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 2, 2), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * 2 * 2, 3)
    )


def _layer_norm_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 3))


class _TwoInputs(nn.Module):
    """``forward(a, b, *, scale)``: several positional inputs and a keyword argument."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, a: torch.Tensor, b: torch.Tensor, *, scale: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(a * b) * scale)


@dataclass(frozen=True)
class ModelCase:
    """A model, a batch and the `per_sample_hessian` keyword arguments to check."""

    name: str
    model: Callable[[], nn.Module]
    inputs: Callable[[], Any]
    kwargs: dict[str, Any] = field(default_factory=dict)


def _labels(*values: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.tensor(values)


def mlp_batch() -> torch.Tensor:
    return torch.randn(5, 3)


def cnn_batch() -> torch.Tensor:
    return torch.randn(4, 1, 5, 5)


def layer_norm_batch() -> torch.Tensor:
    return torch.randn(4, 4)


CASES = [
    ModelCase("mlp-inputs-all-outputs", _mlp, mlp_batch),
    ModelCase("mlp-inputs-output-int", _mlp, mlp_batch, {"output": 1, "mode": "rev-over-fwd"}),
    ModelCase("mlp-inputs-output-slice", _mlp, mlp_batch, {"output": slice(0, 1)}),
    ModelCase("mlp-inputs-output-callable", _mlp, mlp_batch, {"output": lambda out: out.sum()}),
    ModelCase(
        "mlp-params-cross-entropy",
        _mlp,
        mlp_batch,
        {"wrt": "params", "loss": F.cross_entropy, "targets": _labels(0, 1, 1, 0, 1)},
    ),
    ModelCase(
        "mlp-both-cross-entropy-chunked",
        _mlp,
        mlp_batch,
        {
            "wrt": "both",
            "loss": F.cross_entropy,
            "targets": _labels(1, 0, 1, 1, 0),
            "chunk_size": 2,
        },
    ),
    ModelCase(
        "mlp-params-glob-mse",
        _mlp,
        mlp_batch,
        {
            "wrt": "params",
            "params": "2.*",
            "loss": F.mse_loss,
            "targets": lambda: torch.randn(5, 2),
        },
    ),
    ModelCase(
        "mlp-params-predicate-output",
        _mlp,
        mlp_batch,
        {"wrt": "params", "params": lambda n, p: n.endswith("bias"), "output": 0},
    ),
    ModelCase("cnn-inputs-output-int", _cnn, cnn_batch, {"output": 2, "memory_budget": "1GiB"}),
    ModelCase(
        "cnn-params-cross-entropy",
        _cnn,
        cnn_batch,
        {"wrt": "params", "loss": F.cross_entropy, "targets": _labels(0, 2, 1, 1)},
    ),
    ModelCase(
        "two-inputs-kwargs-both",
        _TwoInputs,
        lambda: (torch.randn(3, 3), torch.randn(3, 3)),
        {"wrt": "both", "output": 1, "kwargs": {"scale": torch.tensor(0.7)}},
    ),
]


def _materialise(case: ModelCase) -> tuple[nn.Module, Any, dict[str, Any]]:
    torch.manual_seed(0)
    kwargs = {k: v() if k == "targets" else v for k, v in case.kwargs.items()}
    return case.model(), case.inputs(), kwargs


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_check_model_passes_on_right_results(case: ModelCase) -> None:
    model, inputs, kwargs = _materialise(case)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    report = check_model(model, inputs, samples=2, **kwargs)
    assert isinstance(report, ModelCheckReport)
    assert report.samples == 2
    assert report.worst_block in report.blocks
    assert report.max_abs_expected > 0
    assert report.max_abs_diff <= 1e-7 * max(1.0, report.max_abs_expected)
    # The model passed in is left as it was: dtype, values, training flag.
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.training


@pytest.mark.parametrize("mode", [*MODES, "auto"])
def test_check_model_passes_on_a_layer_norm_model(mode: str) -> None:
    # Right once the engine routes LayerNorm through corrected_ops (pytorch#196700).
    torch.manual_seed(0)
    model = _layer_norm_model()
    report = check_model(
        model,
        layer_norm_batch(),
        wrt="both",
        loss=F.cross_entropy,
        targets=torch.tensor([0, 2, 1, 0]),
        mode=mode,
    )
    assert "H['params']['1.weight']['params']['0.bias']" in report.blocks


class _Attention(nn.Module):
    """A transformer block on the fused CPU attention kernel (eval, no dropout)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)[:, 0, :3]


@pytest.mark.parametrize("wrt", ["inputs", "params"])
def test_check_model_runs_its_oracle_through_attention(wrt: str) -> None:
    # autograd has no double backward for the fused CPU kernel; the oracle takes math
    torch.manual_seed(0)
    model = _Attention().eval()
    params = "block.self_attn.in_proj_*" if wrt == "params" else None
    report = check_model(model, torch.randn(2, 4, 8), wrt=wrt, params=params, output=1)
    assert report.max_abs_expected > 1e-3  # a curved objective, not a vacuous check


def test_check_model_counts_at_most_the_batch() -> None:
    report = check_model(nn.Linear(3, 2), torch.randn(2, 3), samples=5, output=0)
    assert report.samples == 2
    assert report.blocks == ("H",)
    assert report.max_abs_expected == 0.0  # a linear model's input Hessian is zero


# --------------------------------------------------------------------------------------
# catching wrong results
# --------------------------------------------------------------------------------------


def test_check_model_names_the_block_and_the_sample_that_disagree(monkeypatch: Any) -> None:
    right = torchcurv.per_sample_hessian

    def perturbed(*args: Any, **kwargs: Any) -> Any:
        H = right(*args, **kwargs)
        H["2.weight"]["0.bias"][1, 0, 1, 2] += 1e-3
        return H

    monkeypatch.setattr(torchcurv, "per_sample_hessian", perturbed)
    torch.manual_seed(0)
    with pytest.raises(AssertionError) as caught:
        check_model(
            _mlp(),
            mlp_batch(),
            wrt="params",
            loss=F.cross_entropy,
            targets=torch.tensor([0, 1, 1, 0, 1]),
        )
    message = str(caught.value)
    assert "H['2.weight']['0.bias']" in message
    assert "sample 1" in message
    assert "at (0, 1, 2)" in message  # the worst entry, within the block
    assert "rtol=" in message
    assert "atol=" in message


def test_check_model_names_a_wrong_layout(monkeypatch: Any) -> None:
    right = torchcurv.per_sample_hessian
    monkeypatch.setattr(
        torchcurv,
        "per_sample_hessian",
        lambda *a, **k: {"inputs": right(*a, **k)},
    )
    with pytest.raises(AssertionError, match="sample 0: per_sample_hessian returned blocks"):
        check_model(_mlp(), mlp_batch(), output=0)


def test_check_model_catches_the_uncorrected_layer_norm_hessian(monkeypatch: Any) -> None:
    # torch.func's own per-sample parameter Hessian, without corrected_ops: in torch
    # 2.13/2.14 its LayerNorm blocks are wrong (pytorch/pytorch#196700).
    def raw_torch_func(model: nn.Module, X: torch.Tensor, **kwargs: Any) -> Any:
        params = {n: p.detach() for n, p in model.named_parameters()}

        def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(functional_call(model, p, (x[None],)), y[None])

        return vmap(jacfwd(jacrev(loss)), in_dims=(None, 0, 0))(params, X, kwargs["targets"])

    monkeypatch.setattr(torchcurv, "per_sample_hessian", raw_torch_func)
    torch.manual_seed(0)
    message = ""
    try:
        check_model(
            _layer_norm_model(),
            layer_norm_batch(),
            wrt="params",
            loss=F.cross_entropy,
            targets=torch.tensor([0, 2, 1, 0]),
        )
    except AssertionError as error:
        message = str(error)
    if not message:
        pytest.skip("torch.func's LayerNorm Hessian is right in this torch; nothing to catch")
    assert "H['1.weight']['0." in message  # d/d(first layer) (df/d LayerNorm weight)
    assert "sample 0" in message


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: check_model("model", torch.randn(2, 3)), "check_model: model must be"),
        (lambda: check_model(_mlp(), torch.randn(2, 3), samples=0), "check_model: samples"),
        (lambda: check_model(_mlp(), [torch.randn(2, 3)]), "check_model: inputs must be"),
        (lambda: check_model(_mlp(), torch.randn(3)[0]), "check_model: inputs must have"),
        (lambda: check_model(_mlp(), torch.randn(2, 3), wrt="x"), "check_model: wrt must"),
        (
            lambda: check_model(_mlp(), torch.randn(2, 3), randomness="same"),
            "check_model: randomness cannot be checked",
        ),
    ],
    ids=["model", "samples", "inputs-type", "inputs-batch", "wrt", "randomness"],
)
def test_check_model_rejects_bad_arguments(call: Callable[[], Any], match: str) -> None:
    with pytest.raises(TorchcurvError, match=match):
        call()


# --------------------------------------------------------------------------------------
# import torchcurv.testing without hypothesis
# --------------------------------------------------------------------------------------

_WITHOUT_HYPOTHESIS = textwrap.dedent(
    """
    import sys
    sys.modules["hypothesis"] = None  # as if it were not installed
    import torch
    import torchcurv.testing
    from torchcurv.testing import assert_trees_close, check_model

    report = check_model(torch.nn.Linear(3, 2), torch.randn(2, 3), output=0, chunk_size=None)
    assert report.max_abs_expected == 0.0, report
    for name in ("strategies", "load_profile", "register_profiles"):
        try:
            getattr(torchcurv.testing, name)
        except ImportError as error:
            assert "pip install hypothesis" in str(error), error
        else:
            raise SystemExit(f"torchcurv.testing.{name} loaded without hypothesis")
    try:
        from torchcurv.testing import strategies
    except ImportError as error:
        assert "pip install hypothesis" in str(error), error
    else:
        raise SystemExit("from torchcurv.testing import strategies worked without hypothesis")
    print("ok")
    """
)


@pytest.mark.slow  # a fresh interpreter imports torch
def test_torchcurv_testing_imports_without_hypothesis() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_HYPOTHESIS],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_strategies_and_profiles_load_lazily_with_hypothesis() -> None:
    import torchcurv.testing as testing
    from torchcurv.testing import load_profile, register_profiles, strategies

    assert strategies is testing.strategies
    assert callable(load_profile)
    assert callable(register_profiles)
    assert {"strategies", "load_profile", "check_model"} <= set(dir(testing))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        testing.nothing  # noqa: B018


def test_per_sample_results_are_compared_sample_by_sample(monkeypatch: Any) -> None:
    # Results in the wrong order (samples swapped) are caught, naming a sample.
    right = torchcurv.per_sample_hessian
    monkeypatch.setattr(
        torchcurv,
        "per_sample_hessian",
        lambda *a, **k: tree_map(lambda t: t.flip(0), right(*a, **k)),
    )
    with pytest.raises(AssertionError, match=r"block H of sample 0"):
        check_model(_mlp(), mlp_batch(), output=1)


def test_an_empty_batch_is_refused_rather_than_passed() -> None:
    model = torch.nn.Linear(3, 1).double()
    with pytest.raises(
        torchcurv.TorchcurvError, match=r"check_model: inputs must hold at least one"
    ):
        check_model(model, torch.zeros(0, 3, dtype=torch.float64))


class _Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        return self.block(x, src_key_padding_mask=padding)[:, 0, :3]


@pytest.mark.parametrize("argnums", [0, (0,)])
@pytest.mark.parametrize("wrt", ["inputs", "both"])
def test_check_model_takes_argnums_for_a_padding_mask(wrt: str, argnums: Any) -> None:
    torch.manual_seed(0)
    X, padding = torch.randn(2, 4, 8), torch.zeros(2, 4, dtype=torch.bool)
    padding[:, 3:] = True
    params = "block.linear2.*" if wrt == "both" else None
    report = check_model(
        _Masked().eval(), (X, padding), argnums=argnums, wrt=wrt, params=params, output=1
    )
    assert report.max_abs_expected > 1e-3


def test_check_model_with_create_graph_compares_values_quietly() -> None:
    torch.manual_seed(0)
    report = check_model(_mlp(), torch.randn(2, 3), output=1, create_graph=True)
    assert report.max_abs_expected > 0
