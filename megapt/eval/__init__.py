"""megapt.eval."""
