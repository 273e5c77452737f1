"""Fused MoE kernels (Triton) and their pure-torch reference."""
