"""Credentials: one per auth mode, each turning a scope into an access token (see base.py for the seam)."""
