"""megapt.tasks: task models, data and metrics shared by fine-tuning and evaluation."""
