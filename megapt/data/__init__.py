"""megapt.data."""
