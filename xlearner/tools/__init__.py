"""Tools around the method, not the method.

The method (expand -> squeeze -> transfer) lives one level up, in xlearner/.
What is here only serves it: the procedural demo world that lets the whole
pipeline run on a laptop (demo.py), the benchmarks that hold each stage against
a bare-torchvision floor (bench.py, docs/DESIGN.md §7), and the ablation driver
that trains and transfers the paper's variants on one data budget (ablate.py).
Nothing in xlearner/ imports from here; cli.py calls these on demand.
"""
