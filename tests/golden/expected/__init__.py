"""Generated governor modules, one per machine file: written by `autonomic build`, do not edit."""

MODULES: tuple[str, ...] = ("billing", "entitlement")
