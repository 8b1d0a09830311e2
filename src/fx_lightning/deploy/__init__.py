"""Deployment: write each artifact, load it back in the runtime that runs it, verify it there. Never imports Lightning.

From the bottom up: ``formats/`` holds one file per format behind one registry; ``export`` writes artifacts;
``report`` and ``check`` check them where they run (:func:`~fx_lightning.deploy.check.verify_artifacts`) and report;
``int8/`` makes the quantized versions (options, the accuracy gate, one backend per runtime) on top of that check;
``flow`` writes, quantizes and checks in one call (:func:`export_and_verify`). Each layer imports only those below it.
"""

from fx_lightning.deploy.export import Artifact, export_artifacts, write_artifacts
from fx_lightning.deploy.flow import ArtifactReport, DeployReport, export_and_verify

__all__ = ["Artifact", "ArtifactReport", "DeployReport", "export_and_verify", "export_artifacts", "write_artifacts"]
