"""Where experts live and how they are computed: store, slots, policies, placements, executors.

Never imports `hotexperts.models` (the engine wires the two together).
"""
