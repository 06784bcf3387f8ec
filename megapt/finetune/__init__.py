"""megapt.finetune."""
