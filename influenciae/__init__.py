"""influenciae: influence functions and training-data attribution for TensorFlow/Keras.

The public API; heavy optional pieces (plots, faiss, benchmarks) are imported lazily where they are used.
"""

from influenciae import influence as _influence
from influenciae.hessian import (
    EKFACIHVP,
    KFACIHVP,
    ArnoldiIHVP,
    ConjugateGradientDescentIHVP,
    DiagonalIHVP,
    EmpiricalFisherOperator,
    ExactIHVP,
    FisherOperator,
    GaussNewtonOperator,
    IdentityIHVP,
    InverseHessianVectorProduct,
    LissaIHVP,
    NystromIHVP,
)
from influenciae.influence import *  # noqa: F403  (every calculator, its options and output functions)
from influenciae.model import InfluenceModel, MigrationWarning
from influenciae.types import CACHE, ORDER

__version__ = "0.1.0"

__all__ = [
    "CACHE",
    "EKFACIHVP",
    "KFACIHVP",
    "ORDER",
    "ArnoldiIHVP",
    "ConjugateGradientDescentIHVP",
    "DiagonalIHVP",
    "EmpiricalFisherOperator",
    "ExactIHVP",
    "FisherOperator",
    "GaussNewtonOperator",
    "IdentityIHVP",
    "InfluenceModel",
    "InverseHessianVectorProduct",
    "LissaIHVP",
    "MigrationWarning",
    "NystromIHVP",
    "__version__",
]
__all__ += _influence.__all__
