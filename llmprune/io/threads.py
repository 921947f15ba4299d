"""One lock around every model construction in llmprune.

transformers builds a model inside ``no_init_weights``, which swaps ``torch.nn.init`` functions
and ``PreTrainedModel.init_weights`` for no-ops process-wide and puts back what it found. Two
threads building at once can put back each other's no-ops: every model built afterwards in the
process is left uninitialised and its tied head untied (a tied checkpoint then loads with its
head "missing"). Jobs in threads therefore build their models one at a time.
"""

from __future__ import annotations

import threading

MODEL_BUILD = threading.RLock()
