"""Pure tensor math for token reduction: no transformers import, unit-tested on random tensors.

- :mod:`.schedule`  how many visual tokens each reducing stage keeps, prunes and merges
- :mod:`.scoring`   attention-based importance scores from recomputed query rows
- :mod:`.merge`     bipartite soft matching (ToMe) with size-weighted averages
- :mod:`.flops`     per-layer FLOPs estimate
"""

from .flops import decoder_flops
from .merge import bipartite_merge
from .schedule import StagePlan, plan_stages
from .scoring import apply_rope, query_row_attention

__all__ = [
    "StagePlan",
    "apply_rope",
    "bipartite_merge",
    "decoder_flops",
    "plan_stages",
    "query_row_attention",
]
