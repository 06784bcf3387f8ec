"""megapt.train."""
