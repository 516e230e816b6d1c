"""The block layer shared by the disk emulations: image backends and image tools.

Devices get a :class:`BlockBackend` from :func:`open_disk` and call ``readv``/``writev`` with
slices of guest RAM from their worker threads; see :mod:`vmrun.block.backend` for the contract.
"""

from vmrun.block.backend import BlockBackend, parse_sectorsize
from vmrun.block.image_tools import convert_image, create_image, open_disk
from vmrun.block.qcow2 import Qcow2Image
from vmrun.block.raw import RawFile
from vmrun.block.sparse import SparseSplitDisk
from vmrun.units import parse_size

__all__ = [
    "BlockBackend",
    "Qcow2Image",
    "RawFile",
    "SparseSplitDisk",
    "convert_image",
    "create_image",
    "open_disk",
    "parse_sectorsize",
    "parse_size",
]
