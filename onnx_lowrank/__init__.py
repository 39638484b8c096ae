"""onnx-lowrank: low-rank decomposition of ONNX models, proven in ONNX Runtime.

    model, report = onnx_lowrank.optimize("in.onnx")
    onnx_lowrank.save_model(model, "out.onnx")
    print(report.to_json())
"""

from .errors import LowRankError, ModelLoadError, OptionError, OutputError, RuntimeUnavailableError
from .io import load_model, save_model
from .optimize import optimize, optimize_file
from .options import Options
from .report import LayerRecord, ParityResult, Report

__version__ = "0.1.0"

__all__ = ["optimize", "optimize_file", "Options", "Report", "LayerRecord", "ParityResult", "load_model", "save_model",
           "LowRankError", "ModelLoadError", "OptionError", "OutputError", "RuntimeUnavailableError"]
