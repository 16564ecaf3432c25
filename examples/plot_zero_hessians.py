"""
Zero curvature is an answer, not an error
=========================================

A linear model has a zero Hessian. The classic loop does not say so: its second
``torch.autograd.grad`` fails with "One of the differentiated Tensors appears to not
have been used in the graph", because the gradient does not depend on the input.
torchcurv returns the zeros. And a vector output gets one Hessian per output entry:
output ``i`` of ``x * x * [0, 1, 2, 3]`` is ``i x_i^2``, whose Hessian is ``2 i`` at
``(i, i)`` and zero elsewhere.
"""

# %%
import matplotlib.pyplot as plt
import torch

import torchcurv

linear = torch.nn.Linear(4, 1)
X = torch.randn(8, 4)

x = X[0].clone().requires_grad_(True)
(g,) = torch.autograd.grad(linear(x).squeeze(), x, create_graph=True)
try:
    torch.autograd.grad(g[0], x)
except RuntimeError as error:
    print("the classic loop:", str(error).splitlines()[0])

H = torchcurv.per_sample_hessian(linear, X, output=0)
print("torchcurv:", H.shape, "all zeros:", bool((H == 0).all()))


# %%
# Per-output Hessians of ``x * x * [0, 1, 2, 3]``: output ``i`` is ``i x_i^2``, so its
# Hessian is ``2 i`` at ``(i, i)`` and zero elsewhere (output 0's is all zeros).
class Scaled(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x * torch.arange(4, dtype=x.dtype)


H = torchcurv.per_sample_hessian(Scaled(), X)  # [8, 4 outputs, 4, 4]
expected = torch.stack([torch.diag(2.0 * i * (torch.arange(4) == i)) for i in range(4)])
print(H.shape, torch.equal(H[0], expected.to(H.dtype)))

fig, axes = plt.subplots(1, 4, figsize=(11, 3.2))
fig.suptitle("per-output Hessians of x * x * [0, 1, 2, 3]: 2 i at (i, i)")
for i, ax in enumerate(axes):
    image = ax.imshow(H[0, i], cmap="RdBu_r", vmin=-6, vmax=6)
    ax.set_title(f"output {i}")
    ax.set_xticks(range(4))
    ax.set_yticks(range(4))
fig.colorbar(image, ax=axes, shrink=0.8)
plt.show()
