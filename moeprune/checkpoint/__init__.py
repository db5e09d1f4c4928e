"""Everything moeprune writes to disk goes through here: one atomic output-folder writer, on-disk sizes
and dtypes of checkpoints, and the shard-by-shard rewrite of compressed checkpoints."""

from moeprune.checkpoint.files import checkpoint_dtype, files_bytes, safetensors_files
from moeprune.checkpoint.writer import OutputFolder, check_output_dir, portable_path, write_json

__all__ = ["OutputFolder", "check_output_dir", "checkpoint_dtype", "files_bytes", "portable_path",
           "safetensors_files", "write_json"]
