"""One row per registered method (as kvpress' tests/default_presses.py): the options each
contract test builds it with. ``test_methods.py`` iterates these rows and fails when a method
is registered without one, so a new method is one module plus one row here."""

# (method name, options, deterministic: the same images give the same tokens whatever the batch)
METHOD_ROWS = [
    ("visionzip", {}, True),
    ("visionzip", {"merge": "average"}, True),
    ("random", {"seed": 1}, False),  # draws anew at every call: batch and singles differ
    ("pool", {}, True),
    ("fastervlm", {}, True),
    ("vispruner", {}, True),
    ("vispruner", {"important_ratio": 0.25}, True),
    ("divprune", {}, True),
    ("prumerge+", {}, True),
    # in-LLM: the tiny families' 2-layer LLMs prune before layer 1 (FastV's K=2 does not fit)
    ("fastv", {"k": 1}, True),
    ("pdrop", {}, True),
    ("sparsevlm", {}, True),
    # the non-default position rule (FastV's): kept tokens keep their original positions
    ("pdrop", {"positions": "original"}, True),
    ("sparsevlm", {"positions": "original"}, True),
    # VisionZip with the official code's arithmetic in the model's dtype (refused without a CLS token)
    ("visionzip", {"selection_precision": "reference"}, True),
    ("fastervlm", {"selection_precision": "reference"}, True),
    ("vispruner", {"selection_precision": "reference"}, True),
]
