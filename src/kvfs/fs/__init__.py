"""The file tree and its operations; pyfuse3 appears only in adapter.py."""
