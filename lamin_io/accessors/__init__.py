"""Lazy readers, one module per family of formats, dispatched through the format table."""

from lamin_io.accessors._formats import (
    Format,
    format_for,
    formats,
    register_format,
    supported_suffixes,
)
from lamin_io.accessors._open import open
from lamin_io.accessors._probe import probe
from lamin_io.accessors._soma import WritableSOMA
from lamin_io.accessors._tables import open_many

__all__ = [
    "Format",
    "WritableSOMA",
    "format_for",
    "formats",
    "open",
    "open_many",
    "probe",
    "register_format",
    "supported_suffixes",
]
