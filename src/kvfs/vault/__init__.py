"""Key Vault access: the REST client (on kvfs.net), answer shapes, and turning objects into file bytes."""
