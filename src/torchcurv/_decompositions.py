"""Ops rewritten in primitive ops, to route around wrong or missing derivative rules upstream.

Why: torch.func's second derivatives of the fused normalisation kernels are wrong.
An audit against autograd's double backward through a plain loop, and against finite
differences, in float64 (``tests/test_op_audit.py``) finds in torch 2.13:

* ``layer_norm`` (pytorch/pytorch#196700): with a ``weight``, the block
  ``d/dx (df/dweight)`` is wrong in every composition (``jacfwd(jacrev)``,
  ``jacrev(jacrev)``, ``jacrev(jacfwd)``, ``jacfwd(jacfwd)``; errors of order one),
  while its mirror ``d/dweight (df/dx)`` is right, so the Hessian is not even
  symmetric; with or without a weight, ``d²f/dx²`` is wrong whenever the inner stage
  is forward mode (``jacrev(jacfwd)``, ``jacfwd(jacfwd)``).
* ``batch_norm`` with batch statistics (pytorch/pytorch#196699) and ``instance_norm``
  (which calls it): the same pattern.
* Autograd's own double backward (so also the loop oracle) of ``layer_norm`` and
  ``batch_norm`` (training or eval) is wrong when a ``bias`` is given without a
  ``weight``: ``d/dx (df/dbias)`` and ``d²f/dbias²`` come out wrong.
* ``embedding`` with a ``padding_idx``: forward mode ignores the padding index (the
  padding row gets a derivative that reverse mode, by design, gives it not), so the
  forward-mode Jacobian and the ``jacfwd(jacfwd)`` Hessian disagree with the others.

* ``_weight_norm_interface`` (``nn.utils.parametrizations.weight_norm``): no forward-mode
  rule, and autograd's double backward is wrong (the ``d/dv (df/dg)`` block, errors of
  order one against finite differences).
* ``scaled_dot_product_attention`` picks the fused CPU flash kernel for 4-d inputs, which
  has no forward-mode rule and no double backward (so no Hessian in any mode; the loop
  oracle needs ``sdpa_kernel(SDPBackend.MATH)``, a process-wide flag torchcurv never sets).
* ``rnn_tanh``, ``rnn_relu``, ``gru``, ``lstm`` and their cells: the fused kernels create
  their hidden state unbatched and update it in place, so under `torch.vmap` they fail
  ("output with shape [1, H] doesn't match the broadcast shape [B, 1, H]"), and the
  CPU LSTM kernel (``mkldnn_rnn_layer``) has no forward-mode rule.
* ``embedding`` with ``max_norm`` renormalises the weight in place (the caller's
  parameter, and a "mutate a captured tensor" error under torch.func).

`corrected_ops` is a `torch.overrides.TorchFunctionMode` that replaces these calls by
the same computation written with primitive differentiable ops (``mean``, ``sub``,
``mul``, ``rsqrt``, ``add``), whose first and second derivatives, forward-mode rules
and batching rules are all right. Routed:

* ``torch.nn.functional.layer_norm``, ``torch.layer_norm``, ``torch.native_layer_norm``;
* ``torch.nn.functional.batch_norm`` and ``torch.batch_norm`` in evaluation (the given
  running statistics normalise), and with batch statistics when no running statistics
  are given (``track_running_stats=False``: nothing is updated in place);
* ``torch.nn.functional.instance_norm`` and ``torch.instance_norm`` with input
  statistics and no running statistics (the default ``nn.InstanceNorm*``), and with the
  running statistics (``use_input_stats=False``);
* ``torch.nn.functional.embedding`` and ``torch.embedding`` with a padding index (the
  looked-up padding rows are held constant, as reverse mode holds them);
  ``F.embedding`` with ``max_norm``: the looked-up rows are renormalised out of place
  (values renormalised, derivative that of the plain lookup, as torch's in-place
  renormalisation under ``no_grad`` gives), so the weight is never written;
* ``torch._weight_norm``: ``v * g / ||v||`` with `torch.linalg.vector_norm`;
* ``torch.nn.functional.scaled_dot_product_attention``: the math kernel written out
  (``softmax(q k^T * scale + mask) v``, the scale split as its square root over ``q``
  and ``k``, boolean masks and ``is_causal`` keep the True entries, float masks add,
  fully masked rows give zeros as ``_safe_softmax`` does, ``enable_gqa`` repeats the
  key/value heads, ``dropout_p > 0`` applies `F.dropout` to the weights, so it follows
  torchcurv's randomness rule); and ``F.multi_head_attention_forward``, whose body is
  run under the mode (a mode's handler runs a Python function with the mode popped,
  which would hide its call of attention). Inside the mode ``has_torch_function`` is
  true, so ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` never take their
  fused fast paths (``_native_multi_head_attention``, ``_transformer_encoder_layer_fwd``);
* ``torch.rnn_tanh``, ``torch.rnn_relu``, ``torch.gru``, ``torch.lstm`` (padded input,
  any number of layers, bidirectional, ``proj_size``, inter-layer dropout through
  `F.dropout`) and ``torch.rnn_tanh_cell``, ``rnn_relu_cell``, ``gru_cell``,
  ``lstm_cell``: a Python loop over time steps of ``F.linear``, ``sigmoid``, ``tanh``
  with the kernels' gate order and equations.

Batch norm in training with running statistics, and instance norm with input statistics
and running statistics, update the running statistics in place: they are routed (by the
batch's or the input's statistics, nothing updated) only inside
`discarding_running_updates`, which `torchcurv.functional` enters because its buffers are
copies whose updates are thrown away; elsewhere they are left to the original op.
Left alone (the original op runs): unusual
arguments (shapes that do not fit, integer or complex dtypes, a non-positive ``eps``
where the op refuses it, one value per channel in training; embeddings with
``scale_grad_by_freq`` or ``sparse``; nested tensors in attention, ``attn_mask``
together with ``is_causal``; packed sequences and float16/bfloat16 recurrent layers;
float16/bfloat16 weight norm), for which the original op runs (and raises its own
errors); every other op. ``group_norm`` and ``rms_norm`` are right in every
composition and are not routed.

Cost: attention and recurrent layers run as several ops instead of one fused kernel
(see ``tests/test_architectures.py`` and the report of issue 11 for measurements); the
mode only acts where torchcurv differentiates (`torchcurv.functional` and the
transforms), never on the caller's own forward calls, and sets no process-wide flag.

The forward values equal the fused ops' up to rounding: the statistics are the same
(mean and biased variance, ``eps`` inside the square root); float16 and bfloat16 inputs
are normalised in float32, as the fused CPU kernels do, and cast back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from functools import partial
from types import FunctionType, TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = [
    "ROUTED_OPS",
    "corrected_ops",
    "discarding_running_updates",
    "observing_routes",
    "unrouted",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_ROUTED_DTYPES = (torch.float64, torch.float32, *_LOW_PRECISION)

Rule = Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]


#: True inside `discarding_running_updates`.
_DISCARDING: ContextVar[bool] = ContextVar("torchcurv_discarding", default=False)
#: True inside `unrouted`: `corrected_ops` does nothing.
_UNROUTED: ContextVar[bool] = ContextVar("torchcurv_unrouted", default=False)
#: Inside `observing_routes`: the list the mode appends the routed calls it sees to.
_OBSERVED: ContextVar[list[str] | None] = ContextVar("torchcurv_observed", default=None)


@contextmanager
def _setting(var: ContextVar[Any], value: Any) -> Iterator[Any]:
    token = var.set(value)
    try:
        yield value
    finally:
        var.reset(token)


def discarding_running_updates() -> Any:
    """Inside, batch norm in training and instance norm with input statistics are routed
    even with running statistics: normalised by the batch's (input's) statistics, the
    running ones neither read nor updated. For forwards whose buffers are copies that
    are thrown away (`torchcurv.functional`), where the update is lost anyway."""
    return _setting(_DISCARDING, True)


def unrouted() -> Any:
    """Inside, `corrected_ops` does nothing: for forwards known to call no routed op
    (`observing_routes` saw none), which then pay no torch-function mode per op."""
    return _setting(_UNROUTED, True)


def observing_routes() -> Any:
    """A context that yields a list; `corrected_ops` appends to it the name of every
    routed call it sees inside (whether its rule applied or the original op ran)."""
    return _setting(_OBSERVED, [])


class _Unsupported(Exception):
    """Raised by a rule for arguments it leaves to the original op."""


# --------------------------------------------------------------------------------------
# argument checks shared by the rules
# --------------------------------------------------------------------------------------


def _need(condition: bool) -> None:
    if not condition:
        raise _Unsupported


def _input(x: Any) -> torch.Tensor:
    _need(isinstance(x, torch.Tensor) and x.dtype in _ROUTED_DTYPES)
    tensor: torch.Tensor = x
    return tensor


def _optional(t: Any, shape: tuple[int, ...]) -> torch.Tensor | None:
    if t is None:
        return None
    _need(isinstance(t, torch.Tensor) and t.dtype in _ROUTED_DTYPES and tuple(t.shape) == shape)
    tensor: torch.Tensor = t
    return tensor


def _required(t: Any, shape: tuple[int, ...]) -> torch.Tensor:
    tensor = _optional(t, shape)
    if tensor is None:
        raise _Unsupported
    return tensor


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in _LOW_PRECISION else x.dtype


def _affine(
    y: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    shape: tuple[int, ...],
) -> torch.Tensor:
    if weight is not None:
        y = y * weight.to(y.dtype).reshape(shape)
    if bias is not None:
        y = y + bias.to(y.dtype).reshape(shape)
    return y


def _normalise(
    x: torch.Tensor, dims: tuple[int, ...], eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``((x - mean) * rstd, mean, rstd)`` over `dims` (kept), biased variance."""
    mean = x.mean(dims, keepdim=True)
    centred = x - mean
    rstd = torch.rsqrt((centred * centred).mean(dims, keepdim=True) + eps)
    return centred * rstd, mean, rstd


def _eps(eps: Any, *, positive: bool = False) -> float:
    _need(isinstance(eps, (int, float)) and not isinstance(eps, bool))
    value = float(eps)
    _need(math.isfinite(value) and (value > 0 if positive else value >= 0))
    return value


# --------------------------------------------------------------------------------------
# layer norm
# --------------------------------------------------------------------------------------


def _layer_norm(
    x: Any, normalized_shape: Any, weight: Any, bias: Any, eps: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = _input(x)
    if isinstance(normalized_shape, int) and not isinstance(normalized_shape, bool):
        normalized_shape = (normalized_shape,)
    _need(isinstance(normalized_shape, (Sequence, torch.Size)))
    shape = tuple(int(s) for s in normalized_shape)
    k = len(shape)
    _need(0 < k <= x.dim() and tuple(x.shape[x.dim() - k :]) == shape)
    weight, bias = _optional(weight, shape), _optional(bias, shape)
    dims = tuple(range(-k, 0))
    y, mean, rstd = _normalise(x.to(_compute_dtype(x)), dims, _eps(eps))
    return _affine(y, weight, bias, shape).to(x.dtype), mean, rstd


def _functional_layer_norm(
    input: Any,
    normalized_shape: Any,
    weight: Any = None,
    bias: Any = None,
    eps: Any = 1e-5,
) -> torch.Tensor:
    return _layer_norm(input, normalized_shape, weight, bias, eps)[0]


def _torch_layer_norm(
    input: Any,
    normalized_shape: Any,
    weight: Any = None,
    bias: Any = None,
    eps: Any = 1e-5,
    cudnn_enable: Any = True,
) -> torch.Tensor:
    return _layer_norm(input, normalized_shape, weight, bias, eps)[0]


def _native_layer_norm(
    input: Any, normalized_shape: Any, weight: Any, bias: Any, eps: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # The fused op returns float32 statistics for low-precision inputs on some devices
    # and the input dtype on others; leave those to it.
    _need(isinstance(input, torch.Tensor) and input.dtype not in _LOW_PRECISION)
    out, mean, rstd = _layer_norm(input, normalized_shape, weight, bias, eps)
    # The fused op's statistics are outputs without derivatives.
    return out, mean.detach(), rstd.detach()


# --------------------------------------------------------------------------------------
# batch norm and instance norm
# --------------------------------------------------------------------------------------


def _channel_shape(x: torch.Tensor) -> tuple[int, ...]:
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def _by_fixed_statistics(
    x: torch.Tensor,
    running_mean: Any,
    running_var: Any,
    weight: Any,
    bias: Any,
    eps: Any,
) -> torch.Tensor:
    """Evaluation-mode normalisation by the given per-channel statistics."""
    channels = (x.shape[1],)
    mean, var = _required(running_mean, channels), _required(running_var, channels)
    weight, bias = _optional(weight, channels), _optional(bias, channels)
    shape = _channel_shape(x)
    dtype = _compute_dtype(x)
    rstd = torch.rsqrt(var.to(dtype) + _eps(eps))
    y = (x.to(dtype) - mean.to(dtype).reshape(shape)) * rstd.reshape(shape)
    return _affine(y, weight, bias, shape).to(x.dtype)


def _by_own_statistics(
    x: torch.Tensor, dims: tuple[int, ...], weight: Any, bias: Any, eps: float
) -> torch.Tensor:
    """Normalisation by the input's own per-channel statistics over `dims`."""
    channels = (x.shape[1],)
    weight, bias = _optional(weight, channels), _optional(bias, channels)
    _need(math.prod(x.shape[d] for d in dims) > 1)
    y, _, _ = _normalise(x.to(_compute_dtype(x)), dims, eps)
    return _affine(y, weight, bias, _channel_shape(x)).to(x.dtype)


def _batch_norm(
    x: Any,
    weight: Any,
    bias: Any,
    running_mean: Any,
    running_var: Any,
    training: Any,
    eps: Any,
) -> torch.Tensor:
    x = _input(x)
    _need(x.dim() >= 2 and isinstance(training, bool))
    if not training:
        return _by_fixed_statistics(x, running_mean, running_var, weight, bias, eps)
    # Batch statistics: routed where nothing is updated in place, or where the running
    # statistics are a module's copies whose updates are discarded.
    _need(_DISCARDING.get() or (running_mean is None and running_var is None))
    dims = (0, *range(2, x.dim()))
    return _by_own_statistics(x, dims, weight, bias, _eps(eps, positive=True))


def _functional_batch_norm(
    input: Any,
    running_mean: Any,
    running_var: Any,
    weight: Any = None,
    bias: Any = None,
    training: Any = False,
    momentum: Any = 0.1,
    eps: Any = 1e-5,
) -> torch.Tensor:
    return _batch_norm(input, weight, bias, running_mean, running_var, training, eps)


def _torch_batch_norm(
    input: Any,
    weight: Any,
    bias: Any,
    running_mean: Any,
    running_var: Any,
    training: Any,
    momentum: Any,
    eps: Any,
    cudnn_enabled: Any,
) -> torch.Tensor:
    return _batch_norm(input, weight, bias, running_mean, running_var, training, eps)


def _instance_norm(
    x: Any,
    weight: Any,
    bias: Any,
    running_mean: Any,
    running_var: Any,
    use_input_stats: Any,
    eps: Any,
) -> torch.Tensor:
    x = _input(x)
    _need(x.dim() >= 3 and isinstance(use_input_stats, bool))
    if not use_input_stats:
        return _by_fixed_statistics(x, running_mean, running_var, weight, bias, eps)
    # Input statistics: routed where no running statistics are updated, or where they
    # are a module's copies whose updates are discarded.
    _need(_DISCARDING.get() or (running_mean is None and running_var is None))
    return _by_own_statistics(x, tuple(range(2, x.dim())), weight, bias, _eps(eps))


def _functional_instance_norm(
    input: Any,
    running_mean: Any = None,
    running_var: Any = None,
    weight: Any = None,
    bias: Any = None,
    use_input_stats: Any = True,
    momentum: Any = 0.1,
    eps: Any = 1e-5,
) -> torch.Tensor:
    return _instance_norm(input, weight, bias, running_mean, running_var, use_input_stats, eps)


def _torch_instance_norm(
    input: Any,
    weight: Any,
    bias: Any,
    running_mean: Any,
    running_var: Any,
    use_input_stats: Any,
    momentum: Any,
    eps: Any,
    cudnn_enabled: Any,
) -> torch.Tensor:
    return _instance_norm(input, weight, bias, running_mean, running_var, use_input_stats, eps)


# --------------------------------------------------------------------------------------
# embedding with a padding index
# --------------------------------------------------------------------------------------


def _embedding(indices: Any, weight: Any, padding_idx: Any) -> torch.Tensor:
    """The lookup, with the looked-up padding rows held constant (what reverse mode does)."""
    _need(isinstance(indices, torch.Tensor) and not indices.is_floating_point())
    _need(isinstance(weight, torch.Tensor) and weight.dim() == 2)
    _need(isinstance(padding_idx, int) and not isinstance(padding_idx, bool))
    rows = int(weight.shape[0])
    _need(-rows <= padding_idx < rows)
    pad = padding_idx % rows
    out = F.embedding(indices, weight)
    return torch.where((indices == pad).unsqueeze(-1), out.detach(), out)


def _functional_embedding(
    input: Any,
    weight: Any,
    padding_idx: Any = None,
    max_norm: Any = None,
    norm_type: Any = 2.0,
    scale_grad_by_freq: Any = False,
    sparse: Any = False,
) -> torch.Tensor:
    # Without a padding index or a max_norm there is nothing to correct; the other two
    # change the backward: left to the original.
    _need(scale_grad_by_freq is False and sparse is False)
    if max_norm is not None:
        return _renormed_embedding(input, weight, padding_idx, max_norm, norm_type)
    _need(padding_idx is not None)
    return _embedding(input, weight, padding_idx)


def _torch_embedding(
    weight: Any,
    indices: Any,
    padding_idx: Any = -1,
    scale_grad_by_freq: Any = False,
    sparse: Any = False,
) -> torch.Tensor:
    # torch.embedding spells "no padding index" as a negative one.
    _need(isinstance(padding_idx, int) and padding_idx >= 0)
    _need(scale_grad_by_freq is False and sparse is False)
    return _embedding(indices, weight, padding_idx)


# --------------------------------------------------------------------------------------
# embedding with a max_norm (renormalises the weight in place)
# --------------------------------------------------------------------------------------


def _renormed_embedding(
    indices: Any, weight: Any, padding_idx: Any, max_norm: Any, norm_type: Any
) -> torch.Tensor:
    """The lookup of rows renormalised to `max_norm`, without writing the weight.

    ``F.embedding`` renormalises the looked-up rows of the weight in place under
    ``no_grad`` and then looks them up: the values are the renormalised rows, the
    derivative that of the plain lookup. The same here, out of place.
    """
    _need(isinstance(indices, torch.Tensor) and not indices.is_floating_point())
    _need(isinstance(weight, torch.Tensor) and weight.dim() == 2)
    _need(weight.dtype in _ROUTED_DTYPES)
    bound, order = _eps(max_norm), _eps(norm_type, positive=True)
    if padding_idx is not None:
        _need(isinstance(padding_idx, int) and not isinstance(padding_idx, bool))
        _need(-weight.shape[0] <= padding_idx < weight.shape[0])
        out = _embedding(indices, weight, padding_idx)
    else:
        out = F.embedding(indices, weight)
    with torch.no_grad():
        norms = torch.linalg.vector_norm(out, order, dim=-1, keepdim=True)
        # embedding_renorm_'s rule: rows above the bound scale to bound / (norm + 1e-7).
        scale = torch.where(norms > bound, bound / (norms + 1e-7), torch.ones_like(norms))
    return out + (out * (scale - 1)).detach()


# --------------------------------------------------------------------------------------
# scaled dot-product attention
# --------------------------------------------------------------------------------------


def _attention_tensor(t: Any, dtype: torch.dtype) -> torch.Tensor:
    _need(isinstance(t, torch.Tensor) and t.dtype == dtype and t.dim() >= 2)
    _need(not t.is_nested)
    tensor: torch.Tensor = t
    return tensor


def _scaled_dot_product_attention(
    query: Any,
    key: Any,
    value: Any,
    attn_mask: Any = None,
    dropout_p: Any = 0.0,
    is_causal: Any = False,
    scale: Any = None,
    enable_gqa: Any = False,
) -> torch.Tensor:
    """The math kernel of ``F.scaled_dot_product_attention``, in differentiable ops.

    ``softmax(q k^T * scale + mask) v`` with the kernel's conventions: the scale split
    as its square root over ``q`` and ``k``, a boolean mask (or ``is_causal``) keeps
    the entries that are True, a float mask is added, rows with every entry masked
    give zeros (``_safe_softmax``), and ``enable_gqa`` repeats key and value heads.
    """
    _need(isinstance(query, torch.Tensor) and query.dtype in _ROUTED_DTYPES)
    q = _attention_tensor(query, query.dtype)
    k, v = _attention_tensor(key, q.dtype), _attention_tensor(value, q.dtype)
    _need(isinstance(is_causal, bool) and isinstance(enable_gqa, bool))
    _need(not (is_causal and attn_mask is not None))
    p = _eps(dropout_p)
    _need(p < 1.0)
    _need(q.shape[-1] == k.shape[-1] and k.shape[-2] == v.shape[-2])
    _need(q.dim() == k.dim() == v.dim())
    if enable_gqa and q.dim() >= 3:
        heads, kv_heads, v_heads = q.shape[-3], k.shape[-3], v.shape[-3]
        _need(kv_heads > 0 and v_heads > 0 and heads % kv_heads == 0 and heads % v_heads == 0)
        k = k.repeat_interleave(heads // kv_heads, dim=-3)
        v = v.repeat_interleave(heads // v_heads, dim=-3)
    _need(q.shape[:-2] == k.shape[:-2] == v.shape[:-2])
    if scale is None:
        factor = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
    else:
        _need(isinstance(scale, (int, float)) and not isinstance(scale, bool))
        factor = float(scale)
    length, source = q.shape[-2], k.shape[-2]
    mask: torch.Tensor | None = None
    if is_causal:
        mask = torch.ones(length, source, dtype=torch.bool, device=q.device).tril()
    elif attn_mask is not None:
        _need(isinstance(attn_mask, torch.Tensor))
        _need(attn_mask.dtype == torch.bool or attn_mask.dtype == q.dtype)
        _need(attn_mask.dim() <= q.dim() and not attn_mask.is_nested)
        mask = attn_mask
    dtype = _compute_dtype(q)
    root = math.sqrt(abs(factor))
    qs = q.to(dtype) * (root if factor >= 0 else -root)
    scores = qs @ (k.to(dtype) * root).transpose(-2, -1)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, -math.inf)
        else:
            scores = scores + mask.to(dtype)
        # _safe_softmax: a row masked everywhere attends to nothing (zeros, no NaN).
        empty = (scores == -math.inf).all(dim=-1, keepdim=True)
        weights = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1)
        weights = weights.masked_fill(empty, 0.0)
    else:
        weights = torch.softmax(scores, dim=-1)
    if p > 0:
        weights = F.dropout(weights, p, training=True)
    return (weights @ v.to(dtype)).to(q.dtype)


# --------------------------------------------------------------------------------------
# recurrent layers: RNN (tanh, relu), GRU, LSTM and their cells
# --------------------------------------------------------------------------------------


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def _rnn_step(kind: str, gi: torch.Tensor, h: Any, w_hh: Any, b_hh: Any, w_hr: Any) -> Any:
    """One time step from the input projection `gi`; `h` is ``(h, c)`` for LSTM."""
    if kind == "lstm":
        hx, cx = h
        gates = gi + _linear(hx, w_hh, b_hh)
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * cx + torch.sigmoid(i) * torch.tanh(g)
        out = torch.sigmoid(o) * torch.tanh(c)
        if w_hr is not None:
            out = _linear(out, w_hr, None)
        return out, c
    gh = _linear(h, w_hh, b_hh)
    if kind == "gru":
        i_r, i_z, i_n = gi.chunk(3, dim=-1)
        h_r, h_z, h_n = gh.chunk(3, dim=-1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return n + z * (h - n)
    pre = gi + gh
    return torch.tanh(pre) if kind == "rnn_tanh" else torch.relu(pre)


def _rnn_weights(params: Any) -> list[torch.Tensor]:
    _need(isinstance(params, (list, tuple)) and len(params) > 0)
    _need(all(isinstance(p, torch.Tensor) and p.dtype in _ROUTED_DTYPES for p in params))
    return list(params)


def _rnn_flags(*flags: Any) -> None:
    _need(all(isinstance(f, bool) for f in flags))


def _rnn(kind: str, *args: Any, **kwargs: Any) -> Any:
    """``torch.rnn_tanh`` / ``rnn_relu`` / ``gru`` / ``lstm`` on padded (not packed) input."""
    # The packed overload (data, batch_sizes, hx, params, ...) is left to the original.
    _need(not kwargs and len(args) == 9 and isinstance(args[3], bool))
    x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first = args
    _rnn_flags(has_biases, train, bidirectional, batch_first)
    _need(isinstance(num_layers, int) and not isinstance(num_layers, bool) and num_layers > 0)
    p = _eps(dropout)
    weights = _rnn_weights(params)
    _need(isinstance(x, torch.Tensor) and x.dim() == 3 and x.dtype in _ROUTED_DTYPES)
    directions = 2 if bidirectional else 1
    stacks = num_layers * directions
    _need(len(weights) % stacks == 0)
    per = len(weights) // stacks
    base = 4 if has_biases else 2
    _need(per == base or (kind == "lstm" and per == base + 1))
    if kind == "lstm":
        _need(isinstance(hx, (list, tuple)) and len(hx) == 2)
        states = [_attention_tensor(t, x.dtype) for t in hx]
    else:
        states = [_attention_tensor(hx, x.dtype)]
    _need(all(t.dim() == 3 and t.shape[0] == stacks for t in states))
    seq = x.transpose(0, 1) if batch_first else x  # [T, N, F]
    final: list[list[torch.Tensor]] = [[] for _ in states]
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            index = layer * directions + direction
            w = weights[index * per : (index + 1) * per]
            w_ih, w_hh = w[0], w[1]
            b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
            w_hr = w[base] if per > base else None
            gi = _linear(seq, w_ih, b_ih)
            h: Any = (states[0][index], states[1][index]) if kind == "lstm" else states[0][index]
            steps = range(seq.shape[0] - 1, -1, -1) if direction else range(seq.shape[0])
            out: list[torch.Tensor] = []
            for t in steps:
                h = _rnn_step(kind, gi[t], h, w_hh, b_hh, w_hr)
                out.append(h[0] if kind == "lstm" else h)
            if direction:
                out.reverse()
            outputs.append(torch.stack(out) if out else gi.new_zeros(0))
            for slot, value in zip(final, h if kind == "lstm" else (h,), strict=True):
                slot.append(value)
        seq = outputs[0] if directions == 1 else torch.cat(outputs, dim=-1)
        if p > 0 and train and layer < num_layers - 1:
            seq = F.dropout(seq, p, training=True)
    output = seq.transpose(0, 1) if batch_first else seq
    return (output, *(torch.stack(slot) for slot in final))


def _rnn_cell(kind: str, *args: Any, **kwargs: Any) -> Any:
    """``torch.rnn_tanh_cell`` / ``rnn_relu_cell`` / ``gru_cell`` / ``lstm_cell``."""
    _need(not kwargs and 4 <= len(args) <= 6)
    x, hx, w_ih, w_hh = args[:4]
    b_ih, b_hh = (*args[4:], None, None)[:2]
    _need(isinstance(x, torch.Tensor) and x.dtype in _ROUTED_DTYPES and x.dim() in (1, 2))
    weights = [_attention_tensor(w, x.dtype) for w in (w_ih, w_hh)]
    biases = [None if b is None else _attention_tensor_1d(b, x.dtype) for b in (b_ih, b_hh)]
    if kind == "lstm":
        _need(isinstance(hx, (list, tuple)) and len(hx) == 2)
        state: Any = tuple(_state(t, x) for t in hx)
    else:
        state = _state(hx, x)
    gi = _linear(x, weights[0], biases[0])
    return _rnn_step(kind, gi, state, weights[1], biases[1], None)


def _attention_tensor_1d(t: Any, dtype: torch.dtype) -> torch.Tensor:
    _need(isinstance(t, torch.Tensor) and t.dtype == dtype and t.dim() == 1)
    tensor: torch.Tensor = t
    return tensor


def _state(t: Any, x: torch.Tensor) -> torch.Tensor:
    _need(isinstance(t, torch.Tensor) and t.dtype == x.dtype and t.dim() == x.dim())
    tensor: torch.Tensor = t
    return tensor


# --------------------------------------------------------------------------------------
# weight norm
# --------------------------------------------------------------------------------------


def _weight_norm(v: Any, g: Any, dim: Any = 0) -> torch.Tensor:
    """``v * g / ||v||`` with the norm over every dim but `dim` (all of them for -1)."""
    _need(isinstance(v, torch.Tensor) and v.dtype in (torch.float64, torch.float32))
    _need(isinstance(g, torch.Tensor) and g.dtype == v.dtype)
    _need(isinstance(dim, int) and not isinstance(dim, bool) and -1 <= dim < max(v.dim(), 1))
    if dim == -1:
        norm = torch.linalg.vector_norm(v)
    else:
        dims = tuple(d for d in range(v.dim()) if d != dim)
        norm = torch.linalg.vector_norm(v, dim=dims, keepdim=True) if dims else v.abs()
    out: torch.Tensor = v * (g / norm)
    return out


# --------------------------------------------------------------------------------------
# the mode
# --------------------------------------------------------------------------------------

#: The routed callables and their decompositions (same signatures).
_RULES: dict[Any, Callable[..., Any]] = {
    F.layer_norm: _functional_layer_norm,
    torch.layer_norm: _torch_layer_norm,
    torch.native_layer_norm: _native_layer_norm,
    F.batch_norm: _functional_batch_norm,
    torch.batch_norm: _torch_batch_norm,
    F.instance_norm: _functional_instance_norm,
    torch.instance_norm: _torch_instance_norm,
    F.embedding: _functional_embedding,
    torch.embedding: _torch_embedding,
    F.scaled_dot_product_attention: _scaled_dot_product_attention,
    torch.rnn_tanh: partial(_rnn, "rnn_tanh"),
    torch.rnn_relu: partial(_rnn, "rnn_relu"),
    torch.gru: partial(_rnn, "gru"),
    torch.lstm: partial(_rnn, "lstm"),
    torch.rnn_tanh_cell: partial(_rnn_cell, "rnn_tanh"),
    torch.rnn_relu_cell: partial(_rnn_cell, "rnn_relu"),
    torch.gru_cell: partial(_rnn_cell, "gru"),
    torch.lstm_cell: partial(_rnn_cell, "lstm"),
    torch._weight_norm: _weight_norm,
}


def _without_dispatch(func: Any) -> Callable[..., Any] | None:
    """A copy of the Python function `func` whose torch-function dispatch check is off
    (``has_torch_function*`` read as False), or None if `func` is not such a function."""
    if not isinstance(func, FunctionType):
        return None
    names = ("has_torch_function", "has_torch_function_unary", "has_torch_function_variadic")
    scope = dict(func.__globals__)
    if not any(name in scope for name in names):
        return None
    scope.update(dict.fromkeys(names, lambda *args: False))
    copy = FunctionType(func.__code__, scope, func.__name__, func.__defaults__, func.__closure__)
    copy.__kwdefaults__ = func.__kwdefaults__
    return copy


#: Python functions whose bodies call routed ops (``nn.MultiheadAttention`` calls
#: ``F.multi_head_attention_forward``, which calls ``F.scaled_dot_product_attention``),
#: and copies of them that run under the mode without dispatching to it again.
_ROUTED_BODIES: dict[Any, Callable[..., Any]] = {
    func: body
    for func in (F.multi_head_attention_forward,)
    if (body := _without_dispatch(func)) is not None
}

#: The qualified names of the callables `corrected_ops` routes.
ROUTED_OPS: tuple[str, ...] = (
    "torch.nn.functional.layer_norm",
    "torch.layer_norm",
    "torch.native_layer_norm",
    "torch.nn.functional.batch_norm",
    "torch.batch_norm",
    "torch.nn.functional.instance_norm",
    "torch.instance_norm",
    "torch.nn.functional.embedding",
    "torch.embedding",
    "torch.nn.functional.scaled_dot_product_attention",
    "torch.rnn_tanh",
    "torch.rnn_relu",
    "torch.gru",
    "torch.lstm",
    "torch.rnn_tanh_cell",
    "torch.rnn_relu_cell",
    "torch.gru_cell",
    "torch.lstm_cell",
    "torch._weight_norm",
)


class _CorrectedOpsMode(TorchFunctionMode):
    """Calls the decomposition of a routed op; every other call passes straight on."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if kwargs is None:
            kwargs = {}
        rule = _RULES.get(func)
        observed = _OBSERVED.get()
        if observed is not None and (rule is not None or func in _ROUTED_BODIES):
            observed.append(getattr(func, "__name__", repr(func)))
        if rule is not None:
            try:
                return rule(*args, **kwargs)
            except _Unsupported:
                pass  # arguments the rule leaves to the original op
            except TypeError as error:
                # The arguments do not bind to the op's signature (raised at the call,
                # not inside the rule): the original raises its own error.
                if error.__traceback__ is None or error.__traceback__.tb_next is not None:
                    raise
        body = _ROUTED_BODIES.get(func)
        if body is not None:
            # A Python function that calls routed ops: a torch-function mode runs its
            # handler's call with the mode popped, which would hide those calls; run the
            # function's body (its own dispatch check off) with the mode on instead.
            with corrected_ops():
                return body(*args, **kwargs)
        return func(*args, **kwargs)


_MODE = _CorrectedOpsMode()


def _active() -> bool:
    """Whether a `corrected_ops` mode is on this thread's torch-function mode stack."""
    for index in range(torch._C._len_torch_function_stack()):
        if isinstance(torch._C._get_function_stack_at(index), _CorrectedOpsMode):
            return True
    return False


class _CorrectedOps:
    """The context manager `corrected_ops` returns (nesting-aware, re-entrant)."""

    __slots__ = ("_pushed",)

    def __init__(self) -> None:
        self._pushed: list[bool] = []

    def __enter__(self) -> None:
        push = not _UNROUTED.get() and not _active()
        if push:
            _MODE.__enter__()  # type: ignore[no-untyped-call]
        self._pushed.append(push)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._pushed.pop():
            _MODE.__exit__(exc_type, exc, traceback)  # type: ignore[no-untyped-call]


def corrected_ops() -> _CorrectedOps:
    """Route normalisation layers through primitive ops with correct second derivatives.

    A context manager around a `torch.overrides.TorchFunctionMode`: inside it, the
    calls listed in `ROUTED_OPS` (layer norm, batch norm in evaluation or without
    running statistics, instance norm, embedding with a padding index; see the module
    docstring for why and for what is left alone) run as decompositions into ``mean``,
    ``sub``, ``mul``, ``rsqrt``, ``add`` and plain lookups, so every `torch.func`
    composition (``jacfwd(jacrev)``, ``jacrev(jacrev)``, ``jacrev(jacfwd)``,
    ``jacfwd(jacfwd)``, under `torch.func.vmap`) and autograd's double backward get
    their second derivatives right. The forward values equal the fused ops' up to
    rounding. The mode works at the level of Python calls, above torch.func's
    transforms: it can be entered outside or inside them, and it sees the calls of
    modules run with `torch.func.functional_call` (``nn.LayerNorm`` calls
    ``F.layer_norm``).

    Entering and leaving cost about two microseconds; nested entries are harmless (an
    inner one does nothing while an outer one is active). Inside, every op call that is
    not routed pays the toll of any Python torch-function mode (a couple of
    microseconds) plus one dictionary lookup.

    Returns:
        A context manager; ``with corrected_ops(): ...`` routes the ops in its body.

    Example:
        The mixed block ``d/dx (df/dw)`` of ``f(x, w) = sum(c * layer_norm(x, w))`` is
        ``diag(c) J`` with ``J = (I - 1/n - xhat xhat^T / n) / sigma`` the Jacobian of the
        normalisation:

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch.func import jacfwd, jacrev
        >>> from torchcurv._decompositions import corrected_ops
        >>> n = 5
        >>> x, w, c = torch.randn(3, n, dtype=torch.float64).unbind()
        >>> f = lambda x, w: (c * F.layer_norm(x, (n,), w, eps=0.0)).sum()
        >>> with corrected_ops():
        ...     H = jacfwd(jacrev(f, argnums=(0, 1)), argnums=(0, 1))(x, w)
        >>> sigma = x.var(unbiased=False).sqrt()
        >>> xhat = (x - x.mean()) / sigma
        >>> I = torch.eye(n, dtype=torch.float64)
        >>> J = (I - 1 / n - torch.outer(xhat, xhat) / n) / sigma
        >>> torch.allclose(H[1][0], torch.diag(c) @ J)
        True
        >>> torch.allclose(H[0][1], H[1][0].T)  # and the Hessian is symmetric
        True
    """
    return _CorrectedOps()
