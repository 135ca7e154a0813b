"""kvfs: Azure Key Vault objects as a lazy, cached, read-only FUSE filesystem.

Layers (dependencies point down; see docs/ARCHITECTURE.md):
cli → csi → daemon → fs → cache → vault → auth → net → config, with the emulator beside them.
"""

__version__ = "0.1.0"
