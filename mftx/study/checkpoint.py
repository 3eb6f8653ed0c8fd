"""One checkpoint during `mftx analyze`: its model, data, fingerprints and output directory.

Shared by the analysis stages (`mftx.study.analysis`) and the held-out stages
(`mftx.study.crossfit`), which both take a `Checkpoint` and an `AnalyzeConfig`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from ..data import load_sst2
from ..models import load_classifier, read_metadata
from . import records
from .config import AnalyzeConfig
from .heldout import DevRows
from .stages import Stage, digest_batches, digest_tensors

__all__ = ["Checkpoint"]


class Checkpoint:
    """One checkpoint's model, data, fingerprints and output directory during `analyze`."""

    def __init__(self, path: Path, cfg: AnalyzeConfig, root: Path, force: bool):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"{self.path} is not a model checkpoint (no config.json)")
        self.meta = read_metadata(self.path) if (self.path / "mftx.json").is_file() else {}
        self.name = self.path.name
        self.root, self.force = root, force
        self.out = root / self.name
        self.out.mkdir(parents=True, exist_ok=True)
        self.model, self.tok = load_classifier(str(self.path))
        seed = cfg.seed if cfg.seed is not None else int(self.meta.get("seed", 0))
        self.data = load_sst2(
            cfg.data, cfg.train_size, seed, tokenizer=self.tok, max_length=cfg.max_length
        )
        self.train = self.data.train_batches(cfg.batch_size, shuffle=True, seed=seed)
        #: The dev rows; their batches are length-sorted (metrics do not depend on order).
        self.rows = DevRows(self.data.dev, self.tok, cfg.eval_batch_size, cfg.max_length)
        self.dev = self.rows.batches
        #: Settings that define the dev batches, and those plus the training batches.
        self.eval_settings = {"eval_batch_size": cfg.eval_batch_size, "max_length": cfg.max_length}
        self.data_settings = {
            **self.eval_settings, "train_size": cfg.train_size, "seed": seed,
            "batch_size": cfg.batch_size,
        }  # fmt: skip
        self.inputs = {
            "weights": digest_tensors(self.model.state_dict().items()),
            "train": digest_batches(self.train),
            "dev": digest_batches(self.dev),
        }

    def stage(self, kind: str, method: Optional[str], settings: Dict[str, Any],
              inputs: Dict[str, str], **kw: Any) -> Stage:  # fmt: skip
        """This checkpoint's record of `kind` (paths in it relative to the run directory)."""
        path = self.out / f"{records.stem(kind, method)}.json"
        return Stage(path, kind, settings, inputs, self.root, self.force, **kw)

    def view(self, sub: Path) -> Checkpoint:
        """The same checkpoint writing its records to ``OUT/<checkpoint>/<sub>`` (a repeated
        split's stages), sharing the model, data and fingerprints."""
        import copy

        other = copy.copy(self)
        other.out = self.out / sub
        other.out.mkdir(parents=True, exist_ok=True)
        return other

    def dev_inputs(self, **more: str) -> Dict[str, str]:
        return {"weights": self.inputs["weights"], "dev": self.inputs["dev"], **more}
