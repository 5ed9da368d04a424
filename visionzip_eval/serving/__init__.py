"""The pre-LLM methods served by a real engine (vLLM): the registry's own reduction runs on the
tower output in transformers (``visionzip_eval.engine``'s hooks), the projector maps it, and
vLLM's LLM receives the rows as precomputed image embeddings (``enable_mm_embeds=True``).

``checkpoint``: a vLLM-loadable folder for a checkpoint (key layout) or the 7B shape;
``served``: ``ServedEngine`` (the transformers ``Engine``'s interface, the LLM in vLLM);
``bench``: ``visionzip-eval bench serve``. vLLM lives in its own environment
(``scripts/setup_vllm.sh`` -> ``.venv-vllm``); importing this package does not import vLLM.
"""
