"""Compatibility layers applied explicitly by the entry points (never at import time)."""

from megatron_eaopd.compat.cpu import (
    cpu_compat,
    disable_cpu_compat,
    enable_cpu_compat,
    is_cpu_compat_enabled,
)

__all__ = ["cpu_compat", "disable_cpu_compat", "enable_cpu_compat", "is_cpu_compat_enabled"]
