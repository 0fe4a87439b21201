"""Training MTP heads: data generation, losses, trainer."""
