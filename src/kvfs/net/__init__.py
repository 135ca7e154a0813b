"""The one place for HTTP: client factory and TLS, retry policy, single flight, deadlines, body caps.

auth (Entra ID, IMDS, NMI) and vault (Key Vault) both build on it; it imports neither.
"""
