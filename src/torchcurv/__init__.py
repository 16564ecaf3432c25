"""torchcurv: per-sample Jacobians and Hessians for PyTorch, built on torch.func."""

from . import reference as reference
from ._errors import MemoryBudgetError as MemoryBudgetError
from ._errors import TorchcurvError as TorchcurvError
from ._errors import TorchcurvFallbackWarning as TorchcurvFallbackWarning
from ._errors import UnsupportedModuleError as UnsupportedModuleError
from ._layout import from_matrix as from_matrix
from ._layout import to_matrix as to_matrix
from ._transforms import hessian as hessian
from ._transforms import hvp as hvp
from ._transforms import jacobian as jacobian
from ._transforms import vhp as vhp

__version__ = "0.1.0"

__all__ = [
    # function transforms
    "hessian",
    "hvp",
    "jacobian",
    "vhp",
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
