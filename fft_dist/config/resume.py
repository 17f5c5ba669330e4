"""`resume=` typed: none, auto, or a checkpoint path, parsed in one place so that no code compares the
bare string. The resolver and the restart rule are :mod:`fft_dist.checkpoint.resume`."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path


class ResumeKind(str, Enum):
    none = "none"
    auto = "auto"
    path = "path"


@dataclass(frozen=True)
class ResumeRequest:
    """What ``resume=`` asks for; the resolver is :mod:`fft_dist.checkpoint.resume`."""

    kind: ResumeKind
    path: Path | None = None

    @classmethod
    def parse(cls, value: str | None) -> ResumeRequest:
        text = "" if value is None else str(value).strip()
        if text in ("", ResumeKind.none.value):
            return cls(ResumeKind.none)
        if text == ResumeKind.auto.value:
            return cls(ResumeKind.auto)
        return cls(ResumeKind.path, Path(str(value)))

    @property
    def fresh(self) -> bool:
        """A fresh start: nothing is resumed, so an earlier run's outputs are not this run's."""
        return self.kind is ResumeKind.none
