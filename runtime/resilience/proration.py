"""Proration of a tier change as a pure function: same inputs, same result, to the cent.

`prorate(current, new, cycle_day, cycle_length)` follows the seed's `calculate_proration`:
with `days_remaining = cycle_length - cycle_day`,
- refund = current monthly price * days_remaining / cycle_length (credit for the old tier),
- charge = new monthly price * days_remaining / cycle_length,
- net = charge - refund,
in Decimal, with refund and charge rounded half-even to the cent, and net their exact
difference, so charges and credits always balance to the cent (charge - refund == net), and
changing tier and changing back on the same day nets to exactly zero. No state, no clock, no
I/O: the result is idempotent by construction and needs no cache or key.
Prices must be whole cents >= 0; 0 <= cycle_day <= cycle_length and cycle_length >= 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Context, Decimal, InvalidOperation
from typing import Any

__all__ = ["CENT", "Proration", "prorate", "prorate_upgrade"]

CENT = Decimal("0.01")
# Its own context, not the thread's: a caller's decimal settings must not change the result.
_CONTEXT = Context(prec=34, rounding=ROUND_HALF_EVEN)


@dataclass(frozen=True, slots=True)
class Proration:
    refund: Decimal
    charge: Decimal
    net: Decimal


def _cents(price: Decimal, role: str) -> Decimal:
    if not price.is_finite() or price < 0 or price != price.quantize(CENT):
        raise ValueError(f"the {role} price must be whole cents >= 0, not {price}")
    return price


def prorate(current: Decimal, new: Decimal, cycle_day: int, cycle_length: int) -> Proration:
    """The refund for `current`, the charge for `new` and the net, for the rest of the cycle."""
    current = _cents(current, "current")
    new = _cents(new, "new")
    if cycle_length < 1 or not 0 <= cycle_day <= cycle_length:
        raise ValueError(
            f"cycle_day must be within 0..cycle_length (>= 1), not {cycle_day}/{cycle_length}"
        )
    remaining = Decimal(cycle_length - cycle_day)
    length = Decimal(cycle_length)

    def share(price: Decimal) -> Decimal:
        part = _CONTEXT.divide(_CONTEXT.multiply(price, remaining), length)
        return part.quantize(CENT, context=_CONTEXT)

    refund, charge = share(current), share(new)
    return Proration(refund, charge, _CONTEXT.subtract(charge, refund))


def prorate_upgrade(values: Mapping[str, Any]) -> str:
    """The SubscriptionUpgrade flow's pure `compute prorate_upgrade` step: the net charge, as
    text, from the flow's inputs `current_price`, `new_price`, `cycle_day` and `cycle_length`.
    Inputs prorate() refuses, or a net below zero (a cheaper tier is a downgrade, not an
    upgrade), fail the step."""
    # Imported here: the flow runtime imports the runtime, which imports this package.
    from ..flows import StepFailed

    try:
        net = prorate(
            Decimal(str(values["current_price"])),
            Decimal(str(values["new_price"])),
            int(values["cycle_day"]),
            int(values["cycle_length"]),
        ).net
    except (KeyError, ValueError, InvalidOperation) as error:
        raise StepFailed(f"cannot prorate the upgrade: {error}") from None
    if net < 0:
        raise StepFailed(
            f"the new tier costs less ({net} for the rest of the cycle): not an upgrade"
        )
    return str(net)
