"""Lazy readers, one module per family of formats, dispatched through the format table."""

from lamin_io.accessors._formats import Format, format_for, formats, register_format

__all__ = ["Format", "format_for", "formats", "register_format"]
