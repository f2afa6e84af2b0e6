"""The compiled twins of advisor.sim's references (numba): trace, sequential, policies, cache, events, lists."""
