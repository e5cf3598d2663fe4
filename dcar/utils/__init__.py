"""General helpers used across dcar (no model or data logic): :mod:`dcar.utils.atomic` (files written atomically)."""
