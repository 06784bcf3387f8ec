"""megapt.weights: model weights in and out (megapt weights folders and files, Hugging Face
folders, ZeRO checkpoint consolidation, loading any of them as a model source)."""
