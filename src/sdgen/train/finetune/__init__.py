"""Fine-tuning on your own images: LoRA (lora_network.py), textual inversion
(textual_inversion.py) and DreamBooth-style full fine-tuning with prior preservation, run by
`training.run_finetune`; data.py describes the image folder, cache.py the latent cache."""
