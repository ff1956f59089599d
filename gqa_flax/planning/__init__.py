"""Ahead-of-time planning of TPU runs from any machine (`gqa-plan`).

With libtpu installed (the `tpu` extra), JAX compiles for a TPU topology on a CPU-only
machine. The planner builds abstract train and decode states (ShapeDtypeStructs, nothing
allocated), compiles the train step and the decode steps with the config's sharding for a
TPU slice, and reads XLA's memory and cost analyses: per-chip memory against HBM, the largest
batch that fits, flops and bytes per step, and step times from XLA's cost model.
"""
