"""The five stages of a specialization run, one module each; `ml_core.pipeline` wires them.

Each stage module has one `run(ctx, out)` that reads the artifacts of the stages before it
(`ml_core.stages.context`), writes its own under `out`, and returns its counts and metrics.
"""
