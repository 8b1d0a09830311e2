"""Deployment: write each artifact, load it back in the runtime that runs it, verify it there. Never imports Lightning.

``export`` writes artifacts, ``flow`` checks them (:func:`export_and_verify`), ``formats/`` holds one file per format
behind one registry, ``int8/`` the quantized formats.
"""

from fx_lightning.deploy.export import Artifact, export_artifacts, write_artifacts
from fx_lightning.deploy.flow import ArtifactReport, DeployReport, export_and_verify

__all__ = ["Artifact", "ArtifactReport", "DeployReport", "export_and_verify", "export_artifacts", "write_artifacts"]
