"""Whisper (Xia et al., arXiv 2510.10528; code hemingkx/Whisper): shorter reasoning by a prompt
suffix alone, found by a search, no training.

- ``candidates``: a starting set of suffixes written for this project, one or two per persuasion
  angle, and the parser for suffixes a writer LLM returns.
- ``writer``: who writes new candidates each round: the target itself (sampled) or any
  OpenAI-compatible endpoint.
- ``search``: scores every candidate on a fixed development split of GSM8K *train* with our
  exact speculative decoding (the TokenSkip evaluation, ``suffix=``), keeps those whose accuracy
  holds, ranks them by tokens, and writes the report and ``best_suffix.txt``.

The suffix is then used by ``specdecode tokenskip eval --suffix FILE`` and served with
``-o reasoning_suffix=`` (``specdecode.reasoning``). See docs/whisper.md.
"""
