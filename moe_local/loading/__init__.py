"""Finding and reading model files: hub ids or folders, safetensors shards through memory maps, and the
schema of a family's checkpoint-name map (`CheckpointMap`) with the reader of routed experts it drives."""

from moe_local.loading.checkpoint import Checkpoint, open_checkpoint
from moe_local.loading.hub import resolve_model_dir

__all__ = ["Checkpoint", "open_checkpoint", "resolve_model_dir"]
