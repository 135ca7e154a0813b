"""A local Key Vault + Entra ID + OIDC issuer + IMDS/NMI over HTTPS, for development, demos and tests."""
