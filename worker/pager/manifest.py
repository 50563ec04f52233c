"""The worker's side of the snapshot manifest: its one schema is shared with torpord
(`torpor.store.snapshot_manifest`); what needs torch (the environment here) is in this
module."""

from __future__ import annotations

import torch
from torch import device as Device

import torpor
from torpor.checkpoint_files import SMALL_FILES
from torpor.store.snapshot_manifest import FORMAT_VERSION, Environment, Piece, SnapshotManifest

MODEL_FILES = SMALL_FILES


def environment_here(device: Device) -> Environment:
    """The environment this process would make snapshot bytes in, on `device`."""
    cuda = torch.version.cuda.split(".")[0] if torch.version.cuda else None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    return Environment(FORMAT_VERSION, torpor.__version__, minor, cuda, device.type, gpu)


__all__ = ["MODEL_FILES", "Environment", "Piece", "SnapshotManifest", "environment_here"]
