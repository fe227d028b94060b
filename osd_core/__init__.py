"""osd_core: the math and the delta format of osd-fleet (pure torch; no orchestration).

Compress a fine-tune's weight delta with Optimal Singular Damage or its baselines under a per-layer
bit budget, store it in a versioned, checksummed format, and reconstruct the fine-tune.
"""

__version__ = "0.1.0"
