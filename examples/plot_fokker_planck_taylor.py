"""
A Fokker-Planck operator's second-order term, per sample, in Taylor mode
=========================================================================

The generator of a diffusion ``dX = b dt + sigma(X) dW`` applied to ``u`` has the
second-order term ``1/2 tr(sigma sigma^T H_u)``; with a diffusion that depends on the
state, ``sigma`` differs per sample. ``per_sample_laplacian(..., sigma=...)`` computes
``sum_k d_k^T H d_k`` over sigma's ``K`` columns without forming ``H``: Taylor mode
pushes the ``K`` columns through one forward pass, the Hessian-vector products push
them one by one. Both against the full Hessian, and timed as ``K`` grows.
"""

# %%
import time

import matplotlib.pyplot as plt
import torch

import torchcurv

# One thread, as this page was built: on a busy or small machine, torch's threads
# contend with each other and timings swing.
torch.set_num_threads(1)
torch.manual_seed(0)
D = 16
u = torch.nn.Sequential(
    torch.nn.Linear(D, 128), torch.nn.Tanh(), torch.nn.Linear(128, 128), torch.nn.Tanh(),
    torch.nn.Linear(128, 1),
)  # fmt: skip
X = torch.randn(256, D)


def diffusion(x: torch.Tensor, K: int) -> torch.Tensor:
    """A state-dependent sigma(x): ``[B, D, K]``."""
    torch.manual_seed(K)
    return (0.5 + 0.1 * x.pow(2))[:, :, None] * torch.randn(D, K) / K**0.5


sigma = diffusion(X, 4)
taylor = 0.5 * torchcurv.per_sample_laplacian(u, X, output=0, sigma=sigma, mode="taylor")
H = torchcurv.per_sample_hessian(u, X, output=0)
exact = 0.5 * torch.einsum("bij,bik,bjk->b", H, sigma, sigma)
print(f"largest difference from the full Hessian's: {(taylor - exact).abs().max():.1e}")
# On a plain Linear/tanh stack "auto" takes the structured engine (the Hessian by
# backpropagation, contracted with sigma): both it and Taylor mode beat the
# Hessian-vector products; Taylor mode is what "auto" takes once the model is not a
# plain stack (a residual connection, a boundary ansatz, attention written out).
print(torchcurv.explain(torchcurv.per_sample_laplacian, u, X, output=0, sigma=sigma).engine)


# %%
# Time per call as the number of columns ``K`` grows (median of seven, one thread).
def median_time(fn, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2]


ks = [1, 2, 4, 8, 16]
times: dict[str, list[float]] = {"taylor": [], "structured": [], "fwd-over-rev": []}
for K in ks:
    sigma = diffusion(X, K)
    for mode in times:
        run = lambda mode=mode, s=sigma: torchcurv.per_sample_laplacian(  # noqa: E731
            u, X, output=0, sigma=s, mode=mode
        )
        run()  # warm-up
        times[mode].append(median_time(run) * 1e3)
print({mode: [f"{t:.1f}" for t in ts] for mode, ts in times.items()})

fig, ax = plt.subplots(figsize=(6, 3.6))
for mode, label in (("taylor", "Taylor mode"), ("structured", "structured engine"),
                    ("fwd-over-rev", "Hessian-vector products")):  # fmt: skip
    ax.plot(ks, times[mode], marker="o", label=label)
ax.set_xscale("log", base=2)
ax.set_xlabel("columns K of sigma")
ax.set_ylabel("time per call [ms], B = 256")
ax.set_title("tr(sigma sigma^T H) per sample")
ax.legend()
fig.tight_layout()
plt.show()
