"""Moved to kvfs.net.http; csi/daemon.py still imports `preload_ssl_context` from here.

Delete this module once csi/daemon.py imports it from kvfs.net.http.
"""

from kvfs.net.http import preload_ssl_context

__all__ = ["preload_ssl_context"]
