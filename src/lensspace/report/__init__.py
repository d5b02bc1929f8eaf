"""The study's report: one self-contained HTML page of every registered experiment of every run.

The workflow's registry (``register_experiment`` in ``rules/common.smk``) names, per experiment,
the files it made for each run and the module here that shows them. :func:`build` imports each
module and asks it, per run, for its finding and its section (the interface:
:mod:`lensspace.report.sections`). The shared parts: :mod:`~lensspace.report.blocks` (what a
section is made of), :mod:`~lensspace.report.render` (HTML), :mod:`~lensspace.report.words`
(numbers and phrases), :mod:`~lensspace.report.provenance` and :mod:`~lensspace.report.page`
(the page itself). Every number on the page is read from the results.
"""

from lensspace.report.page import build

__all__ = ["build"]
