"""The study: fine-tune checkpoints, analyse them under several protocols, report.

Built on the library (`mftx.score`, masking, evaluation); the library never imports it.

- `finetune`: fine-tune to dev-accuracy targets, checkpoints with their recipe.
- `config`, `checkpoint`, `analysis`: `mftx analyze`'s settings, one checkpoint's
  inputs, and the stages (scores, sweeps, overlap, fidelity, location, spectrum).
- `heldout`, `protocol`, `crossfit`: which rows choose and which rows measure
  (two-fold dev split, reference and held-out sweeps, recalibration and random-k
  controls), and the held-out stages.
- `fidelity`, `groups`: predicted against actual loss change, for single
  parameters and for whole subsets.
- `location`: where a set of parameters lives (block, module kind).
- `stages`, `schema`, `records`: the resumable run files, one layout, one class
  per record kind.
- `statistics`: correlations and bootstrap intervals.
- `report`: tables, CSV/JSON and plots from a run's records.

May import: the library (`mftx` and its packages). Imported only by `mftx.cli`.
"""
