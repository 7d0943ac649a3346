"""Frozen representation encoders for REPA: DINOv2 (`dinov2`), the digits teacher
(`digits_teacher`), and torch's bicubic resize in JAX (`resize`)."""
