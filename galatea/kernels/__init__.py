"""Native quantized CPU kernels: GGUF blocks held as they are, repacked into 16-row tiles, and
one mat-mul for every row count (see csrc/layout.md and native.py)."""
