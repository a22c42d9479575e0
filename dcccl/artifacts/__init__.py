"""The files of a run: the run directory's paths, exports and their lineage, the manifest, atomic writes, and what a
device keeps (its progress within a round, its state between rounds)."""
