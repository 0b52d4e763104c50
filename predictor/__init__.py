"""HTTP prediction service: Open Inference Protocol V2 over onnxruntime sessions.

The predictor imports onnxruntime, numpy, Starlette and the model store,
never scikit-learn or skl2onnx.
"""

from predictor.app import create_app
from predictor.settings import PredictorSettings

__all__ = ["PredictorSettings", "create_app"]
