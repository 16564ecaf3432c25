"""torchcurv: per-sample Jacobians and Hessians for PyTorch, built on torch.func."""

import importlib
from typing import Any

from . import reference as reference
from ._datasets import map_dataset as map_dataset
from ._datasets import open_results as open_results
from ._datasets import reduce_dataset as reduce_dataset
from ._errors import MemoryBudgetError as MemoryBudgetError
from ._errors import TorchcurvError as TorchcurvError
from ._errors import TorchcurvFallbackWarning as TorchcurvFallbackWarning
from ._errors import UnsupportedModuleError as UnsupportedModuleError
from ._layout import from_matrix as from_matrix
from ._layout import to_matrix as to_matrix
from ._modules import Decision as Decision
from ._modules import batch_hessian as batch_hessian
from ._modules import explain as explain
from ._modules import functional as functional
from ._modules import per_sample_ggn as per_sample_ggn
from ._modules import per_sample_ggn_diag as per_sample_ggn_diag
from ._modules import per_sample_hessian as per_sample_hessian
from ._modules import per_sample_hessian_diag as per_sample_hessian_diag
from ._modules import per_sample_hessian_eigvalsh as per_sample_hessian_eigvalsh
from ._modules import per_sample_hvp as per_sample_hvp
from ._modules import per_sample_jacobian as per_sample_jacobian
from ._modules import per_sample_laplacian as per_sample_laplacian
from ._runner import initialize as initialize
from ._runner import per_sample as per_sample
from ._transforms import hessian as hessian
from ._transforms import hessian_diag as hessian_diag
from ._transforms import hvp as hvp
from ._transforms import jacobian as jacobian
from ._transforms import laplacian as laplacian
from ._transforms import vhp as vhp

__version__ = "0.1.0"

__all__ = [  # noqa: RUF022 - grouped by topic, as the docs are
    # function transforms
    "hessian",
    "hessian_diag",
    "hvp",
    "jacobian",
    "laplacian",
    "vhp",
    # batching
    "per_sample",
    # modules
    "batch_hessian",
    "functional",
    "per_sample_hessian",
    "per_sample_jacobian",
    # per-sample quantities of the Hessian
    "per_sample_hessian_diag",
    "per_sample_ggn",
    "per_sample_ggn_diag",
    "per_sample_hessian_eigvalsh",
    "per_sample_hvp",
    "per_sample_laplacian",
    # datasets
    "map_dataset",
    "open_results",
    "reduce_dataset",
    # decisions and memory
    "Decision",
    "explain",
    "initialize",
    # layout
    "from_matrix",
    "to_matrix",
    # oracle
    "reference",
    # errors
    "MemoryBudgetError",
    "TorchcurvError",
    "TorchcurvFallbackWarning",
    "UnsupportedModuleError",
]


def __getattr__(name: str) -> Any:
    """``torchcurv.testing`` after a plain ``import torchcurv`` (loaded on first use)."""
    if name == "testing":
        return importlib.import_module(".testing", __name__)
    raise AttributeError(f"module 'torchcurv' has no attribute {name!r}")
