# SPDX-License-Identifier: LGPL-3.0-only
"""Everything that touches mergekit: the kernel, blends, registration and the planner adapter."""
