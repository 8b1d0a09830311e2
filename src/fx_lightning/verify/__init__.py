"""Verification: does a network compute what the original computes? Never imports Lightning.

``compare`` is the one output comparison (relative to each output's scale), ``detections`` compares detections in
score order where exact score ties may be broken differently, ``verifier`` runs the task metric over data with
torchmetrics, ``latency`` times a network.
"""

from fx_lightning.verify.compare import Comparison, compare_trees
from fx_lightning.verify.verifier import VerificationResult, Verifier, verify

__all__ = ["Comparison", "VerificationResult", "Verifier", "compare_trees", "verify"]
