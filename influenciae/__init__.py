"""influenciae: influence functions and training-data attribution for TensorFlow/Keras.

The public API; heavy optional pieces (plots, faiss, benchmarks) are imported lazily where they are used.
"""

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
from influenciae.influence import (
    ArnoldiInfluenceCalculator,
    BaseInfluenceCalculator,
    FirstOrderInfluenceCalculator,
    RepresenterPointL2,
    RepresenterPointLJE,
    SampleBoundaryCalculator,
    SecondOrderInfluenceCalculator,
    SimilarityInfluence,
    TracIn,
    TracInCP,
    TracInCPFast,
    TracInCPFastRandProj,
    TrakCalculator,
    WeightsBoundaryCalculator,
)
from influenciae.model import InfluenceModel, MigrationWarning
from influenciae.types import CACHE, ORDER

__version__ = "0.1.0"

__all__ = [
    "CACHE",
    "EKFACIHVP",
    "KFACIHVP",
    "ORDER",
    "DiagonalIHVP",
    "EmpiricalFisherOperator",
    "FisherOperator",
    "GaussNewtonOperator",
    "IdentityIHVP",
    "NystromIHVP",
    "ArnoldiIHVP",
    "ArnoldiInfluenceCalculator",
    "BaseInfluenceCalculator",
    "FirstOrderInfluenceCalculator",
    "ConjugateGradientDescentIHVP",
    "ExactIHVP",
    "InfluenceModel",
    "MigrationWarning",
    "InverseHessianVectorProduct",
    "LissaIHVP",
    "RepresenterPointL2",
    "RepresenterPointLJE",
    "SampleBoundaryCalculator",
    "SecondOrderInfluenceCalculator",
    "SimilarityInfluence",
    "TracIn",
    "TracInCP",
    "TracInCPFast",
    "TracInCPFastRandProj",
    "TrakCalculator",
    "WeightsBoundaryCalculator",
    "__version__",
]
