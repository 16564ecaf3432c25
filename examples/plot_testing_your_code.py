"""
Testing your own curvature code against the loop
================================================

Hand-written second derivatives are easy to get subtly wrong. `torchcurv.testing`
checks them against `torchcurv.reference`, the classic loop (one autograd double
backward per row, in float64), with a tolerance policy that scales with the result.
Here, a closed-form input Hessian of a one-hidden-layer tanh network: the right formula
and a plausible wrong one (the second-derivative term's sign flipped). The harness
accepts the first and rejects the second; the picture shows where they differ.
`torchcurv.testing.check_model` runs the same check on a model: the Hessians of its
first samples (three by default), computed as `torchcurv.per_sample_hessian` computes
them in the mode given, against the loop.
"""

# %%
import matplotlib.pyplot as plt
import torch

import torchcurv
from torchcurv import testing

torch.manual_seed(0)
W1, b1, w2 = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, dtype=torch.float64), (
    torch.randn(16, dtype=torch.float64))  # fmt: skip


def f(x: torch.Tensor) -> torch.Tensor:
    return w2 @ torch.tanh(W1 @ x + b1)


def hessian_right(x: torch.Tensor) -> torch.Tensor:
    """y = w2 . tanh(W1 x + b1): H = W1^T diag(w2 * tanh'') W1, tanh'' = -2 t (1 - t^2)."""
    t = torch.tanh(W1 @ x + b1)
    return W1.T @ torch.diag(w2 * -2 * t * (1 - t**2)) @ W1


def hessian_wrong(x: torch.Tensor) -> torch.Tensor:
    t = torch.tanh(W1 @ x + b1)
    return W1.T @ torch.diag(w2 * 2 * t * (1 - t**2)) @ W1  # the sign of tanh'' lost


x = torch.randn(5, dtype=torch.float64)
reference = torchcurv.reference.hessian(f)(x)
testing.assert_trees_close(hessian_right(x), reference)
print("the right formula agrees with the loop")
try:
    testing.assert_trees_close(hessian_wrong(x), reference)
except AssertionError as error:
    print("the wrong formula is caught:", str(error).splitlines()[0])

# %%
# The same check on a model: its first three samples' Hessians against the loop, in
# float64.
model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
report = testing.check_model(model, torch.randn(8, 5), output=0)
print(report)

# %%
fig, axes = plt.subplots(1, 4, figsize=(12, 3.2), layout="constrained")
bound = float(reference.abs().max())
panels = [("the loop (reference)", reference), ("right formula", hessian_right(x)),
          ("wrong formula", hessian_wrong(x)),
          ("wrong - reference", hessian_wrong(x) - reference)]  # fmt: skip
for ax, (title, H) in zip(axes, panels, strict=True):
    image = ax.imshow(H, cmap="RdBu_r", vmin=-bound, vmax=bound)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
fig.colorbar(image, ax=axes, shrink=0.8)
plt.show()
