"""DPO with LoRA restricted to chosen blocks of decoder layers."""
