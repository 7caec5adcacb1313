"""Model adapters: load a checkpoint through transformers, expose its steps as export-friendly modules."""
