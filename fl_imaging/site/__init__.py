"""What a site holds and enforces of its own: identity, policy, privacy ledger, record."""
