"""
A physics-informed network trained through its Laplacian
=========================================================

The Poisson equation ``-Δu = f`` on the unit square with ``u = 0`` on the boundary and
``f = 2 π² sin(π x) sin(π y)`` has the solution ``u = sin(π x) sin(π y)``. A network
``N`` in the ansatz ``u = x (1 - x) y (1 - y) N(x, y)`` meets the boundary condition by
construction; training minimises the residual ``Δu + f`` at random points, the
Laplacian per point from `torchcurv.per_sample_laplacian` with ``create_graph=True``
(``"auto"`` takes Taylor mode here: one forward pass of jets, differentiable).
The longer tutorial, with timings against nested AD, is :doc:`/tutorials/pinn`.
"""

# %%
import math

import matplotlib.pyplot as plt
import torch

import torchcurv

torch.manual_seed(0)


class Ansatz(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
            torch.nn.Linear(32, 1),
        )  # fmt: skip

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        x, y = p[..., 0], p[..., 1]
        return x * (1 - x) * y * (1 - y) * self.net(p)[..., 0]


def source(p: torch.Tensor) -> torch.Tensor:
    return 2 * math.pi**2 * torch.sin(math.pi * p[:, 0]) * torch.sin(math.pi * p[:, 1])


u = Ansatz()
print(torchcurv.explain(torchcurv.per_sample_laplacian, u, torch.rand(8, 2)).engine)
optimizer = torch.optim.Adam(u.parameters(), lr=1e-2)
schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=400, gamma=0.3)
steps, losses = 1200, []
for _ in range(steps):
    points = torch.rand(128, 2)
    laplacian = torchcurv.per_sample_laplacian(u, points, create_graph=True)
    loss = (laplacian + source(points)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    schedule.step()
    losses.append(loss.item())
print(f"residual: {losses[0]:.1f} at the start, {losses[-1]:.4f} after {steps} steps")

# %%
grid = torch.linspace(0, 1, 65)
gx, gy = torch.meshgrid(grid, grid, indexing="ij")
points = torch.stack([gx.flatten(), gy.flatten()], 1)
with torch.no_grad():
    predicted = u(points).reshape(65, 65)
exact = torch.sin(math.pi * gx) * torch.sin(math.pi * gy)
print(f"largest error on the grid: {(predicted - exact).abs().max():.4f}")

fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
axes[0].semilogy(losses)
axes[0].set_xlabel("step")
axes[0].set_title("mean squared residual")
image = axes[1].imshow(predicted.T, origin="lower", extent=(0, 1, 0, 1), cmap="viridis")
axes[1].set_title("u, the network")
fig.colorbar(image, ax=axes[1], shrink=0.85)
error = (predicted - exact).T
edge = float(error.abs().max())
image = axes[2].imshow(error, origin="lower", extent=(0, 1, 0, 1), cmap="RdBu_r", vmin=-edge,
                       vmax=edge)  # fmt: skip
axes[2].set_title("u - sin(πx) sin(πy)")
fig.colorbar(image, ax=axes[2], shrink=0.85)
fig.tight_layout()
plt.show()
