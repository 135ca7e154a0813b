"""The CSI node plugin, the mounter that forks one daemon per volume, and their helpers."""
