"""Everything that touches mergekit: the kernel, blends, registration and the planner adapter."""
