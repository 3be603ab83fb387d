"""Stages: the checks fastpipe runs over one object.

Stream stages (:class:`StreamStage`) see the bytes in order while they arrive; file stages
(:class:`FileStage`) run on the complete local file. Built-ins are listed by
:func:`builtin_stages` and built from CLI specs by :func:`parse_spec`.
"""

from ._base import FileStage as FileStage
from ._base import LocalFile as LocalFile
from ._base import ObjectInfo as ObjectInfo
from ._base import Stage as Stage
from ._base import StreamStage as StreamStage
from ._registry import builtin_stages as builtin_stages
from ._registry import parse_spec as parse_spec
from .checksum import Checksum as Checksum
from .chunk import Chunk as Chunk
from .command import Command as Command
from .limits import Limits as Limits
from .scan import Scan as Scan
from .verify import Verify as Verify

__all__ = [
    "Checksum",
    "Chunk",
    "Command",
    "FileStage",
    "Limits",
    "LocalFile",
    "ObjectInfo",
    "Scan",
    "Stage",
    "StreamStage",
    "Verify",
    "builtin_stages",
    "parse_spec",
]
