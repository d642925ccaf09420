"""Fast backends of the fused op (each registers itself on import; see ops.backends)."""
