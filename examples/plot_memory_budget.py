"""
Time against memory: what a memory budget buys
==============================================

A per-sample input Hessian of a CNN pushes one basis vector per input pixel through a
forward and a backward pass; done all at once, that holds every sample's intermediate
Jacobians in memory. ``memory_budget=`` makes the planner split the batch and the basis
into chunks whose predicted peak fits; a smaller budget means more, smaller chunks and
more passes. `torchcurv.explain` says what a call will do without running it.
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
cnn = torch.nn.Sequential(
    torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.Tanh(),
    torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.Tanh(),
    torch.nn.Flatten(), torch.nn.Linear(16 * 16 * 16, 10),
)  # fmt: skip
X = torch.randn(16, 1, 16, 16)
torchcurv.initialize()  # torch's one-time set-up, before budgets are measured against it

budgets = ["6MiB", "8MiB", "16MiB", "32MiB", "64MiB", "256MiB"]
rows = []
for budget in budgets:
    decision = torchcurv.explain(
        torchcurv.per_sample_hessian, cnn, X, output=2, memory_budget=budget
    )
    times = []
    for _ in range(3):
        start = time.perf_counter()
        torchcurv.per_sample_hessian(cnn, X, output=2, memory_budget=budget)
        times.append(time.perf_counter() - start)
    rows.append((budget, decision, min(times)))
    print(f"{budget:>7}: batch chunk {decision.batch_chunk}, basis chunks "
          f"{decision.basis_chunks} of {decision.basis_sizes}, predicted peak "
          f"{decision.predicted_peak / 2**20:.1f} MiB, {min(times) * 1e3:.0f} ms")  # fmt: skip

# %%
# The same numbers, whatever the budget: the chunks change the order of the work only.
H_small = torchcurv.per_sample_hessian(cnn, X, output=2, memory_budget="6MiB")
H_whole = torchcurv.per_sample_hessian(cnn, X, output=2, memory_budget="256MiB")
print("largest difference:", float((H_small - H_whole).abs().max()))

# %%
MiB = 2**20
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
sizes = [decision.budget / MiB for _, decision, _ in rows]
left.plot(sizes, [d.predicted_peak / MiB for _, d, _ in rows], marker="o", label="predicted peak")
left.plot(sizes, sizes, linestyle="--", color="gray", label="budget")
left.set_xscale("log", base=2)
left.set_yscale("log", base=2)
left.set_xlabel("memory budget [MiB]")
left.set_ylabel("MiB")
left.set_title("the plan fits the budget")
left.legend()
right.plot(sizes, [t * 1e3 for _, _, t in rows], marker="o", color="C1")
right.set_xscale("log", base=2)
right.set_xlabel("memory budget [MiB]")
right.set_ylabel("time per call [ms]")
right.set_title("and costs more passes when it is small")
fig.tight_layout()
plt.show()
