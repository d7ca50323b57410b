"""tnl_training: DeepSpeed ZeRO pretraining of TNL models (DESIGN.md section 2)."""
