"""megatron-eaopd: Entropy-Aware On-Policy Distillation for Megatron-core."""

__version__ = "0.1.0"
