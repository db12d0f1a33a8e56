"""Energy: meters that count joules, and the ledger that charges them to requests."""

from joule.energy.attribution import AttributionWeights, EnergyLedger, EnergyTotals
from joule.energy.meter import (
    ESTIMATED,
    MEASURED,
    CpuTimeEnergyEstimate,
    EnergyMeter,
    FakeEnergyMeter,
    NvmlEnergyMeter,
    RaplEnergyMeter,
    select_energy_meter,
)

__all__ = [
    "AttributionWeights", "EnergyLedger", "EnergyTotals", "ESTIMATED", "MEASURED", "CpuTimeEnergyEstimate",
    "EnergyMeter", "FakeEnergyMeter", "NvmlEnergyMeter", "RaplEnergyMeter", "select_energy_meter",
]
