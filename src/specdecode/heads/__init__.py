"""Trained draft heads (EAGLE-3, EAGLE-1/2, SpecDec's drafter, Medusa-1): the networks
(``model.py``), their files (``store.py``, ``published.py``) and their training (``train.py``)."""
