"""
The forum question: every sample's full input Hessian, without a loop
=====================================================================

"How do I get the Hessian of my network's output with respect to its inputs, for every
sample of a batch?" The classic answer loops: one ``torch.autograd.grad`` per sample
and per gradient entry. torchcurv answers it in one call, vectorised over the batch, and
agrees with the loop to rounding.
"""

# %%
# A small regression network and a batch of 64 samples with 10 features each.
import time

import matplotlib.pyplot as plt
import torch

import torchcurv

# One thread, as this page was built: on a busy or small machine, torch's threads
# contend with each other and timings swing.
torch.set_num_threads(1)
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(10, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
    torch.nn.Linear(64, 1),
)  # fmt: skip
X = torch.randn(64, 10)

# %%
# The classic loop: for each sample, the gradient with ``create_graph=True``, then one
# more ``grad`` per gradient entry for the Hessian's rows.


def loop_hessians(model: torch.nn.Module, X: torch.Tensor) -> torch.Tensor:
    hessians = []
    for x in X:
        x = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(x).squeeze(), x, create_graph=True)
        rows = [torch.autograd.grad(g[i], x, retain_graph=True)[0] for i in range(len(x))]
        hessians.append(torch.stack(rows))
    return torch.stack(hessians)


# %%
# torchcurv: one call, ``[B, 10, 10]`` (``output=0`` selects the single output entry).
H = torchcurv.per_sample_hessian(model, X, output=0)
print(H.shape, torch.allclose(H, loop_hessians(model, X), atol=1e-6))


# %%
# Time both, best of five (one thread here; on more cores the gap grows).
def best_of(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


t_loop = best_of(lambda: loop_hessians(model, X))
t_ours = best_of(lambda: torchcurv.per_sample_hessian(model, X, output=0))
print(f"loop {t_loop * 1e3:.1f} ms, torchcurv {t_ours * 1e3:.1f} ms "
      f"({t_loop / t_ours:.0f}x faster)")  # fmt: skip

# %%
# One sample's Hessian, and the two timings.
fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), width_ratios=[1, 1.2])
bound = H[0].abs().max()
image = left.imshow(H[0], cmap="RdBu_r", vmin=-bound, vmax=bound)
left.set_title("sample 0: d²y / dx_i dx_j")
left.set_xlabel("input j")
left.set_ylabel("input i")
fig.colorbar(image, ax=left, shrink=0.85)
right.barh(["classic loop", "torchcurv"], [t_loop * 1e3, t_ours * 1e3], color=["gray", "C0"])
right.set_xlabel("time for 64 Hessians [ms]")
right.set_title(f"{t_loop / t_ours:.0f}x faster, same numbers")
fig.tight_layout()
plt.show()
