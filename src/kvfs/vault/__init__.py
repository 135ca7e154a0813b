"""Key Vault access: HTTPS transport, retries, the REST client, and turning objects into file bytes."""
