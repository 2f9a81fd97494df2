"""Generated governor modules, one per machine file: written by `autonomic build`, do not edit."""

MODULES: tuple[str, ...] = (
    "billing",
    "compliance",
    "customer_account",
    "entitlement",
    "product_catalog",
    "quota_sla",
    "subscription",
)
