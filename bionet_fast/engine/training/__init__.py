"""engine.training: trainer, train_config, run_folder, ema, finetune, divergence, plots, train_notes."""
