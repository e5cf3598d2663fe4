"""General helpers used across dcar (no model or data logic): :mod:`dcar.utils.atomic` (files written atomically),
:mod:`dcar.utils.modes` (eval mode for a block, training flags restored exactly)."""
