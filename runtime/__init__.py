"""autonomic's runtime: dispatches events over generated tables, with timers and a signed ledger."""
