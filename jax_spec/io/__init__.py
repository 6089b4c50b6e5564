"""Run I/O shared by every trainer: orbax checkpoints (`checkpointing`) and metrics files
(`metrics`). Nothing here knows about a model, so the LM trainer and the RLE trainer both use it
without depending on each other."""
