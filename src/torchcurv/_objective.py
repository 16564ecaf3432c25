"""A module, inputs and a choice of what to differentiate, as a per-sample objective.

`Objective` holds the checked request of a module-level call (``wrt``, ``output``,
``loss``/``targets``, ``params``, ``kwargs``) and gives the function of one sample that
every engine differentiates: ``objective.per_sample(diff, xs, target)``, where ``diff``
is the differentiated pytree (the sample's inputs, the selected parameters, or both).
Each sample is fed to the module alone, as a batch of one, so samples never mix.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._checks import as_inputs, check_layers, check_module, check_objective
from ._compat import tree_flatten, tree_map
from ._decompositions import observing_routes
from ._errors import TorchcurvError, argument_error, describe
from ._functional import InPlaceWrites, functional_of, in_place_message
from ._types import WRT, LossFunction, OutputSelection, ParamSelection

__all__ = [
    "FirstForward",
    "Objective",
    "itemsize",
    "label",
    "module_state",
    "numel",
    "per_sample_objective",
    "usable",
]


@dataclass(frozen=True)
class FirstForward:
    """What the forward of one sample showed, cached per module state and call signature.

    Attributes:
        out_shape: Shape of one sample's differentiated output.
        classes: Size of dim 1 of the module's (batch-of-one) output, when it has one
            (the class count a cross-entropy or NLL target must respect).
        routed: The ops of `torchcurv._decompositions.ROUTED_OPS` the forward called;
            when empty, derivatives run without the `corrected_ops` mode.
        written: The buffers the forward writes in place (a running mean, a counter);
            each sample then gets its own copy of them, and the updates are discarded.
        inputs_written: Whether the forward writes its inputs in place; they are then
            copied inside the derivative, for each sample.
        direct: Whether the selected output is one index into the module's output
            (``out[0, output]``), checked once.
        model_numel: Entries of the module's output for one sample (a tensor with the
            batch of one first; 0 otherwise): the split point of a Gauss-Newton matrix.
    """

    out_shape: tuple[int, ...]
    classes: int | None
    routed: tuple[str, ...]
    written: tuple[str, ...]
    inputs_written: bool = False
    direct: bool = False
    model_numel: int = 0


# torch's dictionaries of global module hooks (registering one adds to them).
_GLOBAL_HOOKS = tuple(
    getattr(nn.modules.module, f"_global_{kind}", {})
    for kind in ("forward_hooks", "forward_pre_hooks", "backward_hooks", "backward_pre_hooks")
)
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def module_state(module: nn.Module) -> tuple[Any, ...]:
    """What a module's first forward (routing, written buffers, shapes), its engine and
    its memory depend on besides the inputs: the tree of submodules (each one's
    identity, type, training flag and hooks) and the identity, storage, layout (shape,
    strides, offset), dtype, device and ``requires_grad`` of every parameter and buffer
    (not their values: a training step that updates weights in place keeps the caches;
    a ``.data`` swap does not).
    """
    # One walk over the submodules, reading their dictionaries directly (the
    # named_* iterators build prefixed names and deduplicate: 3x slower on small models).
    state: list[Any] = [tuple(tuple(hooks) for hooks in _GLOBAL_HOOKS)]
    append = state.append
    stack, seen = [module], set()
    while stack:
        m = stack.pop()
        if id(m) in seen:
            append(id(m))  # shared: once
            continue
        seen.add(id(m))
        d = m.__dict__
        try:
            training, children, parameters, buffers = (
                d["training"], d["_modules"], d["_parameters"], d["_buffers"])  # fmt: skip
        except KeyError:  # a module that keeps them elsewhere
            training, children, parameters, buffers = (
                m.training, m._modules, m._parameters, m._buffers)  # fmt: skip
        append((id(m), type(m), training, len(children)))
        for kind in _HOOKS:
            hooks = d[kind] if kind in d else getattr(m, kind, None)
            if hooks:
                append((kind, tuple(hooks)))
        for tensors in (parameters, buffers):
            for n, t in tensors.items():
                if t is not None:
                    append((n, id(t), t.data_ptr(), t.shape, t.stride(), t.storage_offset(),
                            t.dtype, t.device, t.requires_grad))  # fmt: skip
        if children:
            stack.extend(child for child in reversed(children.values()) if child is not None)
    return tuple(state)


def _select_output(function: str, out: Any, output: OutputSelection) -> torch.Tensor:
    if output is None:
        selected = out
    elif callable(output):
        selected = output(out)
    elif isinstance(out, (tuple, list)) and isinstance(output, int):
        selected = out[output]
    else:
        try:
            selected = out[output]
        except (IndexError, TypeError, KeyError) as error:
            shape = describe(out)
            raise TorchcurvError(
                f"{function}: output={output!r} cannot index the per-sample output {shape}: "
                f"{error}. Use an index valid for one sample's output (batch dim removed)."
            ) from None
    if not isinstance(selected, torch.Tensor):
        argument_error(
            function,
            "output",
            "did not produce a tensor",
            selected,
            "Select a tensor, e.g. output=0 for the first element of a tuple "
            "output, or output=lambda out: out['logits'].",
        )
    return selected


def _drop_batch(function: str, out: Any) -> Any:
    if isinstance(out, torch.Tensor) and out.dim() and out.shape[0] == 1:
        return out[0]

    def first(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != 1:
            argument_error(
                function,
                "module",
                "must return outputs with a leading batch dim",
                t,
                "torchcurv feeds one sample as a batch of one; return (1, ...) "
                "outputs, or wrap the module.",
            )
        return t[0]

    return tree_map(first, out)


def _loss_value(function: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        argument_error(
            function,
            "loss",
            "must return a scalar (one-element) tensor",
            value,
            "Use a reduction such as reduction='mean' or 'sum'.",
        )
    return value.reshape(())


class Objective:
    """A module and a choice of what to differentiate, as functions of one sample."""

    def __init__(
        self,
        function: str,
        module: nn.Module,
        inputs: Any,
        *,
        wrt: Any,
        params: ParamSelection,
        output: OutputSelection,
        loss: LossFunction | None,
        targets: torch.Tensor | None,
        kwargs: Mapping[str, Any] | None,
        create_graph: bool = False,
        argnums: int | tuple[int, ...] | None = None,
        aliased: bool = False,
        vectors: Any = None,
    ) -> None:
        check_module(function, module)
        if wrt not in WRT:
            argument_error(
                function,
                "wrt",
                "must be 'inputs', 'params' or 'both'",
                wrt,
                "Pass wrt='inputs' (input curvature) or wrt='params'.",
            )
        check_objective(function, output, loss, targets)
        if kwargs is not None and not isinstance(kwargs, Mapping):
            argument_error(
                function,
                "kwargs",
                "must be a dict of keyword arguments",
                kwargs,
                "Pass kwargs={'mask': mask}.",
            )
        self.function, self.module, self.wrt = function, module, wrt
        self.output, self.loss, self.targets = output, loss, targets
        self.kwargs = dict(kwargs or {})
        self.create_graph = create_graph
        xs, self.argnums, self.single = as_inputs(function, inputs, wrt, argnums)
        #: positional inputs passed along per sample, not differentiated
        self.rest = tuple(i for i in range(len(xs)) if i not in self.argnums)
        self.xs = tuple(usable(x, create_graph) for x in xs)
        if targets is not None:
            self.targets = usable(targets, False)
        if wrt == "inputs" and params is not None:
            argument_error(
                function,
                "params",
                "only applies with wrt='params' or wrt='both'",
                params,
                "Drop params=, or pass wrt='params'.",
            )
        # Aliases of the parameters and buffers (no copies) for per-sample calls, whose
        # first forward runs on copies and finds the buffers and inputs the forward writes.
        self.aliased = aliased and not create_graph  # else `fn` copies inputs and buffers
        # Whether the forward is routed (`corrected_ops`), read by `fn` at each call (a
        # cell, not `self`: copies of this objective must not keep its inputs alive).
        self._routed = [True]
        self.fn, self.params = functional_of(
            function,
            module,
            params,
            select=wrt != "inputs",
            attached=create_graph,
            aliased=self.aliased,
            routing=lambda cell=self._routed: cell[0],  # type: ignore[misc]
        )
        #: Set by `adopt` from the first forward.
        self.written: tuple[str, ...] = ()
        self.inputs_written = False
        self.direct = False
        #: Per-sample vectors, shaped like the differentiated pytree with a batch dim
        #: (`per_sample_hvp`), passed to the derivative as a fifth argument.
        self.vectors = None
        if vectors is not None:
            self.vectors = self._checked_vectors(vectors)

    def _checked_vectors(self, vectors: Any) -> Any:
        """`vectors` with the structure of the differentiated pytree, each leaf with the
        batch dim first and the leaf's shape, dtype and device (dict keys in any order)."""
        size = self.batch_size()
        like = self.diff(self.xs)
        batched = self.in_dims()[0]

        def match(v: Any, leaf: Any, dims: Any, where: str) -> Any:
            if isinstance(leaf, Mapping):
                if not isinstance(v, Mapping) or set(v) != set(leaf):
                    keys = list(leaf)
                    argument_error(
                        self.function,
                        where,
                        f"must be a dict with the keys {keys}",
                        sorted(v) if isinstance(v, Mapping) else v,
                        "Give one vector per differentiated tensor, keyed as the "
                        "result of per_sample_hessian is.",
                    )
                sub = dims if isinstance(dims, Mapping) else dict.fromkeys(leaf, dims)
                return {k: match(v[k], leaf[k], sub[k], f"{where}[{k!r}]") for k in leaf}
            if isinstance(leaf, tuple):
                if not isinstance(v, tuple) or len(v) != len(leaf):
                    argument_error(
                        self.function,
                        where,
                        f"must be a tuple of {len(leaf)} tensors (one per differentiated input)",
                        v,
                        "Give one vector per differentiated input.",
                    )
                per_input = dims if isinstance(dims, tuple) else (dims,) * len(leaf)
                return tuple(
                    match(a, b, d, f"{where}[{i}]")
                    for i, (a, b, d) in enumerate(zip(v, leaf, per_input, strict=True))
                )
            shape = (size, *(leaf.shape if dims is None else leaf.shape[1:]))
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != shape:
                argument_error(
                    self.function,
                    where,
                    f"must be a tensor of shape {shape} (the batch of {size}, then the "
                    "differentiated tensor's shape)",
                    v,
                    "Give each sample its own vector, batch dim first.",
                )
            if v.dtype != leaf.dtype or v.device != leaf.device:
                argument_error(
                    self.function,
                    where,
                    f"must have the dtype and device of what it multiplies "
                    f"({leaf.dtype}, {leaf.device})",
                    v,
                    f"Convert it: v.to({leaf.dtype}).",
                )
            return usable(v, self.create_graph)

        return match(vectors, like, batched, "vectors")

    def diff(self, xs: tuple[Any, ...]) -> Any:
        """The differentiated pytree for inputs `xs` (one sample or the whole batch)."""
        if self.wrt == "params":
            return self.params
        selected = tuple(xs[i] for i in self.argnums)
        x = selected[0] if self.single else selected
        if self.wrt == "inputs":
            return x
        return {"inputs": x, "params": self.params}

    def passed(self, xs: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """The inputs of `xs` passed along undifferentiated (None if there are none)."""
        return tuple(xs[i] for i in self.rest) if self.rest else None

    def _split(self, diff: Any, rest: Any) -> tuple[Mapping[str, torch.Tensor], tuple[Any, ...]]:
        if self.wrt == "params":
            return diff, rest
        if self.wrt == "inputs":
            params, x = self.params, diff
        else:
            params, x = diff["params"], diff["inputs"]
        selected = (x,) if self.single else tuple(x)
        xs: list[Any] = [None] * (len(self.argnums) + len(self.rest))
        for i, value in zip(self.argnums, selected, strict=True):
            xs[i] = value
        for i, value in zip(self.rest, rest or (), strict=True):
            xs[i] = value
        return params, tuple(xs)

    def per_sample(
        self,
        diff: Any,
        xs: Any,
        target: Any,
        buffers: Mapping[str, Any] | None = None,
        vectors: Any = None,
    ) -> torch.Tensor:
        """The objective of one sample (fed to the module as a batch of one); `xs` holds
        the inputs passed along undifferentiated (`passed`), `buffers` the sample's own
        copies of the buffers the forward writes (`written`; copied again here, so the
        writes land on copies); `vectors` are the derivative's, not the objective's."""
        return self._objective(self.sample_output(diff, xs, buffers), target)

    def sample_output(self, diff: Any, xs: Any, buffers: Mapping[str, Any] | None = None) -> Any:
        """The module's output for one sample, as a batch of one (before output
        selection and loss; arguments as `per_sample`'s)."""
        params, xs = self._split(diff, xs)
        if buffers:
            params = {**params, **{n: b.clone() for n, b in buffers.items()}}
        kwargs = self.kwargs
        if self.aliased and self.inputs_written:
            xs = tree_map(_copy, xs)
        if self.aliased and kwargs:
            kwargs = tree_map(_copy, kwargs)
        return self.fn(params, *(x.unsqueeze(0) for x in xs), **kwargs)

    def sample_loss(self, out: Any, target: Any) -> torch.Tensor:
        """The loss of one sample's output (a batch of one) and target."""
        assert self.loss is not None
        return _loss_value(self.function, self.loss(out, target.unsqueeze(0)))

    def _objective(self, out: Any, target: Any) -> torch.Tensor:
        if self.direct:  # the first forward checked it: the fast path of `_indexes_directly`
            return out[0, self.output]  # type: ignore[no-any-return]
        if self.loss is not None:
            return _loss_value(self.function, self.loss(out, target.unsqueeze(0)))
        if self._indexes_directly(out):
            return out[0, self.output]  # type: ignore[no-any-return]
        return _select_output(self.function, _drop_batch(self.function, out), self.output)

    def _indexes_directly(self, out: Any) -> bool:
        """Whether the selected output is ``out[0, output]``: one indexing op instead of
        two inside the transforms (an int `output` within a ``(1, C, ...)`` output)."""
        index = self.output
        return (
            self.loss is None
            and isinstance(out, torch.Tensor)
            and isinstance(index, int)
            and not isinstance(index, bool)
            and out.dim() >= 2
            and out.shape[0] == 1
            and -out.shape[1] <= index < out.shape[1]
        )

    def first_forward(self) -> FirstForward:
        """Run the forward of sample 0 on copies of the parameters and buffers (the
        caller runs it without grad and with the RNG state forked) and say what it
        showed; a forward that writes a parameter in place is refused."""
        diff, xs, target = self.probe_sample()
        params, inputs = self._split(diff, xs)
        weights = {n: p.detach().clone() for n, p in self.module.named_parameters()}
        weights.update((n, p.detach().clone()) for n, p in params.items())
        copies = {n: b.detach().clone() for n, b in self.module.named_buffers()}
        state = {**weights, **copies}
        fresh = tuple(x.clone() for x in inputs)
        kwargs = tree_map(_copy, self.kwargs)
        with observing_routes() as routed:
            out = self.fn(state, *(x.unsqueeze(0) for x in fresh), **kwargs)
        if any(p._version for p in weights.values()):
            self._refuse_parameter_writes(state, inputs)
        written = tuple(n for n, b in copies.items() if b._version)
        inputs_written = any(x._version for x in fresh)
        value = self._objective(out, target)
        classes = int(out.shape[1]) if isinstance(out, torch.Tensor) and out.dim() >= 2 else None
        batch_of_one = isinstance(out, torch.Tensor) and out.dim() >= 1 and out.shape[0] == 1
        return FirstForward(
            tuple(value.shape),
            classes,
            tuple(dict.fromkeys(routed)),
            written,
            inputs_written,
            self._indexes_directly(out),
            out.numel() if batch_of_one else 0,
        )

    def _refuse_parameter_writes(self, state: dict[str, torch.Tensor], inputs: Any) -> None:
        """Name the in-place op with which the forward wrote a parameter (copies)."""
        fresh = {n: t.detach().clone() for n, t in state.items()}
        weights = {t.untyped_storage().data_ptr() for n, t in fresh.items() if n not in
                   dict(self.module.named_buffers())}  # fmt: skip
        with InPlaceWrites(weights) as seen:
            self.fn(fresh, *(x.unsqueeze(0) for x in inputs), **self.kwargs)
        raise TorchcurvError(in_place_message(self.function, self.module, seen.op))

    def adopt(self, first: FirstForward) -> None:
        """Take the routing and the written buffers of the first forward."""
        self._routed[0] = bool(first.routed)
        self.written = first.written
        self.inputs_written = first.inputs_written
        self.direct = first.direct

    def whole_batch(self, diff: Any, xs: Any, target: Any) -> torch.Tensor:
        """The objective of the whole batch (the loss over all samples)."""
        params, xs = self._split(diff, xs)
        out = self.fn(params, *xs, **self.kwargs)
        if self.loss is not None:
            return _loss_value(self.function, self.loss(out, target))
        return _select_output(self.function, out, self.output)

    def batch_size(self) -> int:
        sizes = {x.shape[0] for x in self.xs}
        if self.targets is not None:
            if self.targets.dim() == 0:
                argument_error(
                    self.function,
                    "targets",
                    "must have a leading batch dim",
                    self.targets,
                    "Pass one target per sample.",
                )
            sizes.add(self.targets.shape[0])
        if len(sizes) != 1:
            argument_error(
                self.function,
                "inputs",
                "and targets must have the same batch size"
                if self.targets is not None
                else "must all have the same batch size",
                sorted(sizes),
                "Pass one entry per sample in each.",
            )
        return int(sizes.pop())

    def in_dims(self) -> tuple[Any, Any, Any, Any, Any]:
        x_dims: Any = 0 if self.single else (0,) * len(self.argnums)
        diff_dims: Any = (
            {"inputs": x_dims, "params": None}
            if self.wrt == "both"
            else (x_dims if self.wrt == "inputs" else None)
        )
        xs_dims = (0,) * len(self.rest) if self.rest else None
        buffer_dims = 0 if self.written else None
        target_dims = None if self.targets is None else 0
        return diff_dims, xs_dims, target_dims, buffer_dims, None if self.vectors is None else 0

    @property
    def routed(self) -> bool:
        """Whether the first forward called a routed op (True until it ran)."""
        return self._routed[0]

    def absent(self) -> tuple[int, ...]:
        """Positions of the arguments of `per_sample` that `args` always gives as None
        (with in_dims None): no undifferentiated inputs, no targets, no written buffers,
        no vectors."""
        flags = (
            False,
            not self.rest,
            self.targets is None,
            not self.written,
            self.vectors is None,
        )
        return tuple(i for i, flag in enumerate(flags) if flag)

    def args(self) -> tuple[Any, Any, Any, Any, Any]:
        """The batched arguments of `per_sample`: the written buffers are expanded over
        the batch (no copy: each sample's copy is made inside, by `per_sample`)."""
        size = self.xs[0].shape[0]
        written = None
        if self.written:
            buffers = dict(self.module.named_buffers())
            written = {
                n: buffers[n].detach().expand(size, *buffers[n].shape) for n in self.written
            }
        # Copies of the inputs (one op, outside the derivative) when the first forward
        # wrote none: a write it did not show then lands on them, not the caller's.
        xs = (
            self.xs
            if self.inputs_written or not self.aliased
            else tuple(x.clone() for x in self.xs)
        )
        return self.diff(xs), self.passed(xs), self.targets, written, self.vectors

    @functools.cached_property
    def _signature(self) -> tuple[Any, ...]:
        return (
            module_state(self.module),
            self.wrt,
            self.argnums,
            self.single,
            self.create_graph,
            tuple((n, tuple(p.shape), p.dtype, p.device) for n, p in self.params.items()),
            tuple((tuple(x.shape[1:]), x.dtype, x.device, x.requires_grad) for x in self.xs),
            None if self.targets is None else (tuple(self.targets.shape[1:]), self.targets.dtype),
            self.output if callable(self.output) else repr(self.output),
            self.loss,
            tuple(
                (k, tuple(v.shape) if isinstance(v, torch.Tensor) else repr(v))
                for k, v in sorted(self.kwargs.items())
            ),
        )

    def signature(self) -> tuple[Any, ...]:
        """What one sample's forward and the memory of its derivative depend on (not the
        values): the module's state (`module_state`), the shapes and options of the call.

        Callables (an output selector, a loss) enter as themselves, not by ``id()``.
        """
        return self._signature

    def probe_sample(self) -> tuple[Any, Any, Any]:
        """``(diff, xs, target)`` of sample 0, or of a zero sample when the batch is empty."""
        if self.xs[0].shape[0] > 0:
            return self.sample(0)
        xs = tuple(x.new_zeros(x.shape[1:]) for x in self.xs)
        target = None if self.targets is None else self.targets.new_zeros(self.targets.shape[1:])
        return self.diff(xs), self.passed(xs), target

    def sample(self, index: int) -> tuple[Any, Any, Any]:
        """``(diff, xs, target)`` of one sample, without its batch dim."""
        xs = tuple(x[index] for x in self.xs)
        target = None if self.targets is None else self.targets[index]
        return self.diff(xs), self.passed(xs), target


def _copy(x: Any) -> Any:
    return x.clone() if isinstance(x, torch.Tensor) else x


def usable(x: torch.Tensor, attached: bool) -> torch.Tensor:
    """`x` as the derivative sees it: detached unless `attached`; a tensor made under
    `torch.inference_mode` is copied (such tensors cannot take part in autograd)."""
    if x.is_inference():
        with torch.inference_mode(False):
            return x.clone()
    return x if attached else x.detach()


def per_sample_objective(
    function: str,
    module: nn.Module,
    inputs: Any,
    randomness: str,
    **what: Any,
) -> tuple[Objective, int]:
    """The checked objective of a per-sample call and its batch size."""
    obj = Objective(function, module, inputs, aliased=True, **what)
    check_layers(function, module, randomness)
    return obj, obj.batch_size()


def label(function: str, module: nn.Module) -> str:
    return f"{function}({type(module).__name__})"


def numel(tree: Any) -> int:
    return sum(math.prod(x.shape) for x in tree_flatten(tree)[0])


def itemsize(tree: Any) -> int:
    return max(int(x.element_size()) for x in tree_flatten(tree)[0])
