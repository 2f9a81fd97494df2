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
FLOWS: tuple[str, ...] = (
    "flow_customer_signup",
    "flow_noisy_neighbour",
    "flow_payment_processed",
    "flow_subscription_cancellation",
    "flow_subscription_upgrade",
)
