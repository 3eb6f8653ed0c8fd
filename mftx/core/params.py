"""The parameter space: which parameters of a model are analysed, in a fixed order.

The default selection is structural, read from the module tree rather than from
parameter names, so it means the same on every architecture: the weights and
biases of the attention and MLP blocks are analysed; embeddings (token,
position, type, patch; tied output embeddings), normalisation layers (LayerNorm,
RMSNorm and the like, whatever their class is called), the pooler and the task
head (everything outside a Hugging Face model's base model, whatever its name)
are left out. Regular-expression `include`/`exclude` patterns narrow it further.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["DEFAULT_EXCLUDE", "REASONS", "ParamSpace", "select_params", "structural_roles"]

#: The reference study's exclusions written as BERT parameter names (the classification
#: head, the pooler, every LayerNorm, the embeddings). Kept for compatibility: the default
#: selection is structural (`structural_roles`) and gives the same space on BERT.
DEFAULT_EXCLUDE: Tuple[str, ...] = (
    r"(^|\.)classifier(\.|$)",
    r"(^|\.)pooler(\.|$)",
    r"(?i)layer_?norm",
    r"(^|\.)embeddings(\.|$)",
)

#: Why a parameter is left out, for each role `select_params` can give it.
REASONS: Dict[str, str] = {
    "embedding": "token, position, type or patch embeddings (nn.Embedding, the model's input "
    "embeddings, *Embedding(s) modules, learned tokens)",
    "normalisation": "normalisation layers (LayerNorm, RMSNorm, GroupNorm, BatchNorm, any "
    "*Norm* module whose own parameters are 1-D)",
    "pooler": "the pooler",
    "head": "the task head (everything outside the base model, the output embeddings)",
    "include": "matched no include pattern",
    "exclude": "matched an exclude pattern",
}

_NORM_TYPES = tuple(
    t
    for t in (
        nn.LayerNorm,
        nn.GroupNorm,
        nn.LocalResponseNorm,
        nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*
        getattr(nn, "RMSNorm", None),
    )
    if t is not None
)
_NORM_NAME = re.compile(r"norm", re.I)
_EMBEDDING_CLASS = re.compile(r"Embed(ding)?s?$")
_EMBEDDING_LEAF = re.compile(r"(?i)embed|^(cls|mask|dist|distillation|register)_tokens?$")
_POOLER = re.compile(r"Pooler$")
#: Head module names recognised on models without a Hugging Face base model.
_HEAD_NAMES = frozenset(
    {"classifier", "pre_classifier", "score", "lm_head", "qa_outputs", "head", "cls"}
)
#: Priority when a tensor has several roles (a LayerNorm inside the embeddings, an output
#: embedding tied to the input one): the first wins.
_PRIORITY = ("normalisation", "embedding", "pooler", "head")


@dataclass(frozen=True, eq=False)
class ParamSpace:
    """The analysed parameters of a model: names, tensors (the live parameters), shapes.

    Vectors over the space are handled either as lists of tensors shaped like the
    parameters or as one flat 1-D tensor (`flatten` / `unflatten`), in this order.
    """

    names: Tuple[str, ...]
    params: Tuple[torch.Tensor, ...]
    model_numel: int
    #: ``(name, reason, numel)`` of every parameter left out (reasons: `REASONS`).
    excluded: Tuple[Tuple[str, str, int], ...] = ()

    def __post_init__(self) -> None:
        if len(self.names) != len(self.params):
            raise ValueError("ParamSpace: names and params differ in length")
        if not self.names:
            raise ValueError(
                "no analysed parameters: the selection left nothing "
                "(see select_params(include=..., exclude=..., structural=...))"
            )

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[Tuple[str, torch.Tensor]]:
        return iter(zip(self.names, self.params))

    @property
    def shapes(self) -> Tuple[torch.Size, ...]:
        return tuple(p.shape for p in self.params)

    @property
    def numels(self) -> Tuple[int, ...]:
        return tuple(p.numel() for p in self.params)

    @property
    def numel(self) -> int:
        return sum(self.numels)

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def summary(self) -> Dict[str, object]:
        """Total model parameters, analysed parameters, their share, and what was left out.

        ``excluded`` maps each reason (`REASONS`) to its parameter and tensor
        counts, the reason in words and up to three example names.
        """
        groups: Dict[str, Dict[str, object]] = {}
        for name, reason, numel in self.excluded:
            g = groups.setdefault(
                reason, {"params": 0, "tensors": 0, "why": REASONS[reason], "examples": []}
            )
            g["params"] += numel
            g["tensors"] += 1
            if len(g["examples"]) < 3:
                g["examples"].append(name)
        return {
            "total": self.model_numel,
            "analysed": self.numel,
            "share": self.numel / self.model_numel if self.model_numel else 0.0,
            "tensors": len(self),
            "excluded": groups,
        }

    def detached(self) -> List[torch.Tensor]:
        return [p.detach() for p in self.params]

    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate tensors shaped like the parameters into one 1-D tensor."""
        if len(tensors) != len(self):
            raise ValueError(f"expected {len(self)} tensors, got {len(tensors)}")
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, vec: torch.Tensor) -> List[torch.Tensor]:
        """Views of a flat vector shaped like the parameters."""
        if vec.dim() != 1 or vec.numel() != self.numel:
            raise ValueError(
                f"expected a 1-D tensor of {self.numel} entries, got {tuple(vec.shape)}"
            )
        return [c.view(s) for c, s in zip(torch.split(vec, self.numels), self.shapes)]

    def locate(self, tensor_index: int, flat_index: int) -> Tuple[str, Tuple[int, ...]]:
        """Parameter name and multi-index of entry `flat_index` of tensor `tensor_index`."""
        shape = self.shapes[tensor_index]
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), shape))
        return self.names[tensor_index], idx


def _compile(patterns: Optional[Iterable[str]], what: str) -> List[re.Pattern]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise ValueError(f"invalid {what} pattern {p!r}: {exc}") from None
    return out


def _call(model: nn.Module, method: str) -> Optional[nn.Module]:
    fn = getattr(model, method, None)
    if not callable(fn):
        return None
    try:
        out = fn()
    except (NotImplementedError, AttributeError, TypeError):
        return None
    return out if isinstance(out, nn.Module) else None


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, _NORM_TYPES):
        return True
    own = list(module.parameters(recurse=False))
    return (
        bool(own)
        and bool(_NORM_NAME.search(type(module).__name__))
        and all(p.dim() <= 1 for p in own)
    )


def structural_roles(model: nn.Module) -> Dict[int, str]:
    """``id(parameter) -> role`` for the parameters the default selection leaves out.

    Roles (`REASONS`): ``normalisation`` (the own parameters of normalisation
    modules), ``embedding`` (nn.Embedding, the model's input embeddings, modules
    whose class ends in Embedding(s), parameters named like embeddings or learned
    tokens), ``pooler`` (a module named ``pooler`` or a *Pooler class), ``head``
    (for every Hugging Face model in the tree, its parameters outside its base
    model and its output embeddings; on models with no base model, modules named
    classifier, score, lm_head, ...). A tensor with several roles gets the first
    in that order. Parameters without a role are the analysed ones.
    """
    found: Dict[str, set] = {role: set() for role in _PRIORITY}

    def add(role: str, params: Iterable[torch.Tensor]) -> None:
        found[role].update(id(p) for p in params)

    has_base = False
    for path, mod in model.named_modules(remove_duplicate=False):
        leaf = path.rsplit(".", 1)[-1]
        if _is_norm(mod):
            add("normalisation", mod.parameters(recurse=False))
        if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) or _EMBEDDING_CLASS.search(
            type(mod).__name__
        ):
            add("embedding", mod.parameters())
        add(
            "embedding",
            (p for n, p in mod.named_parameters(recurse=False) if _EMBEDDING_LEAF.search(n)),
        )
        if leaf == "pooler" or _POOLER.search(type(mod).__name__):
            add("pooler", mod.parameters())
        base = getattr(mod, "base_model", None)
        if isinstance(base, nn.Module) and base is not mod:
            has_base = True
            inside = {id(p) for p in base.parameters()}
            add("head", (p for p in mod.parameters() if id(p) not in inside))
        for method, role in (("get_input_embeddings", "embedding"),
                             ("get_output_embeddings", "head")):  # fmt: skip
            found_mod = _call(mod, method)
            if found_mod is not None:
                add(role, found_mod.parameters())
    if not has_base:
        for path, mod in model.named_modules(remove_duplicate=False):
            if path and path.rsplit(".", 1)[-1] in _HEAD_NAMES:
                add("head", mod.parameters())
    roles: Dict[int, str] = {}
    for role in reversed(_PRIORITY):  # higher priority overwrites
        roles.update(dict.fromkeys(found[role], role))
    return roles


def select_params(
    model: nn.Module,
    include: Optional[Iterable[str]] = None,
    exclude: Optional[Iterable[str]] = None,
    *,
    structural: bool = True,
) -> ParamSpace:
    """The analysed parameters of `model`, in `named_parameters()` order.

    With `structural` (the default) embeddings, normalisation layers, the
    pooler and the task head are left out whatever their names
    (`structural_roles`); on BERT that is the reference study's space. Of the
    rest, a parameter is analysed when its name matches one of `include`
    (every name, if None) and none of `exclude` (regular expressions,
    `re.search`; e.g. `DEFAULT_EXCLUDE`). ``structural=False`` leaves the choice
    to the patterns alone. Tied or shared tensors count once, under their first
    name. `ParamSpace.summary()` says what was left out and why.
    """
    inc = _compile(include, "include")
    exc = _compile(exclude, "exclude")
    roles = structural_roles(model) if structural else {}
    names, params, excluded, seen = [], [], [], set()
    total = 0
    for name, p in model.named_parameters():  # deduplicates shared tensors
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        reason = roles.get(id(p))
        if reason is None and inc and not any(r.search(name) for r in inc):
            reason = "include"
        if reason is None and any(r.search(name) for r in exc):
            reason = "exclude"
        if reason is not None:
            excluded.append((name, reason, p.numel()))
            continue
        names.append(name)
        params.append(p)
    if not names:
        counts = Counter(reason for _, reason, _ in excluded)
        left = ", ".join(f"{n} by {r}" for r, n in sorted(counts.items())) or "no parameters"
        hint = "; pass structural=False to analyse them" if structural and roles else ""
        raise ValueError(
            f"no analysed parameters in {type(model).__name__}: include={include!r}, "
            f"exclude={exclude!r}, structural={structural} leave nothing (tensors left out: "
            f"{left}){hint}"
        )
    dtypes = {p.dtype for p in params}
    devices = {p.device for p in params}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ValueError(
            f"analysed parameters must share one dtype and device, got {sorted(map(str, dtypes))} "
            f"on {sorted(map(str, devices))}"
        )
    return ParamSpace(tuple(names), tuple(params), total, tuple(excluded))
