"""MoPE, the Mixture of Prediction Experts: collect training data from simulated runs, train, export to ONNX
(served by `fairness.OnnxPredictor`). Training needs torch; export needs the `mope` extra (onnx)."""

from fairness.mope.model import Dataset, MoPE, collect, l1_errors, train

__all__ = ["Dataset", "MoPE", "collect", "l1_errors", "train"]
