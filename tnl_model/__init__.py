"""tnl_model: the TNL hybrid lightning-attention MoE model for Hugging Face transformers."""
