"""Which acceptance rule a greedy engine verifies drafts with.

``exact`` (the default) keeps a drafted token only when it is the target's own choice, so the
output is token for token plain greedy decoding. ``specdec`` is SpecDec's relaxed rule (Xia et
al. 2023; ``draft.verify_specdec``): a token among the target's top ``beta`` whose log-probability
is within ``tau`` of the best is kept too. It accepts more and so runs faster, but it changes the
output: it is LOSSY, never the default, and everything made with it says so (``lossy`` in the
statistics, the server's responses and the benchmark report). It is a greedy rule: sampling with
it is refused rather than silently verified exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .draft import Draft, verify_greedy, verify_sampling, verify_specdec
from .errors import InvalidArgument
from .checks import integer
from .sampling import SamplingParams

RULES = ("exact", "specdec")


@dataclass(frozen=True)
class VerifyRule:
    name: str = "exact"
    beta: int = 1
    tau: float = 0.0

    @classmethod
    def parse(cls, verify: str | None, options: dict) -> "VerifyRule":
        """``verify`` and, for specdec, its ``beta`` and ``tau`` taken out of ``options`` (the
        method options, where ``-o beta=3 -o tau=1.0`` put them)."""
        verify = verify or "exact"
        if verify not in RULES:
            raise InvalidArgument("verify", f"expected one of {', '.join(RULES)}, got {verify!r}")
        if verify == "exact":
            for name in ("beta", "tau"):
                if name in options:
                    raise InvalidArgument(name, "only verify='specdec' takes beta and tau")
            return cls()
        beta, tau = options.pop("beta", 3), options.pop("tau", 1.0)
        integer("beta", beta, 1, "how many of the target's top tokens may be accepted")
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 <= tau < float("inf"):
            raise InvalidArgument("tau", f"expected a finite number >= 0 (log-probability margin), got {tau!r}")
        return cls("specdec", beta, float(tau))

    @property
    def lossy(self) -> bool:
        """beta = 1 accepts only the argmax: exact greedy decoding, whatever the rule's name."""
        return self.name == "specdec" and self.beta > 1

    def describe(self) -> str:
        return "exact" if not self.lossy else f"specdec(beta={self.beta}, tau={self.tau:g})"

    def options(self) -> dict:
        return {} if not self.lossy else {"verify": self.name, "beta": self.beta, "tau": self.tau}

    def greedy(self, draft: Draft, logits: torch.Tensor) -> tuple[list[int], int]:
        if not self.lossy:
            return verify_greedy(draft, logits)
        return verify_specdec(draft, logits, self.beta, self.tau)

    def verify(self, draft: Draft, logits: torch.Tensor, params: SamplingParams,
               generator: torch.Generator | None) -> tuple[list[int], int]:  # fmt: skip
        """The verdict on ``draft``: (accepted node indices along the path, the target's next
        token). Greedy requests go through this rule; sampling through lossless speculative
        sampling, which only an exact rule allows (a lossy rule refuses sampling requests when
        they are made)."""
        if params.greedy:
            return self.greedy(draft, logits)
        return verify_sampling(draft, logits, params, generator)

