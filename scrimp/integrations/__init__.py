"""Using scrimp's optimizers from other training frameworks (``scrimp.integrations.hf``: transformers'
``Trainer``). Each module imports its framework, so ``import scrimp.integrations`` alone costs nothing."""
