"""Everything on disk: every checkpoint byte is read (folders, headers, names, per-layer weights) and written here."""

from moeprune.checkpoint.files import checkpoint_dtype, files_bytes, safetensors_files
from moeprune.checkpoint.writer import OutputFolder, check_output_dir, portable_path, write_json

__all__ = ["OutputFolder", "check_output_dir", "checkpoint_dtype", "files_bytes", "portable_path",
           "safetensors_files", "write_json"]
