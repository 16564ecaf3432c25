"""
Per-sample curvature of the loss in parameter space: eigenvalue spectra
=======================================================================

For each training sample, the Hessian of its own loss with respect to the parameters
(``wrt="params"``), and its eigenvalues: the whole spectrum of a small classifier
(``method="dense"``, ``P = 1,210`` parameters) for a few samples, and the largest
eigenvalue of every held-out sample by Lanczos, which never forms the matrix. Samples the
model gets wrong sit on sharper curvature.
"""

# %%
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import torchcurv

torch.manual_seed(0)
digits = load_digits()
inputs = torch.tensor(digits.data, dtype=torch.float64) / 16.0
labels = torch.tensor(digits.target)
train, (X, y) = slice(0, 1000), (inputs[1000:], labels[1000:])  # the rest is held out
model = torch.nn.Sequential(
    torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10)
).double()  # fmt: skip
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(300):
    optimizer.zero_grad()
    F.cross_entropy(model(inputs[train]), labels[train]).backward()
    optimizer.step()
wrong = model(X).argmax(1) != y
count = sum(p.numel() for p in model.parameters())
print(f"P = {count}, wrong on {int(wrong.sum())} of {len(X)} held-out samples")

# %%
# The whole spectrum of three samples' loss Hessians: two classified right, one wrong.
picked = torch.cat([torch.nonzero(~wrong)[:2, 0], torch.nonzero(wrong)[:1, 0]])
spectra = torchcurv.per_sample_hessian_eigvalsh(
    model, X[picked], k=1210, wrt="params", loss=F.cross_entropy, targets=y[picked],
    method="dense",
)  # fmt: skip
print(tuple(spectra.shape), "largest:", spectra[:, -1])

# %%
# The largest eigenvalue of every sample (Lanczos: Hessian-vector products only).
top = torchcurv.per_sample_hessian_eigvalsh(
    model, X, k=1, wrt="params", loss=F.cross_entropy, targets=y
)[:, 0]
print(f"median largest eigenvalue: right {top[~wrong].median():.3g}, "
      f"wrong {top[wrong].median():.3g}")  # fmt: skip

fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
for spectrum, index, ok in zip(spectra, picked, ~wrong[picked], strict=True):
    label = f"sample {int(index)} ({'right' if ok else 'wrong'})"
    left.plot(spectrum.flip(0), label=label)
left.set_yscale("symlog", linthresh=1e-6)
left.set_xscale("log")
left.set_xlabel("eigenvalue rank")
left.set_ylabel("eigenvalue (symlog)")
left.set_title("whole spectra of three per-sample loss Hessians")
left.legend()
bins = torch.logspace(-6, 2, 40)
right.hist(top[~wrong].clamp(min=1e-6), bins=bins, alpha=0.7, label="classified right")
right.hist(top[wrong].clamp(min=1e-6), bins=bins, alpha=0.7, label="classified wrong")
right.set_xscale("log")
right.set_xlabel("largest eigenvalue of the sample's loss Hessian")
right.set_ylabel("samples")
right.set_title(f"all {len(X)} held-out samples, Lanczos")
right.legend()
fig.tight_layout()
plt.show()
