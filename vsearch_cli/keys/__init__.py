"""`vsearch keys`: API keys for the gateway (create, list, revoke), kept as hashes in the keys file the
gateway reads (`GATEWAY_AUTH__KEYS_FILE`; the format is gateway/api_keys.py's)."""
