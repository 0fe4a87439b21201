"""MTP draft heads: module, checkpoint format, loading and validation."""
