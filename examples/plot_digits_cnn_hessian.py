"""
A CNN's input Hessian on real digits, as a 784 x 784 matrix
===========================================================

The Hessian of class 2's logit with respect to the pixels of a 28 x 28 image has shape
``1 x 28 x 28 x 1 x 28 x 28`` per sample; `torchcurv.to_matrix` flattens it to the
``784 x 784`` matrix people draw. A small CNN trained for a few seconds on
scikit-learn's bundled 8 x 8 digits, upscaled to 28 x 28.
"""

# %%
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib.colors import SymLogNorm
from sklearn.datasets import load_digits

import torchcurv

torch.manual_seed(0)
digits = load_digits()
images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
images = F.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False)
labels = torch.tensor(digits.target)

cnn = torch.nn.Sequential(
    torch.nn.Conv2d(1, 8, 5, stride=2), torch.nn.Tanh(),
    torch.nn.Conv2d(8, 16, 5, stride=2), torch.nn.Tanh(),
    torch.nn.Flatten(), torch.nn.Linear(16 * 4 * 4, 10),
)  # fmt: skip
optimizer = torch.optim.Adam(cnn.parameters(), lr=3e-3)
for _ in range(4):
    for batch in torch.randperm(len(images)).split(64):
        optimizer.zero_grad()
        F.cross_entropy(cnn(images[batch]), labels[batch]).backward()
        optimizer.step()
accuracy = (cnn(images).argmax(1) == labels).float().mean()
print(f"training accuracy {accuracy:.3f}")

# %%
# The Hessian of the class-2 logit for one "2", in float64.
cnn = cnn.double()
two = images[labels == 2][:1].double()
H = torchcurv.per_sample_hessian(cnn, two, output=2)
print(tuple(H.shape))  # (1, 1, 28, 28, 1, 28, 28)
M = torchcurv.to_matrix(H[0], two[0])
print(tuple(M.shape), "symmetric:", torch.allclose(M, M.T))

# %%
# From the left: the whole matrix (on a symmetric log scale: most entries are tiny);
# the block of image rows 12-15 against themselves (pixel ``(r, c)`` is row/column
# ``28 r + c``); the digit; the Hessian's diagonal drawn as an image, the curvature of
# the logit pixel by pixel.

fig, axes = plt.subplots(1, 4, figsize=(13, 3.4), width_ratios=[1.15, 1.15, 1, 1])
bound = float(M.abs().max())
axes[0].imshow(M, cmap="RdBu_r", norm=SymLogNorm(bound * 1e-3, vmin=-bound, vmax=bound),
               interpolation="nearest")  # fmt: skip
axes[0].set_title("784 x 784 Hessian")
block = slice(28 * 12, 28 * 16)
axes[0].add_patch(plt.Rectangle((block.start, block.start), 112, 112, fill=False, lw=1))
zoom = M[block, block]
edge = float(zoom.abs().max())
image = axes[1].imshow(zoom, cmap="RdBu_r", vmin=-edge, vmax=edge, interpolation="nearest")
axes[1].set_title("rows 12-15 of the image")
fig.colorbar(image, ax=axes[1], shrink=0.8)
axes[2].imshow(two[0, 0], cmap="gray_r")
axes[2].set_title("the input")
diagonal = M.diagonal().reshape(28, 28)
edge = float(diagonal.abs().max())
image = axes[3].imshow(diagonal, cmap="RdBu_r", vmin=-edge, vmax=edge)
axes[3].set_title("diagonal, per pixel")
fig.colorbar(image, ax=axes[3], shrink=0.8)
for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
fig.tight_layout()
plt.show()
