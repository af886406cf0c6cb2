"""Bastion's benchmark suite: ``make bench`` (or ``python bench/run.py``).

Each module measures one thing against a real ``bastion serve`` that the suite starts
itself; :mod:`bench.run` is the command line, :mod:`bench.report` the table and targets.
"""
