"""bench/reproduce.py's pieces, one module per concern (the script is their pipeline):

* :mod:`.scales` — the protocol: CIFAR-10's class split, the rows, the published numbers, the scale presets;
* :mod:`.cache` — the cache's primitives: content digests, cross-process locks, atomic JSON writes;
* :mod:`.data` — CIFAR-10 batches → PNG image folders, and the priors (pretrained here, or published);
* :mod:`.cells` — one protected folder per (method, prior), one verify report per (row, column group),
  each found in the cache by what it was made with;
* :mod:`.grid` — every (seed, row) of a selection through those cells, the results file rewritten as each lands;
* :mod:`.render` — the Markdown table, the plots, the results record;
* :mod:`.merge` — one table from several results files (``--merge``);
* :mod:`.cli` — the command line: parsing and validating a selection.
"""
