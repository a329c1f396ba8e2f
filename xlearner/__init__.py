"""X-Learner: learning cross sources and tasks for a universal visual representation.

Expand (task-specific backbones linked by reconciliation layers), squeeze (distil
them into one standard backbone), transfer (prove it downstream). See README.md.
"""
__version__ = "0.1.0"
