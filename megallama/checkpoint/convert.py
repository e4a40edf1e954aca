"""Moved to :mod:`megallama.interop.convert` (Meta / HF interop has its own package); this module
keeps the documented ``from megallama.checkpoint.convert import convert, MetaSource, HFSource,
MegallamaSource`` working. New code imports ``megallama.interop.convert``."""

from megallama.interop.convert import (  # noqa: F401 -- re-exported public entry points
    HFSource,
    MegallamaSource,
    MetaSource,
    convert,
    open_source,
    parse_spec,
)

__all__ = ["HFSource", "MegallamaSource", "MetaSource", "convert", "open_source", "parse_spec"]
