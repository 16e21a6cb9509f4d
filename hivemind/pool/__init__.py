"""Worker → pool side of the node pool protocol."""
