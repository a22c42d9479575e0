"""Everything about the fleet: the class split between cloud and devices, per-device partitions, who takes part in a
round, how the copies of the co-submodel are fused, what crosses the boundary (ledger), what a device can afford."""
