"""Every time limit on the path of a file read, derived from the one documented budget.

README and docs/SEMANTICS.md (#12) promise that a read which needs the network answers within
`READ_BUDGET` seconds. Each layer's limit is cut from the one above it, so the innermost limit
always fires first and its message (which names the service that was slow) is the one the
reader's log shows:

    READ_BUDGET 30 s            a file read that needs the network
      LOAD_DEADLINE 28 s        the cache's load of one object (token + Key Vault + render)
        VAULT_OP_DEADLINE 25 s  one Key Vault operation, retries and the token included
          TOKEN_DEADLINE 15 s   one token request with its retries; leaves a whole HTTP attempt
          HTTP_TIMEOUT 10 s     one HTTP attempt (connect, each read, each write, pool wait)
"""

from __future__ import annotations

READ_BUDGET = 30.0
# Rendering (PFX → PEM) and the FUSE reply happen after the load; they get what is left.
LOAD_DEADLINE = READ_BUDGET - 2.0
# Below the load deadline, so a Key Vault timeout is reported as one, not as a generic timeout.
VAULT_OP_DEADLINE = LOAD_DEADLINE - 3.0
# A stalled attempt leaves room for a second one within the operation.
HTTP_TIMEOUT = VAULT_OP_DEADLINE / 2.5
# A token is fetched inside a Key Vault attempt: it must leave time for the Key Vault GET.
TOKEN_DEADLINE = VAULT_OP_DEADLINE - HTTP_TIMEOUT
# IMDS and NMI are on the node: a connection that does not open at once will not open.
LOCAL_CONNECT_TIMEOUT = 2.0

# A failed load is answered from memory this long (docs/SEMANTICS.md #11), so a reader polling a
# missing or forbidden object does not send a request per poll.
ERROR_COOLDOWN = 5.0
