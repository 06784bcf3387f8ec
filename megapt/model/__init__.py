"""megapt.model."""
